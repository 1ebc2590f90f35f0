"""Inductor compilation and its caches: modes and options, process-wide CUDA math flags,
warm-up of the compiled batch sizes, compiler-cache isolation, and AOTInductor packages."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from ...errors import BuildError
from ...signature import Signature
from .common import _first_line, _torch, example_inputs

@contextmanager
def _fresh_artifacts() -> Iterator[None]:
    """Collect only the cache artifacts of the compile inside (not earlier ones in this process)."""
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:  # pragma: no cover - torch without the mega-cache: nothing to isolate
        yield
        return
    fresh = getattr(CacheArtifactManager, "with_fresh_cache", None)
    if fresh is not None:
        with fresh():
            yield
    else:  # pragma: no cover - older torch
        CacheArtifactManager.clear()
        yield


@contextmanager
def _cache_tag(tag: str) -> Iterator[None]:
    """The compiler caches keyed by the tag an older engine was built under, so its load finds its graphs;
    engines now have no tag (their builds may hit the local caches, and a hit is recorded all the same)."""
    torch = _torch()
    if not tag:
        yield
        return
    config = getattr(torch.compiler, "config", None)
    if config is not None and hasattr(config, "cache_key_tag"):
        with config.patch(cache_key_tag=tag):
            yield
    else:  # pragma: no cover - older torch
        yield


def _set_fp32_math(torch, tf32: bool) -> None:
    """TF32 on or off for matmuls and cuDNN (process-wide, as PyTorch has it).

    The legacy flags on purpose: torch 2.11-2.13 read ``cudnn.allow_tf32`` internally (in
    torch.export, for one) and raise once the newer ``fp32_precision`` API has been used.
    """
    if torch.backends.cuda.matmul.allow_tf32 != tf32:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if torch.backends.cudnn.allow_tf32 != tf32:
        torch.backends.cudnn.allow_tf32 = tf32


def _set_cudnn_benchmark(torch, meta: Mapping[str, Any]) -> None:
    """Turn cuDNN's per-shape algorithm search on for engines that ask for it (never off: other code may rely on it)."""
    if not (meta["device"].startswith("cuda") and meta.get("cudnn_benchmark")):
        return
    if not torch.backends.cudnn.benchmark:
        torch.backends.cudnn.benchmark = True
    limit = meta.get("cudnn_benchmark_limit")
    if limit is not None and hasattr(torch.backends.cudnn, "benchmark_limit"):
        torch.backends.cudnn.benchmark_limit = int(limit)


def _benchmark_limit(value: Any) -> int | None:
    if value is None:
        return None
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = -1
    if limit < 0 or str(value).strip() not in (str(limit), f"{limit}.0"):
        raise BuildError(f"cudnn_benchmark_limit must be a whole number >= 0 (0 times every algorithm), not {value!r}")
    return limit


def captured_graphs(meta: Mapping[str, Any]) -> bool:
    """Whether the engine replays CUDA graphs it captured itself (one per compiled batch) rather than Inductor's
    graph trees, whose replays cost more CPU per call and are kept per thread (a serving or pipeline thread
    records every graph again)."""
    return meta.get("graphs") == "captured" and meta["device"].startswith("cuda") and meta["compile"] == "inductor"


def inductor_options(meta: Mapping[str, Any]) -> dict[str, Any]:
    torch = _torch()
    options = dict(torch._inductor.list_mode_options(meta["mode"]))
    if not meta["device"].startswith("cuda") or captured_graphs(meta):
        options.pop("triton.cudagraphs", None)
    options.update(meta.get("inductor") or {})
    return options


