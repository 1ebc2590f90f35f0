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
(torch.onnx, onnxscript, tf2onnx, each in its own operand order). transformers' ``gelu_new``
(GPT-2) and Keras' approximate GELU write the tanh form out with Tanh and a cube. ``gelus_written_out``
first turns those chains back into ``aten.gelu`` (exact or tanh), and ONNX's MatMul + Add of a weight
already became ``aten.linear`` (``linear_fusion``), so a BERT exported to ONNX gets the epilogue too;
for the tanh form the epilogue computes the very same function.

Like ``fusion``, the rewrite runs on the module of an exported program just before
``torch.compile``, at build and again at load, so the saved program stays as exported.
"""

from __future__ import annotations

import math
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


def _scalar_and_other(gm, node, value: float):
    """The operand of a two-operand ``node`` that is not the constant ``value`` (None if neither is)."""
    a, b = node.args[:2]
    return b if _is_scalar(gm, a, value) else a if _is_scalar(gm, b, value) else None


def _sole_call(node, target) -> bool:
    """Whether ``node`` calls ``target`` with no keyword arguments, and one node alone reads it."""
    return (getattr(node, "op", None) == "call_function" and node.target is target and not node.kwargs
            and len(node.users) == 1)


def _erf_argument(gm, node):
    """(x, nodes) of ``x / sqrt(2)`` or ``x * (1/sqrt(2))``; else None."""
    aten = _torch().ops.aten
    if _sole_call(node, aten.div.Tensor) and _is_scalar(gm, node.args[1], 2 ** 0.5):
        return node.args[0], [node]
    if _sole_call(node, aten.mul.Tensor):
        x = _scalar_and_other(gm, node, 2 ** -0.5)
        return (x, [node]) if x is not None else None
    return None


def _cube_term(gm, term, x):
    """The nodes of ``0.044715 * x^3`` (``pow(x, 3)`` or ``x * x * x``, operands in any order); else None."""
    aten = _torch().ops.aten
    if not _sole_call(term, aten.mul.Tensor):
        return None
    power = _scalar_and_other(gm, term, 0.044715)
    if power is None or not getattr(power, "users", None) or len(power.users) != 1 or power.kwargs:
        return None
    if power.target in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor) and power.args[0] is x \
            and _is_scalar(gm, power.args[1], 3.0):
        return [term, power]
    if power.target is aten.mul.Tensor:
        square = _other(power, x)
        if _sole_call(square, aten.mul.Tensor) and square.args[0] is x and square.args[1] is x:
            return [term, power, square]
    return None


def _tanh_argument(gm, node):
    """(x, nodes) of ``sqrt(2/pi) * (x + 0.044715 * x^3)``, operands in any order; else None."""
    aten = _torch().ops.aten
    if not _sole_call(node, aten.mul.Tensor):
        return None
    inner = _scalar_and_other(gm, node, (2 / math.pi) ** 0.5)
    if not _sole_call(inner, aten.add.Tensor):
        return None
    for x, term in (inner.args[:2], inner.args[1::-1]):
        cube = _cube_term(gm, term, x)
        if cube is not None:
            return x, [node, inner, *cube]
    return None


def _written_out_gelu(gm, core):
    """(x, the chain's nodes from the last, approximate) of ``x * 0.5 * (1 + core(argument(x)))`` around ``core``
    (``aten.erf``: the exact GELU; ``aten.tanh``: its tanh form), in the operand orders exporters write
    (``0.5 * (1 + core) * x``, ``(1 + core) * x * 0.5``, ``(x * 0.5) * (1 + core)``); else None."""
    aten = _torch().ops.aten
    found = _erf_argument(gm, core.args[0]) if core.target is aten.erf.default else _tanh_argument(gm, core.args[0])
    if found is None:
        return None
    x, argument = found
    approximate = "none" if core.target is aten.erf.default else "tanh"
    add = _single_reader(core, aten.add.Tensor)
    if add is None or add.kwargs or not _is_scalar(gm, _other(add, core), 1.0):
        return None
    first = _single_reader(add, aten.mul.Tensor)
    if first is None or first.kwargs:
        return None
    factor = _other(first, add)
    if factor is x or _is_scalar(gm, factor, 0.5):  # (1 + core) * x, then * 0.5 (or * 0.5, then * x)
        last = _single_reader(first, aten.mul.Tensor)
        if last is None or last.kwargs:
            return None
        other = _other(last, first)
        if not (_is_scalar(gm, other, 0.5) if factor is x else other is x):
            return None
        return x, [last, first, add, core, *argument], approximate
    # (x * 0.5) * (1 + core)
    if _sole_call(factor, aten.mul.Tensor) and _is_scalar(gm, _other(factor, x), 0.5):
        return x, [first, factor, add, core, *argument], approximate
    return None


def gelus_written_out(gm) -> int:
    """Rewrite GELU written out op by op as ``aten.gelu``; how many. ONNX before opset 20 has no Gelu op, so its
    exporters write the exact GELU with Erf (torch.onnx, tf2onnx); transformers' ``gelu_new`` (GPT-2) and
    Keras' approximate GELU write the tanh form with Tanh, which becomes ``gelu(approximate="tanh")``."""
    torch = _torch()
    aten = torch.ops.aten
    graph = gm.graph
    rewritten = 0
    for core in list(graph.nodes):
        if core.op != "call_function" or core.target not in (aten.erf.default, aten.tanh.default):
            continue
        found = _written_out_gelu(gm, core)
        if found is None:
            continue
        x, chain, approximate = found
        last = chain[0]
        x_val, last_val = getattr(x, "meta", {}).get("val"), last.meta.get("val")
        if x_val is None or last_val is None or tuple(x_val.shape) != tuple(last_val.shape) or x_val.dtype != last_val.dtype:
            continue  # a constant that broadcasts the result to another shape or type
        with graph.inserting_before(last):
            gelu = graph.call_function(aten.gelu.default, (x,), {"approximate": approximate} if approximate != "none" else {})
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
