"""Sibling linear layers merged into one product, and patch convolutions run as products
(backends/torch_compile/linear_fusion.py).

The rewrite is device-independent, so the CPU checks which layers merge (those sharing an
input, with constant weights of one width and dtype), that outputs stay the same, and that
engines built with it load again with the rewrite reapplied. ENGINESMITH_TEST_DEVICE=cuda
runs the engine test on the GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from enginesmith.backends import BuildOptions, get_backend  # noqa: E402
from enginesmith.backends import torch_compile as tc  # noqa: E402
from enginesmith.backends.torch_compile.linear_fusion import (  # noqa: E402
    concat_sibling_linears,
    matmuls_as_linears,
    patch_convs_as_linears,
)
from enginesmith.errors import BuildError  # noqa: E402
from enginesmith.signature import Signature, TensorSpec  # noqa: E402

DEVICE = os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("ENGINESMITH_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)


class Siblings(torch.nn.Module):
    """Q/K/V projections of one input (merged), a bias-free pair (merged apart from them), and layers left alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)
        self.a, self.b = torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(16, 4, bias=False)
        self.other_input = torch.nn.Linear(8, 16)  # reads another tensor: alone
        self.wide = torch.nn.Linear(32, 16)  # another input width: alone

    def forward(self, x, y):
        attn = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        gate = self.a(x) * self.b(x)
        return torch.cat([attn, self.other_input(attn), gate, self.wide(torch.cat([x, x], -1))], -1) + y.mean()


def _linears(module) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default)


def test_layers_sharing_an_input_become_one_product_with_the_same_outputs():
    module = Siblings().eval()
    x, y = torch.randn(2, 5, 16), torch.randn(3)
    merged = torch.export.export(module, (x, y)).module()
    assert _linears(merged) == 7
    assert concat_sibling_linears(merged) == 3  # q, k, v -> 1 (two fewer); a, b -> 1 (one fewer)
    assert _linears(merged) == 4
    with torch.no_grad():
        np.testing.assert_allclose(merged(x, y).numpy(), module(x, y).numpy(), rtol=1e-5, atol=1e-6)
    assert concat_sibling_linears(merged) == 0  # nothing left to merge
    names = {name for name, _ in merged.named_parameters()} | {name for name, _ in merged.named_buffers()}
    assert not any(name.startswith(("q.", "k.", "v.", "a.", "b.")) for name in names)  # the separate weights are gone


def test_a_real_transformers_encoder_merges_query_key_value_in_every_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=50)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 50, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    merged = torch.export.export(model, (ids, mask)).module()
    assert concat_sibling_linears(merged) == 2 * 2  # per layer: three projections -> one
    with torch.no_grad():
        got = merged(ids, mask)
        got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0]
        np.testing.assert_allclose(got.numpy(), model(ids, mask).last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)


def _build_and_load(module, signature: Signature, rewrite: str):
    """A torch engine of ``module`` on DEVICE with the backend option ``rewrite`` on, and its session loaded for real
    (not handed over from the build), so the load applies the rewrite again."""
    backend = get_backend("torch")
    options = {"device": DEVICE, rewrite: True, "batches": [2],
               "mode": "reduce-overhead" if DEVICE.startswith("cuda") else "default"}
    if not DEVICE.startswith("cuda"):
        options["compile"] = "eager"
    result = backend.build(module, signature, BuildOptions(backend_options=options))
    assert result.details[rewrite] is True
    tc._HANDOFF.clear()
    return result, backend.load(result.payload, result.resolved_options, signature)


def test_engines_built_with_the_merge_load_again_and_match_the_module():
    module = Siblings().eval()
    signature = Signature((TensorSpec("x", "float32", ("batch", 5, 16)), TensorSpec("y", "float32", (3,))),
                          (TensorSpec("out", "float32", ("batch", 5, 40)),))
    result, session = _build_and_load(module, signature, "fuse_linear")
    assert "merged into one product: 3 merged away" in " ".join(result.log)
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    y = np.random.default_rng(2).standard_normal(3).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(session.run({"x": x, "y": y})["out"], want, rtol=1e-4, atol=1e-5)


