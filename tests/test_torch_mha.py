"""nn.MultiheadAttention self-attention from views of its projection (backends/torch_compile/mha.py).

The swap is device-independent: the CPU checks that swapped modules give the original's outputs,
that the exported program no longer copies the projection before attention, which calls stay
with the original module, and that an engine built with ``fuse_mha`` matches its source.
ENGINESMITH_TEST_DEVICE=cuda runs the engine test on the GPU; torchvision's ViT runs where
torchvision is installed.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from enginesmith.backends import BuildOptions, get_backend  # noqa: E402
from enginesmith.backends.torch_compile.mha import pack_self_attention  # noqa: E402
from enginesmith.errors import BuildError  # noqa: E402
from enginesmith.signature import Signature, TensorSpec  # noqa: E402

DEVICE = os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("ENGINESMITH_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)


class Block(torch.nn.Module):
    """A ViT-style encoder block (self-attention, batch first), then attention calls the swap must leave alone:
    cross-attention, a key padding mask, and weights asked for; and a sequence-first module it must not swap."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        self.self_attention = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.other = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.seq_first = torch.nn.MultiheadAttention(16, 2)

    def forward(self, x, memory):
        y = self.norm(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        cross, _ = self.other(x, memory, memory, need_weights=False)
        masked, _ = self.other(x, x, x, key_padding_mask=torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device), need_weights=False)
        weighted, weights = self.other(x, x, x)
        first, _ = self.seq_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)
        return x + cross + masked + weighted + first.transpose(0, 1), weights


def _ops(module, target) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function" and n.target is target)


def test_swapped_self_attention_gives_the_same_outputs_without_copying_the_projection():
    module = Block().eval()
    swapped = copy.deepcopy(module)
    assert pack_self_attention(swapped) == 2  # the two batch-first modules; the sequence-first one stays
    x, memory = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    with torch.no_grad():
        for got, want in zip(swapped(x, memory), module(x, memory)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    batch = torch.export.Dim("batch", min=1, max=64)
    shapes = {"x": {0: batch}, "memory": {0: batch}}
    before = torch.export.export(module, (x, memory), dynamic_shapes=shapes).module()
    after = torch.export.export(swapped, (x, memory), dynamic_shapes=shapes).module()
    contiguous = torch.ops.aten.contiguous.default
    # Five attention calls hold the projection's contiguous copy before; only the swapped self-attention drops it.
    assert _ops(before, contiguous) - _ops(after, contiguous) == 1
    with torch.no_grad():
        x, memory = torch.randn(2, 7, 16), torch.randn(2, 5, 16)  # the batch stays dynamic
        for got, want in zip(after(x, memory), module(x, memory)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_torchvisions_vision_transformer_runs_its_attention_from_views():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                  mlp_dim=32, num_classes=10).eval()
    swapped = copy.deepcopy(module)
    assert pack_self_attention(swapped) == 2
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(swapped, (x,)).module()
    assert _ops(program, torch.ops.aten.contiguous.default) == 0
    with torch.no_grad():
        np.testing.assert_allclose(program(x).numpy(), module(x).numpy(), rtol=1e-5, atol=1e-5)


def test_engines_built_with_fuse_mha_match_the_module_and_leave_it_alone():
    module = Block().eval()
    signature = Signature((TensorSpec("x", "float32", ("batch", 7, 16)), TensorSpec("memory", "float32", ("batch", 5, 16))),
                          (TensorSpec("out", "float32", ("batch", 7, 16)), TensorSpec("weights", "float32", ("batch", 7, 7))))
    backend = get_backend("torch")
    options = {"device": DEVICE, "batches": [2], "mode": "reduce-overhead"}  # on CUDA fuse_mha is on by default
    if not DEVICE.startswith("cuda"):
        options.update({"fuse_mha": True, "compile": "eager", "mode": "default"})
    result = backend.build(module, signature, BuildOptions(backend_options=options))
    assert result.details["fuse_mha"] is True
    assert "read from views of its projection: 2 modules" in " ".join(result.log)
    assert isinstance(module.self_attention, torch.nn.MultiheadAttention)  # the user's module is not changed
    session = backend.load(result.payload, result.resolved_options, signature)
    rng = np.random.default_rng(1)
    x, memory = rng.standard_normal((2, 7, 16)).astype(np.float32), rng.standard_normal((2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x), torch.from_numpy(memory))
    got = session.run({"x": x, "memory": memory})
    np.testing.assert_allclose(got["out"], want[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["weights"], want[1].numpy(), rtol=1e-4, atol=1e-5)
    eager = {"device": "cpu", "compile": "eager"}
    assert backend.build(module, signature, BuildOptions(backend_options=eager)).details["fuse_mha"] is False
    with pytest.raises(BuildError, match="fuse_mha must be auto, true or false"):
        backend.build(module, signature, BuildOptions(backend_options={**eager, "fuse_mha": "yes"}))
