"""Ray Serve scaling: one replica against two, on this machine's cores or on GPUs.

A local Ray instance is started here; each configuration is ``enginesmith serve ENGINE --ray
--address ADDR --replicas N`` in a process of its own (the protocol front end), and the engine runs
in N Ray Serve replicas. Two ways in, each measured:

- ``http``: CLIENTS concurrent tritonclient.http.aio clients (binary tensors) against the front
  end, the whole served path;
- ``handle``: the front end's own dispatcher driven from this process (``ray_backend.deploy``, the
  same DeploymentHandle calls, retries and deadlines, without HTTP): what the replicas deliver when
  the front end is not the limit.

Each (mode, replicas) pair is measured ``--rounds`` times for ``--duration`` seconds, the two
replica counts interleaved; the table shows the median throughput (items/s) and the ratio two/one.

CPU (default): a MobileNetV2-like model built with one intra-op thread, so one engine call keeps
one core busy, one CPU reserved per replica, batch 1 per request. The issue's target: two replicas
>= 1.6x one on this machine.

GPU: ``--engine X --gpus 2``: replicas 1 and 2 with one GPU each (``--replica-gpus 1``), requests of
``--batch`` items (128 by default with --gpus); the engine is any CUDA engine (the torch backend's
ResNet-50, ONNX Runtime with the CUDA provider). Target: two GPUs >= 1.8x one.

    PYTHONPATH=src python benchmarks/ray_serve.py                       # CPU, ray_serve_cpu.json
    PYTHONPATH=src python benchmarks/ray_serve.py --engine r50.engine --gpus 2 --trust-code
    PYTHONPATH=src python benchmarks/ray_serve.py --engine r50.engine --gpus 2 --dry-run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import enginesmith as es  # noqa: E402
from enginesmith import samples  # noqa: E402
from enginesmith.bench import write_atomic  # noqa: E402
from enginesmith.serve.protocol import datatype_of  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cpu_engines import LoadMonitor, machine  # noqa: E402
from serve import ServerProcess  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build_cpu_engine(folder: Path, image_size: int) -> Path:
    """MobileNetV2-like with one intra-op thread: one call keeps one core busy."""
    samples.save(samples.mobilenet_v2_like(image_size=image_size), folder / "mobilenet_v2_like.onnx")
    return es.build(folder / "mobilenet_v2_like.onnx", backend="onnxruntime", threads=1, verify=False).save(
        folder / "mobilenet_v2_like.engine")


def build_real_engine(folder: Path, key: str) -> Path:
    """A detector shipped in a PyPI wheel (tests/vision_models.py: sha256-checked, cached), one intra-op thread."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from vision_models import fetch_real_detector

    return es.build(fetch_real_detector(key), backend="onnxruntime", threads=1, verify=False).save(folder / f"{key}.engine")


def zoo_model(model_id: str) -> Any:
    """A model of the real-model corpus (benchmarks/zoo/models.toml) with one input: what --zoo serves."""
    import zoo_corpus

    models = {m.id: m for m in zoo_corpus.load_manifest()}
    if model_id not in models:
        raise SystemExit(f"--zoo: no model '{model_id}' in the corpus; its ids: {', '.join(sorted(models))}")
    model = models[model_id]
    if len(model.inputs) != 1:
        raise SystemExit(f"--zoo {model_id}: it has {len(model.inputs)} inputs; this benchmark sends one tensor")
    return model


def build_zoo_engine(folder: Path, model_id: str) -> Path:
    """A corpus model (downloaded once into the zoo cache, sha256-checked), one intra-op thread, its manifest's
    input shapes."""
    import zoo_corpus
    from cpu_backends_zoo import import_options

    model = zoo_model(model_id)
    source = zoo_corpus.fetch_model(model, zoo_corpus.DEFAULT_CACHE)
    return es.build(source, backend="onnxruntime", threads=1, verify=False,
                    import_options=import_options(model.flags)).save(folder / f"{model_id}.engine")


