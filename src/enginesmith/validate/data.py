"""Reading user-supplied input data (.npy / .npz keyed by input name)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ValidationDataError
from ..signature import Signature


def load_feeds(path: str | Path, signature: Signature) -> dict[str, np.ndarray]:
    """Arrays for every input; pickled object arrays are refused (allow_pickle=False)."""
    path = Path(path)
    if not path.is_file():
        raise ValidationDataError(f"data file not found: '{path}'")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValidationDataError(f"cannot read '{path.name}' as .npy/.npz ({exc}); object arrays are not accepted") from None
    if isinstance(loaded, np.ndarray):
        if len(signature.inputs) != 1:
            raise ValidationDataError(
                f"'{path.name}' holds one array but the model has {len(signature.inputs)} inputs "
                f"({', '.join(signature.input_names)}); save an .npz keyed by input name"
            )
        return {signature.input_names[0]: loaded}
    with loaded:
        keys = list(loaded.files)
        unknown = [k for k in keys if k not in signature.input_names]
        missing = [n for n in signature.input_names if n not in keys]
        if unknown or missing:
            raise ValidationDataError(
                f"'{path.name}' has arrays {keys}, the model takes {signature.input_names}"
                + (f" (unknown: {unknown})" if unknown else "")
                + (f" (missing: {missing})" if missing else "")
            )
        return {k: loaded[k] for k in keys}


def split_batches(feeds: dict[str, np.ndarray], batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of ``batch`` items along axis 0 (every input must have the same length)."""
    lengths = {name: value.shape[0] if value.ndim else 1 for name, value in feeds.items()}
    if len(set(lengths.values())) != 1:
        raise ValidationDataError(f"inputs in the data file have different lengths along axis 0: {lengths}")
    total = next(iter(lengths.values()))
    for start in range(0, total, batch):
        yield {name: value[start : start + batch] for name, value in feeds.items()}
