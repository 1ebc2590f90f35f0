"""The worker side of a map run: one engine per worker, each part read, run and written as one file.

:class:`PartWriter` is the callable class Ray Data runs in an actor pool; :func:`write_part` is its
work, which needs no Ray. A part is streamed: read ``batch_size`` rows, run them, append them to the part's temporary file; the file
gets its final name only when the part is complete, so a worker killed mid-part leaves no rows.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import EnginesmithError
from ..files import atomic_writer
from ..runtime.engine import Engine
from ..runtime.inputs import InputCastWarning
from .columns import array_to_column, column_to_array, output_type
from .plan import InputPlan, Part


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs besides the engine: where the input and output are, how to cut batches."""

    kind: str
    root: str
    output: str
    id_column: str
    id_from_input: bool
    batch_size: int
    preprocess: dict[str, Any] | None = None
    threads: int | None = None
    trust_code: bool = False

    @classmethod
    def from_plan(cls, plan: InputPlan, output: Path, batch_size: int, threads: int | None, trust_code: bool) -> "WorkerSettings":
        return cls(kind=plan.kind, root=str(plan.root.resolve()), output=str(output.resolve()), id_column=plan.id_column,
                   id_from_input=plan.id_from_input, batch_size=batch_size, preprocess=plan.preprocess, threads=threads,
                   trust_code=trust_code)


def load_engine_bytes(data: bytes, *, threads: int | None, trust_code: bool) -> Engine:
    """An engine from its bundle's bytes (shipped through Ray's object store: no shared disk needed for it)."""
    from ..api import load

    with tempfile.TemporaryDirectory(prefix="enginesmith-map-") as tmp:
        path = Path(tmp) / "model.engine"
        path.write_bytes(data)
        return load(path, trust_code=trust_code, threads=threads)


class PartWriter:
    """A Ray Data actor: loads the engine once, then writes every part it is handed.

    Each call gets a batch of part descriptors (JSON text) and returns one summary row per part.
    """

    def __init__(self, engine_ref: list, settings: WorkerSettings):
        import ray

        data = engine_ref[0]
        if isinstance(data, ray.ObjectRef):
            data = ray.get(data)
        self.settings = settings
        self.engine: Engine | None = None
        self.load_error: EnginesmithError | None = None
        try:
            self.engine = load_engine_bytes(data, threads=settings.threads, trust_code=settings.trust_code)
        except EnginesmithError as exc:  # another platform, untrusted code: said once per part, not as a crash
            self.load_error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, rows, seconds, errors = [], [], [], []
        for text in batch["part"]:
            part = _part_from_json(str(text))
            started = time.perf_counter()
            try:
                if self.load_error is not None:
                    raise self.load_error
                rows.append(write_part(self.engine, part, self.settings))
                errors.append("")
            except EnginesmithError as exc:
                # Returned, not raised: Ray would wrap it in its own exception with a remote traceback,
                # and the driver re-raises it as the one-line error it is.
                rows.append(0)
                errors.append(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
            names.append(part.name)
            seconds.append(time.perf_counter() - started)
        return {"name": np.array(names), "rows": np.array(rows, np.int64), "seconds": np.array(seconds),
                "pid": np.full(len(names), os.getpid(), np.int64), "error": np.array(errors)}


def error_from_summary(text: str) -> EnginesmithError:
    """The error a worker returned, as the same class when it is one of enginesmith.errors'."""
    from .. import errors

    data = json.loads(text)
    kind = getattr(errors, data["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, EnginesmithError)):
        from .plan import MapError

        kind = MapError
    return kind(data["message"])


def part_to_json(part: Part) -> str:
    return json.dumps({"name": part.name, "first_row": part.first_row, "rows": part.rows, "source": part.source,
                       "row_groups": list(part.row_groups), "images": list(part.images)})


def _part_from_json(text: str) -> Part:
    data = json.loads(text)
    return Part(name=data["name"], first_row=int(data["first_row"]), rows=int(data["rows"]), source=data["source"],
                row_groups=tuple(data["row_groups"]), images=tuple(data["images"]))


def write_part(engine: Engine, part: Part, settings: WorkerSettings) -> int:
    """Run one part through the engine into ``OUTPUT/part-N.parquet`` (atomically); the rows written."""
    schema = output_schema(engine, settings, _id_type(part, settings))
    written = 0
    with atomic_writer(Path(settings.output) / part.name) as handle:
        with pq.ParquetWriter(handle, schema) as writer:  # an empty part still gets its file: a rerun knows it is done
            for ids, feeds in _batches(engine, part, settings):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InputCastWarning)  # the driver said so once
                    outputs = engine.infer(feeds)
                writer.write_table(_output_table(engine, schema, ids, outputs))
                written += len(ids)
    return written


def _batches(engine: Engine, part: Part, settings: WorkerSettings) -> Iterator[tuple[pa.Array, dict[str, np.ndarray]]]:
    signature = engine.signature
    if settings.kind == "images":
        from ..runtime.preprocess import PreprocessSpec, load_image

        spec = PreprocessSpec.from_dict(settings.preprocess or {})
        root = Path(settings.root)
        for start in range(0, len(part.images), settings.batch_size):
            paths = part.images[start:start + settings.batch_size]
            pixels = np.stack([load_image(root / rel, spec) for rel in paths])
            yield pa.array(list(paths), pa.string()), {signature.input_names[0]: pixels}
        return
    columns = list(signature.input_names) + ([settings.id_column] if settings.id_from_input else [])
    reader = pq.ParquetFile(part.source)
    done = 0
    for record_batch in reader.iter_batches(batch_size=settings.batch_size, row_groups=list(part.row_groups),
                                            columns=list(dict.fromkeys(columns))):
        count = record_batch.num_rows
        feeds = {spec.name: column_to_array(spec.name, record_batch.column(spec.name), spec) for spec in signature.inputs}
        if settings.id_from_input:
            ids = record_batch.column(settings.id_column)
        else:
            ids = pa.array(np.arange(part.first_row + done, part.first_row + done + count, dtype=np.int64))
        done += count
        yield ids, feeds


def _id_type(part: Part, settings: WorkerSettings) -> pa.DataType:
    if settings.kind == "images":
        return pa.string()
    if settings.id_from_input:
        return pq.ParquetFile(part.source).schema_arrow.field(settings.id_column).type
    return pa.int64()


def _output_table(engine: Engine, schema: pa.Schema, ids: pa.Array, outputs: dict[str, np.ndarray]) -> pa.Table:
    from ..errors import InputError

    columns = [ids]
    for spec in engine.signature.outputs:
        value = np.asarray(outputs[spec.name])
        if value.ndim == 0 or value.shape[0] != len(ids):
            raise InputError(f"engine output '{spec.name}' has shape {value.shape}, not one value per input row "
                             f"({len(ids)} rows)")
        columns.append(array_to_column(value, spec))
    return pa.Table.from_arrays(columns, schema=schema)


def output_schema(engine: Engine, settings: WorkerSettings, id_type: pa.DataType) -> pa.Schema:
    """The id column, then one column per engine output: the same for every part."""
    fields = [pa.field(settings.id_column, id_type)]
    fields += [pa.field(spec.name, output_type(spec)) for spec in engine.signature.outputs]
    return pa.schema(fields)
