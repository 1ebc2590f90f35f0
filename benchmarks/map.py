"""``enginesmith map`` (Ray Data, one engine per worker) vs the same engine in-process, on the same cores.

1. Throughput on feature vectors (``--rows``, default 100,000 rows of 512 float32 through an MLP
   512 -> 4096 -> 16): the in-process baseline reads the same Parquet file in batches, runs the
   engine (ONNX Runtime on every core) and writes a Parquet file, as one would by hand; ``map``
   runs on a local Ray instance started beforehand (as a cluster would be), so its time includes
   starting the actor pool and loading the engines in them, not starting Ray. Interleaved rounds,
   medians; the ratio is map rows/s over in-process rows/s.
2. Peak memory: the summed RSS of this process and every process under it (the Ray instance, its
   workers), sampled every 0.2 s, during map runs over ``--small-rows`` (10,000) and ``--rows``
   rows: it should not grow with the dataset.
3. A worker killed mid-run (SIGKILL to the worker that has a part's temporary file open): the
   output must hold every row id exactly once, with the outputs the in-process engine gives.
4. Images (``--images``, default 500; 0 skips): JPEGs of 256x256 through a MobileNetV2-like
   engine at 224 (the bundle's preprocessing: resize 256, crop 224), in-process vs map.

``--gpus N`` (on a GPU machine): the engine is built with ``--backend`` (default tensorrt), the
baseline is that engine in-process on one GPU, and map runs N workers with one GPU each (Ray
hands each its own GPU): the ratio is then the scaling over one GPU (ideal: N).

    PYTHONPATH=src python benchmarks/map.py [--rows 100000] [--small-rows 10000] [--rounds 3] [--images 1000]
    PYTHONPATH=src python benchmarks/map.py --gpus 2 [--backend tensorrt] --json benchmarks/results/map_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import enginesmith as es
from enginesmith import samples
from enginesmith.batch import map_dataset
from enginesmith.batch.columns import array_to_column, column_to_array
from enginesmith.bench import write_atomic
from enginesmith.signature import TensorSpec

sys.path.insert(0, str(Path(__file__).parent))
from cpu_engines import LoadMonitor, machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FEATURES, HIDDEN, CLASSES = 512, 4096, 16
ROW_GROUP = 2048
BATCH = 256


# --------------------------------------------------------------------------- data and engines


def write_vectors(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` feature vectors with int64 ids, written in row groups without holding them all."""
    rng = np.random.default_rng(seed)
    spec = TensorSpec("x", "float32", ("batch", FEATURES))
    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), FEATURES))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            count = min(ROW_GROUP, rows - start)
            x = rng.standard_normal((count, FEATURES), dtype=np.float32)
            writer.write_table(pa.Table.from_arrays([pa.array(np.arange(start, start + count)), array_to_column(x, spec)],
                                                    schema=schema))


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def build(model, folder: Path, name: str, backend: str | None, preprocess: str | None = None) -> Path:
    source = folder / f"{name}.onnx"
    samples.save(model, source)
    path = folder / f"{name}.engine"
    es.build(source, backend=backend, verify=False, preprocess=preprocess).save(path)
    return path


# --------------------------------------------------------------------------- the two ways


def in_process_vectors(engine: es.Engine, source: Path, target: Path) -> float:
    """Read, run, write by hand: rows/s."""
    spec = engine.signature.inputs[0]
    started = time.perf_counter()
    rows = 0
    writer = None
    for batch in pq.ParquetFile(source).iter_batches(batch_size=BATCH):
        probs = engine(x=column_to_array("x", batch.column("x"), spec))["y"]
        table = pa.table({"id": batch.column("id"), "y": array_to_column(probs, engine.signature.outputs[0])})
        writer = writer or pq.ParquetWriter(target, table.schema)
        writer.write_table(table)
        rows += batch.num_rows
    writer.close()
    return rows / (time.perf_counter() - started)


