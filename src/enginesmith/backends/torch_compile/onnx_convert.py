"""ONNX -> PyTorch: onnx2torch (plus enginesmith's converters) and the fixes torch.export needs.

``onnx_to_torch`` converts after ONNX Runtime's basic rewrites, makes shape arithmetic
Python values (torch.export cannot read tensor values) and returns exactly the model's
outputs. ``op_status`` answers ``enginesmith inspect --target torch`` per node.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import threading
import types
from typing import Any

import onnx

from ...errors import MissingDependencyError, UnsupportedModelError
from ...signature import Signature
from ..base import node_names
from . import onnx_if, onnx_ops
from .common import ONNX2TORCH_HINT, _torch

_O2T_LOCK = threading.Lock()


def _onnx2torch():
    """onnx2torch with enginesmith's converters (``onnx_ops``) registered."""
    module = _import_onnx2torch()
    onnx_ops.register()
    return module


def _import_onnx2torch():
    """onnx2torch, importable without torchvision.

    onnx2torch imports torchvision at import time only for its NonMaxSuppression and
    RoiAlign converters; when torchvision is absent a placeholder stands in during the
    import (and is removed right after) so every other converter works. NonMaxSuppression
    is converted by ``onnx_ops`` without torchvision; models using RoiAlign then fail with
    a message naming torchvision (see ``_check_ops``).
    """
    with _O2T_LOCK:
        if "onnx2torch" in sys.modules:
            return sys.modules["onnx2torch"]
        if importlib.util.find_spec("onnx2torch") is None:
            raise MissingDependencyError(f"converting ONNX models for the PyTorch backend needs onnx2torch: {ONNX2TORCH_HINT}")
        placeholder = importlib.util.find_spec("torchvision") is None
        if placeholder:
            tv = types.ModuleType("torchvision")
            ops = types.ModuleType("torchvision.ops")

            def _missing(*_args: Any, **_kwargs: Any) -> Any:
                raise MissingDependencyError("this model's RoiAlign nodes need torchvision: pip install torchvision")

            ops.nms = ops.roi_align = ops.box_convert = _missing  # type: ignore[attr-defined]
            tv.ops = ops  # type: ignore[attr-defined]
            sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
        try:
            module = importlib.import_module("onnx2torch")
        except Exception as exc:  # noqa: BLE001 - a broken install must read as a dependency problem
            raise MissingDependencyError(f"onnx2torch could not be imported ({exc}): {ONNX2TORCH_HINT}") from None
        finally:
            if placeholder:
                sys.modules.pop("torchvision", None)
                sys.modules.pop("torchvision.ops", None)
        return module


