"""OpenVINO vs ONNX Runtime on this CPU, in one run per model (issue 17).

For each model (the MobileNetV2-like and ResNet-50-like samples, and the real ONNX models of
the zoo manifest found in a local cache) this times, on the same inputs, in interleaved rounds:
  * plain ORT        - ``onnxruntime.InferenceSession(model.onnx)`` with default options (the baseline)
  * plain OV fp32    - ``Core().compile_model(model.onnx, "CPU", {INFERENCE_PRECISION_HINT: f32})``
  * plain OV default - ``Core().compile_model(model.onnx, "CPU")``: bf16 inside on a CPU that has it
  * engine fp32      - ``enginesmith build --backend openvino``, loaded from its file, ``engine.infer``
  * engine bf16      - the same with ``--precision bf16`` (only where the CPU has native bf16)
  * engine int8      - with ``--int8``: NNCF on random calibration inputs (speed only: random-weight
                       and random-input accuracy means nothing)
  * engine auto      - with ``--auto``: ``enginesmith build --backend auto`` (ONNX Runtime and OpenVINO
                       built, verified, timed here; the faster kept), its build time and candidate table
  * engine auto best - with ``--auto``: the same with ``--precision best --max-accuracy-drop 1%``, random
                       calibration inputs (speed only), for the sample models (zoo models' random inputs
                       cannot verify, and unverified int8 would win on speed alone)
and reports p50 latency, the speed-up over plain ORT (median over rounds of the per-round
ratios), each target's max abs difference and rel L2 from plain ORT, and load times: the
engine (OpenVINO's exported compiled model), an IR (xml+bin read and compiled: the payload
not chosen), the ONNX read and compiled by OpenVINO, and ORT's session creation.
Prints a table, writes JSON and one PNG, and records the machine's ISA flags.

    python benchmarks/cpu_backends.py [--rounds 10] [--runs 40] [--batches 1] [--models ...]
        [--zoo-manifest benchmarks/zoo/models.toml] [--zoo-cache ~/.cache/enginesmith-zoo/models] [--int8] [--auto]

With ``--corpus zoo`` it runs issue 17's targets over the whole real-model corpus instead
(plain ORT, plain OpenVINO fp32 and defaults, auto fp32, auto best 1%; see cpu_backends_zoo.py):

    python benchmarks/cpu_backends.py --corpus zoo [--tier test|bench|all] [--models ID,ID] [--max-model-mb N]
        [--rounds 6] [--runs 60] [--best-samples 200] [--trained DIR] [--no-best] [--no-accuracy] [--no-resnet50]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from cpu_engines import LoadMonitor, interleaved, machine, round_ratio, write_report  # noqa: E402

import enginesmith as es  # noqa: E402
from enginesmith import samples  # noqa: E402
from enginesmith.files import write_atomic  # noqa: E402
from enginesmith.signature import random_inputs  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SAMPLES = {
    "mobilenet_v2_like": lambda: samples.mobilenet_v2_like(image_size=224),
    "resnet50_like": lambda: samples.resnet50_like(image_size=224),
}
# Real ONNX models of the zoo manifest (benchmarks/zoo/models.toml) timed when their file is in the cache.
# (ppocr_mobile_v2_cls is left out: its input says [-1, 3, '?', '?'], and by ONNX's rules two equal
# symbolic dimensions are one size, so enginesmith refuses a 48x192 input.)
ZOO_DEFAULT = ["ppocr_v4_det", "ppocr_v4_rec", "nudenet_yolov8n_320", "open_nsfw", "text_orientation",
               "captcha_crnn", "fsmn_vad", "silero_vad"]
BASELINE = "plain ORT"


# --------------------------------------------------------------------------- models


def zoo_models(manifest: Path, cache: Path, wanted: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(models found: id, path, inputs, sha256, package; notes on the ones skipped)."""
    if not manifest.is_file():
        return [], [f"zoo manifest {manifest} not found: real models skipped"]
    import tomllib  # Python 3.11+; the samples alone run on 3.10

    entries = {m["id"]: m for m in tomllib.loads(manifest.read_text())["models"]}
    found, notes = [], []
    for model_id in wanted:
        entry = entries.get(model_id)
        if entry is None or not entry["path"].endswith(".onnx"):
            notes.append(f"{model_id}: not an ONNX model of the manifest")
            continue
        path = cache / model_id / PurePosixPath(entry["path"]).name
        if not path.is_file():
            notes.append(f"{model_id}: not in the cache {cache} (run benchmarks/zoo.py to fetch it)")
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            notes.append(f"{model_id}: sha256 differs from the manifest, skipped")
            continue
        found.append({"id": model_id, "path": path, "inputs": entry["inputs"], "sha256": digest,
                      "package": f"{entry['package']}=={entry['version']}", "task": entry.get("task", "")})
    return found, notes


