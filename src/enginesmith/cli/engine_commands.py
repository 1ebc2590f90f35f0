"""build, run, validate, bench, info: the engine life cycle on the command line."""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.markup import escape

from .. import api
from ..bench import BenchReport
from ..files import write_atomic
from ..build_inputs import samples_text
from ..bundle import looks_like_bundle
from ..errors import BuildError, VerificationFailedError
from ..graph.compat import IncompatibleModelError
from ..importers import ImportOptions
from ..pipeline import BUILD_STAGES
from ..pipeline.map_budget import summary as map_summary
from ..signature import shape_text
from ..runtime.preprocess import PreprocessSpec
from ..validate import AccuracyBudget, ValidationReport
from ..validate.engine_checks import engine_tolerance
from .app import (
    add_columns,
    app,
    console,
    parse_axis_specs,
    parse_batches,
    parse_shape_specs,
    print_indented,
    print_json,
    print_note,
    progress_bar,
    split_names,
    table,
)
from .data_args import DATA_HELP, data_path, read_data_args, split_data_spec
from .output_paths import FORCE_HELP, check_output
from .candidate_tables import print_backend_candidates, print_candidates
from .graph_commands import print_compat, print_layerwise


def import_options_from_args(
    trust_code: bool,
    input_shape: list[str],
    dynamic: list[str],
    inputs: Optional[str],
    outputs: Optional[str],
    signature: str,
    opset: Optional[int],
) -> ImportOptions:
    return ImportOptions(
        trust_code=trust_code,
        input_shapes=parse_shape_specs(input_shape),
        dynamic_axes=parse_axis_specs(dynamic),
        input_names=split_names(inputs),
        output_names=split_names(outputs),
        signature_key=signature,
        opset=opset,
    )


