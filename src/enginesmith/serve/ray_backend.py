"""``serve --ray``: the engines run in Ray Serve replicas; the protocol stays in this process.

The front ends (REST, gRPC), the request checks and the metrics page are the ones of
``enginesmith serve``; only the engine call moves. Each engine becomes one Ray Serve application
with one deployment of ``replicas`` :class:`EngineReplica` actors, and each replica batches on
its own with the same :class:`DynamicBatcher` as a local server (items merged along axis 0, only
compatible shapes, a failing batch rerun request by request). The front end awaits the
deployment's handle instead of a local batcher; requests that find every replica busy wait there
and go together in one call (:class:`ReplicaDispatcher`), since a Ray call costs milliseconds of CPU.

Why not ``@serve.batch``: it counts requests, not items (a 64-row request weighs as much as a
1-row one), merges whatever arrives (a request of another shape would spoil the batch), and runs
the batch on the replica's event loop; the DynamicBatcher already does the right thing on a
worker thread, and is tested.

The engine reaches the replicas as bytes in Ray's object store (``ray.put`` of the bundle file),
so a cluster whose nodes share no disk works. A replica on a GPU node asks for ``num_gpus=1``;
Ray sets ``CUDA_VISIBLE_DEVICES`` so it sees its own GPU as device 0 and loads the engine there.
A bundle built for another platform is rebuilt in the replica from the source it carries.

A request whose replica dies is sent again (engines are pure functions of their inputs), up to
``retries`` more times within its deadline; after that it is answered 503. No request waits past
its deadline (the request's ``timeout``, ``--timeout-ms``, else ``request_timeout_s``).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import tempfile
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..bundle import read_bundle
from ..errors import PlatformMismatchError
from ..manifest import Manifest, engine_needs_gpu
from ..signature import Signature
from .batcher import BatchingOptions, DynamicBatcher, QueueFullError, merge_key
from .metrics import ModelCounters, ModelStats
from .models import VERSION, ServedModel, failure_answer
from .protocol import InferRequest, InferResponse, ProtocolError

DEFAULT_REQUEST_TIMEOUT_S = 60.0
FAILURE_LOG_INTERVAL_S = 10.0
# Counters a replica keeps (the engine calls); the front end keeps the request counters.
REPLICA_COUNTERS = ("inference_count", "exec_count", "queue_duration_ns", "compute_infer_duration_ns")


@dataclass(frozen=True)
class RayOptions:
    """Where and how the engines run on Ray.

    ``address`` None starts a local Ray instance for the server (and stops it with the server);
    ``gpus_per_replica`` None gives each replica one GPU when the engine runs on CUDA, else none.
    """

    address: str | None = None
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    retries: int = 2
    rebuild: bool = True
    local_cpus: int | None = None  # CPUs of a local instance (None: Ray's count of this machine's)

    def __post_init__(self) -> None:
        from .server import ServeError

        if self.replicas < 1:
            raise ServeError("--replicas must be at least 1")
        if self.cpus_per_replica < 0 or (self.gpus_per_replica is not None and self.gpus_per_replica < 0):
            raise ServeError("CPUs and GPUs per replica must be 0 or more")
        if self.request_timeout_s <= 0:
            raise ServeError("the request timeout must be more than 0 seconds")
        if self.retries < 0:
            raise ServeError("retries must be 0 or more")


class RemoteEngine:
    """An engine as the front end knows it: its manifest. It runs in the replicas, never here."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: Manifest = read_bundle(path, payload=False).manifest

    @property
    def signature(self) -> Signature:
        return self.manifest.signature

    @property
    def backend(self) -> str:
        return self.manifest.backend

    @property
    def max_batch(self) -> int | None:
        # as Engine.max_batch: the payload's fixed batch, else the backend's limit
        return self.signature.fixed_batch() or self.manifest.build_options.get("backend_options", {}).get("max_batch")

    @property
    def compiled_batches(self) -> tuple[int, ...]:
        # as Engine.compiled_batches, from what the build recorded: the torch backend's CUDA engines compile
        # fixed batch sizes (its session's compiled_batches), every other engine runs any size alike
        build = self.manifest.checks.get("build") or {}
        if build.get("compile") != "inductor" or build.get("dynamic", True) or not str(build.get("device", "")).startswith("cuda"):
            return ()
        return tuple(sorted({int(size) for size in build.get("batches") or []}))

    def infer(self, feeds: Any) -> dict[str, np.ndarray]:
        raise RuntimeError("a served-on-Ray engine runs in its replicas, not in the front end")


