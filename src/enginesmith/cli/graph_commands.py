"""inspect and surgeon: look into a model before building it, and fix its graph."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import onnx
import typer
from rich.markup import escape

from ..backends import BuildOptions
from ..files import write_atomic
from ..bundle import looks_like_bundle, read_bundle
from ..errors import BundleError, EnginesmithError
from ..graph.compat import CompatReport, compatibility_report
from ..graph.inspect import LayerInfo, ModelInspection, human, inspect_model
from ..graph.layerwise import LayerwiseReport
from ..graph.passes import DEFAULT_PASSES, PassSummary, describe_passes, optimize
from ..graph.surgery import GraphSurgeryError, fix_shapes
from ..importers import ImportOptions, import_model
from .app import (
    add_columns,
    app,
    console,
    parse_axis_specs,
    parse_shape_specs,
    print_error,
    print_json,
    split_names,
    table,
)
from .output_paths import FORCE_HELP, check_output

# Above this many rows a table shows its head and tail; --all shows everything.
TABLE_LIMIT = 40
STATUS_STYLE = {"supported": "green", "conditional": "yellow", "unsupported": "bold red"}


# --------------------------------------------------------------------------- loading


def _tensorflow_nodes(path: Path) -> list[dict[str, Any]] | None:
    """TF nodes of a frozen graph through the TensorFlow importer's lister, when it exists."""
    if path.suffix.lower() != ".pb" or not path.is_file():
        return None
    try:
        from ..importers.tensorflow_importer import list_graph_nodes  # type: ignore[attr-defined]
    except ImportError:
        return None
    return list(list_graph_nodes(path))


def load_for_inspection(path: Path, options: ImportOptions, payload: bool = False) -> tuple[onnx.ModelProto, str]:
    """The ONNX model to inspect and a label: a model file via the importers, or an engine's source or payload."""
    if path.is_file() and looks_like_bundle(path):
        contents = read_bundle(path, payload=True, source=True)
        manifest = contents.manifest
        if not payload and contents.source is not None:
            with tempfile.TemporaryDirectory(prefix="enginesmith-inspect-") as tmp:
                from ..importers.archive import write_embedded_source

                source = write_embedded_source(manifest.source_name, contents.source, Path(tmp))
                stored = ImportOptions.from_dict(manifest.build_options.get("import_options", {}))
                stored.trust_code = options.trust_code
                imported = import_model(source, stored, kind=manifest.source_kind)
            return imported.model, f"source '{manifest.source_name}' embedded in {path.name}"
        if not manifest.payload_name.endswith(".onnx"):
            raise BundleError(
                f"'{path.name}' carries no source and its {manifest.backend} payload is not an ONNX graph; "
                "inspect the original model instead"
            )
        try:
            model = onnx.load_model_from_string(contents.payload or b"")
        except Exception as exc:  # noqa: BLE001 - protobuf DecodeError
            raise BundleError(f"the payload of '{path.name}' is not a readable ONNX model ({exc})") from None
        return model, f"{manifest.backend} payload of {path.name} (optimized for {manifest.fingerprint.get('arch', '?')})"
    imported = import_model(path, options)
    return imported.model, f"{imported.kind} model '{path.name}'"


# --------------------------------------------------------------------------- printing


def _rows(items: list, show_all: bool, head: int = 30, tail: int = 8) -> tuple[list, int]:
    if show_all or len(items) <= TABLE_LIMIT:
        return items, 0
    return items[:head] + [None] + items[-tail:], len(items) - head - tail


def _shapes(tensors) -> str:
    return ", ".join(t.shape_text() for t in tensors)