@app.command(short_help="Build an engine for this machine, or rebuild a bundle here.")
def build(
    model: Path = typer.Argument(..., metavar="MODEL", help="Model file or folder (.onnx, ...), or an engine bundle to rebuild here."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="FILE", help="Engine file to write (default: MODEL with .engine)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    backend: Optional[str] = typer.Option(None, metavar="NAME", help="Backend to build with, or 'auto' (the default; a rebuild keeps the bundle's backend unless auto chose it): the fastest verified engine among --candidates."),
    candidates: Optional[str] = typer.Option(None, "--candidates", metavar="NAMES", help="Backends --backend auto builds and times, comma-separated (default: onnxruntime,openvino, those installed; add torch for its slow Inductor build)."),
    select: Optional[str] = typer.Option(None, "--select", metavar="STRATEGY", help="How --backend auto picks: latency (lowest p50 at batch 1, default), throughput, or throughput-within:MS."),
    precision: Optional[str] = typer.Option(None, metavar="NAME", help="fp32 (default), fp16, int8 (needs --calib), bf16 or best (the fastest within --max-accuracy-drop; needs --calib)."),
    provider: list[str] = typer.Option([], metavar="NAME", help="ONNX Runtime execution provider (cpu, cuda, tensorrt, openvino); repeatable."),
    threads: Optional[int] = typer.Option(None, min=1, metavar="N", help="Intra-op threads (default: physical cores)."),
    no_source: bool = typer.Option(False, "--no-source", help="Leave the source model out of the bundle."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the check against the source model."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow sources that execute code when loaded (pickles, Lambda layers)."),
    input_shape: list[str] = typer.Option([], "--input", metavar="NAME:SHAPE", help="Fix an input's shape: NAME:1x3x224x224; repeatable."),
    dynamic: list[str] = typer.Option([], "--dynamic", metavar="NAME:AXES", help="Mark axes of an input dynamic: NAME:0; repeatable."),
    inputs: Optional[str] = typer.Option(None, "--inputs", metavar="NAMES", help="Input tensor names, comma-separated (frozen graphs)."),
    outputs: Optional[str] = typer.Option(None, "--outputs", metavar="NAMES", help="Output tensor names, comma-separated (frozen graphs)."),
    signature: str = typer.Option("serving_default", metavar="KEY", help="SavedModel signature to import."),
    opset: Optional[int] = typer.Option(None, metavar="N", help="ONNX opset to convert to (default: the backend's, 17 for ONNX Runtime)."),
    data: list[str] = typer.Option([], "--data", "-d", metavar="FILE|DIR|NAME=FILE", help=DATA_HELP + " Sample inputs: the graph-pass checks and the verification run on them, and the first (up to 8 MB) are stored for validate (default: inputs generated from the graph)."),
    calib: Optional[Path] = typer.Option(None, metavar="FILE|DIR", help="Calibration data: .npy/.npz keyed by input name, or a folder of images or .npy files. fp32/fp16 builds verify on all of it."),
    calib_method: Optional[str] = typer.Option(None, metavar="METHOD", help="int8 calibration: minmax (default), entropy or percentile."),
    calib_random: bool = typer.Option(False, "--calib-random", help="Calibrate on random inputs (smoke tests only: accuracy unknown)."),
    calib_cache: Optional[Path] = typer.Option(None, metavar="FILE", help="Reuse int8 ranges from this engine or calibration cache file."),
    preprocess: Optional[str] = typer.Option(None, metavar="SPEC|FILE", help="Image preprocessing: 'resize=256;crop=224;layout=NCHW;color=RGB;scale=0.00392;mean=0.485/0.456/0.406;std=0.229/0.224/0.225' or a .toml file."),
    holdout: float = typer.Option(0.2, metavar="SHARE", help="Share of the calibration data kept aside to verify on, in [0, 1)."),
    max_accuracy_drop: Optional[str] = typer.Option(None, metavar="BUDGET", help="Accuracy budget: '1%' (top-1 decisions that may change), 'agreement>=0.99', 'rel_l2<=0.05', or for detectors 'map:1%' (points of COCO mAP@[.5:.95], 100 x mAP, the engine may lose against the source on --coco/--images; 'map50:1%' for mAP@.5)."),
    coco: Optional[Path] = typer.Option(None, "--coco", metavar="FILE", help="COCO instances JSON labelling --images: what a 'map:' budget is judged on."),
    images: Optional[Path] = typer.Option(None, "--images", metavar="DIR", help="Folder with the images --coco labels."),
    force_precision: bool = typer.Option(False, "--force-precision", help="Build the precision even where it does not pay (fp16 on a CPU)."),
    no_pass: list[str] = typer.Option([], "--no-pass", metavar="PASS", help="Turn off one graph pass (see 'enginesmith surgeon --list-passes'); repeatable."),
    no_passes: bool = typer.Option(False, "--no-passes", help="Run no graph passes (build the model as imported)."),
    no_compat_check: bool = typer.Option(False, "--no-compat-check", help="Skip the operator-support report before the build."),
    option: list[str] = typer.Option([], "--option", metavar="KEY=VALUE", help="Backend option KEY=VALUE (VALUE as JSON, else text), e.g. device=cuda; repeatable."),
    profile_min: list[str] = typer.Option([], "--min", metavar="NAME:SHAPE", help="TensorRT optimization profile: smallest shape of an input, NAME:1x3x224x224; repeatable, with --opt and --max."),
    profile_opt: list[str] = typer.Option([], "--opt", metavar="NAME:SHAPE", help="TensorRT optimization profile: the shape to tune for, NAME:8x3x224x224."),
    profile_max: list[str] = typer.Option([], "--max", metavar="NAME:SHAPE", help="TensorRT optimization profile: largest shape, NAME:32x3x224x224."),
    workspace_mb: Optional[int] = typer.Option(None, "--workspace-mb", min=1, metavar="MIB", help="TensorRT builder workspace limit in MiB (default: 256 on Jetson, a quarter of the GPU up to 4096)."),
    dla_core: Optional[int] = typer.Option(None, "--dla-core", min=0, metavar="N", help="Run on this DLA core (Jetson Xavier/Orin; fp16 or int8), GPU fallback for the rest."),
    builder_level: Optional[int] = typer.Option(None, "--builder-level", min=0, max=5, metavar="N", help="TensorRT builder optimization level 0-5 (TensorRT's default: 3)."),
    timing_cache: Optional[str] = typer.Option(None, "--timing-cache", metavar="PATH", help="TensorRT timing cache: a file (--backend tensorrt) or folder (ONNX Runtime's TensorRT provider), or 'off'."),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="TensorRT engine that also runs on later TensorRT releases of the same major version."),
    hardware_compat: Optional[str] = typer.Option(None, "--hardware-compat", metavar="LEVEL", help="TensorRT hardware compatibility: ampere_plus (TensorRT 8.6+) or same_compute_capability (TensorRT 10.9+)."),
) -> None:
    """Build an engine for this machine (or rebuild a bundle from the source it carries)."""
    is_bundle = model.is_file() and looks_like_bundle(model)
    target = check_output(output or (model if is_bundle else model.with_suffix(".engine")),
                          inputs=[model, calib, calib_cache, coco, *(split_data_spec(spec)[1] for spec in data)],
                          force=force, writes_engine=True)
    options = import_options_from_args(trust_code, input_shape, dynamic, inputs, outputs, signature, opset)
    backend_options = parse_backend_options(option)
    backend_options.update(tensorrt_options_from_args(
        profile_min, profile_opt, profile_max, workspace_mb=workspace_mb, dla_core=dla_core, builder_level=builder_level,
        timing_cache=timing_cache, version_compatible=version_compatible, hardware_compat=hardware_compat,
    ))
    if provider:
        backend_options["providers"] = provider
    build_args = dict(
        # A rebuild without --backend keeps the bundle's backend (or selects again if auto chose it).
        backend=backend if backend is not None or is_bundle else "auto",
        candidates=split_names(candidates),
        select=select,
        precision=precision,
        threads=threads,
        backend_options=backend_options or None,
        import_options=None if is_bundle and options == ImportOptions() else options,
        include_source=not no_source,
        verify=not no_verify,
        output=target,
        calibration_data=calib,
        calibration_method=calib_method,
        calibration_random=calib_random,
        calibration_cache=calib_cache,
        preprocess=preprocess,
        holdout=holdout,
        accuracy_budget=max_accuracy_drop,
        force_precision=force_precision or None,
        graph_passes=False if no_passes else None,
        disabled_passes=no_pass or None,
        check_compatibility=not no_compat_check,
        coco_annotations=coco,
        coco_images=images,
    )
    try:
        with progress_bar() as progress, warnings.catch_warnings(), \
                tempfile.TemporaryDirectory(prefix="enginesmith-data-") as scratch:
            # print_build shows the random-calibration warning the manifest carries; once is enough.
            warnings.filterwarnings("ignore", category=api.RandomCalibrationWarning)
            build_args["data"] = data_path(data, None, Path(scratch))
            engine = api.build(model, progress=progress, **build_args)
    except IncompatibleModelError as exc:
        # The full report on stdout; main() prints the one-line error on stderr.
        print_compat(exc.report, show_all=False)
        raise
    except VerificationFailedError as exc:
        # The random-calibration warning is otherwise printed with the build's summary, which a failure skips.
        why = "; it was calibrated and verified on random inputs (--calib-random), which says little" if calib_random else ""
        flagged = VerificationFailedError(f"{exc} (--no-verify){why}")
        flagged.stage = exc.stage
        raise flagged from None
    print_build(engine, target)


def parse_backend_options(specs: list[str]) -> dict:
    """``KEY=VALUE`` pairs; VALUE is read as JSON (numbers, true/false, lists) when it parses, else kept as text."""
    options: dict = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--option '{spec}' is not KEY=VALUE, e.g. --option device=cuda")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")


