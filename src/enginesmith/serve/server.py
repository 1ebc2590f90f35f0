"""Starting and stopping a server: engines loaded, both front ends and the metrics page on one event loop.

The event loop runs in a thread of its own, so :func:`serve` returns a :class:`ServerHandle` at
once and a test (or a notebook) goes on in the calling thread. Engine calls happen on the
batchers' worker threads, except for a request alone in flight on an idle server, which runs on
the loop's thread at once (the fast path: no thread hand-offs; other requests wait at most that
one engine call).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import EnginesmithError
from ..runtime.engine import Engine
from .batcher import BatchingOptions
from .metrics import prometheus_text, rate_line
from .models import InFlight, Repository, ServedModel

if TYPE_CHECKING:
    from .ray_backend import RayOptions

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ServeError(EnginesmithError):
    """The server cannot start: a bad option, a name given twice, a port in use."""


@dataclass(frozen=True)
class ServeOptions:
    """How a server listens and batches. Ports 0 pick free ports; ``max_batch`` None: the engine's, else 32."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None
    max_queue_delay_us: int = 0
    max_queue: int = 256
    instances: int = 1
    timeout_ms: float | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_interval_s: float = 60.0
    grpc: bool = True
    ray: RayOptions | None = None  # run the engines in Ray Serve replicas (serve --ray)

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ServeError(f"{name.replace('_', '-')} must be in 0-65535 (0 picks a free port)")
        for name in ("max_queue", "instances", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_batch is not None and self.max_batch < 1:
            raise ServeError("--max-batch must be at least 1 (1 turns batching off)")
        if self.max_queue_delay_us < 0:
            raise ServeError("--max-queue-delay-us must be 0 or more")
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            raise ServeError("--timeout-ms must be more than 0")


@dataclass
class ServerHandle:
    """A running server. ``stop()`` (or leaving a ``with`` block) shuts it down and closes the engines it loaded
    (with ``ray``: deletes its Ray Serve applications and leaves the cluster)."""

    url: str
    grpc_address: str | None
    metrics_url: str
    models: dict[str, ServedModel]
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _shutdown: Callable[[], "asyncio.Future"] = field(repr=False)
    _owned: list[Engine] = field(repr=False, default_factory=list)
    _stopped: bool = field(repr=False, default=False)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for model in self.models.values():
            model.batcher.stop()
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)
            for engine in self._owned:
                engine.close()

    def wait(self) -> None:
        """Block until the server is stopped (from another thread) or the process is interrupted."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _engine_name(engine: Engine | str | Path, index: int) -> str:
    if isinstance(engine, Engine):
        return engine.path.stem if engine.path else f"model{index}" if index else "model"
    return Path(engine).stem


def model_names(engines: Sequence[Engine | str | Path], names: Sequence[str] | None) -> list[str]:
    """The name each engine is served as: ``names`` in order, then the files' stems; checked."""
    if not engines:
        raise ServeError("give at least one engine to serve")
    names = list(names or [])
    if len(names) > len(engines):
        raise ServeError(f"{len(names)} names (--name) for {len(engines)} engines")
    chosen = names + [_engine_name(e, i) for i, e in enumerate(engines)][len(names):]
    for name in chosen:
        if not _NAME.match(name):
            raise ServeError(f"model name '{name}' is not usable in a URL: use letters, digits, '_', '-' and '.' (--name)")
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise ServeError(f"two engines would be served as '{duplicates[0]}': name them with --name")
    return chosen


def load_engines(engines: Sequence[Engine | str | Path], names: Sequence[str] | None,
                 trust_code: bool) -> tuple[list[tuple[str, Engine]], list[Engine]]:
    """(name, engine) pairs in order, and the engines loaded here (closed by stop())."""
    from ..api import load

    chosen = model_names(engines, names)
    loaded: list[Engine] = []
    pairs: list[tuple[str, Engine]] = []
    try:
        for name, engine in zip(chosen, engines):
            if not isinstance(engine, Engine):
                engine = load(engine, trust_code=trust_code)
                loaded.append(engine)
            pairs.append((name, engine))
    except Exception:
        for engine in loaded:
            engine.close()
        raise
    return pairs, loaded


def batching_for(engine: Engine, options: ServeOptions) -> BatchingOptions:
    """The batcher's settings for one engine. An engine compiled for fixed batch sizes gets batches padded up
    to them, and no larger batch than its largest unless ``--max-batch`` asks for one."""
    compiled = tuple(size for size in engine.compiled_batches if engine.max_batch is None or size <= engine.max_batch)
    return BatchingOptions(
        max_batch=options.max_batch or engine.max_batch or (compiled[-1] if compiled else DEFAULT_MAX_BATCH),
        max_queue_delay_us=options.max_queue_delay_us,
        max_queue=options.max_queue,
        instances=options.instances,
        preferred_batches=compiled,
    )


