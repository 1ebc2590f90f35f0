"""Timings behind the TensorRT runtime's buffer choices, measured with its CUDA layer (no TensorRT needed).

    PYTHONPATH=src python3 benchmarks/cuda_layer.py [--json out.json]

1. host->device and device->host bandwidth from pinned vs pageable memory (64 MiB);
2. a small round trip (4 KiB in, 4 KiB out) enqueued copy by copy vs replayed as a CUDA graph;
3. a 1 MiB device buffer from cudaMalloc/cudaFree per call vs reused from the BufferPool.

Each number is the median of repeated runs after a warm-up, timed on the host around a
stream synchronize (these are per-call costs as the runtime sees them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import numpy as np

from enginesmith.backends.tensorrt import cuda


def median_seconds(run: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(stream: cuda.Stream) -> dict[str, float]:
    nbytes = 64 << 20
    pinned = cuda.PinnedBuffer(nbytes).array((nbytes,), np.uint8)
    pageable = np.ones(nbytes, np.uint8)
    device = cuda.DeviceArray.empty((nbytes,), np.uint8)
    results = {}
    for label, host in (("pinned", pinned), ("pageable", pageable)):
        def htod() -> None:
            device.copy_from_host(host, stream)
            stream.synchronize()

        def dtoh() -> None:
            device.copy_to_host(host, stream)
            stream.synchronize()

        results[f"htod_{label}_GBps"] = nbytes / median_seconds(htod, 10) / 1e9
        results[f"dtoh_{label}_GBps"] = nbytes / median_seconds(dtoh, 10) / 1e9
    return results


def round_trip(stream: cuda.Stream) -> dict[str, float]:
    shape = (1024,)
    pinned_in = cuda.PinnedBuffer(4096).array(shape, np.float32)
    pinned_out = cuda.PinnedBuffer(4096).array(shape, np.float32)
    a, b = cuda.DeviceArray.empty(shape, np.float32), cuda.DeviceArray.empty(shape, np.float32)

    def enqueue(s: cuda.Stream) -> None:
        a.copy_from_host(pinned_in, s)
        b.copy_from(a, s)
        b.copy_to_host(pinned_out, s)

    def plain() -> None:
        enqueue(stream)
        stream.synchronize()

    graph = cuda.CudaGraph.capture(stream, enqueue)

    def replay() -> None:
        graph.launch(stream)
        stream.synchronize()

    results = {"round_trip_plain_us": median_seconds(plain, 500) * 1e6, "round_trip_graph_us": median_seconds(replay, 500) * 1e6}
    graph.close()
    return results


def allocation() -> dict[str, float]:
    pool = cuda.BufferPool()

    def fresh() -> None:
        cuda.DeviceBuffer(1 << 20).free()

    def pooled() -> None:
        pool.device("x", (1 << 18,), np.float32)

    return {"malloc_free_1MiB_us": median_seconds(fresh, 200) * 1e6, "pool_reuse_1MiB_us": median_seconds(pooled, 200) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    facts = cuda.device_facts(0)
    with cuda.Stream() as stream:
        results = {
            "device": f"{facts.name} ({facts.sm})",
            "driver_cuda": facts.driver_version,
            "runtime_cuda": facts.runtime_version,
            **bandwidth(stream),
            **round_trip(stream),
            **allocation(),
        }
    for key, value in results.items():
        print(f"{key:24s} {value:.2f}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
