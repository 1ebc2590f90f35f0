"""enginesmith export (issue 19 parts 1 and 2): Triton model repositories and KServe manifests.

Every config.pbtxt written here is parsed with Triton's own ModelConfig schema (the generated
model_config_pb2 that tritonclient ships); the exported model files are run without enginesmith.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import typer

import enginesmith as es
from enginesmith.bundle import read_bundle, write_bundle
from enginesmith.cli import app
from enginesmith.cli.app import main
from enginesmith.errors import InputError, NotExportableError, OutputExistsError
from enginesmith.export import KServeOptions, TritonOptions, export_kserve, export_triton, plan_triton_model
from enginesmith.samples import small_cnn
from conftest import make_mlp, make_two_in_two_out

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")
yaml = pytest.importorskip("yaml")


def parse_config(path: Path):
    """Triton's own schema: an unknown field, a wrong type or a bad enum value raises ParseError."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    """ONNX Runtime engines built here: a CNN with stored samples, two-in/two-out, a fixed batch of 1."""
    folder = tmp_path_factory.mktemp("engines")
    rng = np.random.default_rng(3)
    cnn = folder / "cnn.onnx"
    onnx.save(small_cnn(image_size=8), cnn)
    es.build(cnn, data={"image": rng.standard_normal((5, 1, 8, 8)).astype(np.float32)}).save(folder / "cnn.engine")
    pair = folder / "pair.onnx"
    onnx.save(make_two_in_two_out(), pair)
    es.build(pair).save(folder / "pair.engine")
    fixed = folder / "fixed.onnx"
    onnx.save(make_mlp(batch=1), fixed)
    es.build(fixed, data={"x": rng.standard_normal((1, 6)).astype(np.float32)}).save(folder / "fixed.engine")
    return {"cnn": folder / "cnn.engine", "pair": folder / "pair.engine", "fixed": folder / "fixed.engine"}


def with_manifest(source: Path, target: Path, **changes) -> Path:
    """A copy of an engine bundle whose manifest says something else (another backend, other options)."""
    contents = read_bundle(source, payload=True, source=True, samples=True)
    build_options = changes.pop("build_options", None)
    manifest = dataclasses.replace(contents.manifest, **changes)
    if build_options is not None:
        manifest.build_options = {**manifest.build_options, **build_options}
    contents.manifest = manifest
    write_bundle(target, contents)
    return target


# --------------------------------------------------------------------------- Triton: ONNX Runtime engines


def test_onnxruntime_engine_becomes_a_triton_model_that_runs_without_enginesmith(engines, tmp_path):
    repo = tmp_path / "repo"
    assert main(["export", "triton", str(engines["cnn"]), "-o", str(repo), "--preferred-batch", "4,8",
                 "--queue-delay-us", "500", "--instances", "2"]) == 0
    folder = repo / "cnn"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx", "config.pbtxt", "warmup/0_image"]
    config = parse_config(folder / "config.pbtxt")
    assert config.name == "cnn" and config.platform == "onnxruntime_onnx"
    assert config.default_model_filename == "model.onnx"
    # The engine's batch axis is dynamic: Triton owns it, so it is left out of dims.
    assert config.max_batch_size == 32
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("image", "TYPE_FP32", [1, 8, 8])]
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [
        ("probs", "TYPE_FP32", [10])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (2, "KIND_CPU")]
    # The payload is already optimized (ORT_ENABLE_ALL): level 2 is "all optimizations disabled" for Triton.
    assert config.optimization.graph.level == 2
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"intra_op_thread_count": "0", "inter_op_thread_count": "1", "execution_mode": "0"}

    engine = es.load(engines["cnn"])
    batch = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (plain,) = session.run(["probs"], {"image": batch})
    np.testing.assert_allclose(plain, engine(image=batch)["probs"], rtol=1e-5, atol=1e-6)