def _basic_optimized(model: onnx.ModelProto, log: list[str]) -> onnx.ModelProto:
    """ONNX Runtime's provider-independent rewrites (constant folding, no-op removal, Conv+BN).

    Best effort: the original model is used when ONNX Runtime cannot load it, or the
    rewrite leaves ops outside the standard domain.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return model
    with tempfile.TemporaryDirectory(prefix="enginesmith-torch-") as tmp:
        path = os.path.join(tmp, "basic.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = path
        so.log_severity_level = 4
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            optimized = onnx.load(path)
        except Exception as exc:  # noqa: BLE001 - the pre-pass is optional
            log.append(f"ONNX basic optimizations skipped ({str(exc).splitlines()[0][:160]})")
            return model
    odd = sorted({n.op_type for n in optimized.graph.node if n.domain not in ("", "ai.onnx")})
    if odd:
        log.append(f"ONNX basic optimizations skipped (they introduced {', '.join(odd)})")
        return model
    log.append(f"ONNX basic optimizations (constant folding, Conv+BN): {len(model.graph.node)} nodes -> {len(optimized.graph.node)}")
    return optimized


def _opset(model: onnx.ModelProto, domain: str) -> int:
    for entry in model.opset_import:
        if entry.domain == domain or (domain in ("", "ai.onnx") and entry.domain in ("", "ai.onnx")):
            return int(entry.version)
    return 1


def _converter_for(node: onnx.NodeProto, model: onnx.ModelProto):
    from onnx2torch.node_converters import get_converter

    return get_converter(operation_type=node.op_type, version=_opset(model, node.domain), domain=node.domain)


def op_status(model: onnx.ModelProto) -> dict[int, tuple[str, str]]:
    """Per node index: (status, reason), by running the node's converter (onnx2torch's or ``onnx_ops``').

    A converter that exists but refuses the node's attributes (Reshape allowzero with a 0,
    Pad with axes, a Reduce with computed axes) makes the node unsupported with its reason.
    """
    _onnx2torch()
    from onnx2torch.onnx_graph import OnnxGraph

    has_torchvision = importlib.util.find_spec("torchvision") is not None
    try:
        graph = OnnxGraph(model.graph)
        graph_nodes = list(graph.nodes.values())
    except Exception:  # noqa: BLE001 - a graph onnx2torch cannot even read: judge by converter presence only
        graph_nodes = []
    status: dict[int, tuple[str, str]] = {}
    for i, node in enumerate(model.graph.node):
        try:
            converter = _converter_for(node, model)
        except NotImplementedError:
            status[i] = ("unsupported", f"onnx2torch has no converter for {node.domain or 'ai.onnx'} {node.op_type} at opset {_opset(model, node.domain)}")
            continue
        if len(graph_nodes) == len(model.graph.node):
            try:
                with onnx_if.converting(model):
                    converter(graph_nodes[i], graph)
            except NotImplementedError as exc:
                status[i] = ("unsupported", f"the converter refuses it: {exc}")
                continue
            except Exception:  # noqa: BLE001 - other converter failures surface at build with the node named
                pass
        if node.op_type == "RoiAlign" and not has_torchvision:
            status[i] = ("unsupported", "needs torchvision (pip install torchvision)")
        elif node.op_type in ("NonZero", "Unique"):
            status[i] = ("conditional", "data-dependent output shape: torch.export may refuse it")
        else:
            status[i] = ("supported", "")
    return status


def _check_ops(model: onnx.ModelProto) -> None:
    """Raise one error naming every op the converter lacks, with the nodes using it."""
    status = op_status(model)
    bad: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    labels = node_names(model)
    for i, (state, reason) in status.items():
        if state == "unsupported":
            op = model.graph.node[i].op_type
            bad.setdefault(op, []).append(labels[i])
            reasons[op] = reason
    if bad:
        parts = [
            f"'{op}' (nodes: {', '.join(nodes[:5])}{'...' if len(nodes) > 5 else ''}; {reasons[op]})"
            for op, nodes in sorted(bad.items())
        ]
        raise UnsupportedModelError(
            f"the PyTorch backend cannot convert op{'s' if len(bad) > 1 else ''} {', '.join(parts)}; "
            "replace the ops in the model or use another backend (e.g. --backend onnxruntime)"
        )


def _locate_conversion_failure(model: onnx.ModelProto) -> str:
    """The first node whose converter fails, and why (run only after convert() failed)."""
    from onnx2torch.onnx_graph import OnnxGraph

    graph = OnnxGraph(model.graph)
    for onnx_node in graph.nodes.values():
        proto = onnx_node.proto
        try:
            with onnx_if.converting(model):
                _converter_for(proto, model)(onnx_node, graph)
        except Exception as exc:  # noqa: BLE001
            return f"node '{proto.name or onnx_node.unique_name}' (op {proto.op_type}): {exc}"
    return ""


# Shape arithmetic as Python values: ONNX computes shapes with tensors (Shape -> Gather ->
# Unsqueeze -> Concat -> Reshape); torch.export cannot read tensor values, but it traces
# Python ints and symbolic sizes. These helpers carry such values as lists (1-D) or scalars (0-D).


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


def _sv_tensor(values):
    """Shape values (ints, symbolic sizes, or a list of them) as an int64 tensor, for ops that read tensors."""
    import torch

    return torch.tensor(values, dtype=torch.int64)


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


def _specialize_constants(gm, log: list[str]) -> None:
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
            with graph.inserting_before(node):
                node.args = (graph.call_function(_sv_tensor, (args[0],)),)
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


def _fix_outputs(gm, model: onnx.ModelProto, output_names: list[str]) -> None:
    """Make the graph return exactly the model's outputs, in signature order.

    onnx2torch returns one value per producing node; a node with several outputs would
    return them all. Each output is looked up through the modules' ONNX mapping instead.
    """
    import operator

    producers: dict[str, tuple[Any, int, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mapping = getattr(gm.get_submodule(node.target), "onnx_mapping", None)
        if mapping is None:
            continue
        for index, value in enumerate(mapping.outputs):
            producers[value] = (node, index, len(mapping.outputs))
    outputs = []
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    for name in output_names:
        if name not in producers:
            raise UnsupportedModelError(
                f"output '{name}' is not computed by a node (it is a graph input or a weight); "
                "the PyTorch backend needs every output produced by an op"
            )
        node, index, count = producers[name]
        if count == 1:
            outputs.append(node)
        else:
            with gm.graph.inserting_before(output_node):
                outputs.append(gm.graph.call_function(operator.getitem, (node, index)))
    output_node.args = (tuple(outputs),)
    gm.recompile()


def onnx_to_torch(model: onnx.ModelProto, signature: Signature, log: list[str]):
    """An eval-mode torch module taking the signature's inputs in order and returning a tuple of outputs."""
    o2t = _onnx2torch()
    _check_ops(model)
    model = _basic_optimized(model, log)
    try:
        with onnx_if.converting(model):
            gm = o2t.convert(model, attach_onnx_mapping=True)
    except MissingDependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - converter errors are user-facing model problems
        where = _locate_conversion_failure(model)
        raise UnsupportedModelError(
            f"onnx2torch could not convert the model: {where or str(exc).splitlines()[0]}; "
            "use another backend (e.g. --backend onnxruntime)"
        ) from None
    _fix_outputs(gm, model, signature.output_names)
    _specialize_constants(gm, log)
    for branch in _if_branches(gm):  # each If's branches are converted modules of their own
        _specialize_constants(branch, log)
    gm.eval()
    graph_inputs = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    order = [graph_inputs.index(name) for name in signature.input_names]
    log.append(f"converted with onnx2torch {getattr(o2t, '__version__', _dist_version('onnx2torch'))}")
    return gm, order


def _if_branches(gm) -> list:
    found = []
    for module in gm.modules():
        if type(module).__name__ == "OnnxIf":
            found += [module.then_branch, module.else_branch]
    return found


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def retarget_casts(module, dtype, log: list[str]) -> int:
    """Casts to float32 inside a converted graph cast to the engine's ``dtype`` instead.

    The module's weights follow ``module.to(dtype)``, but an ONNX ``Cast(to=FLOAT)`` (a uint8 image
    made float inside a TensorFlow detector) would still hand float32 to fp16 convolutions.
    """
    torch = _torch()
    changed = 0
    for sub in module.modules():
        if type(sub).__name__ == "OnnxCast" and getattr(sub, "torch_dtype", None) is torch.float32:
            sub.torch_dtype = dtype
            changed += 1
    if changed:
        log.append(f"{changed} casts to float32 in the graph cast to {str(dtype).replace('torch.', '')} instead")
    return changed
