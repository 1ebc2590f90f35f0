"""What serving costs and what dynamic batching buys, against the same engine called in-process.

The server is ``enginesmith serve`` in a process of its own on 127.0.0.1 (stopped with SIGTERM,
and by its own ``--duration`` should this script die); clients are tritonclient in this process,
sending binary tensors.

1. Low-load latency, MobileNetV2-like (batch 1, one request at a time): p50 of the in-process
   ``engine(x)`` vs p50 through tritonclient.http and tritonclient.grpc, in interleaved rounds;
   the overhead is the median over rounds of (served p50 - in-process p50). The same on a tiny
   MLP, where the engine's own time is near zero, gives the server's cost per request alone.
2. Throughput with 16 concurrent clients (tritonclient.http.aio, batch 1 each) for
   ``--duration`` seconds: the server with batching (defaults) and the same server with
   ``--max-batch 1``; the batch the batcher formed (from the server's own metrics), and the
   in-process throughput of the engine called at that batch.
3. A bounded run of ``--requests`` (default 100,000) requests on a small MLP engine, 16 clients,
   every answer checked against the in-process output; the server's RSS sampled every 0.5 s.

    PYTHONPATH=src python benchmarks/serve.py [--requests 100000] [--duration 10] [--rounds 10] [--runs 100]
"""

from __future__ import annotations

import argparse
import http.client as http_client
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

import enginesmith as es
from enginesmith import samples
from enginesmith.bench import machine_facts, write_atomic

sys.path.insert(0, str(Path(__file__).parent))
from cpu_engines import LoadMonitor, machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLIENTS = 16


