"""The one rule for files a command writes: never replace what the user may still need without --force."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import typer

from ..bundle import looks_like_bundle
from ..errors import OutputExistsError

FORCE_HELP = "Replace an existing output file (other than an engine being rebuilt) or the command's own input."


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def check_output(
    target: Optional[Path],
    *,
    inputs: Sequence[Optional[Path]] = (),
    force: bool = False,
    writes_engine: bool = False,
    default_name: bool = False,
    flag: str = "--output",
) -> Optional[Path]:
    """``target`` if the command may write it, else an :class:`OutputExistsError` naming the fix.

    A command that writes engines may replace an engine bundle (``build model.engine`` rebuilds in
    place), and a command may replace its own product under the name it chose itself
    (``default_name``, e.g. ``MODEL.surgeon.onnx``); any other existing file, and any of the
    command's own inputs, is replaced only with ``--force``. ``None`` (nothing to write) passes, and
    so does ``--json -`` (standard output).
    """
    if target is None or (str(target) == "-" and flag == "--json"):
        return target
    if str(target).startswith("-"):
        raise typer.BadParameter(f"'{target}' is not a file name (did an option lose its value?)", param_hint=flag)
    if target.is_dir():
        raise OutputExistsError(f"{flag} '{target}' is a folder; give a file name")
    if not target.exists() or force:
        return target
    is_input = any(p is not None and _same_file(target, p) for p in inputs)
    if (writes_engine and looks_like_bundle(target)) or (default_name and not is_input):
        return target
    if is_input:
        what = "the input"
    elif looks_like_bundle(target):
        what = "the engine"
    else:
        what = "the existing file"
    raise OutputExistsError(f"refusing to overwrite {what} '{target}' ({flag}); give another path, or add --force")
