"""CPU engines vs a plain ONNX Runtime session, in one run, on models built in code.

For a MobileNetV2-like and a ResNet-50-like model (random weights) this builds an
enginesmith engine and compares, on the same inputs and interleaved:
  * engine        - ``engine.infer(feeds)``, what users call
  * raw session   - the engine's own ONNX Runtime session called directly (wrapper overhead)
  * plain session - ``onnxruntime.InferenceSession(model.onnx)`` with default options, what a
                    user writes by hand
p50 latency at batch 1 and 8, throughput, and the peak RSS of a process that loads and runs
each (measured in fresh subprocesses). Prints a table and writes JSON.

Targets (issue 2, 2-core machine): engine p50 <= 1.0x plain (aim 0.9x); wrapper overhead
over raw session.run <= 3% at batch 1 for ResNet-50-like; peak memory <= 1.2x plain.

    python benchmarks/cpu_engines.py [--runs 30] [--image-size 224] [--json benchmarks/results/cpu_engines.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

import enginesmith as es
from enginesmith import samples
from enginesmith.backends.onnxruntime import plain_session_runner
from enginesmith.bench import machine_facts, measure, write_atomic
from enginesmith.signature import random_inputs

MODELS = {
    "mobilenet_v2_like": samples.mobilenet_v2_like,
    "resnet50_like": samples.resnet50_like,
}

# Run in a fresh interpreter so each peak RSS covers one way of running the model only.
RSS_SCRIPT = """
import resource, sys, numpy as np
mode, path, batch, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).standard_normal((batch, 3, {size}, {size})).astype(np.float32)
if mode == "engine":
    import enginesmith as es
    engine = es.load(path)
    run = lambda: engine(image=x)
else:
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    run = lambda: session.run(None, {{"image": x}})
for _ in range(runs):
    run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(mode: str, path: Path, batch: int, size: int, runs: int = 5) -> int:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT.format(size=size), mode, str(path), str(batch), str(runs)],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def bench_model(name: str, workdir: Path, batches: list[int], runs: int, size: int) -> dict:
    model = MODELS[name](image_size=size)
    model_path = workdir / f"{name}.onnx"
    onnx.save(model, model_path)
    engine_path = workdir / f"{name}.engine"
    engine = es.build(model_path, output=engine_path)
    engine = es.load(engine_path)
    raw = engine._session  # the backend session, bypassing the Engine's input checks
    plain = plain_session_runner(model_path.read_bytes())
    targets = {"engine": engine.infer, "raw session": raw.run, "plain session": plain}
    rows = []
    for batch in batches:
        feeds = random_inputs(engine.signature.inputs, batch=batch, seed=0)
        stats = {s.label: s for s in measure(targets, feeds, batch, warmup=3, runs=runs, rounds=5)}
        rows.append({
            "batch": batch,
            **{f"{label} p50 ms": s.p50_ms for label, s in stats.items()},
            **{f"{label} items/s": s.throughput for label, s in stats.items()},
            "engine / plain p50": stats["engine"].p50_ms / stats["plain session"].p50_ms,
            "wrapper overhead": stats["engine"].p50_ms / stats["raw session"].p50_ms - 1.0,
            "stats": {label: vars(s) for label, s in stats.items()},
        })
    rss_engine = peak_rss("engine", engine_path, 1, size)
    rss_plain = peak_rss("plain", model_path, 1, size)
    return {
        "model": name,
        "nodes": len(model.graph.node),
        "parameters": int(sum(onnx.numpy_helper.to_array(t).size for t in model.graph.initializer)),
        "rows": rows,
        "peak_rss_engine_mb": rss_engine / 2**20,
        "peak_rss_plain_mb": rss_plain / 2**20,
        "peak_rss_ratio": rss_engine / rss_plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per target and batch")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "cpu_engines.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="enginesmith-bench-") as tmp:
        for name in args.models.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr)
            results.append(bench_model(name, Path(tmp), batches, args.runs, args.image_size))
    header = f"{'model':<20}{'batch':>6}{'engine ms':>11}{'raw ms':>9}{'plain ms':>10}{'eng/plain':>10}{'overhead':>10}{'img/s':>9}"
    print(header)
    print("-" * len(header))
    for res in results:
        for row in res["rows"]:
            print(f"{res['model']:<20}{row['batch']:>6}{row['engine p50 ms']:>11.2f}{row['raw session p50 ms']:>9.2f}"
                  f"{row['plain session p50 ms']:>10.2f}{row['engine / plain p50']:>9.3f}x{row['wrapper overhead']:>9.2%}"
                  f"{row['engine items/s']:>9.1f}")
        print(f"{'':<20}peak RSS: engine {res['peak_rss_engine_mb']:.0f} MB, plain {res['peak_rss_plain_mb']:.0f} MB "
              f"({res['peak_rss_ratio']:.2f}x)")
    report = {"machine": machine_facts(), "runs": args.runs, "image_size": args.image_size, "results": results}
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