# --------------------------------------------------------------------------- the server process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``enginesmith serve ENGINE`` in a child process, ports picked here, stopped on exit."""

    def __init__(self, engine: Path, name: str, *flags: str, max_s: float = 1800):
        self.http, self.grpc, self.metrics = _free_port(), _free_port(), _free_port()
        command = [sys.executable, "-c", "import sys; from enginesmith.cli import main; sys.exit(main())",
                   "serve", str(engine), "--name", name, "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                   "--metrics-port", str(self.metrics), "--duration", str(max_s), *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not get ready in 120 s")

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def rss(self) -> int:
        """The server's resident set size in bytes (VmRSS from /proc; Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- 1. latency


def low_load_latency(engine: es.Engine, server: ServerProcess, x: np.ndarray, rounds: int, runs: int) -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    name = engine.signature.input_names[0]
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    http_input = httpclient.InferInput(name, list(x.shape), "FP32")
    http_input.set_data_from_numpy(x, binary_data=True)
    grpc_input = grpcclient.InferInput(name, list(x.shape), "FP32")
    grpc_input.set_data_from_numpy(x)
    output = engine.signature.output_names[0]
    want = engine({name: x})[output]
    got_http = http.infer("m", [http_input]).as_numpy(output)
    got_grpc = grpc.infer("m", [grpc_input]).as_numpy(output)
    assert np.array_equal(got_http, want) and np.array_equal(got_grpc, want), "served outputs differ from in-process"
    # The same binary request through the standard library's client: tritonclient.http's own cost
    # (geventhttpclient) is the difference between the two HTTP rows.
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    plain = http_client.HTTPConnection(f"127.0.0.1:{server.http}", timeout=60)

    def plain_post() -> None:
        plain.request("POST", "/v2/models/m/infer", body=header + x.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(header))})
        response = plain.getresponse()
        response.read()
        assert response.status == 200

    targets = {
        "in-process": lambda: engine({name: x}),
        "http (binary)": lambda: http.infer("m", [http_input]),
        "http (binary, http.client)": plain_post,
        "grpc": lambda: grpc.infer("m", [grpc_input]),
    }
    samples_ms: dict[str, list[float]] = {label: [] for label in targets}
    per_round: dict[str, list[float]] = {label: [] for label in targets}
    per_block = max(runs // rounds, 3)
    for round_index in range(rounds):
        shift = round_index % len(targets)
        order = list(targets)[shift:] + list(targets)[:shift]
        for label in order:
            # ONNX Runtime's threads (here or in the server) spin for a while after a call: let them
            # settle so that one target's spinning does not slow the next one's block.
            time.sleep(0.3)
            targets[label]()  # one untimed call after switching
            block = []
            for _ in range(per_block):
                start = time.perf_counter()
                targets[label]()
                block.append((time.perf_counter() - start) * 1e3)
            samples_ms[label] += block
            per_round[label].append(statistics.median(block))
    p50 = {label: statistics.median(values) for label, values in samples_ms.items()}
    overhead = {
        label: statistics.median(a - b for a, b in zip(per_round[label], per_round["in-process"]))
        for label in targets if label != "in-process"
    }
    plain.close()
    http.close()
    grpc.close()
    return {"p50_ms": p50, "overhead_ms": overhead, "runs_per_target": per_block * rounds}


# --------------------------------------------------------------------------- 2. throughput


async def _clients(port: int, name: str, output: str, x: np.ndarray, *, seconds: float | None = None,
                   total: int | None = None, want: np.ndarray | None = None) -> dict:
    """CLIENTS tasks sending one request at a time each, for ``seconds`` or until ``total`` were sent."""
    import tritonclient.http.aio as aioclient

    client = aioclient.InferenceServerClient(f"127.0.0.1:{port}", conn_limit=CLIENTS * 2)
    given = aioclient.InferInput(name, list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=True)
    sent = 0
    answered = {"ok": 0, "wrong": 0, "failed": 0}
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds if seconds else None

    async def one_client() -> None:
        nonlocal sent
        while (stop_at is None or time.perf_counter() < stop_at) and (total is None or sent < total):
            sent += 1
            start = time.perf_counter()
            try:
                result = await client.infer("m", [given], outputs=[aioclient.InferRequestedOutput(output, binary_data=True)])
            except Exception:  # noqa: BLE001 - counted, the run goes on
                answered["failed"] += 1
                continue
            latencies.append((time.perf_counter() - start) * 1e3)
            if want is None or np.allclose(result.as_numpy(output), want, rtol=1e-5, atol=1e-6):
                answered["ok"] += 1
            else:
                answered["wrong"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    wall = time.perf_counter() - started
    await client.close()
    return {"sent": sent, **answered, "seconds": wall, "requests_per_s": answered["ok"] / wall,
            "p50_ms": statistics.median(latencies) if latencies else None,
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else None}


def served_throughput(engine_path: Path, engine: es.Engine, x: np.ndarray, seconds: float, *flags: str) -> dict:
    name, output = engine.signature.input_names[0], engine.signature.output_names[0]
    with ServerProcess(engine_path, "m", *flags) as server:
        asyncio.run(_clients(server.http, name, output, x, seconds=min(2.0, seconds)))  # warm up
        executions, items = server.metric("nv_inference_exec_count"), server.metric("nv_inference_count")
        with LoadMonitor() as load:
            result = asyncio.run(_clients(server.http, name, output, x, seconds=seconds))
        executions = server.metric("nv_inference_exec_count") - executions
        items = server.metric("nv_inference_count") - items
    return {**result, "average_batch": items / executions if executions else None, "load": load.facts}


def in_process_throughput(engine: es.Engine, x1: np.ndarray, batch: int, seconds: float) -> dict:
    name = engine.signature.input_names[0]
    x = np.repeat(x1, batch, axis=0)
    engine({name: x})
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        engine({name: x})
        times.append(time.perf_counter() - start)
    p50 = statistics.median(times)
    return {"batch": batch, "p50_ms": p50 * 1e3, "items_per_s": batch / p50}


# --------------------------------------------------------------------------- 3. long run


def long_run(engine_path: Path, requests: int) -> dict:
    engine = es.load(engine_path)
    name, output = engine.signature.input_names[0], engine.signature.output_names[0]
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    want = engine({name: x})[output]
    with ServerProcess(engine_path, "m") as server:
        asyncio.run(_clients(server.http, name, output, x, total=min(2000, requests)))  # warm up
        rss: list[tuple[float, int]] = []
        done = threading.Event()
        started = time.perf_counter()

        def sample() -> None:
            while not done.is_set():
                rss.append((time.perf_counter() - started, server.rss()))
                done.wait(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = asyncio.run(_clients(server.http, name, output, x, total=requests, want=want))
        finally:
            done.set()
            sampler.join()
        rss.append((time.perf_counter() - started, server.rss()))
        success = server.metric("nv_inference_request_success")
    values = [r for _, r in rss]
    tenth = max(len(values) // 10, 1)
    return {
        **result, "server_request_success": success,
        "rss_mb": {"start": values[0] / 2**20, "end": values[-1] / 2**20, "max": max(values) / 2**20,
                   "first_tenth_median": statistics.median(values[:tenth]) / 2**20,
                   "last_tenth_median": statistics.median(values[-tenth:]) / 2**20},
        "rss_samples_mb": [[round(t, 1), round(r / 2**20, 1)] for t, r in rss],
    }


# --------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests in the long run (3.)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput measurement (2.)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the latency comparison (1.)")
    parser.add_argument("--runs", type=int, default=100, help="timed requests per target in the latency comparison")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="enginesmith-serve-bench-") as tmp:
        folder = Path(tmp)
        samples.save(samples.mobilenet_v2_like(image_size=args.image_size), folder / "mobilenet_v2_like.onnx")
        mobilenet_path = es.build(folder / "mobilenet_v2_like.onnx", verify=False).save(folder / "mobilenet_v2_like.engine")
        samples.save(samples.tiny_mlp(), folder / "mlp.onnx")
        mlp_path = es.build(folder / "mlp.onnx", verify=False).save(folder / "mlp.engine")
        engine = es.load(mobilenet_path)
        name = engine.signature.input_names[0]
        x = np.random.default_rng(0).standard_normal((1, 3, args.image_size, args.image_size)).astype(np.float32)

        with ServerProcess(mobilenet_path, "m") as server:
            latency = low_load_latency(engine, server, x, args.rounds, args.runs)
        # the same on a tiny model: what the server itself costs per request, the engine's time being ~0
        mlp = es.load(mlp_path)
        with ServerProcess(mlp_path, "m") as server:
            latency_tiny = low_load_latency(mlp, server, np.ones((1, 16), np.float32), args.rounds, args.runs * 3)
        mlp.close()
        batched = served_throughput(mobilenet_path, engine, x, args.duration)
        unbatched = served_throughput(mobilenet_path, engine, x, args.duration, "--max-batch", "1")
        formed = max(1, round(batched["average_batch"] or 1))
        in_process = in_process_throughput(engine, x, formed, args.duration / 2)
        in_process_1 = in_process_throughput(engine, x, 1, args.duration / 2)
        engine.close()
        long = long_run(mlp_path, args.requests)

    rows = [
        ("low-load p50, in-process (MobileNetV2-like, batch 1)", f"{latency['p50_ms']['in-process']:.2f} ms"),
        ("low-load p50, HTTP binary", f"{latency['p50_ms']['http (binary)']:.2f} ms "
                                      f"(+{latency['overhead_ms']['http (binary)']:.2f} ms)"),
        ("low-load p50, HTTP binary (http.client)", f"{latency['p50_ms']['http (binary, http.client)']:.2f} ms "
                                                   f"(+{latency['overhead_ms']['http (binary, http.client)']:.2f} ms)"),
        ("low-load p50, gRPC", f"{latency['p50_ms']['grpc']:.2f} ms (+{latency['overhead_ms']['grpc']:.2f} ms)"),
        ("low-load p50, in-process (tiny MLP)", f"{latency_tiny['p50_ms']['in-process']:.3f} ms"),
        ("low-load p50, tiny MLP, HTTP / http.client / gRPC",
         f"+{latency_tiny['overhead_ms']['http (binary)']:.2f} ms / "
         f"+{latency_tiny['overhead_ms']['http (binary, http.client)']:.2f} ms / +{latency_tiny['overhead_ms']['grpc']:.2f} ms"),
        (f"{CLIENTS} clients, batching on", f"{batched['requests_per_s']:.1f} images/s, average batch "
                                           f"{batched['average_batch']:.1f}, p50 {batched['p50_ms']:.1f} ms"),
        (f"{CLIENTS} clients, batching off (--max-batch 1)", f"{unbatched['requests_per_s']:.1f} images/s, "
                                                            f"p50 {unbatched['p50_ms']:.1f} ms"),
        (f"in-process at batch {formed}", f"{in_process['items_per_s']:.1f} images/s"),
        ("in-process at batch 1", f"{in_process_1['items_per_s']:.1f} images/s"),
        (f"long run, MLP, {long['sent']:,} requests", f"{long['requests_per_s']:.0f} requests/s, {long['ok']:,} right, "
                                                      f"{long['wrong']} wrong, {long['failed']} failed"),
        ("long run, server RSS", f"{long['rss_mb']['first_tenth_median']:.1f} MB (first tenth) -> "
                                 f"{long['rss_mb']['last_tenth_median']:.1f} MB (last tenth), max {long['rss_mb']['max']:.1f} MB"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"batching: {batched['requests_per_s'] / unbatched['requests_per_s']:.2f}x the throughput without it; "
          f"served with batching is {batched['requests_per_s'] / in_process['items_per_s']:.0%} of in-process at batch {formed}")
    report = {
        "benchmark": "serve",
        "machine": machine({"clients": CLIENTS}),
        "args": {k: str(v) for k, v in vars(args).items()},
        "latency": latency,
        "latency_tiny_mlp": latency_tiny,
        "throughput": {"batching": batched, "no_batching": unbatched, "in_process_at_formed_batch": in_process,
                       "in_process_batch_1": in_process_1},
        "long_run": long,
        "table": dict(rows),
    }
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
