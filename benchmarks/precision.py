"""fp32 vs int8 engines on the CPU, in one run, with top-1 agreement on held-out data.

For a MobileNetV2-like and a ResNet-50-like model built in code (random weights), this
builds an fp32 engine and an int8 engine (the library's default int8: static QDQ,
per-channel weights, calibrated on synthetic images with a fixed seed), loads both from
their files, checks top-1 agreement of int8 with fp32 on held-out images (same
distribution, never used in calibration), and times both at batch 1 and 8 in interleaved
rounds; the speed-up is the median over rounds of the per-round fp32/int8 p50 ratios.

Next to agreement it records how far int8 logits move (relative L2, cosine) and how
decisive the fp32 model is on the held-out images (distinct top-1 classes, the top-1 minus
top-2 logit gap in units of the logits' standard deviation): with random weights the gap
is often smaller than int8 noise, and then top-1 agreement measures ties, not accuracy.

With ``--trained DIR`` it measures instead the trained MobileNetV2 and ResNet-50 of
``trained_classifiers.py`` (torchvision architectures trained on scikit-learn's digits drawn
into 224x224 scenes): calibration on scenes of training digits, agreement on all 500
held-out digits, and the held-out accuracy of both engines against the true labels. These
models make real decisions, so their agreement is the number the target is about.

Prints a table, writes JSON and a PNG per model, and records the machine and its load.

Target (issue 5, 2-core machine): int8 p50 >= 1.5x faster than fp32 at batch 1, with
top-1 agreement >= 99%.

    python benchmarks/precision.py [--rounds 6] [--runs 30] [--image-size 224] [--calib 64] [--holdout 64]
    python benchmarks/precision.py --trained DIR [--json benchmarks/results/precision_trained.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import onnx

import enginesmith as es
from enginesmith import samples
from enginesmith.bench import plot_results

from cpu_engines import LoadMonitor, interleaved, machine, round_ratio, write_report  # noqa: E402  (sibling script)

MODELS = {
    "mobilenet_v2_like": samples.mobilenet_v2_like,
    "resnet50_like": samples.resnet50_like,
}
RESULTS = Path(__file__).parent / "results"


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images (low-frequency noise, like natural images' spectra), normalized."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, size // 16 + 1, size // 16 + 1)).astype(np.float32)
    images = coarse.repeat(16, axis=2).repeat(16, axis=3)[:, :, :size, :size]
    images += 0.3 * rng.standard_normal(images.shape).astype(np.float32)
    return (images - images.mean()) / images.std()


def logits_of(engine: es.Engine, images: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([engine(image=images[i : i + batch])["logits"] for i in range(0, len(images), batch)])


def bench_model(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    size = args.image_size
    calib_path = workdir / f"{name}_calib.npz"
    labels = None
    if args.trained:
        import trained_classifiers  # noqa: PLC0415  (sibling script)

        model_path = trained_classifiers.trained_models(args.trained)[name]
        np.savez(calib_path, image=trained_classifiers.calibration_set(args.calib))
        held_out, labels = trained_classifiers.held_out_set(args.holdout)
    else:
        model_path = workdir / f"{name}.onnx"
        onnx.save(MODELS[name](image_size=size), model_path)
        np.savez(calib_path, image=synthetic_images(args.calib, size, seed=1))
        held_out = synthetic_images(args.holdout or 64, size, seed=2)

    start = time.perf_counter()
    es.build(model_path, output=workdir / f"{name}_fp32.engine")
    fp32_build = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime.quantization's advice to run pre-processing (the library does)
        es.build(model_path, precision="int8", calibration_data=calib_path, calibration_method=args.calib_method,
                 holdout=0.1, verify=False, output=workdir / f"{name}_int8.engine")
    int8_build = time.perf_counter() - start
    fp32 = es.load(workdir / f"{name}_fp32.engine")
    int8 = es.load(workdir / f"{name}_int8.engine")

    l32, l8 = logits_of(fp32, held_out), logits_of(int8, held_out)
    top32, top8 = l32.argmax(-1), l8.argmax(-1)
    ordered = np.sort(l32, axis=-1)
    gap = (ordered[:, -1] - ordered[:, -2]) / l32.std(axis=-1)
    cosine = np.sum(l32 * l8, -1) / (np.linalg.norm(l32, axis=-1) * np.linalg.norm(l8, axis=-1))
    accuracy = {
        "top1_agreement": float(np.mean(top32 == top8)),
        "logits_rel_l2": float(np.linalg.norm(l8 - l32) / np.linalg.norm(l32)),
        "logits_min_cosine": float(cosine.min()),
        "fp32_distinct_top1_classes": int(len(np.unique(top32))),
        "fp32_top1_gap_in_std_median": float(np.median(gap)),
        "fp32_top1_gap_in_std_min": float(gap.min()),
        # int8 noise on the logits, in the same units as the gap: flips are expected where gap < ~2x this
        "int8_logit_noise_in_std": float(np.median(np.std(l8 - l32, axis=-1) / l32.std(axis=-1))),
    }
    if labels is not None:
        accuracy["fp32_accuracy_vs_labels"] = float(np.mean(top32 == labels))
        accuracy["int8_accuracy_vs_labels"] = float(np.mean(top8 == labels))

    rows, all_stats = [], []
    with LoadMonitor() as load:
        for batch in args.batches:
            feeds = {"image": held_out[:batch]}
            stats, round_p50 = interleaved({"fp32": fp32.infer, "int8": int8.infer}, feeds, batch,
                                           rounds=args.rounds, runs=args.runs)
            all_stats += stats.values()
            speedup = round_ratio(round_p50, "fp32", "int8")
            rows.append({
                "batch": batch,
                "fp32_p50_ms": stats["fp32"].p50_ms,
                "int8_p50_ms": stats["int8"].p50_ms,
                "int8_speedup": speedup["median"],
                "int8_speedup_range_over_rounds": [speedup["min"], speedup["max"]],
                "fp32_images_per_s": stats["fp32"].throughput,
                "int8_images_per_s": stats["int8"].throughput,
                "round p50 ms": round_p50,
                "stats": {label: vars(s) for label, s in stats.items()},
            })
    if args.plot:
        plot_results(all_stats, args.json.with_name(f"{args.json.stem}_{name}.png"),
                     f"{name}, {size}x{size}: int8 vs fp32 engine")
    return {
        "model": name,
        **accuracy,
        "held_out_images": len(held_out),
        "calibration_images": int8.manifest.checks["calibration"]["samples"],
        "calibration_method": int8.manifest.checks["calibration"]["method"],
        "int8_build_log": [line for line in int8.manifest.build_log if "int8" in line or "optimized" in line],
        "build_seconds": {"fp32": fp32_build, "int8": int8_build},
        "rows": rows,
        "load": load.facts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per engine and batch, over all rounds")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calib", type=int, default=64, help="calibration images")
    parser.add_argument("--calib-method", default=None, help="minmax, entropy or percentile (library default: minmax)")
    parser.add_argument("--holdout", type=int, default=None,
                        help="held-out images for top-1 agreement (default: 64; with --trained all 500)")
    parser.add_argument("--models", default=None, help="default: both models (of --trained DIR when given)")
    parser.add_argument("--trained", type=Path, default=None,
                        help="folder of trained models from trained_classifiers.py (train, then unpack)")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: results/precision.json (results/precision_trained.json with --trained)")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args()
    if args.trained:
        import trained_classifiers  # noqa: PLC0415  (sibling script)

        available = trained_classifiers.trained_models(args.trained)
        args.models = args.models or ",".join(available)
        args.image_size = trained_classifiers.IMAGE_SIZE
    args.models = args.models or ",".join(MODELS)
    args.json = args.json or RESULTS / ("precision_trained.json" if args.trained else "precision.json")
    facts = machine()
    if args.trained and (args.trained / "training.json").exists():  # how the models were trained, kept with the numbers
        facts["trained_models"] = json.loads((args.trained / "training.json").read_text())
    results = []
    with tempfile.TemporaryDirectory(prefix="enginesmith-precision-") as tmp:
        for name in args.models.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr)
            results.append(bench_model(name, Path(tmp), args))
    print(f"machine: {facts['cpu']}, {facts['physical_cores']} cores ({facts['cpu_flags']}; no VNNI/AMX: "
          f"{not any(f in facts['cpu_flags'] for f in ('vnni', 'amx'))}), ONNX Runtime {facts['onnxruntime']}")
    header = (f"{'model':<22}{'batch':>6}{'fp32 ms':>10}{'int8 ms':>10}{'speed-up':>10}{'top-1 agree':>13}"
              f"{'rel L2':>9}{'fp32 gap':>10}{'int8 noise':>12}")
    print(header)
    print("-" * len(header))
    for res in results:
        for row in res["rows"]:
            print(f"{res['model']:<22}{row['batch']:>6}{row['fp32_p50_ms']:>10.2f}{row['int8_p50_ms']:>10.2f}"
                  f"{row['int8_speedup']:>9.2f}x{res['top1_agreement']:>12.1%}{res['logits_rel_l2']:>9.3f}"
                  f"{res['fp32_top1_gap_in_std_median']:>10.3f}{res['int8_logit_noise_in_std']:>12.3f}")
        load = res["load"]
        print(f"{'':<22}fp32 top-1 classes on {res['held_out_images']} held-out images: "
              f"{res['fp32_distinct_top1_classes']}; load average {load['loadavg_start'][0]:.2f} -> "
              f"{load['loadavg_end'][0]:.2f}, other processes used {load['other_cpu_share'] or 0:.0%} of the CPUs")
        if "fp32_accuracy_vs_labels" in res:
            print(f"{'':<22}held-out accuracy vs true labels: fp32 {res['fp32_accuracy_vs_labels']:.1%}, "
                  f"int8 {res['int8_accuracy_vs_labels']:.1%}")
    targets = {}
    for res in results:
        b1 = next((row for row in res["rows"] if row["batch"] == 1), None)
        if b1 is not None:
            targets[f"int8 >= 1.5x faster than fp32 at batch 1 ({res['model']})"] = {
                "value": b1["int8_speedup"], "met": b1["int8_speedup"] >= 1.5}
        targets[f"top-1 agreement >= 99% ({res['model']})"] = {
            "value": res["top1_agreement"], "met": res["top1_agreement"] >= 0.99}
    write_report("precision", args, facts, targets, results)


if __name__ == "__main__":
    main()