def print_inspection(info: ModelInspection, label: str, show_all: bool) -> None:
    opsets = ", ".join(f"{d}:{v}" for d, v in info.opsets.items())
    console.print(f"[bold]{escape(label)}[/]  graph '{escape(info.graph_name)}', IR {info.ir_version}, opsets {opsets}"
                  + (f", producer {escape(info.producer)}" if info.producer else ""), highlight=False)
    io = table("inputs and outputs")
    add_columns(io, "", "name", "dtype", "shape")
    for kind, tensors in (("input", info.inputs), ("output", info.outputs)):
        for t in tensors:
            io.add_row(kind, escape(t.name), t.dtype, escape(t.shape_text()))
    console.print(io)
    layers, hidden = _rows(info.layers, show_all)
    layer_table = table(f"layers ({len(info.layers)})")
    add_columns(layer_table, "#", "name", "op", "input shapes", "output shapes", "params", "MACs", "FLOPs",
                right=("#", "params", "MACs", "FLOPs"))
    for layer in layers:
        if layer is None:
            layer_table.add_row("...", "", "", "", "", "", "", "")
            continue
        assert isinstance(layer, LayerInfo)
        layer_table.add_row(str(layer.index), escape(layer.name), escape(layer.op), escape(_shapes(layer.inputs)),
                      escape(_shapes(layer.outputs)), human(layer.params) if layer.params else "",
                      human(layer.macs) if layer.macs else "", human(layer.flops) if layer.flops is not None else "?")
    console.print(layer_table)
    if hidden:
        console.print(f"[dim]{hidden} more layers not shown; --all shows every one[/]")
    flops_by_op: dict[str, int] = {}
    for layer in info.layers:
        flops_by_op[layer.op] = flops_by_op.get(layer.op, 0) + (layer.flops or 0)
    total_flops = info.totals["flops"] or 0
    histogram = table("op histogram")
    add_columns(histogram, "op", "count", "FLOPs", "share of FLOPs", right=("count", "FLOPs", "share of FLOPs"))
    ops, hidden_ops = _rows(list(info.op_histogram.items()), show_all, head=25, tail=0)
    for row in ops:
        if row is None:
            histogram.add_row(f"[dim]{hidden_ops} more op types[/]", "", "", "")
            continue
        op, count = row
        share = f"{flops_by_op[op] / total_flops:.1%}" if total_flops else ""
        histogram.add_row(escape(op), str(count), human(flops_by_op[op]), share)
    console.print(histogram)
    console.print("totals: " + escape(info.summary()), highlight=False)
    for note in info.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)


def print_compat(report: CompatReport, show_all: bool) -> None:
    entries = report.model + report.nodes
    compat = table(escape(f"compatibility with {report.target_label} ({report.source})"))
    add_columns(compat, "node", "op", "status", "reason", "fix enginesmith applies / what to do")

    def row(node: str, op: str, status: str, reason: str, fixed_by: str | None, fix: str) -> None:
        fix_text = (f"[cyan]{escape(fixed_by)}[/]: " if fixed_by else "") + escape(fix)
        compat.add_row(escape(node), escape(op), f"[{STATUS_STYLE[status]}]{status}[/]", escape(reason), fix_text)

    if show_all or len(entries) <= TABLE_LIMIT:
        for e in entries:
            row(e.node or "(model)", e.op, e.status, e.reason, e.fixed_by, e.fix)
    else:
        # Large graphs: every problem on its own row, supported nodes a pass changes grouped by op.
        grouped: dict[tuple[str, str], list] = {}
        for e in entries:
            if e.status != "supported":
                row(e.node or "(model)", e.op, e.status, e.reason, e.fixed_by, e.fix)
            elif e.fixed_by:
                grouped.setdefault((e.op, e.fixed_by), []).append(e)
        for (op, fixed_by), group in grouped.items():
            first = group[0]
            row(f"{len(group)} nodes" if len(group) > 1 else first.node, op, "supported", first.reason, fixed_by,
                first.fix + (f" (and {len(group) - 1} more like it)" if len(group) > 1 else ""))
        plain = sum(1 for e in entries if e.status == "supported" and not e.fixed_by)
        compat.caption = f"{plain} supported nodes that no pass changes not shown; --all shows every node"
    console.print(compat)
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    style = "bold green" if report.buildable else "bold red"
    console.print(f"[{style}]{escape(report.summary())}[/]", highlight=False)


