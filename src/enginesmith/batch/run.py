"""``map_dataset``: score a Parquet dataset or an image folder with an engine on a Ray cluster.

The driver plans parts (plan.py), ships the engine's bytes through the object store once, and
hands one part descriptor at a time to a Ray Data actor pool (worker.py): each actor holds one
engine (``num_gpus=1`` on a GPU engine, intra-op threads = its CPUs otherwise) and streams its
part from the input into the output folder. Ray restarts a killed actor and retries its task
(Ray Data's actor pools use ``max_restarts=-1``, ``max_task_retries=-1``); the retried part is
written again under the same name, so every row lands exactly once.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..bundle import read_bundle
from ..errors import EnginesmithError, InputError, MissingDependencyError
from ..cluster.ray_session import connect, disconnect
from ..manifest import engine_needs_gpu
from ..runtime.preprocess import PreprocessSpec, parse_spec
from .plan import (
    InputPlan, MapError, RunRecord, plan_input, prepare_output, remove_temporary_files,
    write_record,
)

RAY_EXTRA = "pip install 'enginesmith[ray]'"
DEFAULT_BATCH = 256

# (stage, done, total): the CLI's progress bar
ProgressCallback = Callable[[str, int, int | None], None]


@dataclass
class MapReport:
    """What a map run did. ``rows_per_second`` counts the rows computed in this run only."""

    output: str
    rows: int  # rows in the output (all parts)
    parts: int
    parts_computed: int  # in this run
    parts_skipped: int  # already written by an earlier run (resume)
    rows_computed: int
    seconds: float
    rows_per_second: float
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    batch_size: int
    part_rows: int
    input_kind: str
    id_column: str
    worker_processes: int  # distinct worker processes that wrote parts (more than workers: some were restarted)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def map_dataset(
    engine_path: str | Path,
    input: str | Path,  # noqa: A002 - the CLI's --input
    output: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    part_rows: int | None = None,
    id_column: str | None = None,
    preprocess: PreprocessSpec | str | None = None,
    trust_code: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> MapReport:
    """Score every row of ``input`` with the engine into the Parquet dataset folder ``output``.

    ``input``: a Parquet file or folder of Parquet files whose columns are named after the engine's
    inputs (one tensor per row), with an ``id_column`` (default ``id``; without one, the row number
    is the id), or a folder of images (the bundle's preprocessing, or ``preprocess``; the file's
    relative path is the id). ``output`` gets one ``part-<first row>.parquet`` per part: the id
    column and one column per engine output. A rerun resumes: finished parts are not recomputed.
    ``address``: a Ray cluster (``ray://host:10001``, ``host:6379``, ``auto``); default: the Ray
    instance this process already holds, else a new local one. ``workers`` engines run at once
    (default: one per GPU for GPU engines, else one per ``cpus_per_worker`` CPUs of the cluster).
    """
    started = time.perf_counter()
    engine_path, source, output = Path(engine_path), Path(input), Path(output)
    for name, value in (("workers", workers), ("batch_size", batch_size), ("part_rows", part_rows)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if not engine_path.is_file():
        raise InputError(f"engine not found: '{engine_path}'")
    manifest = read_bundle(engine_path, payload=False).manifest
    spec = _preprocess_spec(preprocess, manifest.preprocess)
    plan = plan_input(source, manifest.signature, id_column=id_column, part_rows=part_rows, preprocess=spec)
    engine_bytes = engine_path.read_bytes()
    record = RunRecord(
        input=str(source), input_fingerprint=plan.fingerprint, engine=engine_path.name,
        engine_sha256=_sha256(engine_bytes), settings={"part_rows": plan.part_rows, "id_column": plan.id_column},
        parts=len(plan.parts), rows=plan.rows,
    )
    done = prepare_output(output, record, force=force, inputs=(source, engine_path))
    todo = [part for part in plan.parts if part.name not in done]
    gpu_engine = engine_needs_gpu(manifest)
    batch = batch_size or _default_batch(manifest)
    computed, pids, layout = 0, set(), _Layout(0, cpus_per_worker or 1.0, gpus_per_worker or 0.0)
    if progress:
        progress("map", plan.rows - sum(p.rows for p in todo), plan.rows)
    if todo:
        computed, pids, layout = _run_parts(
            plan, todo, engine_bytes, output, address=address, workers=workers, batch=batch, gpu_engine=gpu_engine,
            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, trust_code=trust_code, progress=progress,
        )
    missing = [p.name for p in plan.parts if not (output / p.name).is_file()]
    if missing:
        raise MapError(f"{len(missing)} parts were not written ({missing[0]}, ...); run the same command again to finish")
    remove_temporary_files(output)  # what a killed worker was writing when it died
    record.complete = True
    write_record(output, record)
    seconds = time.perf_counter() - started
    return MapReport(
        output=str(output), rows=plan.rows, parts=len(plan.parts), parts_computed=len(todo),
        parts_skipped=len(plan.parts) - len(todo), rows_computed=computed, seconds=seconds,
        rows_per_second=computed / seconds if seconds > 0 else 0.0, workers=layout.workers,
        cpus_per_worker=layout.cpus, gpus_per_worker=layout.gpus, batch_size=batch, part_rows=plan.part_rows,
        input_kind=plan.kind, id_column=plan.id_column, worker_processes=len(pids), notes=list(plan.notes),
    )


@dataclass
class _Layout:
    workers: int
    cpus: float
    gpus: float


def _run_parts(plan: InputPlan, todo, engine_bytes: bytes, output: Path, *, address, workers, batch, gpu_engine,
               gpus_per_worker, cpus_per_worker, trust_code, progress) -> tuple[int, set[int], _Layout]:
    ray = _import_ray()
    from ray.data import ActorPoolStrategy

    from .worker import PartWriter, WorkerSettings, error_from_summary, part_to_json

    session = connect(address)
    try:
        layout = _worker_layout(ray.cluster_resources(), workers, gpu_engine, gpus_per_worker, cpus_per_worker, len(todo))
        threads = None if layout.gpus else max(1, int(layout.cpus))
        settings = WorkerSettings.from_plan(plan, output, batch, threads, trust_code)
        engine_ref = ray.put(engine_bytes)
        items = [{"part": part_to_json(part)} for part in todo]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            PartWriter, batch_size=1, fn_constructor_args=([engine_ref], settings),
            # two parts queued per actor: the next descriptor is there when a part ends, and the last
            # parts are not stuck behind a busy actor
            compute=ActorPoolStrategy(size=layout.workers, max_tasks_in_flight_per_actor=2),
            num_cpus=layout.cpus, num_gpus=layout.gpus or None,
        )
        done = plan.rows - sum(p.rows for p in todo)
        computed, pids = 0, set()
        try:
            with _quiet_ray_data(ray):
                for summary in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    failed = [text for text in summary["error"] if text]
                    if failed:
                        raise error_from_summary(str(failed[0]))
                    computed += int(summary["rows"].sum())
                    pids.update(int(p) for p in summary["pid"])
                    if progress:
                        progress("map", done + computed, plan.rows)
        except EnginesmithError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's own failures (a worker that cannot start): one line
            raise _worker_error(exc) from exc
        return computed, pids, layout
    finally:
        disconnect(session)


def _worker_layout(resources: dict[str, float], workers: int | None, gpu_engine: bool, gpus_per_worker: float | None,
                   cpus_per_worker: float | None, parts: int) -> _Layout:
    """How many engines, each with how many CPUs and GPUs: one per GPU for GPU engines, else one per CPU."""
    cluster_cpus, cluster_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpu_engine else 0.0)
    cpus = cpus_per_worker if cpus_per_worker is not None else 1.0
    if gpus and cluster_gpus < gpus:
        why = "the engine runs on a GPU" if gpus_per_worker is None else f"each worker asks for {gpus:g} GPUs"
        raise MapError(f"{why} but the Ray cluster has {cluster_gpus:g} GPUs; connect to a cluster with GPUs (--address), "
                       "or build the engine for the CPU")
    if cpus > cluster_cpus:
        raise MapError(f"each worker asks for {cpus:g} CPUs but the Ray cluster has {cluster_cpus:g}")
    if workers is None:
        workers = int(cluster_gpus // gpus) if gpus else int(cluster_cpus // cpus)
    return _Layout(max(1, min(workers, parts)), cpus, gpus)


@contextmanager
def _quiet_ray_data(ray) -> Iterator[None]:
    """Ray Data's progress bars and execution logs off for the run (the progress callback shows rows), then restored."""
    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = context.enable_progress_bars, logger.level
    context.enable_progress_bars = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars = saved[0]
        logger.setLevel(saved[1])


def _worker_error(exc: BaseException) -> EnginesmithError:
    """The EnginesmithError a worker raised (inside Ray's wrappers), else a MapError with Ray's first line."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EnginesmithError):
            return type(current)(str(current))
        pending.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MapError(f"a map worker failed: {type(exc).__name__}: {text}")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"enginesmith map runs on Ray Data: {RAY_EXTRA}") from None
    return ray


def _preprocess_spec(given: PreprocessSpec | str | None, stored: dict | None) -> PreprocessSpec | None:
    if isinstance(given, str):
        return parse_spec(given)
    if given is not None:
        return given
    return PreprocessSpec.from_dict(stored) if stored else None


def _default_batch(manifest) -> int:
    fixed = manifest.signature.fixed_batch()
    limit = manifest.build_options.get("backend_options", {}).get("max_batch")
    return int(fixed or min(limit or DEFAULT_BATCH, DEFAULT_BATCH))


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


__all__ = ["MapReport", "map_dataset"]
