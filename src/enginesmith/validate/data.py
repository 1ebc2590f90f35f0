"""Reading user-supplied input data (.npy / .npz keyed by input name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import ValidationDataError
from ..signature import Signature


def load_array_file(path: Path):
    """``np.load`` without pickles; a file that is not an array file is named as such.

    numpy's own message for a non-array file advises ``allow_pickle=True``, which would run code
    from the file: it is never passed on.
    """
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = "" if "pickle" in str(exc) else f" ({str(exc).strip().splitlines()[0]})" if str(exc).strip() else ""
        raise ValidationDataError(
            f"'{path.name}' is not a valid .npy or .npz file{reason}: numeric arrays saved with numpy.save or "
            "numpy.savez are expected (object arrays are refused)"
        ) from None


def load_feeds(path: str | Path, signature: Signature) -> dict[str, np.ndarray]:
    """Arrays for every input; pickled object arrays are refused (allow_pickle=False)."""
    path = Path(path)
    if not path.is_file():
        raise ValidationDataError(f"data file not found: '{path}'")
    loaded = load_array_file(path)
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
    """Chunks of ``batch`` items along axis 0 (every input must have the same length).

    0-d inputs (a sample rate, a threshold) are settings of every call, not samples: each chunk gets them whole.
    """
    lengths = {name: value.shape[0] for name, value in feeds.items() if value.ndim}
    if len(set(lengths.values())) > 1:
        raise ValidationDataError(f"inputs in the data file have different lengths along axis 0: {lengths}")
    total = next(iter(lengths.values()), 1)
    for start in range(0, total, batch):
        yield {name: value[start : start + batch] if value.ndim else value for name, value in feeds.items()}


def check_against_signature(feeds: dict[str, np.ndarray], signature: Signature, where: str) -> None:
    """Rank and fixed non-batch dims of every input; the batch axis may be any length."""
    for spec in signature.inputs:
        value = feeds[spec.name]
        if value.ndim != spec.rank:
            raise ValidationDataError(
                f"{where}: input '{spec.name}' has shape {tuple(value.shape)} but the model takes rank {spec.rank} "
                f"{list(spec.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if axis and isinstance(want, int) and want > 0 and want != got:
                raise ValidationDataError(
                    f"{where}: input '{spec.name}' has shape {tuple(value.shape)}, the model needs {want} on axis {axis}"
                )


def cast_to_signature(feeds: dict[str, np.ndarray], signature: Signature, where: str) -> dict[str, np.ndarray]:
    """Every input in the dtype the model takes, by the rules an engine applies to its inputs.

    Casts that keep values (numpy's float64 default to float32, int32 to int64) are applied with an
    ``InputCastWarning``; others (float to int) are refused, as :func:`runtime.inputs.cast_to_spec` does.
    Calibration and validation feed the reference and the quantizer directly, which accept no other dtype.
    """
    from ..errors import InputError
    from ..runtime.inputs import cast_to_spec

    cast = dict(feeds)
    for spec in signature.inputs:
        try:
            cast[spec.name] = cast_to_spec(spec.name, np.asarray(feeds[spec.name]), spec)
        except InputError as exc:
            raise ValidationDataError(f"{where}: {exc}") from None
    return cast


def default_image_spec(signature: Signature):
    """A spec that fits the single image input: its layout, size and channels; pixels scaled to [0, 1] for a
    float input, raw 0-255 for an integer one (TensorFlow detection models take uint8 pixels)."""
    from ..runtime.preprocess import PreprocessSpec

    spec = signature.inputs[0]
    dims = spec.shape
    if spec.rank != 4:
        raise ValidationDataError(f"images need a rank-4 input, but '{spec.name}' has shape {list(dims)}")
    layout = "NCHW" if dims[1] in (1, 3) else "NHWC"
    h, w, c = (dims[2], dims[3], dims[1]) if layout == "NCHW" else (dims[1], dims[2], dims[3])
    if not all(isinstance(d, int) for d in (h, w)):
        raise ValidationDataError("the model's image size is dynamic: give a preprocessing spec with resize/crop")
    scale = 1.0 if np.dtype(spec.dtype).kind in "iu" else 1.0 / 255.0
    return PreprocessSpec(resize=(h, w), layout=layout, color="GRAY" if c == 1 else "RGB", scale=scale, dtype=spec.dtype)


def load_dataset(path: str | Path, signature: Signature, preprocess=None, limit: int | None = None) -> dict[str, np.ndarray]:
    """Samples for calibration or validation: an .npy/.npz file, or a folder of images, .npy or .npz files.

    Images go through ``preprocess`` (a PreprocessSpec; by default one derived from the
    model's input). Every input is checked against the signature.
    """
    from ..runtime.preprocess import IMAGE_SUFFIXES, load_image

    path = Path(path)
    where = f"data '{path}'"
    if path.is_file():
        feeds = load_feeds(path, signature)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        arrays = [p for p in files if p.suffix.lower() in (".npy", ".npz")]
        if limit:
            images, arrays = images[:limit], arrays[:limit]
        if images:
            if len(signature.inputs) != 1:
                raise ValidationDataError(f"{where}: images can feed single-input models only")
            spec = preprocess or default_image_spec(signature)
            feeds = {signature.input_names[0]: np.stack([load_image(p, spec) for p in images])}
        elif arrays:
            parts = [load_feeds(p, signature) for p in arrays]
            feeds = {}
            for spec in signature.inputs:
                values = [part[spec.name] for part in parts]
                # a file holds one sample (rank one less) or a batch
                values = [v[None] if v.ndim == spec.rank - 1 else v for v in values]
                try:
                    feeds[spec.name] = np.concatenate(values)
                except ValueError as exc:
                    raise ValidationDataError(f"{where}: files for input '{spec.name}' differ in shape ({exc})") from None
        else:
            raise ValidationDataError(f"{where} has no images (.png, .jpg, ...) and no .npy/.npz files")
    else:
        raise ValidationDataError(f"data not found: '{path}'")
    check_against_signature(feeds, signature, where)
    feeds = cast_to_signature(feeds, signature, where)
    if limit:
        feeds = {name: value[:limit] for name, value in feeds.items()}
    return feeds


def dataset_from_arrays(arrays: Mapping[str, Any], signature: Signature, where: str = "given arrays") -> dict[str, np.ndarray]:
    """In-memory samples keyed by input name, checked and cast like a data file's."""
    missing = [n for n in signature.input_names if n not in arrays]
    unknown = [n for n in arrays if n not in signature.input_names]
    if missing or unknown:
        raise ValidationDataError(
            f"{where} have arrays {list(arrays)}, the model takes {signature.input_names}"
            + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else "")
        )
    feeds = {name: np.asarray(value) for name, value in arrays.items()}
    check_against_signature(feeds, signature, where)
    return cast_to_signature(feeds, signature, where)


def split_holdout(feeds: dict[str, np.ndarray], fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """A shuffled split into (calibration, held-out) parts; both keep at least one sample (0-d inputs go to both)."""
    total = next((v.shape[0] for v in feeds.values() if v.ndim), 0)
    if total < 2:
        raise ValidationDataError(f"need at least 2 samples to hold some out for validation, got {total}")
    order = np.random.default_rng(seed).permutation(total)
    held = min(max(1, int(round(total * fraction))), total - 1)
    keep, hold = order[held:], order[:held]
    return ({n: v[keep] if v.ndim else v for n, v in feeds.items()}, {n: v[hold] if v.ndim else v for n, v in feeds.items()})
