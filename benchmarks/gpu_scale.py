"""Issue 19 part 5 on the GPU machine: the torch backend's ResNet-50 engine on one GPU and on two, through Ray.

    python benchmarks/gpu_scale.py engine --out /tmp/scale/r50.engine          # torchvision ResNet-50, fp16, CUDA
    python benchmarks/gpu_scale.py map --engine /tmp/scale/r50.engine --rows 6144 --json OUT.json

``engine`` builds torchvision's ResNet-50 (seeded random weights: no downloads there) with the torch
backend, fp16, batch 128 compiled (``reduce-overhead``: CUDA graphs, a build of a minute rather
than max-autotune's many). ``map`` writes ROWS images as a Parquet tensor column, then scores it
three ways, interleaved over ``--rounds``: the engine in this process on one GPU reading the same
Parquet in batches (by hand), ``enginesmith map`` with one worker (one GPU) and with two workers
(one GPU each); rows/s medians and the ratios. ``benchmarks/ray_serve.py --engine ... --gpus 2``
is the serving side (scripts/gpu_scale.sh runs both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cmd_engine(args: argparse.Namespace) -> None:
    import torch
    import torchvision

    import enginesmith as es
    from enginesmith.importers import ImportOptions

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    started = time.perf_counter()
    engine = es.build(model, backend="torch", precision="fp16", verify=False,
                      backend_options={"device": "cuda", "mode": args.mode, "batches": [args.batch]},
                      import_options=ImportOptions(example_inputs={"x": x}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    engine.save(args.out)
    print(f"built {args.out} in {time.perf_counter() - started:.1f} s: inputs {engine.signature.inputs}", flush=True)


def write_rows(path: Path, rows: int, batch: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        images = rng.standard_normal((n, 3 * 224 * 224), dtype=np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 3 * 224 * 224)
        table = pa.table({"id": pa.array(np.arange(start, start + n)), "x": column})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def in_process(engine_path: Path, data: Path, batch: int) -> float:
    import pyarrow.parquet as pq

    import enginesmith as es

    engine = es.load(engine_path, trust_code=True)
    for warm in pq.ParquetFile(data).iter_batches(batch_size=batch):
        engine(x=warm.column("x").flatten().to_numpy().reshape(-1, 3, 224, 224))
        break
    started = time.perf_counter()
    rows = 0
    for part in pq.ParquetFile(data).iter_batches(batch_size=batch):
        x = part.column("x").flatten().to_numpy().reshape(-1, 3, 224, 224)
        out = engine(x=x)
        rows += len(next(iter(out.values())))
    return rows / (time.perf_counter() - started)


def mapped(engine_path: Path, data: Path, out: Path, workers: int, batch: int, address: str) -> tuple[float, dict]:
    summary = out.with_suffix(".json")
    command = [sys.executable, "-m", "enginesmith", "map", str(engine_path), "--input", str(data), "-o", str(out),
               "--workers", str(workers), "--gpus-per-worker", "1", "--batch-size", str(batch), "--address", address,
               "--trust-code", "--force", "--json", str(summary)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"map failed: {done.stderr.strip()[-800:]}")
    report = json.loads(summary.read_text())
    report["wall_rows_per_s"] = round(report["rows_computed"] / seconds, 1)  # with the process start and engine loads
    return report["rows_per_second"], report


def cmd_map(args: argparse.Namespace) -> None:
    import ray

    work = Path(tempfile.mkdtemp(prefix="gpu-map-"))
    data = work / "images.parquet"
    write_rows(data, args.rows, args.batch)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    address = context.address_info["address"]
    results: dict = {"rows": args.rows, "batch": args.batch, "gpus": ray.cluster_resources().get("GPU", 0),
                     "in_process_rows_per_s": [], "map_1_rows_per_s": [], "map_2_rows_per_s": [], "reports": {}}
    try:
        for round_ in range(args.rounds):
            results["in_process_rows_per_s"].append(round(in_process(Path(args.engine), data, args.batch), 1))
            for workers in (1, 2):
                rate, report = mapped(Path(args.engine), data, work / f"out{workers}", workers, args.batch, address)
                results[f"map_{workers}_rows_per_s"].append(round(rate, 1))
                results["reports"][str(workers)] = report
            print(f"round {round_ + 1}: in-process {results['in_process_rows_per_s'][-1]} rows/s, map 1 GPU "
                  f"{results['map_1_rows_per_s'][-1]}, map 2 GPUs {results['map_2_rows_per_s'][-1]}", flush=True)
    finally:
        ray.shutdown()
    med = {k: statistics.median(results[k]) for k in ("in_process_rows_per_s", "map_1_rows_per_s", "map_2_rows_per_s")}
    results["medians"] = med
    results["two_over_one"] = round(med["map_2_rows_per_s"] / med["map_1_rows_per_s"], 2)
    results["one_worker_over_in_process"] = round(med["map_1_rows_per_s"] / med["in_process_rows_per_s"], 2)
    print(json.dumps({k: v for k, v in results.items() if k != "reports"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    engine = sub.add_parser("engine")
    engine.add_argument("--out", required=True)
    engine.add_argument("--batch", type=int, default=128)
    engine.add_argument("--mode", default="reduce-overhead")
    run = sub.add_parser("map")
    run.add_argument("--engine", required=True)
    run.add_argument("--rows", type=int, default=6144)
    run.add_argument("--batch", type=int, default=128)
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--json")
    args = parser.parse_args()
    {"engine": cmd_engine, "map": cmd_map}[args.command](args)


if __name__ == "__main__":
    main()
