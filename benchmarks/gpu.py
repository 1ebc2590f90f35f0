"""GPU engines from the PyTorch Inductor backend vs PyTorch eager, on the project's H100.

For a ResNet-50-like and a MobileNetV2-like model built in code (``enginesmith.samples``,
seeded random weights, 224x224), each step runs in its own process:

``build``  builds an engine with ``enginesmith.build(..., backend="torch")`` (cold: the
           compiler caches are keyed by a fresh tag, so every kernel is compiled and
           autotuned) and records the build time.
``bench``  in a fresh process with empty Inductor/Triton cache folders: loads the engine
           (warm load: the compiler cache carried in the engine replaces autotuning),
           then times, with CUDA events (median of per-call times after warm-up):
           the engine on device tensors (``Session.run_torch``), the engine on numpy
           (pinned staging, host copies included), and PyTorch eager on the *same ONNX
           weights* converted with onnx2torch, in fp32 (TF32 off and on) and fp16 channels-last,
           plus torchvision's own model in fp16 channels-last (timing only), cudnn.benchmark on.
           Accuracy: relative L2 of each variant's logits vs fp32 eager on smooth images.
``merge``  collects the per-step JSON files into one results file, with issue 7's targets checked.
``env``    prints versions and probes the torch APIs the backend relies on.
``aoti``   builds and runs an AOTInductor engine (run it in a subprocess: it crashed once here).

    python benchmarks/gpu.py build --model resnet50_like --precision fp16 --batches 1 --engine /tmp/r50.engine --json out.json
    python benchmarks/gpu.py bench --model resnet50_like --engine /tmp/r50.engine --batches 1 --json out.json
    python benchmarks/gpu.py merge --out benchmarks/results/gpu_torch.json part1/*.json part2/*.json

Targets (issue 7): ResNet-50 fp16 batch 1 p50 <= 0.6 ms, batch 128 >= 25,000 images/s,
rel L2 vs fp32 eager <= 1e-2, warm load <= 20 s. scripts/gpu_torch_backend.sh runs it on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import enginesmith as es
from enginesmith import samples

MODELS = {"resnet50_like": samples.resnet50_like, "mobilenet_v2_like": samples.mobilenet_v2_like}


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images (low-frequency noise plus a little grain), normalized."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, size // 16 + 1, size // 16 + 1)).astype(np.float32)
    images = coarse.repeat(16, axis=2).repeat(16, axis=3)[:, :, :size, :size]
    images += 0.3 * rng.standard_normal(images.shape).astype(np.float32)
    return ((images - images.mean()) / images.std()).astype(np.float32)


def write_json(path: str | None, data: dict) -> None:
    text = json.dumps(data, indent=1, sort_keys=False, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text if len(text) < 4000 else text[:4000] + "...")


def environment() -> dict:
    import torch

    from enginesmith.backends.torch_compile import device_facts

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    facts = device_facts(device)
    return {
        "gpu": facts.get("gpu"),
        "compute_capability": facts.get("compute_capability"),
        "driver": facts.get("driver"),
        "cuda": facts.get("cuda"),
        "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": facts.get("triton_version"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------- timing


def time_cuda(fn, warmup: int, runs: int) -> dict:
    """Per-call times with CUDA events around each call; median, p10, p90 in ms."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return {"p50_ms": statistics.median(times), "p10_ms": times[len(times) // 10], "p90_ms": times[(9 * len(times)) // 10],
            "runs": runs}


def kernel_profile(fn, calls: int = 10, top: int = 12) -> dict:
    """GPU time per call by kernel (torch.profiler, CUDA activity only; kernels replayed from CUDA graphs included).

    Where a variant's time goes, for comparing two variants of one model kernel by kernel: the sum over kernels is
    the GPU's busy time per call (launch gaps excluded), ``top`` the kernels that cost most, summed over a call.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    def device_us(event) -> float:  # the attribute was renamed in torch 2.4
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))

    kernels = [e for e in prof.key_averages() if device_us(e) > 0]
    kernels.sort(key=device_us, reverse=True)
    return {"gpu_ms_per_call": round(sum(map(device_us, kernels)) / 1e3 / calls, 4),
            "kernels_per_call": round(sum(e.count for e in kernels) / calls, 1),
            "top": [{"kernel": e.key[:160], "ms_per_call": round(device_us(e) / 1e3 / calls, 4),
                     "launches_per_call": round(e.count / calls, 1)} for e in kernels[:top]]}


def time_host(fn, warmup: int, runs: int) -> dict:
    """Wall-clock per call (for paths that return host data, so they synchronize themselves)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"p50_ms": statistics.median(times), "p10_ms": times[len(times) // 10], "p90_ms": times[(9 * len(times)) // 10],
            "runs": runs}


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# --------------------------------------------------------------------------- steps


