"""The Engine's per-call cost over its backend's bare session, on tiny models (issue 17).

On models that run in tens of microseconds the engine's own work per call (input checks, the
feed dict, output naming, the backend wrapper) is a visible share of the latency. For each
model and backend this builds an engine, loads it from its file, and times in interleaved
rounds (``cpu_engines.interleaved``: blocks in rotated order, a pause and an untimed call
before each block), on the same inputs:
  * bare   - the engine's own runtime object called the way a user would call it by hand:
             ONNX Runtime: ``InferenceSession.run(output_names, feeds)`` on the engine's session
             (same session options); OpenVINO: one reused ``InferRequest`` of the engine's
             compiled model, ``request.infer(feeds)``, results read by port
  * engine - ``engine.infer(feeds)``
and reports each one's p50 (median of the round medians), the ratio engine / bare (median of
the per-round ratios) and the difference in microseconds (median of the per-round differences).

Models: a 2-layer MLP and a small conv (built in code), and the tiny real ONNX models of the
zoo manifest found in the local cache (run benchmarks/zoo.py to fetch them).

    python benchmarks/engine_overhead.py [--rounds 20] [--runs 3000] [--models mlp,conv,silero_vad_op18_ifless]
        [--backends onnxruntime,openvino] [--json benchmarks/results/engine_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from cpu_backends import fill, zoo_models  # noqa: E402
from cpu_engines import LoadMonitor, interleaved, machine  # noqa: E402

import enginesmith as es  # noqa: E402
from enginesmith.files import write_atomic  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ZOO_DEFAULT = ["silero_vad_op18_ifless", "attacut_sc_thai", "arabic_romanizer_decoder", "akiki_vad"]
# The aim: the engine within a few percent (or a few microseconds) of the bare session.
TARGET_RATIO = 1.03
TARGET_US = 3.0


# --------------------------------------------------------------------------- models


def _model(nodes: list, inputs: list, outputs: list, weights: list) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def mlp() -> onnx.ModelProto:
    """x[batch, 64] -> Gemm 128 -> Relu -> Gemm 10 -> probs."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)
               for name, shape in (("w1", (128, 64)), ("b1", (128,)), ("w2", (10, 128)), ("b2", (10,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])], weights)


def small_conv() -> onnx.ModelProto:
    """x[batch, 3, 16, 16] -> Conv 8 3x3 -> Relu -> GlobalAveragePool -> y[batch, 8, 1, 1]."""
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.1, "w"),
               numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 1, 1])], weights)


BUILT_IN = {"mlp": mlp, "conv": small_conv}