def in_process_images(engine: es.Engine, paths: list[Path], target: Path) -> float:
    from enginesmith.runtime.preprocess import PreprocessSpec, load_image

    spec = PreprocessSpec.from_dict(engine.manifest.preprocess)
    started = time.perf_counter()
    writer = None
    for start in range(0, len(paths), 32):
        chunk = paths[start:start + 32]
        logits = engine(image=np.stack([load_image(p, spec) for p in chunk]))["logits"]
        table = pa.table({"id": [p.name for p in chunk], "logits": array_to_column(logits, engine.signature.outputs[0])})
        writer = writer or pq.ParquetWriter(target, table.schema)
        writer.write_table(table)
    writer.close()
    return len(paths) / (time.perf_counter() - started)


class TreeRss:
    """Peak of the summed RSS of this process and all its descendants (the local Ray instance), sampled."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self.peak_driver = interval, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.peak_driver = max(self.peak_driver, me.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_map(engine: Path, source: Path, output: Path, **kwargs) -> tuple[float, object, TreeRss]:
    shutil.rmtree(output, ignore_errors=True)
    with TreeRss() as rss:
        report = map_dataset(engine, source, output, progress=None, **kwargs)
    return report.rows_computed / report.seconds, report, rss


def killed_worker_run(engine: Path, source: Path, output: Path, rows: int, reference: es.Engine, **kwargs) -> dict:
    """SIGKILL the worker writing a part mid-run; then every id once, outputs equal to the in-process engine's."""
    import psutil

    shutil.rmtree(output, ignore_errors=True)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(report=map_dataset(engine, source, output, **kwargs)))
    runner.start()
    killed = None
    while killed is None and runner.is_alive():
        if list(output.glob("part-*.parquet")):
            for child in psutil.Process().children(recursive=True):
                try:
                    if "PartWriter" in " ".join(child.cmdline()) and any(
                            Path(f.path).name.startswith(".part-") for f in child.open_files()):
                        os.kill(child.pid, signal.SIGKILL)
                        killed = child.pid
                        break
                except psutil.Error:
                    pass
        time.sleep(0.02)
    runner.join()
    table = pq.read_table(output).sort_by("id")
    ids = table.column("id").to_numpy()
    unique = len(np.unique(ids))
    # the outputs of the first rows against the in-process engine (the ids are the row numbers here)
    first = pq.ParquetFile(source).read_row_group(0)
    expected = reference(x=column_to_array("x", first.column("x"), reference.signature.inputs[0]))["y"]
    got = np.array(table.column("y").to_pylist()[:len(expected)], np.float32)
    return {"rows": rows, "killed_pid": killed, "rows_out": int(len(ids)), "unique_ids": int(unique),
            "every_row_once": bool(killed is not None and len(ids) == rows == unique and ids[0] == 0 and ids[-1] == rows - 1),
            "max_abs_diff_first_row_group": float(np.abs(got - expected).max()),
            "parts": result["report"].parts}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small-rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=500, help="images for part 4 (0: skip)")
    parser.add_argument("--gpus", type=int, default=0, help="GPU mode: map on N workers with one GPU each")
    parser.add_argument("--backend", default=None, help="engine backend (default: onnxruntime, tensorrt with --gpus)")
    parser.add_argument("--json", type=Path, default=RESULTS / "map_cpu.json")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    backend = args.backend or ("tensorrt" if args.gpus else "onnxruntime")
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="enginesmith-map-bench-"))
    results: dict = {"machine": machine({"gpus": args.gpus, "backend": backend}), "settings": vars(args) | {
        "json": str(args.json), "features": FEATURES, "hidden": HIDDEN, "row_group": ROW_GROUP, "batch": BATCH}}
    map_args = {"workers": args.gpus, "gpus_per_worker": 1} if args.gpus else {}
    try:
        mlp = build(samples.tiny_mlp(FEATURES, HIDDEN, CLASSES), work, "mlp", backend)
        engine = es.load(mlp)
        big, small = work / "big.parquet", work / "small.parquet"
        write_vectors(big, args.rows)
        write_vectors(small, args.small_rows, seed=1)
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 num_cpus=cpus, num_gpus=args.gpus or None)
        started = time.perf_counter()
        run_map(mlp, small, work / "warm", **map_args)  # first use of Ray Data in this process
        results["first_map_s"] = round(time.perf_counter() - started, 1)

        baseline, mapped, map_reports = [], [], []
        with LoadMonitor() as load:
            for round_ in range(args.rounds):
                with TreeRss() as base_rss:
                    baseline.append(in_process_vectors(engine, big, work / "by_hand.parquet"))
                rate, report, rss = run_map(mlp, big, work / "out_big", **map_args)
                mapped.append(rate)
                map_reports.append((report, rss))
                print(f"round {round_ + 1}: in-process {baseline[-1]:.0f} rows/s, map {rate:.0f} rows/s "
                      f"({report.workers} workers, {report.parts} parts)", flush=True)
        results["load"] = load.facts
        report, rss_big = map_reports[-1]
        _, _, rss_small = run_map(mlp, small, work / "out_small", **map_args)
        results["vectors"] = {
            "rows": args.rows, "in_process_rows_per_s": [round(v) for v in baseline],
            "map_rows_per_s": [round(v) for v in mapped],
            "in_process_median": round(statistics.median(baseline)), "map_median": round(statistics.median(mapped)),
            "ratio": round(statistics.median(mapped) / statistics.median(baseline), 3),
            "map_report": report.to_dict(), "in_process_driver_peak_rss_mb": round(base_rss.peak_driver / 2**20),
        }
        results["memory"] = {
            f"{args.small_rows}_rows": {"tree_peak_rss_mb": round(rss_small.peak / 2**20),
                                        "driver_peak_rss_mb": round(rss_small.peak_driver / 2**20)},
            f"{args.rows}_rows": {"tree_peak_rss_mb": round(rss_big.peak / 2**20),
                                  "driver_peak_rss_mb": round(rss_big.peak_driver / 2**20)},
            "input_mb": {"small": round(small.stat().st_size / 2**20), "big": round(big.stat().st_size / 2**20)},
        }
        results["killed_worker"] = killed_worker_run(mlp, small, work / "out_killed", args.small_rows, engine,
                                                     part_rows=ROW_GROUP, **map_args)
        if args.images:
            cnn = build(samples.mobilenet_v2_like(224, width=1.0), work, "mobilenet", backend,
                        preprocess="resize=256;crop=224;mean=0.485/0.456/0.406;std=0.229/0.224/0.225")
            cnn_engine = es.load(cnn)
            paths = write_images(work / "images", args.images)
            base_img, map_img = [], []
            for _ in range(args.rounds):
                base_img.append(in_process_images(cnn_engine, paths, work / "images_by_hand.parquet"))
                rate, img_report, _ = run_map(cnn, work / "images", work / "out_images", **map_args)
                map_img.append(rate)
            results["images"] = {
                "images": args.images, "in_process_images_per_s": [round(v, 1) for v in base_img],
                "map_images_per_s": [round(v, 1) for v in map_img],
                "ratio": round(statistics.median(map_img) / statistics.median(base_img), 3),
                "map_report": img_report.to_dict(),
            }
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.json, json.dumps(results, indent=2).encode())
    print(f"wrote {args.json}")


def print_table(results: dict) -> None:
    v = results["vectors"]
    print(f"\n{'':34} {'in-process':>12} {'map':>12} {'ratio':>7}")
    print(f"{'vectors rows/s (median)':34} {v['in_process_median']:>12} {v['map_median']:>12} {v['ratio']:>7}")
    if "images" in results:
        i = results["images"]
        print(f"{'images/s (median)':34} {statistics.median(i['in_process_images_per_s']):>12.1f} "
              f"{statistics.median(i['map_images_per_s']):>12.1f} {i['ratio']:>7}")
    for rows, facts in results["memory"].items():
        if rows.endswith("_rows"):
            print(f"{'peak RSS, map over ' + rows.replace('_', ' '):34} {'':>12} {facts['tree_peak_rss_mb']:>9} MB "
                  f"(driver {facts['driver_peak_rss_mb']} MB)")
    k = results["killed_worker"]
    print(f"killed worker {k['killed_pid']}: {k['rows_out']} rows out of {k['rows']}, {k['unique_ids']} distinct ids, "
          f"every row once: {k['every_row_once']}")
    print(f"load: {results['load']}")


if __name__ == "__main__":
    main()
