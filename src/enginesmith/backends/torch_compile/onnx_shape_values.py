"""Shape arithmetic of a converted ONNX graph as Python values, so torch.export can trace it.

ONNX computes shapes with tensors (Shape -> Gather -> Unsqueeze -> Concat -> Reshape), and
onnx2torch passes shape-like inputs (Reshape's shape, Slice's starts, ReduceSum's axes) as tensors
whose values it reads at run time; torch.export traces tensors symbolically, so such reads are
data-dependent and fail. ``specialize_shape_values`` rewrites the converted fx graph so that these
values are Python ints, lists and symbolic sizes instead (the ``_sv_*`` helpers below are the
functions the rewritten graph calls).
"""

from __future__ import annotations

from typing import Any

from .common import _torch


# These helpers carry shape values as lists (1-D) or scalars (0-D).


def _sv_shape(x, start, end):
    return list(x.shape[start:end])


def _sv_gather(values, index):
    return [values[i] for i in index] if isinstance(index, list) else values[index]


def _sv_unsqueeze(value):
    return [value]


def _sv_squeeze(values):
    return values[0]


def _sv_squeeze_dims(x, axes):
    result = x
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        result = result.squeeze(axis)
    return result


def _sv_unsqueeze_dims(x, axes):
    rank = x.dim() + len(axes)
    result = x
    for axis in sorted(a % rank for a in axes):
        result = result.unsqueeze(axis)
    return result


def _sv_concat(*parts):
    out: list = []
    for part in parts:
        out.extend(part if isinstance(part, list) else [part])
    return out


def _sv_binary(op: str, a, b):
    """Arithmetic and comparisons (Equal, Greater...: Python, maybe symbolic, booleans) over shape values,
    elementwise over lists (a scalar broadcasts)."""
    import operator

    fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.floordiv, "eq": operator.eq,
          "gt": operator.gt, "lt": operator.lt, "ge": operator.ge, "le": operator.le}[op]
    if isinstance(a, list) or isinstance(b, list):
        n = len(a) if isinstance(a, list) else len(b)
        a = a if isinstance(a, list) else [a] * n
        b = b if isinstance(b, list) else [b] * n
        return [fn(x, y) for x, y in zip(a, b)]
    return fn(a, b)


def _sv_tensor(values, like):
    """Shape values (ints, symbolic sizes, or a list of them) as an int64 tensor, for ops that read tensors,
    on ``like``'s device (a graph input), as in _sv_range."""
    import torch

    return torch.tensor(values, dtype=torch.int64, device=like.device)


def _sv_minmax(op: str, *values):
    """ONNX Min/Max over shape values (ints, symbolic sizes, or lists of them; scalars broadcast), elementwise."""
    import torch

    pick = torch.sym_min if op == "Min" else torch.sym_max
    width = max((len(v) for v in values if isinstance(v, list)), default=None)
    rows = [v if isinstance(v, list) else [v] * (width or 1) for v in values]
    picked = rows[0]
    for row in rows[1:]:
        picked = [pick(a, b) for a, b in zip(picked, row)]
    return picked if width is not None else picked[0]


def _sv_reshape(x, shape):
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _sv_reshape_literal(x, shape):
    return x.reshape(list(shape))


def _sv_expand(x, shape):
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ss = [1] * (rank - len(shape)) + list(shape)
    return x.reshape(xs).expand([xd if isinstance(s, int) and s == 1 else s for xd, s in zip(xs, ss)])


def _sv_tile(x, repeats):
    return x.repeat(repeats)


def _sv_select(x, axis: int, index: int):
    return x.select(axis, index)


def _sv_range(start, limit, delta, dtype, like):
    import torch

    # On ``like``'s device (a graph input): a plain arange lands on the CPU, and the engine on CUDA then mixes
    # devices ("Tensor on device cuda:0 is not on the expected device cpu!", BERT's position ids on the H200).
    integral = all(isinstance(v, (int, torch.SymInt)) or (isinstance(v, float) and v.is_integer())
                   for v in (start, limit, delta))
    if integral and dtype.is_floating_point:  # float bounds with whole values: count in integers, then cast
        return torch.arange(int(start) if isinstance(start, float) else start,
                            int(limit) if isinstance(limit, float) else limit,
                            int(delta) if isinstance(delta, float) else delta, device=like.device).to(dtype)
    return torch.arange(start, limit, delta, dtype=dtype, device=like.device)