def print_pass_summary(summary: PassSummary, title: str = "graph passes") -> None:
    passes = table(title)
    add_columns(passes, "pass", "result", "nodes", "max abs diff", "note")
    styles = {"applied": "green", "unchanged": "dim", "rolled_back": "bold red", "skipped": "yellow", "unchecked": "yellow"}
    for r in summary.results:
        diff = f"{r.max_abs_diff:.2e}" if r.max_abs_diff is not None else ""
        passes.add_row(r.name, f"[{styles.get(r.status, '')}]{r.status.replace('_', ' ')}[/]",
                       f"{r.nodes_before} -> {r.nodes_after}", diff,
                       escape("; ".join(text for text in (r.reason, *r.notes) if text)))
    console.print(passes)
    console.print(escape(summary.summary()) + ("" if summary.checked else " (outputs NOT checked: --no-check)"),
                  highlight=False)


def print_layerwise(report: LayerwiseReport, show_all: bool = False) -> None:
    """The layer-wise table; ``validate --layerwise`` prints it too."""
    first = report.first_divergent
    rows = report.layers
    if not show_all and len(rows) > TABLE_LIMIT:
        keep = {i for i, layer in enumerate(rows) if first is not None and abs(layer.index - first.index) <= 3}
        keep |= set(range(10)) | set(range(len(rows) - 5, len(rows)))
        rows = [layer for i, layer in enumerate(rows) if i in keep]
    layers = table(escape(f"layer-wise: {report.backend} {report.precision} vs the source (inputs: {report.inputs})"))
    add_columns(layers, "#", "node", "op", "tensor", "shape", "max abs", "rel L2", "cosine", "result",
                right=("#", "max abs", "rel L2", "cosine"))
    for layer in rows:
        if layer is first:
            result = "[bold red]FIRST[/]"
        else:
            result = "[green]ok[/]" if layer.passed else "[red]off[/]"
        layers.add_row(str(layer.index), escape(layer.node), escape(layer.op_type), escape(layer.tensor),
                       "x".join(map(str, layer.shape)) or "scalar", f"{layer.max_abs:.2e}", f"{layer.rel_l2:.2e}",
                       f"{layer.cosine:.5f}", result)
    console.print(layers)
    for note in report.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    console.print(("[bold green]PASS[/] " if report.passed else "[bold red]FAIL[/] ") + escape(report.summary()),
                  highlight=False)


def _print_tf_nodes(nodes: list[dict[str, Any]], show_all: bool) -> None:
    rows, hidden = _rows(list(enumerate(nodes)), show_all)
    nodes_table = table(f"TensorFlow nodes ({len(nodes)})")
    add_columns(nodes_table, "#", "name", "op", "inputs")
    for row in rows:
        if row is None:
            nodes_table.add_row("...", "", "", "")
            continue
        index, node = row
        inputs = [str(name) for name in node.get("inputs", [])]
        shown = ", ".join(inputs[:4]) + (f" and {len(inputs) - 4} more" if len(inputs) > 4 else "")
        nodes_table.add_row(str(index), escape(str(node.get("name", ""))), escape(str(node.get("op", ""))), escape(shown))
    console.print(nodes_table)
    if hidden:
        console.print(f"[dim]{hidden} more nodes not shown; --all shows every one[/]")


# --------------------------------------------------------------------------- commands


