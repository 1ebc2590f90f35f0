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

With ``--trained DIR`` (the models of ``trained_classifiers.py``, unpacked) the MobileNetV2 is
a *trained* one instead: Keras' MobileNetV2 (10 classes) with the weights of the torchvision
MobileNetV2 trained there (its BatchNorm already folded into the convolutions, so each Keras
BatchNormalization becomes the bias; Keras pads stride-2 layers bottom/right where torchvision
pads all round, which shifts the sampling grid, so the Keras model is a somewhat different,
still trained, classifier). Besides the fp32 engine it builds the engine a user gets with
``--precision best --max-accuracy-drop 1%`` calibrated on scenes of training digits, and reports
held-out accuracy (500 scenes of digits never trained or calibrated on) of Keras and of each engine.

    python benchmarks/keras_engines.py [--rounds 6] [--runs 30] [--models mobilenet_v2,resnet50]
    python benchmarks/keras_engines.py --trained DIR [--json results/keras_engines_trained.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np

import enginesmith as es
from enginesmith.bench import plot_results

from cpu_engines import LoadMonitor, interleaved, machine, round_ratio, write_report  # noqa: E402  (sibling script)

RESULTS = Path(__file__).parent / "results"
MODELS = {"mobilenet_v2": "MobileNetV2", "resnet50": "ResNet50"}


def trained_mobilenet_v2(onnx_path: Path, keras):
    """Keras' MobileNetV2 (10 classes) carrying the weights of the torchvision MobileNetV2 in ``onnx_path``.

    The ONNX export has BatchNorm folded into each convolution (weight and bias); layer order
    is the same in both, so the 52 convolutions pair up in order. Each Keras BatchNormalization
    after a convolution becomes ``x + bias`` (gamma 1, variance 1 - epsilon, mean 0).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    gemm = next(node for node in graph.node if node.op_type == "Gemm")
    model = keras.applications.MobileNetV2(weights=None, classes=10, input_shape=(224, 224, 3))
    layers = list(model.layers)
    conv_layers = [layer for layer in layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    if len(conv_layers) != len(convs):
        raise SystemExit(f"{onnx_path} has {len(convs)} convolutions, Keras' MobileNetV2 {len(conv_layers)}: not the same model")
    for node, layer in zip(convs, conv_layers):
        kernel = weights[node.input[1]]
        bias = weights[node.input[2]] if len(node.input) > 2 else np.zeros(kernel.shape[0], np.float32)
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        kernel = kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(2, 3, 1, 0)  # OIHW -> HWIO / HWC1
        if tuple(layer.kernel.shape) != kernel.shape:
            raise SystemExit(f"{layer.name}: Keras kernel {tuple(layer.kernel.shape)} vs trained {kernel.shape}")
        layer.kernel.assign(kernel)
        norm = next(later for later in layers[layers.index(layer) + 1:] if isinstance(later, keras.layers.BatchNormalization))
        channels = bias.shape[0]
        norm.set_weights([np.ones(channels, np.float32), bias.astype(np.float32), np.zeros(channels, np.float32),
                          np.full(channels, 1.0 - norm.epsilon, np.float32)])
    kernel, bias = weights[gemm.input[1]], weights[gemm.input[2]]
    transposed = next((attr.i for attr in gemm.attribute if attr.name == "transB"), 0)
    layers[-1].set_weights([kernel.T if transposed else kernel, bias])
    return model


def _accuracy(predict, images: np.ndarray, labels: np.ndarray, batch: int = 50) -> tuple[float, np.ndarray]:
    predictions = np.concatenate([np.asarray(predict(images[i:i + batch])).argmax(-1) for i in range(0, len(images), batch)])
    return float(np.mean(predictions == labels)), predictions


def bench_model(name: str, workdir: Path, args: argparse.Namespace, keras, tf) -> dict:
    keras.utils.set_random_seed(0)
    size = args.image_size
    trained = args.trained is not None and name == "mobilenet_v2"
    if trained:
        import trained_classifiers as tc  # noqa: E402  (sibling script)

        model = trained_mobilenet_v2(tc.trained_models(args.trained)["mobilenet_v2_trained"], keras)
        size = 224
    else:
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
    accuracy: dict[str, Any] = {}
    best = None
    if trained:
        # What a user with this trained model gets from `--precision best --max-accuracy-drop 1%`.
        calibration = tc.calibration_set(args.calib).transpose(0, 2, 3, 1)
        start = time.perf_counter()
        best_path = workdir / f"{name}_best.engine"
        es.build(keras_path, output=best_path, precision="best", accuracy_budget="1%",
                 calibration_data={input_name: calibration})
        best_build_s = time.perf_counter() - start
        best = es.load(best_path)
        targets = {"engine (best)": best.infer, **targets}
        images, labels = tc.held_out_set(args.held_out)
        images = images.transpose(0, 2, 3, 1)
        keras_acc, keras_pred = _accuracy(lambda x: serve(tf.constant(x)), images, labels)
        fp32_acc, fp32_pred = _accuracy(lambda x: engine.infer({input_name: x})[output_name], images, labels)
        best_acc, best_pred = _accuracy(lambda x: best.infer({input_name: x})[output_name], images, labels)
        accuracy = {
            "held_out_images": int(len(labels)),
            "calibration_images": int(len(calibration)),
            "keras": keras_acc, "engine fp32": fp32_acc, "engine (best)": best_acc,
            "engine (best) precision": best.precision,
            "engine (best) build_s": best_build_s,
            "engine (best) candidates": best.manifest.checks.get("precision_candidates"),
            "top1 agreement engine (best) vs keras": float(np.mean(best_pred == keras_pred)),
            "top1 agreement engine fp32 vs keras": float(np.mean(fp32_pred == keras_pred)),
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
            best_row = {}
            if best is not None:
                vs_tf_best = round_ratio(round_p50, "tf.function", "engine (best)")
                best_row = {"engine (best) speedup vs tf.function": vs_tf_best["median"],
                            "engine (best) speedup vs tf.function range over rounds": [vs_tf_best["min"], vs_tf_best["max"]]}
            rows.append({
                "batch": batch,
                **best_row,
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
                     f"Keras {MODELS[name]} ({'trained on digits scenes' if trained else 'weights=None'}), "
                     f"{size}x{size}: engine vs Keras")
    return {
        "model": MODELS[name],
        "weights": "trained (trained_classifiers.py, transferred)" if trained else "None (random)",
        "accuracy": accuracy,
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
    parser.add_argument("--trained", type=Path, help="folder of trained_classifiers.py's models: a trained MobileNetV2")
    parser.add_argument("--calib", type=int, default=64, help="--trained: calibration scenes for the best engine")
    parser.add_argument("--held-out", type=int, default=500, help="--trained: held-out scenes for accuracy")
    args = parser.parse_args()
    if args.trained is not None:
        args.models = "mobilenet_v2"
        if args.json == RESULTS / "keras_engines.json":
            args.json = RESULTS / "keras_engines_trained.json"

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
        for row in res["rows"]:
            if "engine (best) speedup vs tf.function" in row:
                print(f"{'':<13}batch {row['batch']}: engine (best, {res['accuracy']['engine (best) precision']}) "
                      f"{row['engine (best) p50 ms']:.2f} ms, {row['engine (best) speedup vs tf.function']:.2f}x vs tf.function")
        if res["accuracy"]:
            acc = res["accuracy"]
            print(f"{'':<13}held-out accuracy ({acc['held_out_images']} scenes): Keras {acc['keras']:.1%}, engine fp32 "
                  f"{acc['engine fp32']:.1%}, engine (best, {acc['engine (best) precision']}) {acc['engine (best)']:.1%}; "
                  f"top-1 agreement with Keras {acc['top1 agreement engine (best) vs keras']:.1%}")
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
        if "engine (best) speedup vs tf.function" in b1:
            value = b1["engine (best) speedup vs tf.function"]
            acc = mnv2["accuracy"]
            targets["engine (best, 1% budget) >= 4x faster than tf.function (trained MobileNetV2, batch 1)"] = {
                "value": value, "met": value >= 4.0}
            drop = acc["keras"] - acc["engine (best)"]
            targets["engine (best) held-out accuracy within 1 point of Keras"] = {"value": drop, "met": drop <= 0.01}
    write_report("keras_engines", args, facts, targets, results)


if __name__ == "__main__":
    main()