def fill(spec: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """An input from the manifest's spec (shape, dtype, fill and its parameters)."""
    shape, kind = spec["shape"], spec.get("fill", "normal")
    if kind == "normal":
        values = rng.standard_normal(shape) * spec.get("scale", 1.0)
    elif kind == "uniform":
        values = rng.uniform(spec.get("low", 0.0), spec.get("high", 1.0), shape)
    elif kind == "randint":
        values = rng.integers(spec["low"], spec["high"], shape)
    elif kind in ("zeros", "ones"):
        values = (np.zeros if kind == "zeros" else np.ones)(shape)
    else:
        values = np.full(shape, spec["value"])
    return np.asarray(values).astype(spec["dtype"])


# --------------------------------------------------------------------------- targets


def plain_ort(path: Path) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def plain_openvino(path: Path, config: dict[str, str]) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """What a user writes by hand: compile the ONNX file, one infer request, results by port."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer(feeds)
        return [results[port] for port in outputs]

    return run


def as_list(engine: es.Engine) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    names = engine.signature.output_names

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = engine.infer(feeds)
        return [outputs[name] for name in names]

    return run


def differences(got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, float]:
    """Max abs difference and rel L2 over the float outputs (the others must be equal)."""
    max_abs, num, den = 0.0, 0.0, 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.size:
            max_abs = max(max_abs, float(np.max(np.abs(g - w))))
            num += float(np.sum((g - w) ** 2))
            den += float(np.sum(w**2))
    return {"max_abs_diff": max_abs, "rel_l2": (num / den) ** 0.5 if den else 0.0}


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def load_times(model_path: Path, engine_path: Path, workdir: Path) -> dict[str, float]:
    """Seconds to get a runnable model each way (best of 3, after imports)."""
    import onnxruntime as ort
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    ir = workdir / "model.xml"
    ov.save_model(core.read_model(str(model_path)), str(ir), compress_to_fp16=False)
    from enginesmith.bundle import read_bundle

    blob = read_bundle(engine_path).payload
    return {
        "engine (compiled-model payload)": best_of(lambda: es.load(engine_path)),
        # The payload choice alone: the compiled model imported, without the bundle's checks.
        "compiled model import": best_of(lambda: core.import_model(blob, "CPU", config)),
        "IR xml+bin read + compile": best_of(lambda: core.compile_model(core.read_model(str(ir)), "CPU", config)),
        "ONNX read + compile (plain OV)": best_of(lambda: core.compile_model(str(model_path), "CPU", config)),
        "plain ORT session": best_of(lambda: ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])),
    }


# --------------------------------------------------------------------------- one model


def bench_model(name: str, model_path: Path, feeds: dict[str, np.ndarray], workdir: Path, args: argparse.Namespace,
                bf16: bool, verify: bool = True) -> dict[str, Any]:
    """Every target on ``feeds``. Engines keep the model's dynamic dimensions, like the plain sessions.

    ``verify``: the fp32 build's own check on random inputs; real models whose inputs random
    normal data does not fit (an audio sample rate, image sizes) are compared with plain ORT on
    ``feeds`` only (``vs plain ORT outputs``), which every model gets anyway.
    """
    result: dict[str, Any] = {"model": name}
    engines: dict[str, es.Engine] = {}
    builds: dict[str, float] = {}
    for precision in ["fp32"] + (["bf16"] if bf16 else []) + (["int8"] if args.int8 else []):
        path = workdir / f"{name}.{precision}.engine"
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # int8 on random calibration data warns, as it should
                es.build(model_path, backend="openvino", precision=precision, output=path,
                         verify=verify and precision == "fp32", calibration_random=precision == "int8")
        except es.EnginesmithError as exc:
            result[f"engine {precision} error"] = str(exc)
            print(f"  {name}: engine {precision} not built: {exc}", file=sys.stderr)
            if precision == "fp32":
                return result
            continue
        builds[precision] = time.perf_counter() - start
        engines[precision] = es.load(path)
    if args.auto:
        result["auto"] = build_auto_engines(name, model_path, workdir, engines, verify)
    fp32 = engines["fp32"]
    result["openvino_chose"] = fp32.manifest.checks["build"]["openvino_chose"]
    result["ops"] = fp32.manifest.checks["build"]["ops"]
    result["build_s"] = builds
    result["load_s"] = load_times(model_path, workdir / f"{name}.fp32.engine", workdir)
    targets = {
        BASELINE: plain_ort(model_path),
        "plain OV fp32": plain_openvino(model_path, {"INFERENCE_PRECISION_HINT": "f32"}),
        "plain OV default": plain_openvino(model_path, {}),
        **{f"engine {p}": as_list(engine) for p, engine in engines.items()},
    }
    rows = []
    with LoadMonitor() as load:
        for batch in args.batches:
            batch_feeds = feeds if batch == 1 else {k: np.concatenate([v] * batch) for k, v in feeds.items()}
            reference = targets[BASELINE](batch_feeds)
            try:
                engines["fp32"].infer(batch_feeds)
            except es.EnginesmithError as exc:
                result["engine fp32 error"] = f"cannot run the inputs: {exc}"
                return result
            accuracy = {label: differences(fn(batch_feeds), reference) for label, fn in targets.items() if label != BASELINE}
            stats, round_p50 = interleaved(targets, batch_feeds, batch, rounds=args.rounds, runs=args.runs,
                                           min_block_s=args.min_block_s)
            rows.append({
                "batch": batch,
                **{f"{label} p50 ms": s.p50_ms for label, s in stats.items()},
                "speed-up over plain ORT": {label: 1 / round_ratio(round_p50, label, BASELINE)["median"]
                                            for label in targets if label != BASELINE},
                "engine fp32 / plain OV fp32 p50": round_ratio(round_p50, "engine fp32", "plain OV fp32")["median"],
                "vs plain ORT outputs": accuracy,
                "round p50 ms": round_p50,
                "stats": {label: vars(s) for label, s in stats.items()},
            })
    result.update(rows=rows, load=load.facts)
    return result


AUTO_BUILDS = {
    "auto": {},
    "auto best": {"precision": "best", "accuracy_budget": "1%", "calibration_random": True},
}


def build_auto_engines(name: str, model_path: Path, workdir: Path, engines: dict[str, es.Engine],
                       verify: bool) -> dict[str, Any]:
    """``--backend auto`` builds (fp32, and ``best`` where the build can verify): what each chose, its seconds, its table."""
    facts: dict[str, Any] = {}
    for label, kwargs in AUTO_BUILDS.items():
        if label == "auto best" and not verify:
            continue
        path = workdir / f"{name}.{label.replace(' ', '_')}.engine"
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                es.build(model_path, backend="auto", output=path, verify=verify, **kwargs)
        except es.EnginesmithError as exc:
            facts[label] = {"error": str(exc)}
            print(f"  {name}: engine {label} not built: {exc}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - start
        engine = engines[label] = es.load(path)
        rows = engine.manifest.checks.get("backend_candidates", [])
        keep = ("backend", "precision", "p50_ms", "chosen", "reason", "build_s", "verify_s", "time_s", "argmax_agreement")
        facts[label] = {"backend": engine.backend, "precision": engine.precision, "build_s": seconds,
                        "stages": engine.manifest.checks.get("stages"),
                        "candidates": [{k: row[k] for k in keep if k in row} for row in rows]}
    return facts


def sample_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from enginesmith.importers.onnx_importer import signature_of

    return random_inputs(signature_of(model).inputs, batch=1, seed=0)


# --------------------------------------------------------------------------- report


def targets_met(results: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [r for r in results if r.get("rows")]
    b1 = [next(row for row in r["rows"] if row["batch"] == min(x["batch"] for x in r["rows"])) for r in timed]
    speedups = [row["speed-up over plain ORT"]["engine fp32"] for row in b1]
    wrapper = max(row["engine fp32 / plain OV fp32 p50"] for row in b1)
    fp32_diff = max(row["vs plain ORT outputs"]["engine fp32"]["max_abs_diff"] for row in b1)
    load_ratio = max(r["load_s"]["compiled model import"] / r["load_s"]["IR xml+bin read + compile"] for r in timed)
    return {
        **auto_targets(timed, b1),
        "engine fp32 speed-up over plain ORT, median over models >= 1.0": {"value": float(np.median(speedups)),
                                                                           "met": float(np.median(speedups)) >= 1.0},
        "engine fp32 p50 <= 1.05x plain OpenVINO fp32 (every model)": {"value": wrapper, "met": wrapper <= 1.05},
        # rel L2 says little for outputs near zero (a text detector's map on random inputs): max abs it is.
        "engine fp32 max abs diff vs plain ORT <= 2e-4 (every model)": {"value": fp32_diff, "met": fp32_diff <= 2e-4},
        "compiled-model import / IR read + compile <= 1.0 (every model)": {"value": load_ratio, "met": load_ratio <= 1.0},
    }


def auto_targets(timed: list[dict[str, Any]], b1: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 17's goals for ``--backend auto``: as fast as the faster plain runtime, built within a minute."""
    ratios = []
    for row in b1:
        if "engine auto" not in row["round p50 ms"]:
            continue
        # Per round, the auto engine against the faster of plain ORT and plain OpenVINO fp32 in that round.
        rounds = row["round p50 ms"]
        fastest_plain = np.minimum(rounds[BASELINE], rounds["plain OV fp32"])
        ratios.append(float(np.median(np.asarray(rounds["engine auto"]) / fastest_plain)))
    if not ratios:
        return {}
    # 5% for timing noise on a shared 2-core VM: a ratio over 1.05 is the wrong engine, not noise.
    share = sum(r <= 1.05 for r in ratios) / len(ratios)
    builds = {r["model"]: r["auto"]["auto"]["build_s"] for r in timed if "build_s" in r.get("auto", {}).get("auto", {})}
    goals = {"engine auto fp32 p50 <= 1.05x min(plain ORT, plain OV fp32) on >= 90% of models":
             {"value": share, "ratios": ratios, "met": share >= 0.9}}
    if "resnet50_like" in builds:
        goals["auto build <= 60 s for the ResNet-50-like sample"] = {"value": builds["resnet50_like"],
                                                                      "met": builds["resnet50_like"] <= 60}
    return goals


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.get("rows")]
    labels = [label for label in timed[0]["rows"][0]["speed-up over plain ORT"]]
    labels += sorted({label for r in timed for label in r["rows"][0]["speed-up over plain ORT"]} - set(labels))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(timed) + 3), 4.5))
    width = 0.8 / len(labels)
    x = np.arange(len(timed))
    for i, label in enumerate(labels):
        values = [r["rows"][0]["speed-up over plain ORT"].get(label, 0) for r in timed]
        ax.bar(x + i * width, values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(labels) - 1) / 2, [r["model"] for r in timed], rotation=30, ha="right")
    ax.set_ylabel(f"speed-up over plain ONNX Runtime, batch {timed[0]['rows'][0]['batch']} p50")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="timed runs per target and batch, over all rounds")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--min-block-s", type=float, default=0.2,
                        help="each target's block of calls in a round lasts at least this long (more calls for fast models)")
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1])
    parser.add_argument("--models", default=None,
                        help="sample models and zoo ids, comma-separated (default: both samples and "
                             f"{', '.join(ZOO_DEFAULT)}; with --corpus: every model of --tier)")
    corpus = parser.add_argument_group("--corpus zoo: issue 17's targets over the real-model corpus")
    corpus.add_argument("--corpus", choices=["zoo"], default=None)
    corpus.add_argument("--tier", choices=["test", "bench", "all"], default="all")
    corpus.add_argument("--isolate", action="store_true",
                        help="time each target in a process of its own (one block at a time, the others waiting), "
                             "as engines are deployed; default: every target in this process")
    corpus.add_argument("--max-model-mb", type=float, default=None, help="leave out larger model files")
    corpus.add_argument("--no-best", dest="best", action="store_false", help="no --precision best engines")
    corpus.add_argument("--best-samples", type=int, default=200,
                        help="draws of each model's inputs for best: half calibrate, half judge the 1%% budget")
    corpus.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                        help="no accuracy of the trained digits CNN at the best precision")
    corpus.add_argument("--trained", type=Path, default=None,
                        help="trained_classifiers.py's unpacked models: their accuracy at the best precision too")
    corpus.add_argument("--trained-holdout", type=int, default=500)
    corpus.add_argument("--no-resnet50", dest="resnet50", action="store_false",
                        help="no timed auto build of the ResNet-50-like sample")
    parser.add_argument("--zoo-manifest", type=Path, default=HERE / "zoo" / "models.toml")
    parser.add_argument("--zoo-cache", type=Path,
                        default=Path(os.environ.get("ENGINESMITH_ZOO_CACHE", Path.home() / ".cache" / "enginesmith-zoo")) / "models")
    parser.add_argument("--int8", action="store_true", help="also an int8 engine (NNCF, random calibration data)")
    parser.add_argument("--auto", action="store_true",
                        help="also --backend auto engines: fp32, and --precision best --max-accuracy-drop 1%%")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: results/cpu_backends.json (results/cpu_backends_zoo.json with --corpus zoo)")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args()
    args.json = args.json or RESULTS / ("cpu_backends_zoo.json" if args.corpus else "cpu_backends.json")
    args.image_size = 224  # recorded by write_report; the samples run at 224x224
    import nncf
    import openvino as ov

    from enginesmith.backends.openvino import native_precisions

    bf16 = "bf16" in native_precisions()
    facts = machine({"openvino": ov.__version__, "nncf": nncf.__version__,
                     "openvino_cpu_capabilities": list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                     "native_bf16": bf16})
    if args.corpus:
        run_corpus_report(args, facts)
        return
    wanted = (args.models or ",".join(list(SAMPLES) + ZOO_DEFAULT)).split(",")
    zoo, notes = zoo_models(args.zoo_manifest, args.zoo_cache, [m for m in wanted if m not in SAMPLES])
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="enginesmith-cpu-backends-") as tmp:
        for name in [m for m in wanted if m in SAMPLES]:
            print(f"benchmarking {name} ...", file=sys.stderr)
            model = SAMPLES[name]()
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(model, path)
            results.append({**bench_model(name, path, sample_inputs(model), Path(tmp), args, bf16),
                            "source": "enginesmith.samples (random weights)"})
        for entry in zoo:
            print(f"benchmarking {entry['id']} ...", file=sys.stderr)
            rng = np.random.default_rng(0)
            feeds = {name: fill(spec, rng) for name, spec in entry["inputs"].items()}
            graph_inputs = {i.name for i in onnx.load(entry["path"], load_external_data=False).graph.input}
            feeds = {k: v for k, v in feeds.items() if k in graph_inputs}
            results.append({**bench_model(entry["id"], entry["path"], feeds, Path(tmp), args, bf16, verify=False),
                            "source": f"{entry['package']} ({entry['task']})", "sha256": entry["sha256"]})
    print(f"machine: {facts['cpu']}, {facts['physical_cores']} cores; ISA {facts['cpu_flags']}; OpenVINO "
          f"{facts['openvino']} (capabilities {', '.join(facts['openvino_cpu_capabilities'])}), ONNX Runtime "
          f"{facts['onnxruntime']}")
    columns = ["plain OV fp32", "plain OV default", "engine fp32", "engine bf16", "engine int8",
               *(["engine auto", "engine auto best"] if args.auto else [])]
    header = f"{'model':<22}{'b':>3}{'ORT ms':>9}" + "".join(f"{c:>18}" for c in columns) + f"{'fp32 maxdiff':>14}{'load ms':>9}"
    print(header + "\n" + "-" * len(header))
    for res in results:
        if not res.get("rows"):
            print(f"{res['model']:<22} no engine result: {res.get('engine fp32 error', '?')[:150]}")
            continue
        for row in res["rows"]:
            cells = ""
            for c in columns:
                speed = row["speed-up over plain ORT"].get(c)
                cells += f"{row[f'{c} p50 ms']:>10.2f} {speed:>5.2f}x " if speed else f"{'-':>18}"
            print(f"{res['model']:<22}{row['batch']:>3}{row[f'{BASELINE} p50 ms']:>9.2f}{cells}"
                  f"{row['vs plain ORT outputs']['engine fp32']['max_abs_diff']:>14.1e}"
                  f"{res['load_s']['engine (compiled-model payload)'] * 1e3:>9.0f}")
    for res in results:
        for label, fact in res.get("auto", {}).items():
            chose = fact.get("error") or f"chose {fact['backend']} {fact['precision']}, built in {fact['build_s']:.1f} s"
            print(f"{res['model']:<22} engine {label}: {chose}")
    for note in notes:
        print(f"note: {note}")
    args.plot and plot(results, args.json.with_suffix(".png"),
                       f"OpenVINO {facts['openvino'].split('-')[0]} vs ONNX Runtime {facts['onnxruntime']}, {facts['cpu']}")
    facts["skipped"] = notes
    write_report("cpu_backends", args, facts, targets_met(results), results)


def run_corpus_report(args: argparse.Namespace, facts: dict[str, Any]) -> None:
    from cpu_backends_zoo import run_corpus  # sibling script

    args.models_zoo = args.models
    args.zoo_cache = args.zoo_cache.parent  # the corpus' cache root (models/ and wheels/ under it)
    targets, results = run_corpus(args, facts)
    timed = [r for r in results if r.get("rows")]
    if args.plot and timed:
        plot(timed, args.json.with_suffix(".png"), f"zoo corpus: speed-up over plain ONNX Runtime {facts['onnxruntime']}, "
             f"OpenVINO {facts['openvino'].split('-')[0]}, {facts['cpu']}")
    write_report("cpu_backends_zoo", args, facts, targets, results)


if __name__ == "__main__":
    main()
