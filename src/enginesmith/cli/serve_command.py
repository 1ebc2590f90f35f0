"""serve: engines behind the Open Inference Protocol (REST and gRPC), with dynamic batching and metrics."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import MissingDependencyError
from .app import STATE, add_columns, app, console, print_indented, table

SERVE_EXTRA = "pip install 'enginesmith[serve]'"


def check_serve_dependencies() -> None:
    """One error naming the extra, instead of an ImportError from inside the server."""
    missing = []
    for module in ("aiohttp", "grpc", "tritonclient.grpc"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise MissingDependencyError(f"serving needs {', '.join(missing)}: {SERVE_EXTRA}")


@app.command(short_help="Serve engines over the Open Inference Protocol (REST, gRPC).")
def serve(
    # hidden: typer would list it as "<list[Path]>"; the docstring says what ENGINE is instead
    engine_paths: list[Path] = typer.Argument(..., metavar="ENGINE", hidden=True),
    name: list[str] = typer.Option([], "--name", metavar="NAME", help="Model name of each engine, in order (default: the file's stem); repeatable."),
    host: str = typer.Option("127.0.0.1", metavar="ADDRESS", help="Address to listen on (0.0.0.0: every interface)."),
    http_port: int = typer.Option(8000, "--http-port", min=0, max=65535, metavar="PORT", help="REST port (0: a free port)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", min=0, max=65535, metavar="PORT", help="gRPC port (0: a free port)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", min=0, max=65535, metavar="PORT", help="Prometheus metrics port, /metrics (0: a free port)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, metavar="N", help="Most items merged into one engine call (default: the engine's batch, else its largest compiled batch size, else 32; 1 turns batching off). Batches are padded up to an engine's compiled sizes."),
    max_queue_delay_us: int = typer.Option(0, "--max-queue-delay-us", min=0, metavar="US", help="How long a batch waits for more requests before it runs (default 0: it takes what is queued)."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, metavar="N", help="Requests waiting per model; beyond it requests get 503 with Retry-After."),
    instances: int = typer.Option(1, "--instances", min=1, metavar="N", help="Engine calls running at once per model (worker threads)."),
    timeout_ms: Optional[float] = typer.Option(None, "--timeout-ms", min=0.001, metavar="MS", help="A request still queued after this long gets 503 (default: none; a request's 'timeout' parameter overrides). With --ray: the longest a request waits for its answer (default 60 s)."),
    max_request_bytes: int = typer.Option(64 * 1024 * 1024, "--max-request-bytes", min=1, metavar="BYTES", help="Largest request body; larger ones get 413."),
    log_every: float = typer.Option(60.0, "--log-every", min=0.1, metavar="SECONDS", help="Print request rates this often."),
    duration: Optional[float] = typer.Option(None, "--duration", min=0.1, metavar="SECONDS", help="Stop by itself after this long (default: until interrupted)."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Load engines whose payload runs code (the torch backend's compiler cache); only from builders you trust."),
    ray: bool = typer.Option(False, "--ray", help="Run the engines in Ray Serve replicas (batching per replica); the protocol stays in this process. Needs the 'ray' extra."),
    replicas: int = typer.Option(1, "--replicas", min=1, metavar="N", help="With --ray: replicas per model (one GPU each when the engine runs on CUDA)."),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDR", help="With --ray: the Ray cluster (HOST:6379, 'auto', ray://HOST:10001); default: a local Ray instance started for the server."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0, metavar="N", help="With --ray: CPUs Ray reserves per replica."),
    replica_gpus: Optional[float] = typer.Option(None, "--replica-gpus", min=0, metavar="N", help="With --ray: GPUs per replica (default: 1 for an engine that runs on CUDA, else 0)."),
) -> None:
    """Serve ENGINE bundles (one or more) over KServe's Open Inference Protocol (v2): REST, gRPC and
    Prometheus metrics.

    Requests for the same model are merged into batches (--max-batch, --max-queue-delay-us);
    tritonclient.http and tritonclient.grpc work against it. Stops on Ctrl-C or SIGTERM.

    With --ray the engines run in Ray Serve replicas (--replicas, one GPU each on CUDA), on a local
    Ray instance or the cluster at --address; the protocol, checks and metrics stay here.
    """
    check_serve_dependencies()
    from ..serve import serve as start_server

    quiet_server_loggers(STATE.verbose)
    ray_options = _ray_options(ray, replicas, address, replica_cpus, replica_gpus)

    server = start_server(
        engine_paths, names=name, trust_code=trust_code, log=lambda line: print_indented(line, 0),
        host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us, max_queue=max_queue, instances=instances, timeout_ms=timeout_ms,
        max_request_bytes=max_request_bytes, log_interval_s=log_every, ray=ray_options,
    )
    try:
        print_endpoints(server)
        _wait(duration)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    console.print("stopped", highlight=False)


def _ray_options(ray: bool, replicas: int, address: Optional[str], replica_cpus: float,
                 replica_gpus: Optional[float]):
    """RayOptions for --ray, after checking Ray is installed; None without --ray (its flags then refused)."""
    if not ray:
        given = [flag for flag, value in (("--replicas", replicas != 1), ("--address", address is not None),
                                          ("--replica-cpus", replica_cpus != 1.0), ("--replica-gpus", replica_gpus is not None))
                 if value]
        if given:
            raise typer.BadParameter(f"{given[0]} is for serving on Ray: add --ray")
        return None
    from ..cluster import import_ray
    from ..serve.ray_backend import RayOptions

    import_ray()
    return RayOptions(address=address, replicas=replicas, cpus_per_replica=replica_cpus, gpus_per_replica=replica_gpus)


# aiohttp logs a traceback for every malformed HTTP request it answers 400 to; clients' mistakes
# are theirs to see, not the server's terminal's (--verbose shows them).
SERVER_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "grpc")


def quiet_server_loggers(verbose: bool) -> None:
    for name in SERVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)


def print_endpoints(server) -> None:
    tbl = table("serving")
    add_columns(tbl, "model", "backend", "inputs", "outputs", "max batch", right=("max batch",))
    for model in server.models.values():
        describe = lambda items: ", ".join(f"{t.name} {t.datatype}{t.shape}" for t in items)  # noqa: E731
        tbl.add_row(escape(model.name), model.engine.backend, escape(describe(model.inputs)),
                    escape(describe(model.outputs)), str(model.batcher.options.max_batch))
    console.print(tbl)
    console.print(escape(f"REST {server.url}/v2   gRPC {server.grpc_address}   metrics {server.metrics_url}"),
                  highlight=False)


def _wait(duration: Optional[float]) -> None:
    """Until the duration passes, Ctrl-C, or SIGTERM (turned into KeyboardInterrupt for a clean stop)."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        stop.wait(duration)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
