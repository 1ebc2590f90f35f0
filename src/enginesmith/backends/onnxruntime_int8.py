"""int8 for ONNX Runtime: static QDQ quantization calibrated on the user's data (``onnxruntime`` backend).

Per-channel int8 weights, uint8 activations on x86 (int8 on Arm), the nodes after the last
weighted layer kept in float (``float_tail``), and a calibration cache that lets a rebuild reuse
the same activation ranges without running calibration again. The TensorRT backend's explicit
quantization reads its batches through the same ``CalibrationReader``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from ..errors import BuildError, ValidationDataError
from ..host import cpu_flags
from .base import Calibration

CALIBRATION_CACHE = "calibration_cache.json"


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over enginesmith's calibration batches, one at a time."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - used by strided calibration only
        pass


def _activation_type(quantization):
    """uint8 activations on x86 (the u8s8 kernels), int8 on Arm, per ONNX Runtime's guidance."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return quantization.QuantType.QInt8
    return quantization.QuantType.QUInt8


def equal_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The calibration samples re-cut into batches of one size.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack each tensor's values
    from all batches with np.asarray, which fails when the last batch is shorter
    ("inhomogeneous shape"); MinMax does not care, so its batches are left alone.
    """
    # 0-d inputs (a sample rate) are settings every batch carries whole, not samples to re-cut.
    merged = {name: np.concatenate([b[name] for b in batches]) if batches[0][name].ndim else batches[0][name]
              for name in batches[0]}
    total = next((v.shape[0] for v in merged.values() if v.ndim), 1)
    first = next((v.shape[0] for v in batches[0].values() if v.ndim), 1)
    size = max(d for d in range(1, min(first, total) + 1) if total % d == 0)
    return [{name: value[i : i + size] if value.ndim else value for name, value in merged.items()}
            for i in range(0, total, size)]


WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def float_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the last weighted op and the graph outputs, which int8 leaves in float.

    They cost little, and one int8 scale per tensor cannot hold what such tails join: a YOLO head
    concatenates boxes in pixels (0-640) with class scores (0-1), so a quantized concat rounds every
    score below one step (640 / 255) to zero. Unnamed nodes are named here so they can be left out.
    """
    producers = {}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"enginesmith_node_{index}"
        for output in node.output:
            producers[output] = node
    tail, seen, pending = [], set(), [o.name for o in model.graph.output]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in seen or node.op_type in WEIGHTED_OPS:
            continue
        seen.add(node.name)
        tail.append(node.name)
        if node.op_type not in ("Shape", "Size"):  # they read no values: what feeds them is not the tail
            pending.extend(node.input)
    return tail


# ONNX Runtime's symbolic shape inference saves the model it could not finish as this file (and its
# weights beside it, in files named by uuids) in the current directory, for debugging.
SHAPE_INFERENCE_LEFTOVER = "sym_shape_infer_temp.onnx"


@contextmanager
def no_shape_inference_leftovers() -> Iterator[None]:
    """Remove the debugging copy ONNX Runtime leaves in the user's working directory (only one it wrote now)."""
    existed = os.path.exists(SHAPE_INFERENCE_LEFTOVER)
    try:
        yield
    finally:
        if not existed and os.path.exists(SHAPE_INFERENCE_LEFTOVER):
            try:
                leftover = onnx.load(SHAPE_INFERENCE_LEFTOVER, load_external_data=False)
                locations = {entry.value for tensor in onnx.external_data_helper._get_all_tensors(leftover)
                             for entry in tensor.external_data if entry.key == "location"}
            except Exception:  # noqa: BLE001 - an unreadable leftover is still ours to remove
                locations = set()
            for name in [SHAPE_INFERENCE_LEFTOVER, *locations]:
                if os.path.basename(name) == name:  # only plain names in this directory
                    with suppress(OSError):
                        os.remove(name)


def quantize_int8(model: onnx.ModelProto, calibration: Calibration, tmp: str, log: list[str]) -> tuple[onnx.ModelProto, bytes]:
    """Static QDQ quantization, per-channel weights; returns the model and the calibration cache.

    The cache holds the activation ranges; given one (from an earlier build of the same
    model), calibration inference is skipped and the ranges are reused exactly.
    """
    from onnxruntime import InferenceSession, quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = os.path.join(tmp, "prepared.onnx")
    # ONNX Runtime logs a traceback of its own when its optimizer rejects the pre-processed model.
    quiet = logging.getLogger("onnxruntime.quantization.shape_inference")
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        with no_shape_inference_leftovers():
            quant_pre_process(model, prepared)
        # Symbolic shape inference can record shapes ONNX Runtime then refuses to load (the Concat of a
        # converted TensorFlow NMS); calibration would fail on them, the model itself quantizes fine.
        InferenceSession(prepared, providers=["CPUExecutionProvider"])
    except Exception as exc:  # symbolic shape inference fails on some graphs; quantize without it
        log.append(f"quantization pre-processing skipped: {str(exc).splitlines()[0][:160]}")
        onnx.save(model, prepared)
    finally:
        quiet.disabled = was_disabled
    prepared_model = onnx.load(prepared)
    kept_float = float_tail(prepared_model)
    if kept_float:
        onnx.save(prepared_model, prepared)
        log.append(f"int8: {len(kept_float)} nodes after the last weighted layer stay in float")
    cache_path = os.path.join(tmp, CALIBRATION_CACHE)
    if calibration.cache is not None:
        Path(cache_path).write_bytes(calibration.cache)
        log.append("int8: calibration skipped, ranges reused from the calibration cache")
    elif not calibration.batches:
        raise ValidationDataError("int8 needs calibration data: give --calib DATA (or --calib-random for a smoke test)")
    else:
        samples = sum(next(iter(b.values())).shape[0] for b in calibration.batches)
        log.append(f"int8: calibrating with {calibration.method} on {samples} samples")
    methods = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "entropy": quantization.CalibrationMethod.Entropy,
        "percentile": quantization.CalibrationMethod.Percentile,
    }
    # Without VNNI, u8 x s8 products can saturate the 16-bit accumulation; 7-bit weights avoid it.
    reduce_range = "avx512_vnni" not in cpu_flags() and "avx_vnni" not in cpu_flags() and "amx_int8" not in cpu_flags()
    quantized = os.path.join(tmp, "quantized.onnx")
    batches = calibration.batches
    if calibration.cache is None and calibration.method in ("entropy", "percentile"):
        batches = equal_batches(batches)
    try:
        quantization.quantize_static(
            prepared,
            quantized,
            CalibrationReader(batches) if calibration.cache is None else None,
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=_activation_type(quantization),
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=methods[calibration.method],
            calibration_cache_path=cache_path,
            nodes_to_exclude=kept_float,
        )
    except Exception as exc:
        raise BuildError(f"int8 quantization failed: {str(exc).splitlines()[0]}") from None
    log.append(f"int8: QDQ, per-channel weights, {'7-bit weights (no VNNI)' if reduce_range else '8-bit weights'}")
    return onnx.load(quantized), Path(cache_path).read_bytes()
