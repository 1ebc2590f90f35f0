"""What a map run computes: the input cut into parts, and the output folder that records them.

A part is a fixed range of input rows (whole Parquet row groups, or a run of image files) and
becomes one output file, ``part-<first row>.parquet``, written under a temporary name and renamed.
The output folder's ``_enginesmith_map.json`` records fingerprints of the input, the engine and
the settings that decide the parts, so a rerun skips the parts already written and refuses to
mix results of another input or engine. Pure planning: no Ray, no engine is run here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..errors import EnginesmithError, InputError, OutputExistsError, ValidationDataError
from ..files import write_atomic
from ..runtime.preprocess import IMAGE_SUFFIXES, PreprocessSpec
from ..signature import Signature
from .columns import check_column, output_type

PROGRESS_FILE = "_enginesmith_map.json"
PROGRESS_FORMAT = 1
DEFAULT_ID_COLUMN = "id"
# A part is the unit of retry and resume. By default an input is cut into about TARGET_PARTS parts:
# enough that workers share them evenly (the last part of one worker is the idle tail of another),
# each between 1 MB and 64 MB of input so that per-part costs (a task, a file) stay small and a lost
# worker loses little.
TARGET_PARTS = 64
MIN_PART_BYTES = 1024 * 1024
MAX_PART_BYTES = 64 * 1024 * 1024
MAX_PART_ROWS = 16384


class MapError(EnginesmithError):
    """A map run cannot start or finish: an output of another input, a worker that failed."""


@dataclass(frozen=True)
class Part:
    """One output file's rows: Parquet row groups of one file, or a run of images."""

    name: str
    first_row: int  # index of the part's first row in the whole input (the id when there is no id column)
    rows: int
    source: str = ""  # the Parquet file (absolute path)
    row_groups: tuple[int, ...] = ()
    images: tuple[str, ...] = ()  # paths relative to the input folder: the row ids of an image input


@dataclass
class InputPlan:
    """The input as parts, plus what a worker needs to read it."""

    kind: str  # "parquet" or "images"
    root: Path
    parts: list[Part]
    rows: int
    part_rows: int  # the most rows of a part (one larger row group makes a larger part)
    id_column: str  # the output's id column (an input column, or "id" for row numbers / image paths)
    id_from_input: bool  # the id column is read from the input (else row numbers or image paths)
    fingerprint: str
    preprocess: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # for the user: columns cast to the engine's dtype, large row groups


def part_name(first_row: int) -> str:
    return f"part-{first_row:012d}.parquet"


