"""Layer-wise debugging: where does an engine start to differ from its source?

Every intermediate tensor of the source graph is made a graph output. The reference is
that graph run by a plain ONNX Runtime CPU session; the engine side is the same graph
(after the passes the engine was built with) built by the engine's backend with the
engine's options (precision, providers, calibration cache). Tensors present on both
sides are compared in topological order; the first node whose output is beyond the
tolerance is the first divergent layer.

Exposing intermediates keeps the backend from fusing across them, so the numbers are
those of a slightly less optimized engine; reduced-precision effects (fp16, int8) and
conversion errors show up all the same.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from ..backends import Backend, BuildOptions, Calibration, get_backend
from ..errors import ValidationDataError
from ..validate import RANDOM_INT8_INPUTS, Tolerance, compare, tolerance_for
from ._onnx import intermediate_names, node_labels, plain_runner, with_outputs


@dataclass
class LayerComparison:
    index: int
    node: str
    op_type: str
    tensor: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class LayerwiseReport:
    backend: str
    precision: str
    tolerance: dict[str, Any]
    inputs: str
    layers: list[LayerComparison]
    # Tensors of the source that the engine side does not produce (fused or renamed away).
    not_compared: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergent(self) -> LayerComparison | None:
        return next((layer for layer in self.layers if not layer.passed), None)

    @property
    def passed(self) -> bool:
        return self.first_divergent is None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        first = self.first_divergent
        data["first_divergent"] = asdict(first) if first else None
        data["passed"] = self.passed
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default).encode()

    def summary(self) -> str:
        first = self.first_divergent
        if first is None:
            return (f"all {len(self.layers)} compared tensors within tolerance "
                    f"({self.backend} {self.precision} vs the source)")
        return (f"first divergence at layer {first.index} '{first.node}' ({first.op_type}), tensor '{first.tensor}': "
                f"{'; '.join(first.failures)} (max abs {first.max_abs:.3g}, cosine {first.cosine:.6f})")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def calibrated_tensors(cache: bytes | None) -> set[str] | None:
    """Names of the tensors an int8 calibration cache (ONNX Runtime's JSON ranges) holds a range for.

    ``None`` when there is no cache or it is in another format (then every tensor is exposed).
    """
    if not cache or not cache.lstrip().startswith(b"{"):
        return None
    try:
        ranges = json.loads(cache).get("data")
    except (ValueError, AttributeError):
        return None
    return set(ranges) if isinstance(ranges, dict) else None


def _run_engine_side(model: onnx.ModelProto, backend: Backend, options: BuildOptions, feeds: Mapping[str, np.ndarray],
                     calibration: Calibration | None) -> tuple[dict[str, np.ndarray], list[str]]:
    from ..importers.onnx_importer import signature_of

    signature = signature_of(model)
    result = backend.build(model, signature, options, None, calibration)
    session = backend.load(result.payload, result.resolved_options, signature)
    try:
        return session.run(dict(feeds)), result.log
    finally:
        session.close()


def compare_layerwise(
    source_model: onnx.ModelProto,
    engine_backend: Backend | str,
    build_options: BuildOptions,
    feeds: Mapping[str, np.ndarray],
    tolerance: Tolerance | None = None,
    *,
    engine_model: onnx.ModelProto | None = None,
    calibration: Calibration | None = None,
    inputs_label: str = "given inputs",
) -> LayerwiseReport:
    """Compare every intermediate tensor of ``source_model`` with the engine side's, in topological order.

    ``engine_model`` is the graph the engine was built from (the source after graph passes),
    by default the source itself. For int8 give ``calibration`` (e.g. the engine's calibration cache).
    """
    backend = get_backend(engine_backend) if isinstance(engine_backend, str) else engine_backend
    tolerance = tolerance or tolerance_for(build_options.precision)
    # Argmax agreement means something for class scores only, not for feature maps.
    inner_tolerance = replace(tolerance, min_argmax_agreement=0.0)
    engine_model = engine_model if engine_model is not None else source_model
    reference_model = with_outputs(source_model, intermediate_names(source_model))
    engine_tensors = intermediate_names(engine_model)
    calibrated = calibrated_tensors(calibration.cache) if calibration is not None and build_options.precision == "int8" else None
    if calibrated is not None:
        # The engine's ranges cover only the tensors its quantizer saw: a MatMul or Conv output whose bias
        # Add was fused into it has none. Exposing such a tensor would ask for a range nobody measured, and
        # the engine never computes it anyway, so it is left out (and listed as not compared).
        engine_tensors = [name for name in engine_tensors if name in calibrated]
    exposed_engine = with_outputs(engine_model, engine_tensors)
    reference = plain_runner(reference_model)(dict(feeds))
    got, log = _run_engine_side(exposed_engine, backend, build_options, feeds, calibration)
    final_outputs = {o.name for o in source_model.graph.output}
    # int8 (QDQ) engines quantize a tensor read only by a Relu with the Relu's range, so its negative
    # values are gone on purpose: such tensors are compared after that Relu.
    readers: dict[str, set[str]] = {}
    for node in source_model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    relu_only = {name for name, ops in readers.items() if ops == {"Relu"} and name not in final_outputs}
    rectified: list[str] = []
    layers: list[LayerComparison] = []
    not_compared: list[str] = []
    labels = node_labels(source_model)
    for index, (label, node) in enumerate(zip(labels, source_model.graph.node)):
        for tensor in node.output:
            if not tensor or tensor not in reference:
                continue
            if tensor not in got:
                not_compared.append(tensor)
                continue
            ref, val = np.asarray(reference[tensor]), np.asarray(got[tensor])
            if ref.dtype.kind not in "fiub":
                continue
            if build_options.precision == "int8" and tensor in relu_only and ref.dtype.kind == "f":
                ref, val = np.maximum(ref, 0), np.maximum(val, 0)
                rectified.append(tensor)
            result = compare(tensor, ref, val, tolerance if tensor in final_outputs else inner_tolerance)
            layers.append(LayerComparison(index, label, node.op_type, tensor, list(ref.shape), result.max_abs,
                                          result.mean_abs, result.rel_l2, result.cosine, result.passed, result.failures))
    notes = [f"{len(layers)} tensors compared in topological order"]
    if not_compared:
        notes.append(f"{len(not_compared)} source tensors have no counterpart in the engine's graph (fused or folded away)")
    if rectified:
        notes.append(f"{len(rectified)} tensors read only by a Relu compared after it (int8 folds the Relu into "
                     "their quantization range)")
    notes += [line for line in log if "fp16" in line or "int8" in line]
    return LayerwiseReport(
        backend=backend.name,
        precision=build_options.precision,
        tolerance=tolerance.to_dict(),
        inputs=inputs_label,
        layers=layers,
        not_compared=not_compared,
        notes=notes,
    )


def layerwise_for_engine(
    engine_path: str | Path,
    against: Any = None,
    *,
    data: str | Path | None = None,
    batch: int | None = None,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    import_options: Any = None,
) -> LayerwiseReport:
    """:func:`compare_layerwise` for a saved engine: its source (or ``against``), backend, options and passes."""
    from ..bundle import read_bundle
    from ..importers import ImportOptions, import_model
    from ..importers.archive import write_embedded_source
    from .passes import optimize

    path = Path(engine_path)
    contents = read_bundle(path, payload=False, source=True, caches=True, samples=True)
    manifest = contents.manifest
    recorded = ImportOptions.from_dict(manifest.build_options.get("import_options", {}))
    options = import_options.over(recorded) if import_options is not None else recorded
    with tempfile.TemporaryDirectory(prefix="enginesmith-layerwise-") as tmp:
        if against is None:
            if contents.source is None:
                raise ValidationDataError(
                    f"'{path.name}' does not carry its source model; give the reference with --against MODEL"
                )
            against = write_embedded_source(manifest.source_name, contents.source, Path(tmp))
        imported = import_model(against, options)
    source = imported.model
    feeds, label, real = _layerwise_feeds(manifest, contents.samples, path.name, data, batch, seed)
    build_options = BuildOptions.from_dict(manifest.build_options)
    engine_model = None
    passes = (manifest.checks.get("graph_passes") or {}).get("applied") if isinstance(manifest.checks, dict) else None
    if passes:
        specs = _recorded_specs(manifest.checks["graph_passes"])
        engine_model, _ = optimize(source, specs, check=False)
    calibration = None
    if build_options.precision == "int8":
        cache = contents.caches.get("calibration_cache.json")
        calibration = Calibration([] if cache is not None else [feeds], build_options.calibration_method, cache)
    report = compare_layerwise(source, manifest.backend, build_options, feeds, tolerance,
                               engine_model=engine_model, calibration=calibration, inputs_label=label)
    if passes:
        report.notes.append("engine side rebuilt after the graph passes the engine was built with: " + ", ".join(passes))
    if not real and build_options.precision == "int8":
        report.notes.insert(0, RANDOM_INT8_INPUTS)
    return report


def _layerwise_feeds(
    manifest: Any, samples: bytes | None, name: str, data: str | Path | None, batch: int | None, seed: int
) -> tuple[dict[str, np.ndarray], str, bool]:
    """One batch to compare on, its label, and whether it is real: the first batch of ``data``, else of the
    samples the bundle stores, else generated from the build's input plan, else random."""
    from ..build_inputs import decode_samples, first_samples, sample_axes, sample_feeds, take_rows
    from ..validate.data import load_dataset, split_batches

    signature = manifest.signature
    fixed = signature.fixed_batch()
    if data is not None:
        feeds = next(iter(split_batches(load_dataset(data, signature), batch or fixed or 8)))
        return feeds, f"first batch of '{Path(data).name}'", True
    record = (manifest.checks.get("samples") if isinstance(manifest.checks, dict) else None) or {}
    if samples is not None:
        stored = decode_samples(samples, signature, f"engine '{name}'")
        axes = sample_axes(signature)
        feeds = take_rows(stored, fixed, axes) if fixed else first_samples(stored, batch or 8, axes)
        return feeds, f"first samples stored in the bundle ({record.get('label', 'build samples')})", True
    feeds, label = sample_feeds(signature, None, record, f"engine '{name}'", batch=batch or fixed or 1, seed=seed)
    return feeds, label, False


def _recorded_specs(record: Mapping[str, Any]) -> list[Any]:
    """Pass specs (name, kwargs) of the passes a build applied, from ``PassSummary.to_dict()``."""
    specs: list[Any] = []
    for result in record.get("results", []):
        if result.get("status") in ("applied", "unchecked"):
            args = result.get("args") or {}
            specs.append((result["name"], args) if args else result["name"])
    return specs


__all__ = ["LayerComparison", "LayerwiseReport", "compare_layerwise", "layerwise_for_engine"]