def parse_profile_args(mins: list[str], opts: list[str], maxs: list[str]) -> dict[str, dict[str, list[int]]]:
    """``--min/--opt/--max NAME:DIMS`` -> the backend option ``profiles``; every input needs all three."""
    parsed: dict[str, dict[str, tuple[int, ...]]] = {}
    for flag, specs in (("min", mins), ("opt", opts), ("max", maxs)):
        try:
            shapes = parse_shape_specs(specs)
        except typer.BadParameter as exc:
            raise BuildError(f"--{flag}: {exc.message}") from None
        for name, shape in shapes.items():
            parsed.setdefault(name, {})[flag] = shape
    profiles: dict[str, dict[str, list[int]]] = {}
    for name, given in parsed.items():
        absent = [f"--{flag}" for flag in ("min", "opt", "max") if flag not in given]
        if absent:
            raise BuildError(
                f"input '{name}' has no {' or '.join(absent)}: a TensorRT optimization profile needs --min, --opt and "
                f"--max for each input, e.g. --min {name}:1x3x224x224 --opt {name}:8x3x224x224 --max {name}:32x3x224x224"
            )
        low, opt, high = given["min"], given["opt"], given["max"]
        if not len(low) == len(opt) == len(high):
            raise BuildError(f"input '{name}': --min, --opt and --max have different ranks ({len(low)}, {len(opt)}, {len(high)})")
        bad = [axis for axis, (a, b, c) in enumerate(zip(low, opt, high)) if not a <= b <= c]
        if bad:
            axis = bad[0]
            raise BuildError(
                f"input '{name}', axis {axis}: needs --min <= --opt <= --max, got {low[axis]}, {opt[axis]}, {high[axis]}"
            )
        profiles[name] = {"min": list(low), "opt": list(opt), "max": list(high)}
    return profiles


