"""``cpu_backends.py --corpus zoo``: issue 17's targets over the real-model corpus.

For each model of ``benchmarks/zoo/models.toml`` (fetched into the zoo cache by ``zoo_corpus``),
in one run per model:
  * ``enginesmith.build(SOURCE, backend="auto", data=SAMPLE)``: the fp32 auto engine, verified and
    timed by the build on the manifest's sample input (the one the benchmark times with);
  * ``backend="auto", precision="best", accuracy_budget="1%"``, calibrated on seeded draws of the
    manifest's input distribution, half of them held out to judge the budget (100 samples: one
    changed answer is 1%). A model with no class-score output cannot be judged by top-1 agreement:
    its budget is ``rel_l2<=0.01`` (1% of the output's energy) instead, said in its row;
  * timed in interleaved rounds on the sample (with ``--isolate`` each target in a process of its own):
    plain ONNX Runtime (``InferenceSession(model.onnx)``,
    defaults: the baseline), plain OpenVINO fp32 and with its defaults (``compile_model(model.onnx)``),
    the auto engine and the auto best engine. Sources that are not ONNX (TFLite, SavedModel, Keras)
    are timed plainly on the ONNX enginesmith converted them to: what a user would hand the runtimes.

"auto <= min(plain ORT, plain OV fp32)" is judged per model on the median over rounds of
auto / min(the two plain targets in that round), strictly (<= 1) and within that model's timing
noise: the spread of the faster plain target's per-round p50s (half the interquartile range over
the median), measured in the same run. Where auto loses, the row says whether it picked the other
backend than the faster plain runtime (a selection that flipped) or lost to the plain session of
its own backend (the engine's own overhead or settings).

Then the demo's trained Keras digits CNN (and, with ``--trained DIR``, the trained classifiers of
``trained_classifiers.py``) at the precision ``best`` chose vs fp32 on their test data, and the
auto build of the ResNet-50-like sample with where its time went.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from cpu_engines import LoadMonitor, interleaved, interleaved_isolated  # noqa: E402
from zoo import feeds_for  # noqa: E402
from zoo_corpus import DEFAULT_CACHE, ZooModel, fetch_model, load_manifest, select  # noqa: E402

import enginesmith as es  # noqa: E402
from enginesmith.files import write_atomic  # noqa: E402

BASELINE = "plain ORT"
TARGETS = ("plain ORT", "plain OV fp32", "plain OV default", "auto fp32", "auto best")
BEST_HOLDOUT = 0.5
CLASS_BUDGET, REGRESSION_BUDGET = "1%", "rel_l2<=0.01"
Runner = Callable[[dict[str, np.ndarray]], Any]


# --------------------------------------------------------------------------- the models


def corpus(args: argparse.Namespace) -> tuple[list[ZooModel], list[str]]:
    """The models of ``--tier`` / ``--models`` whose file is at most ``--max-model-mb``."""
    chosen = select(load_manifest(), args.models_zoo, args.tier)
    kept, notes = [], []
    for model in chosen:
        path = args.zoo_cache / "models" / model.id / PurePosixPath(model.path.rstrip("/")).name
        size = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
                else path.stat().st_size) if path.exists() else 0
        if args.max_model_mb and size > args.max_model_mb * 1e6:
            notes.append(f"{model.id}: {size / 1e6:.1f} MB, over --max-model-mb {args.max_model_mb}")
            continue
        kept.append(model)
    return kept, notes


def import_options(flags: tuple[str, ...]) -> Any:
    """The manifest's known flags as import options (``--input NAME:SHAPE``; the rest is not for import)."""
    from enginesmith.importers import ImportOptions

    shapes = {}
    for flag, value in zip(flags, flags[1:]):
        if flag == "--input":
            name, _, shape = value.rpartition(":")
            shapes[name] = tuple(int(d) for d in shape.split("x"))
    return ImportOptions(input_shapes=shapes)


