"""The module torch.export traces: signature dtypes in and out, the engine's precision inside.

``export_program`` marks the batch (and other non-fixed dims) dynamic and turns trace
failures into one error naming the converted op they came from.
"""

from __future__ import annotations

import io
import re
import sys
import time
from contextlib import redirect_stderr

from ...errors import MissingDependencyError, UnsupportedModelError
from ...signature import Signature
from .common import _example_shape, _first_line, _quiet_loggers, _torch, example_inputs

def _wrapper_class():
    torch = _torch()

    class EngineModule(torch.nn.Module):
        """Signature dtypes in and out, compute dtype and memory format inside."""

        def __init__(self, inner, order: list[int], compute_dtype, float_inputs: list[bool],
                     out_dtypes: list, channels_last: bool):
            super().__init__()
            self.inner = inner
            self.order = order
            self.compute_dtype = compute_dtype
            self.float_inputs = float_inputs
            self.out_dtypes = out_dtypes
            self.channels_last = channels_last

        def forward(self, *inputs):
            xs = []
            for x, is_float in zip(inputs, self.float_inputs):
                if is_float:
                    x = x.to(self.compute_dtype)
                    if self.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                xs.append(x)
            ordered = [None] * len(xs)
            for position, index in enumerate(self.order):
                ordered[index] = xs[position]
            out = self.inner(*ordered)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return tuple(o.to(d) if o.is_floating_point() and o.dtype != d else o for o, d in zip(outs, self.out_dtypes))

    return EngineModule


def _has_conv2d(module) -> bool:
    torch = _torch()
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def _export_failure_site(exc: BaseException) -> str:
    """Which converted op torch.export failed in, read from its error text and traceback."""
    import traceback

    text = str(exc) + "".join(traceback.format_tb(exc.__traceback__))
    converter = re.findall(r"onnx2torch/node_converters/(\w+)\.py", text)
    executing = re.search(r"While executing %\S+ : .*?target=([^\]\s,]+)", text)
    parts = []
    if converter:
        parts.append(f"onnx2torch's {converter[-1]} converter")
    if executing:
        parts.append(f"module '{executing.group(1)}'")
    return f" (in {', '.join(parts)})" if parts else ""


def export_program(module, signature: Signature, device: str, log: list[str]):
    """torch.export with the batch dim (and other non-fixed dims) dynamic."""
    torch = _torch()
    # CUDA kernels such as batch norm guard the batch at 65535 (a grid dimension); without the
    # bound, export of such models fails with "Constraints violated (batch)".
    batch_dim = torch.export.Dim("batch", min=1, max=65535) if device.startswith("cuda") else torch.export.Dim("batch", min=1)
    dynamic_shapes = []
    any_dynamic = False
    for spec in signature.inputs:
        _, axes = _example_shape(spec, 2)
        spec_dims = {axis: (batch_dim if axis == 0 else torch.export.Dim.AUTO) for axis in axes}
        any_dynamic |= bool(axes)
        dynamic_shapes.append(spec_dims or None)
    inputs = tuple(example_inputs(signature, 2, device))
    started = time.perf_counter()
    # torch.export prints the partial graph of a failed trace straight to stderr (not through
    # logging); it is caught here and shown only when the export succeeds (then it holds warnings).
    printed = io.StringIO()
    try:
        with torch.no_grad(), _quiet_loggers("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export"), \
                redirect_stderr(printed):
            program = torch.export.export(module, inputs, dynamic_shapes=(tuple(dynamic_shapes),) if any_dynamic else None,
                                          strict=False)
        sys.stderr.write(printed.getvalue())
    except MissingDependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - export errors are model limitations
        raise UnsupportedModelError(f"torch.export could not trace the model{_export_failure_site(exc)}: "
                                    f"{_first_line(exc)[:300]}; the PyTorch backend needs a model without data-dependent "
                                    "shapes (use --backend onnxruntime, or fix the batch size in the model)") from None
    log.append(f"torch.export: {len(list(program.graph.nodes))} graph nodes, "
               f"{'dynamic batch' if any_dynamic else 'static shapes'}, {time.perf_counter() - started:.1f} s")
    return program