def tensorrt_options_from_args(
    mins: list[str],
    opts: list[str],
    maxs: list[str],
    *,
    workspace_mb: Optional[int] = None,
    dla_core: Optional[int] = None,
    builder_level: Optional[int] = None,
    timing_cache: Optional[str] = None,
    version_compatible: bool = False,
    hardware_compat: Optional[str] = None,
) -> dict:
    """The TensorRT flags as backend options (the names both the TensorRT and the ONNX Runtime backend read)."""
    options: dict = {}
    profiles = parse_profile_args(mins, opts, maxs)
    if profiles:
        options["profiles"] = profiles
    if workspace_mb is not None:
        options["workspace_mb"] = workspace_mb
    if dla_core is not None:
        options["dla_core"] = dla_core
    if builder_level is not None:
        options["optimization_level"] = builder_level
    if timing_cache is not None:
        if not timing_cache.strip():
            raise BuildError("--timing-cache needs a path, or 'off'")
        options["timing_cache"] = timing_cache
    if version_compatible:
        options["version_compatible"] = True
    if hardware_compat is not None:
        level = hardware_compat.strip().lower().replace("-", "_").replace("+", "_plus")
        if level not in HARDWARE_COMPAT:
            raise BuildError(f"--hardware-compat '{hardware_compat}' is not one of {', '.join(HARDWARE_COMPAT)}")
        options["hardware_compatibility"] = level
    return options


def print_build(engine, target: Path) -> None:
    manifest = engine.manifest
    console.print(f"[bold green]built[/] {escape(str(target))}  ({manifest.backend} {manifest.backend_version}, {manifest.precision})",
                  highlight=False)
    for line in manifest.build_log:
        stripped = line.lstrip(" ")
        print_indented(stripped, 2 + len(line) - len(stripped))
    check = manifest.checks.get("build_verification")
    if check:
        print_indented(f"verification: {check['summary']}")
    if "map_budget" in manifest.checks:
        print_indented(f"mAP budget: {map_summary(manifest.checks['map_budget'])}")
    calibration = manifest.checks.get("calibration", {})
    line = calibration_line(calibration)
    if line:
        print_indented(line)
    if calibration.get("warning"):
        console.print("[bold red]WARNING:[/] " + escape(calibration["warning"]), highlight=False)
    if "precision_candidates" in manifest.checks:
        budget = AccuracyBudget.from_dict(manifest.accuracy_budget) if manifest.accuracy_budget else None
        print_candidates(manifest.checks["precision_candidates"], budget, calibration.get("resolution"))
    if "backend_candidates" in manifest.checks:
        print_backend_candidates(manifest.to_dict())
    line = stages_line(manifest.checks.get("stages"), manifest.checks.get("onnx_export"))
    if line:
        print_indented(line)
    console.print(str(engine.signature), highlight=False, markup=False)


