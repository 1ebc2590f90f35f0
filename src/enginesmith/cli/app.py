"""The typer app, shared option parsing and the error boundary of the CLI.

Conventions every command follows are in docs/cli-conventions.md: one-line errors,
exit codes 0/1/2, output readable at 80 columns and when piped, ``--json FILE``,
``--force`` before replacing a file, ``--debug`` for tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import EnginesmithError, StageFailedError, stage_failure_text

try:  # typer 0.2x vendors click; older releases depend on it
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, UsageError

app = typer.Typer(
    name="enginesmith",
    help="Turn a trained network into a fast, validated, platform-specific engine, and run it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help and errors: no boxes, readable at 80 columns and in a pipe.
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)

DEBUG_ENV = "ENGINESMITH_DEBUG"


@dataclass
class CliState:
    """What the global options asked for; reset by every call of :func:`main`."""

    debug: bool = False
    verbose: bool = False


STATE = CliState()


@app.callback()
def global_options(
    debug: bool = typer.Option(False, "--debug", help=f"Show the traceback of unexpected errors (also {DEBUG_ENV}=1)."),
    verbose: bool = typer.Option(False, "--verbose", help="Let ONNX Runtime and TensorFlow print their own logs."),
) -> None:
    """Turn a trained network into a fast, validated, platform-specific engine, and run it.

    Conventions for every command: docs/cli-conventions.md.
    """
    STATE.debug = STATE.debug or debug
    STATE.verbose = verbose
    set_library_verbosity(verbose)


# Python loggers of the converters enginesmith drives; their warnings are for their developers.
LIBRARY_LOGGERS = ("tf2onnx", "tensorflow", "absl", "onnxscript", "torch.onnx", "onnx2torch")
GLOBAL_FLAGS = ("--debug", "--verbose")


def set_library_verbosity(verbose: bool) -> None:
    """Libraries' own logs (ONNX Runtime warnings, TensorFlow's C++ log, converters' loggers) only with --verbose."""
    from ..backends.onnxruntime import set_log_verbosity

    set_log_verbosity(verbose)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def hoist_global_flags(argv: list[str]) -> list[str]:
    """``enginesmith build m.onnx --debug`` works like ``enginesmith --debug build m.onnx``."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


def print_error(message: str) -> None:
    err_console.print("[bold red]error:[/] " + escape(message), highlight=False, soft_wrap=True)


def print_indented(line: str, indent: int = 2) -> None:
    """One line of a log, wrapped lines indented like the first, no markup read from it."""
    prefix = " " * indent
    wrapped = textwrap.fill(line, width=max(console.width, 40), initial_indent=prefix, subsequent_indent=prefix,
                            break_long_words=False, break_on_hyphens=False)
    console.print(wrapped, markup=False, highlight=False, soft_wrap=True)


def print_note(message: str) -> None:
    err_console.print("[yellow]note:[/] " + escape(message), highlight=False, soft_wrap=True)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _command_name(argv: list[str]) -> str:
    """The subcommand in ``argv`` (for error hints), or '' when there is none."""
    commands = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    groups = {g.name: g.typer_instance for g in app.registered_groups if g.name}
    found = next((a for a in argv if a in commands or a in groups), "")
    if found in groups:  # 'export triton': the group's command too
        sub = {c.name or (c.callback.__name__ if c.callback else "") for c in groups[found].registered_commands}
        rest = argv[argv.index(found) + 1:]
        found = " ".join([found] + [next((a for a in rest if a in sub), "")]).strip()
    return found


def usage_error_line(exc: UsageError, argv: list[str]) -> str:
    """click's usage error as one line with where to look: "... (see 'enginesmith build --help')"."""
    command = _command_name(argv)
    where = f"enginesmith {command} --help" if command else "enginesmith --help"
    return f"{_first_line(exc.format_message())} (see '{where}')"


def unexpected_error_line(exc: BaseException, argv: list[str]) -> str:
    """A bug or a dependency's failure: what was running, the underlying message, where the traceback is."""
    command = _command_name(argv)
    doing = f"'enginesmith {command}' failed" if command else "enginesmith failed"
    detail = _first_line(str(exc))
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"{doing}: {what} (run with --debug, or {DEBUG_ENV}=1, for the traceback)"


@contextmanager
def warnings_as_notes() -> Iterator[None]:
    """Python warnings become one-line notes on stderr, each text once, without source paths."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' API
        text = _first_line(str(message))
        if text and text not in seen:
            seen.add(text)
            print_note(text)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure becomes one line on stderr and a non-zero exit."""
    argv = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    STATE.debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    STATE.verbose = False
    with warnings_as_notes():
        try:
            result = app(args=argv, prog_name="enginesmith", standalone_mode=False)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # click 8.2+: bare 'enginesmith' shows the help
                typer.echo(exc.format_message())
                return 0
            print_error(usage_error_line(exc, argv))
            return 2
        except ClickException as exc:
            print_error(_first_line(exc.format_message()))
            return exc.exit_code
        except StageFailedError as exc:  # a bug or a library's failure inside a build stage
            if STATE.debug:
                traceback.print_exc()
            print_error(f"{exc} (run with --debug, or {DEBUG_ENV}=1, for the traceback)")
            return 1
        except EnginesmithError as exc:
            if STATE.debug:
                traceback.print_exc()
            print_error(stage_failure_text(exc.stage, str(exc)) if exc.stage else str(exc))
            return 2
        except (KeyboardInterrupt, typer.Abort):
            err_console.print("interrupted")
            return 130
        except Exception as exc:  # noqa: BLE001 - the CLI boundary: no traceback reaches a user
            if STATE.debug:
                traceback.print_exc()
            print_error(unexpected_error_line(exc, argv))
            return 1
    return result if isinstance(result, int) else 0


# --------------------------------------------------------------------------- option values


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
            hint = " (data files go to --data)" if "=" in spec else ""
            raise typer.BadParameter(f"'{spec}' is not NAME:SHAPE such as image:1x3x224x224{hint}", param_hint="--input")
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
            raise typer.BadParameter(f"'{spec}' is not NAME:AXES such as image:0", param_hint="--dynamic")
        axes.setdefault(name, []).extend(values)
    return axes


def split_names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


# --------------------------------------------------------------------------- output


def table(title: str | None = None, caption: str | None = None) -> Table:
    """A rich table for any terminal width: long cells wrap (names fold) instead of being cut with an ellipsis."""
    return Table(title=title, caption=caption, title_justify="left")


def add_columns(tbl: Table, *names: str, right: tuple[str, ...] = ()) -> None:
    """Columns that wrap at word boundaries and fold unbreakable names, never cut them.

    ``right`` names numeric columns: right-aligned and kept on one line, so that on a narrow
    terminal the text columns (names, messages) wrap first.
    """
    for name in names:
        numeric = name in right
        tbl.add_column(name, justify="right" if numeric else "left", overflow="fold", no_wrap=numeric)


def print_json(data: str | bytes, destination: Optional[Path]) -> None:
    """``--json -`` prints to stdout; ``--json FILE`` writes FILE (atomically; checked by check_output first)."""
    from ..files import write_atomic

    if destination is None:
        return
    text = data.decode() if isinstance(data, bytes) else data
    if str(destination) == "-":
        typer.echo(text)
        return
    write_atomic(destination, text.encode())
    console.print(f"wrote {escape(str(destination))}", highlight=False)


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
