"""export: engines for other servers: a Triton model repository, KServe InferenceService manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import add_columns, app, console, parse_batches, print_indented, table

export_app = typer.Typer(
    name="export",
    help="Write engines in the formats other servers load (docs/scaling-out.md).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(export_app, name="export", short_help="Write engines for Triton or KServe (model repository, manifests).")

# The options both commands share, spelled as `enginesmith serve` spells them where it has them.
MAX_BATCH_HELP = ("Triton's max_batch_size (default: the engine's own batch, else 32; 0: no batching). Engines "
                  "whose axis 0 is fixed are never batched.")
PREFERRED_HELP = "Preferred batch sizes of Triton's dynamic batcher, e.g. 4,8."
QUEUE_DELAY_HELP = "How long Triton's dynamic batcher waits to fill a batch (max_queue_delay_microseconds)."
INSTANCES_HELP = "Model instances (Triton's instance_group count): engine calls running at once."
NO_WARMUP_HELP = "Leave out model_warmup (by default the first sample the bundle stores warms each model up)."
FORCE_HELP = "Replace existing model folders and files."


def _triton_options(max_batch: Optional[int], preferred_batch: Optional[str], queue_delay_us: int, instances: int,
                    no_warmup: bool):
    from ..export import TritonOptions

    preferred = tuple(parse_batches(preferred_batch)) if preferred_batch else ()
    return TritonOptions(max_batch=max_batch, preferred_batch=preferred, queue_delay_us=queue_delay_us,
                         instances=instances, warmup=not no_warmup)


def _print_models(models) -> None:
    tbl = table()
    add_columns(tbl, "model", "platform", "max batch", "instances", "warm-up", right=("max batch",))
    for model in models:
        config = model.config
        group = config["instance_group"][0]
        tbl.add_row(escape(model.name), str(config.get("platform", config.get("backend", ""))),
                    str(model.max_batch_size), f"{group['count']} {str(group['kind']).removeprefix('KIND_')}",
                    "stored sample" if model.warmup_files else "none")
    console.print(tbl)
    for model in models:
        for note in model.notes:
            print_indented(f"note ({model.name}): {note}", 0)


@export_app.command(short_help="A Triton model repository (config.pbtxt, model file, warm-up).")
def triton(
    engine_paths: list[Path] = typer.Argument(..., metavar="ENGINE", hidden=True),
    output: Path = typer.Option(..., "-o", "--output", metavar="REPO", help="The model repository (a folder; created if missing)."),
    name: list[str] = typer.Option([], "--name", metavar="NAME", help="Model name of each engine, in order (default: the file's stem); repeatable."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=0, metavar="N", help=MAX_BATCH_HELP),
    preferred_batch: Optional[str] = typer.Option(None, "--preferred-batch", metavar="SIZES", help=PREFERRED_HELP),
    queue_delay_us: int = typer.Option(0, "--max-queue-delay-us", "--queue-delay-us", min=0, metavar="US", help=QUEUE_DELAY_HELP),
    instances: int = typer.Option(1, "--instances", min=1, metavar="N", help=INSTANCES_HELP),
    no_warmup: bool = typer.Option(False, "--no-warmup", help=NO_WARMUP_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write ENGINE bundles (one or more) as models of a Triton Inference Server repository:
    REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (ONNX Runtime engines; OpenVINO engines
    from their ONNX source) or model.plan (TensorRT engines).

    PyTorch engines, and OpenVINO engines without a usable ONNX source, are refused with the
    reason. A model folder that is not empty is replaced only with --force.
    """
    from ..export import export_triton

    options = _triton_options(max_batch, preferred_batch, queue_delay_us, instances, no_warmup)
    models = export_triton(engine_paths, output, name, options, force=force)
    _print_models(models)
    console.print(escape(f"wrote {len(models)} model{'s' if len(models) != 1 else ''} to {output}: "
                         f"tritonserver --model-repository={output.resolve()}"), highlight=False, soft_wrap=True)


@export_app.command(short_help="KServe InferenceService manifests (Triton, enginesmith serve).")
def kserve(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="The engine bundle to deploy."),
    output: Path = typer.Option(..., "-o", "--output", metavar="DIR", help="Folder for the manifests, the Triton repository and the engine (created if missing)."),
    name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="Model name (default: the file's stem); the InferenceService name is made from it."),
    storage_uri: Optional[str] = typer.Option(None, "--storage-uri", metavar="URI", help="Where DIR will be uploaded (s3://, gs://, pvc://...); default: a placeholder to edit."),
    runtime_version: str = typer.Option("24.08-py3", "--runtime-version", metavar="TAG", help="Triton image tag: its ONNX Runtime or TensorRT must run the engine."),
    image: Optional[str] = typer.Option(None, "--image", metavar="IMAGE", help="Container image with enginesmith[serve] for the serve manifest; default: a placeholder."),
    cpu: str = typer.Option("1", "--cpu", metavar="CPUS", help="CPU request and limit (Kubernetes quantity)."),
    memory: str = typer.Option("2Gi", "--memory", metavar="SIZE", help="Memory request and limit (Kubernetes quantity)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Ask for one nvidia.com/gpu (default: when the engine runs on a GPU)."),
    grpc: bool = typer.Option(False, "--grpc", help="Expose gRPC (port h2c 8081) instead of REST (http1 8080); Knative allows one port."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=0, metavar="N", help=MAX_BATCH_HELP),
    preferred_batch: Optional[str] = typer.Option(None, "--preferred-batch", metavar="SIZES", help=PREFERRED_HELP),
    queue_delay_us: int = typer.Option(0, "--max-queue-delay-us", "--queue-delay-us", min=0, metavar="US", help=QUEUE_DELAY_HELP),
    instances: int = typer.Option(1, "--instances", min=1, metavar="N", help=INSTANCES_HELP),
    no_warmup: bool = typer.Option(False, "--no-warmup", help=NO_WARMUP_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write KServe InferenceService manifests (serving.kserve.io/v1beta1) for ENGINE into DIR:
    NAME-triton.yaml (KServe's Triton predictor on DIR/repository) and NAME-serve.yaml
    (enginesmith serve as a custom container on DIR/engines). Upload DIR to --storage-uri, then
    kubectl apply -f one of them.

    An engine Triton cannot load (OpenVINO, PyTorch) gets the serve manifest only, with a note.
    """
    from ..export import KServeOptions, export_kserve
    from ..export.kserve import IMAGE_PLACEHOLDER, STORAGE_PLACEHOLDER

    options = KServeOptions(
        storage_uri=storage_uri or STORAGE_PLACEHOLDER, runtime_version=runtime_version, image=image or IMAGE_PLACEHOLDER,
        cpu=cpu, memory=memory, gpu=gpu, grpc=grpc,
        triton=_triton_options(max_batch, preferred_batch, queue_delay_us, instances, no_warmup),
    )
    result = export_kserve(engine_path, output, name, options, force=force)
    if result.triton is not None:
        _print_models([result.triton])
    for path in result.files:
        print_indented(f"wrote {path}", 0)
    if result.triton_skipped:
        print_indented(f"note: no Triton manifest: {result.triton_skipped}", 0)
    for note in result.notes:
        if result.triton is None or note not in result.triton.notes:
            print_indented(f"note: {note}", 0)
