"""Cold build of a torch module with the PyTorch backend: the ONNX export alongside the build vs before it (issue 15).

A build from a torch source compiles the module's own ``torch.export`` program; its ONNX export is
needed only for the bundle's records and other backends, so it now runs in a child process while the
engine builds (``importers/onnx_job.py``). This script measures what that saves, in one run:

- ``sequential`` (``--option onnx_export=before``, the previous pipeline): ONNX export in the import stage,
  operator check, inputs probed with ONNX Runtime, graph passes, build;
- ``alongside`` (``onnx_export=alongside``; ``auto``, the default, picks it from 4 usable cores);
- ``torch.compile``: what a user does by hand, ``torch.compile(module)`` and the first calls at the
  batches the engine compiles (the issue's target: a cold build no slower than this).

Every measurement is a fresh process with empty Inductor/Triton cache folders (a cold build as a user
first sees it); the modes alternate within each repeat and the table shows medians.

    python benchmarks/torch_source_build.py --repeats 3                      # CPU, small BERT + CNN
    python benchmarks/torch_source_build.py --device cuda --models bert_base,minilm --mode max-autotune
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("sequential", "alongside", "torch.compile")
# name -> (BertConfig keyword arguments, sequence length) for encoders, or None for the CNN
MODELS = {
    "bert_small": ({"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}, 64),
    "minilm": ({"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}, 128),
    "bert_base": ({"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}, 128),
    "cnn": None,
}


def make_model(name: str):
    """(module, example inputs) with seeded random weights; no downloads."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    spec = MODELS[name]
    if spec is None:
        def block(cin: int, cout: int, stride: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        module = nn.Sequential(block(3, 32, 2), block(32, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2),
                               block(128, 128, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
        return module, (torch.randn(2, 3, 64, 64),)
    from transformers import BertConfig, BertModel

    config, length = spec
    module = BertModel(BertConfig(vocab_size=1000, max_position_embeddings=512, **config)).eval()
    example = {"input_ids": torch.randint(0, 1000, (2, length)), "attention_mask": torch.ones(2, length, dtype=torch.int64)}
    return module, example


def one(name: str, mode: str, device: str, compile_mode: str | None) -> dict:
    """One cold build (or plain torch.compile) in this process; seconds and where they went."""
    import torch

    import enginesmith as es
    from enginesmith.importers import ImportOptions

    module, example = make_model(name)
    if mode == "torch.compile":
        args = example if isinstance(example, tuple) else ()
        kwargs = example if isinstance(example, dict) else {}
        module = module.to(device)
        started = time.perf_counter()
        compiled = torch.compile(module, **({"mode": compile_mode} if compile_mode else {}))
        with torch.no_grad():
            for batch in (2, 1):  # the batches the engine compiles on the CPU (dynamic batch)
                compiled(*[a[:batch].to(device) for a in args], **{k: v[:batch].to(device) for k, v in kwargs.items()})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"seconds": round(time.perf_counter() - started, 2)}
    options = {"device": device, "compile": "inductor", "onnx_export": "before" if mode == "sequential" else "alongside",
               **({"mode": compile_mode} if compile_mode else {})}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        engine = es.build(module, backend="torch", backend_options=options, output=Path(tmp) / "model.engine",
                          import_options=ImportOptions(example_inputs=example))
        seconds = time.perf_counter() - started
    checks = engine.manifest.checks
    return {"seconds": round(seconds, 2), "stages": checks.get("stages"), "onnx_export": checks.get("onnx_export"),
            "compile_seconds": checks["build"].get("compile_seconds")}


def measure(name: str, mode: str, device: str, compile_mode: str | None) -> dict:
    """:func:`one` in a fresh process with empty compiler caches."""
    with tempfile.TemporaryDirectory(prefix="torch-source-build-") as caches:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(caches) / "inductor"),
               "TRITON_CACHE_DIR": str(Path(caches) / "triton")}
        command = [sys.executable, str(Path(__file__)), "one", name, mode, "--device", device]
        if compile_mode:
            command += ["--mode", compile_mode]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = ["| model | sequential s | alongside s | saved | torch.compile s | ONNX export s (alongside) | waited s |",
             "|---|---|---|---|---|---|---|"]
    for name, by_mode in results["models"].items():
        med = {mode: by_mode[mode]["median_s"] for mode in MODES if by_mode[mode].get("median_s") is not None}
        runs = [r for r in by_mode["alongside"]["runs"] if r.get("onnx_export")]
        export = statistics.median(r["onnx_export"]["seconds"] for r in runs) if runs else None
        waited = statistics.median(r["onnx_export"]["waited_s"] for r in runs) if runs else None

        def cell(value):
            return "-" if value is None else f"{value:.1f}"

        saved = (f"{med['sequential'] - med['alongside']:.1f} s ({1 - med['alongside'] / med['sequential']:.0%})"
                 if "sequential" in med and "alongside" in med else "-")
        lines.append(f"| {name} | {cell(med.get('sequential'))} | {cell(med.get('alongside'))} | {saved} | "
                     f"{cell(med.get('torch.compile'))} | {cell(export)} | {cell(waited)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "one"))
    parser.add_argument("model", nargs="?")
    parser.add_argument("which", nargs="?", choices=MODES)
    parser.add_argument("--models", default="bert_small,cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default=None, help="torch.compile mode for the engine and the baseline (default: theirs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "torch_source_build_cpu.json")
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(one(args.model, args.which, args.device, args.mode)))
        return
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]}: choose among {', '.join(MODELS)}")
    results: dict = {"device": args.device, "mode": args.mode, "repeats": args.repeats, "cpu_count": os.cpu_count(),
                     "machine": platform.machine(), "python": platform.python_version(),
                     "load_average_start": os.getloadavg(), "models": {}}
    for name in names:
        by_mode = {mode: {"runs": []} for mode in MODES}
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                run = measure(name, mode, args.device, args.mode)
                by_mode[mode]["runs"].append(run)
                print(f"{name} {mode} #{repeat + 1}: {run.get('seconds', run.get('error'))}", file=sys.stderr, flush=True)
        for mode in MODES:
            seconds = [r["seconds"] for r in by_mode[mode]["runs"] if "seconds" in r]
            by_mode[mode]["median_s"] = statistics.median(seconds) if seconds else None
        results["models"][name] = by_mode
    results["load_average_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