def test_warmup_files_hold_the_first_stored_sample(engines, tmp_path):
    (model,) = export_triton([engines["cnn"]], tmp_path / "repo")
    config = parse_config(tmp_path / "repo" / "cnn" / "config.pbtxt")
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1
    stored = np.load(io.BytesIO(read_bundle(engines["cnn"], payload=False, samples=True).samples), allow_pickle=False)
    first = stored["image"][0]
    spec = warmup.inputs["image"]
    assert model_config_pb2.DataType.Name(spec.data_type) == "TYPE_FP32" and list(spec.dims) == [1, 8, 8]
    raw = (tmp_path / "repo" / "cnn" / "warmup" / spec.input_data_file).read_bytes()
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4").reshape(first.shape), first)
    assert model.warmup_files and "warm" not in " ".join(model.notes)
    # --no-warmup leaves it out.
    export_triton([engines["cnn"]], tmp_path / "other", options=TritonOptions(warmup=False))
    assert not parse_config(tmp_path / "other" / "cnn" / "config.pbtxt").model_warmup
    assert not (tmp_path / "other" / "cnn" / "warmup").exists()


def test_several_engines_become_several_models_with_their_types(engines, tmp_path):
    repo = tmp_path / "repo"
    models = export_triton([engines["pair"], engines["fixed"]], repo, names=["two"])
    assert [m.name for m in models] == ["two", "fixed"]
    pair = parse_config(repo / "two" / "config.pbtxt")
    types = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims), t.HasField("reshape"))
             for t in list(pair.input) + list(pair.output)}
    # 'ids' is int64[batch]: batched, Triton spells it dims [1] reshaped to [].
    assert types == {"left": ("TYPE_FP32", [3], False), "right": ("TYPE_FP32", [3], False),
                     "score": ("TYPE_FP32", [2], False), "ids": ("TYPE_INT64", [1], True)}
    assert pair.max_batch_size == 32 and not pair.model_warmup  # built without --data: no stored samples
    # A fixed batch of 1 cannot take merged batches: no batching, the full shape, no dynamic batcher.
    fixed = parse_config(repo / "fixed" / "config.pbtxt")
    assert fixed.max_batch_size == 0 and not fixed.HasField("dynamic_batching")
    assert [list(t.dims) for t in fixed.input] == [[1, 6]] and [list(t.dims) for t in fixed.output] == [[1, 4]]
    assert list(fixed.model_warmup[0].inputs["x"].dims) == [1, 6]


def test_max_batch_zero_turns_batching_off_and_keeps_the_dynamic_axis(engines, tmp_path):
    (model,) = export_triton([engines["pair"]], tmp_path / "repo", options=TritonOptions(max_batch=0))
    config = parse_config(tmp_path / "repo" / "pair" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[-1, 3], [-1, 3]]
    assert [list(t.dims) for t in config.output] == [[-1, 2], [-1]]


