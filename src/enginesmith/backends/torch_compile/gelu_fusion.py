"""Linear layer + GELU as one cuBLASLt product with a bias-and-GELU epilogue (``torch_compile`` package).

Transformer MLPs apply GELU to the output of their first, widest linear layer. Inductor runs
the product in cuBLAS (whose epilogue adds the bias) and GELU as a separate Triton kernel that
reads and writes that whole activation once more: on the H200 in fp16 that kernel was 0.73 ms
of ViT-B/16's 5.4 ms of GPU time per call at batch 64, 0.11 of MiniLM's 0.86 ms at batch 32
(``benchmarks/results/gpu_zoo_h200_max_autotune_8.json``, profile). cuBLASLt can apply bias and
GELU in the product's epilogue (``torch._addmm_activation(..., use_gelu=True)``), so that pass
goes away: ViT-B/16 0.507 -> 0.489 ms at batch 1 and 5.522 -> 5.002 ms at batch 64, MiniLM
0.404 -> 0.389 and 0.947 -> 0.844 ms at batch 32 (``gpu_zoo_h200_fuse_gelu.json``).

cuBLASLt's epilogue computes GELU in its tanh form, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``,
which differs from the exact (erf) GELU by at most about 3e-4 in absolute terms: under half an fp16
step at 1. So the rewrite is an engine option recorded in the manifest, on by default only for
fp16 and bf16 engines on CUDA (not for fp32 ones, checked against their source to 1e-4), and every
build still compares the compiled engine with the exported program. On the CPU (tests) the
operator computes the same tanh form without the epilogue.

    gelu(linear(x, W, b))  ->  enginesmith::linear_gelu(x, W, b)

ONNX graphs before opset 20 have no Gelu op: exporters write ``x * 0.5 * (1 + erf(x / sqrt(2)))``
(torch.onnx, onnxscript, tf2onnx, each in its own operand order). ``gelus_from_erf`` first turns
those chains back into ``aten.gelu`` (the exact GELU), and ONNX's MatMul + Add of a weight already
became ``aten.linear`` (``linear_fusion``), so a BERT exported to ONNX gets the epilogue too.

Like ``fusion``, the rewrite runs on the module of an exported program just before
``torch.compile``, at build and again at load, so the saved program stays as exported.
"""

from __future__ import annotations

import threading
from typing import Any

from .common import _torch
from .fusion import _attribute, _only_user

# The library object must stay alive: the operator is unregistered when it is collected.
_LIBRARY: Any = None
_LOCK = threading.Lock()
_SCHEMA = "linear_gelu(Tensor x, Tensor weight, Tensor bias) -> Tensor"


def _linear_gelu(x, weight, bias):
    torch = _torch()
    rows = x.reshape(-1, x.shape[-1])
    if x.is_cuda and rows.shape[0] > 1:  # cuBLASLt's epilogue, which wants more than one row
        out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    else:  # the same function unfused (the CPU's _addmm_activation applies the exact GELU instead)
        out = torch.nn.functional.gelu(torch.nn.functional.linear(rows, weight, bias), approximate="tanh")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _fake(x, weight, bias):
    torch = _torch()
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)


def register_op() -> None:
    """Define ``enginesmith::linear_gelu`` (once per process)."""
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is not None:
            return
        torch = _torch()
        library = torch.library.Library("enginesmith", "FRAGMENT")
        library.define(_SCHEMA)
        for device in ("CPU", "CUDA"):
            library.impl("linear_gelu", _linear_gelu, device)
        torch.library.register_fake("enginesmith::linear_gelu", _fake, lib=library)
        _LIBRARY = library


def _value(gm, node):
    """A node's tensor, or the fake tensor export recorded for it."""
    constant = _attribute(gm, node)
    return constant if constant is not None else getattr(node, "meta", {}).get("val")


def _gelu_input(gm, node):
    """The ``aten.linear`` node (with a bias, read by nothing else) whose output ``node``, an ``aten.gelu``, takes; else None."""
    torch = _torch()
    aten = torch.ops.aten
    if node.op != "call_function" or node.target is not aten.gelu.default:
        return None
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    linear = node.args[0]
    if approximate not in ("none", "tanh") or getattr(linear, "target", None) is not aten.linear.default:
        return None
    if len(linear.users) != 1 or len(linear.args) != 3 or linear.args[2] is None or linear.kwargs:
        return None
    x, weight, bias = (_value(gm, arg) for arg in linear.args)
    if x is None or weight is None or bias is None or weight.dim() != 2 or bias.dim() != 1 or x.dim() < 2:
        return None
    if bias.shape[0] != weight.shape[0] or x.shape[-1] != weight.shape[1]:
        return None
    if not (x.dtype == weight.dtype == bias.dtype) or not x.is_floating_point():
        return None
    return linear


