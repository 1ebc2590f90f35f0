"""``Engine.infer_device``: device-resident inputs and outputs.

The ONNX Runtime engine runs on host memory, so it refuses with a clear error (for real).
The checks ``infer_device`` makes before any device work (names, ranks, dims, batch) run
on CPU against a session that only echoes what it is handed: it stands for no backend
library, it only shows what the Engine passes on. The real device path (TensorRT, CUDA
tensors through DLPack) is tested at the end and skipped where ``import tensorrt`` fails.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import make_mlp, run_plain

import enginesmith as es
from enginesmith.backends.base import Session
from enginesmith.runtime.engine import DeviceIOUnsupportedError, Engine


def test_host_memory_engines_refuse_device_io(mlp_path):
    engine = es.build(mlp_path, backend="onnxruntime")  # "auto" may pick a device backend on a GPU machine
    assert not engine.supports_device_io
    with pytest.raises(DeviceIOUnsupportedError, match=r"this onnxruntime engine runs on host memory only.*engine\.infer\(\)"
                                                      r".*--backend tensorrt"):
        engine.infer_device({"x": np.zeros((1, 6), np.float32)})
    assert issubclass(DeviceIOUnsupportedError, es.EnginesmithError)


class _EchoSession(Session):
    """Hands back what it was given: shows what Engine.infer_device passes to a device-capable session."""

    supports_device_io = True

    def __init__(self) -> None:
        self.calls: list[tuple[dict, dict | None]] = []

    def run(self, feeds):  # pragma: no cover - the host path is not used here
        raise AssertionError("infer_device must not use the host path")

    def run_device(self, feeds, outputs=None):
        self.calls.append((feeds, outputs))
        return {"probs": feeds["x"]}


@pytest.fixture
def echo_engine(mlp_path):
    manifest = es.build(mlp_path, backend="onnxruntime").manifest
    manifest.build_options["backend_options"]["max_batch"] = 8  # as a TensorRT engine's profile records it
    session = _EchoSession()
    return Engine(manifest, session), session


def test_device_feeds_go_to_the_session_untouched(echo_engine):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    engine, session = echo_engine
    x = torch.zeros((4, 6))
    out = torch.empty((4, 4))
    assert engine.infer_device({"x": x}, outputs={"probs": out})["probs"] is x
    feeds, outputs = session.calls[0]
    assert feeds["x"] is x and outputs["probs"] is out  # no copies, no casts


@pytest.mark.parametrize(
    "feeds, outputs, message",
    [
        ({"y": np.zeros((1, 6), np.float32)}, None, "unknown input 'y': this engine takes x"),
        ({}, None, "missing input 'x'"),
        ({"x": np.zeros((1, 6), np.float32)}, {"logits": None}, "unknown output 'logits': this engine returns probs"),
        ({"x": np.zeros((6,), np.float32)}, None, "must have rank 2"),
        ({"x": np.zeros((1, 5), np.float32)}, None, r"axis 1 is 5, the engine needs 6"),
        ({"x": np.zeros((9, 6), np.float32)}, None, "batch of 9 is larger than this engine's batch of 8, and infer_device does not split"),
        ({"x": [[0.0] * 6]}, None, "is a list, not a tensor"),
    ],
)
def test_device_feeds_are_checked_before_any_device_work(echo_engine, feeds, outputs, message):
    engine, session = echo_engine
    with pytest.raises(es.InputError, match=message):
        engine.infer_device(feeds, outputs)
    assert session.calls == []


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed: 'import tensorrt' failed")
def test_tensorrt_engine_takes_and_returns_cuda_tensors(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    monkeypatch.setenv("ENGINESMITH_CACHE_DIR", str(tmp_path / "cache"))
    engine = es.build(make_mlp(), backend="tensorrt")
    assert engine.supports_device_io
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    out = torch.empty((4, 4), device="cuda")
    engine.infer_device({"x": torch.from_numpy(x).cuda()}, outputs={"probs": out})
    np.testing.assert_allclose(out.cpu().numpy(), run_plain(make_mlp(), {"x": x})["probs"], rtol=1e-4, atol=1e-5)
    fresh = torch.from_dlpack(engine.infer_device({"x": torch.from_numpy(x).cuda()})["probs"])
    assert torch.allclose(fresh, out)
