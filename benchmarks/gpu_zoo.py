"""Real architectures through the PyTorch backend (issue 15): torchvision, a YOLOv8-like detector, BERT encoders.

Per model, in one process on one GPU, with seeded random weights:

- eager fp16 (channels-last for CNNs), the baseline a PyTorch user runs by hand;
- ``torch.compile`` fp16 with ``--baseline-mode`` (default ``reduce-overhead``: Inductor kernels and CUDA
  graphs without autotuning, so every model compiles in under a minute; ``max-autotune`` costs minutes per
  model and shape, too much for 10-minute device calls, pass it for a model at a time);
- the enginesmith engine built from the module (``torch.export`` directly) and from its ONNX export
  (``backend_options source="onnx"``: PyTorch -> ONNX -> onnx2torch -> PyTorch), both fp16 with the engine
  mode ``--mode`` (default ``reduce-overhead``, the same compiler work as the baseline, so the comparison
  is of what each path feeds Inductor), compiled for batch 1 and the large batch;

at batch 1 and a large batch (CNNs 128, ViT 64, transformers 32 at sequence 128; 8 with ``--quick``):
median latency (CUDA events) and throughput; accuracy vs fp32 eager (worst relative L2 and per-row cosine over the
outputs; for transformers the table's cosine is the pooled output's; random weights are made non-degenerate
first: BatchNorm statistics measured, zero-initialised heads filled; with ``--train-steps N`` the vision models are
instead trained N steps on a synthetic task and measured on its images, ``zoo_training.py``); cold build time, and
the warm load time of the saved engine in a fresh process with empty compiler cache folders.

    python benchmarks/gpu_zoo.py run --out $OUT/zoo --models resnet50,bert_base --deadline-s 520
    python benchmarks/gpu_zoo.py table $OUT/zoo            # the table again from the JSON files
    python benchmarks/gpu_zoo.py run ... --profile           # also each variant's GPU time per kernel ("profile")
    python benchmarks/gpu_zoo.py run --out /tmp/zoo --models yolo_tiny --device cpu --quick   # CPU dry run

The architectures and their inputs are in ``gpu_zoo_models.py``. ``run`` starts one process per model (``one``), as many at once as there are visible GPUs (each pinned to
one with CUDA_VISIBLE_DEVICES), writes ``<model>.json`` per model as it finishes and skips the models
that would start after ``--deadline-s``. scripts/gpu_zoo.sh is the plan for the GPU machine.
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
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_training  # noqa: E402
from gpu import environment, kernel_profile, rel_l2, time_cuda, time_host  # noqa: E402  (benchmarks/gpu.py: shared timing helpers)
from gpu_zoo_models import DEFAULT_MODELS, MODELS, model_inputs, non_degenerate  # noqa: E402  (the architectures)


# --------------------------------------------------------------------------- one model


def flat_outputs(result: Any) -> list:
    from torch.utils import _pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(result) if hasattr(leaf, "dtype")]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)))


def accuracy(got: list, want: list, kind: str) -> dict[str, float]:
    """Worst relative L2 and worst per-row cosine over the outputs (NaN against a reference that is all zeros or
    not finite: such a reference measures nothing, and rel L2 would read 0.0 or 1.0 whatever the engine did)."""
    got = [np.asarray(g, np.float32) for g in got]
    want = [np.asarray(w, np.float32) for w in want]
    if any(not np.all(np.isfinite(w)) or not np.any(w) for w in want):
        return {"rel_l2": float("nan"), "cosine": float("nan"), "degenerate_reference": True}
    result = {"rel_l2": max(rel_l2(g, w) for g, w in zip(got, want)),
              "cosine": min(cosine(g, w) if g.ndim else float(np.isclose(g, w)) for g, w in zip(got, want))}
    if kind == "text" and len(got) > 1:
        result["pooled_cosine"] = cosine(got[1], want[1])
    return result


def warm_load_seconds(path: Path, device: str) -> dict[str, Any]:
    """Load the engine in a fresh process with empty Inductor/Triton cache folders (the cache the engine carries is all)."""
    # Besides the seconds: Inductor's graph-cache hits and misses, how many Triton kernels the load benchmarked
    # again (none when the engine's autotuning results were found) and where Python's bytecode cache was.
    script = ("import json, sys, time\nt0 = time.perf_counter()\nimport torch, enginesmith as es\n"
              "from torch._dynamo.utils import counters\nfrom torch._inductor.runtime import triton_heuristics as th\n"
              "bench = []\nplain = th.CachingAutotuner.benchmark_all_configs\n"
              "th.CachingAutotuner.benchmark_all_configs = lambda self, *a, **k: bench.append(1) or plain(self, *a, **k)\n"
              "t = time.perf_counter()\nprint('IMPORT', t - t0)\n"
              "engine = es.load(sys.argv[1], trust_code=True)\nprint('LOAD', time.perf_counter() - t)\n"
              "print('COUNTS', json.dumps({'fx_hits': counters['inductor']['fxgraph_cache_hit'],\n"
              "      'fx_misses': counters['inductor']['fxgraph_cache_miss'], 'kernels_benchmarked': len(bench),\n"
              "      'pycache_prefix': sys.pycache_prefix}))\n"
              "print('STEPS', json.dumps(getattr(engine._session, 'load_steps', {})))\n"
              "print('BREAKDOWN', json.dumps(getattr(engine._session, 'load_breakdown', {})))\n")
    with tempfile.TemporaryDirectory(prefix="zoo-cache-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "TRITON_CACHE_DIR": f"{tmp}/triton"}
        done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, timeout=300)
    found: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        if line.startswith("LOAD "):
            found["warm_load_s"] = round(float(line.split()[1]), 2)
        elif line.startswith("IMPORT "):
            found["import_s"] = round(float(line.split()[1]), 2)  # torch + enginesmith, before the load timed above
        elif line.startswith("STEPS "):
            found["load_steps"] = json.loads(line[6:])
        elif line.startswith("COUNTS "):
            found["load_counts"] = json.loads(line[7:])
        elif line.startswith("BREAKDOWN "):  # each compile_batch_N as Dynamo tracing, Inductor, first calls
            found["load_breakdown"] = json.loads(line[10:])
    if "warm_load_s" in found:
        return found
    return {"warm_load_error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}


def run_one(name: str, args: argparse.Namespace, save: Callable[[dict], None] = lambda record: None) -> dict[str, Any]:
    """One model's measurements; ``save`` is called with the record so far after each stage (a deadline may stop us)."""
    import torch

    import enginesmith as es
    from enginesmith.importers import ImportOptions

    spec = MODELS[name]
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    precision = "fp16" if cuda else "fp32"
    half = torch.float16 if cuda else torch.float32
    large = min(spec.large_batch, 8) if args.quick else spec.large_batch
    batches = [1, large]
    runs = 20 if args.quick else args.runs
    torch.manual_seed(0)
    record: dict[str, Any] = {"model": name, "kind": spec.kind, "device": device, "precision": precision,
                              "batches": batches, "mode": args.mode, "baseline_mode": args.baseline_mode, "rows": [],
                              "builds": {}}
    protos = None
    if args.train_steps and spec.kind == "vision":  # trained-like weights, measured on the task's images
        protos = zoo_training.prototypes(spec.image_size)
        module = spec.make()
        record["training"] = zoo_training.train_briefly(module, protos, args.train_steps, device,
                                                        first_output=lambda result: flat_outputs(result)[0])
        protos = protos[:record["training"]["classes"]]
        print(f"{name}: trained {record['training']}", flush=True)
        save(record)
    else:
        module = non_degenerate(spec.make(), model_inputs(spec, 8, seed=99))
    timer = time_cuda if cuda else time_host
    if cuda:
        torch.backends.cudnn.benchmark = True
    feeds = {b: model_inputs(spec, b, seed=b, protos=protos) for b in batches}

    def tensors(batch: int, dtype=None) -> dict[str, Any]:
        out = {}
        for key, value in feeds[batch].items():
            t = torch.from_numpy(value).to(device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
                if spec.kind == "vision" and cuda:
                    t = t.contiguous(memory_format=torch.channels_last)
            out[key] = t
        return out

    reference = {}
    fp32 = module.to(device)
    with torch.no_grad():
        for b in batches:
            reference[b] = [o.float().cpu().numpy() for o in flat_outputs(fp32(**tensors(b)))]
    fp32.cpu()

    eager = __import__("copy").deepcopy(module).to(device=device, dtype=half)
    if spec.kind == "vision" and cuda:
        eager = eager.to(memory_format=torch.channels_last)
    variants: dict[str, Callable[[dict], list]] = {}

    def eager_call(feeds_: dict) -> list:
        with torch.no_grad():
            return flat_outputs(eager(**feeds_))

    variants["eager " + precision] = eager_call
    baseline = f"torch.compile {args.baseline_mode} {precision}"
    if cuda and args.baseline_mode != "none":
        compiled = torch.compile(eager, mode=args.baseline_mode)

        def compiled_call(feeds_: dict) -> list:
            with torch.no_grad():
                return flat_outputs(compiled(**feeds_))

        variants[baseline] = compiled_call

    def compile_baseline(b: int) -> None:
        """Compile the baseline (two calls) at batch b once; the time goes into the record per batch and in all."""
        if baseline not in variants:
            return
        build = record["builds"].setdefault("torch.compile", {"compile_s": 0.0, "compile_s_per_batch": {}})
        if str(b) in build["compile_s_per_batch"]:
            return
        started = time.perf_counter()
        try:
            variants[baseline](tensors(b, half))
            variants[baseline](tensors(b, half))
        except Exception as exc:  # noqa: BLE001 - a failing baseline is a result too
            build["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            variants.pop(baseline)
            return
        build["compile_s_per_batch"][str(b)] = round(time.perf_counter() - started, 1)
        build["compile_s"] = round(sum(build["compile_s_per_batch"].values()), 1)
        save(record)

    # With engines, the baseline compiles first, as a user's would, before any engine fills the compiler's caches.
    # Without them (--skip-engine) each batch compiles just before it is timed, so a deadline that stops a long
    # max-autotune compile of the large batch still leaves batch 1's figures.
    for b in [] if args.skip_engine else batches:
        compile_baseline(b)

    example = tuple(torch.from_numpy(v) for v in feeds[batches[-1]].values())
    names = list(feeds[batches[-1]])
    options = {"device": "cuda" if cuda else "cpu", "mode": args.mode, "batches": batches}
    if not cuda:
        options = {"device": "cpu", "compile": "eager"}
    engines = [("engine (from module)", "auto", {}), ("engine (from ONNX)", "onnx", {})]
    for text in args.extra_engine or []:  # same-run comparisons of backend options, e.g. fuse_conv=false
        engines.append((f"engine (from module, {text})", "auto", parse_options(text)))
    for index, (label, source, extra) in enumerate(engines):
        if args.skip_engine or (source == "onnx" and args.skip_onnx):
            continue
        path = Path(args.workdir) / f"{name}-{source}-{index}.engine"
        started = time.perf_counter()
        try:
            engine = es.build(module, backend="torch", precision=precision, verify=False,
                              backend_options={**options, "source": source, **extra},
                              import_options=ImportOptions(example_inputs=dict(zip(names, example))))
        except Exception as exc:  # noqa: BLE001
            record["builds"][label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"}
            print(f"{name}: {label} failed: {record['builds'][label]['error']}", flush=True)
            continue
        build_s = time.perf_counter() - started
        path.unlink(missing_ok=True)
        engine.save(path)
        build = {"cold_build_s": round(build_s, 1),
                 "details": {k: engine.manifest.checks["build"].get(k) for k in
                             ("source", "export_seconds", "compile_seconds", "served_shapes", "compiled_vs_exported_rel_l2",
                              "fuse_conv", "patch_conv", "fuse_mha", "fuse_gelu", "compile_breakdown",
                              "cudnn_benchmark", "cudnn_search_ms")}}
        build["stages"] = engine.manifest.checks.get("stages")  # where the cold build's time went
        if not args.skip_warm_load and source == "auto":  # options such as cudnn_benchmark change the load too
            build.update(warm_load_seconds(path, device))
        record["builds"][label] = build
        session = engine._session  # run_torch keeps inputs and outputs on the device
        out_names = engine.signature.output_names

        def engine_call(feeds_: dict, session=session, out_names=out_names) -> list:
            result = session.run_torch(feeds_, clone=False)
            return [result[n] for n in out_names]

        variants[label] = engine_call
        if args.engine_raw and source == "auto" and not extra:  # the session's own cost, apart from the kernels'
            def raw_call(feeds_: dict, session=session, names=tuple(names)) -> list:
                with torch.no_grad():
                    result = session._compiled(*(feeds_[n] for n in names))
                return list(result) if isinstance(result, (tuple, list)) else [result]

            variants[label + " compiled callable"] = raw_call
        save(record)

    same_precision: dict[int, list] = {}
    for b in batches:
        compile_baseline(b)
        for label, call in list(variants.items()):
            dtype = None if label.startswith("engine") else half
            feeds_b = tensors(b, dtype)
            try:
                outputs = [o.float().cpu().numpy() for o in call(feeds_b)]
                stats = timer(lambda: call(feeds_b), args.warmup, runs if b == 1 else max(10, runs // 4))
            except Exception as exc:  # noqa: BLE001
                record["rows"].append({"batch": b, "variant": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            per_s = b / (stats["p50_ms"] / 1e3)
            # Eager in the same precision is the floor a variant's error is judged against: random weights can
            # make a network so sensitive that fp16 itself is far from fp32 (ResNet-50: 3e-2 for every variant).
            if label.startswith("eager"):
                same_precision[b] = outputs
            versus_eager = {} if label.startswith("eager") or b not in same_precision else {
                "rel_l2_vs_eager_" + precision: round(accuracy(outputs, same_precision[b], spec.kind)["rel_l2"], 8)}
            record["rows"].append({"batch": b, "variant": label, **stats, "items_per_s": round(per_s, 1),
                                   **accuracy(outputs, reference[b], spec.kind), **versus_eager})
            if args.profile and cuda:  # where each variant's GPU time goes, kernel by kernel
                try:
                    profiled = kernel_profile(lambda: call(feeds_b))
                except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the timings
                    profiled = {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "gpu_ms_per_call": None,
                                "kernels_per_call": None, "top": []}
                record.setdefault("profile", {}).setdefault(str(b), {})[label] = profiled
                print(f"{name} b{b} {label}: {profiled['gpu_ms_per_call']} ms GPU, {profiled['kernels_per_call']} "
                      "kernels per call; " + "; ".join(f"{k['ms_per_call']:.3f} {k['kernel'][:60]}"
                                                       for k in profiled["top"][:6]), flush=True)
        save(record)
        print(f"{name} b{b}: " + ", ".join(f"{r['variant']} {r['p50_ms']:.3f} ms" for r in record["rows"]
                                          if r["batch"] == b and "p50_ms" in r), flush=True)
    return record


# --------------------------------------------------------------------------- driver and table


def versus_eager(row: dict[str, Any]) -> str:
    """The row's rel L2 against eager in the same precision, as text ('' for eager itself)."""
    found = [value for key, value in row.items() if key.startswith("rel_l2_vs_eager")]
    return f"{found[0]:.2e}" if found else ""


def print_table(records: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<20} {'batch':>5}  {'variant':<38} {'p50 ms':>9} {'items/s':>10} {'rel L2':>9} {'cos':>8} {'vs eager':>9}"]
    for record in records:
        if "error" in record:
            lines.append(f"{record['model']:<20} {'':>5}  {record['error'][:80]}")
            continue
        if record.get("stopped") or record.get("partial"):
            lines.append(f"{record['model']:<20} {'':>5}  (incomplete: {record.get('stopped') or 'the process ended early'})")
        for row in record["rows"]:
            if "error" in row:
                lines.append(f"{record['model']:<20} {row['batch']:>5}  {row['variant']:<38} error: {row['error'][:60]}")
                continue
            cos = f"{row.get('pooled_cosine', row.get('cosine', float('nan'))):.5f}"
            lines.append(f"{record['model']:<20} {row['batch']:>5}  {row['variant']:<38} {row['p50_ms']:>9.3f} "
                         f"{row['items_per_s']:>10.1f} {row['rel_l2']:>9.2e} {cos:>8} {versus_eager(row):>9}")
        for label, build in record.get("builds", {}).items():
            text = build.get("error") or ", ".join(f"{k} {build[k]}" for k in ("compile_s", "cold_build_s", "warm_load_s",
                                                                                "warm_load_error") if k in build)
            if not build.get("error") and "load_counts" in build:  # what the warm load compiled or tuned again
                counts = build["load_counts"]
                text += f", load: {counts['fx_misses']} graph misses, {counts['kernels_benchmarked']} kernels tuned"
            lines.append(f"{record['model']:<20} {'':>5}  {label:<38} {text[:120]}")
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def cmd_one(args: argparse.Namespace) -> None:
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save(record: dict) -> None:
        partial = {**record, "partial": True, "seconds": round(time.perf_counter() - started, 1)}
        Path(args.json).write_text(json.dumps(partial, indent=1, default=str) + "\n")

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    try:
        record = run_one(args.model, args, save)
    except Exception as exc:  # noqa: BLE001 - one model's failure is recorded, the plan goes on
        record = {"model": args.model, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"}
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["env"] = environment()
    Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")


def visible_gpus(device: str) -> list[str]:
    if device == "cpu":
        return ["cpu"]
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        count = 0
    return [str(i) for i in range(count)] or ["cpu"]


def cmd_run(args: argparse.Namespace) -> None:
    """One process per model, as many at once as there are GPUs; models that would start past the deadline are skipped."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in (args.models.split(",") if args.models else DEFAULT_MODELS) if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    started = time.monotonic()
    slots = visible_gpus(args.device)
    running: dict[str, tuple[subprocess.Popen, str]] = {}
    pending = list(models)
    skipped = []
    while pending or running:
        for slot in [s for s in slots if s not in running]:
            if not pending:
                break
            left = args.deadline_s - (time.monotonic() - started)
            if left < args.min_model_s:
                skipped.extend(pending)
                pending.clear()
                break
            model = pending.pop(0)
            (out / f"{model}.json").unlink(missing_ok=True)  # a record left by an earlier run in this folder is stale
            command = [sys.executable, __file__, "one", "--model", model, "--json", str(out / f"{model}.json"),
                       "--workdir", str(Path(args.workdir) / model), *forwarded(args)]
            env = dict(os.environ)
            if slot != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = slot
            log = open(out / f"{model}.log", "w")  # noqa: SIM115 - closed when the process ends
            running[slot] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), model)
            print(f"+{time.monotonic() - started:.0f}s {model} on {'GPU ' + slot if slot != 'cpu' else 'the CPU'}", flush=True)
        time.sleep(1)
        for slot, (process, model) in list(running.items()):
            if process.poll() is not None:
                print(f"+{time.monotonic() - started:.0f}s {model} done (exit {process.returncode})", flush=True)
                del running[slot]
            elif time.monotonic() - started > args.deadline_s + 30:
                process.kill()
                process.wait()
                del running[slot]
                path = out / f"{model}.json"
                record = json.loads(path.read_text()) if path.exists() else {"model": model, "rows": [], "builds": {}}
                record["error" if not record.get("rows") else "stopped"] = "stopped at the deadline"
                path.write_text(json.dumps(record, indent=1, default=str) + "\n")
                print(f"{model} stopped at the deadline", flush=True)
    for model in skipped:
        (out / f"{model}.json").write_text(json.dumps({"model": model, "error": "skipped: the deadline came first"}) + "\n")
    records = [json.loads((out / f"{m}.json").read_text()) for m in models if (out / f"{m}.json").exists()]
    (out / "table.txt").write_text(print_table(records) + "\n")


def parse_options(text: str) -> dict[str, Any]:
    """``fuse_conv=false,mode=max-autotune`` -> {"fuse_conv": False, "mode": "max-autotune"} (values read as JSON when they parse)."""
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options


def forwarded(args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--mode", args.mode, "--baseline-mode", args.baseline_mode, "--runs", str(args.runs),
             "--warmup", str(args.warmup), "--train-steps", str(args.train_steps)]
    for text in args.extra_engine or []:
        flags += ["--extra-engine", text]
    for name in ("quick", "skip_onnx", "skip_warm_load", "skip_engine", "engine_raw", "profile"):
        if getattr(args, name):
            flags.append("--" + name.replace("_", "-"))
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "one"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda", help="cuda or cpu (a dry run: fp32, engines uncompiled)")
        p.add_argument("--mode", default="reduce-overhead", help="the engines' torch.compile mode")
        p.add_argument("--baseline-mode", default="reduce-overhead", help="torch.compile mode of the baseline; none skips it")
        p.add_argument("--runs", type=int, default=100)
        p.add_argument("--warmup", type=int, default=10)
        p.add_argument("--quick", action="store_true", help="large batch 8 and 20 timed runs")
        p.add_argument("--train-steps", type=int, default=0,
                       help="train vision models this many steps on a synthetic task first (zoo_training.py), "
                            "and measure accuracy on its images: trained-like weights instead of random ones")
        p.add_argument("--skip-onnx", action="store_true", help="no engine from the ONNX export")
        p.add_argument("--skip-warm-load", action="store_true")
        p.add_argument("--skip-engine", action="store_true",
                       help="no engines: eager and the baseline only (a max-autotune compile too long to share one "
                            "process's deadline with the engines; their figures then come from another run)")
        p.add_argument("--engine-raw", action="store_true",
                       help="also time the module engine's compiled callable without its session (its overhead apart)")
        p.add_argument("--profile", action="store_true",
                       help="also record each variant's GPU time per kernel (torch.profiler, 10 calls) in 'profile'")
        p.add_argument("--extra-engine", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                       help="one more engine from the module with these backend options (repeatable), e.g. fuse_conv=false")
        p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpu_zoo"))
    run = sub.choices["run"]
    run.add_argument("--models", default="", help=f"comma list (default: {','.join(DEFAULT_MODELS)})")
    run.add_argument("--out", required=True)
    run.add_argument("--deadline-s", type=float, default=520, help="no model starts after this many seconds")
    run.add_argument("--min-model-s", type=float, default=120, help="a model needs at least this long left to start")
    one = sub.choices["one"]
    one.add_argument("--model", required=True, choices=sorted(MODELS))
    one.add_argument("--json", required=True)
    table = sub.add_parser("table")
    table.add_argument("folder")
    args = parser.parse_args()
    if args.command == "run":
        cmd_run(args)
    elif args.command == "one":
        cmd_one(args)
    else:
        print_table([json.loads(p.read_text()) for p in sorted(Path(args.folder).glob("*.json"))])


if __name__ == "__main__":
    main()
