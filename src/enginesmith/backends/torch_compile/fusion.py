"""cuDNN's fused convolution epilogues for the PyTorch backend (``torch_compile`` package).

Inductor hands convolutions to cuDNN (or to its own Triton templates), writes each result
to memory and reads it back in a Triton kernel that adds the bias and the residual and
applies ReLU. cuDNN can apply that epilogue inside the convolution (runtime fusion), which
saves two passes over every activation: on the H100, a ResNet-50-like engine in fp16 at batch
128 went from 24,287 to 32,722 images/s (max-autotune; benchmarks/results/gpu_torch_fused.json),
and with fewer kernels to autotune and load, its cold build from 225 s to 43 s and its warm
load from 20.9 s to 15.8 s.

Inference-mode BatchNorm after a convolution is folded into it first (PyTorch sources keep
it; ONNX sources arrive folded). The rewrite runs on the module of an exported program just
before torch.compile, at build and again at load, so the saved program stays plain ATen. Two
operators stand in for the fused patterns; on CUDA they call cuDNN
(``aten::cudnn_convolution_relu`` / ``aten::cudnn_convolution_add_relu``), elsewhere (and
wherever cuDNN has no fused kernel for a shape) they compute the same thing unfused, so the
rewrite can be tested on a CPU:

    relu(conv2d(x, w, b))          -> enginesmith::conv2d_relu(x, w, b, ...)
    relu(conv2d(x, w, b) + z)      -> enginesmith::conv2d_add_relu(x, w, z, b, ...)
"""

from __future__ import annotations

import threading
from typing import Any

# The library object must stay alive: the operators are unregistered when it is collected.
_LIBRARY: Any = None
_LOCK = threading.Lock()
# (op, shapes, dtype, layout) keys cuDNN refused once; they run unfused from then on.
_NO_FUSED_KERNEL: set[tuple] = set()

_SCHEMAS = {
    "conv2d_relu": "(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
    "conv2d_add_relu": "(Tensor x, Tensor weight, Tensor z, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
                       "int groups) -> Tensor",
}


def _torch():
    import torch

    return torch