def stacked_samples(signature: Any, model: ZooModel, count: int) -> dict[str, np.ndarray] | None:
    """``count`` seeded draws of the manifest's inputs along the batch axis; None where an input has none
    (a scalar sample rate, a recurrent state batched on axis 1)."""
    draws = [feeds_for(signature, model, seed=seed) for seed in range(count)]
    if any(value.ndim == 0 or value.shape[0] != 1 for value in draws[0].values()):
        return None
    return {name: np.concatenate([draw[name] for draw in draws]) for name in draws[0]}


@dataclass
class Prepared:
    source: Path
    onnx_path: Path  # what the plain runtimes open: the source, or the ONNX it was converted to
    signature: Any
    feeds: dict[str, np.ndarray]
    options: Any  # ImportOptions


def prepare(model: ZooModel, cache: Path, work: Path) -> Prepared:
    from enginesmith.importers import ImportOptions, import_model

    source = fetch_model(model, cache)
    try:
        options = ImportOptions()
        imported = import_model(source, options)
    except es.EnginesmithError:
        options = import_options(model.flags)
        imported = import_model(source, options)
    if model.source_format == "onnx" and not options.input_shapes:
        onnx_path = source
    else:
        onnx_path = work / f"{model.id}.converted.onnx"
        onnx.save(imported.model, onnx_path)
    return Prepared(source, onnx_path, imported.signature, feeds_for(imported.signature, model), options)


# --------------------------------------------------------------------------- the targets


