"""``--data`` on run, validate and bench: FILE or DIR for every input, NAME=FILE for one input."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ValidationDataError
from ..signature import Signature
from ..validate.data import load_array_file, load_dataset

DATA_HELP = (
    "Input data: an .npy/.npz file or a folder of images or .npy/.npz files (every input), "
    "or NAME=FILE.npy for one input; repeatable."
)


def split_data_spec(spec: str) -> tuple[Optional[str], Path]:
    """``NAME=FILE`` -> (NAME, FILE); a bare ``FILE`` (even one with '=' in its name) -> (None, FILE)."""
    name, sep, path_text = spec.partition("=")
    if sep and name and path_text and not Path(spec).exists():
        return name, Path(path_text)
    return None, Path(spec)


def read_named_array(name: str, path: Path) -> np.ndarray:
    """The array for input ``name`` from ``NAME=FILE``: an .npy, or the .npz entry with that name (or its only one)."""
    if path.is_dir():
        raise ValidationDataError(
            f"'{path}' is a folder: NAME=FILE takes one .npy/.npz file; give a folder of images or "
            f".npy/.npz files for every input as --data {path}"
        )
    if not path.is_file():
        raise ValidationDataError(f"data file not found: '{path}' (for input '{name}')")
    loaded = load_array_file(path)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        keys = list(loaded.files)
        if name in keys:
            return loaded[name]
        if len(keys) == 1:
            return loaded[keys[0]]
    raise ValidationDataError(f"'{path.name}' has arrays {keys} and none is named '{name}'")


def read_data_args(specs: Sequence[str], signature: Signature, preprocess=None) -> dict[str, np.ndarray]:
    """Feeds from ``--data`` values, checked against the signature's input names."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        name, path = split_data_spec(spec)
        if name is None:
            feeds.update(load_dataset(path, signature, preprocess))
            continue
        if name not in signature.input_names:
            raise ValidationDataError(
                f"--data {spec}: the engine has no input '{name}' (inputs: {', '.join(signature.input_names)})"
            )
        feeds[name] = read_named_array(name, path)
    return feeds


def data_path(specs: Sequence[str], signature: Optional[Signature], scratch: Path) -> Optional[Path]:
    """One file or folder for the API's ``data=``: a single FILE|DIR as given, NAME=FILE pairs saved as one .npz.

    Without a signature (build: the model is not imported yet) only NAME=FILE pairs combine; the
    API checks the names against the model.
    """
    if not specs:
        return None
    if len(specs) == 1 and split_data_spec(specs[0])[0] is None:
        return split_data_spec(specs[0])[1]
    if signature is not None:
        feeds = read_data_args(specs, signature)
    else:
        named = [split_data_spec(spec) for spec in specs]
        if any(name is None for name, _ in named):
            raise ValidationDataError("--data: give one FILE or DIR for every input, or NAME=FILE for each input")
        feeds = {name: read_named_array(name, path) for name, path in named}
    buffer = io.BytesIO()
    np.savez(buffer, **feeds)
    target = scratch / "data.npz"
    target.write_bytes(buffer.getvalue())
    return target