def test_fuse_linear_is_off_on_the_cpu_by_default_and_checked():
    backend = get_backend("torch")
    signature = Signature((TensorSpec("x", "float32", ("batch", 5, 16)), TensorSpec("y", "float32", (3,))),
                          (TensorSpec("out", "float32", ("batch", 5, 40)),))
    eager = {"device": "cpu", "compile": "eager"}
    assert backend.build(Siblings().eval(), signature, BuildOptions(backend_options=eager)).details["fuse_linear"] is False
    with pytest.raises(BuildError, match="fuse_linear must be auto, true or false"):
        backend.build(Siblings().eval(), signature, BuildOptions(backend_options={**eager, "fuse_linear": "yes"}))


class Products(torch.nn.Module):
    """Linear layers as ONNX spells them (a product by a constant weight, then the bias added), and products that
    are not linear layers: a vector times the weight, and a product of two activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 8))
        self.b = torch.nn.Parameter(torch.randn(8))
        self.w2 = torch.nn.Parameter(torch.randn(16, 8))
        self.row_bias = torch.nn.Parameter(torch.randn(5, 8))  # an added matrix, not a bias

    def forward(self, x, v):
        return torch.cat([x @ self.w + self.b, self.b + x @ self.w2, x @ self.w, x @ self.w2 + self.row_bias,
                          (x @ x.transpose(-1, -2))[..., :8]], -1), v @ self.w


def _products(module) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.matmul.default)


def test_products_by_a_constant_weight_become_linear_layers_with_the_same_outputs():
    module = Products().eval()
    x, v = torch.randn(2, 5, 16), torch.randn(16)
    rewritten = torch.export.export(module, (x, v)).module()
    assert _products(rewritten) == 6 and _linears(rewritten) == 0
    assert matmuls_as_linears(rewritten) == 4  # with bias either side, without, and the one whose add is no bias
    assert _linears(rewritten) == 4 and _products(rewritten) == 2  # the vector product and x @ xT stay
    with torch.no_grad():
        for got, want in zip(rewritten(x, v), module(x, v)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert concat_sibling_linears(rewritten) == 2  # all four read x: the two with a bias merge, the two without too


def test_an_encoders_onnx_export_runs_its_projections_as_merged_linear_layers():
    """transformers' BERT through its ONNX export: every MatMul + Add of a weight is a linear layer again, each
    layer's query/key/value are one product, and the engine still gives ONNX Runtime's outputs."""
    transformers = pytest.importorskip("transformers")
    from conftest import run_plain

    from enginesmith.importers import ImportOptions, import_model

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=50, max_position_embeddings=32)
    module = transformers.BertModel(config).eval()
    ids = np.random.default_rng(0).integers(0, 50, (2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[0, 8:] = 0
    imported = import_model(module, ImportOptions(example_inputs={"input_ids": torch.from_numpy(ids),
                                                                  "attention_mask": torch.from_numpy(mask)}))
    backend = get_backend("torch")
    options = {"device": "cpu", "compile": "eager", "fuse_linear": True}
    result = backend.build(imported.model, imported.signature, BuildOptions(backend_options=options))
    log = " ".join(result.log)
    assert "run as linear layers" in log and "merged into one product: 4 merged away" in log, log
    session = backend.load(result.payload, result.resolved_options, imported.signature)
    # Every product is a linear layer now, or inside the attention call (attention_fusion, on by default).
    ops = [n.target for n in session._eager.graph.nodes if n.op == "call_function"]
    assert _products(session._eager) == 0 and ops.count(torch.ops.aten.scaled_dot_product_attention.default) == 2
    x = {"input_ids": ids, "attention_mask": mask}
    want, got = run_plain(imported.model, x), session.run(x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-5)


class Patches(torch.nn.Module):
    """A ViT-style patch embedding (4x4, stride 4; flattened to tokens), a bias-free 2x2 stem on a channels-last
    path, and convolutions that are not patch products: padded, overlapping, grouped, dilated, 1x1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.stem = torch.nn.Conv2d(3, 6, 2, stride=2, bias=False)
        self.others = torch.nn.ModuleList([
            torch.nn.Conv2d(3, 4, 4, stride=4, padding=1), torch.nn.Conv2d(3, 4, 4, stride=2),
            torch.nn.Conv2d(4, 4, 2, stride=2, groups=2), torch.nn.Conv2d(3, 4, 2, stride=2, dilation=2),
            torch.nn.Conv2d(3, 4, 1)])

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [N, 64, 8]
        stem = torch.relu(self.stem(x.contiguous(memory_format=torch.channels_last)))
        pads, overlap, _, dilated, pointwise = (conv(x) if i != 2 else None for i, conv in enumerate(self.others))
        grouped = self.others[2](pads[..., :8, :8])
        return tokens, stem, pads, overlap, grouped, dilated, pointwise