def stages_line(stages: Optional[dict], onnx_export: Optional[dict] = None) -> str:
    """Where a build's time went, from the manifest's ``checks["stages"]``: one line.

    ``onnx_export`` (``checks["onnx_export"]``): a torch source's ONNX export that ran alongside the
    stages, shown after them with how long the package stage waited for it.
    """
    if not stages:
        return ""

    def seconds(value: float) -> str:
        return f"{value:.1f}s" if value < 100 else f"{value:.0f}s"

    # Manifests keep their keys sorted; the line follows the build's order.
    order = {stage.name: index for index, stage in enumerate(BUILD_STAGES)}
    ordered = sorted(stages.items(), key=lambda item: order.get(item[0], len(order)))
    parts = ", ".join(f"{name} {seconds(value)}" for name, value in ordered)
    line = f"time: {seconds(sum(stages.values()))} ({parts})"
    if onnx_export and onnx_export.get("alongside_build"):
        outcome = "" if onnx_export.get("ok") else ", failed"
        line += (f"; ONNX export {seconds(onnx_export.get('seconds') or 0.0)} alongside{outcome} "
                 f"(package waited {seconds(onnx_export.get('waited_s') or 0.0)})")
    return line


def calibration_line(check: dict) -> str:
    """How many samples calibrated the engine and how many verified it, from the manifest's check."""
    if check.get("used_for") == "verification":
        return f"{check['note']} ({check['resolution']})"
    if "samples" not in check:
        return "calibration: ranges reused from the calibration cache" if check.get("cache_reused") else ""
    held = check.get("holdout_samples", 0)
    verified = f"{held} held out to verify on ({check['resolution']})" if held else "none held out to verify on"
    return f"calibration: {check['samples']} samples of {check['data']} ({check['method']}); {verified}"


@app.command(short_help="Run an engine once and show its outputs.")
def run(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Engine bundle."),
    data: list[str] = typer.Option([], "--data", "-d", metavar="FILE|DIR|NAME=FILE", help=DATA_HELP),
    legacy_input: list[str] = typer.Option([], "--input", "-i", hidden=True, help="Old spelling of --data NAME=FILE."),
    image: list[Path] = typer.Option([], "--image", metavar="FILE", help="Image file(s), preprocessed as the engine was calibrated; repeatable."),
    random: bool = typer.Option(False, "--random", help="Feed inputs without files: the samples the bundle stores, else generated from the build's input plan, else seeded random."),
    batch: int = typer.Option(1, min=1, metavar="N", help="Batch size for --random (stored samples are cycled to it)."),
    seed: int = typer.Option(0, metavar="N", help="Seed for --random."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="Write all outputs to this .npz file."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help="Load engines whose payload runs code (the torch backend's compiler cache); only from builders you trust."),
) -> None:
    """Run an engine once and show its outputs."""
    if legacy_input:
        print_note("'run --input NAME=FILE' is now 'run --data NAME=FILE' (--input means NAME:SHAPE on build, "
                   "inspect and surgeon)")
        data = [*data, *legacy_input]
    data_files = [split_data_spec(spec)[1] for spec in data]
    check_output(out, inputs=[engine_path, *data_files, *image], force=force, flag="--out")
    engine = api.load(engine_path, trust_code=trust_code)
    if data:
        spec = PreprocessSpec.from_dict(engine.manifest.preprocess) if engine.manifest.preprocess else None
        feeds = read_data_args(data, engine.signature, spec)
    elif image:
        feeds = api.image_inputs(engine, image)
    elif random:
        feeds, label = api.engine_inputs(engine, batch=batch, seed=seed)
        print_indented(f"inputs: {label}", 0)
    else:
        raise typer.BadParameter("give inputs with --data FILE (or NAME=FILE), --image FILE, or --random",
                                 param_hint="--data")
    results = engine(feeds)
    tbl = table(f"outputs of {escape(engine_path.name)}")
    add_columns(tbl, "name", "dtype", "shape", "min", "max", "mean", "preview")
    for name, value in results.items():
        flat = value.ravel()
        numeric = flat.size and value.dtype.kind in "fiub"
        stats = [f"{flat.min():.4g}", f"{flat.max():.4g}", f"{flat.astype(np.float64).mean():.4g}"] if numeric else ["", "", ""]
        preview = np.array2string(flat[:6], precision=4, separator=", ") + (" ..." if flat.size > 6 else "")
        tbl.add_row(escape(name), str(value.dtype), str(tuple(value.shape)), *stats, escape(preview))
    console.print(tbl)
    if out is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **results)
        write_atomic(out, buffer.getvalue())
        console.print(f"wrote {escape(str(out))}", highlight=False)


