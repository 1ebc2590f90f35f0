"""Which real ONNX models of the corpus the PyTorch backend builds, and whether they give ONNX Runtime's outputs.

For every ONNX model of the zoo manifest (``benchmarks/zoo/models.toml``) found in the local cache
(``zoo.py fetch`` fills it), this builds a torch engine on the CPU (``compile=eager``: the same
conversion and ``torch.export`` as on the GPU, without Inductor) from the manifest's sample, runs the
sample through it and through plain ONNX Runtime, and records the largest absolute difference, or
the error that stopped the build. A correctness and coverage probe, not a timing.

    PYTHONPATH=src python benchmarks/torch_coverage.py [--models a,b] [--json results/torch_coverage.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import zoo_corpus  # noqa: E402

CACHE = Path.home() / ".cache" / "enginesmith-zoo" / "models"


def probe(model: zoo_corpus.ZooModel, path: Path, workdir: Path) -> dict:
    import onnx
    import onnxruntime

    import enginesmith as es

    sample = model.sample(0)
    data = workdir / f"{model.id}.npz"
    np.savez(data, **sample)
    started = time.perf_counter()
    try:
        engine = es.build(str(path), backend="torch", data=str(data), verify=False,
                          backend_options={"device": "cpu", "compile": "eager"})
        got = engine.infer(sample)
        session = onnxruntime.InferenceSession(onnx.load(str(path)).SerializeToString(), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, sample)))
        diffs = [float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in want if want[k].dtype.kind == "f"]
        record = {"built": True, "max_abs_diff": max(diffs or [0.0]),
                  "served_shapes": engine.manifest.checks["build"].get("served_shapes")}
    except Exception as exc:  # noqa: BLE001 - a model that does not build is the result
        record = {"built": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma list of manifest ids (default: every cached ONNX model)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "torch_coverage.json"))
    args = parser.parse_args()
    wanted = set(filter(None, args.models.split(",")))
    results = {}
    with tempfile.TemporaryDirectory(prefix="torch-coverage-") as tmp:
        for model in zoo_corpus.load_manifest():
            files = sorted((CACHE / model.id).glob("*.onnx")) if (CACHE / model.id).is_dir() else []
            if not files or (wanted and model.id not in wanted):
                continue
            results[model.id] = {"package": model.package, "version": model.version, **probe(model, files[0], Path(tmp))}
            row = results[model.id]
            print(f"{model.id:28} {'built' if row['built'] else 'NOT BUILT':9} "
                  f"{format(row['max_abs_diff'], '.1e') if row['built'] else row['error'][:110]}", flush=True)
    built = sum(r["built"] for r in results.values())
    print(f"built {built} of {len(results)}")
    Path(args.json).write_text(json.dumps({"benchmark": "torch_coverage", "built": built, "models": len(results),
                                           "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
