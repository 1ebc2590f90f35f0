"""Calibration and held-out data for reduced-precision builds (int8, ``best``).

What ``build`` calibrates on, what it verifies on, and what it says about both: how many samples,
what one changed answer weighs, and warnings where the counts are too small to trust.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .backends import BuildOptions, Calibration
from .errors import ValidationDataError
from .runtime.preprocess import PreprocessSpec
from .signature import Signature, random_inputs
from .validate import AccuracyBudget, one_change
from .validate.data import dataset_from_arrays, load_dataset, split_batches, split_holdout


@dataclass
class PrecisionData:
    """What reduced-precision builds need: calibration inputs and held-out validation batches."""

    calibration: Calibration | None
    holdout: list[dict[str, np.ndarray]] | None
    holdout_label: str
    check: dict[str, Any]
    # Why an int8 engine built from this data cannot be verified on real inputs (no held-out part).
    unverified_reason: str = "no real inputs (rebuilt from a calibration cache)"


# Below these counts a build still runs but says what the numbers are worth. Calibration: TensorRT's
# developer guide finds about 500 images enough for ImageNet classifiers; ranges from fewer than 32 are
# set by a handful of extremes and miss the tails real inputs have. Hold-out: below 20 samples one changed
# answer weighs more than 5%, half the slack of the default int8 check (90% agreement), so pass or
# fail turns on one or two samples.
MIN_CALIBRATION_SAMPLES = 32
MIN_HOLDOUT_SAMPLES = 20


class PrecisionDataWarning(UserWarning):
    """Calibration or verification data that makes the result less trustworthy (too few samples, unused data)."""


class RandomCalibrationWarning(PrecisionDataWarning):
    """An int8 engine was calibrated on random inputs."""


def _batches(feeds: Mapping[str, np.ndarray], signature: Signature, size: int = 8) -> list[dict[str, np.ndarray]]:
    return list(split_batches(dict(feeds), signature.fixed_batch() or size))


def _count(feeds: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0]) if feeds else 0


def _feeds_from(
    data: str | Path | Mapping[str, np.ndarray], signature: Signature, spec: PreprocessSpec | None
) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(data, Mapping):
        return dataset_from_arrays(data, signature), "given arrays"
    return load_dataset(data, signature, spec), f"'{Path(data).name}'"


def check_holdout(holdout: float) -> None:
    """The hold-out share must leave something to calibrate on."""
    if not 0 <= holdout < 1:
        raise ValidationDataError(
            f"--holdout {holdout:g} is outside [0, 1): it is the share of the calibration data kept aside to verify "
            "the engine on (default 0.2; 0 keeps none aside), and at least one sample must remain to calibrate on"
        )


def prepare_precision_data(
    signature: Signature,
    options: BuildOptions,
    data: str | Path | Mapping[str, np.ndarray] | None,
    random_data: bool,
    spec: PreprocessSpec | None,
    holdout: float,
    cache: bytes | None,
    *,
    budget: AccuracyBudget | None = None,
    best_tries_int8: bool = True,
    stored_int8: bool = False,
) -> PrecisionData:
    """Calibration batches (int8, best) and the held-out part used to validate every precision.

    ``holdout`` is the share kept aside, in [0, 1). For fp32/fp16 builds given data, nothing is
    calibrated: all of it verifies the engine. Small sets, and agreement budgets finer than the
    hold-out can resolve, are warned about (:class:`PrecisionDataWarning`) and listed in
    ``check["warnings"]``. ``stored_int8`` says the bundle being rebuilt carries a backend's own
    int8 model or ranges (``Backend.int8_cache_names``), which stand in for data like ``cache``.
    """
    check_holdout(holdout)
    needs_calibration = options.precision == "int8" or (options.precision == "best" and best_tries_int8)
    if data is None and not random_data:
        stored = cache is not None or stored_int8
        if needs_calibration and not stored:
            if options.precision == "best":
                raise ValidationDataError(
                    "--precision best also tries int8, which needs calibration data: give --calib DATA (its held-out "
                    "part also decides between the precisions), or --calib-random for a smoke test; "
                    "or build one precision with --precision fp32 / fp16"
                )
            raise ValidationDataError(
                "int8 needs calibration data: give --calib DATA (.npy/.npz keyed by input name, a folder of images "
                "or .npy files), or --calib-random for a smoke test on random data"
            )
        calibration = Calibration([], options.calibration_method, cache) if stored and needs_calibration else None
        check = {"cache_reused": True, "method": options.calibration_method} if calibration else {}
        return PrecisionData(calibration, None, "", check)
    if not needs_calibration:
        return _verification_only_data(signature, options, data, spec)
    if data is not None:
        feeds, label = _feeds_from(data, signature, spec)
        warning = None
    else:
        feeds = random_inputs(signature.inputs, batch=64, seed=1234)
        label = "RANDOM inputs"
        warning = "calibrated on random data: int8 ranges do not reflect real inputs, so accuracy on real data is unknown"
        warnings.warn(warning, RandomCalibrationWarning, stacklevel=3)
    if holdout == 0 and options.precision == "best":
        raise ValidationDataError("--precision best decides between the precisions on held-out data: --holdout must be above 0")
    calib_feeds, held = split_holdout(feeds, holdout) if holdout > 0 else (feeds, {})
    samples, held_samples = _count(calib_feeds), _count(held)
    check: dict[str, Any] = {
        "data": label,
        "samples": samples,
        "holdout_samples": held_samples,
        "method": options.calibration_method,
        "random": data is None,
        "cache_reused": cache is not None,
    }
    if held_samples:
        check["resolution"] = one_change(held_samples)
    notes = []
    if data is not None and cache is None and samples < MIN_CALIBRATION_SAMPLES:
        notes.append(
            f"calibrating on {samples} samples: ranges from fewer than {MIN_CALIBRATION_SAMPLES} are set by a few "
            "extremes and miss what real inputs reach; give a few hundred"
        )
    notes += _holdout_warnings(held_samples, budget)
    for note in notes:
        warnings.warn(note, PrecisionDataWarning, stacklevel=3)
    if warning:
        check["warning"] = warning
    if warning or notes:
        check["warnings"] = ([warning] if warning else []) + notes
    calibration = Calibration(_batches(calib_feeds, signature), options.calibration_method, cache)
    if not held_samples:
        return PrecisionData(calibration, None, "", check, unverified_reason="--holdout 0 keeps no data aside to verify on")
    return PrecisionData(calibration, _batches(held, signature), f"held-out part of {label}", check)


def _verification_only_data(
    signature: Signature, options: BuildOptions, data: str | Path | Mapping[str, np.ndarray] | None,
    spec: PreprocessSpec | None,
) -> PrecisionData:
    """fp32/fp16 builds given --calib: nothing to calibrate, so all of the data verifies the engine."""
    if data is None:
        note = f"--calib-random is unused: {options.precision} needs no calibration"
        warnings.warn(note, PrecisionDataWarning, stacklevel=4)
        return PrecisionData(None, None, "", {"warnings": [note]})
    feeds, label = _feeds_from(data, signature, spec)
    count = _count(feeds)
    check: dict[str, Any] = {
        "data": label,
        "samples": 0,
        "holdout_samples": count,
        "used_for": "verification",
        "note": f"{options.precision} needs no calibration: all {count} samples of {label} verify the engine instead",
        "resolution": one_change(count),
    }
    notes = _holdout_warnings(count, None)
    for note in notes:
        warnings.warn(note, PrecisionDataWarning, stacklevel=4)
    if notes:
        check["warnings"] = notes
    return PrecisionData(None, _batches(feeds, signature), f"{label} (given with --calib)", check)


def _holdout_warnings(held: int, budget: AccuracyBudget | None) -> list[str]:
    """What a hold-out of this size cannot tell."""
    notes = []
    if 0 < held < MIN_HOLDOUT_SAMPLES:
        notes.append(
            f"verifying on {held} held-out samples, where one changed answer is {100.0 / held:.1f}%: only gross "
            "errors show; "
            f"keep at least {MIN_HOLDOUT_SAMPLES} aside (more --calib data or a larger --holdout)"
        )
    if held and budget is not None and budget.metric == "agreement" and budget.value < 1:
        allowed = 1.0 - budget.value
        if 1.0 / held > allowed + 1e-12:
            notes.append(
                f"the budget '{budget}' is finer than the hold-out resolves ({one_change(held)}): "
                f"any change breaks it; hold out at least {int(np.ceil(1.0 / allowed - 1e-9))} samples"
            )
    return notes