def cmd_env(args: argparse.Namespace) -> None:
    import torch

    data = {"step": "env", **environment()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data["multiprocessors"] = props.multi_processor_count
        data["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    probes = {}
    from torch.compiler._cache import CacheArtifactManager

    probes["save_cache_artifacts"] = hasattr(torch.compiler, "save_cache_artifacts")
    probes["load_cache_artifacts"] = hasattr(torch.compiler, "load_cache_artifacts")
    probes["with_fresh_cache"] = hasattr(CacheArtifactManager, "with_fresh_cache")
    probes["cache_key_tag"] = hasattr(getattr(torch.compiler, "config", None), "cache_key_tag")
    probes["fp32_precision"] = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    probes["aoti_compile_and_package"] = hasattr(torch._inductor, "aoti_compile_and_package")
    probes["Dim.AUTO"] = hasattr(torch.export.Dim, "AUTO")
    try:
        from enginesmith.backends.torch_compile import _onnx2torch

        probes["onnx2torch"] = _onnx2torch().__name__ == "onnx2torch"
    except Exception as exc:  # noqa: BLE001
        probes["onnx2torch"] = f"{type(exc).__name__}: {exc}"
    try:
        import torchvision

        probes["torchvision"] = torchvision.__version__
    except Exception:  # noqa: BLE001
        probes["torchvision"] = None
    data["api"] = probes
    write_json(args.json, data)


def parse_value(text: str):
    """'1'/'true' -> True, '0'/'false' -> False, numbers as numbers, else the string."""
    lowered = text.lower()
    if lowered in ("true", "1", "on", "yes"):
        return True
    if lowered in ("false", "0", "off", "no"):
        return False
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def build_options(args: argparse.Namespace) -> dict:
    options = {"device": args.device, "mode": args.mode, "compile": args.compile}
    if args.batches:
        options["batches"] = args.batches
    inductor = {}
    if args.no_cdt:
        inductor["coordinate_descent_tuning"] = False
    for item in args.inductor or []:
        key, _, value = item.partition("=")
        inductor[key] = parse_value(value)
    if inductor:
        options["inductor"] = inductor
    if args.no_cudnn_benchmark:
        options["cudnn_benchmark"] = False
    if args.cudnn_benchmark_limit is not None:
        options["cudnn_benchmark_limit"] = args.cudnn_benchmark_limit
    if args.fuse_conv != "auto":
        options["fuse_conv"] = parse_value(args.fuse_conv)
    return options


def cmd_build(args: argparse.Namespace) -> None:
    model = MODELS[args.model](image_size=args.image_size)
    started = time.perf_counter()
    engine = es.build(model, backend="torch", precision=args.precision, backend_options=build_options(args),
                      verify=False, output=args.engine)
    seconds = time.perf_counter() - started
    details = engine.manifest.checks.get("build", {})
    write_json(args.json, {
        "step": "build", "tag": args.tag, "model": args.model, "precision": engine.precision, "image_size": args.image_size,
        "options": build_options(args), "cold_build_s": round(seconds, 1), "details": details,
        "build_log": engine.manifest.build_log, "engine_mb": round(Path(args.engine).stat().st_size / 2**20, 1),
        "fingerprint": engine.manifest.fingerprint, "env": environment(),
    })


def eager_modules(model_proto, device: str):
    """fp32 and fp16 channels-last eager modules converted from the same ONNX (weights identical)."""
    import torch

    from enginesmith.backends.torch_compile import _onnx2torch

    fp32 = _onnx2torch().convert(model_proto).eval().to(device)
    fp16 = _onnx2torch().convert(model_proto).eval().to(device).half().to(memory_format=torch.channels_last)
    return fp32, fp16


def torchvision_fp16(name: str, device: str):
    """torchvision's own ResNet-50 / MobileNetV2 (random weights) in fp16 channels-last: the eager model a
    PyTorch user would time, without onnx2torch's per-module overhead. Timing only (other weights)."""
    import torch

    try:
        import torchvision
    except Exception:  # noqa: BLE001 - optional reference
        return None
    ctor = {"resnet50_like": torchvision.models.resnet50, "mobilenet_v2_like": torchvision.models.mobilenet_v2}[name]
    return ctor(weights=None).eval().to(device).half().to(memory_format=torch.channels_last)


def set_tf32(on: bool) -> None:
    import torch

    from enginesmith.backends.torch_compile import _set_fp32_math

    _set_fp32_math(torch, on)


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda:0" if cuda else "cpu"
    started = time.perf_counter()
    engine = es.load(args.engine, trust_code=True)  # built by this script
    load_s = time.perf_counter() - started
    session = engine._session  # the backend session: run_torch keeps tensors on the device
    if args.load_only:
        write_json(args.json, {"step": "load", "tag": args.tag, "model": args.model, "warm_load_s": round(load_s, 2),
                               "load_steps": getattr(session, "load_steps", {}), "cache": getattr(session, "cache_info", ""),
                               "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")})
        return
    model = MODELS[args.model](image_size=args.image_size)
    fp32, fp16 = eager_modules(model, device)
    tv16 = torchvision_fp16(args.model, device) if cuda else None
    if cuda:  # eager as a user tuning for fixed shapes runs it (the engine sets the same flag)
        torch.backends.cudnn.benchmark = True
    rows = []
    for batch in args.batches:
        images = synthetic_images(batch, args.image_size, seed=7)
        x32 = torch.from_numpy(images).to(device)
        x16 = x32.half().contiguous(memory_format=torch.channels_last)
        runs = args.runs if batch <= 8 else max(10, args.runs // 4)
        timer = time_cuda if cuda else time_host

        set_tf32(False)
        with torch.no_grad():
            ref = fp32(x32).float().cpu().numpy()
            out16 = fp16(x16).float().cpu().numpy()
            eng_dev = session.run_torch({"image": x32})["logits"].float().cpu().numpy()
        eng_np = engine(image=images)["logits"]
        accuracy = {"engine": rel_l2(eng_dev, ref), "engine_numpy": rel_l2(eng_np, ref), "eager_fp16_cl": rel_l2(out16, ref),
                    "top1_agreement_engine": float((eng_dev.argmax(-1) == ref.argmax(-1)).mean())}

        def run_engine():
            session.run_torch({"image": x32}, clone=False)

        def run_fp32():
            with torch.no_grad():
                fp32(x32)

        def run_fp16():
            with torch.no_grad():
                fp16(x16)

        def run_tv16():
            with torch.no_grad():
                tv16(x16)

        variants = {}
        set_tf32(False)
        variants["engine (device tensors)"] = timer(run_engine, args.warmup, runs)
        variants["engine (numpy in/out, pinned staging)"] = time_host(lambda: engine(image=images), args.warmup, runs)
        variants["eager fp32 (TF32 off)"] = timer(run_fp32, args.warmup, runs)
        set_tf32(True)
        variants["eager fp32 (TF32 on)"] = timer(run_fp32, args.warmup, runs)
        set_tf32(False)
        variants["eager fp16 channels-last"] = timer(run_fp16, args.warmup, runs)
        if tv16 is not None:
            variants["eager fp16 channels-last (torchvision)"] = timer(run_tv16, args.warmup, runs)
        # The engine timed again last: the spread between its two timings is the noise floor.
        variants["engine (device tensors), again"] = timer(run_engine, args.warmup, runs)
        for name, stats in variants.items():
            stats["images_per_s"] = batch / (stats["p50_ms"] / 1e3)
            rows.append({"model": args.model, "batch": batch, "variant": name, **stats})
        rows.append({"model": args.model, "batch": batch, "variant": "accuracy vs eager fp32 (TF32 off)", **accuracy})
        print(f"{args.model} b{batch}: " + ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in variants.items()), flush=True)
    write_json(args.json, {
        "step": "bench", "tag": args.tag, "model": args.model, "engine_precision": engine.precision, "image_size": args.image_size,
        "warm_load_s": round(load_s, 2), "session_load_s": round(getattr(session, "load_seconds", 0.0), 2),
        "cache": getattr(session, "cache_info", ""), "load_steps": getattr(session, "load_steps", {}),
        "compile": session.meta.get("compile"), "compiled_batches": session.meta.get("batches"),
        "mode": session.meta.get("mode"), "rows": rows, "env": environment(),
        "cache_dirs": {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")},
        "cudnn_benchmark": bool(cuda and torch.backends.cudnn.benchmark),
        "timing": "CUDA events around each call, median of per-call times after warm-up" if cuda else "host clock",
    })


def cmd_aoti(args: argparse.Namespace) -> None:
    """Build and run an AOTInductor engine; the caller runs this in a subprocess with a timeout."""
    import torch

    model = MODELS[args.model](image_size=args.image_size)
    started = time.perf_counter()
    engine = es.build(model, backend="torch", precision=args.precision, verify=False,
                      backend_options={"device": args.device, "compile": "aoti", "mode": args.mode, "batches": args.batches})
    build_s = time.perf_counter() - started
    engine.save(args.engine)
    started = time.perf_counter()
    loaded = es.load(args.engine, trust_code=True)  # built by this script
    load_s = time.perf_counter() - started
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda:0" if cuda else "cpu"
    images = synthetic_images(args.batches[0], args.image_size, seed=7)
    x = torch.from_numpy(images).to(device)
    session = loaded._session
    stats = (time_cuda if cuda else time_host)(lambda: session.run_torch({"image": x}, clone=False), args.warmup, args.runs)
    fp32, _ = eager_modules(model, device)
    set_tf32(False)
    with torch.no_grad():
        ref = fp32(x).float().cpu().numpy()
    out = session.run_torch({"image": x})["logits"].float().cpu().numpy()
    write_json(args.json, {"step": "aoti", "model": args.model, "precision": args.precision, "mode": args.mode,
                           "batch": args.batches[0], "build_s": round(build_s, 1), "load_s": round(load_s, 2),
                           "p50_ms": stats["p50_ms"], "rel_l2_vs_fp32_eager": rel_l2(out, ref),
                           "engine_mb": round(Path(args.engine).stat().st_size / 2**20, 1)})


TARGETS = {  # issue 7, ResNet-50-like fp16 engine
    "b1_p50_ms": 0.6,
    "b128_images_per_s": 25000,
    "rel_l2": 1e-2,
    "warm_load_s": 20,
}


def cmd_merge(args: argparse.Namespace) -> None:
    parts = []
    for path in args.inputs:
        text = Path(path).read_text().strip() if Path(path).stat().st_size else ""
        if text:
            parts.append(json.loads(text))
    env = next((p["env"] for p in parts if p.get("env") and p["env"].get("gpu") not in (None, "none")), None) or \
        next((p["env"] for p in parts if p.get("env")), {})
    for part in parts:
        if part.get("step") == "env":
            env = {k: v for k, v in part.items() if k not in ("step", "api")} | {"api": part.get("api")}
    result = {
        "benchmark": "benchmarks/gpu.py (issue 7: PyTorch Inductor backend vs PyTorch eager)",
        "gpu": env.get("gpu"),
        "env": env,
        "command": args.command,
        "builds": [p for p in parts if p.get("step") == "build"],
        "benches": [p for p in parts if p.get("step") == "bench"],
        "aoti": [p for p in parts if p.get("step") == "aoti"],
        "loads": [p for p in parts if p.get("step") == "load"],
        "tests": [p for p in parts if p.get("step") == "tests"],
        "steps": [p for p in parts if p.get("step") == "status"],
        "notes": args.note or [],
    }
    for build in result["builds"]:
        build.pop("env", None)
    for bench in result["benches"]:
        bench.pop("env", None)
    result["targets"] = check_targets(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(summary(result))


def check_targets(result: dict) -> list[dict]:
    """Issue 7's targets against the ResNet-50-like fp16 engines measured (best engine per target)."""
    checks = []
    benches = [b for b in result["benches"] if b["model"] == "resnet50_like" and b.get("engine_precision") == "fp16"]

    def rows(batch, variant="engine (device tensors)"):
        return [(b, r) for b in benches for r in b["rows"] if r["batch"] == batch and r["variant"] == variant]

    b1 = rows(1)
    if b1:
        bench, row = min(b1, key=lambda br: br[1]["p50_ms"])
        checks.append({"target": "ResNet-50 fp16 batch 1 p50 <= 0.6 ms", "value": round(row["p50_ms"], 4),
                       "met": row["p50_ms"] <= TARGETS["b1_p50_ms"], "engine": bench.get("tag") or bench.get("mode")})
    b128 = rows(128)
    if b128:
        bench, row = max(b128, key=lambda br: br[1]["images_per_s"])
        checks.append({"target": "ResNet-50 fp16 batch 128 >= 25,000 images/s", "value": round(row["images_per_s"]),
                       "met": row["images_per_s"] >= TARGETS["b128_images_per_s"], "engine": bench.get("tag") or bench.get("mode")})
    errors = [r["engine"] for b in benches for r in b["rows"] if "engine" in r and isinstance(r["engine"], float)]
    if errors:
        checks.append({"target": "rel L2 vs fp32 eager <= 1e-2 (fp16, worst engine and batch)", "value": max(errors),
                       "met": max(errors) <= TARGETS["rel_l2"]})
    loads = {b.get("tag") or b.get("mode"): b["warm_load_s"] for b in benches}
    if loads:
        checks.append({"target": "warm load <= 20 s (every ResNet-50 fp16 engine, by engine)", "value": loads,
                       "met": max(loads.values()) <= TARGETS["warm_load_s"]})
    return checks


def summary(result: dict) -> str:
    env = result.get("env", {})
    lines = [f"GPU: {result.get('gpu')} (compute {env.get('compute_capability')}), driver {env.get('driver')}, "
             f"CUDA {env.get('cuda')}, torch {env.get('torch')}, Triton {env.get('triton')}"]
    for build in result["builds"]:
        d = build.get("details", {})
        label = f" [{build['tag']}]" if build.get("tag") else ""
        lines.append(f"build {build['model']}{label} {build['precision']} batches {d.get('batches')} mode {d.get('mode')}: "
                     f"cold {build['cold_build_s']} s (compile per batch {d.get('compile_seconds_per_batch')}), "
                     f"engine {build.get('engine_mb')} MB")
    for bench in result["benches"]:
        label = f" [{bench['tag']}]" if bench.get("tag") else ""
        lines.append(f"bench {bench['model']}{label} {bench['engine_precision']} ({bench.get('mode')}): "
                     f"warm load {bench['warm_load_s']} s ({bench['cache']}; {bench.get('load_steps')})")
        for row in bench["rows"]:
            if "p50_ms" in row:
                lines.append(f"  b{row['batch']:<4} {row['variant']:<42} p50 {row['p50_ms']:8.3f} ms "
                             f"(p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f})  {row['images_per_s']:9.0f} img/s")
            else:
                lines.append(f"  b{row['batch']:<4} rel L2 vs fp32 eager: engine {row['engine']:.2e}, "
                             f"engine via numpy {row['engine_numpy']:.2e}, eager fp16 {row['eager_fp16_cl']:.2e}, "
                             f"top-1 agreement {row['top1_agreement_engine']:.3f}")
    for load in result["loads"]:
        lines.append(f"load {load['model']} [{load.get('tag')}] compile threads {load.get('compile_threads') or 'default'}: "
                     f"warm load {load['warm_load_s']} s ({load.get('cache')}; {load.get('load_steps')})")
    for probe in result["aoti"]:
        lines.append("aoti " + ", ".join(f"{k} {v}" for k, v in probe.items() if k != "step"))
    for test in result["tests"]:
        lines.append(f"tests on {test.get('device')}: {test.get('summary')}")
    for step in result["steps"]:
        if step.get("rc") not in (0, None):
            lines.append(f"step failed: {step.get('name')} exit {step.get('rc')} after {step.get('seconds')} s")
    for check in result.get("targets", []):
        lines.append(f"target {'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['value']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("env", "build", "bench", "aoti"):
        p = sub.add_parser(name)
        p.add_argument("--json")
        if name == "env":
            continue
        p.add_argument("--model", choices=sorted(MODELS), default="resnet50_like")
        p.add_argument("--engine", default="/tmp/model.engine")
        p.add_argument("--batches", type=int, nargs="+", default=[1])
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--device", default="auto")
        p.add_argument("--precision", default="fp16")
        p.add_argument("--mode", default="max-autotune")
        p.add_argument("--compile", default="inductor")
        p.add_argument("--no-cdt", action="store_true", help="turn coordinate-descent tuning off (shorter autotuning)")
        p.add_argument("--inductor", action="append", metavar="KEY=VALUE", help="extra Inductor option, e.g. freezing=1")
        p.add_argument("--no-cudnn-benchmark", action="store_true", help="build: leave cuDNN on its heuristics")
        p.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                       help="build: cuDNN algorithms timed per shape (torch default 10; 0 = all)")
        p.add_argument("--fuse-conv", default="auto", choices=["auto", "true", "false"],
                       help="build: cuDNN-fused conv+bias(+add)+ReLU epilogues (auto: on CUDA)")
        p.add_argument("--tag", default="", help="a label for this build/bench in the merged results")
        p.add_argument("--load-only", action="store_true", help="bench: time the warm load only")
        p.add_argument("--runs", type=int, default=100)
        p.add_argument("--warmup", type=int, default=10)
    p = sub.add_parser("merge")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--command", default="scripts/gpu_torch_backend.sh")
    p.add_argument("--note", action="append")
    args = parser.parse_args(argv)
    {"env": cmd_env, "build": cmd_build, "bench": cmd_bench, "aoti": cmd_aoti, "merge": cmd_merge}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