# ------------------------------------------------------------------------------------------ replicas


@dataclass(frozen=True)
class ReplicaAnswer:
    """What a replica sends back for one request: outputs, or the protocol status and message."""

    replica: str
    counters: ModelCounters
    outputs: dict[str, np.ndarray] | None = None
    status: int = 200
    message: str = ""
    retry_after_s: int | None = None


def load_or_rebuild(path: Path, trust_code: bool, rebuild: bool, log: Callable[[str], None]) -> Any:
    """The engine for this machine: the bundle's own, or rebuilt from its source where the platform differs."""
    from ..api import build, load

    try:
        return load(path, trust_code=trust_code)
    except PlatformMismatchError as exc:
        manifest = read_bundle(path, payload=False).manifest
        if not (rebuild and manifest.has_source):
            raise
        log(f"{path.name}: {exc}; rebuilding it here from the source it carries")
        return build(path)


class EngineReplica:
    """One Ray Serve replica: the engine loaded from the bytes it was given, behind a DynamicBatcher.

    Ray Serve wraps this class in a deployment (:func:`deploy`); each replica is a Ray actor.
    """

    def __init__(self, bundle: list, name: str, batching: BatchingOptions, trust_code: bool, rebuild: bool):
        import ray

        # A list, so Ray hands the reference over instead of resolving it into the constructor's arguments.
        data = ray.get(bundle[0])
        # The file only lives while the engine loads (the session holds what it needs): a replica
        # killed later leaves no copy of the bundle behind.
        with tempfile.TemporaryDirectory(prefix="enginesmith-replica-") as folder:
            path = Path(folder) / f"{name}.engine"
            path.write_bytes(data)
            self.engine = load_or_rebuild(path, trust_code, rebuild, log=print)
        self.name = name
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.stats = ModelStats(name, VERSION, pending=lambda: self.batcher.pending)
        self.batcher = DynamicBatcher(
            self.engine.infer, batching, name=name,
            on_execution=lambda record: self.stats.executed(record.items, record.compute_ns),
            on_dequeue=self.stats.queued,
        )

    def _answer(self, **fields_: Any) -> ReplicaAnswer:
        return ReplicaAnswer(replica=self.replica, counters=self.stats.snapshot(), **fields_)

    async def infer_group(self, requests: list[dict[str, np.ndarray]], timeout_s: float | None) -> list[ReplicaAnswer]:
        """One answer per request of a group the front end sent in one call; each goes to the batcher on its own,
        so a bad request fails only itself."""
        return list(await asyncio.gather(*(self.infer(feeds, timeout_s) for feeds in requests)))

    async def infer(self, feeds: dict[str, np.ndarray], timeout_s: float | None) -> ReplicaAnswer:
        try:
            future = self.batcher.submit(feeds, timeout_s)
        except QueueFullError as exc:
            return self._answer(status=503, message=f"model '{self.name}' is busy: {exc}; retry later", retry_after_s=1)
        try:
            outputs = await asyncio.wrap_future(future)
        except Exception as exc:  # noqa: BLE001 - answered with its status; the replica keeps serving
            answer = failure_answer(self.name, exc)
            return self._answer(status=answer.status, message=str(answer), retry_after_s=answer.retry_after_s)
        return self._answer(outputs=outputs)

    def describe(self) -> dict[str, Any]:
        """Where this replica runs (for logs and tests)."""
        return {"replica": self.replica, "pid": os.getpid(), "node": socket.gethostname(),
                "backend": self.engine.backend, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def __del__(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.stop(timeout_s=1.0)


# ------------------------------------------------------------------------------------------ front end


class ClusterStats(ModelStats):
    """Request counters kept here, engine-call counters summed over the replicas' latest reports.

    Each answer carries its replica's cumulative counters; answers may arrive out of order, so each
    field keeps its largest value seen. A replica that dies keeps its last counts (counters never go down).
    """

    def __init__(self, model: str, pending: Callable[[], int]):
        super().__init__(model, VERSION, pending)
        self._replicas: dict[str, ModelCounters] = {}

    def absorb(self, replica: str, counters: ModelCounters) -> None:
        with self._lock:
            seen = self._replicas.get(replica)
            if seen is None:
                self._replicas[replica] = counters
                return
            for name in REPLICA_COUNTERS:
                setattr(seen, name, max(getattr(seen, name), getattr(counters, name)))

    def snapshot(self) -> ModelCounters:
        merged = super().snapshot()
        with self._lock:
            for name in REPLICA_COUNTERS:
                setattr(merged, name, sum(getattr(c, name) for c in self._replicas.values()))
        return merged

    @property
    def replicas_seen(self) -> int:
        with self._lock:
            return len(self._replicas)


def _retryable() -> tuple[type[BaseException], ...]:
    """Errors that mean the replica (not the request) failed: the request goes to another one."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, ReplicaUnavailableError, DeploymentUnavailableError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@dataclass(eq=False)
class _Queued:
    """A request waiting in the front end for a call to a replica."""

    feeds: dict[str, np.ndarray]
    rows: int
    deadline: float  # on the event loop's clock
    answer: asyncio.Future  # the outputs, or a ProtocolError
    abandoned: bool = False  # its caller has gone (deadline, hang-up): not sent, not answered


class ReplicaDispatcher:
    """Sends a model's requests to its Ray Serve deployment; what ServedModel holds as its ``batcher``.

    At most ``max_calls`` calls to the replicas are in flight (two per replica: one running, one waiting, so
    none idles). A request that finds them all busy waits here, and the waiting requests leave together in the
    next call, up to ``max_batch`` items: one Ray round trip then carries several requests. A round trip cost
    the front end about 8 ms of CPU per call on a 2-core VM (175 KB in), as much as a small model's inference;
    see docs/scaling-out.md. At low load every request goes at once, alone.
    """

    def __init__(self, name: str, handle: Any, batching: BatchingOptions, options: RayOptions, app: str,
                 log: Callable[[str], None] | None = None):
        self.name = name
        self._log = log
        self._last_failure_logged = float("-inf")
        self.options = batching
        self.ray = options
        self.app = app
        self._handle = handle.options(method_name="infer_group")
        self._in_flight = 0
        self._queued: deque[_Queued] = deque()
        self._calls = 0
        self.max_calls = 2 * options.replicas
        self.stats = ClusterStats(name, pending=lambda: self._in_flight)
        self.retried = 0  # requests sent again after their replica failed
        self.calls = 0  # calls made to the replicas (each with one or more requests)

    @property
    def pending(self) -> int:
        return self._in_flight

    async def run(self, feeds: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        """The outputs, or a ProtocolError; never waits past the deadline."""
        loop = asyncio.get_running_loop()
        waited = timeout_s or self.ray.request_timeout_s
        rows = merge_key(feeds)[0] or 1
        entry = _Queued(feeds, rows, loop.time() + waited, loop.create_future())
        self._in_flight += 1
        self._queued.append(entry)
        try:
            self._send_waiting()
            try:
                return await asyncio.wait_for(asyncio.shield(entry.answer), max(entry.deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise ProtocolError(503, f"model '{self.name}' did not answer within {waited:.1f} s "
                                         "(its replicas are busy or restarting); retry later", retry_after_s=1) from None
        finally:
            entry.abandoned = True
            self._in_flight -= 1

    def _send_waiting(self) -> None:
        """Start calls for the waiting requests while fewer than ``max_calls`` are in flight."""
        while self._calls < self.max_calls:
            group: list[_Queued] = []
            rows = 0
            while self._queued and (not group or rows + self._queued[0].rows <= self.options.max_batch):
                entry = self._queued.popleft()
                if not entry.abandoned:
                    group.append(entry)
                    rows += entry.rows
            if not group:
                return
            self._calls += 1
            self.calls += 1
            asyncio.ensure_future(self._call(group))

    async def _call(self, group: list[_Queued]) -> None:
        """One call with the group's requests, sent again if its replica dies; each request answered."""
        from ray.serve.exceptions import BackPressureError

        loop = asyncio.get_running_loop()
        try:
            for attempt in range(self.ray.retries + 1):
                group = [entry for entry in group if not entry.abandoned]
                left = max((entry.deadline for entry in group), default=loop.time()) - loop.time()
                if left <= 0:
                    return  # each request answers its own deadline
                response = self._handle.remote([entry.feeds for entry in group], left)
                try:
                    answers: list[ReplicaAnswer] = await asyncio.wait_for(_awaited(response), left)
                except asyncio.TimeoutError:
                    response.cancel()
                    return
                except asyncio.CancelledError:  # the server is stopping
                    response.cancel()
                    raise
                except BackPressureError as exc:
                    return _fail(group, ProtocolError(503, f"model '{self.name}' is busy: {_first_line(exc)}; retry "
                                                           "later", retry_after_s=1))
                except _retryable() as exc:
                    if attempt == self.ray.retries:
                        return _fail(group, ProtocolError(
                            503, f"model '{self.name}': its replica failed ({_first_line(exc)}) {attempt + 1} times; "
                                 "retry later", retry_after_s=1))
                    self.retried += len(group)
                    self._note_failure(exc, loop.time())
                    await asyncio.sleep(min(0.05 * 2 ** attempt, max(left, 0)))
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. a RayTaskError: this group fails, the server goes on
                    return _fail(group, ProtocolError(500, f"model '{self.name}' failed on this request: "
                                                           f"{_first_line(exc)}"))
                if answers:
                    self.stats.absorb(answers[-1].replica, answers[-1].counters)  # the replica's latest counters
                for entry, answer in zip(group, answers):
                    if answer.outputs is None:
                        _settle(entry, error=ProtocolError(answer.status, answer.message,
                                                           retry_after_s=answer.retry_after_s))
                    else:
                        _settle(entry, outputs=answer.outputs)
                return
        finally:
            self._calls -= 1
            if self._queued and not loop.is_closed():
                self._send_waiting()

    def _note_failure(self, exc: BaseException, now: float) -> None:
        """One line per failure burst (a dying replica fails every request it holds at once)."""
        if self._log is not None and now - self._last_failure_logged >= FAILURE_LOG_INTERVAL_S:
            self._last_failure_logged = now
            self._log(f"{self.name}: a replica failed ({_first_line(exc)}); its requests are sent to another replica")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Nothing runs here; the deployment is deleted with the server (RayDeployments.close)."""


def _settle(entry: _Queued, outputs: dict[str, np.ndarray] | None = None, error: ProtocolError | None = None) -> None:
    """Hand a request its answer, unless its caller has gone (an unread exception would be logged)."""
    if entry.abandoned or entry.answer.done():
        return
    if error is not None:
        entry.answer.set_exception(error)
    else:
        entry.answer.set_result(outputs)


def _fail(group: list[_Queued], error: ProtocolError) -> None:
    for entry in group:
        _settle(entry, error=error)


async def _awaited(response: Any) -> Any:
    return await response


class RayServedModel(ServedModel):
    """A ServedModel whose engine calls go to Ray Serve replicas.

    It shares the metadata, request checks and response building; it has no local batcher (ServedModel's
    constructor would start one), its ``batcher`` is the dispatcher and its counters the cluster's.
    """

    def __init__(self, name: str, engine: RemoteEngine, dispatcher: ReplicaDispatcher, timeout_ms: float | None):
        self._describe(name, engine, timeout_ms)  # type: ignore[arg-type]
        self.batcher = dispatcher  # type: ignore[assignment]
        self.stats = dispatcher.stats

    async def _infer(self, request: InferRequest) -> InferResponse:
        feeds = self.check_inputs(request)
        selected = self._selected_outputs(request)
        timeout_ms = request.timeout_us / 1000 if request.timeout_us else self.timeout_ms
        outputs = await self.batcher.run(feeds, None if timeout_ms is None else timeout_ms / 1000)  # type: ignore[attr-defined]
        return self._response(request, selected, outputs)


# ------------------------------------------------------------------------------------------ deploying


class RayDeployments:
    """The Ray Serve applications of one server; ``close()`` deletes them and leaves the cluster."""

    def __init__(self, session: Any):
        self.session = session
        self.apps: list[str] = []

    def close(self) -> None:
        from ray import serve

        from ..cluster import disconnect

        try:
            for app in self.apps:
                try:
                    serve.delete(app)
                except Exception:  # noqa: BLE001 - the cluster may already be gone; nothing left to free
                    pass
        finally:  # a local instance stops here with everything in it (the Serve controller too)
            disconnect(self.session)


def replica_resources(manifest: Manifest, options: RayOptions) -> dict[str, float]:
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if engine_needs_gpu(manifest) else 0.0
    return {"num_cpus": options.cpus_per_replica, "num_gpus": gpus}


def _deploy_error(name: str, app: str, exc: BaseException) -> str:
    """The line that says why a replica could not start, out of Ray Serve's deployment status (a traceback)."""
    from ray import serve

    text = str(exc)
    try:
        status = serve.status().applications.get(app)
        if status is not None:
            text = "\n".join([text, status.message, *(d.message for d in status.deployments.values())])
    except Exception:  # noqa: BLE001 - the exception's own text is the fallback
        pass
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("enginesmith.errors.")]
    raised = ours or [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    reason = (raised[-1] if raised else lines[-1] if lines else type(exc).__name__).removeprefix("enginesmith.errors.")
    return f"model '{name}' could not start on Ray: {reason}"


def deploy(models: Sequence[tuple[str, Path]], batching: Callable[[RemoteEngine], BatchingOptions],
           options: RayOptions, timeout_ms: float | None, trust_code: bool,
           log: Callable[[str], None] | None) -> tuple[list[RayServedModel], RayDeployments]:
    """Connect to Ray, start one application per engine and wait until its replicas are ready."""
    from ..cluster import connect, import_ray
    from .server import ServeError

    ray = import_ray()
    from ray import serve

    session = connect(options.address, num_cpus=options.local_cpus)
    deployments = RayDeployments(session)
    served: list[RayServedModel] = []
    try:
        serve.start(proxy_location="Disabled")  # the front ends are ours: no Ray HTTP proxy
        token = uuid.uuid4().hex[:8]
        for name, path in models:
            engine = RemoteEngine(path)
            settings = batching(engine)
            resources = replica_resources(engine.manifest, options)
            if resources["num_gpus"] and session.gpus < resources["num_gpus"] * options.replicas:
                raise ServeError(f"model '{name}' runs on CUDA and asks for {resources['num_gpus']:g} GPU per replica "
                                 f"x {options.replicas} replicas, but the Ray cluster has {session.gpus} GPUs; "
                                 "use fewer --replicas or add GPU nodes")
            deployment = serve.deployment(
                EngineReplica, name=name, num_replicas=options.replicas, ray_actor_options=resources,
                # the replica's batcher queue is the limit; Serve may hand it that many requests at once
                max_ongoing_requests=settings.max_queue + settings.instances,
                max_queued_requests=settings.max_queue * options.replicas,
                max_constructor_retry_count=max(2, options.replicas),
                health_check_period_s=2.0, graceful_shutdown_timeout_s=5.0,
                # Serve's access log writes a line per request (about 7 % of a replica's CPU in a profile);
                # the front end's metrics count requests already
                logging_config={"enable_access_log": False},
            )
            bundle = ray.put(path.read_bytes())
            app = f"enginesmith-{name}-{token}"
            try:
                handle = serve.run(deployment.bind([bundle], name, settings, trust_code, options.rebuild),
                                   name=app, route_prefix=None)
            except Exception as exc:  # noqa: BLE001 - Ray Serve's message holds the replica's traceback
                deployments.apps.append(app)
                raise ServeError(_deploy_error(name, app, exc)) from None
            deployments.apps.append(app)
            dispatcher = ReplicaDispatcher(name, handle, settings, options, app, log)
            served.append(RayServedModel(name, engine, dispatcher, timeout_ms))
            if log is not None:
                log(f"{name}: {options.replicas} replica(s) on Ray at {session.address} "
                    f"({resources['num_cpus']:g} CPU, {resources['num_gpus']:g} GPU each)")
    except BaseException:
        deployments.close()
        raise
    return served, deployments