def example_input(engine_path: Path, batch: int, image_size: int, zoo: str | None = None) -> tuple[str, str, np.ndarray]:
    """(input name, output name, a batch) from the engine's signature: named dims get ``image_size``; with
    ``zoo``, the corpus manifest's seeded sample of that model, repeated to ``batch``."""
    info = es.info(engine_path)
    signature = info["signature"]
    first = signature["inputs"][0]
    if zoo:
        sample = next(iter(zoo_model(zoo).sample(seed=0).values()))
        return first["name"], signature["outputs"][0]["name"], np.repeat(sample, batch, axis=0)
    shape = [batch if i == 0 else (d if isinstance(d, int) else image_size) for i, d in enumerate(first["shape"])]
    dtype = np.dtype(first.get("dtype", "float32"))
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return first["name"], signature["outputs"][0]["name"], x


async def closed_loop(call: Callable[[], Awaitable[Any]], items_per_call: int, clients: int, seconds: float) -> dict:
    """``clients`` loops each awaiting ``call`` back to back for ``seconds``: answers, failures, items/s."""
    counts = {"ok": 0, "failed": 0}
    stop_at = time.perf_counter() + seconds

    async def one_client() -> None:
        while time.perf_counter() < stop_at:
            try:
                await call()
                counts["ok"] += 1
            except Exception:  # noqa: BLE001 - counted, the run goes on
                counts["failed"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - started
    return {**counts, "seconds": wall, "items_per_s": counts["ok"] * items_per_call / wall}


async def http_clients(port: int, input_name: str, output: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    import tritonclient.http.aio as aioclient

    client = aioclient.InferenceServerClient(f"127.0.0.1:{port}", conn_limit=clients * 2, conn_timeout=600)
    given = aioclient.InferInput(input_name, list(x.shape), datatype_of(x.dtype.name))
    given.set_data_from_numpy(x, binary_data=True)
    wanted = [aioclient.InferRequestedOutput(output, binary_data=True)]
    try:
        return await closed_loop(lambda: client.infer("m", [given], outputs=wanted), x.shape[0], clients, seconds)
    finally:
        await client.close()


async def handle_clients(dispatcher: Any, input_name: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    return await closed_loop(lambda: dispatcher.run({input_name: x}, None), x.shape[0], clients, seconds)


def replica_pids(app_prefix: str = "enginesmith-m-") -> list[int]:
    """The process ids of the replicas serving model "m" (asked through the deployment's handle)."""
    from ray import serve

    pids: set[int] = set()
    for app in (name for name in serve.status().applications if name.startswith(app_prefix)):
        handle = serve.get_app_handle(app).options(method_name="describe")
        pids |= {handle.remote().result(timeout_s=60)["pid"] for _ in range(16)}
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (/proc/PID/stat; Linux)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
    return total / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """CPU seconds per wall second that the given processes got during a ``with`` block."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def __enter__(self) -> "CpuShare":
        self._cpu, self._wall = cpu_seconds(self.pids), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cores = round((cpu_seconds(self.pids) - self._cpu) / (time.perf_counter() - self._wall), 2)


def server_flags(args: argparse.Namespace, address: str, replicas: int, x: np.ndarray) -> list[str]:
    flags = ["--ray", "--address", address, "--replicas", str(replicas), "--replica-cpus", str(args.replica_cpus),
             "--max-request-bytes", str(max(64 << 20, 2 * x.nbytes + (1 << 20))), "--log-every", "3600"]
    if args.gpus:
        flags += ["--replica-gpus", "1"]
    if args.trust_code:
        flags.append("--trust-code")
    return flags


def in_process(engine_path: Path, input_name: str, x: np.ndarray, seconds: float, trust_code: bool) -> dict:
    engine = es.load(engine_path, trust_code=trust_code)
    engine({input_name: x})
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        engine({input_name: x})
        times.append(time.perf_counter() - start)
    engine.close()
    return {"p50_ms": statistics.median(times) * 1e3, "items_per_s": x.shape[0] / statistics.median(times)}


def measure(args: argparse.Namespace, engine_path: Path, address: str) -> dict:
    from enginesmith.serve.ray_backend import RayOptions, deploy
    from enginesmith.serve.server import ServeOptions, batching_for

    input_name, output, x = example_input(engine_path, args.batch, args.image_size, args.zoo)
    runs: dict[str, dict[int, list[dict]]] = {mode: {1: [], 2: []} for mode in args.modes}
    for mode in args.modes:
        for round_index in range(args.rounds):
            order = (1, 2) if round_index % 2 == 0 else (2, 1)
            for replicas in order:
                print(f"  {mode}, {replicas} replica(s), round {round_index + 1}/{args.rounds}", flush=True)
                if mode == "http":
                    with ServerProcess(engine_path, "m", *server_flags(args, address, replicas, x)) as server:
                        asyncio.run(http_clients(server.http, input_name, output, x, args.clients, args.warmup))
                        replicas_cpu, front_cpu = CpuShare(replica_pids()), CpuShare([server.process.pid])
                        with LoadMonitor() as load, replicas_cpu, front_cpu:
                            result = asyncio.run(http_clients(server.http, input_name, output, x, args.clients,
                                                              args.duration))
                        result["cores_used"] = {"replicas": replicas_cpu.cores, "front_end": front_cpu.cores}
                else:
                    options = RayOptions(address=address, replicas=replicas, cpus_per_replica=args.replica_cpus,
                                         gpus_per_replica=1.0 if args.gpus else None)
                    settings = ServeOptions(http_port=0, grpc_port=0, metrics_port=0, ray=options)
                    served, deployments = deploy([("m", engine_path)], lambda e: batching_for(e, settings), options,
                                                 None, args.trust_code, None)
                    try:
                        dispatcher = served[0].batcher
                        pids = replica_pids()

                        async def drive() -> dict:
                            await handle_clients(dispatcher, input_name, x, args.clients, args.warmup)
                            replicas_cpu, own_cpu = CpuShare(pids), CpuShare([os.getpid()])
                            with LoadMonitor() as load, replicas_cpu, own_cpu:
                                outcome = await handle_clients(dispatcher, input_name, x, args.clients, args.duration)
                            return {**outcome, "load": load.facts,
                                    "cores_used": {"replicas": replicas_cpu.cores, "benchmark_process": own_cpu.cores}}

                        result = asyncio.run(drive())
                        load_facts = result.pop("load")
                    finally:
                        deployments.close()
                if mode == "http":
                    load_facts = load.facts
                runs[mode][replicas].append({**result, "load": load_facts})
                print(f"    {result['items_per_s']:.1f} items/s ({result['ok']} requests, {result['failed']} failed; "
                      f"cores used {result['cores_used']})", flush=True)
    summary = {}
    for mode, by_replicas in runs.items():
        one = statistics.median(r["items_per_s"] for r in by_replicas[1])
        two = statistics.median(r["items_per_s"] for r in by_replicas[2])
        cores = {n: statistics.median(r["cores_used"]["replicas"] for r in by_replicas[n]) for n in (1, 2)}
        summary[mode] = {"one_replica_items_per_s": one, "two_replicas_items_per_s": two,
                         "speedup": two / one if one else None,
                         "replica_cores_used": {"one_replica": cores[1], "two_replicas": cores[2]}}
    return {"input": {"name": input_name, "shape": list(x.shape), "dtype": str(x.dtype)}, "runs": runs,
            "summary": summary}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--engine", type=Path, help="engine to serve (default: a MobileNetV2-like, one thread, built here)")
    parser.add_argument("--real", metavar="KEY", help="serve a real model instead, one thread: nudenet_yolov8n_320 (the "
                        "YOLOv8n of the nudenet wheel, ~25 ms a call here at --image-size 320)")
    parser.add_argument("--zoo", metavar="ID", help="serve a model of the real-model corpus instead, one thread, with "
                        "one input (e.g. basic_pitch_onnx: Spotify's note transcriber, 54 ms a call, 175 KB in)")
    parser.add_argument("--gpus", type=int, default=0, help="GPU mode: replicas with one GPU each (needs 2 GPUs)")
    parser.add_argument("--batch", type=int, help="items per request (default 1 on CPU, 128 with --gpus)")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 8 on CPU, 6 with --gpus)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of requests before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per (mode, replicas), interleaved")
    parser.add_argument("--modes", default="http,handle", help="comma list of http, handle")
    parser.add_argument("--image-size", type=int, default=224, help="size of named image dims (and of the CPU model)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    parser.add_argument("--trust-code", action="store_true", help="the engine's payload runs code (torch backend)")
    parser.add_argument("--json", type=Path, help="default: results/ray_serve_cpu.json, ray_serve_gpu.json with --gpus")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; start nothing")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"http", "handle"}:
        parser.error("--modes takes http and/or handle")
    if args.gpus and args.gpus < 2:
        parser.error("--gpus compares one GPU with two: give --gpus 2")
    if args.gpus and args.engine is None:
        parser.error("--gpus needs --engine: a CUDA engine (torch backend ResNet-50, or ONNX Runtime with CUDA)")
    if sum(x is not None for x in (args.engine, args.real, args.zoo)) > 1:
        parser.error("give one of --engine, --real and --zoo")
    if args.engine is not None and not args.engine.is_file():
        parser.error(f"no engine file at {args.engine}")
    args.batch = args.batch or (128 if args.gpus else 1)
    args.clients = args.clients or (6 if args.gpus else 8)
    args.json = args.json or RESULTS / ("ray_serve_gpu.json" if args.gpus else "ray_serve_cpu.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    named = args.real or args.zoo
    what = args.engine or (f"{named} (1 thread)" if named else "MobileNetV2-like (built here, 1 thread)")
    plan = (f"replicas 1 vs 2 ({'1 GPU' if args.gpus else f'{args.replica_cpus:g} CPU'} each), modes {', '.join(args.modes)}, "
            f"{args.clients} clients x batch {args.batch}, {args.rounds} rounds x {args.duration:g} s, "
            f"engine {what} "
            f"-> {args.json}")
    print(plan)
    if args.dry_run:
        if args.engine is not None:
            name, _, x = example_input(args.engine, args.batch, args.image_size)
            print(f"input {name}{list(x.shape)} {x.dtype}; backend {es.info(args.engine)['backend']}")
        return
    from enginesmith.cluster import connect, disconnect

    with tempfile.TemporaryDirectory(prefix="enginesmith-ray-bench-") as tmp:
        if args.engine is not None:
            engine_path = args.engine
        elif args.real or args.zoo:
            engine_path = build_real_engine(Path(tmp), args.real) if args.real else build_zoo_engine(Path(tmp), args.zoo)
        else:
            engine_path = build_cpu_engine(Path(tmp), args.image_size)
        facts = machine({"ray": __import__("ray").__version__})
        session = connect(None, num_cpus=os.cpu_count())
        try:
            if args.gpus and session.gpus < 2:
                raise SystemExit(f"the local Ray instance sees {session.gpus} GPUs; --gpus needs 2")
            input_name, _, x = example_input(engine_path, args.batch, args.image_size, args.zoo)
            baseline = None if args.gpus else in_process(engine_path, input_name, x, 3.0, args.trust_code)
            results = measure(args, engine_path, session.address)
        finally:
            disconnect(session)
    target = 1.8 if args.gpus else 1.6
    report = {"benchmark": "ray_serve", "plan": plan, "machine": facts, "target_speedup": target,
              "note": "load.other_cpu_share counts the replicas and the front end as 'other' (they are not "
                      "children of this process); cores_used is the CPU seconds per second the replica processes "
                      "(and the front end, or this process in handle mode) got, from /proc",
              "in_process_one_thread": baseline, **results}
    print(f"\n{'mode':8} {'1 replica':>14} {'2 replicas':>14} {'speedup':>8}  {'replica cores used (1 / 2)':>28}"
          f"  (target >= {target}x)")
    for mode, row in results["summary"].items():
        used = row["replica_cores_used"]
        print(f"{mode:8} {row['one_replica_items_per_s']:>10.1f}/s   {row['two_replicas_items_per_s']:>10.1f}/s "
              f"{row['speedup']:>7.2f}x  {used['one_replica']:>13.2f} / {used['two_replicas']:.2f}")
    if baseline:
        print(f"in-process, one call at a time: {baseline['items_per_s']:.1f} items/s (p50 {baseline['p50_ms']:.1f} ms)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
