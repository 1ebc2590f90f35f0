"""KServe ``InferenceService`` manifests (``serving.kserve.io/v1beta1``) for an engine.

Two ways to run one engine on a cluster with KServe, written side by side into one folder that
is uploaded as a whole to the storage the cluster reads (``--storage-uri``):

- ``<name>-triton.yaml``: KServe's Triton predictor (``spec.predictor.triton``) on the Triton model
  repository written next to it (``repository/``), where the engine can be exported to Triton;
- ``<name>-serve.yaml``: ``enginesmith serve`` as a custom predictor (``spec.predictor.containers``,
  the container named ``kserve-container``) on the engine copied to ``engines/``. KServe's storage
  initializer downloads ``STORAGE_URI`` to ``/mnt/models`` for a custom container, as it does
  ``storageUri`` for its own predictors.

Field names follow KServe's Go types (``pkg/apis/serving/v1beta1``: ``PredictorSpec``,
``PredictorExtensionSpec``, ``ComponentExtensionSpec``) and Kubernetes' ``Container``. Knative (KServe's
serverless mode) lets a container expose one port: ``http1`` 8080 (REST), or with ``grpc`` ``h2c``
8081, the names KServe and Knative use to tell HTTP/1 from cleartext HTTP/2.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import read_bundle
from ..errors import MissingDependencyError, NotExportableError, OutputExistsError
from ..files import atomic_writer, write_atomic
from ..manifest import Manifest, engine_needs_gpu
from .triton import TritonModel, TritonOptions, check_model_folder, check_model_name, export_triton

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"  # KServe's constants.InferenceServiceContainerName
STORAGE_URI_ENV = "STORAGE_URI"  # constants.CustomSpecStorageUriEnvVarKey: what a custom container downloads
PROTOCOL_ENV = "PROTOCOL"  # constants.CustomSpecProtocolEnvVarKey: v1 or v2
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts the model
STORAGE_PLACEHOLDER = "s3://YOUR-BUCKET/enginesmith"
IMAGE_PLACEHOLDER = "YOUR-REGISTRY/enginesmith:latest"
DEFAULT_TRITON_VERSION = "24.08-py3"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 8081, 8082
REPOSITORY_DIR = "repository"
ENGINES_DIR = "engines"
YAML_EXTRA = "pip install 'enginesmith[export]'"


@dataclass(frozen=True)
class KServeOptions:
    storage_uri: str = STORAGE_PLACEHOLDER
    runtime_version: str = DEFAULT_TRITON_VERSION
    image: str = IMAGE_PLACEHOLDER
    cpu: str = "1"
    memory: str = "2Gi"
    gpu: bool | None = None  # None: what the engine runs on
    grpc: bool = False
    triton: TritonOptions = TritonOptions()


@dataclass
class KServeResult:
    name: str
    service_name: str
    files: list[Path] = field(default_factory=list)
    triton: TritonModel | None = None
    triton_skipped: str | None = None  # why there is no Triton manifest
    notes: list[str] = field(default_factory=list)


def service_name(model_name: str) -> str:
    """An InferenceService name (DNS-1035: lower-case letters, digits, '-', starting with a letter)."""
    text = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    if not text or not text[0].isalpha():
        text = "model-" + text
    return text[:45].rstrip("-")




def _yaml():
    try:
        import yaml
    except ImportError:
        raise MissingDependencyError(f"writing KServe manifests needs PyYAML: {YAML_EXTRA}") from None
    return yaml


def _resources(options: KServeOptions, gpu: bool) -> dict[str, Any]:
    amounts: dict[str, str] = {"cpu": options.cpu, "memory": options.memory}
    if gpu:
        amounts["nvidia.com/gpu"] = "1"
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _metadata(name: str, metrics_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "annotations": {
            "serving.kserve.io/enable-prometheus-scraping": "true",
            "prometheus.kserve.io/port": str(metrics_port),
            "prometheus.kserve.io/path": "/metrics",
        },
    }


def triton_service(name: str, storage_uri: str, options: KServeOptions, gpu: bool) -> dict[str, Any]:
    """KServe's Triton predictor on a model repository (Triton's metrics port is 8002)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": _metadata(name, 8002),
        "spec": {"predictor": {"triton": {
            "storageUri": storage_uri,
            "runtimeVersion": options.runtime_version,
            "protocolVersion": "grpc-v2" if options.grpc else "v2",
            "resources": _resources(options, gpu),
        }}},
    }


