"""cuDNN-fused convolution epilogues of the PyTorch backend (backends/torch_compile/fusion.py).

On the CPU the fused operators compute the unfused reference, so these tests check the
rewrite itself (which chains are fused, which are left alone) and that engines built with
it give the exported program's results. With ENGINESMITH_TEST_DEVICE=cuda (the GPU
machine, scripts/gpu_torch_backend.sh) the same tests run cuDNN's fused kernels.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from enginesmith.backends import BuildOptions, get_backend  # noqa: E402
from enginesmith.backends import torch_compile as tc  # noqa: E402
from enginesmith.backends.torch_compile.fusion import _NO_FUSED_KERNEL, fuse_conv_epilogues  # noqa: E402
from enginesmith.errors import BuildError  # noqa: E402
from enginesmith.signature import Signature, TensorSpec  # noqa: E402

DEVICE = os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu")
CUDA = DEVICE.startswith("cuda")
if CUDA and not torch.cuda.is_available():
    pytest.skip("ENGINESMITH_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)
# cuDNN may use TF32 for fp32 convolutions; the CPU reference is exact.
TOL = {"rtol": 2e-2, "atol": 2e-3} if CUDA else {"rtol": 1e-5, "atol": 1e-6}


class Chains(torch.nn.Module):
    """Every chain the rewrite must fuse, and every one it must leave alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)  # conv -> relu_ : fused
        self.body = torch.nn.Conv2d(8, 8, 3, padding=1)  # conv -> + residual -> relu: fused with the residual
        self.strided = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)  # no bias, stride 2: fused
        self.shared = torch.nn.Conv2d(8, 8, 1)  # its output is read twice: left alone
        self.broadcast = torch.nn.Conv2d(8, 8, 3, padding=1)  # + a [1, 8, 1, 1] tensor: left alone (no broadcasting)
        self.offset = torch.nn.Parameter(torch.randn(1, 8, 1, 1))
        self.no_relu = torch.nn.Conv2d(8, 8, 3, padding=1)  # conv -> add without relu: left alone

    def forward(self, x):
        a = torch.relu_(self.stem(x))
        b = torch.relu(self.body(a) + a)
        c = torch.relu(self.strided(b))
        s = self.shared(c)
        d = torch.relu(s) + s
        e = torch.relu(self.broadcast(d) + self.offset)
        return self.no_relu(e) + e


SIGNATURE = Signature((TensorSpec("x", "float32", ("batch", 3, 16, 16)),), (TensorSpec("y", "float32", ("batch", 8, 8, 8)),))


def _targets(module) -> list[str]:
    return [str(n.target) for n in module.graph.nodes if n.op == "call_function"]


def test_rewrite_fuses_single_use_relu_and_residual_chains_only():
    module = Chains().eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(module, (x,))
    fused = program.module()
    counts = fuse_conv_epilogues(fused)
    assert counts == {"conv+bn folded": 0, "conv+relu": 2, "conv+add+relu": 1}
    targets = _targets(fused)
    assert targets.count("aten.conv2d.default") == 3  # shared, broadcast, no_relu
    assert targets.count("enginesmith.conv2d_relu.default") == 2
    assert targets.count("enginesmith.conv2d_add_relu.default") == 1
    with torch.no_grad():
        np.testing.assert_allclose(fused(x).numpy(), module(x).numpy(), rtol=1e-5, atol=1e-6)
    assert fuse_conv_epilogues(fused) == {"conv+bn folded": 0, "conv+relu": 0, "conv+add+relu": 0}  # nothing left


