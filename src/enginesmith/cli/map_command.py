"""map: score a Parquet dataset or an image folder with an engine, on Ray Data (one engine per worker)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import MissingDependencyError
from .app import STATE, add_columns, app, console, print_json, print_note, progress_bar, table
from .output_paths import check_output


@app.command(name="map", short_help="Score a Parquet dataset or image folder on Ray Data.")
def map_command(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="The engine bundle."),
    input_path: Path = typer.Option(..., "--input", "--data", metavar="DIR|FILE.parquet", help="A Parquet file, a folder of Parquet files (columns named after the engine's inputs), or a folder of images."),
    output: Path = typer.Option(..., "-o", "--output", metavar="OUT.parquet", help="The output: a folder of Parquet part files (id column + one column per engine output)."),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDR", help="Ray cluster to run on (ray://HOST:10001, HOST:6379, auto); default: a local Ray instance."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, metavar="N", help="Engines running at once (default: one per GPU for GPU engines, else one per --cpus-per-worker CPUs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, metavar="N", help="Rows per engine call (default: the engine's batch, else 256)."),
    cpus_per_worker: Optional[float] = typer.Option(None, "--cpus-per-worker", min=0.01, metavar="N", help="CPUs each worker reserves; a CPU engine runs that many intra-op threads (default 1)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", min=0, metavar="N", help="GPUs each worker reserves (default: 1 for GPU engines, else 0)."),
    part_rows: Optional[int] = typer.Option(None, "--part-rows", min=1, metavar="N", help="Most rows per output part file, the unit of retry and resume (default: the input in about 64 parts of 1-64 MB)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", metavar="NAME", help="The input's row id column (default: 'id' when present, else the row number; images: their relative path)."),
    preprocess: Optional[str] = typer.Option(None, metavar="SPEC|FILE", help="Image preprocessing (default: the engine's own, else resize to its input): 'resize=256;crop=224;...' or a .toml file."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the run's summary as JSON ('-': print it)."),
    force: bool = typer.Option(False, "--force", help="Start over: replace an existing output (a map output folder, or a file)."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Load engines whose payload runs code (the torch backend's compiler cache); only from builders you trust."),
) -> None:
    """Score every row of a dataset with ENGINE on a Ray cluster (Ray Data, one engine per worker)
    into OUT.parquet, a folder of Parquet part files that pyarrow and pandas read as one table.

    Rows keep their ids. Each part is written whole or not at all, so a run that was stopped
    resumes where it was when started again with the same arguments (finished parts are not
    recomputed); a worker that dies is restarted and its part redone. Docs: docs/scaling-out.md.
    """
    try:
        from ..batch import map_dataset
    except ImportError as exc:  # pyarrow, which the ray extra brings
        raise MissingDependencyError(f"enginesmith map needs {exc.name or 'pyarrow'}: pip install 'enginesmith[ray]'") from None

    check_output(json_path, flag="--json", force=force)
    if not STATE.verbose:
        # Ray's C++ core logs a warning about Ray Data's restartable actors on every run; --verbose shows it
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    with progress_bar() as update:
        report = map_dataset(
            engine_path, input_path, output, address=address, workers=workers, batch_size=batch_size,
            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, part_rows=part_rows, id_column=id_column,
            preprocess=preprocess, trust_code=trust_code, force=force, progress=update,
        )
    for note in report.notes:
        print_note(note)
    if json_path is not None and str(json_path) == "-":
        print_json(json.dumps(report.to_dict(), indent=2), json_path)
        return
    _print_report(report)
    print_json(json.dumps(report.to_dict(), indent=2), json_path)


def _print_report(report) -> None:
    tbl = table()
    add_columns(tbl, "rows", "parts computed", "parts resumed", "workers", "seconds", "rows/s",
                right=("rows", "parts computed", "parts resumed", "workers", "seconds", "rows/s"))
    tbl.add_row(str(report.rows), str(report.parts_computed), str(report.parts_skipped), _workers_text(report),
                f"{report.seconds:.1f}", f"{report.rows_per_second:.0f}" if report.rows_computed else "-")
    console.print(tbl)
    files = f"{report.parts} part file{'s' if report.parts != 1 else ''}"
    console.print(escape(f"wrote {report.output} ({files}; ids in column '{report.id_column}')"),
                  highlight=False, soft_wrap=True)


def _workers_text(report) -> str:
    if not report.parts_computed:
        return "-"
    device = f"{report.gpus_per_worker:g} GPU" if report.gpus_per_worker else f"{report.cpus_per_worker:g} CPU"
    return f"{report.workers} x {device}"
