"""benchmarks/gpu_zoo.py's CPU dry run: the per-model step runs end to end on a toy YOLO-like model and its
JSON holds timings and accuracy for eager and both engine paths (the GPU run is scripts/gpu_zoo.sh)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def run_one_on_the_cpu(tmp_path: Path, *flags: str) -> dict:
    """``gpu_zoo.py one`` on the toy YOLO, quickly, in its own process; the record it wrote."""
    out = tmp_path / "yolo_tiny.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_zoo.py"), "one", "--model", "yolo_tiny", "--device", "cpu", "--quick",
         *flags, "--runs", "2", "--warmup", "1", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_cpu_dry_run_of_one_model(tmp_path):
    record = run_one_on_the_cpu(tmp_path, "--skip-warm-load")
    assert "error" not in record, record.get("error")
    rows = {(row["variant"], row["batch"]): row for row in record["rows"]}
    for variant in ("eager fp32", "engine (from module)", "engine (from ONNX)"):
        for batch in (1, 4):
            row = rows[(variant, batch)]
            assert "error" not in row, row
            assert row["p50_ms"] > 0 and row["rel_l2"] < 1e-4
    assert record["builds"]["engine (from module)"]["details"]["source"] == "torch"
    assert record["builds"]["engine (from ONNX)"]["details"]["source"] == "onnx"


def test_skip_engine_times_the_model_without_building_engines(tmp_path):
    """--skip-engine (a baseline compile too long to share a deadline with the engines): eager rows only on the CPU,
    and no engine built or recorded."""
    record = run_one_on_the_cpu(tmp_path, "--skip-engine")
    assert {(row["variant"], row["batch"]) for row in record["rows"]} == {("eager fp32", 1), ("eager fp32", 4)}
    assert record["builds"] == {} and not list((tmp_path / "work").glob("*.engine"))


def _benchmark(name: str):
    """A module of benchmarks/ (not a package), imported by name."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_random_weights_are_made_non_degenerate_before_accuracy_is_measured():
    """The H200 run read rel L2 1.0 for EfficientNet-B0/MobileNetV3 (outputs underflowing fp16 through BatchNorm
    layers with untrained statistics) and 0.0 for ViT (a zero-initialised head): both models stand-ins here."""
    import numpy as np
    import torch

    zoo = _benchmark("gpu_zoo")
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        torch.nn.init.normal_(conv.weight, std=0.01)
        layers += [conv, torch.nn.BatchNorm2d(8), torch.nn.ReLU()]
    head = torch.nn.Linear(8, 4)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.body = torch.nn.Sequential(*layers)
            self.head = head

        def forward(self, x):
            features = self.body(self.stem(x))
            return features, self.head(features.mean((2, 3)))

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    net = Net().eval()
    with torch.no_grad():
        features, logits = net(x)
    assert not torch.any(logits) and not torch.any(features.half())  # degenerate: all zero, all zero in fp16
    assert zoo.accuracy([logits.numpy()], [logits.numpy()], "vision")["degenerate_reference"]
    zoo.non_degenerate(net, {"x": x.numpy()})
    assert not net.training
    with torch.no_grad():
        features, logits = net(x)
    assert float(features.std()) > 0.1 and float(logits.abs().mean()) > 1e-4
    half = net.half()
    with torch.no_grad():
        got = [t.float().numpy() for t in half(x.half())]
    result = zoo.accuracy(got, [features.numpy(), logits.numpy()], "vision")
    assert result["rel_l2"] < 2e-2 and result["cosine"] > 0.999 and "degenerate_reference" not in result


def test_brief_training_learns_the_synthetic_task_for_classifiers_and_detectors():
    """``--train-steps``: a classifier ([N, classes] logits) and a detector-shaped model ([N, 4 + classes,
    anchors] probabilities) both learn to tell the prototypes apart; the task's images are seeded."""
    import numpy as np
    import torch

    zoo_training = _benchmark("zoo_training")
    protos = zoo_training.prototypes(16)
    assert protos.shape == (zoo_training.CLASSES, 3, 16, 16)
    a, labels_a = zoo_training.task_images(protos, 8, seed=3)
    b, labels_b = zoo_training.task_images(protos, 8, seed=3)
    assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b) and a.dtype == np.float32

    def body() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())

    class Detector(torch.nn.Module):  # 3 classes: fewer than the task has, so the task shrinks to 3
        def __init__(self):
            super().__init__()
            self.body, self.head = body(), torch.nn.Conv2d(16, 4 + 3, 1)

        def forward(self, x):
            y = self.head(self.body(x)).flatten(2)
            return torch.cat([y[:, :4], y[:, 4:].sigmoid()], 1)

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(body(), torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 1000))
    for module, classes in ((classifier, zoo_training.CLASSES), (Detector(), 3)):
        record = zoo_training.train_briefly(module, protos, steps=60, device="cpu")
        assert record["classes"] == classes and record["steps"] == 60
        assert not module.training
        assert record["held_out_accuracy"] >= 0.9, record


def test_batch_norm_statistics_are_recomputed_as_averages_over_fresh_batches():
    """After brief training, layers with a small momentum (torchvision's MobileNetV3: 0.01) keep statistics of the
    random initialisation; ``recalibrate_batch_norm`` replaces them by plain averages and restores the momentum."""
    import torch

    zoo_training = _benchmark("zoo_training")
    norm = torch.nn.BatchNorm2d(3, momentum=0.01)
    norm.running_mean.fill_(7.0)
    norm.running_var.fill_(0.01)
    module = torch.nn.Sequential(norm, torch.nn.ReLU())
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=generator) * 2.0 + torch.tensor([1.0, -3.0, 0.5])[:, None, None]
               for _ in range(6)]
    drawn = iter(batches)
    zoo_training.recalibrate_batch_norm(module, lambda: next(drawn), batches=len(batches))
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(norm.running_mean, means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var, variances, rtol=1e-5, atol=1e-5)
    assert norm.momentum == 0.01 and int(norm.num_batches_tracked) == len(batches)