class BatchNormBlock(torch.nn.Module):
    """A PyTorch ResNet block as torchvision writes it: Conv -> BatchNorm -> ReLU, and a residual add."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.probe, self.bn3 = torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8)  # its output is read twice
        for norm in (self.bn1, self.bn2, self.bn3):  # statistics far from the identity, or folding proves nothing
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.3, 3.0)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.3, 0.3)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)) + a)
        p = self.probe(b)
        return torch.relu(self.bn3(p)) + p


def test_batch_norm_after_a_convolution_is_folded_so_the_relu_fuses():
    module = BatchNormBlock().eval()
    x = torch.randn(2, 3, 12, 12)
    fused = torch.export.export(module, (x,)).module()
    assert fuse_conv_epilogues(fused) == {"conv+bn folded": 2, "conv+relu": 1, "conv+add+relu": 1}
    targets = _targets(fused)
    assert targets.count("aten.batch_norm.default") == 1 and targets.count("aten.conv2d.default") == 1  # the probe
    with torch.no_grad():
        np.testing.assert_allclose(fused(x).numpy(), module(x).numpy(), rtol=1e-4, atol=1e-5)


def test_fuse_conv_is_off_by_default_on_the_cpu_and_checked():
    backend = get_backend("torch")
    module = Chains().eval()
    eager = {"device": "cpu", "compile": "eager"}
    assert backend.build(module, SIGNATURE, BuildOptions(backend_options=eager)).details["fuse_conv"] is False
    with pytest.raises(BuildError, match="fuse_conv must be auto, dense, all, true or false"):
        backend.build(module, SIGNATURE, BuildOptions(backend_options={**eager, "fuse_conv": "yes"}))
    with pytest.raises(BuildError, match="fuse_conv cannot be combined with compile=aoti"):
        backend.build(module, SIGNATURE, BuildOptions(backend_options={"device": "cpu", "compile": "aoti", "fuse_conv": True}))


class DepthwiseBlock(torch.nn.Module):
    """A MobileNet block: depthwise conv -> ReLU, then a dense 1x1 conv -> ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = torch.nn.Conv2d(8, 16, 1)

    def forward(self, x):
        return torch.relu(self.pointwise(torch.relu(self.depthwise(x))))


def test_dense_mode_leaves_grouped_convolutions_alone():
    module = DepthwiseBlock().eval()
    x = torch.randn(2, 8, 10, 10)
    dense = torch.export.export(module, (x,)).module()
    assert fuse_conv_epilogues(dense, grouped=False)["conv+relu"] == 1
    targets = _targets(dense)
    assert targets.count("aten.conv2d.default") == 1 and targets.count("enginesmith.conv2d_relu.default") == 1
    every = torch.export.export(module, (x,)).module()
    assert fuse_conv_epilogues(every)["conv+relu"] == 2
    with torch.no_grad():
        want = module(x).numpy()
        np.testing.assert_allclose(dense(x).numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(every(x).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Chains", "BatchNormBlock"])
def test_fused_engine_compiles_loads_again_and_matches_the_module(name):
    module = {"Chains": Chains, "BatchNormBlock": BatchNormBlock}[name]().eval()
    size, out = (16, (8, 8, 8)) if name == "Chains" else (12, (8, 12, 12))
    signature = Signature((TensorSpec("x", "float32", ("batch", 3, size, size)),), (TensorSpec("y", "float32", ("batch", *out)),))
    backend = get_backend("torch")
    options = {"device": DEVICE, "fuse_conv": True, "batches": [2],
               "mode": "reduce-overhead" if CUDA else "default"}
    result = backend.build(module, signature, BuildOptions(backend_options=options))
    assert "cuDNN fused epilogues" in " ".join(result.log) and "conv+add+relu x1" in " ".join(result.log)
    assert result.details["fuse_conv"] == "all"  # true: every convolution
    assert all(err < 1e-2 for err in result.details["compiled_vs_exported_rel_l2"].values())
    tc._HANDOFF.clear()  # load for real: the rewrite is applied again before compiling
    session = backend.load(result.payload, result.resolved_options, signature)
    for batch in (2, 3):  # 2 compiled ahead (on CUDA), 3 runs the fused module uncompiled there
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run({"x": x})["y"], want, **TOL)


@pytest.mark.skipif(not CUDA, reason="cuDNN's fused kernels need ENGINESMITH_TEST_DEVICE=cuda")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cudnn_runs_the_fused_kernels_in_channels_last(dtype):
    dt = getattr(torch, dtype)
    x = torch.randn(4, 16, 14, 14, device=DEVICE, dtype=dt).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, device=DEVICE, dtype=dt).contiguous(memory_format=torch.channels_last) * 0.1
    b = torch.randn(32, device=DEVICE, dtype=dt)
    z = torch.randn(4, 32, 14, 14, device=DEVICE, dtype=dt).contiguous(memory_format=torch.channels_last)
    _NO_FUSED_KERNEL.clear()
    with torch.no_grad():
        got = torch.ops.enginesmith.conv2d_add_relu(x, w, z, b, [1, 1], [1, 1], [1, 1], 1)
        want = torch.relu(torch.nn.functional.conv2d(x.float(), w.float(), b.float(), 1, 1) + z.float())
    assert not _NO_FUSED_KERNEL, "cuDNN refused the fused kernel and the unfused fallback ran"
    assert got.is_contiguous(memory_format=torch.channels_last)
    rel = float((got.float() - want).norm() / want.norm())
    assert rel < (1e-2 if dtype == "float16" else 2e-3), rel