def print_validation(report: ValidationReport) -> None:
    tbl = table(escape(f"validation vs {report.reference} ({report.samples} samples, inputs: {report.inputs})"))
    add_columns(tbl, "output", "max abs", "mean abs", "rel L2", "cosine", "argmax agree", "result")
    for o in report.outputs:
        agree = "" if o.argmax_agreement is None else f"{o.argmax_agreement:.2%}"
        result = "[green]pass[/]" if o.passed else "[red]FAIL[/]: " + escape("; ".join(o.failures))
        tbl.add_row(escape(o.name), f"{o.max_abs:.3e}", f"{o.mean_abs:.3e}", f"{o.rel_l2:.3e}", f"{o.cosine:.6f}", agree, result)
    console.print(tbl)
    if report.inconclusive:
        console.print("[bold yellow]INCONCLUSIVE[/] " + escape(f"(not a failure): {report.inconclusive}"), highlight=False)
    else:
        console.print(("[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]")
                      + escape(f" ({report.precision} tolerance: {report.tolerance_text()})"), highlight=False)
    for warning in report.warnings:
        console.print("[bold yellow]warning:[/] " + escape(warning), highlight=False)


@app.command(short_help="Compare an engine with the reference model; exit 1 on failure.")
def validate(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Engine bundle."),
    against: Optional[Path] = typer.Option(None, metavar="MODEL", help="Reference model (default: the source the bundle carries)."),
    data: list[str] = typer.Option([], "--data", "-d", metavar="FILE|DIR|NAME=FILE", help=DATA_HELP + " Default: the samples the bundle carries, else inputs generated from the graph."),
    batch: Optional[int] = typer.Option(None, min=1, metavar="N", help="Batch size."),
    batches: int = typer.Option(3, min=1, metavar="N", help="Random batches to draw when no --data."),
    seed: int = typer.Option(0, metavar="N", help="Seed for random inputs."),
    max_rel_l2: Optional[float] = typer.Option(None, metavar="X", help="Override: largest relative L2 error."),
    min_cosine: Optional[float] = typer.Option(None, metavar="X", help="Override: smallest cosine similarity."),
    min_argmax: Optional[float] = typer.Option(None, metavar="X", help="Override: smallest argmax agreement (0-1)."),
    max_abs: Optional[float] = typer.Option(None, metavar="X", help="Override: largest absolute error."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow references and engines that execute code when loaded (pickles, Lambda layers, compiler caches)."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the report as JSON (- for standard output)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    no_store: bool = typer.Option(False, "--no-store", help="Do not store the report in the bundle."),
    layerwise: bool = typer.Option(False, "--layerwise", help="Also compare every intermediate tensor and name the first layer that diverges."),
    show_all: bool = typer.Option(False, "--all", help="With --layerwise: show every layer."),
) -> None:
    """Compare an engine's outputs with the reference model's; exit 1 when it fails."""
    inputs = [engine_path, against, *(split_data_spec(spec)[1] for spec in data)]
    check_output(json_path, inputs=inputs, force=force, flag="--json")
    layer_path = None
    if layerwise and json_path is not None and str(json_path) != "-":
        layer_path = check_output(json_path.with_name(json_path.stem + ".layerwise.json"), inputs=inputs,
                                  force=force, flag="--json")
    engine = api.load(engine_path, trust_code=trust_code)
    tolerance = engine_tolerance(engine, max_rel_l2=max_rel_l2, min_cosine=min_cosine,
                                 min_argmax_agreement=min_argmax, max_abs=max_abs)
    options = ImportOptions(trust_code=True) if trust_code else None
    with tempfile.TemporaryDirectory(prefix="enginesmith-data-") as scratch:
        data_source = data_path(data, engine.signature, Path(scratch))
        report = api.validate(engine, against, data=data_source, batch=batch, batches=batches, seed=seed,
                              tolerance=tolerance, import_options=options, store=not no_store)
        layers = None
        if layerwise:
            layers = api.layerwise(engine_path, against, data=data_source, batch=batch, seed=seed,
                                   tolerance=tolerance, import_options=options)
    if str(json_path) == "-":  # one JSON document on stdout, nothing else
        document = json.loads(report.to_json())
        if layers is not None:
            document = {"validation": document, "layerwise": json.loads(layers.to_json())}
        print_json(json.dumps(document, indent=2), json_path)
    else:
        print_validation(report)
        print_json(report.to_json(), json_path)
        if layers is not None:
            print_layerwise(layers, show_all)
            print_json(layers.to_json(), layer_path)
    if report.failed:
        raise typer.Exit(code=1)


def print_bench(report: BenchReport, title: str) -> None:
    tbl = table(title)
    add_columns(tbl, "target", "batch", "runs", "p50 ms", "p90 ms", "p99 ms", "items/s",
                right=("batch", "runs", "p50 ms", "p90 ms", "p99 ms", "items/s"))
    for r in report.results:
        tbl.add_row(escape(r.label), str(r.batch), f"{r.runs:,}", f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
                    f"{r.p99_ms:.3f}", f"{r.throughput:,.0f}")
    console.print(tbl)
    for ratio in report.ratios():
        console.print(escape(f"batch {ratio['batch']}, p50: {ratio['text']}"), highlight=False)
    total = sum(r.seconds for r in report.results)
    runs = sum(r.runs for r in report.results)
    console.print(f"timed {runs:,} runs in {total:.1f} s", highlight=False)


@app.command(short_help="Measure latency and throughput, optionally against the source.")
def bench(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Engine bundle."),
    batch: str = typer.Option("1", metavar="SIZES", help="Batch sizes, comma-separated, e.g. 1,8."),
    vs: Optional[Path] = typer.Option(None, metavar="MODEL", help="Also time this model run by hand (a plain session, Keras predict, ...) in the same run."),
    duration: float = typer.Option(2.0, min=0.01, metavar="SECONDS", help="Seconds per target and batch size (at least 10 runs each)."),
    runs: Optional[int] = typer.Option(None, min=1, metavar="N", help="Time exactly N runs per target and batch size instead of --duration."),
    warmup: int = typer.Option(5, min=0, metavar="N", help="Untimed runs first."),
    data: list[str] = typer.Option([], "--data", "-d", metavar="FILE|DIR|NAME=FILE", help=DATA_HELP + " Default: seeded random inputs."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write results as JSON (- for standard output)."),
    plot: Optional[Path] = typer.Option(None, metavar="FILE", help="Draw results into this PNG file."),
    log_scale: bool = typer.Option(False, "--log-scale", help="Plot on logarithmic axes (default: linear)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help="Load engines whose payload runs code (the torch backend's compiler cache); only from builders you trust."),
) -> None:
    """Measure latency and throughput, optionally against the source model run by hand.

    Each target is timed for --duration seconds per batch size (or --runs times), in interleaved
    rounds so that load on the machine hits both alike.
    """
    batches = parse_batches(batch)
    inputs = [engine_path, vs, *(split_data_spec(spec)[1] for spec in data)]
    check_output(json_path, inputs=inputs, force=force, flag="--json")
    check_output(plot, inputs=inputs, force=force, flag="--plot")
    engine = api.load(engine_path, trust_code=trust_code)
    with tempfile.TemporaryDirectory(prefix="enginesmith-data-") as scratch, progress_bar() as progress:
        report = api.bench(engine, batches=batches, vs=vs, runs=runs, duration_s=None if runs else duration,
                           warmup=warmup, data=data_path(data, engine.signature, Path(scratch)), progress=progress)
    if str(json_path) != "-":
        print_bench(report, f"{engine_path.name} ({report.machine['precision']}) on {report.machine['cpu']} "
                            f"({report.machine['physical_cores']} cores)")
    print_json(json.dumps(report.to_dict(), indent=2), json_path)
    if plot:
        report.plot(plot, title=report.default_title(engine_path.name), log_scale=log_scale)
        console.print(f"wrote {escape(str(plot))}", highlight=False)


def _placement_text(providers: dict[str, int]) -> str:
    return "/".join(f"{name.replace('ExecutionProvider', '')} x{count}" for name, count in providers.items())


def value_text(value) -> str:
    """A manifest value for people: lists joined, mappings as key=value, no Python reprs."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={value_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(value_text(v) for v in value)
    return "" if value is None else str(value)


@app.command(short_help="Show an engine's manifest: signature, platform, checks.")
def info(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Engine bundle."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the full manifest as JSON (- for standard output)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Show an engine's manifest: signature, platform, backend, precision and checks."""
    check_output(json_path, inputs=[engine_path], force=force, flag="--json")
    data = api.info(engine_path)
    if json_path is not None:
        print_json(json.dumps(data, indent=2, default=str), json_path)
        return
    console.print(f"[bold]{escape(engine_path.name)}[/]  enginesmith {data['enginesmith_version']}, format {data['format_version']}",
                  highlight=False)
    console.print(f"backend: {data['backend']} {data['backend_version']}   precision: {data['precision']}", highlight=False)
    embedded = "embedded" if any(k.startswith("source/") for k in data["files"]) else "not embedded"
    console.print(escape(f"source: {data['source_kind']} '{data['source_name']}' ({embedded}), sha256 {data['source_sha256']}"),
                  highlight=False)
    console.print(escape(f"built: {data['created_at']} for {data.get('platform_summary', '?')}"), highlight=False)
    signature = table("signature")
    add_columns(signature, "", "name", "dtype", "shape")
    for kind in ("inputs", "outputs"):
        for spec in data["signature"][kind]:
            signature.add_row(kind[:-1], escape(spec["name"]), spec["dtype"], escape(shape_text(spec["shape"])))
    console.print(signature)
    fp = table("platform fingerprint")
    add_columns(fp, "key", "value", "must match")
    for key, value in sorted(data["fingerprint"].items()):
        fp.add_row(escape(key), escape(value_text(value)), "yes" if key in data["fingerprint_must_match"] else "")
    console.print(fp)
    if data["runs_here"]:
        console.print("[green]runs on this machine[/]")
    else:
        for diff in data["differences_here"]:
            console.print("[red]differs here:[/] " + escape(f"{diff['key']}: engine {diff['engine']}, here {diff['here']}"), highlight=False)
    placement = data["checks"].get("build", {}).get("node_placement") or {}
    if placement:
        where = ", ".join(f"{op} {_placement_text(providers)}" for op, providers in placement.items())
        console.print(f"nodes ran on: {where}", highlight=False, markup=False)
    samples = samples_text(data["checks"].get("samples"))
    if samples:
        print_indented(f"samples: {samples}", 0)
    stages = stages_line(data["checks"].get("stages"), data["checks"].get("onnx_export"))
    if stages:
        print_indented(f"build {stages}", 0)
    if data["checks"].get("backend_candidates"):
        print_backend_candidates(data)
    for name, check in data["checks"].items():
        if isinstance(check, dict) and "summary" in check:
            when = f" ({check['at']})" if "at" in check else ""
            console.print(f"check {name}: {check['summary']}{when}", highlight=False, markup=False)
        elif name == "graph_passes" and isinstance(check, dict):
            applied = ", ".join(check.get("applied", [])) or "none"
            console.print(f"graph passes: {check['nodes_before']} -> {check['nodes_after']} nodes; applied {applied}",
                          highlight=False, markup=False)