def _sv_slice_values(values, starts, ends):
    return list(values[starts[0]:ends[0]])


def _sv_as_list(value):
    return list(value) if isinstance(value, list) else [value]


def _sv_slice(x, starts, ends, axes, steps):
    """ONNX Slice with Python (maybe symbolic) bounds. torch slices only forwards: an axis with a negative step
    is flipped and sliced forwards over the mirrored bounds (ONNX clamps those to [0, n-1] and [-1, n-1])."""
    import torch

    index: list[Any] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        if step > 0:
            index[axis] = slice(start, end, step)
            continue
        size = x.shape[axis]
        start = torch.sym_min(torch.sym_max(start + size if start < 0 else start, 0), size - 1)
        end = torch.sym_min(torch.sym_max(end + size if end < 0 else end, -1), size - 1)
        x = x.flip(axis)
        index[axis] = slice(size - 1 - start, size - 1 - end, -step)
    return x[tuple(index)]


def _sv_reduce_sum(x, axes, keepdims: bool, noop: bool):
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    return x.sum(dim=sorted(a % x.dim() for a in axes), keepdim=keepdims)


def _sv_topk(x, k, axis: int, largest: bool, ordered: bool):
    """TopK whose k is shape arithmetic (a symbolic size, or a list of one): onnx2torch's passes the list to
    torch.topk. Sorted, it is a stable sort as in onnx_ops' constant-k TopK (ties keep the lower index, ONNX's rule)."""
    import torch

    k = k[0] if isinstance(k, (list, tuple)) else k
    if not ordered:
        found = torch.topk(x, k, dim=axis, largest=largest, sorted=False)
        return found.values, found.indices
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


def _sv_pad(x, pads, value):
    """Constant Pad whose pads are shape arithmetic (onnx2torch's calls ``.tolist()`` on them): ONNX's
    [begin..., end...] as torch's (begin, end) pairs from the last axis."""
    import torch.nn.functional as F

    middle = len(pads) // 2
    torch_pads = [p for begin, end in zip(pads[:middle][::-1], pads[middle:][::-1]) for p in (begin, end)]
    return F.pad(x, torch_pads, mode="constant", value=value)


def _range_dtype(gm, args):
    """The Range's dtype: its constant start's or delta's, else int64 (shape arithmetic)."""
    for arg in (args[0], args[2]):
        if getattr(arg, "op", None) == "get_attr":
            value = gm
            for part in str(arg.target).split("."):
                value = getattr(value, part)
            return value.dtype
    return _torch().int64


_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "_onnx_div": "div"}
_COMPARE = {"eq": "eq", "greater": "gt", "less": "lt", "greater_equal": "ge", "less_equal": "le"}
# Ops taking a shape-like second input, by the converted module's class.
_SHAPED = {"OnnxReshape": _sv_reshape, "OnnxReshapeAllowZero": _sv_reshape_literal, "OnnxExpand": _sv_expand,
           "OnnxTile": _sv_tile}


