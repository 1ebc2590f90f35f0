"""Warm load of CPU torch engines with and without the compiled kernel libraries they carry (issue 15).

PyTorch's cache artifacts leave out the shared libraries Inductor compiles from a CPU graph's C++, so a
load in a fresh process ran the C++ compiler again; a CPU engine now carries them
(``backends/torch_compile/native_kernels.py``). For transformers architectures with seeded random
weights, this script builds one CPU engine each, then loads it in fresh processes with empty Inductor
cache folders, alternating a load that installs the libraries with one that leaves them out
(``ENGINESMITH_TORCH_KERNEL_LIBRARIES=0``, the previous behaviour), and checks both answer alike.

    python benchmarks/torch_cpu_warm_load.py [--models resnet50,mobilenet_v2,bert_small] [--repeats 3]
        [--json benchmarks/results/torch_cpu_warm_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import enginesmith as es
from enginesmith.bench import write_atomic

sys.path.insert(0, str(Path(__file__).parent))
from cpu_engines import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
INSTALL_ENV = "ENGINESMITH_TORCH_KERNEL_LIBRARIES"
# One fresh process: load, count the C++ libraries compiled on the way, answer one input.
LOAD_SCRIPT = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import torch, enginesmith as es
from torch._inductor import cpp_builder
built = []
plain = cpp_builder.CppBuilder.build
cpp_builder.CppBuilder.build = lambda self, *a, **k: built.append(self.get_target_file_path()) or plain(self, *a, **k)
t = time.perf_counter()
engine = es.load(sys.argv[1], trust_code=True)
load_s = time.perf_counter() - t
feeds = {k: np.load(sys.argv[2])[k] for k in engine.signature.input_names}
first = engine.infer(feeds)[engine.signature.output_names[0]]
print(json.dumps({"import_s": t - t0, "load_s": load_s, "libraries_compiled": sum(p.endswith(".so") for p in built),
                  "steps": engine._session.load_steps, "cache": engine._session.cache_info,
                  "first_output": first.ravel()[:64].tolist()}))
"""


def make_model(name: str) -> tuple[Any, dict[str, np.ndarray]]:
    """A transformers architecture with seeded random weights, and its inputs at batch 1."""
    import torch
    import transformers

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if name == "resnet50":
        model = transformers.ResNetModel(transformers.ResNetConfig())
        feeds = {"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    elif name == "mobilenet_v2":
        model = transformers.MobileNetV2Model(transformers.MobileNetV2Config())
        feeds = {"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    elif name == "bert_small":
        model = transformers.BertModel(transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                               intermediate_size=1024))
        feeds = {"input_ids": rng.integers(0, 30000, (1, 64)).astype(np.int64),
                 "attention_mask": np.ones((1, 64), np.int64)}
    else:
        raise SystemExit(f"unknown model {name!r}: resnet50, mobilenet_v2 or bert_small")
    return model.eval(), feeds


def load_fresh(engine: Path, feeds: Path, install: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="warm-load-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, INSTALL_ENV: "1" if install else "0"}
        done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(engine), str(feeds)], capture_output=True,
                              text=True, env=env, timeout=900)
    if done.returncode:
        raise RuntimeError(f"the load failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, repeats: int, folder: Path) -> dict[str, Any]:
    import torch
    from enginesmith.importers import ImportOptions

    model, feeds = make_model(name)
    started = time.perf_counter()
    engine = es.build(model, backend="torch", verify=False, backend_options={"device": "cpu", "mode": "default"},
                      import_options=ImportOptions(example_inputs={k: torch.from_numpy(v) for k, v in feeds.items()}))
    build_s = time.perf_counter() - started
    path = engine.save(folder / f"{name}.engine")
    np.savez(folder / f"{name}.npz", **feeds)
    libraries = [line for line in engine.manifest.build_log if "compiled kernel libraries" in line]
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for repeat in range(repeats):
        for label in (("without", "with") if repeat % 2 == 0 else ("with", "without")):
            runs[label].append(load_fresh(path, folder / f"{name}.npz", install=label == "with"))
            print(f"{name} {label} libraries: load {runs[label][-1]['load_s']:.2f} s, "
                  f"{runs[label][-1]['libraries_compiled']} compiled", flush=True)
    same = all(np.allclose(a["first_output"], b["first_output"], rtol=1e-5, atol=1e-6)
               for a in runs["with"] for b in runs["without"])
    median = {label: statistics.median(r["load_s"] for r in found) for label, found in runs.items()}
    return {"model": name, "build_s": round(build_s, 1), "engine_mib": round(path.stat().st_size / 2**20, 2),
            "build_log_libraries": libraries[0] if libraries else None, "load_s_median": median,
            "speedup": median["without"] / median["with"], "same_answers": same, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2,bert_small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "torch_cpu_warm_load.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="enginesmith-warm-") as tmp:
        records = [measure(name, args.repeats, Path(tmp)) for name in args.models.split(",")]
    print(f"\n{'model':<14} {'build s':>8} {'engine MiB':>10} {'load s without':>15} {'load s with':>12} {'speed-up':>9}  same answers")
    for r in records:
        print(f"{r['model']:<14} {r['build_s']:>8} {r['engine_mib']:>10} {r['load_s_median']['without']:>15.2f} "
              f"{r['load_s_median']['with']:>12.2f} {r['speedup']:>8.2f}x  {r['same_answers']}")
    write_atomic(args.json, json.dumps({"benchmark": "torch_cpu_warm_load", "machine": machine(),
                                        "command": " ".join(sys.argv), "repeats": args.repeats, "models": records},
                                       indent=1).encode())
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
