"""Attention written out op by op, run as one ``scaled_dot_product_attention`` (``torch_compile`` package).

ONNX has no attention operator below opset 23, so exporters spell it out: a product of the
(scaled) queries and transposed keys, an optional additive mask, a softmax over the last axis,
sometimes a guard that turns the NaNs of fully masked rows into zeros, and a product with the
values. Converted back to PyTorch that chain materializes the [batch, heads, L, S] score and
probability tensors twice, where PyTorch's fused kernels (flash / memory-efficient attention)
never write them. Measured on the H200 (``benchmarks/README.md``), engines built from the ONNX
exports of ViT-B/16 and MiniLM ran at 0.80x of max-autotune at the large batch, where the same
models' own modules (which call SDPA) ran at 1.2x. The rewrite:

    matmul(softmax(matmul(q * a, kT * b) * c + mask), v)
        -> scaled_dot_product_attention(q, transpose(kT), v, mask, scale=a * b * c)

Only chains whose intermediate results have no other reader are rewritten; scale factors must be
constants of one element. Like ``fusion``, it runs on the exported program's module just before
``torch.compile`` (at build and again at load), and the build's self-check compares the result
with the unrewritten program.
"""

from __future__ import annotations

from .common import _torch
from .fusion import _attribute
from .linear_fusion import _drop_unused_constants


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _val(node):
    return getattr(node, "meta", {}).get("val")


def _scalar_constant(gm, node) -> float | None:
    """The value of a one-element constant (a get_attr tensor or a Python number), else None."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    tensor = _attribute(gm, node)
    if tensor is None or not hasattr(tensor, "numel") or tensor.numel() != 1:
        return None
    return float(tensor.reshape(()).item())


def _peel_scale(gm, node) -> tuple[object, float]:
    """(input, factor) for ``x * c`` / ``c * x`` / ``x / c`` with a one-element constant c read only here; else (node, 1)."""
    aten = _torch().ops.aten
    if getattr(node, "op", None) != "call_function" or _only_user(node) is None or node.kwargs:
        return node, 1.0
    if node.target is aten.mul.Tensor:
        for mine, other in ((0, 1), (1, 0)):
            factor = _scalar_constant(gm, node.args[other])
            if factor is not None and hasattr(node.args[mine], "op"):
                return node.args[mine], factor
    if node.target is aten.div.Tensor:
        divisor = _scalar_constant(gm, node.args[1])
        if divisor not in (None, 0.0):
            return node.args[0], 1.0 / divisor
    return node, 1.0


def _nan_guard(node):
    """The ``where(isnan(p), 0, p)`` that follows ``p``, when that is p's only use; else None."""
    aten = _torch().ops.aten
    users = list(node.users)
    if len(users) != 2:
        return None
    isnan = next((u for u in users if u.target is aten.isnan.default), None)
    where = next((u for u in users if u.target is aten.where.self), None)
    if isnan is None or where is None or _only_user(isnan) is not where:
        return None
    if where.args[0] is not isnan or where.args[2] is not node:
        return None
    return where


def _scores_product(gm, node) -> tuple[object, float] | None:
    """(the ``matmul`` node, scale factor) when ``node`` is that product, maybe times a constant; else None."""
    product, scale = _peel_scale(gm, node)
    if getattr(product, "op", None) != "call_function" or product.target is not _torch().ops.aten.matmul.default:
        return None
    return (product, scale) if _only_user(product) is not None else None


def _same_shape(a, b) -> bool:
    va, vb = _val(a), _val(b)
    return va is not None and vb is not None and tuple(map(str, va.shape)) == tuple(map(str, vb.shape))


def _same_batch_dims(*tensors) -> bool:
    shapes = [tuple(str(d) for d in t.shape[:-2]) for t in tensors]
    return all(s == shapes[0] for s in shapes)


def fuse_attention(gm) -> int:
    """Rewrite written-out attention in ``gm`` as ``aten.scaled_dot_product_attention``; how many were rewritten."""
    torch = _torch()
    aten = torch.ops.aten
    graph = gm.graph
    fused = 0
    for softmax in list(graph.nodes):
        if softmax.op != "call_function" or softmax.target not in (aten.softmax.int, aten._softmax.default):
            continue
        if softmax.target is aten._softmax.default and softmax.args[2]:  # half_to_float: a dtype change SDPA lacks
            continue
        probs = _val(softmax)
        if probs is None or probs.dim() not in (3, 4) or not probs.is_floating_point():
            continue
        if softmax.args[1] not in (-1, probs.dim() - 1) or softmax.kwargs.get("dtype") is not None:
            continue
        if len(softmax.args) > 2 and softmax.target is aten.softmax.int and softmax.args[2] is not None:
            continue
        guard = _nan_guard(softmax)
        if guard is not None and _scalar_constant(gm, guard.args[1]) != 0.0:
            continue
        weighted = _only_user(guard if guard is not None else softmax)
        if (weighted is None or weighted.target is not aten.matmul.default
                or weighted.args[0] is not (guard if guard is not None else softmax)):
            continue
        value = weighted.args[1]

        logits, mask = softmax.args[0], None
        chain = [weighted, guard, *([guard.args[0]] if guard is not None else []), softmax, logits]
        if _only_user(logits) is not softmax:
            continue
        found = _scores_product(gm, logits)
        if (found is None and logits.op == "call_function" and logits.target is aten.add.Tensor
                and len(logits.args) == 2 and not logits.kwargs):
            a, b = logits.args
            for side, other in ((a, b), (b, a)):  # the mask may be either operand
                found = _scores_product(gm, side)
                mask_val = _val(other)
                if found is not None and mask_val is not None and mask_val.is_floating_point() and _same_shape(
                        logits, side):  # a mask that broadcasts the scores to a larger shape is not SDPA's attn_mask
                    chain.append(side)
                    mask = other
                    break
                found = None
        if found is None:
            continue
        scores, scale = found
        chain.append(scores)
        query, scale_q = _peel_scale(gm, scores.args[0])
        key_t, scale_k = _peel_scale(gm, scores.args[1])
        chain += [scores.args[0], scores.args[1]]
        q, kt, v = _val(query), _val(key_t), _val(value)
        if q is None or kt is None or v is None or not (q.dim() == kt.dim() == v.dim() == probs.dim()):
            continue
        if not (q.dtype == kt.dtype == v.dtype == probs.dtype) or not _same_batch_dims(q, kt, v):
            continue
        if str(q.shape[-1]) != str(kt.shape[-2]) or str(kt.shape[-1]) != str(v.shape[-2]):
            continue
        with graph.inserting_before(weighted):
            key = graph.call_function(aten.transpose.int, (key_t, -2, -1))
            attention = graph.call_function(
                aten.scaled_dot_product_attention.default, (query, key, value, mask, 0.0, False),
                {"scale": scale * scale_q * scale_k})
            result = attention
            if guard is not None:  # fully masked rows: the original's zeros, not SDPA's NaNs
                result = graph.call_function(aten.masked_fill.Scalar,
                                             (attention, graph.call_function(aten.isnan.default, (attention,)), 0.0))
        attention.meta["val"] = _val(weighted)
        weighted.replace_all_uses_with(result)
        for node in dict.fromkeys(chain):  # readers before what they read; the inputs kept their other readers
            if node is not None and node not in (query, key_t, value, mask) and not node.users:
                graph.erase_node(node)
        fused += 1
    if fused:
        _drop_unused_constants(gm)
        gm.recompile()
    return fused