def _convs(module) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.conv2d.default)


def test_convolutions_whose_kernel_is_their_stride_become_products_with_the_same_outputs():
    module = Patches().eval()
    x = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    rewritten = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}}).module()
    assert _convs(rewritten) == 7
    assert patch_convs_as_linears(rewritten) == 2  # the embedding and the stem; padding, overlap, groups, dilation
    assert _convs(rewritten) == 5 and _linears(rewritten) == 2  # and a 1x1 kernel stay convolutions
    with torch.no_grad():
        for size in (1, 3):  # the batch stays dynamic
            x = torch.randn(size, 3, 32, 32)
            for got, want in zip(rewritten(x), module(x)):
                assert got.shape == want.shape
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
        assert rewritten(x)[1].is_contiguous(memory_format=torch.channels_last)  # a patch product's own layout
    assert patch_convs_as_linears(rewritten) == 0


def test_a_size_the_kernel_does_not_divide_keeps_the_convolution():
    module = torch.nn.Conv2d(3, 4, 4, stride=4).eval()
    rewritten = torch.export.export(module, (torch.randn(1, 3, 30, 32),)).module()
    assert patch_convs_as_linears(rewritten) == 0 and _convs(rewritten) == 1


def test_torchvisions_vision_transformer_embeds_its_patches_as_a_product():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                                  mlp_dim=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    rewritten = torch.export.export(module, (x,)).module()
    assert patch_convs_as_linears(rewritten) == 1 and _convs(rewritten) == 0
    with torch.no_grad():
        np.testing.assert_allclose(rewritten(x).numpy(), module(x).numpy(), rtol=1e-5, atol=1e-5)


def test_engines_built_with_patch_products_load_again_and_match_the_module():
    module = Patches().eval()
    signature = Signature((TensorSpec("x", "float32", ("batch", 3, 32, 32)),),
                          tuple(TensorSpec(f"out{i}", "float32", None) for i in range(7)))
    result, session = _build_and_load(module, signature, "patch_conv")
    assert "run as a linear layer over patches: 2" in " ".join(result.log)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x))
    got = session.run({"x": x})
    for i, value in enumerate(want):
        np.testing.assert_allclose(got[f"out{i}"], value.numpy(), rtol=1e-4, atol=1e-5)
    backend, eager = get_backend("torch"), {"device": "cpu", "compile": "eager"}
    assert backend.build(module, signature, BuildOptions(backend_options=eager)).details["patch_conv"] is False
    with pytest.raises(BuildError, match="patch_conv must be auto, true or false"):
        backend.build(module, signature, BuildOptions(backend_options={**eager, "patch_conv": "yes"}))