def default_part_rows(signature: Signature, total_rows: int, preprocess: PreprocessSpec | None = None) -> int:
    """Rows per part: the input in about TARGET_PARTS parts, each 1-64 MB of input (dims left open count as 1)."""
    row_bytes = 0
    for spec in signature.inputs:
        size = 1
        for dim in spec.shape[1:]:
            size *= dim if isinstance(dim, int) and dim > 0 else 1
        row_bytes += size * _itemsize(spec.dtype)
    if preprocess is not None and preprocess.resize is not None:
        side = preprocess.center_crop or (preprocess.resize if isinstance(preprocess.resize, tuple) else
                                          (preprocess.resize, preprocess.resize))
        row_bytes = max(row_bytes, side[0] * side[1] * preprocess.channels * _itemsize(preprocess.dtype))
    row_bytes = max(row_bytes, 1)
    smallest, largest = max(1, MIN_PART_BYTES // row_bytes), max(1, min(MAX_PART_ROWS, MAX_PART_BYTES // row_bytes))
    return int(min(largest, max(smallest, -(-total_rows // TARGET_PARTS))))


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def plan_input(
    source: Path, signature: Signature, *, id_column: str | None, part_rows: int | None, preprocess: PreprocessSpec | None,
) -> InputPlan:
    """Parts of a Parquet file or folder, or of an image folder; the columns are checked against the engine.

    ``part_rows`` None: :func:`default_part_rows` for the input's size (the same input gets the same parts).
    """
    if not source.exists():
        raise ValidationDataError(f"input not found: '{source}'")
    if source.is_file():
        if source.suffix.lower() != ".parquet":
            raise ValidationDataError(f"input '{source}' is not a .parquet file; give a Parquet file or a folder of "
                                      "Parquet files or images")
        return _plan_parquet(source, [source], signature, id_column, part_rows)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not _hidden(p.relative_to(source)))
    tables = [p for p in files if p.suffix.lower() == ".parquet"]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if tables and images:
        raise ValidationDataError(f"input folder '{source}' holds both Parquet files and images; give one kind")
    if tables:
        return _plan_parquet(source, tables, signature, id_column, part_rows)
    if images:
        return _plan_images(source, images, signature, id_column, part_rows, preprocess)
    raise ValidationDataError(f"input folder '{source}' has no .parquet files and no images (.png, .jpg, ...)")


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _plan_parquet(root: Path, files: list[Path], signature: Signature, id_column: str | None,
                  part_rows: int | None) -> InputPlan:
    wanted_id = id_column or DEFAULT_ID_COLUMN
    facts: list[Any] = []
    casts: set[str] = set()
    id_present: bool | None = None
    layouts: list[tuple[Path, str, list[int]]] = []
    for path in files:
        where = path.name if path == root else str(path.relative_to(root))
        try:
            metadata = pq.ParquetFile(path).metadata
            schema = metadata.schema.to_arrow_schema()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
            raise ValidationDataError(f"'{where}' is not a readable Parquet file ({_first_line(exc)})") from None
        names = schema.names
        for spec in signature.inputs:
            if spec.name not in names:
                raise InputError(
                    f"'{where}' has no column '{spec.name}' for engine input '{spec.name}'; the engine takes "
                    f"{_inputs_text(signature)}, the file has columns {', '.join(names) or 'none'}"
                )
            layout = check_column(spec.name, schema.field(spec.name).type, spec)
            if layout.dtype != spec.dtype:
                casts.add(f"column '{spec.name}' is read as {spec.dtype} (it holds {layout.dtype})")
        has_id = wanted_id in names
        if id_column is not None and not has_id:
            raise InputError(f"'{where}' has no id column '{id_column}' (--id-column); its columns are {', '.join(names)}")
        if id_present is not None and has_id != id_present:
            raise InputError(f"some input files have an '{wanted_id}' column and some do not; the ids must come from one place")
        id_present = has_id
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        facts.append([where, path.stat().st_size, path.stat().st_mtime_ns, groups, str(schema)])
        layouts.append((path, where, groups))
    total = sum(sum(groups) for _, _, groups in layouts)
    part_rows = part_rows or default_part_rows(signature, total)
    parts: list[Part] = []
    notes: list[str] = []
    offset = 0
    for path, where, groups in layouts:
        if groups and max(groups) > part_rows:
            notes.append(
                f"'{where}' has row groups of up to {max(groups)} rows, more than a part's {part_rows}; a part never "
                "splits a row group, so these parts are larger (fewer to share among workers, more to redo after a "
                "crash): write the file with smaller row groups, e.g. pyarrow's row_group_size=4096"
            )
        parts.extend(_group_row_groups(path, groups, offset, part_rows))
        offset += sum(groups)
    plan = InputPlan(
        kind="parquet", root=root, parts=parts, rows=total, part_rows=part_rows, id_column=wanted_id,
        id_from_input=bool(id_present), fingerprint=_digest(facts), notes=sorted(casts) + notes,
    )
    _check_output_names(signature, plan.id_column)
    return plan


def _group_row_groups(path: Path, groups: list[int], offset: int, part_rows: int) -> list[Part]:
    """Consecutive row groups up to ``part_rows`` rows per part; a larger row group is a part of its own."""
    parts: list[Part] = []
    current: list[int] = []
    rows = 0
    start = offset
    for index, count in enumerate(groups):
        if current and rows + count > part_rows:
            parts.append(Part(part_name(start), start, rows, str(path.resolve()), tuple(current)))
            start += rows
            current, rows = [], 0
        current.append(index)
        rows += count
    if current and rows:
        parts.append(Part(part_name(start), start, rows, str(path.resolve()), tuple(current)))
    return parts


def _plan_images(root: Path, images: list[Path], signature: Signature, id_column: str | None, part_rows: int | None,
                 preprocess: PreprocessSpec | None) -> InputPlan:
    from ..validate.data import check_against_signature, default_image_spec

    if len(signature.inputs) != 1:
        raise InputError(f"images can feed single-input engines only; this engine takes {_inputs_text(signature)}: "
                         "give a Parquet input with one column per engine input")
    spec = preprocess or default_image_spec(signature)
    from ..runtime.preprocess import load_image

    first = load_image(images[0], spec)  # a spec that does not fit the engine fails here, before any worker starts
    check_against_signature({signature.input_names[0]: first[None]}, signature, f"image '{images[0].name}'")
    relative = [p.relative_to(root).as_posix() for p in images]
    part_rows = part_rows or default_part_rows(signature, len(relative), spec)
    facts = [[rel, p.stat().st_size, p.stat().st_mtime_ns] for rel, p in zip(relative, images)]
    parts = [
        Part(part_name(start), start, len(relative[start:start + part_rows]), images=tuple(relative[start:start + part_rows]))
        for start in range(0, len(relative), part_rows)
    ]
    plan = InputPlan(
        kind="images", root=root, parts=parts, rows=len(relative), part_rows=part_rows,
        id_column=id_column or DEFAULT_ID_COLUMN,
        id_from_input=False, fingerprint=_digest([facts, spec.to_dict()]), preprocess=spec.to_dict(),
    )
    _check_output_names(signature, plan.id_column)
    return plan


def _check_output_names(signature: Signature, id_column: str) -> None:
    if id_column in signature.output_names:
        raise InputError(f"the engine has an output named '{id_column}', the output's id column: choose another "
                         "id column name (--id-column)")
    for spec in signature.outputs:
        if not spec.shape:
            raise InputError(f"engine output '{spec.name}' has no batch axis, so it cannot be split into one value per row")
        output_type(spec)


def _inputs_text(signature: Signature) -> str:
    from ..runtime.inputs import describe_inputs

    return describe_inputs(signature)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- the output folder


@dataclass
class RunRecord:
    """``_enginesmith_map.json``: what the parts in an output folder were computed from."""

    input: str
    input_fingerprint: str
    engine: str
    engine_sha256: str
    settings: dict[str, Any]
    parts: int
    rows: int
    complete: bool = False
    format: int = PROGRESS_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()


def read_record(folder: Path) -> RunRecord | None:
    path = folder / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return RunRecord(**data)
    except (ValueError, TypeError) as exc:
        raise MapError(f"'{path}' is not a map progress file ({_first_line(exc)}); remove the folder or add --force") from None


def write_record(folder: Path, record: RunRecord) -> None:
    write_atomic(folder / PROGRESS_FILE, record.to_json())


def prepare_output(output: Path, record: RunRecord, *, force: bool, inputs: tuple[Path, ...] = ()) -> set[str]:
    """Make ``output`` ready for ``record``'s run and return the names of the parts already written.

    A folder this run's input, engine and settings wrote before is resumed; anything else is
    replaced only with ``force`` (a folder is removed only when it is a map output).
    """
    resolved = output.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputExistsError(f"output '{output}' overlaps the input '{source}'; write the output elsewhere")
    if output.is_file() or output.is_symlink():
        if not force:
            raise OutputExistsError(f"refusing to overwrite the existing file '{output}' (--output); give another path, "
                                    "or add --force")
        output.unlink()
    previous = read_record(output) if output.is_dir() else None
    if output.is_dir() and previous is None and any(output.iterdir()):
        raise OutputExistsError(f"'{output}' is a folder that is not an enginesmith map output; give another --output "
                                "(it is never replaced, even with --force)")
    if previous is not None:
        changed = _what_changed(previous, record)
        if changed and not force:
            raise OutputExistsError(f"'{output}' holds results of another run ({changed}); give another --output, or add "
                                    "--force to start over")
        if force:
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(output)
    write_record(output, record)
    names = {part for part in (p.name for p in output.glob("part-*.parquet"))}
    return names


def _what_changed(previous: RunRecord, record: RunRecord) -> str:
    if previous.format != record.format:
        return "written by another enginesmith version"
    if previous.engine_sha256 != record.engine_sha256:
        return f"engine '{previous.engine}' was another file"
    if previous.input_fingerprint != record.input_fingerprint:
        return f"input '{previous.input}' has changed"
    labels = {"part_rows": "rows per part", "id_column": "id column"}
    diffs = [f"{labels.get(key, key)} was {previous.settings.get(key)}, now {record.settings.get(key)}"
             for key in sorted(set(previous.settings) | set(record.settings))
             if previous.settings.get(key) != record.settings.get(key)]
    return ", ".join(diffs)


def remove_temporary_files(output: Path) -> None:
    """Half-written parts of a run that was killed (hidden names: readers of the folder skip them)."""
    for stale in output.glob(".part-*.tmp"):
        stale.unlink(missing_ok=True)
