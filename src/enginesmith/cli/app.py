"""The typer app, shared option parsing and the error boundary of the CLI."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import EnginesmithError, ValidationDataError

app = typer.Typer(
    name="enginesmith",
    help="Turn a trained network into a fast, validated, platform-specific engine, and run it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and a non-zero exit."""
    try:
        app(args=argv, prog_name="enginesmith")
    except SystemExit as exc:  # typer/click exit with the command's status
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except EnginesmithError as exc:
        err_console.print("[bold red]error:[/] " + escape(str(exc)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def parse_batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of batch sizes, e.g. 1,8") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter("batch sizes must be positive integers, e.g. 1,8")
    return values


def parse_shape_specs(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """``name:1x3x224x224`` -> {"name": (1, 3, 224, 224)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise typer.BadParameter(f"'{spec}' is not NAME:DIMS such as image:1x3x224x224")
        shapes[name] = shape
    return shapes


def parse_axis_specs(specs: list[str]) -> dict[str, list[int]]:
    """``name:0`` or ``name:0,2`` -> {"name": [0, 2]}."""
    axes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, text = spec.rpartition(":")
        try:
            values = [int(a) for a in text.split(",")]
        except ValueError:
            values = []
        if not sep or not name or not values:
            raise typer.BadParameter(f"'{spec}' is not NAME:AXES such as image:0")
        axes.setdefault(name, []).extend(values)
    return axes


def split_names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def read_input_args(specs: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    """``--input name=file.npy`` (or a bare .npy for single-input engines, or an .npz keyed by name)."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        if not sep:
            name, path_text = "", spec
        path = Path(path_text)
        if not path.is_file():
            raise ValidationDataError(f"input file not found: '{path}'")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValidationDataError(f"cannot read '{path.name}' as .npy/.npz ({exc})") from None
        if isinstance(loaded, np.ndarray):
            if not name:
                if len(input_names) != 1:
                    raise ValidationDataError(
                        f"'{path.name}' has no input name; use --input NAME={path.name} (inputs: {', '.join(input_names)})"
                    )
                name = input_names[0]
            feeds[name] = loaded
        else:
            with loaded:
                feeds.update({key: loaded[key] for key in loaded.files})
    return feeds


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """A callback ``(stage, done, total)`` that drives a rich progress bar on stderr."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as progress:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update
