"""Whether an engine's convolutions run cuDNN's algorithm search at load, decided at build by timing.

With ``torch.backends.cudnn.benchmark`` on, the first call of every convolution shape times up to
``benchmark_limit`` algorithms. PyTorch keeps the winners in process memory only, so a warm load
searches again. On the H200 (``benchmarks/results/gpu_zoo_h200_warm_loads.json``) those first calls
took 16.8 s of MobileNetV3-Large's 31.1 s warm load and 14.9 s of EfficientNet-B0's 30.1 s (dozens
of distinct depthwise shapes, at two batch sizes), against about 2 s for ResNet-50.

``cudnn_benchmark="auto"`` (the default on CUDA) therefore builds the engine with the search, then
captures the same compiled model again with cuDNN's heuristic choice and times both. When the
heuristics are as fast, within ``TOLERANCE`` at every compiled batch, the engine keeps them and loads
without searching; otherwise it keeps the searched algorithms and pays the search at load.

The heuristic capture runs on a thread of its own. PyTorch looks a convolution up in its cache of
chosen plans before it reads the flag, and that cache is per thread (``benchmark_cache`` in
``aten/src/ATen/native/cudnn/Conv_v8.cpp``): on the build's thread, with the flag off, every
convolution would replay the plan the search chose, and the comparison would measure nothing.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ...errors import BuildError
from ...signature import Signature
from .common import _torch, example_inputs
from .compile import _GraphedRunner

TOLERANCE = 0.02  # the heuristics may be this much slower at a batch and still win: the load time is the prize
ROUNDS = 7
CALLS_PER_ROUND = 10


def wanted_search(value: Any, cuda: bool) -> bool | str:
    """The ``cudnn_benchmark`` option read: "auto", True or False (off wherever there is no cuDNN)."""
    if value is None:
        value = "auto"
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        value = {"auto": "auto", "true": True, "false": False}[value.lower()]
    if value not in ("auto", True, False):
        raise BuildError(f"cudnn_benchmark must be auto, true or false, not {value!r}")
    return value if cuda else False


def has_convolutions(program) -> bool:
    """Whether the exported program calls any convolution (the only ops cuDNN's search is for)."""
    for node in program.graph.nodes:
        if node.op == "call_function" and "conv" in getattr(node.target, "__name__", str(node.target)):
            return True
    return False


def keeps_heuristics(search_ms: Mapping[str, float], heuristic_ms: Mapping[str, float],
                     tolerance: float = TOLERANCE) -> bool:
    """Whether the heuristic algorithms are fast enough at every batch timed (milliseconds per call)."""
    return bool(search_ms) and all(heuristic_ms[batch] <= search_ms[batch] * (1 + tolerance) for batch in search_ms)


def _time_ms(runner: Callable, inputs: tuple, device: str) -> float:
    torch = _torch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        start.record()
        for _ in range(CALLS_PER_ROUND):
            runner(*inputs)
        end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / CALLS_PER_ROUND


def _on_fresh_thread(make: Callable[[], Callable], device: str) -> Callable:
    """``make()`` on a new thread, whose cache of cuDNN plans is empty (this thread waits for it)."""
    torch = _torch()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with torch.cuda.device(device):
                outcome["runner"] = make()
        except BaseException as exc:  # noqa: BLE001 - raised again on the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="enginesmith-cudnn-heuristics")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["runner"]


def compare_search(searched: Callable, make_runner: Callable[[], Callable], inputs_per_batch: Mapping[int, tuple],
                   device: str) -> tuple[Callable, dict[str, dict[str, float]]]:
    """``make_runner()`` under cuDNN's heuristics against ``searched`` (built with the search), timed in
    alternating rounds at each batch; returns the heuristic runner and ``{batch: {"search": ms, "heuristics": ms}}``.

    The process-wide flag is put back on afterwards: code that turned it on may rely on it.
    """
    torch = _torch()
    torch.backends.cudnn.benchmark = False
    try:
        heuristic = _on_fresh_thread(make_runner, device)
        rounds: dict[int, tuple[list[float], list[float]]] = {batch: ([], []) for batch in inputs_per_batch}
        for batch, inputs in inputs_per_batch.items():
            _time_ms(heuristic, inputs, device)  # an untimed round first, as the searched runner had its calls
            for _ in range(ROUNDS):
                rounds[batch][0].append(_time_ms(searched, inputs, device))
                rounds[batch][1].append(_time_ms(heuristic, inputs, device))
    finally:
        torch.backends.cudnn.benchmark = True
    timings = {str(batch): {"search": round(statistics.median(a), 4), "heuristics": round(statistics.median(b), 4)}
               for batch, (a, b) in rounds.items()}
    return heuristic, timings


def settle_cudnn_search(meta: dict[str, Any], program, compiled: Callable, graphed_from: Callable | None,
                        signature: Signature, log: list[str]) -> tuple[Callable, dict[str, dict[str, float]]]:
    """Turn ``meta["cudnn_benchmark"] == "auto"`` into True or False; returns the runner to keep and the timings.

    Only runners in CUDA graphs can be compared (a graph freezes the algorithms its capture ran; an
    uncaptured runner would follow the process flag on every call): elsewhere "auto" keeps the search.
    """
    if meta["cudnn_benchmark"] != "auto":
        return compiled, {}
    if not has_convolutions(program):
        meta["cudnn_benchmark"] = False
        log.append("cuDNN algorithm search off: the model has no convolutions")
        return compiled, {}
    if graphed_from is None or not getattr(compiled, "captured", False):
        meta["cudnn_benchmark"] = True
        log.append("cuDNN algorithm search kept (not timed against the heuristics: the engine runs without CUDA graphs)")
        return compiled, {}
    device, batches = meta["device"], list(meta["batches"])
    known = meta.get("example_shapes")
    inputs = {batch: tuple(example_inputs(signature, batch, device, seed=batch, known=known)) for batch in batches}
    notes: list[str] = []
    heuristic, timings = compare_search(compiled, lambda: _GraphedRunner(graphed_from, signature, device, batches,
                                                                           notes, known), inputs, device)
    search_ms = {batch: t["search"] for batch, t in timings.items()}
    heuristic_ms = {batch: t["heuristics"] for batch, t in timings.items()}
    text = ", ".join(f"batch {batch} {t['search']:.3f} ms searched / {t['heuristics']:.3f} ms heuristic"
                     for batch, t in timings.items())
    if getattr(heuristic, "captured", False) and keeps_heuristics(search_ms, heuristic_ms):
        meta["cudnn_benchmark"] = False
        log.append(f"cuDNN heuristics kept, no algorithm search at load ({text}; within {TOLERANCE:.0%})")
        return heuristic, timings
    meta["cudnn_benchmark"] = True
    log.append(f"cuDNN algorithm search kept: it pays at run time ({text})")
    del heuristic
    _torch().cuda.empty_cache()
    return compiled, timings
