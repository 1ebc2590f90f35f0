"""Compatibility reports: can a target build each node of a model, and what would enginesmith fix?

Targets:

``onnxruntime``
    the real thing: the ONNX Runtime backend's :meth:`op_support` asks ONNX Runtime for a
    kernel for every distinct node on the chosen execution providers.
``tensorrt[:VERSION]``
    data: the operator table, supported types and restrictions NVIDIA publishes with the
    ONNX-TensorRT parser (``docs/operators.md`` of onnx/onnx-tensorrt), one JSON file per
    TensorRT major version under ``enginesmith/data/tensorrt/`` (``8.6``, ``10``; default 10).
any other registered backend (``torch`` once it exists)
    that backend's :meth:`op_support`.

Each node is ``supported``, ``conditional`` (supported with a condition, which is given) or
``unsupported``, with the reason and, where enginesmith has one, the fix it applies
(``fixed_by`` names the graph pass).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Mapping

import numpy as np
import onnx

from ..backends import BACKENDS, BuildOptions, get_backend
from ..errors import BackendUnavailableError, UnsupportedModelError
from ._onnx import TensorTypes, infer_shapes, node_labels, opset_of, produced_tensors
from .passes import DEFAULT_PASSES, _attr

STATUSES = ("supported", "conditional", "unsupported")
TENSORRT_VERSIONS = ("8.6", "10")
DEFAULT_TENSORRT = "10"


@dataclass
class NodeCompat:
    node: str
    op_type: str
    domain: str
    status: str
    reason: str
    fix: str = ""
    # The graph pass that fixes or changes this node when build runs it.
    fixed_by: str | None = None

    @property
    def op(self) -> str:
        return f"{self.domain}:{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type


@dataclass
class CompatReport:
    target: str
    target_version: str | None
    source: str
    nodes: list[NodeCompat]
    # Findings about the model as a whole (opset range, a load failure no node explains).
    model: list[NodeCompat] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Passes build would run; an unsupported node fixed by one of them does not block a build.
    passes: list[str] = field(default_factory=lambda: list(DEFAULT_PASSES))

    @property
    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        for entry in self.nodes:
            counts[entry.status] += 1
        return counts

    @property
    def blocking(self) -> list[NodeCompat]:
        """Unsupported findings no enabled pass fixes."""
        return [e for e in self.model + self.nodes if e.status == "unsupported" and e.fixed_by not in self.passes]

    @property
    def buildable(self) -> bool:
        return not self.blocking

    @property
    def target_label(self) -> str:
        return f"{self.target}:{self.target_version}" if self.target_version else self.target

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(counts=self.counts, buildable=self.buildable, target_label=self.target_label)
        return data

    def summary(self) -> str:
        c = self.counts
        head = (f"{self.target_label}: {c['supported']} supported, {c['conditional']} with a condition, "
                f"{c['unsupported']} unsupported of {len(self.nodes)} nodes")
        if self.buildable:
            return head + "; buildable"
        first = self.blocking[0]
        where = f"'{first.node}' ({first.op})" if first.node else "the model"
        more = f" and {len(self.blocking) - 1} more" if len(self.blocking) > 1 else ""
        return f"{head}; NOT buildable: {where}: {first.reason}{more}"


class IncompatibleModelError(UnsupportedModelError):
    """The model has nodes the chosen backend cannot build; ``report`` holds the full report."""

    def __init__(self, message: str, report: CompatReport):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- fixes enginesmith applies


def _pass_fixes(model: onnx.ModelProto) -> dict[int, tuple[str, str]]:
    """node index -> (pass, what it does) for nodes a default pass removes or rewrites."""
    from .passes import _standard

    graph = model.graph
    producers = produced_tensors(graph)
    fixes: dict[int, tuple[str, str]] = {}
    weights = {t.name for t in graph.initializer}
    for index, node in enumerate(graph.node):
        if not _standard(node):
            continue
        if node.op_type in ("Identity", "Dropout"):
            fixes[index] = ("remove_training_nodes", f"{node.op_type} is removed (consumers read its input)")
        elif node.op_type == "BatchNormalization" and node.input and node.input[0] in producers:
            prev = graph.node[producers[node.input[0]]]
            if prev.op_type in ("Conv", "Gemm") and all(n in weights for n in node.input[1:5]):
                fixes[index] = ("fold_batchnorm", f"folded into the weights of {prev.op_type} '{prev.name}'")
    return fixes


def _constant_derived(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from weights and constants only (constant folding turns them into weights)."""
    graph = model.graph
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if node.op_type == "Constant" or (inputs and all(n in const for n in inputs) and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            const |= {o for o in node.output if o}
    return const


# --------------------------------------------------------------------------- TensorRT (data)


@lru_cache(maxsize=None)
def tensorrt_table(version: str) -> dict[str, Any]:
    """The operator table for a TensorRT major version ('8.6', '10', or e.g. '10.3' -> '10')."""
    key = _tensorrt_key(version)
    text = resources.files("enginesmith").joinpath("data", "tensorrt", f"{key}.json").read_text()
    return json.loads(text)


def _tensorrt_key(version: str | None) -> str:
    if not version:
        return DEFAULT_TENSORRT
    version = version.strip()
    if version in TENSORRT_VERSIONS:
        return version
    major = version.split(".")[0]
    if major == "8" and version.startswith("8.6"):
        return "8.6"
    if major in TENSORRT_VERSIONS:
        return major
    raise BackendUnavailableError(
        f"no TensorRT operator table for version '{version}': enginesmith has {', '.join(TENSORRT_VERSIONS)} "
        "(use tensorrt:8.6 or tensorrt:10)"
    )


def _schema_input_index(op: str, opset: int | None, name: str, domain: str = "") -> int | None:
    try:
        schema = onnx.defs.get_schema(op, opset or onnx.defs.onnx_opset_version(), domain)
    except Exception:  # noqa: BLE001 - unknown op or version
        return None
    for i, formal in enumerate(schema.inputs):
        if formal.name == name:
            return i
    return None


def _schema_default(op: str, opset: int | None, attr: str) -> Any:
    try:
        schema = onnx.defs.get_schema(op, opset or onnx.defs.onnx_opset_version())
        default = schema.attributes[attr].default_value
    except Exception:  # noqa: BLE001
        return None
    if not default.name:
        return None
    value = onnx.helper.get_attribute_value(default)
    return value.decode() if isinstance(value, bytes) else value


class _Context:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.types = TensorTypes(model)
        self.constants = _constant_derived(model)
        self.opset = opset_of(model)
        self.uses: set[str] = set()
        for node in model.graph.node:
            self.uses |= {n for n in node.input if n}
        self.uses |= {o.name for o in model.graph.output}


def _attr_value(node: onnx.NodeProto, name: str, opset: int | None) -> Any:
    value = _attr(node, name)
    if value is None:
        value = _schema_default(node.op_type, opset, name)
    return value.decode() if isinstance(value, bytes) else value


def _run_check(check: Mapping[str, Any], node: onnx.NodeProto, ctx: _Context) -> tuple[str, str, str, str | None] | None:
    """None when the node meets the restriction, else (status, reason, fix, fixed_by)."""
    rule = check["rule"]
    severity = check.get("severity", "unsupported")
    if rule in ("constant_input", "zero_input", "constant_false_input", "constant_input_below"):
        index = _schema_input_index(node.op_type, ctx.opset, check["input"])
        if index is None or index >= len(node.input) or not node.input[index]:
            return None  # given as an attribute in this opset, or absent
        name = node.input[index]
        value = ctx.types.constant(name)
        if value is None:
            if name in ctx.constants:
                return ("conditional", f"`{check['input']}` is computed from constants, not an initializer",
                        "constant folding turns it into an initializer", "fold_constants")
            return (severity, f"`{check['input']}` ('{name}') must be a build-time constant but is computed at run time",
                    "make it constant, e.g. fix the input shapes with --input NAME:DIMS so it folds", None)
        if rule == "zero_input" and np.any(np.asarray(value) != 0):
            return (severity, f"`{check['input']}` must be zero", "quantize with zero points of 0 (symmetric)", None)
        if rule == "constant_false_input" and np.any(np.asarray(value)):
            return (severity, f"`{check['input']}` is true (training mode)", "export the model in inference mode",
                    None)
        if rule == "constant_input_below" and np.any(np.asarray(value) >= check["limit"]):
            return (severity, f"`{check['input']}` is {int(np.max(value))}, must be below {check['limit']}", "", None)
        return None
    if rule == "input_rank_in":
        shape = ctx.types.shape(node.input[check["input_index"]]) if len(node.input) > check["input_index"] else None
        if shape is None:
            return ("conditional", f"input rank unknown; must be one of {check['ranks']}", "fix input shapes", None)
        if len(shape) not in check["ranks"]:
            return (severity, f"input rank {len(shape)} is not supported (needs {check['ranks']})", "", None)
        return None
    if rule == "max_used_outputs":
        used = [o for o in node.output[check["count"]:] if o and o in ctx.uses]
        if used:
            return (severity, f"output(s) {', '.join(used)} are used but only the first {check['count']} are supported",
                    "", None)
        return None
    if rule == "attr_all_ones":
        value = _attr(node, check["attr"])
        if value and any(v != 1 for v in value):
            return (severity, f"`{check['attr']}` is {list(value)}, must be all ones", "", None)
        return None
    if rule == "attr_equals":
        value = _attr_value(node, check["attr"], ctx.opset)
        if value is not None and value != check["value"]:
            return (severity, f"`{check['attr']}` is {value!r}, must be {check['value']!r}", "", None)
        return None
    if rule == "attr_in":
        value = _attr_value(node, check["attr"], ctx.opset)
        if value is not None and value not in check["values"]:
            return (severity, f"`{check['attr']}` '{value}' is not supported (supported: {', '.join(check['values'])})",
                    "", None)
        return None
    if rule == "attr_absent":
        present = [a for a in check["attrs"] if _attr(node, a) is not None]
        if present:
            if severity == "conditional":
                return ("conditional", f"`{present[0]}` is set: {check.get('text', 'ignored by TensorRT')}", "", None)
            return (severity, f"attribute(s) {', '.join(present)} are not supported", "", None)
        return None
    if rule == "static_shape":
        shape = ctx.types.shape(node.input[check["input_index"]]) if node.input else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            return (severity, "the input must have static dimensions", "fix input shapes with --input NAME:DIMS",
                    "fix_shapes")
        return None
    if rule == "static_axis_dim":
        shape = ctx.types.shape(node.input[0]) if node.input else None
        axis = _attr(node, check["axis_attr"], check.get("default_axis", -1))
        if shape is None or not shape or not isinstance(shape[axis % len(shape)], int):
            return (severity, f"input dimension {axis} must be known at build time",
                    "fix input shapes with --input NAME:DIMS", "fix_shapes")
        return None
    if rule == "same_bidirectional_activations":
        if _attr_value(node, "direction", ctx.opset) != "bidirectional":
            return None
        acts = _attr(node, "activations")
        if acts:
            acts = [a.decode() if isinstance(a, bytes) else a for a in acts]
            half = len(acts) // 2
            if acts[:half] != acts[half:]:
                return (severity, "forward and reverse activations differ", "", None)
        return None
    if rule == "einsum_no_ellipsis_or_diagonal":
        equation = str(_attr_value(node, "equation", ctx.opset) or "")
        lhs = equation.split("->")[0]
        if "..." in equation or any(len(set(term.strip())) != len(term.strip()) for term in lhs.split(",")):
            return (severity, f"equation '{equation}' uses an ellipsis or a diagonal", "", None)
        return None
    return ("conditional", f"restriction not checked by enginesmith: {rule}", "", None)


_OUTPUT_TYPED = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                 "EyeLike"}


def _tensorrt_node(node: onnx.NodeProto, label: str, table: Mapping[str, Any], ctx: _Context,
                   fix: tuple[str, str] | None) -> NodeCompat:
    version = table["tensorrt_version"]
    entry = NodeCompat(label, node.op_type, node.domain, "supported", "")
    if node.domain not in ("", "ai.onnx"):
        entry.status = "unsupported"
        entry.reason = (f"op of custom domain '{node.domain}' is not in the ONNX-TensorRT {version} operator table")
        entry.fix = "implement it as a TensorRT plugin, or replace the op in the model"
        return _with_fix(entry, fix)
    row = table["operators"].get(node.op_type)
    if row is None:
        entry.status, entry.reason = "unsupported", f"not in the ONNX-TensorRT {version} operator table"
        entry.fix = "replace the op (or a plugin)"
        return _with_fix(entry, fix)
    if not row["supported"]:
        entry.status, entry.reason = "unsupported", f"listed as not supported by ONNX-TensorRT {version}"
        entry.fix = "replace the op (or a plugin)"
        return _with_fix(entry, fix)
    conditions: list[str] = []
    types = row.get("types") or []
    typed = [node.output[0]] if node.op_type in _OUTPUT_TYPED and node.output else [n for n in node.input[:1] if n]
    for name in typed:
        dtype = ctx.types.dtype(name)
        if dtype == "?" or not types or dtype in types:
            continue
        note = table.get("data_type_notes", {}).get(dtype)
        if note and "cast down" in note:
            conditions.append(f"{dtype} input: {note}")
        else:
            entry.status = "unsupported"
            entry.reason = f"{dtype} input; ONNX-TensorRT {version} supports {', '.join(types)} for {node.op_type}"
            return _with_fix(entry, fix)
    worst = "supported"
    for check in row.get("checks", []):
        failed = _run_check(check, node, ctx)
        if failed is None:
            continue
        status, reason, hint, fixed_by = failed
        if status == "unsupported" and worst != "unsupported":
            worst = "unsupported"
            entry.reason, entry.fix, entry.fixed_by = reason, hint, fixed_by
        elif status == "conditional":
            conditions.append(reason)
            if fixed_by and not entry.fixed_by:
                entry.fix, entry.fixed_by = hint, fixed_by
    if worst == "unsupported":
        entry.status = "unsupported"
        entry.reason = f"{entry.reason} (restriction: {row['restrictions']})"
        return _with_fix(entry, fix)
    if row.get("restrictions") and not row.get("checks_cover_restrictions"):
        conditions.append(f"restriction: {row['restrictions'].replace('<br />', ' ')}")
    if conditions:
        entry.status, entry.reason = "conditional", "; ".join(conditions)
    else:
        entry.reason = "in the operator table" + ("; restrictions checked" if row.get("checks") else "")
    return _with_fix(entry, fix)


def _with_fix(entry: NodeCompat, fix: tuple[str, str] | None) -> NodeCompat:
    if fix is not None and not entry.fixed_by:
        entry.fixed_by, entry.fix = fix[0], fix[1]
    return entry


def _tensorrt_report(model: onnx.ModelProto, version: str | None) -> CompatReport:
    table = tensorrt_table(version or DEFAULT_TENSORRT)
    inferred = infer_shapes(model)
    ctx = _Context(inferred)
    fixes = _pass_fixes(inferred)
    labels = node_labels(inferred)
    nodes = [_tensorrt_node(node, label, table, ctx, fixes.get(i)) for i, (label, node) in enumerate(zip(labels, inferred.graph.node))]
    src = table["source"]
    report = CompatReport(
        target="tensorrt",
        target_version=table["tensorrt_version"],
        source=f"{src['repository']} {src['file']} at {src['ref']} ({src['commit'][:12]})",
        nodes=nodes,
    )
    opset = opset_of(model)
    bounds = table.get("opset", {})
    if opset is not None and bounds.get("max") and opset > bounds["max"]:
        report.model.append(NodeCompat(
            "", "", "", "conditional",
            f"the model uses opset {opset}; the ONNX-TensorRT {table['tensorrt_version']} table covers opsets up to {bounds['max']}",
            f"convert with --opset {bounds['max']}", "convert_opset"))
    if opset is not None and bounds.get("min") and opset < bounds["min"]:
        report.model.append(NodeCompat(
            "", "", "", "unsupported",
            f"the model uses opset {opset}; ONNX-TensorRT {table['tensorrt_version']} needs opset {bounds['min']} or newer",
            f"convert with --opset {bounds['min']}", "convert_opset"))
    if src.get("note"):
        report.notes.append(src["note"])
    return report


# --------------------------------------------------------------------------- backends (the real thing)


def _backend_report(model: onnx.ModelProto, name: str, options: BuildOptions | None) -> CompatReport:
    backend = get_backend(name)
    status = backend.available()
    if not status:
        raise BackendUnavailableError(f"cannot check compatibility with {name}: it is not available here ({status.reason})")
    options = options or BuildOptions()
    support = backend.op_support(model, options)
    fixes = _pass_fixes(model)
    labels = node_labels(model)
    nodes = []
    for index, (label, node) in enumerate(zip(labels, model.graph.node)):
        state, reason = support.get(label, ("conditional", "not reported by the backend"))
        entry = NodeCompat(label, node.op_type, node.domain, state, reason)
        if state == "unsupported":
            entry.fix = ("register a custom-op library, replace the op, or try another backend"
                         if node.domain not in ("", "ai.onnx") else "replace the op or try another backend")
        nodes.append(_with_fix(entry, fixes.get(index)))
    providers = options.backend_options.get("providers")
    report = CompatReport(
        target=name,
        target_version=backend.version(),
        source=f"{backend.display_name} {backend.version()} asked directly"
               + (f" (providers: {', '.join(providers)})" if providers else ""),
        nodes=nodes,
    )
    if "" in support:
        state, reason = support[""]
        report.model.append(NodeCompat("", "", "", state, f"the model as a whole does not load: {reason}"))
    return report


def parse_target(target: str) -> tuple[str, str | None]:
    name, _, version = target.strip().partition(":")
    name = name.lower()
    if name == "ort":
        name = "onnxruntime"
    return name, version or None


def compatibility_report(model: onnx.ModelProto, target: str = "onnxruntime", options: BuildOptions | None = None,
                         passes: Iterable[str] | None = None) -> CompatReport:
    """Per-node support of ``model`` on ``target`` (``onnxruntime``, ``tensorrt[:8.6|10]``, a backend name)."""
    name, version = parse_target(target)
    if name == "tensorrt":
        report = None
        if version is None and name in BACKENDS and get_backend(name).available():
            # A TensorRT backend that can ask its parser wins; else the published table of its version.
            try:
                report = _backend_report(model, name, options)
            except NotImplementedError:
                version = get_backend(name).version()
        if report is None:
            report = _tensorrt_report(model, version)
    elif name in BACKENDS:
        try:
            report = _backend_report(model, name, options)
        except NotImplementedError as exc:
            raise BackendUnavailableError(f"target '{target}': {exc}") from None
    elif name == "torch":
        raise BackendUnavailableError(
            "target 'torch' is reported by enginesmith's PyTorch backend, which this installation does not have; "
            f"targets here: {', '.join(sorted(set(BACKENDS) | {'tensorrt'}))} (tensorrt:8.6, tensorrt:10)"
        )
    else:
        raise BackendUnavailableError(
            f"unknown target '{target}': choose onnxruntime, tensorrt[:8.6|:10] or a backend "
            f"({', '.join(sorted(BACKENDS))})"
        )
    if passes is not None:
        report.passes = list(passes)
    return report


def check_buildable(model: onnx.ModelProto, backend_name: str, options: BuildOptions | None = None,
                    passes: Iterable[str] | None = None) -> CompatReport:
    """The report for ``backend_name``; raises :class:`IncompatibleModelError` when something cannot be built.

    A backend that cannot report per-node support gives a report with a note and no nodes: the build goes on.
    """
    try:
        report = compatibility_report(model, backend_name, options, passes)
    except BackendUnavailableError as exc:
        if "cannot report" not in str(exc):
            raise
        return CompatReport(backend_name, None, "not available", [], notes=[str(exc)])
    if not report.buildable:
        raise IncompatibleModelError(
            f"the model cannot be built with {report.target_label}: {report.summary().split('NOT buildable: ', 1)[-1]}; "
            f"see 'enginesmith inspect MODEL --target {backend_name}' for every node",
            report,
        )
    return report


__all__ = [
    "CompatReport",
    "IncompatibleModelError",
    "NodeCompat",
    "STATUSES",
    "TENSORRT_VERSIONS",
    "check_buildable",
    "compatibility_report",
    "parse_target",
    "tensorrt_table",
]