@app.command(short_help="Layers, shapes, FLOPs of a model; with --target, what a backend can build.")
def inspect(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model file or folder (any source enginesmith imports), or an engine bundle."),
    target: Optional[str] = typer.Option(None, metavar="BACKEND", help="Compatibility report for onnxruntime, tensorrt[:8.6|:10] (or another backend)."),
    provider: list[str] = typer.Option([], metavar="NAME", help="ONNX Runtime execution provider for --target onnxruntime; repeatable."),
    show_all: bool = typer.Option(False, "--all", help="Show every layer and node (large graphs are summarized)."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write everything as JSON (- for standard output)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    input_shape: list[str] = typer.Option([], "--input", metavar="NAME:SHAPE", help="Fix an input's shape first: NAME:1x3x224x224; repeatable."),
    payload: bool = typer.Option(False, "--payload", help="For an engine: inspect the built payload, not the embedded source."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow sources that execute code when loaded."),
    inputs: Optional[str] = typer.Option(None, "--inputs", metavar="NAMES", help="Input tensor names, comma-separated (frozen graphs)."),
    outputs: Optional[str] = typer.Option(None, "--outputs", metavar="NAMES", help="Output tensor names, comma-separated (frozen graphs)."),
) -> None:
    """Layers, shapes, parameters and FLOPs of a model; with --target, what a backend can build.

    Exits 1 when --target finds something that cannot be built.
    """
    check_output(json_path, inputs=[model], force=force, flag="--json")
    options = ImportOptions(trust_code=trust_code, input_names=split_names(inputs), output_names=split_names(outputs))
    tf_nodes = _tensorflow_nodes(model)
    try:
        onnx_model, label = load_for_inspection(model, options, payload)
    except EnginesmithError as exc:
        if tf_nodes is None:
            raise
        # A frozen graph whose conversion needs more (input/output names): the TF view still helps.
        onnx_model, label, conversion_error = None, model.name, str(exc)
    else:
        conversion_error = None
    if onnx_model is not None and input_shape:
        onnx_model = fix_shapes(onnx_model, parse_shape_specs(input_shape))
    info = inspect_model(onnx_model) if onnx_model is not None else None
    report = None
    if target and onnx_model is not None:
        options_for_target = BuildOptions(backend_options={"providers": provider} if provider else {})
        report = compatibility_report(onnx_model, target, options_for_target)
    if json_path is not None:
        data: dict[str, Any] = {"source": label, "model": info.to_dict() if info else None}
        if report is not None:
            data["compatibility"] = report.to_dict()
        if tf_nodes is not None:
            data["tensorflow_nodes"] = tf_nodes
        if conversion_error:
            data["conversion_error"] = conversion_error
        print_json(json.dumps(data, indent=2, default=str), json_path)
    if json_path is None or str(json_path) != "-":
        if tf_nodes is not None:
            _print_tf_nodes(tf_nodes, show_all)
        if conversion_error:
            console.print("[yellow]ONNX view not available:[/] " + escape(conversion_error), highlight=False)
        if info is not None:
            print_inspection(info, label, show_all)
        if report is not None:
            print_compat(report, show_all)
    if report is not None and not report.buildable:
        raise typer.Exit(code=1)


def _list_passes(value: bool) -> None:
    if not value:
        return
    listing = table("graph passes")
    add_columns(listing, "pass", "build runs it", "what it does")
    for p in describe_passes():
        listing.add_row(p["name"], "yes" if p["default"] else ("with its option" if p["needs_args"] else "no"),
                        escape(p["description"]))
    console.print(listing)
    raise typer.Exit()


def _parse_renames(specs: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for spec in specs:
        old, sep, new = spec.partition("=")
        if not sep or not old or not new:
            raise typer.BadParameter(f"'{spec}' is not OLD=NEW such as input_1=image", param_hint="--rename")
        mapping[old] = new
    return mapping


@app.command(short_help="Fix a model's graph (cut, shapes, opset, passes, renames), each pass checked.")
def surgeon(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model file or folder (any source enginesmith imports)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="FILE", help="ONNX file to write (default: MODEL.surgeon.onnx)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    passes: Optional[str] = typer.Option(None, "--passes", metavar="NAMES", help=f"Passes to run, comma-separated (default: {', '.join(DEFAULT_PASSES)})."),
    no_pass: list[str] = typer.Option([], "--no-pass", metavar="PASS", help="Turn a pass off; repeatable."),
    no_optimize: bool = typer.Option(False, "--no-optimize", help="Only the edits asked for below, no optimization passes."),
    input_shape: list[str] = typer.Option([], "--input", metavar="NAME:SHAPE", help="Fix an input's shape: NAME:1x3x224x224; repeatable."),
    dynamic: list[str] = typer.Option([], "--dynamic", metavar="NAME:AXES", help="Mark axes of an input dynamic: NAME:0; repeatable."),
    opset: Optional[int] = typer.Option(None, metavar="N", help="Convert to this ONNX opset."),
    rename: list[str] = typer.Option([], "--rename", metavar="OLD=NEW", help="Rename an input or output: OLD=NEW; repeatable."),
    cut_inputs: Optional[str] = typer.Option(None, "--cut-inputs", metavar="NAMES", help="Keep only the graph from these tensors (comma-separated), with --cut-outputs."),
    cut_outputs: Optional[str] = typer.Option(None, "--cut-outputs", metavar="NAMES", help="Keep only the graph up to these tensors (comma-separated)."),
    no_check: bool = typer.Option(False, "--no-check", help="Do not compare outputs before and after each pass."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow sources that execute code when loaded."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the pass summary as JSON (- for standard output)."),
    list_passes: bool = typer.Option(False, "--list-passes", callback=_list_passes, is_eager=True,
                                     help="List the graph passes and exit."),
) -> None:
    """Fix a model's graph: cut, fix shapes, dynamic axes, opset, optimization passes, renames; each pass checked.

    Every pass is compared numerically with the model before it on generated inputs and rolled back
    when outputs differ. Exits 1 when an edit asked for by name was rolled back.
    """
    target = check_output(output or model.with_name(model.stem + ".surgeon.onnx"), inputs=[model], force=force,
                          default_name=output is None)
    check_output(json_path, inputs=[model, target], force=force, flag="--json")
    imported = import_model(model, ImportOptions(trust_code=trust_code))
    specs: list[Any] = []
    if cut_inputs or cut_outputs:
        graph = imported.model.graph
        weights = {t.name for t in graph.initializer}
        specs.append(("cut", {
            "inputs": split_names(cut_inputs) or [v.name for v in graph.input if v.name not in weights],
            "outputs": split_names(cut_outputs) or [o.name for o in graph.output],
        }))
    if input_shape:
        specs.append(("fix_shapes", {"shapes": parse_shape_specs(input_shape)}))
    if dynamic:
        specs.append(("make_dynamic", {"axes": parse_axis_specs(dynamic)}))
    if opset is not None:
        specs.append(("convert_opset", {"opset": opset}))
    requested = {name for name, _ in specs}
    if not no_optimize:
        chosen = split_names(passes) if passes is not None else list(DEFAULT_PASSES)
        specs += chosen or []
    renames = _parse_renames(rename)
    if renames:
        specs.append(("rename_io", {"mapping": renames}))
        requested.add("rename_io")
    if not [s for s in specs if (s if isinstance(s, str) else s[0]) not in no_pass]:
        raise GraphSurgeryError("nothing to do: every pass is turned off and no edit was asked for")
    result, summary = optimize(imported.model, specs, disabled=no_pass, check=not no_check)
    failed = [r for r in summary.results if r.name in requested and r.status == "rolled_back"]
    if not failed:
        write_atomic(target, result.SerializeToString())
    if json_path is not None:
        print_json(json.dumps({**summary.to_dict(), "output": None if failed else str(target)}, indent=2, default=str),
                   json_path)
    if json_path is None or str(json_path) != "-":
        print_pass_summary(summary, f"graph passes on {model.name}")
        if not failed:
            console.print(f"wrote {escape(str(target))}", highlight=False)
    if failed:
        print_error(f"{failed[0].name} was rolled back, nothing written: {failed[0].reason}")
        raise typer.Exit(code=1)