def tiny_models(wanted: list[str], workdir: Path, zoo_manifest: Path, zoo_cache: Path) -> tuple[list[dict], list[str]]:
    """(models: id, path, feeds, source; notes on the zoo models skipped)."""
    found = []
    for name in [w for w in wanted if w in BUILT_IN]:
        path = workdir / f"{name}.onnx"
        onnx.save(BUILT_IN[name](), path)
        model = onnx.load(path)
        feeds = {i.name: np.random.default_rng(2).standard_normal(
            [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
        found.append({"id": name, "path": path, "feeds": feeds, "source": "built in code"})
    zoo, notes = zoo_models(zoo_manifest, zoo_cache, [w for w in wanted if w not in BUILT_IN])
    for entry in zoo:
        rng = np.random.default_rng(0)
        feeds = {name: fill(spec, rng) for name, spec in entry["inputs"].items()}
        found.append({"id": entry["id"], "path": entry["path"], "feeds": feeds, "source": entry["package"]})
    return found, notes


# --------------------------------------------------------------------------- targets


def bare_call(engine: es.Engine) -> Callable[[dict[str, np.ndarray]], Any]:
    """The engine's own runtime object, called through its public API as a user would."""
    session = engine._session  # the backend's Session: benchmarks may look inside
    if engine.backend == "onnxruntime":
        ort_session, names = session._session, engine.signature.output_names
        return lambda feeds: ort_session.run(names, feeds)
    if engine.backend == "openvino":
        compiled = session._compiled
        request = compiled.create_infer_request()
        ports = [compiled.output(name) for name in engine.signature.output_names]

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            results = request.infer(feeds)
            return [results[port] for port in ports]

        return run
    raise ValueError(f"no bare call for the {engine.backend} backend")


def build_engine(model: dict, backend: str, workdir: Path) -> es.Engine:
    path = workdir / f"{model['id']}.{backend}.engine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es.build(model["path"], backend=backend, output=path, verify=False, data=model["feeds"])
    return es.load(path)


def max_abs_diff(engine_out: dict[str, np.ndarray], bare_out: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
               for a, b in zip(engine_out.values(), bare_out))


def bench_pair(model: dict, backend: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    engine = build_engine(model, backend, workdir)
    feeds = model["feeds"]
    bare = bare_call(engine)
    diff = max_abs_diff(engine.infer(feeds), bare(feeds))
    _, rounds = interleaved({"bare": bare, "engine": engine.infer}, feeds, batch=1, rounds=args.rounds, runs=args.runs)
    b, e = np.asarray(rounds["bare"]), np.asarray(rounds["engine"])
    return {
        "model": model["id"], "backend": backend, "source": model["source"],
        "bare p50 us": float(np.median(b)) * 1e3, "engine p50 us": float(np.median(e)) * 1e3,
        "engine / bare": float(np.median(e / b)), "engine / bare min-max": [float((e / b).min()), float((e / b).max())],
        "engine - bare us": float(np.median(e - b)) * 1e3, "max abs diff": diff,
        "round p50 ms": {"bare": rounds["bare"], "engine": rounds["engine"]},
    }


def targets_met(results: list[dict]) -> dict[str, Any]:
    """Engine within TARGET_RATIO of bare, or within TARGET_US microseconds, on every model and backend."""
    within = [r for r in results if r["engine / bare"] <= TARGET_RATIO or r["engine - bare us"] <= TARGET_US]
    worst = max((r["engine / bare"] for r in results), default=float("nan"))
    return {f"engine p50 <= {TARGET_RATIO}x bare or <= +{TARGET_US:g} us (every model, backend)":
            {"value": worst, "met": len(within) == len(results), "within": f"{len(within)}/{len(results)}"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*BUILT_IN, *ZOO_DEFAULT]))
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3000, help="calls per target, over all rounds")
    parser.add_argument("--zoo-manifest", type=Path, default=HERE / "zoo" / "models.toml")
    parser.add_argument("--zoo-cache", type=Path, default=Path.home() / ".cache" / "enginesmith-zoo" / "models")
    parser.add_argument("--json", type=Path, default=RESULTS / "engine_overhead.json")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    for backend in list(backends):
        available = es.backends.get_backend(backend).available()
        if not available:
            print(f"{backend}: skipped ({available.reason})", file=sys.stderr)
            backends.remove(backend)
    facts = machine({"openvino": _openvino_version()})
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="enginesmith-overhead-") as tmp, LoadMonitor() as load:
        models, notes = tiny_models(args.models.split(","), Path(tmp), args.zoo_manifest, args.zoo_cache)
        for note in notes:
            print(note, file=sys.stderr)
        for model in models:
            for backend in backends:
                try:
                    row = bench_pair(model, backend, Path(tmp), args)
                except es.EnginesmithError as exc:
                    print(f"{model['id']} / {backend}: not built: {str(exc).splitlines()[0]}", file=sys.stderr)
                    continue
                results.append(row)
                print(f"{row['model']:26s} {backend:12s} bare {row['bare p50 us']:8.1f} us  engine "
                      f"{row['engine p50 us']:8.1f} us  x{row['engine / bare']:.3f}  {row['engine - bare us']:+6.1f} us",
                      flush=True)
    facts["load"] = load.facts
    targets = targets_met(results)
    print("targets:")
    for what, verdict in targets.items():
        print(f"  {'MET ' if verdict['met'] else 'MISS'} {what}: worst {verdict['value']:.3f}, {verdict['within']}")
    report = {"benchmark": "engine_overhead", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": facts, "rounds": args.rounds,
              "runs": args.runs, "targets": targets, "results": results}
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


if __name__ == "__main__":
    main()