def _is_scalar(gm, arg, value: float) -> bool:
    """Whether ``arg`` is ``value``: a Python number or a one-element constant (fp16-rounded ones too)."""
    constant = arg if isinstance(arg, (int, float)) else _attribute(gm, arg)
    if constant is None or (not isinstance(constant, (int, float)) and constant.numel() != 1):
        return False
    return abs(float(constant) - value) <= 2e-3 * abs(value)


def _other(node, arg):
    """The operand of a two-operand ``node`` that is not ``arg`` (None if ``arg`` is neither)."""
    a, b = node.args[:2]
    return b if a is arg else a if b is arg else None


def _single_reader(node, target):
    """The one node that reads ``node``, if it calls ``target``; else None."""
    user = _only_user(node)
    return user if user is not None and user.op == "call_function" and user.target is target else None


def _erf_gelu(gm, erf):
    """(x, its nodes, last first) of ``x * 0.5 * (1 + erf(x / sqrt(2)))`` around ``erf``, in the operand orders exporters write
    (``0.5 * (1 + erf) * x``, ``(1 + erf) * x * 0.5``, ``(x * 0.5) * (1 + erf)``; ``x * (1/sqrt(2))`` too); else None."""
    torch = _torch()
    aten = torch.ops.aten
    scaled = erf.args[0]
    if getattr(scaled, "op", None) != "call_function" or len(scaled.users) != 1 or scaled.kwargs:
        return None
    if scaled.target is aten.div.Tensor and _is_scalar(gm, scaled.args[1], 2 ** 0.5):
        x = scaled.args[0]
    elif scaled.target is aten.mul.Tensor and _is_scalar(gm, scaled.args[1], 2 ** -0.5):
        x = scaled.args[0]
    elif scaled.target is aten.mul.Tensor and _is_scalar(gm, scaled.args[0], 2 ** -0.5):
        x = scaled.args[1]
    else:
        return None
    add = _single_reader(erf, aten.add.Tensor)
    if add is None or add.kwargs or not _is_scalar(gm, _other(add, erf), 1.0):
        return None
    first = _single_reader(add, aten.mul.Tensor)
    if first is None or first.kwargs:
        return None
    factor = _other(first, add)
    if factor is x or _is_scalar(gm, factor, 0.5):  # (1 + erf) * x, then * 0.5 (or * 0.5, then * x)
        last = _single_reader(first, aten.mul.Tensor)
        remaining = 0.5 if factor is x else x
        if last is None or last.kwargs:
            return None
        other = _other(last, first)
        if not (other is x if remaining is x else _is_scalar(gm, other, 0.5)):
            return None
        return x, [last, first, add, erf, scaled]
    # (x * 0.5) * (1 + erf)
    if (getattr(factor, "target", None) is aten.mul.Tensor and len(factor.users) == 1 and not factor.kwargs
            and _is_scalar(gm, _other(factor, x), 0.5)):
        return x, [first, factor, add, erf, scaled]
    return None


def gelus_from_erf(gm) -> int:
    """Rewrite GELU written out with Erf (what ONNX exporters before opset 20 emit) as ``aten.gelu``; how many."""
    torch = _torch()
    aten = torch.ops.aten
    graph = gm.graph
    rewritten = 0
    for erf in list(graph.nodes):
        if erf.op != "call_function" or erf.target is not aten.erf.default:
            continue
        found = _erf_gelu(gm, erf)
        if found is None:
            continue
        x, chain = found
        last = chain[0]
        x_val, last_val = getattr(x, "meta", {}).get("val"), last.meta.get("val")
        if x_val is None or last_val is None or tuple(x_val.shape) != tuple(last_val.shape) or x_val.dtype != last_val.dtype:
            continue  # a constant that broadcasts the result to another shape or type
        with graph.inserting_before(last):
            gelu = graph.call_function(aten.gelu.default, (x,))
        gelu.meta.update({k: v for k, v in last.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        last.replace_all_uses_with(gelu)
        for node in chain:  # erased by hand, like the other rewrites: each now has no reader
            graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def fuse_linear_gelu(gm) -> int:
    """Rewrite ``gelu(linear(x, W, b))`` chains of ``gm`` (in place) as ``enginesmith::linear_gelu``; how many."""
    torch = _torch()
    register_op()
    graph = gm.graph
    rewritten = 0
    for gelu in list(graph.nodes):
        linear = _gelu_input(gm, gelu)
        if linear is None:
            continue
        with graph.inserting_before(gelu):
            node = graph.call_function(torch.ops.enginesmith.linear_gelu.default, tuple(linear.args))
        node.meta.update({k: v for k, v in gelu.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        gelu.replace_all_uses_with(node)
        graph.erase_node(gelu)
        graph.erase_node(linear)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten
