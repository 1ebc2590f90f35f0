"""fp32 vs int8 engines on the CPU, in one run, with top-1 agreement on held-out data.

For a MobileNetV2-like and a ResNet-50-like model built in code (random weights), this
builds an fp32 engine and an int8 engine (static QDQ, per-channel, calibrated on
synthetic images with a fixed seed), checks top-1 agreement of int8 with fp32 on
held-out images, and times both at batch 1 and 8, interleaved. Prints a table, writes JSON.

Target (issue 5, 2-core machine): int8 p50 >= 1.5x faster than fp32 at batch 1, with
top-1 agreement >= 99%.

    python benchmarks/precision.py [--runs 30] [--image-size 224] [--calib 64] [--holdout 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import enginesmith as es
from enginesmith import samples
from enginesmith.bench import machine_facts, measure, write_atomic

MODELS = {
    "mobilenet_v2_like": samples.mobilenet_v2_like,
    "resnet50_like": samples.resnet50_like,
}


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images (low-frequency noise, like natural images' spectra), normalized."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, size // 16 + 1, size // 16 + 1)).astype(np.float32)
    images = coarse.repeat(16, axis=2).repeat(16, axis=3)[:, :, :size, :size]
    images += 0.3 * rng.standard_normal(images.shape).astype(np.float32)
    return (images - images.mean()) / images.std()


def bench_model(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    size = args.image_size
    model_path = workdir / f"{name}.onnx"
    onnx.save(MODELS[name](image_size=size), model_path)
    calib_path = workdir / f"{name}_calib.npz"
    np.savez(calib_path, image=synthetic_images(args.calib, size, seed=1))
    held_out = synthetic_images(args.holdout, size, seed=2)

    start = time.perf_counter()
    fp32 = es.build(model_path)
    fp32_build = time.perf_counter() - start
    start = time.perf_counter()
    int8 = es.build(model_path, precision="int8", calibration_data=calib_path, holdout=0.1, verify=False)
    int8_build = time.perf_counter() - start

    top32 = np.concatenate([fp32(image=held_out[i : i + 8])["logits"].argmax(-1) for i in range(0, len(held_out), 8)])
    top8 = np.concatenate([int8(image=held_out[i : i + 8])["logits"].argmax(-1) for i in range(0, len(held_out), 8)])
    agreement = float(np.mean(top32 == top8))

    rows = []
    for batch in args.batches:
        feeds = {"image": held_out[:batch]}
        stats = {s.label: s for s in measure({"fp32": fp32.infer, "int8": int8.infer}, feeds, batch,
                                             warmup=3, runs=args.runs, rounds=5)}
        rows.append({
            "batch": batch,
            "fp32_p50_ms": stats["fp32"].p50_ms,
            "int8_p50_ms": stats["int8"].p50_ms,
            "int8_speedup": stats["fp32"].p50_ms / stats["int8"].p50_ms,
            "fp32_images_per_s": stats["fp32"].throughput,
            "int8_images_per_s": stats["int8"].throughput,
            "stats": {label: vars(s) for label, s in stats.items()},
        })
    return {
        "model": name,
        "top1_agreement": agreement,
        "held_out_images": len(held_out),
        "calibration_images": int8.manifest.checks["calibration"]["samples"],
        "build_seconds": {"fp32": fp32_build, "int8": int8_build},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--calib", type=int, default=64, help="calibration images")
    parser.add_argument("--holdout", type=int, default=64, help="held-out images for top-1 agreement")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "precision.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="enginesmith-precision-") as tmp:
        for name in args.models.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr)
            results.append(bench_model(name, Path(tmp), args))
    header = f"{'model':<20}{'batch':>6}{'fp32 ms':>10}{'int8 ms':>10}{'speed-up':>10}{'top-1 agree':>13}"
    print(header)
    print("-" * len(header))
    for res in results:
        for row in res["rows"]:
            print(f"{res['model']:<20}{row['batch']:>6}{row['fp32_p50_ms']:>10.2f}{row['int8_p50_ms']:>10.2f}"
                  f"{row['int8_speedup']:>9.2f}x{res['top1_agreement']:>12.1%}")
    report = {"machine": machine_facts(), "runs": args.runs, "image_size": args.image_size, "results": results}
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