def _memory_format(x, weight):
    """The layout cuDNN gives the output: channels-last when the input or the weight is (cudnn_conv_suggest_memory_format)."""
    torch = _torch()
    from torch._prims_common import suggest_memory_format

    if weight.dim() == 4 and torch.channels_last in (suggest_memory_format(x), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _output_shape(x, weight, stride, padding, dilation) -> list:
    size = [x.shape[0], weight.shape[0]]
    for axis in range(2):
        extent = dilation[axis] * (weight.shape[2 + axis] - 1) + 1
        size.append((x.shape[2 + axis] + 2 * padding[axis] - extent) // stride[axis] + 1)
    return size


def _reference(x, weight, z, bias, stride, padding, dilation, groups):
    torch = _torch()
    out = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if z is not None:
        out = out + z
    return torch.relu(out).contiguous(memory_format=_memory_format(x, weight))


def _fused(op: str, x, weight, z, bias, stride, padding, dilation, groups):
    torch = _torch()
    key = (op, tuple(x.shape), tuple(weight.shape), x.dtype, x.stride(), tuple(stride), tuple(padding), groups)
    if x.is_cuda and key not in _NO_FUSED_KERNEL:
        try:
            if z is None:
                out = torch.ops.aten.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
            else:
                out = torch.ops.aten.cudnn_convolution_add_relu(x, weight, z, 1.0, bias, stride, padding, dilation, groups)
            return out.contiguous(memory_format=_memory_format(x, weight))
        except RuntimeError:  # no runtime-fusion engine for this shape/dtype: the plain kernels still work
            _NO_FUSED_KERNEL.add(key)
    return _reference(x, weight, z, bias, stride, padding, dilation, groups)


def _conv2d_relu(x, weight, bias, stride, padding, dilation, groups):
    return _fused("conv2d_relu", x, weight, None, bias, stride, padding, dilation, groups)


def _conv2d_add_relu(x, weight, z, bias, stride, padding, dilation, groups):
    return _fused("conv2d_add_relu", x, weight, z, bias, stride, padding, dilation, groups)


def _fake(x, weight, stride, padding, dilation):
    torch = _torch()
    return torch.empty(_output_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x, weight))


def register_ops() -> None:
    """Define ``enginesmith::conv2d_relu`` and ``enginesmith::conv2d_add_relu`` (once per process)."""
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is not None:
            return
        torch = _torch()
        library = torch.library.Library("enginesmith", "FRAGMENT")
        for name, schema in _SCHEMAS.items():
            library.define(name + schema)
        for device in ("CPU", "CUDA"):
            library.impl("conv2d_relu", _conv2d_relu, device)
            library.impl("conv2d_add_relu", _conv2d_add_relu, device)
        torch.library.register_fake(
            "enginesmith::conv2d_relu", lambda x, weight, bias, stride, padding, dilation, groups:
            _fake(x, weight, stride, padding, dilation), lib=library)
        torch.library.register_fake(
            "enginesmith::conv2d_add_relu", lambda x, weight, z, bias, stride, padding, dilation, groups:
            _fake(x, weight, stride, padding, dilation), lib=library)
        _LIBRARY = library


def _pair(value) -> list[int] | None:
    values = [value] if isinstance(value, int) else list(value)
    if len(values) == 1:
        values = values * 2
    return values if len(values) == 2 and all(isinstance(v, int) for v in values) else None


def _conv_args(node) -> tuple | None:
    """(x, weight, bias, stride, padding, dilation, groups) of a 2-D aten.conv2d node with int padding, else None."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, [1, 1], [0, 0], [1, 1], 1)
    values = list(node.args) + [node.kwargs.get(n, d) for n, d in zip(names[len(node.args):], defaults[len(node.args):])]
    x, weight, bias, stride, padding, dilation, groups = values
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    weight_val, x_val = getattr(weight, "meta", {}).get("val"), getattr(x, "meta", {}).get("val")
    if any(v is None for v in (stride, padding, dilation, weight_val, x_val)) or not isinstance(groups, int) \
            or weight_val.dim() != 4 or x_val.dim() != 4:  # unbatched [C, H, W] inputs stay unfused
        return None
    return x, weight, bias, stride, padding, dilation, groups


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _same_tensor_type(a, b) -> bool:
    va, vb = getattr(a, "meta", {}).get("val"), getattr(b, "meta", {}).get("val")
    return va is not None and vb is not None and tuple(va.shape) == tuple(vb.shape) and va.dtype == vb.dtype


def _attribute(gm, node):
    """The tensor behind a get_attr node, else None."""
    if getattr(node, "op", None) != "get_attr":
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value


def fold_batch_norms(gm) -> int:
    """Fold inference-mode ``aten.batch_norm`` after a single-use conv2d into the conv's weight and bias.

    ONNX sources arrive folded (ONNX Runtime's basic optimizations); PyTorch sources keep
    Conv -> BatchNorm -> ReLU, which would hide the ReLU from ``fuse_conv_epilogues``.
    """
    torch = _torch()
    from torch._prims_common import suggest_memory_format

    aten = torch.ops.aten
    graph = gm.graph
    folded = 0
    for norm in list(graph.nodes):
        if norm.op != "call_function" or norm.target is not aten.batch_norm.default or len(norm.args) < 8:
            continue
        conv, gamma, beta, mean, var, training, _momentum, eps = norm.args[:8]
        if training or getattr(conv, "target", None) is not aten.conv2d.default or len(conv.users) != 1:
            continue
        args = _conv_args(conv)
        tensors = [_attribute(gm, n) if n is not None else None for n in (gamma, beta, mean, var)]
        if args is None or tensors[2] is None or tensors[3] is None:
            continue
        weight = _attribute(gm, args[1])
        bias = _attribute(gm, args[2]) if args[2] is not None else None
        if weight is None or (args[2] is not None and bias is None):
            continue
        with torch.no_grad():
            mean_t, var_t = tensors[2].double(), tensors[3].double()
            gamma_t = tensors[0].double() if tensors[0] is not None else torch.ones_like(mean_t)
            beta_t = tensors[1].double() if tensors[1] is not None else torch.zeros_like(mean_t)
            scale = gamma_t / torch.sqrt(var_t + float(eps))
            new_weight = (weight.double() * scale.reshape(-1, 1, 1, 1)).to(weight.dtype)
            new_weight = new_weight.contiguous(memory_format=suggest_memory_format(weight))
            old_bias = bias.double() if bias is not None else torch.zeros_like(mean_t)
            new_bias = ((old_bias - mean_t) * scale + beta_t).to(weight.dtype)
        names = []
        for suffix, tensor in (("weight", new_weight), ("bias", new_bias)):
            name = f"_enginesmith_folded_{folded}_{suffix}"
            gm.register_buffer(name, tensor)
            names.append(name)
        with graph.inserting_before(conv):
            weight_node, bias_node = graph.get_attr(names[0]), graph.get_attr(names[1])
        weight_node.meta["val"] = args[1].meta["val"]
        with graph.inserting_before(norm):
            new_conv = graph.call_function(aten.conv2d.default, (args[0], weight_node, bias_node, *args[3:]))
        new_conv.meta.update({k: v for k, v in norm.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        norm.replace_all_uses_with(new_conv)
        graph.erase_node(norm)
        graph.erase_node(conv)
        folded += 1
    if folded:
        gm.recompile()
    return folded


def fuse_conv_epilogues(gm, grouped: bool = True) -> dict[str, int]:
    """Rewrite conv2d -> ReLU and conv2d -> add -> ReLU chains of ``gm`` in place; counts per pattern.

    A chain is rewritten only where each intermediate has one user (nothing else reads the
    unfused value) and the residual has the convolution's exact shape and dtype (cuDNN's
    epilogue does not broadcast). ``grouped=False`` leaves grouped (depthwise) convolutions
    alone: cuDNN's fused-epilogue path has no fast kernels for them.
    """
    torch = _torch()
    register_ops()
    aten, ops = torch.ops.aten, torch.ops.enginesmith
    relus = {aten.relu.default, aten.relu_.default}
    adds = {aten.add.Tensor, aten.add_.Tensor}
    counts = {"conv+bn folded": fold_batch_norms(gm), "conv+relu": 0, "conv+add+relu": 0}
    graph = gm.graph
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target is not aten.conv2d.default:
            continue
        args = _conv_args(conv)
        user = _only_user(conv)
        if args is None or user is None:
            continue
        x, weight, bias, stride, padding, dilation, groups = args
        if groups != 1 and not grouped:
            continue
        if user.target in relus:
            last, fused, new_args, pattern = user, ops.conv2d_relu.default, (x, weight, bias, stride, padding, dilation,
                                                                                groups), "conv+relu"
        elif user.target in adds and user.kwargs.get("alpha", 1) == 1 and len(user.args) == 2:
            residual = user.args[1] if user.args[0] is conv else user.args[0]
            relu = _only_user(user)
            if residual is conv or relu is None or relu.target not in relus or not _same_tensor_type(residual, conv):
                continue
            last, fused, new_args, pattern = relu, ops.conv2d_add_relu.default, (x, weight, residual, bias, stride, padding,
                                                                                  dilation, groups), "conv+add+relu"
        else:
            continue
        with graph.inserting_before(last):
            node = graph.call_function(fused, new_args)
        node.meta.update({k: v for k, v in last.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        last.replace_all_uses_with(node)
        # Erased by hand: dead-code elimination keeps in-place ops (relu_, add_) as side effects.
        for dead in (last, user, conv) if last is not user else (last, conv):
            graph.erase_node(dead)
        counts[pattern] += 1
    if any(counts.values()):
        gm.recompile()
    return counts
