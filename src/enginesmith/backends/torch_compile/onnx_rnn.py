"""ONNX GRU and LSTM as PyTorch ops (``torch_compile`` package; onnx2torch 1.5.15 converts neither).

Recurrent layers are common in the models that ship in packages (voice-activity detectors,
OCR recognizers, seq2seq encoders), and exporters write them as one ``GRU`` / ``LSTM`` node
each. Here they become the ONNX equations step by step in plain tensor ops, so ``torch.export``
traces them (the loop over time is unrolled, which fixes the sequence length the engine serves;
the backend then says so) and every ONNX variant PyTorch's own ``nn.GRU`` lacks is covered:
``linear_before_reset`` 0 and 1, forward / reverse / bidirectional, ``layout`` 0 and 1, initial
states, LSTM peepholes. Refused, with the reason: ``sequence_lens``, non-default activations,
``clip`` and LSTM's ``input_forget``. Checked against ONNX Runtime in tests/test_torch_onnx_rnn.py.
"""

from __future__ import annotations

import functools
from typing import Any

from .common import _torch


def _refusal(node: Any, gates: int) -> str | None:
    attrs = node.attributes
    defaults = (["Sigmoid", "Tanh"] if gates == 3 else ["Sigmoid", "Tanh", "Tanh"])
    activations = [str(a) for a in attrs.get("activations", [])]
    if activations and activations not in (defaults, defaults * 2):
        return f"{node.operation_type} with activations {activations} is not supported (only the defaults)"
    if attrs.get("clip") is not None:
        return f"{node.operation_type} with clip is not supported"
    if int(attrs.get("input_forget", 0)):
        return "LSTM with input_forget=1 is not supported"
    inputs = list(node.input_values) + [""] * 8
    if inputs[4]:
        return f"{node.operation_type} with sequence_lens is not supported (every sequence must use the full length)"
    return None


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, Any]:
    torch = _torch()

    class OnnxRecurrent(torch.nn.Module):
        """One ONNX GRU (3 gates, z r h) or LSTM (4 gates, i o f c) node, every direction it has."""

        def __init__(self, kind: str, hidden: int, direction: str, layout: int, linear_before_reset: bool,
                     outputs: int):
            super().__init__()
            self.kind, self.hidden, self.direction, self.layout = kind, hidden, direction, layout
            self.linear_before_reset, self.outputs = linear_before_reset, outputs

        def forward(self, X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None):
            if self.layout == 1:  # [batch, seq, ...] -> [seq, batch, ...]
                X = X.transpose(0, 1)
                initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
                initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
            steps, batch, hidden = X.shape[0], X.shape[1], self.hidden
            directions = ["forward", "reverse"] if self.direction == "bidirectional" else [self.direction]
            ys, last_h, last_c = [], [], []
            for d, direction in enumerate(directions):
                gates = W.shape[1] // hidden
                bias = B[d] if B is not None else X.new_zeros(2 * gates * hidden)
                x_part = X @ W[d].transpose(0, 1) + bias[: gates * hidden]  # every step's input terms at once
                recurrent, recurrent_bias = R[d], bias[gates * hidden:]
                h = initial_h[d] if initial_h is not None else X.new_zeros(batch, hidden)
                c = initial_c[d] if initial_c is not None else X.new_zeros(batch, hidden)
                order = range(steps) if direction == "forward" else range(steps - 1, -1, -1)
                out = [None] * steps
                for t in order:
                    if self.kind == "GRU":
                        h = self._gru_step(x_part[t], h, recurrent, recurrent_bias)
                    else:
                        h, c = self._lstm_step(x_part[t], h, c, recurrent, recurrent_bias,
                                               P[d] if P is not None else None)
                    out[t] = h
                ys.append(torch.stack(out))
                last_h.append(h)
                last_c.append(c)
            Y, Y_h, Y_c = torch.stack(ys, 1), torch.stack(last_h), torch.stack(last_c)  # [seq, dirs, batch, hidden]
            if self.layout == 1:
                Y, Y_h, Y_c = Y.permute(2, 0, 1, 3), Y_h.transpose(0, 1), Y_c.transpose(0, 1)
            return (Y, Y_h, Y_c)[: self.outputs] if self.outputs > 1 else Y

        def _gru_step(self, x, h, recurrent, recurrent_bias):
            size = self.hidden
            xz, xr, xh = x.split(size, -1)
            rz, rr, rh = recurrent.split(size, 0)
            bz, br, bh = recurrent_bias.split(size, -1)
            z = torch.sigmoid(xz + h @ rz.transpose(0, 1) + bz)
            r = torch.sigmoid(xr + h @ rr.transpose(0, 1) + br)
            if self.linear_before_reset:
                candidate = torch.tanh(xh + r * (h @ rh.transpose(0, 1) + bh))
            else:
                candidate = torch.tanh(xh + (r * h) @ rh.transpose(0, 1) + bh)
            return (1 - z) * candidate + z * h

        def _lstm_step(self, x, h, c, recurrent, recurrent_bias, peephole):
            pre = x + h @ recurrent.transpose(0, 1) + recurrent_bias
            i, o, f, g = pre.split(self.hidden, -1)
            if peephole is not None:
                pi, po, pf = peephole.split(self.hidden, -1)
                i, f = i + pi * c, f + pf * c
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if peephole is not None:
                o = o + po * c
            return torch.sigmoid(o) * torch.tanh(c), c

    return {"recurrent": OnnxRecurrent}


def convert_recurrent(node: Any, graph: Any) -> Any:
    """onnx2torch converter for GRU (opsets 7, 14, 22) and LSTM (7, 14, 22)."""
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    gates = 3 if node.operation_type == "GRU" else 4
    refusal = _refusal(node, gates)
    if refusal:
        raise NotImplementedError(refusal)
    attrs = node.attributes
    outputs = len(node.output_values)
    module = _modules()["recurrent"](node.operation_type, int(attrs["hidden_size"]), str(attrs.get("direction", "forward")),
                                     int(attrs.get("layout", 0)), bool(int(attrs.get("linear_before_reset", 0))), outputs)
    # Absent optional inputs ("") reach forward() as None, by name.
    mapping = OnnxMapping(inputs=tuple(node.input_values), outputs=tuple(node.output_values))
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)
