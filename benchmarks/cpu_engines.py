"""CPU engines vs a plain ONNX Runtime session, in one run, on models built in code.

For a MobileNetV2-like and a ResNet-50-like model (random weights) this builds an
enginesmith engine and compares, on the same inputs, in interleaved rounds:
  * engine        - ``engine.infer(feeds)`` on the engine loaded from its file, what users call
  * raw session   - the engine's own ``onnxruntime.InferenceSession.run`` called directly
                    (the Engine wrapper's overhead is engine / raw session)
  * plain session - ``onnxruntime.InferenceSession(model.onnx)`` with default options, what a
                    user writes by hand (the baseline)
p50 latency at batch 1 and 8, throughput, and the peak RSS (VmHWM) of a fresh process that
loads and runs the model each way. Each round times every target in a block, in a rotated
order; ratios are the median over rounds of the per-round median ratios, so drift and other
load on a shared machine hit both sides alike. Prints a table, writes JSON and a PNG per model,
and records the machine and its load (load average and the CPU share other processes used).

Targets (issue 2, 2-core machine): engine p50 <= 1.0x plain (aim 0.9x); wrapper overhead
over raw session.run <= 3% at batch 1 for ResNet-50-like; peak memory <= 1.2x plain.

    python benchmarks/cpu_engines.py [--rounds 12] [--runs 36] [--image-size 224] [--json benchmarks/results/cpu_engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

import enginesmith as es
from enginesmith import samples
from enginesmith.bench import LatencyStats, machine_facts, plot_results, write_atomic
from enginesmith.host import cpu_flags
from enginesmith.signature import random_inputs

MODELS = {
    "mobilenet_v2_like": samples.mobilenet_v2_like,
    "resnet50_like": samples.resnet50_like,
}
RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- shared helpers (also used by
# precision.py and keras_engines.py)


def interleaved(
    targets: Mapping[str, Callable[[dict[str, np.ndarray]], Any]],
    feeds: dict[str, np.ndarray],
    batch: int,
    *,
    rounds: int,
    runs: int,
    warmup: int = 2,
    pause_s: float = 0.05,
    min_block_s: float = 0.0,
) -> tuple[dict[str, LatencyStats], dict[str, list[float]]]:
    """Time every target ``runs`` times in total, split over ``rounds`` rounds.

    With ``min_block_s`` a block runs at least that long (its count raised from the target's warm-up
    latency): a 0.1 ms model gets hundreds of calls a block rather than ``runs / rounds``, whose few
    calls after the pause measured thread wake-ups and timer noise more than the model.

    In each round every target runs its share as one block; the order of the blocks is
    rotated from round to round. Each block starts after a short pause and one untimed call:
    ONNX Runtime's (and TensorFlow's) worker threads keep spinning for a while after a call,
    and on a 2-core machine the previous target's spinning threads would otherwise steal the
    cores from the next target's first calls (and its weights would be out of cache), which
    measures the interference between targets rather than either of them.
    Returns the statistics over all samples and, per target, the median latency (ms) of each
    round, from which per-round ratios are taken.
    """
    labels = list(targets)
    warm_s: dict[str, float] = {}
    for label in labels:
        for _ in range(warmup):
            start = time.perf_counter()
            targets[label](feeds)
            warm_s[label] = time.perf_counter() - start
    per_round_runs = [runs // rounds + (1 if k < runs % rounds else 0) for k in range(rounds)]
    samples_s: dict[str, list[float]] = {label: [] for label in labels}
    round_p50: dict[str, list[float]] = {label: [] for label in labels}
    for r, count in enumerate(per_round_runs):
        if count == 0:
            continue
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            fn = targets[label]
            time.sleep(pause_s)
            fn(feeds)
            times = []
            for _ in range(max(count, int(min_block_s / max(warm_s.get(label, 1.0), 1e-6)))):
                start = time.perf_counter()
                fn(feeds)
                times.append(time.perf_counter() - start)
            samples_s[label] += times
            round_p50[label].append(float(np.median(times)) * 1e3)
    stats = {label: LatencyStats.from_samples(label, batch, s) for label, s in samples_s.items()}
    return stats, round_p50


# A target timed in a process of its own: (module file, factory name, factory arguments); the factory returns
# the runner. Picklable, so the process can make the runner itself.
TargetSpec = tuple[str, str, tuple]


def _target_process(spec: TargetSpec, feeds: dict[str, np.ndarray], warmup: int, conn: Any) -> None:
    """Worker of :func:`interleaved_isolated`: make the runner, warm it, then time the blocks asked for."""
    import importlib

    try:
        path, factory, arguments = spec
        sys.path.insert(0, str(Path(path).parent))
        run = getattr(importlib.import_module(Path(path).stem), factory)(*arguments)
        warm_s = 1.0
        for _ in range(warmup):
            start = time.perf_counter()
            run(feeds)
            warm_s = time.perf_counter() - start
        conn.send(("ready", warm_s))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records the target as failed
        conn.send(("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"))
        return
    while True:
        count = conn.recv()
        if count is None:
            return
        run(feeds)  # untimed: wakes the runtime's threads after the pause
        times = []
        for _ in range(count):
            start = time.perf_counter()
            run(feeds)
            times.append(time.perf_counter() - start)
        conn.send(times)


def interleaved_isolated(
    specs: Mapping[str, TargetSpec],
    feeds: dict[str, np.ndarray],
    batch: int,
    *,
    rounds: int,
    runs: int,
    warmup: int = 2,
    pause_s: float = 0.05,
    min_block_s: float = 0.0,
) -> tuple[dict[str, LatencyStats], dict[str, list[float]], dict[str, str]]:
    """:func:`interleaved`, but every target in a process of its own, as one engine is deployed.

    In one process, runtimes share the cores' caches and their idle threads; ONNX Runtime engines on
    small corpus models ran 1.04-1.30x a plain ONNX Runtime session there, and OpenVINO loaded beside
    them was suspected. This times them apart: the parent hands out one block at a time, in the same
    rotated order, so only one process runs at once while the others wait on their pipe. Returns
    :func:`interleaved`'s two results and the targets that failed to start (label -> error), which are
    left out of the first two.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked copy of this process's runtimes and threads
    workers: dict[str, tuple[Any, Any, float]] = {}
    failed: dict[str, str] = {}
    try:
        for label, spec in specs.items():
            parent, child = context.Pipe()
            process = context.Process(target=_target_process, args=(spec, feeds, warmup, child), daemon=True)
            process.start()
            child.close()
            status, value = parent.recv() if parent.poll(600) else ("error", "did not start within 600 s")
            if status == "ready":
                workers[label] = (process, parent, value)
            else:
                failed[label] = value
                process.join(5)
        labels = list(workers)
        per_round_runs = [runs // rounds + (1 if k < runs % rounds else 0) for k in range(rounds)]
        samples_s: dict[str, list[float]] = {label: [] for label in labels}
        round_p50: dict[str, list[float]] = {label: [] for label in labels}
        for r, count in enumerate(per_round_runs):
            if count == 0 or not labels:
                continue
            shift = r % len(labels)
            for label in labels[shift:] + labels[:shift]:
                _, conn, warm_s = workers[label]
                time.sleep(pause_s)
                conn.send(max(count, int(min_block_s / max(warm_s, 1e-6))))
                times = conn.recv()
                samples_s[label] += times
                round_p50[label].append(float(np.median(times)) * 1e3)
    finally:
        for process, conn, _ in workers.values():
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(10)
            if process.is_alive():
                process.kill()
    stats = {label: LatencyStats.from_samples(label, batch, s) for label, s in samples_s.items()}
    return stats, round_p50, failed


def round_ratio(round_p50: Mapping[str, list[float]], num: str, den: str) -> dict[str, float]:
    """num/den p50 per round: the median over rounds, the smallest and largest round, and the
    ratio of the two targets' best rounds (least disturbed by other load)."""
    a, b = np.asarray(round_p50[num]), np.asarray(round_p50[den])
    ratios = a / b
    return {"median": float(np.median(ratios)), "min": float(ratios.min()), "max": float(ratios.max()),
            "best_round_ratio": float(a.min() / b.min()), "rounds": len(ratios)}


def wrapper_cost_ms(engine: es.Engine, feeds: dict[str, np.ndarray], repeats: int = 2000) -> float:
    """The Engine's own Python work per call (input checks and conversion), timed without inference."""
    from enginesmith.runtime.inputs import prepare_inputs

    flexible = engine.max_batch is not None
    start = time.perf_counter()
    for _ in range(repeats):
        prepare_inputs(engine.signature, feeds, batch_flexible=flexible)
    return (time.perf_counter() - start) / repeats * 1e3


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat; (0, 0) off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0, 0
    values = [int(v) for v in fields[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class LoadMonitor:
    """Load average at start and end, and the CPU share that *other* processes used meanwhile.

    ``other_cpu_share`` = (all busy CPU time - this process's and its children's CPU time)
    / (wall time x CPUs): 0 on an idle machine, 0.5 when another job kept one of two cores busy.
    """

    def __enter__(self) -> "LoadMonitor":
        self.load_start = os.getloadavg()
        self._busy, self._total = _cpu_jiffies()
        self._own = self._own_cpu()
        self._wall = time.perf_counter()
        return self

    @staticmethod
    def _own_cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc: object) -> None:
        busy, total = _cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self._wall
        ncpu = os.cpu_count() or 1
        own = self._own_cpu() - self._own
        others = max((busy - self._busy) / hz - own, 0.0)
        self.facts = {
            "loadavg_start": [round(v, 2) for v in self.load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "wall_s": round(wall, 1),
            "own_cpu_s": round(own, 1),
            "other_cpu_share": round(others / (wall * ncpu), 3) if total > self._total else None,
        }


def machine(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    import onnxruntime

    facts = {**machine_facts(), "cpu_flags": " ".join(cpu_flags()), "onnxruntime": onnxruntime.__version__,
             "enginesmith": es.__version__, "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]}
    return {**facts, **(extra or {})}


# --------------------------------------------------------------------------- peak memory

# Run in a fresh interpreter so each peak covers one way of running the model only. The peak
# is read from /proc/self/status (VmHWM, the high-water mark of this process's own address
# space): getrusage's ru_maxrss would also count the parent's RSS, which a child started with
# vfork/exec inherits as its starting high-water mark.
RSS_SCRIPT = """
import sys, time, numpy as np
mode, path, batch, runs, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
if mode == "engine":
    import enginesmith as es
    import onnxruntime  # imported lazily by es.load; imported here so the load time excludes it, as for plain
    before = hwm()
    start = time.perf_counter()
    engine = es.load(path)
    loaded = time.perf_counter() - start
    run = lambda: engine(image=x)
else:
    import onnxruntime as ort
    before = hwm()
    start = time.perf_counter()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    loaded = time.perf_counter() - start
    run = lambda: session.run(None, {"image": x})
for _ in range(runs):
    run()
print(before, hwm(), loaded)
"""


def peak_rss(mode: str, path: Path, batch: int, size: int, runs: int = 3) -> tuple[int, int, float]:
    """(high-water mark after imports, after load and runs, in bytes; seconds to load)."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, mode, str(path), str(batch), str(runs), str(size)],
        check=True, capture_output=True, text=True,
    )
    before, after, loaded = out.stdout.strip().splitlines()[-1].split()
    return int(before), int(after), float(loaded)


# --------------------------------------------------------------------------- the benchmark


def bench_model(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    size = args.image_size
    model = MODELS[name](image_size=size)
    model_path = workdir / f"{name}.onnx"
    onnx.save(model, model_path)
    engine_path = workdir / f"{name}.engine"
    start = time.perf_counter()
    es.build(model_path, output=engine_path)
    build_s = time.perf_counter() - start
    engine = es.load(engine_path)
    raw_session = engine._session._session  # the engine's onnxruntime.InferenceSession itself
    names = engine.signature.output_names
    import onnxruntime as ort

    plain_session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    targets = {
        "engine": engine.infer,
        "raw session": lambda feeds: raw_session.run(names, feeds),
        "plain session": lambda feeds: plain_session.run(None, feeds),
    }
    rows = []
    all_stats: list[LatencyStats] = []
    with LoadMonitor() as load:
        for batch in args.batches:
            feeds = random_inputs(engine.signature.inputs, batch=batch, seed=0)
            stats, round_p50 = interleaved(targets, feeds, batch, rounds=args.rounds, runs=args.runs)
            all_stats += stats.values()
            vs_plain = round_ratio(round_p50, "engine", "plain session")
            vs_raw = round_ratio(round_p50, "engine", "raw session")
            rows.append({
                "batch": batch,
                **{f"{label} p50 ms": s.p50_ms for label, s in stats.items()},
                **{f"{label} items/s": s.throughput for label, s in stats.items()},
                "engine / plain p50": vs_plain["median"],
                "engine / plain p50 range over rounds": [vs_plain["min"], vs_plain["max"]],
                "raw / plain p50": round_ratio(round_p50, "raw session", "plain session")["median"],
                "engine / plain best-round p50": vs_plain["best_round_ratio"],
                "wrapper overhead": vs_raw["median"] - 1.0,
                "wrapper overhead range over rounds": [vs_raw["min"] - 1.0, vs_raw["max"] - 1.0],
                # the input checks' cost timed alone, over the raw session's p50: the same overhead, without noise
                "wrapper cost ms (input checks alone)": wrapper_cost_ms(engine, feeds),
                "wrapper cost / raw p50": wrapper_cost_ms(engine, feeds) / stats["raw session"].p50_ms,
                "round p50 ms": round_p50,
                "stats": {label: vars(s) for label, s in stats.items()},
            })
        rss = {}
        for batch in args.batches:
            engine_before, engine_peak, engine_load = peak_rss("engine", engine_path, batch, size)
            plain_before, plain_peak, plain_load = peak_rss("plain", model_path, batch, size)
            rss[str(batch)] = {
                "engine_mb": engine_peak / 2**20, "plain_mb": plain_peak / 2**20,
                "ratio": engine_peak / plain_peak,
                "engine_after_imports_mb": engine_before / 2**20, "plain_after_imports_mb": plain_before / 2**20,
                "ratio_above_imports": (engine_peak - engine_before) / (plain_peak - plain_before),
                # es.load (checksums, platform check, no graph optimization) vs InferenceSession(model.onnx)
                "engine_load_s": engine_load, "plain_session_create_s": plain_load,
            }
    worst = max(rss.values(), key=lambda r: r["ratio"])
    if args.plot:
        plot_results(all_stats, args.json.with_name(f"{args.json.stem}_{name}.png"),
                     f"{name}, {size}x{size}: engine vs plain ONNX Runtime session")
    return {
        "model": name,
        "nodes": len(model.graph.node),
        "parameters": int(sum(onnx.numpy_helper.to_array(t).size for t in model.graph.initializer)),
        "engine_build_s": build_s,
        "engine_log": engine.manifest.build_log,
        "rows": rows,
        "peak_rss": rss,
        "peak_rss_engine_mb": worst["engine_mb"],
        "peak_rss_plain_mb": worst["plain_mb"],
        "peak_rss_ratio": worst["ratio"],
        "load": load.facts,
    }


def targets_met(results: list[dict]) -> dict[str, Any]:
    by_model = {r["model"]: r for r in results}
    out: dict[str, Any] = {}
    worst_vs_plain = max(row["engine / plain p50"] for r in results for row in r["rows"])
    out["engine p50 <= 1.0x plain (every model and batch)"] = {"value": worst_vs_plain, "met": worst_vs_plain <= 1.0}
    out["engine p50 <= 0.9x plain (aim)"] = {"value": worst_vs_plain, "met": worst_vs_plain <= 0.9}
    resnet = by_model.get("resnet50_like")
    b1 = next((row for row in resnet["rows"] if row["batch"] == 1), None) if resnet else None
    if b1 is not None:
        out["wrapper overhead <= 3% (resnet50_like, batch 1)"] = {"value": b1["wrapper overhead"],
                                                                 "met": b1["wrapper overhead"] <= 0.03}
    worst_rss = max(r["peak_rss_ratio"] for r in results)
    out["peak RSS <= 1.2x plain"] = {"value": worst_rss, "met": worst_rss <= 1.2}
    return out


def write_report(benchmark: str, args: argparse.Namespace, facts: dict, targets: dict, results: list) -> None:
    """Print the target verdicts and write the JSON report every benchmark script writes."""
    print("targets:")
    for what, verdict in targets.items():
        print(f"  {'MET ' if verdict['met'] else 'MISS'} {what}: {verdict['value']:.3f}")
    report = {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": facts,
        "rounds": args.rounds,
        "runs": args.runs,
        "image_size": args.image_size,
        "targets": targets,
        "results": results,
    }
    write_atomic(args.json, json.dumps(report, indent=2).encode())
    print(f"wrote {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=36, help="timed runs per target and batch, over all rounds")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds")
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1, 8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path, default=RESULTS / "cpu_engines.json")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args()
    facts = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="enginesmith-bench-") as tmp:
        for name in args.models.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr)
            results.append(bench_model(name, Path(tmp), args))
    print(f"machine: {facts['cpu']}, {facts['physical_cores']} cores ({facts['cpu_flags']}), "
          f"ONNX Runtime {facts['onnxruntime']}, Python {facts['python']}")
    header = (f"{'model':<19}{'batch':>6}{'engine ms':>11}{'raw ms':>9}{'plain ms':>10}{'eng/plain':>11}"
              f"{'best rnd':>10}{'overhead':>10}{'checks ms':>11}{'eng img/s':>11}{'plain img/s':>13}")
    print(header)
    print("-" * len(header))
    for res in results:
        for row in res["rows"]:
            print(f"{res['model']:<19}{row['batch']:>6}{row['engine p50 ms']:>11.2f}{row['raw session p50 ms']:>9.2f}"
                  f"{row['plain session p50 ms']:>10.2f}{row['engine / plain p50']:>10.3f}x{row['engine / plain best-round p50']:>9.3f}x"
                  f"{row['wrapper overhead']:>+10.2%}{row['wrapper cost ms (input checks alone)']:>11.4f}"
                  f"{row['engine items/s']:>11.1f}{row['plain session items/s']:>13.1f}")
        for batch, r in res["peak_rss"].items():
            print(f"{'':<19}peak RSS, batch {batch}: engine {r['engine_mb']:.0f} MB, plain {r['plain_mb']:.0f} MB "
                  f"({r['ratio']:.2f}x; above imports {r['ratio_above_imports']:.2f}x); load {r['engine_load_s']:.2f} s "
                  f"vs session creation {r['plain_session_create_s']:.2f} s")
        load = res["load"]
        print(f"{'':<19}load average {load['loadavg_start'][0]:.2f} -> {load['loadavg_end'][0]:.2f}, "
              f"other processes used {load['other_cpu_share'] or 0:.0%} of the CPUs")
    met = targets_met(results)
    write_report("cpu_engines", args, facts, met, results)


if __name__ == "__main__":
    main()