def plain_ort(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda feeds: session.run(None, {k: v for k, v in feeds.items() if k in names})


def plain_openvino(path: Path, config: dict[str, str]) -> Runner:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    names = {n for port in compiled.inputs for n in port.get_names()}
    return lambda feeds: request.infer({k: v for k, v in feeds.items() if k in names})


def engine_path(work: Path, label: str) -> Path:
    return work / f"{label.replace(' ', '_')}.engine"


def build_auto(prepared: Prepared, work: Path, label: str, **kwargs: Any) -> tuple[es.Engine | None, dict[str, Any]]:
    """One auto build from the source: the engine loaded from its file, and what it chose, in how long."""
    path = engine_path(work, label)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small hold-out and random-calibration notes: the row says what was used
            es.build(prepared.source, backend="auto", output=path, import_options=prepared.options, **kwargs)
    except es.EnginesmithError as exc:
        return None, {"error": str(exc)[:400], "build_s": round(time.perf_counter() - start, 2)}
    seconds = time.perf_counter() - start
    engine = es.load(path)
    keep = ("backend", "precision", "threads", "p50_ms", "p50_noise", "vs_baseline", "vs_baseline_noise", "faster_rounds",
            "chosen", "reason", "build_s", "verify_s", "time_s", "argmax_agreement", "worst_rel_l2", "first_look")
    rows = engine.manifest.checks.get("backend_candidates", [])
    return engine, {"backend": engine.backend, "precision": engine.precision, "build_s": round(seconds, 2),
                    "stages": engine.manifest.checks.get("stages"),
                    "candidates": [{k: row[k] for k in keep if k in row} for row in rows]}


def build_best(prepared: Prepared, model: ZooModel, work: Path, samples: int) -> tuple[es.Engine | None, dict[str, Any]]:
    calib = stacked_samples(prepared.signature, model, samples)
    if calib is None:
        return None, {"error": "inputs without a batch axis of 1 (a scalar, a state batched on another axis): "
                               "calibration samples cannot be stacked"}
    common = {"precision": "best", "calibration_data": calib, "holdout": BEST_HOLDOUT, "data": prepared.feeds}
    engine, facts = build_auto(prepared, work, "auto best", accuracy_budget=CLASS_BUDGET, **common)
    if engine is None and "needs an output of class scores" in facts["error"]:
        engine, facts = build_auto(prepared, work, "auto best", accuracy_budget=REGRESSION_BUDGET, **common)
        facts["budget"] = REGRESSION_BUDGET
    else:
        facts["budget"] = CLASS_BUDGET
    return engine, facts


def engine_runner(engine: es.Engine) -> Runner:
    names = set(engine.signature.input_names)  # feeds filtered the way the plain runners filter them
    return lambda feeds: engine.infer({k: v for k, v in feeds.items() if k in names})


def engine_file_runner(path: str) -> Runner:
    """:func:`engine_runner` of the engine in ``path`` (what a target's own process loads)."""
    return engine_runner(es.load(path))


# --------------------------------------------------------------------------- one model


def noise_of(round_p50: list[float]) -> float:
    """Half the interquartile range of the per-round p50s over their median: this run's timing noise."""
    q1, q2, q3 = np.percentile(round_p50, [25, 50, 75])
    return float((q3 - q1) / 2 / q2)


def bench_model(model: ZooModel, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"model": model.id, "task": model.task, "format": model.source_format}
    try:
        prepared = prepare(model, args.zoo_cache, work)
    except Exception as exc:  # noqa: BLE001 - a model that does not import is a row, not the end of the run
        result["error"] = f"import: {type(exc).__name__}: {str(exc)[:300]}"
        return result
    result["plain_model"] = "source" if prepared.onnx_path == prepared.source else "the ONNX enginesmith converted it to"
    auto, result["auto"] = build_auto(prepared, work, "auto fp32", data=prepared.feeds)
    if auto is None:
        # The sample as --data can fail where the generated inputs do not (a recurrent state batched on axis 1
        # whose batch dim the signature leaves unnamed is cut along axis 0): time and verify on those instead.
        note = f"the sample as --data failed ({result['auto']['error'][:200]}): built on the generated inputs"
        auto, result["auto"] = build_auto(prepared, work, "auto fp32")
        result["auto"]["note"] = note
    if auto is None:
        result["error"] = f"auto fp32: {result['auto']['error']}"
        return result
    best, result["auto best"] = build_best(prepared, model, work, args.best_samples) if args.best else (None, {"error": "--no-best"})
    openvino_configs = (("plain OV fp32", {"INFERENCE_PRECISION_HINT": "f32"}), ("plain OV default", {}))
    if not args.isolate:
        targets: dict[str, Runner] = {BASELINE: plain_ort(prepared.onnx_path)}
        for label, config in openvino_configs:
            try:
                targets[label] = plain_openvino(prepared.onnx_path, config)
            except Exception as exc:  # noqa: BLE001 - OpenVINO cannot convert or compile the model: ORT is the only plain one
                result[f"{label} error"] = str(exc).strip().splitlines()[-1][:300]
        targets["auto fp32"] = engine_runner(auto)
        if best is not None:
            targets["auto best"] = engine_runner(best)
        with LoadMonitor() as load:
            stats, rounds = interleaved(targets, prepared.feeds, 1, rounds=args.rounds, runs=args.runs,
                                        min_block_s=args.min_block_s)
    else:
        here, model_file = __file__, str(prepared.onnx_path)
        specs = {BASELINE: (here, "plain_ort", (model_file,)),
                 **{label: (here, "plain_openvino", (model_file, config)) for label, config in openvino_configs},
                 "auto fp32": (here, "engine_file_runner", (str(engine_path(work, "auto fp32")),))}
        if best is not None:
            specs["auto best"] = (here, "engine_file_runner", (str(engine_path(work, "auto best")),))
        with LoadMonitor() as load:
            stats, rounds, failed = interleaved_isolated(specs, prepared.feeds, 1, rounds=args.rounds, runs=args.runs,
                                                         min_block_s=args.min_block_s)
        for label, error in failed.items():  # OpenVINO cannot convert or compile the model: ORT is the only plain one
            result[f"{label} error"] = error
        if BASELINE in failed or "auto fp32" in failed:
            result["error"] = f"a target did not start: {failed}"
            return result
    result["timing"] = "one process per target" if args.isolate else "one process for every target"
    result["load"] = load.facts
    ratios = {label: np.asarray(rounds[BASELINE]) / np.asarray(rounds[label]) for label in rounds if label != BASELINE}
    plains = [label for label in (BASELINE, "plain OV fp32") if label in rounds]
    fastest_plain = np.min([rounds[label] for label in plains], axis=0)
    vs_min = float(np.median(np.asarray(rounds["auto fp32"]) / fastest_plain))
    faster_plain = min(plains, key=lambda label: float(np.median(rounds[label])))
    noise = noise_of(rounds[faster_plain])
    own_plain = BASELINE if auto.backend == "onnxruntime" or "plain OV fp32" not in rounds else "plain OV fp32"
    result["rows"] = [{
        "batch": 1,
        **{f"{label} p50 ms": s.p50_ms for label, s in stats.items()},
        "speed-up over plain ORT": {label: float(np.median(r)) for label, r in ratios.items()},
        "round p50 ms": rounds,
    }]
    result["auto vs min(plain ORT, plain OV fp32)"] = {
        "median_round_ratio": vs_min, "noise": noise, "strict": vs_min <= 1.0, "within_noise": vs_min <= 1 + noise,
        "faster_plain": faster_plain,
        "auto_vs_own_backend_plain": float(np.median(np.asarray(rounds["auto fp32"]) / np.asarray(rounds[own_plain]))),
        "why": None if vs_min <= 1 + noise else why_slower(auto.backend, faster_plain, rounds, own_plain, noise),
    }
    return result


def why_slower(chosen: str, faster_plain: str, rounds: dict[str, list[float]], own_plain: str, noise: float) -> str:
    """Where an auto engine slower than the faster plain runtime lost: the choice, or the engine itself."""
    own_ratio = float(np.median(np.asarray(rounds["auto fp32"]) / np.asarray(rounds[own_plain])))
    picked_other = (chosen == "onnxruntime") != (faster_plain == BASELINE)
    if picked_other:
        return (f"chose {chosen}, but {faster_plain} was faster here (the build timed them the other way round: "
                f"a close call flipped, or load during the build)")
    return (f"chose the right backend ({chosen}) but the engine took {own_ratio:.2f}x its plain session "
            f"(noise {noise:.1%}): the engine's own overhead or settings")


# --------------------------------------------------------------------------- accuracy and build time


def digits_accuracy(work: Path) -> dict[str, Any]:
    """The demo's trained Keras CNN: test accuracy of the auto best 1% engine vs fp32 (Keras itself)."""
    import keras

    from enginesmith.demo import digits_split, make_digits_cnn

    keras.utils.set_random_seed(0)
    x_train, x_test, y_train, y_test = digits_split(0)
    net = make_digits_cnn(keras)
    net.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    net.fit(x_train, y_train, epochs=30, batch_size=64, verbose=0, validation_split=0.1)
    path = work / "digits.keras"
    net.save(path)
    fp32 = float(np.mean(net.predict(x_test, verbose=0).argmax(-1) == y_test))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = es.build(path, backend="auto", precision="best", accuracy_budget="1%",
                          calibration_data={"image": x_train})
    got = float(np.mean(engine(image=x_test)["probs"].argmax(-1) == y_test))
    return {"model": "demo digits CNN (Keras)", "fp32_accuracy": fp32, "best_accuracy": got,
            "chosen": f"{engine.backend} {engine.precision}", "test_samples": len(y_test),
            "within_1_point": abs(got - fp32) <= 0.01}


def trained_accuracy(folder: Path, held_out: int) -> list[dict[str, Any]]:
    """``trained_classifiers.py``'s models: accuracy on held-out scenes, auto best 1% vs fp32 (plain ORT)."""
    import onnxruntime as ort
    import trained_classifiers as tc  # noqa: PLC0415 (sibling script)

    images, labels = tc.held_out_set(held_out)
    calib = tc.calibration_set(300)
    rows = []
    for name, path in tc.trained_models(folder).items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        fp32 = float(np.mean(np.concatenate([session.run(None, {"image": images[i:i + 32]})[0]
                                             for i in range(0, len(images), 32)]).argmax(-1) == labels))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = es.build(path, backend="auto", precision="best", accuracy_budget="1%",
                              calibration_data={"image": calib})
        got = float(np.mean(engine(image=images)["logits"].argmax(-1) == labels))
        rows.append({"model": name, "fp32_accuracy": fp32, "best_accuracy": got, "test_samples": len(labels),
                     "chosen": f"{engine.backend} {engine.precision}", "within_1_point": abs(got - fp32) <= 0.01})
    return rows


def resnet50_build(work: Path) -> dict[str, Any]:
    """The auto fp32 build of the ResNet-50-like sample (224x224), and where its time went."""
    from enginesmith import samples

    path = work / "resnet50_like.onnx"
    onnx.save(samples.resnet50_like(image_size=224), path)
    start = time.perf_counter()
    engine = es.build(path, backend="auto")
    seconds = time.perf_counter() - start
    rows = engine.manifest.checks.get("backend_candidates", [])
    return {"build_s": round(seconds, 2), "stages": engine.manifest.checks.get("stages"),
            "chosen": f"{engine.backend} {engine.precision}",
            "candidates": [{k: row.get(k) for k in ("backend", "precision", "build_s", "verify_s", "time_s", "p50_ms")}
                           for row in rows]}


# --------------------------------------------------------------------------- report


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def corpus_targets(results: list[dict[str, Any]], accuracy: list[dict[str, Any]], r50: dict[str, Any]) -> dict[str, Any]:
    timed = [r for r in results if r.get("rows")]
    judged = [r["auto vs min(plain ORT, plain OV fp32)"] for r in timed]
    strict = sum(j["strict"] for j in judged) / max(len(judged), 1)
    within = sum(j["within_noise"] for j in judged) / max(len(judged), 1)
    auto = [r["rows"][0]["speed-up over plain ORT"]["auto fp32"] for r in timed]
    best = [r["rows"][0]["speed-up over plain ORT"].get("auto best") for r in timed]
    best_or_fp32 = [b if b is not None else a for a, b in zip(auto, best)]
    goals = {
        "auto fp32 p50 <= min(plain ORT, plain OV fp32) * (1 + measured noise) on >= 90% of models":
            {"value": within, "models": len(judged), "met": within >= 0.9},
        "the same, strictly (<= 1.0, ties and noise count against auto)": {"value": strict, "met": strict >= 0.9},
        "auto fp32 geometric-mean speed-up over plain ORT >= 1.3x": {"value": geomean(auto), "met": geomean(auto) >= 1.3},
        "auto best (1%) geometric-mean speed-up over plain ORT >= 2x (models best could not build: their fp32 auto)":
            {"value": geomean(best_or_fp32), "best_built": sum(b is not None for b in best),
             "met": geomean(best_or_fp32) >= 2.0},
    }
    if accuracy:
        worst = max(abs(a["best_accuracy"] - a["fp32_accuracy"]) for a in accuracy)
        goals["trained classifiers at the best precision within 1 point of fp32 accuracy"] = {
            "value": worst, "models": [a["model"] for a in accuracy], "met": worst <= 0.01}
    if r50:
        goals["auto fp32 build of the ResNet-50-like sample <= 60 s"] = {"value": r50["build_s"], "met": r50["build_s"] <= 60}
    return goals


def print_table(results: list[dict[str, Any]]) -> list[str]:
    """The table, printed; returned as markdown lines for the .md report."""
    header = ["model", "plain ORT ms", *[f"{t} x" for t in TARGETS[1:]], "auto/min", "noise", "auto chose",
              "best chose", "build s (auto, best)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print(f"{'model':<28}{'ORT ms':>9}{'OV fp32':>9}{'OV dflt':>9}{'auto':>8}{'best':>8}{'a/min':>8}{'noise':>7}  chose (auto / best)")
    for r in results:
        if not r.get("rows"):
            print(f"{r['model']:<28} {r.get('error', '?')[:140]}")
            lines.append(f"| {r['model']} | {r.get('error', '?')[:200]} |" + " |" * (len(header) - 2))
            continue
        row, judged = r["rows"][0], r["auto vs min(plain ORT, plain OV fp32)"]
        speed = row["speed-up over plain ORT"]
        best = r.get("auto best", {})
        best_chose = f"{best['backend']} {best['precision']}" if "backend" in best else "-"
        cells = [f"{speed.get(t, float('nan')):.2f}" if t in speed else "-" for t in TARGETS[1:]]
        print(f"{r['model']:<28}{row['plain ORT p50 ms']:>9.2f}" + "".join(f"{c:>9}" if i < 2 else f"{c:>8}" for i, c in enumerate(cells))
              + f"{judged['median_round_ratio']:>8.3f}{judged['noise']:>7.1%}  {r['auto']['backend']} / {best_chose}"
              + (f"  <- {judged['why']}" if judged["why"] else ""))
        lines.append("| " + " | ".join([r["model"], f"{row['plain ORT p50 ms']:.3f}", *cells,
                                         f"{judged['median_round_ratio']:.3f}" + ("" if judged["within_noise"] else " **>**"),
                                         f"{judged['noise']:.1%}", f"{r['auto']['backend']} {r['auto']['precision']}",
                                         best_chose + (f" ({best.get('budget')})" if "backend" in best else
                                                       f" ({best.get('error', '')[:80]})"),
                                         f"{r['auto']['build_s']:.1f}, {best.get('build_s', float('nan')):.1f}"]) + " |")
    return lines


def run_corpus(args: argparse.Namespace, facts: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    models, notes = corpus(args)
    results: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    r50: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="enginesmith-cpu-zoo-") as tmp, LoadMonitor() as load:
        for model in models:
            print(f"[{time.strftime('%H:%M:%S')}] {model.id} ...", file=sys.stderr, flush=True)
            work = Path(tmp) / model.id
            work.mkdir()
            try:
                results.append(bench_model(model, args, work))
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row of the report
                results.append({"model": model.id, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            # What is done so far, so that an interrupted run still leaves its numbers.
            write_atomic(args.json.with_suffix(".partial.json"), json.dumps(results, default=float).encode())
        if args.accuracy:
            print("accuracy: the demo's digits CNN at best vs fp32 ...", file=sys.stderr, flush=True)
            accuracy.append(digits_accuracy(Path(tmp)))
            if args.trained:
                accuracy += trained_accuracy(args.trained, args.trained_holdout)
        if args.resnet50:
            print("build time: auto fp32 of the ResNet-50-like sample ...", file=sys.stderr, flush=True)
            r50 = resnet50_build(Path(tmp))
    facts.update(load=load.facts, skipped=notes)
    lines = print_table(results)
    for a in accuracy:
        print(f"accuracy {a['model']}: fp32 {a['fp32_accuracy']:.2%}, best ({a['chosen']}) {a['best_accuracy']:.2%}")
    if not args.trained and args.accuracy:
        print("accuracy: trained_classifiers.py's models not measured (give --trained DIR after `unpack`)")
    if r50:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in (r50["stages"] or {}).items())
        per = "; ".join(f"{c['backend']} {c['precision']}: build {c['build_s']}s, verify {c['verify_s']}s, "
                        f"timing {c['time_s']}s" for c in r50["candidates"])
        print(f"ResNet-50-like auto fp32 build: {r50['build_s']:.1f} s ({stages}); chose {r50['chosen']}; {per}")
    for note in notes:
        print(f"note: {note}")
    targets = corpus_targets(results, accuracy, r50)
    md = [f"# CPU backends over the zoo corpus, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
          f"Machine: {facts['cpu']}, {facts['physical_cores']} cores, ISA {facts['cpu_flags']}; OpenVINO "
          f"{facts['openvino']}, ONNX Runtime {facts['onnxruntime']}. Load: {load.facts}.", "",
          f"Command: `python {' '.join(sys.argv)}`", "",
          "Columns: speed-up over plain ONNX Runtime at batch 1 (median of per-round ratios); auto/min = median over "
          "rounds of auto fp32 / min(plain ORT, plain OV fp32); noise = half the IQR of the faster plain target's "
          "per-round p50s; **>** marks auto slower than that by more than the noise.", "", *lines, "",
          "## Targets", "", *[f"- {'MET' if v['met'] else 'MISS'} {k}: {v['value']:.3f}" for k, v in targets.items()]]
    if accuracy:
        md += ["", "## Accuracy at the best precision", "",
               *[f"- {a['model']}: fp32 {a['fp32_accuracy']:.2%}, {a['chosen']} {a['best_accuracy']:.2%} "
                 f"({a['test_samples']} test samples)" for a in accuracy]]
    if r50:
        md += ["", "## ResNet-50-like auto build", "", f"```\n{r50}\n```"]
    write_atomic(args.json.with_suffix(".md"), ("\n".join(md) + "\n").encode())
    print(f"wrote {args.json.with_suffix('.md')}")
    return targets, results + [{"accuracy": accuracy, "resnet50_like_auto_build": r50}]