def serve(
    engines: Sequence[Engine | str | Path] | Engine | str | Path,
    *,
    names: Sequence[str] | None = None,
    trust_code: bool = False,
    log: Callable[[str], None] | None = None,
    **options: object,
) -> ServerHandle:
    """Serve engines (loaded ones, or bundle paths) over the Open Inference Protocol; returns at once.

    Keyword options are :class:`ServeOptions` fields (``http_port=0`` picks a free port). ``log``
    gets one line per model every ``log_interval_s`` seconds with its request rates.
    """
    known = set(ServeOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ServeError(f"unknown serve option '{unknown[0]}'; the options are {', '.join(sorted(known))}")
    settings = ServeOptions(**options)  # type: ignore[arg-type]
    if isinstance(engines, (Engine, str, Path)):
        engines = [engines]
    if settings.ray is not None:
        return _serve_on_ray(list(engines), names, trust_code, log, settings)
    pairs, owned = load_engines(list(engines), names, trust_code)
    models: list[ServedModel] = []
    in_flight = InFlight()  # one count for the whole server: any request in flight keeps the others batching
    try:
        for name, engine in pairs:
            models.append(ServedModel(name, engine, batching_for(engine, settings), settings.timeout_ms, in_flight))
    except ValueError as exc:  # a dtype the protocol has no datatype for
        _release(models, owned)
        raise ServeError(f"model '{name}' cannot be served: {exc}") from None
    try:
        return _start(models, settings, owned, log)
    except BaseException:
        _release(models, owned)
        raise


def _bundle_path(engine: Engine | str | Path, name: str) -> Path:
    if isinstance(engine, Engine):
        if engine.path is None:
            raise ServeError(f"engine '{name}' has no file to send to Ray: save it first (engine.save('{name}.engine'))")
        return engine.path
    return Path(engine)


def _serve_on_ray(engines: list[Engine | str | Path], names: Sequence[str] | None, trust_code: bool,
                  log: Callable[[str], None] | None, settings: ServeOptions) -> ServerHandle:
    """The same front ends, with each engine in a Ray Serve deployment (see ray_backend)."""
    from .ray_backend import deploy

    chosen = model_names(engines, names)
    paths = [_bundle_path(engine, name) for name, engine in zip(chosen, engines)]
    assert settings.ray is not None
    models, deployments = deploy(list(zip(chosen, paths)), lambda engine: batching_for(engine, settings),
                                 settings.ray, settings.timeout_ms, trust_code, log)
    try:
        return _start(models, settings, [deployments], log)  # type: ignore[list-item]
    except BaseException:
        deployments.close()
        raise


def _release(models: list[ServedModel], owned: list[Engine]) -> None:
    """What a server that failed to start holds: the batchers' threads and the engines loaded for it."""
    for model in models:
        model.batcher.stop()
    for engine in owned:
        engine.close()


def _start(models: list[ServedModel], settings: ServeOptions, owned: list[Engine],
           log: Callable[[str], None] | None) -> ServerHandle:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    outcome: dict[str, object] = {}

    def run_loop() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome["bound"] = loop.run_until_complete(_bind(models, settings, log))
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            outcome["error"] = exc
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run_loop, name="enginesmith-serve", daemon=True)
    thread.start()
    ready.wait()
    if "error" in outcome:
        thread.join()
        raise outcome["error"]  # type: ignore[misc]
    bound: _Bound = outcome["bound"]  # type: ignore[assignment]
    host = settings.host
    return ServerHandle(
        url=f"http://{host}:{bound.http_port}",
        grpc_address=f"{host}:{bound.grpc_port}" if bound.grpc_port else None,
        metrics_url=f"http://{host}:{bound.metrics_port}/metrics",
        models={m.name: m for m in models},
        _loop=loop,
        _thread=thread,
        _shutdown=bound.shutdown,
        _owned=owned,
    )


@dataclass
class _Bound:
    http_port: int
    grpc_port: int | None
    metrics_port: int
    shutdown: Callable[[], "asyncio.Future"]


def _port_in_use(what: str, host: str, port: int, flag: str, exc: BaseException) -> ServeError:
    return ServeError(f"cannot listen for {what} on {host}:{port} ({exc}); pick another port with {flag} (0 picks a free one)")


async def _bind(models: list[ServedModel], settings: ServeOptions, log: Callable[[str], None] | None) -> _Bound:
    """Start listening on every port; on any failure close what was opened and raise ServeError."""
    from aiohttp import web

    from .http_frontend import inference_app, metrics_app

    repository = Repository(models)
    runners: list[web.AppRunner] = []
    grpc_server = None
    tasks: list[asyncio.Task] = []

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        for runner in runners:
            await runner.cleanup()

    async def listen(app: web.Application, port: int, what: str, flag: str) -> int:
        # handler_cancellation: a client that hangs up stops waiting for its answer (its request
        # is taken out of the queue if it is still there).
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, settings.host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise _port_in_use(what, settings.host, port, flag, exc) from None
        return int(runner.addresses[0][1])

    try:
        http_port = await listen(inference_app(repository, settings.max_request_bytes), settings.http_port,
                                 "HTTP", "--http-port")
        metrics_port = await listen(metrics_app(lambda: prometheus_text(m.stats for m in models)),
                                    settings.metrics_port, "metrics", "--metrics-port")
        grpc_port = None
        if settings.grpc:
            grpc_server, grpc_port = await _start_grpc(repository, settings)
        if log is not None:
            tasks.append(asyncio.ensure_future(_log_rates(models, settings.log_interval_s, log)))
    except BaseException:
        await shutdown()
        raise
    return _Bound(http_port, grpc_port, metrics_port, shutdown)


async def _start_grpc(repository: Repository, settings: ServeOptions):
    import grpc

    from .grpc_frontend import add_to_server

    limit = settings.max_request_bytes
    server = grpc.aio.server(
        migration_thread_pool=ThreadPoolExecutor(max_workers=2, thread_name_prefix="enginesmith-grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1),
                 ("grpc.so_reuseport", 0)],
    )
    add_to_server(server, repository)
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise _port_in_use("gRPC", settings.host, settings.grpc_port, "--grpc-port", exc) from None
    if port == 0:
        raise _port_in_use("gRPC", settings.host, settings.grpc_port, "--grpc-port", OSError("address in use"))
    await server.start()
    return server, port


async def _log_rates(models: list[ServedModel], interval_s: float, log: Callable[[str], None]) -> None:
    before = {m.name: m.stats.snapshot() for m in models}
    last = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        for model in models:
            after = model.stats.snapshot()
            log(rate_line(model.name, before[model.name], after, now - last).text())
            before[model.name] = after
        last = now
