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

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import MissingDependencyError
from ._onnx import (
    TensorTypes,
    consumers,
    copy_model_frame,
    produced_tensors,
    rename_uses,
    unique_name,
)
from .checking import UNCHECKABLE, CheckResult, PassTolerance, RunCache, error_line, check_equivalent
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
    cache = RunCache()
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
            result.status, result.reason = "rolled_back", f"the pass failed: {type(exc).__name__}: {error_line(exc)}"
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
            result.status, result.reason = "rolled_back", f"the result is not a valid ONNX model: {error_line(exc)}"
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
