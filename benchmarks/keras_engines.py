"""Keras models: engine vs ``model.predict`` vs a ``tf.function`` call, in one run.

For Keras' own MobileNetV2 and ResNet50 (``keras.applications``, ``weights=None``, seeded,
224x224x3) this saves the model as ``.keras``, builds an enginesmith engine from that file
(no node names given), loads it, and times on the same inputs, in interleaved rounds:
  * engine       - ``engine.infer(feeds)`` on the engine loaded from its file
  * keras predict - ``model.predict(x, verbose=0)``, what most Keras users call
  * tf.function  - ``tf.function(lambda x: model(x, training=False))``, the usual fast path
                   in TensorFlow (traced once in warm-up)
  * plain ORT    - a default ``onnxruntime.InferenceSession`` of the same ONNX conversion the
                   engine starts from (enginesmith's Keras importer), for reference: it tells
                   how much of the engine's speed is ONNX Runtime's and how much the engine's
p50 latency at batch 1 and 8 and throughput; ratios are the median over rounds of the
per-round median ratios. Also records the engine's build verification against Keras
itself and the largest difference between engine and Keras outputs on the timed inputs.
Prints a table, writes JSON and a PNG per model, and records the machine and its load.

Target (issue 3, 2-core machine): engine >= 4x faster than tf.function at batch 1 for
MobileNetV2.

    python benchmarks/keras_engines.py [--rounds 6] [--runs 30] [--models mobilenet_v2,resnet50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np

import enginesmith as es
from enginesmith.bench import plot_results

from cpu_engines import LoadMonitor, interleaved, machine, round_ratio, write_report  # noqa: E402  (sibling script)

RESULTS = Path(__file__).parent / "results"
MODELS = {"mobilenet_v2": "MobileNetV2", "resnet50": "ResNet50"}


def bench_model(name: str, workdir: Path, args: argparse.Namespace, keras, tf) -> dict:
    keras.utils.set_random_seed(0)
    size = args.image_size
    model = getattr(keras.applications, MODELS[name])(weights=None, input_shape=(size, size, 3))
    keras_path = workdir / f"{name}.keras"
    model.save(keras_path)
    engine_path = workdir / f"{name}.engine"
    start = time.perf_counter()
    es.build(keras_path, output=engine_path)  # verified against Keras itself (build fails otherwise)
    build_s = time.perf_counter() - start
    engine = es.load(engine_path)
    input_name = engine.signature.input_names[0]
    output_name = engine.signature.output_names[0]

    import onnxruntime as ort
    from enginesmith.importers import ImportOptions, import_model

    converted = import_model(keras_path, ImportOptions()).model
    plain = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    serve = tf.function(lambda x: model(x, training=False))
    targets = {
        "engine": engine.infer,
        "keras predict": lambda feeds: model.predict(feeds[input_name], verbose=0),
        "tf.function": lambda feeds: serve(tf.constant(feeds[input_name])),
        "plain ORT session": lambda feeds: plain.run(None, feeds),
    }
    rng = np.random.default_rng(0)
    rows, all_stats = [], []
    with LoadMonitor() as load:
        for batch in args.batches:
            x = rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)
            feeds = {input_name: x}
            engine_out = engine.infer(feeds)[output_name]
            keras_out = np.asarray(serve(tf.constant(x)))
            stats, round_p50 = interleaved(targets, feeds, batch, rounds=args.rounds, runs=args.runs)
            all_stats += stats.values()
            vs_tf = round_ratio(round_p50, "tf.function", "engine")
            vs_predict = round_ratio(round_p50, "keras predict", "engine")
            vs_plain = round_ratio(round_p50, "engine", "plain ORT session")
            rows.append({
                "batch": batch,
                **{f"{label} p50 ms": s.p50_ms for label, s in stats.items()},
                **{f"{label} items/s": s.throughput for label, s in stats.items()},
                "speedup vs tf.function": vs_tf["median"],
                "speedup vs tf.function range over rounds": [vs_tf["min"], vs_tf["max"]],
                "speedup vs keras predict": vs_predict["median"],
                "speedup vs keras predict range over rounds": [vs_predict["min"], vs_predict["max"]],
                "engine / plain ORT session p50": vs_plain["median"],
                "engine / plain ORT session range over rounds": [vs_plain["min"], vs_plain["max"]],
                "max abs diff engine vs keras": float(np.abs(engine_out - keras_out).max()),
                "top1 same as keras": float(np.mean(engine_out.argmax(-1) == keras_out.argmax(-1))),
                "round p50 ms": round_p50,
                "stats": {label: vars(s) for label, s in stats.items()},
            })
    if args.plot:
        plot_results(all_stats, args.json.with_name(f"{args.json.stem}_{name}.png"),
                     f"Keras {MODELS[name]} (weights=None), {size}x{size}: engine vs Keras")
    return {
        "model": MODELS[name],
        "parameters": int(model.count_params()),
        "engine_build_s": build_s,
        "engine_signature": str(engine.signature),
        "build_verification": engine.manifest.checks.get("build_verification"),
        "engine_log": engine.manifest.build_log,
        "rows": rows,
        "load": load.facts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per target and batch, over all rounds")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, default=RESULTS / "keras_engines.json")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args()

    import keras
    import tensorflow as tf
    import tf2onnx

    facts = machine({"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                     "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                     "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()})
    results = []
    with tempfile.TemporaryDirectory(prefix="enginesmith-keras-") as tmp:
        for name in args.models.split(","):
            print(f"benchmarking Keras {MODELS[name]} ...", file=sys.stderr)
            results.append(bench_model(name, Path(tmp), args, keras, tf))
    print(f"machine: {facts['cpu']}, {facts['physical_cores']} cores ({facts['cpu_flags']}), ONNX Runtime "
          f"{facts['onnxruntime']}, TensorFlow {facts['tensorflow']}, Keras {facts['keras']}, tf2onnx {facts['tf2onnx']}")
    header = (f"{'model':<13}{'batch':>6}{'engine ms':>11}{'tf.function ms':>16}{'predict ms':>12}"
              f"{'vs tf.function':>16}{'vs predict':>12}{'eng img/s':>11}{'plain ORT ms':>14}{'eng/ORT':>9}")
    print(header)
    print("-" * len(header))
    for res in results:
        for row in res["rows"]:
            print(f"{res['model']:<13}{row['batch']:>6}{row['engine p50 ms']:>11.2f}{row['tf.function p50 ms']:>16.2f}"
                  f"{row['keras predict p50 ms']:>12.2f}{row['speedup vs tf.function']:>15.2f}x"
                  f"{row['speedup vs keras predict']:>11.2f}x{row['engine items/s']:>11.1f}"
                  f"{row['plain ORT session p50 ms']:>14.2f}{row['engine / plain ORT session p50']:>8.3f}x")
        load = res["load"]
        check = res["build_verification"] or {}
        print(f"{'':<13}build {res['engine_build_s']:.0f} s, verification vs Keras: {check.get('summary', 'n/a')}")
        print(f"{'':<13}load average {load['loadavg_start'][0]:.2f} -> {load['loadavg_end'][0]:.2f}, "
              f"other processes used {load['other_cpu_share'] or 0:.0%} of the CPUs")
    targets = {}
    mnv2 = next((r for r in results if r["model"] == "MobileNetV2"), None)
    b1 = next((row for row in mnv2["rows"] if row["batch"] == 1), None) if mnv2 else None
    if b1 is not None:
        value = b1["speedup vs tf.function"]
        targets["engine >= 4x faster than tf.function (MobileNetV2, batch 1)"] = {"value": value, "met": value >= 4.0}
    write_report("keras_engines", args, facts, targets, results)


if __name__ == "__main__":
    main()
