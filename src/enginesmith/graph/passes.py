"""Graph passes: small functions ModelProto -> ModelProto, run and checked one at a time.

:func:`optimize` runs a list of passes. After each one the model before and the model
after are run by ONNX Runtime (through the backend module) on the same generated
inputs; when their outputs differ beyond the tolerance, or the pass fails, or the
result is not a valid model, the pass is rolled back and the reason recorded in the
:class:`PassSummary`. Passes that are libraries' work (constant folding, dead-node
elimination, simplification) call onnx-graphsurgeon / onnxslim; BatchNorm folding and
training-node removal are written here.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import MissingDependencyError
from ..signature import is_named_symbol
from ._onnx import (
    TensorTypes,
    consumers,
    copy_model_frame,
    dims_of,
    plain_runner,
    produced_tensors,
    random_array,
    rename_uses,
    unique_name,
    user_inputs,
    with_outputs,
)
from .surgery import GraphSurgeryError, convert_opset, cut_subgraph, fix_shapes, make_dynamic_noted, rename_io

PassSpec = str | tuple[str, Mapping[str, Any]]
GRAPH_EXTRA = "pip install 'enginesmith[graph]'"


@dataclass(frozen=True)
class GraphPass:
    name: str
    # Returns the new model, or (the new model, notes on what it rewrote for the build log).
    func: Callable[..., onnx.ModelProto | tuple[onnx.ModelProto, list[str]]]
    description: str
    # Run by ``build`` unless turned off.
    default: bool = False
    # Takes keyword arguments (shapes, names, an opset); never a default.
    needs_args: bool = False


PASSES: dict[str, GraphPass] = {}


def register(name: str, description: str, default: bool = False, needs_args: bool = False):
    def wrap(func: Callable[..., onnx.ModelProto]) -> Callable[..., onnx.ModelProto]:
        PASSES[name] = GraphPass(name, func, description, default, needs_args)
        return func

    return wrap


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


# --------------------------------------------------------------------------- passes written here


@register("remove_training_nodes", "remove Identity and inference-time Dropout nodes (rewire their consumers)", default=True)
def remove_training_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    out = _copy(model)
    graph = out.graph
    fixed = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    types = TensorTypes(out)
    while True:
        outputs = {o.name for o in graph.output}
        uses = consumers(graph)
        producers = produced_tensors(graph)
        target = None
        for index, node in enumerate(graph.node):
            if not _standard(node) or node.op_type not in ("Identity", "Dropout") or not node.input or not node.output:
                continue
            if node.op_type == "Dropout":
                if any(o and (o in outputs or uses.get(o)) for o in node.output[1:]):
                    continue  # the mask is used
                if len(node.input) > 2 and node.input[2]:
                    flag = types.constant(node.input[2])
                    if flag is None or bool(np.asarray(flag).any()):
                        continue  # training mode on, or decided at run time
            src, dst = node.input[0], node.output[0]
            if not src:
                continue
            if dst not in outputs:
                target = (index, src, dst, False)
                break
            if src not in fixed and src not in outputs and src in producers:
                target = (index, src, dst, True)
                break
        if target is None:
            _drop_unused_initializers(graph)  # e.g. a removed Dropout's ratio
            return out
        index, src, dst, to_output = target
        del graph.node[index]
        if to_output:
            # The producer writes the graph output directly; readers of src read dst.
            rename_uses(graph, src, dst, outputs=True)
            for value in list(graph.value_info):
                if value.name == src:
                    graph.value_info.remove(value)
        else:
            rename_uses(graph, dst, src)
            for value in list(graph.value_info):
                if value.name == dst:
                    graph.value_info.remove(value)


@register("fold_batchnorm", "fold inference BatchNormalization into the preceding Conv or Gemm weights", default=True)
def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    out = _copy(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits) | {v.name for v in graph.input} | set(produced_tensors(graph))
    uses = consumers(graph)
    producers = produced_tensors(graph)
    outputs = {o.name for o in graph.output}
    folded: list[int] = []
    new_inits: list[onnx.TensorProto] = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or not _standard(bn) or len(bn.input) < 5:
            continue
        if _attr(bn, "training_mode", 0) or any(o for o in bn.output[1:]) or _attr(bn, "spatial", 1) != 1:
            continue
        x = bn.input[0]
        if x not in producers or x in outputs or len(uses.get(x, [])) != 1:
            continue
        prev = graph.node[producers[x]]
        if prev.op_type not in ("Conv", "Gemm") or not _standard(prev) or len(prev.output) != 1:
            continue
        stats = [inits.get(n) for n in bn.input[1:5]]
        if any(t is None for t in stats) or len(prev.input) < 2 or prev.input[1] not in inits:
            continue
        scale, bias, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in stats)
        factor = scale / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        weight_tensor = inits[prev.input[1]]
        weight = numpy_helper.to_array(weight_tensor)
        has_bias = len(prev.input) > 2 and bool(prev.input[2])
        if has_bias and prev.input[2] not in inits:
            continue
        old_bias = numpy_helper.to_array(inits[prev.input[2]]).astype(np.float64) if has_bias else None
        if prev.op_type == "Conv":
            if weight.ndim < 3 or weight.shape[0] != factor.size:
                continue
            new_weight = weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
            new_bias = ((old_bias if old_bias is not None else 0.0) - mean) * factor + bias
        else:
            trans_b = _attr(prev, "transB", 0)
            if weight.ndim != 2 or weight.shape[0 if trans_b else 1] != factor.size:
                continue
            new_weight = weight.astype(np.float64) * (factor[:, None] if trans_b else factor[None, :])
            beta = float(_attr(prev, "beta", 1.0))
            new_bias = ((beta * old_bias if old_bias is not None else 0.0) - mean) * factor + bias
            _set_attr(prev, "beta", 1.0)
        dtype = weight.dtype
        w_name = unique_name(f"{prev.input[1]}_bnfolded", taken)
        b_name = unique_name(f"{prev.name or prev.op_type}_bias_bnfolded", taken)
        new_inits += [numpy_helper.from_array(new_weight.astype(dtype), w_name),
                      numpy_helper.from_array(np.asarray(new_bias).astype(dtype), b_name)]
        prev.input[1] = w_name
        if has_bias:
            prev.input[2] = b_name
        else:
            prev.input.append(b_name)
        prev.output[0] = bn.output[0]
        folded.append(next(i for i, n in enumerate(graph.node) if n is bn))
        for value in list(graph.value_info):
            if value.name == x:
                graph.value_info.remove(value)
    if not folded:
        return out
    for index in sorted(folded, reverse=True):
        del graph.node[index]
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return out


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = set(consumers(graph)) | {o.name for o in graph.output} | {v.name for v in graph.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


# --------------------------------------------------------------------------- passes from libraries


def _graphsurgeon():
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        try:
            from onnxslim.third_party import onnx_graphsurgeon as gs
        except ImportError:
            raise MissingDependencyError(f"this pass needs onnx-graphsurgeon or onnxslim: {GRAPH_EXTRA}") from None
    return gs


def _via_graphsurgeon(model: onnx.ModelProto, edit: Callable[[Any], Any]) -> onnx.ModelProto:
    gs = _graphsurgeon()
    # graph-surgeon edits the protos of If/Loop bodies in place: give it a copy, so a pass that is
    # rolled back leaves the model before it intact.
    graph = gs.import_onnx(_copy(model))
    edit(graph)
    exported = gs.export_onnx(graph, do_type_check=False)
    return copy_model_frame(model, exported.graph)


@register("fold_constants", "fold constant subgraphs into initializers (onnx-graphsurgeon)", default=True)
def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    return _via_graphsurgeon(model, lambda g: g.fold_constants().cleanup().toposort())


@register("eliminate_dead_nodes", "remove nodes and weights no output depends on (onnx-graphsurgeon cleanup)", default=True)
def eliminate_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    return _via_graphsurgeon(model, lambda g: g.cleanup(remove_unused_node_outputs=False).toposort())


@register("simplify", "simplify with onnxslim (constant folding, redundant-op elimination, fusions)", default=True)
def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        raise MissingDependencyError(f"the simplify pass needs onnxslim: {GRAPH_EXTRA}") from None
    result = onnxslim.slim(_copy(model))
    if result is None:
        raise RuntimeError("onnxslim returned no model")
    return result


# --------------------------------------------------------------------------- passes that take arguments


@register("fix_shapes", "fix input shapes: shapes={'x': (1, 3, 224, 224)}", needs_args=True)
def _fix_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    return fix_shapes(model, shapes)


@register("make_dynamic", "mark input axes dynamic: axes={'x': [0]} (a batch-1 export's Reshapes then carry the batch)",
          needs_args=True)
def _make_dynamic(model: onnx.ModelProto, axes: Mapping[str, Sequence[int]]) -> tuple[onnx.ModelProto, list[str]]:
    return make_dynamic_noted(model, axes)


@register("convert_opset", "convert to another default-domain opset: opset=17", needs_args=True)
def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    return convert_opset(model, int(opset))


@register("rename_io", "rename inputs and outputs: mapping={'old': 'new'}", needs_args=True)
def _rename_io(model: onnx.ModelProto, mapping: Mapping[str, str]) -> onnx.ModelProto:
    return rename_io(model, mapping)


@register("cut", "keep the subgraph between tensors: inputs=[...], outputs=[...]", needs_args=True)
def _cut(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    return cut_subgraph(model, inputs, outputs)


DEFAULT_PASSES: tuple[str, ...] = tuple(name for name, p in PASSES.items() if p.default)


def build_passes(import_options: Any = None, disabled: Iterable[str] = ()) -> list[PassSpec]:
    """The passes ``build`` runs: shapes and dynamic axes the import options ask for, the defaults, then the opset.

    Opset conversion comes last so that nodes the defaults remove (Identity, Dropout) need no conversion.
    """
    specs: list[PassSpec] = []
    if import_options is not None:
        if getattr(import_options, "input_shapes", None):
            specs.append(("fix_shapes", {"shapes": dict(import_options.input_shapes)}))
        if getattr(import_options, "dynamic_axes", None):
            specs.append(("make_dynamic", {"axes": dict(import_options.dynamic_axes)}))
    off = set(disabled)
    unknown = sorted(off - set(PASSES))
    if unknown:
        raise GraphSurgeryError(f"unknown graph pass '{unknown[0]}': passes are {', '.join(PASSES)}")
    specs += [name for name in DEFAULT_PASSES if name not in off]
    if import_options is not None and getattr(import_options, "opset", None):
        specs.append(("convert_opset", {"opset": int(import_options.opset)}))
    return specs


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class PassTolerance:
    """Outputs agree when |after - before| <= atol x max(1, max|before|) + rtol x |before| element-wise."""

    rtol: float = 1e-4
    atol: float = 1e-5


@dataclass
class CheckResult:
    ok: bool
    reason: str = ""
    max_abs_diff: float | None = None


class _Cache:
    """Outputs of models already run on given feeds (a model is run at most once per feed set)."""

    def __init__(self) -> None:
        self._runs: dict[tuple, tuple[onnx.ModelProto, dict[str, np.ndarray]]] = {}

    def run(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
        digest = tuple(sorted((k, v.shape, v.dtype.str, hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest())
                             for k, v in feeds.items()))
        key = (id(model), digest, tuple(extra))
        if key not in self._runs:
            runnable = with_outputs(model, extra) if extra else model
            outputs = plain_runner(runnable)(dict(feeds))
            self._runs[key] = (model, outputs)  # keeps the model alive so its id is not reused
        return self._runs[key][1]


# How the reason of a pass that was not applied because its check could not run begins.
UNCHECKABLE = "outputs cannot be checked"


def _error_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def check_equivalent(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    tolerance: PassTolerance | None = None,
    *,
    seed: int = 0,
    batch: int = 2,
    other_dims: int = 8,
    cache: _Cache | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> CheckResult:
    """Do ``before`` and ``after`` compute the same outputs on generated inputs?

    Inputs and outputs are matched by name; a renamed one by position; a tensor that is an
    intermediate of ``before`` (after a cut) is read from ``before``'s run. Symbolic dimensions
    get ``batch`` on axis 0 and ``other_dims`` elsewhere. Dimensions ``after`` made dynamic are
    also run once at another size; an axis 0 that was fixed at 1 (a batch) is run at
    :data:`ITEMS_CHECKED` distinct items, each item's outputs compared with ``before`` run on that
    item alone (a model that runs at batch N but mixes its items fails). ``feeds`` (sample inputs
    by name) are used instead of generated inputs wherever their shapes fit both models.
    """
    tolerance = tolerance or PassTolerance()
    cache = cache or _Cache()
    pre_in, post_in = user_inputs(before.graph), user_inputs(after.graph)
    pre_out = [o.name for o in before.graph.output]
    post_out = [o.name for o in after.graph.output]
    pre_names = [v.name for v in pre_in]
    pre_tensors = set(produced_tensors(before.graph))
    renamed_in = len(pre_in) == len(post_in)
    renamed_out = len(pre_out) == len(post_out)

    in_map: dict[str, tuple[str, str]] = {}  # post input -> ("input"|"tensor", name in before)
    for j, value in enumerate(post_in):
        if value.name in pre_names:
            in_map[value.name] = ("input", value.name)
        elif value.name in pre_tensors:
            in_map[value.name] = ("tensor", value.name)
        elif renamed_in and pre_names[j] not in {v.name for v in post_in}:
            in_map[value.name] = ("input", pre_names[j])
        else:
            return CheckResult(False, f"input '{value.name}' has no counterpart in the model before the pass")
    out_map: dict[str, str] = {}
    for j, name in enumerate(post_out):
        if name in pre_out or name in pre_tensors:
            out_map[name] = name
        elif renamed_out and pre_out[j] not in post_out:
            out_map[name] = pre_out[j]
        else:
            return CheckResult(False, f"output '{name}' has no counterpart in the model before the pass")

    # Concrete shapes: fixed dims of either side win, symbols get sizes by name.
    post_by_pre = {src: value for value in post_in for kind, src in [in_map[value.name]] if kind == "input"}
    sizes: dict[str, int] = {}
    given = dict(feeds or {})
    feeds = {}
    rng = np.random.default_rng(seed)
    dynamic_axes: dict[str, list[int]] = {}
    for value in pre_in:
        post_value = post_by_pre.get(value.name)
        post_dims = dims_of(post_value.type) if post_value is not None else None
        pre_dims = dims_of(value.type)
        if pre_dims is None:
            if post_dims is None:
                return CheckResult(False, f"outputs cannot be checked: input '{value.name}' has no known rank "
                                          "(fix its shape first)")
            pre_dims = [None] * len(post_dims)
        if post_dims is not None and len(post_dims) != len(pre_dims):
            return CheckResult(False, f"input '{value.name}' changed rank from {len(pre_dims)} to {len(post_dims)}")
        shape = []
        for axis, d in enumerate(pre_dims):
            p = post_dims[axis] if post_dims is not None else None
            if isinstance(d, int) and d > 0:
                shape.append(d)
                if post_value is not None and not (isinstance(p, int) and p > 0):
                    dynamic_axes.setdefault(post_value.name, []).append(axis)
            elif isinstance(p, int) and p > 0:
                shape.append(p)
            else:
                # Only named symbols are shared; '?', '-1' and converters' 'unk__N' are each their own size.
                key = d if is_named_symbol(d) else f"{value.name}:{axis}"
                sizes.setdefault(key, batch if axis == 0 else other_dims)
                shape.append(sizes[key])
        elem = value.type.tensor_type.elem_type
        sample = given.get(value.name)
        if sample is not None and _fits(sample.shape, pre_dims) and (post_dims is None or _fits(sample.shape, post_dims)):
            feeds[value.name] = sample
            continue
        try:
            feeds[value.name] = random_array(helper.tensor_dtype_to_np_dtype(elem), tuple(shape), rng)
        except (TypeError, KeyError, ValueError) as exc:
            return CheckResult(False, f"cannot generate inputs to check with: {exc}")

    extra = [src for kind, src in in_map.values() if kind == "tensor"] + [
        src for name, src in out_map.items() if src not in pre_out
    ]
    try:
        reference = cache.run(before, feeds, extra)
    except Exception as exc:  # noqa: BLE001 - BuildError from the backend, or ORT run errors
        return CheckResult(False, f"outputs cannot be checked: ONNX Runtime cannot run the model before the pass ({_error_line(exc)})")
    post_feeds = {name: (feeds[src] if kind == "input" else reference[src]) for name, (kind, src) in in_map.items()}
    try:
        got = cache.run(after, post_feeds)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(False, f"the model after the pass does not run: {_error_line(exc)}")
    worst = 0.0
    for name, src in out_map.items():
        problem, max_abs = _compare(np.asarray(reference[src]), np.asarray(got[name]), tolerance)
        worst = max(worst, max_abs)
        if problem:
            return CheckResult(False, f"output '{name}' {problem}", max_abs if problem.startswith("differs:") else None)
    if not dynamic_axes:
        return CheckResult(True, "", worst)
    # A batch (axis 0 fixed at 1) made dynamic is checked item by item; other axes must accept another size.
    batched = [name for name, axes in dynamic_axes.items()
               if 0 in axes and post_feeds[name].shape[0] == 1 and in_map[name][0] == "input"]
    if batched and all(kind == "input" for kind, _ in in_map.values()):
        outcome = _check_items(before, after, feeds, in_map, out_map, batched, tolerance, cache, rng,
                               extra=[src for name, src in out_map.items() if src not in pre_out])
        if not outcome.ok:
            return outcome
        worst = max(worst, outcome.max_abs_diff or 0.0)
        dynamic_axes = {n: [a for a in axes if not (a == 0 and n in batched)] for n, axes in dynamic_axes.items()}
        dynamic_axes = {n: axes for n, axes in dynamic_axes.items() if axes}
    if dynamic_axes:
        alt = {}
        for name, value in post_feeds.items():
            shape = list(value.shape)
            for axis in dynamic_axes.get(name, []):
                shape[axis] += 1
            alt[name] = random_array(value.dtype, tuple(shape), rng)
        try:
            cache.run(after, alt)
        except Exception as exc:  # noqa: BLE001
            axes = ", ".join(f"{n} axis {a}" for n, ax in dynamic_axes.items() for a in ax)
            return CheckResult(False, f"the model does not run when the dynamic axes ({axes}) change size: {_error_line(exc)}", worst)
    return CheckResult(True, "", worst)


# How many distinct items a batch made dynamic is checked with (see _check_items).
ITEMS_CHECKED = 3


def _compare(ref: np.ndarray, val: np.ndarray, tolerance: PassTolerance) -> tuple[str, float]:
    """What is wrong with ``val`` as ``ref`` ("" when they agree within ``tolerance``), and the max abs diff."""
    if ref.shape != val.shape:
        return f"has shape {val.shape}, was {ref.shape}", 0.0
    if ref.dtype != val.dtype:
        return f"has dtype {val.dtype}, was {ref.dtype}", 0.0
    if ref.dtype.kind != "f":
        differ = int(np.sum(ref != val))
        return (f"differs in {differ} of {ref.size} values" if differ else ""), 0.0
    r, v = ref.astype(np.float64), val.astype(np.float64)
    finite = np.isfinite(r)
    scale = float(np.abs(r[finite]).max(initial=0.0))
    diff = np.abs(r - v)
    bad_nan = np.isnan(r) != np.isnan(v)
    close = np.where(finite, diff <= tolerance.atol * max(1.0, scale) + tolerance.rtol * np.abs(r), r == v)
    max_abs = float(np.where(finite & np.isfinite(v), diff, 0.0).max(initial=0.0))
    if bad_nan.any() or not bool(np.all(close | (np.isnan(r) & np.isnan(v)))):
        return (f"differs: max abs diff {max_abs:.3g} "
                f"(values up to {scale:.3g}; tolerance rtol {tolerance.rtol:g}, atol {tolerance.atol:g})"), max_abs
    return "", max_abs


def _check_items(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    in_map: Mapping[str, tuple[str, str]],
    out_map: Mapping[str, str],
    batched: Sequence[str],
    tolerance: PassTolerance,
    cache: _Cache,
    rng: np.random.Generator,
    extra: Sequence[str] = (),
) -> CheckResult:
    """Run ``after`` once on :data:`ITEMS_CHECKED` distinct items stacked on axis 0 of its inputs ``batched``
    (fixed at 1 in ``before``); each item's slice of every output must be ``before``'s run on that item alone.

    ``feeds`` (by ``before``'s input names) is the first item; the others are generated. Inputs not
    batched get the same value for every item.
    """
    count = ITEMS_CHECKED
    batched_src = {in_map[name][1] for name in batched}
    items = [dict(feeds)] + [
        {name: random_array(value.dtype, value.shape, rng) if name in batched_src else value for name, value in feeds.items()}
        for _ in range(count - 1)
    ]
    post_feeds = {name: (np.concatenate([item[src] for item in items]) if name in batched else feeds[src])
                  for name, (_, src) in in_map.items()}
    axes = ", ".join(f"{name} axis 0" for name in batched)
    try:
        singles = [cache.run(before, item, extra) for item in items]
    except Exception as exc:  # noqa: BLE001
        # Not UNCHECKABLE: that would hold back every later pass, while only this one lacks a reference.
        return CheckResult(False, f"the batch cannot be checked item by item: ONNX Runtime cannot run the model before "
                                  f"the pass on a generated item ({_error_line(exc)})")
    try:
        got = cache.run(after, post_feeds)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(False, f"the model does not run when the dynamic axes ({axes}) change size: {_error_line(exc)}")
    stays = f"the model stays at batch 1 (checked at batch {count} against each item run alone)"
    worst = 0.0
    for name, src in out_map.items():
        refs = [np.asarray(single[src]) for single in singles]
        val = np.asarray(got[name])
        if refs[0].ndim == 0 or refs[0].shape[0] != 1:
            return CheckResult(False, f"output '{name}' has shape {refs[0].shape} for one item: its dim 0 is not the batch "
                                      f"(a flat list, e.g. of all detections?), so its items cannot be told apart; {stays}")
        expected = (count, *refs[0].shape[1:])
        if val.shape != expected:
            return CheckResult(False, f"output '{name}' has shape {val.shape} at batch {count}, not {expected}: its dim 0 "
                                      f"does not follow the batch, so the model mixes batch items (or lists them together); "
                                      f"{stays}")
        for index, ref in enumerate(refs):
            problem, max_abs = _compare(ref, val[index:index + 1], tolerance)
            worst = max(worst, max_abs)
            if problem:
                return CheckResult(False, f"output '{name}' mixes batch items: item {index + 1} of {count} is not what that "
                                          f"item gives alone at batch 1 ({problem}); {stays}", max_abs or None)
    return CheckResult(True, "", worst)


def _fits(shape: Sequence[int], dims: Sequence[Any]) -> bool:
    return len(shape) == len(dims) and all(not (isinstance(d, int) and d > 0) or d == n for d, n in zip(dims, shape))


# --------------------------------------------------------------------------- running passes


@dataclass
class PassResult:
    name: str
    # applied | unchanged | rolled_back | skipped | unchecked (applied with checking off)
    status: str
    nodes_before: int
    nodes_after: int
    reason: str = ""
    max_abs_diff: float | None = None
    seconds: float = 0.0
    args: dict[str, Any] = field(default_factory=dict)
    # What the pass rewrote besides the obvious (e.g. make_dynamic's batch-1 Reshape targets).
    notes: list[str] = field(default_factory=list)


@dataclass
class PassSummary:
    nodes_before: int
    nodes_after: int
    checked: bool
    results: list[PassResult] = field(default_factory=list)

    @property
    def applied(self) -> list[str]:
        return [r.name for r in self.results if r.status in ("applied", "unchecked")]

    @property
    def rolled_back(self) -> list[PassResult]:
        return [r for r in self.results if r.status == "rolled_back"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["applied"] = self.applied
        return data

    def summary(self) -> str:
        parts = [f"graph passes: {self.nodes_before} -> {self.nodes_after} nodes"]
        changed = [f"{r.name} ({r.nodes_after - r.nodes_before:+d})" for r in self.results if r.status in ("applied", "unchecked")]
        parts.append("applied " + (", ".join(changed) if changed else "none"))
        unchecked = [r.name for r in self.rolled_back if r.reason.startswith(UNCHECKABLE)]
        if unchecked:
            parts.append("not applied (their checks could not run) " + ", ".join(unchecked))
        rolled = [r.name for r in self.rolled_back if r.name not in unchecked]
        if rolled:
            parts.append("rolled back " + ", ".join(rolled))
        return "; ".join(parts)

    def lines(self) -> list[str]:
        """The summary and one line per pass that did something, for a build log."""
        out = [self.summary()]
        for r in self.results:
            if r.status in ("applied", "unchecked"):
                diff = f", max abs diff {r.max_abs_diff:.2g}" if r.max_abs_diff is not None else ""
                out.append(f"  {r.name}: {r.nodes_before} -> {r.nodes_after} nodes{diff}"
                           + (" (not checked)" if r.status == "unchecked" else ""))
                out += [f"    {note}" for note in r.notes]
            elif r.status == "rolled_back" and r.reason.startswith(UNCHECKABLE):
                out.append(f"  {r.name}: not applied: {r.reason}")
            elif r.status in ("rolled_back", "skipped"):
                out.append(f"  {r.name}: {r.status.replace('_', ' ')}: {r.reason}")
        return out


def _spec(spec: PassSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    name, kwargs = spec
    return name, dict(kwargs)


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    # Message equality compares fields (weights by memcmp): far faster than serializing large models.
    return a.graph == b.graph and list(a.opset_import) == list(b.opset_import)


def optimize(
    model: onnx.ModelProto,
    passes: Sequence[PassSpec] | None = None,
    *,
    disabled: Iterable[str] = (),
    check: bool = True,
    tolerance: PassTolerance | None = None,
    seed: int = 0,
    batch: int = 2,
    progress: Callable[[str, int, int | None], None] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, PassSummary]:
    """Run ``passes`` (names, or (name, kwargs)); default: :data:`DEFAULT_PASSES`.

    Each pass is checked numerically against the model before it unless ``check`` is off,
    and rolled back when it fails, breaks the model or changes its outputs; ``feeds`` are the
    inputs to check on (the build's samples; generated where they do not fit). A pass whose
    check cannot run (the model before it does not run on the inputs) is not applied. Bad arguments
    to a pass (a missing tensor, contradictory shapes, an unreachable opset) raise the
    :class:`~enginesmith.graph.surgery.GraphSurgeryError` subclass that says so.
    """
    specs = list(DEFAULT_PASSES if passes is None else passes)
    off = set(disabled)
    unknown = [n for n in (_spec(s)[0] for s in specs) if n not in PASSES] + [n for n in off if n not in PASSES]
    if unknown:
        raise GraphSurgeryError(f"unknown graph pass '{unknown[0]}': passes are {', '.join(PASSES)}")
    summary = PassSummary(nodes_before=len(model.graph.node), nodes_after=len(model.graph.node), checked=check)
    cache = _Cache()
    current = model
    unrunnable: str | None = None
    for step, spec in enumerate(specs):
        name, kwargs = _spec(spec)
        graph_pass = PASSES[name]
        if progress:
            progress("graph passes", step, len(specs))
        result = PassResult(name, "skipped", len(current.graph.node), len(current.graph.node), args=_jsonable(kwargs))
        summary.results.append(result)
        if name in off:
            result.reason = "turned off"
            continue
        if graph_pass.needs_args and not kwargs:
            raise GraphSurgeryError(f"graph pass '{name}' needs arguments: {graph_pass.description}")
        started = time.perf_counter()
        try:
            after = graph_pass.func(current, **kwargs)
            if isinstance(after, tuple):
                after, result.notes = after[0], list(after[1])
        except GraphSurgeryError:
            raise
        except MissingDependencyError as exc:
            result.reason = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a library pass failing on this graph is reported, not fatal
            result.status, result.reason = "rolled_back", f"the pass failed: {type(exc).__name__}: {_error_line(exc)}"
            continue
        finally:
            result.seconds = round(time.perf_counter() - started, 4)
        result.nodes_after = len(after.graph.node)
        if _same(current, after):
            result.status = "unchanged"
            continue
        try:
            onnx.checker.check_model(after)
        except Exception as exc:  # noqa: BLE001 - ValidationError, or size limits
            result.status, result.reason = "rolled_back", f"the result is not a valid ONNX model: {_error_line(exc)}"
            result.nodes_after = result.nodes_before
            continue
        if check:
            if unrunnable is not None:
                outcome = CheckResult(False, unrunnable)
            else:
                outcome = check_equivalent(current, after, tolerance, seed=seed, batch=batch, cache=cache, feeds=feeds)
                if not outcome.ok and outcome.reason.startswith("outputs cannot be checked"):
                    unrunnable = outcome.reason
            result.max_abs_diff = outcome.max_abs_diff
            if not outcome.ok:
                result.status, result.reason = "rolled_back", outcome.reason
                result.nodes_after = result.nodes_before
                continue
            result.status = "applied"
        else:
            result.status = "unchecked"
        current = after
    if progress:
        progress("graph passes", len(specs), len(specs))
    summary.nodes_after = len(current.graph.node)
    return current, summary


def _jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in kwargs.items()}


def describe_passes() -> list[dict[str, Any]]:
    return [{"name": p.name, "description": p.description, "default": p.default, "needs_args": p.needs_args}
            for p in PASSES.values()]


__all__ = [
    "DEFAULT_PASSES",
    "PASSES",
    "CheckResult",
    "GraphPass",
    "PassResult",
    "PassSpec",
    "PassSummary",
    "PassTolerance",
    "build_passes",
    "check_equivalent",
    "describe_passes",
    "eliminate_dead_nodes",
    "fold_batchnorm",
    "fold_constants",
    "optimize",
    "remove_training_nodes",
    "simplify",
]