def serve_args(engine_file: str, model_name: str, manifest: Manifest, triton: TritonOptions) -> list[str]:
    """The ``enginesmith serve`` command line in the container, listening on every interface."""
    args = ["serve", f"{MODEL_MOUNT}/{engine_file}", "--name", model_name, "--host", "0.0.0.0",
            "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT)]
    if triton.max_batch is not None:
        args += ["--max-batch", str(max(triton.max_batch, 1))]  # serve's 1 is Triton's 0: no batching
    if triton.queue_delay_us:
        args += ["--max-queue-delay-us", str(triton.queue_delay_us)]
    if triton.instances != 1:
        args += ["--instances", str(triton.instances)]
    if manifest.backend == "torch":
        args.append("--trust-code")  # its payload runs code: the engine is the operator's own
    return args


def serve_service(name: str, storage_uri: str, args: list[str], options: KServeOptions, gpu: bool) -> dict[str, Any]:
    port = {"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"} if options.grpc else \
        {"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}
    container = {
        "name": CONTAINER_NAME,
        "image": options.image,
        "command": ["enginesmith"],
        "args": args,
        "env": [{"name": STORAGE_URI_ENV, "value": storage_uri}, {"name": PROTOCOL_ENV, "value": "v2"}],
        "ports": [port],
        "resources": _resources(options, gpu),
    }
    if not options.grpc:
        # Knative probes the one declared port; left out, the port is that one.
        container["readinessProbe"] = {"httpGet": {"path": "/v2/health/ready"}}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": _metadata(name, METRICS_PORT),
        "spec": {"predictor": {"containers": [container]}},
    }


def _copy_atomic(source: Path, target: Path) -> None:
    with open(source, "rb") as src, atomic_writer(target) as dst:
        shutil.copyfileobj(src, dst, 2**20)


def export_kserve(
    engine: str | os.PathLike,
    folder: str | os.PathLike,
    name: str | None = None,
    options: KServeOptions = KServeOptions(),
    force: bool = False,
) -> KServeResult:
    """Write the manifests (and what they serve) into ``folder``; every target is checked before anything is written."""
    yaml = _yaml()
    engine_path = Path(engine)
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"'{out}' is a file; KServe manifests are written into a folder")
    manifest = read_bundle(engine_path, payload=False).manifest
    model_name = check_model_name(name or engine_path.stem)
    isvc = service_name(model_name)
    uri = options.storage_uri.rstrip("/")
    engine_copy = out / ENGINES_DIR / engine_path.name
    targets = [out / f"{isvc}-triton.yaml", out / f"{isvc}-serve.yaml", engine_copy]
    for target in targets:
        if target.exists() and not force:
            raise OutputExistsError(f"refusing to overwrite the existing file '{target}'; give another folder, "
                                    "or add --force")
        if target.exists() and target.resolve() == engine_path.resolve():
            raise OutputExistsError(f"'{target}' is the engine being exported; export into another folder")
    check_model_folder(out / REPOSITORY_DIR / model_name, [engine_path], force)

    gpu = engine_needs_gpu(manifest) if options.gpu is None else options.gpu
    result = KServeResult(model_name, isvc)
    try:
        triton = export_triton([engine_path], out / REPOSITORY_DIR, [model_name], options.triton, force=force)[0]
    except NotExportableError as exc:
        result.triton_skipped = str(exc)
        targets[0].unlink(missing_ok=True)  # only there with --force: a manifest of an earlier export
    else:
        result.triton = triton
        result.notes.extend(triton.notes)
        document = triton_service(isvc, f"{uri}/{REPOSITORY_DIR}", options, gpu)
        write_atomic(targets[0], yaml.safe_dump(document, sort_keys=False).encode())
        result.files += [triton.folder, targets[0]] if triton.folder else [targets[0]]
    _copy_atomic(engine_path, engine_copy)
    args = serve_args(engine_path.name, model_name, manifest, options.triton)
    document = serve_service(isvc, f"{uri}/{ENGINES_DIR}", args, options, gpu)
    write_atomic(targets[1], yaml.safe_dump(document, sort_keys=False).encode())
    result.files += [engine_copy, targets[1]]
    if options.storage_uri == STORAGE_PLACEHOLDER:
        result.notes.append(f"storage URI is a placeholder ({STORAGE_PLACEHOLDER}): upload '{out}' and set "
                            "--storage-uri to where it is")
    if options.image == IMAGE_PLACEHOLDER:
        result.notes.append(f"image is a placeholder ({IMAGE_PLACEHOLDER}): give --image, an image with enginesmith "
                            "and its serve extra installed")
    return result
