"""OpenVINO int8: NNCF's post-training quantization, and the quantized model kept for rebuilds.

The model NNCF quantized is stored in the bundle's cache entry ``openvino_int8_model.npz`` as
OpenVINO IR (xml and bin, in an .npz with its record) rather than as the calibration samples: the
IR (weights already int8, FakeQuantize nodes holding every range) compiles on any CPU and any
OpenVINO version that reads IR v11, needs neither NNCF nor data there, and gives the same
engine the original build gave and verified. Samples would be cut to a bounded size and
quantized again by whatever NNCF is installed there, so the rebuilt engine's ranges, and its
accuracy, could differ. A rebuild that asks for other inputs or quantization settings
quantizes again from ``--calib``.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BuildError, MissingDependencyError, ValidationDataError
from ..signature import Signature
from .base import Calibration
from .openvino import INSTALL_HINT, INT8_MODEL_CACHE, OpenVinoSettings, _first_line, _last_line, _ov, core, core_version

# Calibration methods -> NNCF's activation range estimators (None: NNCF's defaults, min/max based).
NNCF_RANGE_ESTIMATORS = {"minmax": None, "percentile": "MEAN_QUANTILE"}


def quantize_int8(ov_model: Any, calibration: Calibration | None, settings: OpenVinoSettings,
                  log: list[str]) -> Any:
    """NNCF post-training quantization over the calibration batches (FakeQuantize nodes, int8 kernels)."""
    if calibration is None or not calibration.batches:
        raise ValidationDataError(
            "int8 with OpenVINO needs calibration data: give --calib DATA (a calibration cache from another "
            "backend cannot be reused: NNCF calibrates on the data itself)"
        )
    if calibration.method not in NNCF_RANGE_ESTIMATORS:
        raise BuildError(f"calibration method '{calibration.method}' is not offered by NNCF: use "
                         f"{' or '.join(NNCF_RANGE_ESTIMATORS)} with the OpenVINO backend")
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    except ImportError:
        raise MissingDependencyError(f"int8 with OpenVINO needs NNCF: {INSTALL_HINT}") from None
    advanced = None
    estimator = NNCF_RANGE_ESTIMATORS[calibration.method]
    if estimator is not None:
        advanced = AdvancedQuantizationParameters(
            activations_range_estimator_params=getattr(RangeEstimatorParametersSet, estimator))
    samples = sum(next(iter(b.values())).shape[0] for b in calibration.batches)
    # NNCF counts subset_size in dataset items (our batches), not samples.
    batch = max(1, samples // len(calibration.batches))
    items = max(1, min(len(calibration.batches), -(-settings.subset_size // batch)))
    preset = nncf.QuantizationPreset.MIXED if settings.int8_preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        quantized = nncf.quantize(ov_model, nncf.Dataset(calibration.batches), preset=preset, subset_size=items,
                                  advanced_parameters=advanced)
    except Exception as exc:  # NNCF raises many types; a failed quantization fails the build
        raise BuildError(f"int8 quantization (NNCF {nncf.__version__}) failed: {_last_line(exc)}") from None
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    log.append(f"int8: NNCF {nncf.__version__} post-training quantization, preset {settings.int8_preset}, "
               f"{calibration.method} ranges{' (NNCF defaults)' if estimator is None else ' (' + estimator + ')'}, "
               f"{min(samples, items * batch)} of {samples} calibration samples; {fake_quantize} FakeQuantize nodes")
    if fake_quantize == 0:
        raise BuildError("int8: NNCF found nothing to quantize in this model (no convolutions or matrix "
                         "multiplications): build it fp32")
    return quantized


# --------------------------------------------------------------------------- the quantized model, kept


def int8_record(signature: Signature, method: str, settings: OpenVinoSettings) -> dict[str, Any]:
    """What a stored int8 model was quantized for: reused only where a rebuild asks for the same."""
    return {"signature": signature.to_dict(), "calibration_method": method,
            "int8_preset": settings.int8_preset, "subset_size": settings.subset_size}


def pack_int8_model(ov_model: Any, record: Mapping[str, Any]) -> bytes:
    """The quantized model as one cache entry: IR xml and bin, and its record, in an .npz (no pickles)."""
    with tempfile.TemporaryDirectory(prefix="enginesmith-ov-") as tmp:
        xml = Path(tmp) / "int8.xml"
        # fp16 compression would change the fp32 weights of the layers NNCF left unquantized.
        _ov().save_model(ov_model, str(xml), compress_to_fp16=False)
        parts = {"xml": xml.read_bytes(), "bin": xml.with_suffix(".bin").read_bytes(),
                 "record": json.dumps(record, sort_keys=True).encode()}
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.frombuffer(data, np.uint8) for name, data in parts.items()})
    return buffer.getvalue()


def unpack_int8_model(data: bytes) -> tuple[Any, dict[str, Any]]:
    """(openvino.Model, record) from :func:`pack_int8_model`'s bytes; BuildError when they do not read."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as parts:
            xml, weights, record = (parts[name] for name in ("xml", "bin", "record"))
        model = core().read_model(xml.tobytes(), _ov().Tensor(np.ascontiguousarray(weights)))
        return model, json.loads(record.tobytes())
    except Exception as exc:  # noqa: BLE001 - a damaged entry, or IR this OpenVINO cannot read
        raise BuildError(f"the bundle's int8 model ({INT8_MODEL_CACHE}) cannot be read by OpenVINO "
                         f"{core_version()} ({_first_line(exc)}): rebuild with --calib DATA to quantize again") from None


def stored_int8_model(caches: Mapping[str, bytes], record: Mapping[str, Any], calibration: Calibration | None,
                      log: list[str]) -> Any | None:
    """The int8 model a rebuilt bundle carries, when it was quantized for what this build asks.

    None when there is none, or it differs and calibration data is given (then NNCF runs again);
    differing with no data to quantize anew is an error that says what differs.
    """
    if INT8_MODEL_CACHE not in caches:
        return None
    model, stored = unpack_int8_model(caches[INT8_MODEL_CACHE])
    differs = sorted(key for key in record if stored.get(key) != record[key])
    if not differs:
        log.append(f"int8: the bundle's quantized model reused (NNCF not run; {stored['calibration_method']} "
                   f"ranges, preset {stored['int8_preset']})")
        return model
    if calibration is not None and calibration.batches:
        log.append(f"int8: the bundle's quantized model was made for another {', '.join(differs)}: quantizing again")
        return None
    raise ValidationDataError(
        f"the bundle's int8 model was quantized for another {', '.join(differs)} than this build asks for: "
        "give --calib DATA to quantize again, or rebuild with the options it was built with"
    )