def specialize_shape_values(gm, log: list[str]) -> None:
    """Make shape arithmetic and shape-like initializer arguments Python values; drop Dropout.

    onnx2torch passes shape-like inputs (Reshape's shape, Slice's starts, ReduceSum's axes)
    as tensors and reads their values at run time, and computes dynamic shapes with
    tensors (Shape -> Gather -> Concat -> Reshape). torch.export traces weights and
    intermediate tensors symbolically, so such reads are data-dependent and fail. Here
    the values become Python constants and symbolic sizes instead.
    """
    torch = _torch()
    graph = gm.graph
    lowered: set = set()

    def initializer(arg):
        """The tensor a get_attr node reads, or an ONNX Constant node holds; else None."""
        if getattr(arg, "op", None) == "call_module" and not arg.args \
                and type(gm.get_submodule(arg.target)).__name__ == "OnnxConstant":
            value = gm.get_submodule(arg.target).value  # a Constant node that was not folded into an initializer
            return value if isinstance(value, torch.Tensor) else None
        if getattr(arg, "op", None) != "get_attr":
            return None
        value = gm
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None

    def const(arg):
        """An integer initializer as a Python int (0-D) or list (1-D); else None."""
        value = initializer(arg)
        if value is None or value.is_floating_point() or value.dim() > 1 or value.numel() > 64:
            return None
        return int(value.item()) if value.dim() == 0 else [int(v) for v in value.tolist()]

    def number(arg):
        """A one-element initializer of any dtype as a Python number; else None."""
        value = initializer(arg)
        return value.item() if value is not None and value.numel() == 1 else None

    def value(arg):
        if arg in lowered:
            return arg
        return const(arg)

    changed: dict[str, int] = {}

    def replace(node, fn, args) -> None:
        with graph.inserting_before(node):
            new = graph.call_function(fn, tuple(args))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        kind = node.target if isinstance(node.target, str) else str(node.target)
        changed[kind_of.get(kind, kind)] = changed.get(kind_of.get(kind, kind), 0) + 1
        return new

    kind_of: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        kind = type(module).__name__
        kind_of[str(node.target)] = kind
        args = list(node.args)
        if node.kwargs and kind not in ("OnnxSlice",):
            continue
        first_lowered = bool(args) and args[0] in lowered
        if kind in ("Dropout", "OnnxDropoutDynamic", "Identity", "OnnxCopyIdentity") and args:
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
            changed[kind] = changed.get(kind, 0) + 1
        elif kind == "OnnxShape":
            lowered.add(replace(node, _sv_shape, [args[0], module._start, module._end]))
        elif kind == "OnnxGather" and first_lowered and module._axis == 0 and (idx := const(args[1])) is not None:
            lowered.add(replace(node, _sv_gather, [args[0], idx]))
        elif kind == "OnnxGather" and not first_lowered and isinstance(const(args[1]), int):
            # A tensor indexed by a constant scalar (ViT's class token x[:, 0], a packed q/k/v split): onnx2torch
            # reads the index with .item() on every call, which torch.export and CUDA graphs handle badly.
            replace(node, _sv_select, [args[0], int(module._axis), const(args[1])])
        elif kind == "OnnxUnsqueezeStaticAxes" and first_lowered and list(module._axes) == [0]:
            lowered.add(replace(node, _sv_unsqueeze, [args[0]]))
        elif kind == "OnnxSqueezeStaticAxes" and first_lowered and list(module.axes or [0]) == [0]:
            lowered.add(replace(node, _sv_squeeze, [args[0]]))
        elif kind in ("OnnxSqueezeDynamicAxes", "OnnxSqueezeStaticAxes") and first_lowered and len(args) == 1:
            lowered.add(replace(node, _sv_squeeze, [args[0]]))
        elif kind in ("OnnxSqueezeDynamicAxes", "OnnxUnsqueezeDynamicAxes") and len(args) == 2 \
                and (axes := const(args[1])) is not None:
            axes = axes if isinstance(axes, list) else [axes]
            if first_lowered and axes == [0]:
                fn = _sv_squeeze if kind == "OnnxSqueezeDynamicAxes" else _sv_unsqueeze
                lowered.add(replace(node, fn, [args[0]]))
            elif not first_lowered:
                fn = _sv_squeeze_dims if kind == "OnnxSqueezeDynamicAxes" else _sv_unsqueeze_dims
                replace(node, fn, [args[0], axes])
        elif kind == "OnnxCast" and first_lowered and not module.torch_dtype.is_floating_point:
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
        elif kind == "OnnxCast" and first_lowered and node.users and all(
                user.op == "call_module" and type(gm.get_submodule(user.target)).__name__ == "OnnxRange"
                for user in node.users):
            # A size cast to float only to count with (YOLO's anchor grid: Range(0.0, float(w), 1.0)): the Range
            # counts in integers and casts (see _sv_range), so the size stays a Python value.
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
        elif kind == "OnnxCast" and first_lowered:  # sizes read as floats elsewhere: a tensor again, then cast
            anchor = next(n for n in graph.nodes if n.op == "placeholder")
            with graph.inserting_before(node):
                node.args = (graph.call_function(_sv_tensor, (args[0], anchor)),)
        elif kind == "OnnxConcat" and any(a in lowered for a in args) and all(value(a) is not None for a in args):
            lowered.add(replace(node, _sv_concat, [value(a) for a in args]))
        elif kind == "OnnxBinaryMathOperation" and len(args) == 2 and any(a in lowered for a in args) \
                and all(value(a) is not None for a in args) and module.broadcast is None:
            op = _BINARY.get(getattr(module.math_op_function, "__name__", ""))
            if op is not None:
                lowered.add(replace(node, _sv_binary, [op, value(args[0]), value(args[1])]))
        elif kind == "OnnxCompare" and len(args) == 2 and any(a in lowered for a in args) \
                and all(value(a) is not None for a in args) \
                and (op := _COMPARE.get(getattr(module.compare_function, "__name__", ""))) is not None:
            lowered.add(replace(node, _sv_binary, [op, value(args[0]), value(args[1])]))
        elif kind == "OnnxMinMax" and any(a in lowered for a in args) and all(value(a) is not None for a in args):
            lowered.add(replace(node, _sv_minmax, [module._op_type, *(value(a) for a in args)]))
        elif kind == "OnnxPadDynamic" and len(args) >= 2 and args[1] in lowered and module.mode == "constant" \
                and (len(args) == 2 or (fill := number(args[2])) is not None):
            replace(node, _sv_pad, [args[0], args[1], 0.0 if len(args) == 2 else fill])
        elif kind == "OnnxTopK" and len(args) == 2 and args[1] in lowered:
            replace(node, _sv_topk, [args[0], args[1], int(module.dim), bool(module.largest), bool(module.sorted)])
        elif kind in ("OnnxReshape", "OnnxReshapeAllowZero") and first_lowered and const(args[1]) == [-1]:
            lowered.add(replace(node, _sv_as_list, [args[0]]))
        elif kind in _SHAPED and len(args) == 2 and value(args[1]) is not None:
            fn = _SHAPED[kind]
            replace(node, fn, [args[0], value(args[1])])
        elif kind == "OnnxSlice" and len(args) >= 3:
            params = args[1:] + [node.kwargs[k] for k in ("axes", "steps") if k in node.kwargs]
            values = [value(a) for a in params]
            steps = const(params[3]) if len(params) > 3 else None
            if all(v is not None for v in values) and (steps is None or all(step != 0 for step in steps)) \
                    and (steps is None or all(step > 0 for step in steps) or not first_lowered):
                starts, ends = values[0], values[1]
                if first_lowered and len(params) <= 3:  # a slice of a shape: Python list slicing
                    lowered.add(replace(node, _sv_slice_values, [args[0], starts, ends]))
                elif not first_lowered:
                    count = len(const(params[0]) or const(params[1]) or [0])
                    axes = values[2] if len(values) > 2 else list(range(count))
                    replace(node, _sv_slice, [args[0], starts, ends, axes, steps or [1] * count])
        elif kind == "OnnxRange" and len(args) == 3 and any(a in lowered for a in args) \
                and all(value(a) is not None or number(a) is not None for a in args):
            anchor = next(n for n in graph.nodes if n.op == "placeholder")
            bounds = [value(a) if value(a) is not None else number(a) for a in args]
            replace(node, _sv_range, [*bounds, _range_dtype(gm, args), anchor])
        elif kind == "OnnxReduceSumDynamicAxes" and len(args) == 2 and (axes := const(args[1])) is not None:
            axes = axes if isinstance(axes, list) else [axes]
            replace(node, _sv_reduce_sum, [args[0], axes, bool(module._keepdims), bool(module._noop_with_empty_axes)])
    if changed:
        graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        log.append("shape arguments made static for torch.export: " + ", ".join(f"{k} x{v}" for k, v in sorted(changed.items())))