def _fused_module(program, meta: Mapping[str, Any], log: list[str]):
    """A fresh module of the program with the rewrites the engine asked for: cuDNN-fused convolution
    epilogues (``fusion``), patch convolutions and sibling linear layers as products (``linear_fusion``),
    linear + GELU as one product (``gelu_fusion``), written-out attention as one fused call (``attention_fusion``)."""
    module = program.module()
    # Before the epilogue fusion, which would otherwise keep a patch convolution followed by ReLU as a convolution.
    if meta.get("patch_conv"):
        from .linear_fusion import patch_convs_as_linears

        log.append(f"convolutions whose kernel is their stride run as a linear layer over patches: "
                   f"{patch_convs_as_linears(module)}")
    if meta.get("fuse_conv"):
        from .fusion import fuse_conv_epilogues

        # Engines built before "dense" existed stored True: every convolution.
        counts = fuse_conv_epilogues(module, grouped=meta["fuse_conv"] != "dense")
        log.append("cuDNN fused epilogues" + (" (on CUDA; unfused reference kernels elsewhere)" if not
                                              meta["device"].startswith("cuda") else "") + ": "
                   + ", ".join(f"{pattern} x{n}" for pattern, n in counts.items()))
    if meta.get("fuse_linear"):
        from .linear_fusion import concat_sibling_linears, matmuls_as_linears

        as_linear = matmuls_as_linears(module)
        if as_linear:
            log.append(f"products by a constant weight (+ bias) run as linear layers: {as_linear}")
        log.append(f"linear layers sharing an input merged into one product: {concat_sibling_linears(module)} merged away")
    if meta.get("fuse_gelu"):  # after fuse_linear, which turns ONNX's MatMul + Add into the linear layers it reads
        from .gelu_fusion import fuse_linear_gelu, gelus_written_out

        written_out = gelus_written_out(module)
        if written_out:
            log.append(f"GELU written out op by op run as one GELU: {written_out}")
        log.append(f"linear layers followed by GELU run as one product with a GELU epilogue: {fuse_linear_gelu(module)}")
    if meta.get("fuse_attention"):
        from .attention_fusion import fuse_attention

        log.append(f"written-out attention run as scaled_dot_product_attention: {fuse_attention(module)} rewritten")
    return module


def needs_rewrite(meta: Mapping[str, Any]) -> bool:
    return bool(meta.get("fuse_conv") or meta.get("patch_conv") or meta.get("fuse_linear") or meta.get("fuse_gelu")
                or meta.get("fuse_attention"))


def compile_module(module, meta: Mapping[str, Any]):
    """The callable a session runs: torch.compile'd (lazily compiled on first calls) or eager."""
    torch = _torch()
    if meta["compile"] == "eager":
        return module
    limit = len(meta.get("batches") or []) + 4
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    return torch.compile(module, backend="inductor", options=inductor_options(meta),
                         dynamic=meta["dynamic"], fullgraph=True)


def _compiler_seconds() -> dict[str, float]:
    """Seconds this process has spent so far tracing bytecode (Dynamo) and in the backend compiler (Inductor,
    cache hits included), from torch's own compile timers; {} where a torch lacks them (a private API)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}
    totals = dict(zip(names, values))
    return {step: float(totals.get(timer, 0.0)) for step, timer in
            (("trace", "bytecode_tracing"), ("inductor", "OutputGraph.call_user_compiler"))}


def _warm(fn, meta: Mapping[str, Any], signature: Signature, device: str,
          breakdown: dict[str, float] | None = None) -> dict[int, float]:
    """Run every precompiled batch size (compiling, recording CUDA graphs); seconds per batch.

    With ``breakdown``, each batch's seconds are also split there into Dynamo's tracing, Inductor (its cache
    loads on a warm load) and the rest (``batch_N_trace``, ``batch_N_inductor``, ``batch_N_run``: the first
    calls themselves, with cuDNN's algorithm search and CUDA graph recording), so a slow load says where it went."""
    torch = _torch()
    seconds: dict[int, float] = {}
    for batch in meta["warm_batches"]:
        inputs = example_inputs(signature, batch, device, seed=batch, known=meta.get("example_shapes"))
        before = _compiler_seconds() if breakdown is not None else {}
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(3 if meta.get("cudagraphs") and not captured_graphs(meta) else 1):
                fn(*inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        seconds[batch] = round(time.perf_counter() - started, 2)
        if breakdown is not None and before:
            after = _compiler_seconds()
            spent = {step: max(0.0, after[step] - before[step]) for step in before}
            breakdown.update({f"batch_{batch}_{step}": round(value, 2) for step, value in spent.items()})
            breakdown[f"batch_{batch}_run"] = round(max(0.0, seconds[batch] - spent["trace"] - spent["inductor"]), 2)
    return seconds


def _aoti_compile(program, meta: Mapping[str, Any], tmp: str) -> bytes:
    """AOTInductor: the program compiled ahead of time into a .so inside a .pt2 package."""
    torch = _torch()
    options = {k: v for k, v in inductor_options(meta).items() if k != "triton.cudagraphs"}
    path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "aoti.pt2"),
                                                    inductor_configs=options)
    return Path(path).read_bytes()