def test_bad_batching_options_are_refused_before_anything_is_written(engines, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(InputError, match="preferred batch size 64 is larger than the max batch of 16"):
        export_triton([engines["cnn"]], repo, options=TritonOptions(max_batch=16, preferred_batch=(4, 64)))
    assert not (repo / "cnn").exists()
    with pytest.raises(InputError, match="both be model 'cnn'"):
        export_triton([engines["cnn"], engines["cnn"]], repo)
    with pytest.raises(InputError, match="cannot be a Triton model name"):
        export_triton([engines["cnn"]], repo, names=["../escape"])
    assert not repo.exists() or not any(repo.iterdir())


# --------------------------------------------------------------------------- Triton: other backends


def test_tensorrt_engine_is_a_tensorrt_plan_on_the_gpu_within_its_profile(engines, tmp_path):
    manifest = read_bundle(engines["cnn"], payload=False).manifest
    trt = dataclasses.replace(manifest, backend="tensorrt", payload_name="model.plan",
                              build_options={**manifest.build_options, "backend_options": {"max_batch": 8}})
    model = plan_triton_model(trt, b"plan bytes", "cnn_trt")
    config = text_format.Parse(model.config_text, model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert model.model_file == "model.plan" and model.payload == b"plan bytes"
    assert config.max_batch_size == 8  # the profile's max, not 32
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    with pytest.raises(InputError, match="larger than this engine's batch limit of 8"):
        plan_triton_model(trt, b"plan", "cnn_trt", TritonOptions(max_batch=16))


def test_onnxruntime_gpu_providers_become_triton_execution_accelerators(engines):
    manifest = read_bundle(engines["cnn"], payload=False).manifest
    options = {"providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
               "workspace_mb": 1024, "profiles": {"image": {"min": [1, 1, 8, 8], "opt": [4, 1, 8, 8],
                                                            "max": [16, 1, 8, 8]}}, "max_batch": 16}
    trt_ep = dataclasses.replace(manifest, precision="fp16",
                                 build_options={**manifest.build_options, "backend_options": options})
    config = text_format.Parse(plan_triton_model(trt_ep, b"onnx", "m").config_text, model_config_pb2.ModelConfig())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(1024 * 2**20),
        "trt_profile_min_shapes": "image:1x1x8x8", "trt_profile_opt_shapes": "image:4x1x8x8",
        "trt_profile_max_shapes": "image:16x1x8x8"}
    # A compiling provider gets the payload with basic optimizations only: Triton's default (all) stays.
    assert not config.optimization.HasField("graph")
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert config.max_batch_size == 16
    cuda = dataclasses.replace(manifest, build_options={**manifest.build_options, "backend_options": {
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}})
    config = text_format.Parse(plan_triton_model(cuda, b"onnx", "m").config_text, model_config_pb2.ModelConfig())
    assert [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator] == ["cuda"]
    assert config.optimization.graph.level == 2


@pytest.mark.parametrize("backend, changes, reason", [
    ("torch", {}, "compiler cache that only enginesmith's own loader reads"),
    ("openvino", {"precision": "int8"}, "int8 precision exists only in the compiled blob"),
    ("openvino", {"source_kind": "keras", "source_name": "cnn.keras"}, "carries no ONNX source"),
    ("openvino", {"build_options": {"import_options": {"input_shapes": {"image": [1, 1, 8, 8]}}}},
     "changed the source's input shapes"),
    ("mystery", {}, "no Triton backend for 'mystery' payloads"),
])
def test_engines_triton_cannot_load_are_refused_with_the_reason(engines, tmp_path, capsys, backend, changes, reason):
    engine = with_manifest(engines["cnn"], tmp_path / f"{backend}.engine", backend=backend, **changes)
    with pytest.raises(NotExportableError, match=reason) as info:
        export_triton([engine], tmp_path / "repo")
    assert "--backend onnxruntime" in str(info.value)
    assert not (tmp_path / "repo" / backend).exists()
    assert main(["export", "triton", str(engine), "-o", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot be exported to Triton" in err and "Traceback" not in err


def test_openvino_engine_is_served_by_the_openvino_backend_from_its_onnx_source(engines, tmp_path):
    pytest.importorskip("openvino")
    source = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(image_size=8), source)
    engine = es.build(source, backend="openvino", backend_options={"performance_hint": "throughput"})
    engine.save(tmp_path / "ov.engine")
    (model,) = export_triton([tmp_path / "ov.engine"], tmp_path / "repo")
    folder = tmp_path / "repo" / "ov"
    config = parse_config(folder / "config.pbtxt")
    assert config.backend == "openvino" and not config.platform and config.default_model_filename == "model.onnx"
    assert {k: v.string_value for k, v in config.parameters.items()} == {"PERFORMANCE_HINT": "THROUGHPUT"}
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    assert config.max_batch_size == 32 and [list(t.dims) for t in config.input] == [[1, 8, 8]]
    # The file is the bundle's source, and it computes what the OpenVINO engine computes.
    assert (folder / "1" / "model.onnx").read_bytes() == read_bundle(tmp_path / "ov.engine", payload=False,
                                                                     source=True).source
    batch = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["probs"], {"image": batch})[0], engine(image=batch)["probs"],
                               rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- never replace without --force


def test_an_existing_model_folder_is_replaced_only_with_force(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    keep = repo / "cnn" / "1" / "model.onnx"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"someone else's model")
    assert main(["export", "triton", str(engines["cnn"]), "-o", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace the model folder" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert keep.read_bytes() == b"someone else's model"
    assert main(["export", "triton", str(engines["cnn"]), "-o", str(repo), "--force"]) == 0
    assert keep.read_bytes() == read_bundle(engines["cnn"]).payload
    assert not [p for p in repo.iterdir() if p.name.startswith(".")], "staging folder left behind"
    # An empty folder is no one's work: written without --force.
    (repo / "empty").mkdir()
    assert main(["export", "triton", str(engines["cnn"]), "-o", str(repo), "--name", "empty"]) == 0
    assert parse_config(repo / "empty" / "config.pbtxt").name == "empty"


def test_a_failed_write_leaves_the_old_model_whole_and_no_staging_folder(engines, tmp_path, monkeypatch):
    import enginesmith.export.triton as triton_module

    repo = tmp_path / "repo"
    export_triton([engines["cnn"]], repo, options=TritonOptions(max_batch=4))
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    write_atomic = triton_module.write_atomic

    def disk_full(path, data):
        if str(path).endswith("model.onnx"):
            raise OSError(28, "No space left on device")
        return write_atomic(path, data)

    monkeypatch.setattr(triton_module, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_triton([engines["cnn"]], repo, options=TritonOptions(max_batch=16), force=True)
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in repo.iterdir()] == ["cnn"]
    assert parse_config(repo / "cnn" / "config.pbtxt").max_batch_size == 4


def test_an_engine_inside_the_folder_it_would_replace_is_refused_even_with_force(engines, tmp_path):
    repo = tmp_path / "repo"
    (repo / "cnn").mkdir(parents=True)
    inside = repo / "cnn" / "cnn.engine"
    inside.write_bytes(engines["cnn"].read_bytes())
    with pytest.raises(OutputExistsError, match="lies inside the model folder"):
        export_triton([inside], repo, force=True)
    assert inside.exists()


# --------------------------------------------------------------------------- KServe

# Field names of KServe's v1beta1 API (github.com/kserve/kserve, pkg/apis/serving/v1beta1): PredictorSpec's
# json tags (predictor.go), PredictorExtensionSpec's (predictor.go: storageUri, runtimeVersion,
# protocolVersion, storage, and corev1.Container inline) and ComponentExtensionSpec's (component.go);
# the custom predictor is PodSpec.containers with the container named "kserve-container" and its
# storage in the env var STORAGE_URI (predictor_custom.go, pkg/constants: CustomSpecStorageUriEnvVarKey).
PREDICTOR_SPEC_FIELDS = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
                         "lightgbm", "paddle", "model", "storageUris", "workerSpec", "containers", "volumes",
                         "nodeSelector", "serviceAccountName", "tolerations", "affinity", "minReplicas",
                         "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
                         "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy"}
CONTAINER_FIELDS = {"name", "image", "command", "args", "workingDir", "ports", "envFrom", "env", "resources",
                    "volumeMounts", "livenessProbe", "readinessProbe", "startupProbe", "imagePullPolicy",
                    "securityContext"}
PREDICTOR_EXTENSION_FIELDS = {"storageUri", "runtimeVersion", "protocolVersion", "storage"} | CONTAINER_FIELDS
PROTOCOL_VERSIONS = {"v1", "v2", "grpc-v1", "grpc-v2"}  # pkg/constants InferenceServiceProtocol values


# Every leaf the manifests may hold, as paths through those types ("[]": a list item, "*": a map key):
# ObjectMeta name/annotations; PredictorExtensionSpec storageUri, runtimeVersion, protocolVersion and the
# inline corev1.Container's resources (ResourceRequirements: requests, limits); corev1.Container name, image,
# command, args, env (EnvVar: name, value), ports (ContainerPort: name, containerPort, protocol),
# readinessProbe (Probe.httpGet: HTTPGetAction path, port), resources.
ALLOWED_LEAF_PATHS = [
    "apiVersion", "kind", "metadata.name", "metadata.annotations.*",
    "spec.predictor.triton.storageUri", "spec.predictor.triton.runtimeVersion",
    "spec.predictor.triton.protocolVersion", "spec.predictor.triton.resources.requests.*",
    "spec.predictor.triton.resources.limits.*",
    "spec.predictor.containers[].name", "spec.predictor.containers[].image", "spec.predictor.containers[].command[]",
    "spec.predictor.containers[].args[]", "spec.predictor.containers[].env[].name",
    "spec.predictor.containers[].env[].value", "spec.predictor.containers[].ports[].name",
    "spec.predictor.containers[].ports[].containerPort", "spec.predictor.containers[].ports[].protocol",
    "spec.predictor.containers[].readinessProbe.httpGet.path", "spec.predictor.containers[].readinessProbe.httpGet.port",
    "spec.predictor.containers[].resources.requests.*", "spec.predictor.containers[].resources.limits.*",
]


def leaf_paths(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in leaf_paths(value, f"{prefix}.{key}" if prefix else key)]
    if isinstance(node, list):
        return [p for item in node for p in leaf_paths(item, prefix + "[]")]
    return [prefix]


def check_inference_service(document: dict) -> dict:
    # fnmatch reads "[]" as a character set: both sides spell list items "#" instead.
    patterns = [allowed.replace("[]", "#") for allowed in ALLOWED_LEAF_PATHS]
    unknown = [p for p in leaf_paths(document) if not any(fnmatch.fnmatchcase(p.replace("[]", "#"), pattern)
                                                          for pattern in patterns)]
    assert not unknown, f"fields outside KServe's v1beta1 types: {unknown}"
    assert document["apiVersion"] == "serving.kserve.io/v1beta1" and document["kind"] == "InferenceService"
    name = document["metadata"]["name"]
    # KServe's name rule (component.go InvalidISVCNameFormatError): lower case alphanumerics or '-', a letter first.
    assert name[0].isalpha() and all(c.islower() or c.isdigit() or c == "-" for c in name)
    predictor = document["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR_SPEC_FIELDS, set(predictor) - PREDICTOR_SPEC_FIELDS
    return predictor


def test_kserve_manifests_for_triton_and_for_enginesmith_serve(engines, tmp_path):
    out = tmp_path / "deploy"
    assert main(["export", "kserve", str(engines["cnn"]), "-o", str(out), "--storage-uri", "gs://bucket/cnn/",
                 "--image", "registry.example/enginesmith:1", "--name", "CNN_v2", "--max-batch", "8"]) == 0
    triton = yaml.safe_load((out / "cnn-v2-triton.yaml").read_text())
    predictor = check_inference_service(triton)
    assert triton["metadata"]["name"] == "cnn-v2"
    spec = predictor["triton"]
    assert set(spec) <= PREDICTOR_EXTENSION_FIELDS and spec["protocolVersion"] in PROTOCOL_VERSIONS
    assert spec["storageUri"] == "gs://bucket/cnn/repository" and spec["runtimeVersion"] == "24.08-py3"
    assert spec["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    # The repository it points at is the one written beside it.
    config = parse_config(out / "repository" / "CNN_v2" / "config.pbtxt")
    assert config.name == "CNN_v2" and config.max_batch_size == 8

    serve = yaml.safe_load((out / "cnn-v2-serve.yaml").read_text())
    (container,) = check_inference_service(serve)["containers"]
    assert set(container) <= CONTAINER_FIELDS
    assert container["name"] == "kserve-container" and container["image"] == "registry.example/enginesmith:1"
    assert container["command"] == ["enginesmith"]
    args = container["args"]
    assert args[:2] == ["serve", "/mnt/models/cnn.engine"] and args[args.index("--name") + 1] == "CNN_v2"
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--http-port") + 1] == "8080"
    assert args[args.index("--grpc-port") + 1] == "8081" and args[args.index("--max-batch") + 1] == "8"
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert {"name": "STORAGE_URI", "value": "gs://bucket/cnn/engines"} in container["env"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert (out / "engines" / "cnn.engine").read_bytes() == engines["cnn"].read_bytes()
    # The serve command line in the manifest is one `enginesmith serve` parses (options, types, ranges).
    serve_command = typer.main.get_command(app).commands["serve"]
    context = serve_command.make_context("serve", list(args[1:]))
    assert context.params["max_batch"] == 8 and context.params["host"] == "0.0.0.0"


def test_kserve_gpu_engines_ask_for_a_gpu_and_grpc_gets_the_h2c_port(engines, tmp_path):
    manifest = read_bundle(engines["cnn"], payload=False).manifest
    gpu_engine = with_manifest(engines["cnn"], tmp_path / "gpu.engine", build_options={"backend_options": {
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}})
    assert manifest.backend == "onnxruntime"
    result = export_kserve(gpu_engine, tmp_path / "deploy", options=KServeOptions(grpc=True))
    triton = yaml.safe_load((tmp_path / "deploy" / "gpu-triton.yaml").read_text())
    assert triton["spec"]["predictor"]["triton"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert triton["spec"]["predictor"]["triton"]["protocolVersion"] == "grpc-v2"
    (container,) = yaml.safe_load((tmp_path / "deploy" / "gpu-serve.yaml").read_text())["spec"]["predictor"]["containers"]
    assert container["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and "readinessProbe" not in container
    assert any("placeholder" in note for note in result.notes)


def test_kserve_for_a_torch_engine_writes_the_serve_manifest_only_and_refuses_overwrites(engines, tmp_path, capsys):
    engine = with_manifest(engines["cnn"], tmp_path / "tch.engine", backend="torch")
    out = tmp_path / "deploy"
    assert main(["export", "kserve", str(engine), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no Triton manifest" in printed and "compiler cache" in " ".join(printed.split())
    assert not (out / "tch-triton.yaml").exists() and not (out / "repository" / "tch").exists()
    (container,) = yaml.safe_load((out / "tch-serve.yaml").read_text())["spec"]["predictor"]["containers"]
    assert "--trust-code" in container["args"]
    before = (out / "tch-serve.yaml").read_bytes()
    assert main(["export", "kserve", str(engine), "-o", str(out), "--cpu", "4"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "tch-serve.yaml").read_bytes() == before
    assert main(["export", "kserve", str(engine), "-o", str(out), "--cpu", "4", "--force"]) == 0
    (container,) = yaml.safe_load((out / "tch-serve.yaml").read_text())["spec"]["predictor"]["containers"]
    assert container["resources"]["requests"]["cpu"] == "4"


def test_usage_errors_name_the_export_command_to_look_up(engines, tmp_path, capsys):
    assert main(["export", "triton", str(engines["cnn"]), "-o", str(tmp_path / "repo"), "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "No such option: --bogus" in err and "(see 'enginesmith export triton --help')" in err
    assert main(["export", "kserve", str(engines["cnn"]), "-o", str(tmp_path / "k"), "--max-batch", "-1"]) == 2
    assert "(see 'enginesmith export kserve --help')" in capsys.readouterr().err


def test_int8_engine_on_the_tensorrt_provider_with_a_calibration_table_is_refused(engines):
    manifest = read_bundle(engines["cnn"], payload=False).manifest
    int8 = dataclasses.replace(manifest, precision="int8", build_options={**manifest.build_options, "backend_options": {
        "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}})
    with pytest.raises(NotExportableError, match="calibration table"):
        plan_triton_model(int8, b"onnx", "m", caches=["ort_tensorrt.calibration.flatbuffers"])
    # Without a table (the model's Q/DQ nodes set the scales) it is exported with precision_mode INT8.
    config = text_format.Parse(plan_triton_model(int8, b"onnx", "m").config_text, model_config_pb2.ModelConfig())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["precision_mode"] == "INT8"
