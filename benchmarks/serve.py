"""What serving costs and what dynamic batching buys, against the same engine called in-process.

The server is ``enginesmith serve`` in a process of its own on 127.0.0.1 (stopped with SIGTERM,
and by its own ``--duration`` should this script die); clients are tritonclient in this process,
sending binary tensors.

1. Low-load latency, MobileNetV2-like (batch 1, 1x3x224x224 float32, binary tensors, one request
   at a time): p50 of the in-process ``engine(x)`` vs p50 through tritonclient.http,
   tritonclient.grpc and a minimal HTTP client (one sendmsg, one preallocated receive buffer), and
   a plain socket echo of the same byte counts, in interleaved rounds; each overhead is the median
   over rounds of (served p50 - in-process p50). The tritonclient.http overhead (issue 18's target:
   <= 1 ms) is split into the bytes' trip (echo floor), the server's own work (minimal client -
   floor) and tritonclient's extra (tritonclient - minimal client); tritonclient's encoding and
   decoding alone are timed in this process too. Also per target: the CPU each side used per
   request, and the served mean minus the server's own engine time for the same requests. The
   same on an I/O probe (MobileNetV2-like's tensors around next to no compute: what everything
   but the engine costs, blurred far less by the machine's load) and on a tiny MLP.
2. Throughput with 16 concurrent clients (tritonclient.http.aio, batch 1 each) for
   ``--duration`` seconds: the server with batching (defaults) and the same server with
   ``--max-batch 1``; the batch the batcher formed (from the server's own metrics), and the
   in-process throughput of the engine called at that batch.
3. A bounded run of ``--requests`` (default 100,000) requests on a small MLP engine, 16 clients,
   every answer checked against the in-process output; the server's RSS sampled every 0.5 s.

    PYTHONPATH=src python benchmarks/serve.py [--requests 100000] [--duration 10] [--rounds 10] [--runs 100]

With ``--device cuda`` the MobileNetV2-like engine (1. and 2.) is the torch backend's fp16 engine on the GPU,
compiled for batches 1, 2, 4, 8 and 16 (the server pads merged batches up to them); the MLP and the I/O probe
stay ONNX Runtime engines on the CPU. scripts/device_serve.sh runs it on the GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
from enginesmith.bench import write_atomic

sys.path.insert(0, str(Path(__file__).parent))
from cpu_engines import LoadMonitor, machine  # noqa: E402
from serve_latency import EchoFloor, RawHTTP, _free_port, client_costs, image_io_probe  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLIENTS = 16
TRUST = ("--trust-code",)  # the engines are built by this script; a torch engine's compiler cache needs the flag


# --------------------------------------------------------------------------- the server process


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

    def cpu_s(self) -> float:
        """CPU seconds the server process has used, all threads, user + system (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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

COMPUTE_US, EXECUTIONS = "nv_inference_compute_infer_duration_us", "nv_inference_exec_count"

def low_load_latency(engine: es.Engine, server: ServerProcess, x: np.ndarray, rounds: int, runs: int) -> dict:
    """In-process vs served, one request at a time, interleaved rounds, the same input everywhere.

    Targets: the engine in-process; tritonclient.http (binary) and tritonclient.grpc; the minimal
    HTTP client (RawHTTP); the echo floor (EchoFloor) for the same byte counts. Overheads are the
    median over rounds of (target's round p50 - in-process round p50), so a slow phase of the
    machine moves both sides of each difference.
    """
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
    raw = RawHTTP(server.http, name, x)
    raw()
    headers, body, head_bytes = raw.last_answer
    header_length = int(headers["inference-header-content-length"])
    got_raw = np.frombuffer(body[header_length:], np.float32).reshape(want.shape)
    got_http = http.infer("m", [http_input]).as_numpy(output)
    grpc_result = grpc.infer("m", [grpc_input])
    # The server's engine runs in another process: ONNX Runtime's reductions may sum in another order on another
    # thread schedule (equal to float32 rounding), and an fp16 CUDA engine's loaded copy may time cuDNN's
    # algorithms to other winners (equal to fp16 rounding: 1.0185 against 1.0215 seen on the H200).
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if engine.precision == "fp32" else {"rtol": 1e-2, "atol": 1e-2}
    for got in (got_raw, got_http, grpc_result.as_numpy(output)):
        np.testing.assert_allclose(got, want, **tolerance, err_msg="served outputs differ from in-process")
    answer_bytes = head_bytes + len(body)
    floor = EchoFloor(raw.request_bytes(), answer_bytes)

    targets = {
        "in-process": lambda: engine({name: x}),
        "http (tritonclient)": lambda: http.infer("m", [http_input]).as_numpy(output),
        "http (minimal client)": raw,
        "grpc (tritonclient)": lambda: grpc.infer("m", [grpc_input]).as_numpy(output),
        "tcp echo floor": floor,
    }
    samples_ms: dict[str, list[float]] = {label: [] for label in targets}
    per_round: dict[str, list[float]] = {label: [] for label in targets}
    # CPU seconds per target (this process: the engine in-process, else the client; the server's),
    # which the machine's load moves far less than wall time: the work each side does per request
    cpu_s = {label: {"here": 0.0, "server": 0.0} for label in targets}
    beyond_engine: dict[str, list[float]] = {label: [] for label in targets if "(" in label}
    per_block = max(runs // rounds, 3)
    server_cpu = server.cpu_s()
    with LoadMonitor() as load:
        for round_index in range(rounds):
            shift = round_index % len(targets)
            order = list(targets)[shift:] + list(targets)[:shift]
            for label in order:
                # ONNX Runtime's threads (here or in the server) spin for a while after a call: let them
                # settle so that one target's spinning does not slow the next one's block.
                time.sleep(0.3)
                targets[label]()  # one untimed call after switching
                block = []
                served = label in beyond_engine
                if served:
                    compute_us, executions = server.metric(COMPUTE_US), server.metric(EXECUTIONS)
                here, there = time.process_time(), server.cpu_s()
                for _ in range(per_block):
                    start = time.perf_counter()
                    targets[label]()
                    block.append((time.perf_counter() - start) * 1e3)
                cpu_s[label]["here"] += time.process_time() - here
                cpu_s[label]["server"] += server.cpu_s() - there
                if served:
                    # the server's own engine time for these very requests (its counters), so the
                    # engine's ups and downs under load leave the difference alone
                    engine_ms = (server.metric(COMPUTE_US) - compute_us) / 1e3 / (server.metric(EXECUTIONS) - executions)
                    beyond_engine[label].append(statistics.mean(block) - engine_ms)
                samples_ms[label] += block
                per_round[label].append(statistics.median(block))
    server_cpu = server.cpu_s() - server_cpu
    # LoadMonitor counts this process as its own, not the server (a child not yet waited for): take it out too
    load.facts["server_cpu_s"] = round(server_cpu, 1)
    if load.facts["other_cpu_share"] is not None:
        server_share = server_cpu / (load.facts["wall_s"] * (os.cpu_count() or 1))
        load.facts["other_cpu_share"] = round(max(load.facts["other_cpu_share"] - server_share, 0.0), 3)
    costs = client_costs(http_input, grpc_input, output, raw.last_answer, grpc_result.get_response().SerializeToString())
    floor.close()
    raw.close()
    http.close()
    grpc.close()

    def over(label: str, base: str = "in-process") -> float:
        return statistics.median(a - b for a, b in zip(per_round[label], per_round[base]))

    minimal, floor_ms = over("http (minimal client)"), statistics.median(per_round["tcp echo floor"])
    return {
        "p50_ms": {label: statistics.median(values) for label, values in samples_ms.items()},
        "overhead_ms": {label: over(label) for label in targets if label not in ("in-process", "tcp echo floor")},
        "round_p50_ms": per_round,
        # the whole served round trip above in-process, split: the bytes' trip (the echo floor), the
        # server's own work (minimal client's overhead - floor), tritonclient's extra (its overhead -
        # the minimal client's), of which encoding + decoding alone are client_cost_ms
        "split_ms": {
            "tcp_floor": floor_ms,
            "server_work": minimal - floor_ms,
            "tritonclient_http_extra": over("http (tritonclient)", "http (minimal client)"),
        },
        "client_cost_ms": costs,
        # per round: mean served latency - the server's mean engine call for the same requests
        "beyond_engine_ms": {label: statistics.median(values) for label, values in beyond_engine.items()},
        "cpu_ms_per_request": {label: {side: round(value / (per_block * rounds) * 1e3, 3) for side, value in sides.items()}
                               for label, sides in cpu_s.items() if label != "tcp echo floor"},
        "bytes": {"request": raw.request_bytes(), "answer": answer_bytes},
        "runs_per_target": per_block * rounds,
        "load": load.facts,
    }


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
    with ServerProcess(engine_path, "m", *TRUST, *flags) as server:
        asyncio.run(_clients(server.http, name, output, x, seconds=min(2.0, seconds)))  # warm up
        executions, items = server.metric("nv_inference_exec_count"), server.metric("nv_inference_count")
        with LoadMonitor() as load:
            result = asyncio.run(_clients(server.http, name, output, x, seconds=seconds))
        executions = server.metric("nv_inference_exec_count") - executions
        items = server.metric("nv_inference_count") - items
    return {**result, "average_batch": items / executions if executions else None, "load": load.facts}


def build_image_engine(onnx_path: Path, device: str) -> es.Engine:
    """The MobileNetV2-like engine: ONNX Runtime's default on the CPU; on CUDA the torch backend in fp16 with the
    batch sizes a 16-client batcher forms compiled ahead, in the mode gpu_zoo.py's engines use (the backend's
    CUDA default, max-autotune, tunes every convolution: over 6 minutes here)."""
    if device == "cpu":
        return es.build(onnx_path, verify=False)
    return es.build(onnx_path, backend="torch", precision="fp16", verify=False,
                    backend_options={"device": device, "batches": [1, 2, 4, 8, CLIENTS], "mode": "reduce-overhead"})


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

TARGET_MS = 1.0  # issue 18: served p50 - in-process p50 at low load
QUIET_SHARE = 0.3  # above this share of the CPUs used by other processes, the target is not judged


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def report_latency(args: argparse.Namespace, latency: dict, latency_tiny: dict, latency_probe: dict) -> None:
    rows = [*latency_rows("MobileNetV2-like", latency), *latency_rows("MobileNetV2-sized I/O probe", latency_probe),
            *latency_rows("tiny MLP", latency_tiny)]
    print_table(rows)
    report = {"benchmark": "serve (latency only)", "machine": machine({}), "args": {k: str(v) for k, v in vars(args).items()},
              "latency": latency, "latency_io_probe": latency_probe, "latency_tiny_mlp": latency_tiny, "table": dict(rows)}
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


def latency_rows(model: str, latency: dict) -> list[tuple[str, str]]:
    p50, over, split, cost = latency["p50_ms"], latency["overhead_ms"], latency["split_ms"], latency["client_cost_ms"]
    cpu, beyond = latency["cpu_ms_per_request"], latency["beyond_engine_ms"]
    http = over["http (tritonclient)"]
    load = latency["load"]
    if (load["other_cpu_share"] or 0) > QUIET_SHARE:  # the rounds swing by more than the target then
        verdict = f"not judged: other processes used {load['other_cpu_share']:.0%} of the CPUs"
    else:
        verdict = "met" if http <= TARGET_MS else "NOT met"
    return [
        (f"low-load p50, {model}, in-process", f"{p50['in-process']:.3f} ms (load average {load['loadavg_start'][0]:.1f}, "
                                               f"other processes used {load['other_cpu_share'] or 0:.0%} of the CPUs)"),
        (f"low-load p50, {model}, HTTP binary (tritonclient)",
         f"{p50['http (tritonclient)']:.3f} ms (+{http:.2f} ms; target <= +{TARGET_MS:g} ms {verdict})"),
        (f"  of which the bytes' round trip (echo floor, {latency['bytes']['request']:,} B / {latency['bytes']['answer']:,} B)",
         f"{split['tcp_floor']:.2f} ms"),
        ("  of which the server's own work", f"{split['server_work']:.2f} ms"),
        ("  of which tritonclient.http's extra over a minimal client",
         f"{split['tritonclient_http_extra']:.2f} ms (encode {cost['http_encode']:.3f} + decode {cost['http_decode']:.3f} ms "
         "alone; the rest is its HTTP client, geventhttpclient)"),
        ("  served mean - the server's own engine time, same requests: HTTP tritonclient / minimal / gRPC",
         f"{beyond['http (tritonclient)']:.2f} / {beyond['http (minimal client)']:.2f} / {beyond['grpc (tritonclient)']:.2f} ms"),
        (f"  CPU per request, {model}: in-process engine / server (HTTP) / tritonclient.http",
         f"{cpu['in-process']['here']:.2f} / {cpu['http (tritonclient)']['server']:.2f} / "
         f"{cpu['http (tritonclient)']['here']:.2f} ms (minimal client: server {cpu['http (minimal client)']['server']:.2f}, "
         f"client {cpu['http (minimal client)']['here']:.2f} ms)"),
        (f"low-load p50, {model}, HTTP binary (minimal client)",
         f"{p50['http (minimal client)']:.3f} ms (+{over['http (minimal client)']:.2f} ms)"),
        (f"low-load p50, {model}, gRPC (tritonclient)",
         f"{p50['grpc (tritonclient)']:.3f} ms (+{over['grpc (tritonclient)']:.2f} ms; encode {cost['grpc_encode']:.3f} + "
         f"decode {cost['grpc_decode']:.3f} ms)"),
    ]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests in the long run (3.)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput measurement (2.)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the latency comparison (1.)")
    parser.add_argument("--runs", type=int, default=100, help="timed requests per target in the latency comparison")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the MobileNetV2-like engine on the GPU (torch backend, fp16)")
    parser.add_argument("--latency-only", action="store_true", help="only the low-load latency comparison (1.)")
    parser.add_argument("--json", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="enginesmith-serve-bench-") as tmp:
        folder = Path(tmp)
        samples.save(samples.mobilenet_v2_like(image_size=args.image_size), folder / "mobilenet_v2_like.onnx")
        mobilenet_path = build_image_engine(folder / "mobilenet_v2_like.onnx", args.device).save(folder / "mobilenet_v2_like.engine")
        samples.save(samples.tiny_mlp(), folder / "mlp.onnx")
        # the probes of the server's own cost run on ONNX Runtime everywhere (on a GPU machine
        # the automatic choice is the torch backend, whose engines need trust and minutes of compiling)
        mlp_path = es.build(folder / "mlp.onnx", backend="onnxruntime", verify=False).save(folder / "mlp.engine")
        engine = es.load(mobilenet_path, trust_code=True)  # built just now, here: a torch engine's cache is ours
        x = np.random.default_rng(0).standard_normal((1, 3, args.image_size, args.image_size)).astype(np.float32)

        with ServerProcess(mobilenet_path, "m", *TRUST) as server:
            latency = low_load_latency(engine, server, x, args.rounds, args.runs)
        # the same on a tiny model: what the server itself costs per request, the engine's time being ~0
        mlp = es.load(mlp_path)
        with ServerProcess(mlp_path, "m") as server:
            latency_tiny = low_load_latency(mlp, server, np.ones((1, 16), np.float32), args.rounds, args.runs * 3)
        mlp.close()
        # MobileNetV2-sized tensors, engine ~0: the I/O and protocol share of the MobileNetV2 overhead,
        # which the machine's load blurs far less than the real engine's milliseconds
        samples.save(image_io_probe(args.image_size), folder / "probe.onnx")
        probe_path = es.build(folder / "probe.onnx", backend="onnxruntime", verify=False).save(folder / "probe.engine")
        probe = es.load(probe_path)
        with ServerProcess(probe_path, "m") as server:
            latency_probe = low_load_latency(probe, server, x, args.rounds, args.runs * 3)
        probe.close()
        if args.latency_only:
            engine.close()
            report_latency(args, latency, latency_tiny, latency_probe)
            return
        batched = served_throughput(mobilenet_path, engine, x, args.duration)
        unbatched = served_throughput(mobilenet_path, engine, x, args.duration, "--max-batch", "1")
        formed = max(1, round(batched["average_batch"] or 1))
        # An engine compiled for fixed sizes runs the size the server pads up to (every item a real one here,
        # so the in-process figure is the upper bound the served one is held to).
        formed = next((size for size in engine.compiled_batches if size >= formed), formed)
        in_process = in_process_throughput(engine, x, formed, args.duration / 2)
        in_process_1 = in_process_throughput(engine, x, 1, args.duration / 2)
        engine.close()
        long = long_run(mlp_path, args.requests)

    rows = [
        *latency_rows("MobileNetV2-like", latency),
        *latency_rows("MobileNetV2-sized I/O probe", latency_probe),
        *latency_rows("tiny MLP", latency_tiny),
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
    gain, share = batched["requests_per_s"] / unbatched["requests_per_s"], batched["requests_per_s"] / in_process["items_per_s"]
    rows.append(("batching: with / without; served with it / in-process at the batch formed",
                 f"{gain:.2f}x (target >= 1.5x), {share:.0%} (target >= 80%); in-process, batch {formed} gives "
                 f"{in_process['items_per_s'] / in_process_1['items_per_s']:.2f}x batch 1 now"))
    print_table(rows)
    report = {
        "benchmark": "serve",
        "machine": machine({"clients": CLIENTS}),
        "args": {k: str(v) for k, v in vars(args).items()},
        "latency": latency,
        "latency_io_probe": latency_probe,
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