class _GraphedRunner:
    """CUDA graphs around a runner (an AOTInductor model, or an Inductor-compiled module) for fixed batch sizes.

    At small batches kernel launches dominate; each compiled batch size is captured once and
    replayed with its inputs copied into the graph's static buffers. AOTInductor has no CUDA
    graphs of its own; for torch.compile'd modules this replaces Inductor's graph trees, whose
    replay runs guards and bookkeeping in Python on every call and whose graphs belong to the
    thread that recorded them (a pipeline's or server's worker thread records them all again).
    Other shapes call the runner directly.
    """

    def __init__(self, runner, signature: Signature, device: str, batches: list[int], log: list[str],
                 known: Mapping[str, Any] | None = None):
        torch = _torch()
        self._runner = runner
        self._graphs: dict[tuple, tuple] = {}
        for batch in batches:
            static = example_inputs(signature, batch, device, seed=batch, known=known)
            try:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(2):
                        runner(*static)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: CUDA work of other threads (a server's other engines) does not break the capture.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad():
                    outputs = runner(*static)
            except Exception as exc:  # noqa: BLE001 - capture is an optimization; run uncaptured instead
                log.append(f"CUDA graph capture of the compiled model failed at batch {batch}: "
                           f"{_first_line(exc)[:200]}; it runs without CUDA graphs")
                torch.cuda.synchronize(device)
                self._graphs.clear()
                return
            outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            self._graphs[tuple(tuple(t.shape) for t in static)] = (graph, static, outs)
        if self._graphs:
            log.append(f"compiled model captured in CUDA graphs for batches {', '.join(map(str, batches))}")

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def __call__(self, *inputs):
        entry = self._graphs.get(tuple(tuple(t.shape) for t in inputs))
        if entry is None:
            return self._runner(*inputs)
        graph, static, outs = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return outs


# Packages that loaded in a child process already (sha256), so each is probed once per process.
_AOTI_PROBED: set[str] = set()
AOTI_PROBE_ENV = "ENGINESMITH_TORCH_AOTI_PROBE"

_AOTI_PROBE_SCRIPT = """
import sys, torch
index = int(sys.argv[2])
if index >= 0:
    torch.zeros(1, device=f"cuda:{index}")
torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True, device_index=index)
print("aoti-load-ok")
"""


def _aoti_probe(path: str, index: int, digest: str) -> None:
    """Load the package in a child process first: with PyTorch 2.11+cu130 on the H100 image, loading an
    AOTInductor package in a process other than the one that compiled it died with SIGSEGV inside
    AOTIModelPackageLoader (benchmarks/results/gpu_torch.json). A crash there must not take the caller
    down, so it becomes a BuildError. ENGINESMITH_TORCH_AOTI_PROBE=0 skips the probe."""
    import signal
    import subprocess

    if digest in _AOTI_PROBED or os.environ.get(AOTI_PROBE_ENV, "1") == "0":
        return
    try:
        done = subprocess.run([sys.executable, "-c", _AOTI_PROBE_SCRIPT, path, str(index)], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BuildError("loading the engine's AOTInductor package did not finish in 600 s; rebuild the engine "
                         "with backend_options compile='inductor'") from None
    if done.returncode == 0 and "aoti-load-ok" in done.stdout:
        _AOTI_PROBED.add(digest)
        return
    if done.returncode < 0:
        try:
            why = f"it crashed with {signal.Signals(-done.returncode).name}"
        except ValueError:
            why = f"it was killed by signal {-done.returncode}"
    else:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = f"it failed: {lines[-1][:300] if lines else f'exit status {done.returncode}'}"
    raise BuildError(f"this PyTorch ({_torch().__version__}) cannot load the engine's AOTInductor package ({why} in a "
                     "probe process); rebuild the engine with backend_options compile='inductor' (the default)")


def _aoti_load(data: bytes, device: str, probe: bool = True):
    torch = _torch()
    with tempfile.NamedTemporaryFile(prefix="enginesmith-aoti-", suffix=".pt2", delete=False) as handle:
        handle.write(data)
    try:
        index = int(device.split(":")[1]) if device.startswith("cuda:") else -1
        if probe:
            _aoti_probe(handle.name, index, hashlib.sha256(data).hexdigest())
        # Calls are serialized by the session's lock, and the runner's own locking breaks CUDA-graph capture.
        return torch._inductor.aoti_load_package(handle.name, run_single_threaded=True, device_index=index)
    finally:
        Path(handle.name).unlink(missing_ok=True)
