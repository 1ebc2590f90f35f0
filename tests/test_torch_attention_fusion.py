"""Written-out attention in ONNX graphs runs as one scaled_dot_product_attention on the PyTorch backend
(backends/torch_compile/attention_fusion.py): which chains are rewritten, and that every engine still gives
ONNX Runtime's outputs (fully masked rows, masks, scale factors, a second reader that forbids the rewrite)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import pytest
from conftest import run_plain
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

from enginesmith.backends import BuildOptions, get_backend  # noqa: E402
from enginesmith.importers import ImportOptions, import_model  # noqa: E402

DEVICE = os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu")
B, H, L, D = 2, 3, 5, 4


def build(model, precision: str = "fp32", **options):
    """An eager engine; attention fusion on unless the test says otherwise (fp32 on CUDA leaves it off by default)."""
    imported = import_model(model) if isinstance(model, onnx.ModelProto) else model
    backend = get_backend("torch")
    result = backend.build(imported.model, imported.signature, BuildOptions(
        precision=precision, backend_options={"device": DEVICE, "compile": "eager", "fuse_attention": True, **options}))
    return result, backend.load(result.payload, result.resolved_options, imported.signature)


def ops_of(session) -> list[str]:
    return [str(n.target) for n in session._eager.graph.nodes if n.op == "call_function"]


def attention_graph(*, scale: str = "div", mask: bool = True, nan_guard: bool = False, probs_output: bool = False,
                    mask_first: bool = False):
    """q, k, v [B, H, L, D] -> softmax(q @ kT / sqrt(D) + mask) @ v, spelled as exporters write it."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]
    inits = [numpy_helper.from_array(np.array(np.sqrt(D), np.float32), "root_d"),
             numpy_helper.from_array(np.array(D ** -0.25, np.float32), "quarter")]
    if scale == "div":
        nodes += [helper.make_node("MatMul", ["q", "kt"], ["raw"]), helper.make_node("Div", ["raw", "root_d"], ["scaled"])]
    else:  # torch.onnx's dynamo exporter: q and kT each scaled by D ** -0.25 before the product
        nodes += [helper.make_node("Mul", ["q", "quarter"], ["qs"]), helper.make_node("Mul", ["kt", "quarter"], ["ks"]),
                  helper.make_node("MatMul", ["qs", "ks"], ["scaled"])]
    logits = "scaled"
    if mask and mask_first:  # Add(mask * 2, scores): the mask, itself a scaled product, is the left operand
        inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
        nodes += [helper.make_node("Mul", ["mask", "two"], ["mask2"]), helper.make_node("Add", ["mask2", "scaled"], ["logits"])]
        logits = "logits"
    elif mask:
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["logits"]))
        logits = "logits"
    nodes.append(helper.make_node("Softmax", [logits], ["probs"], axis=-1))
    probs = "probs"
    if nan_guard:
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        nodes += [helper.make_node("IsNaN", ["probs"], ["nan"]), helper.make_node("Where", ["nan", "zero", "probs"], ["safe"])]
        probs = "safe"
    nodes.append(helper.make_node("MatMul", [probs, "v"], ["y"]))
    shape = ["b", H, L, D]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 1, 1, L]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if probs_output:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def feeds(*, masked_row: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    out = {n: rng.standard_normal((B, H, L, D)).astype(np.float32) for n in "qkv"}
    mask = np.zeros((B, 1, 1, L), np.float32)
    mask[:, :, :, -2:] = -1e4  # padding, as BERT's extended mask writes it
    if masked_row:
        mask[1] = -np.inf  # every key of the second item masked: softmax gives NaN, the guard zeros
    out["mask"] = mask
    return out


@pytest.mark.parametrize("scale, mask_first", [("div", False), ("split", False), ("div", True)])
def test_written_out_attention_becomes_one_fused_call_with_onnxruntimes_outputs(scale, mask_first):
    model = attention_graph(scale=scale, mask_first=mask_first)
    result, session = build(model)
    ops = ops_of(session)
    assert ops.count("aten.scaled_dot_product_attention.default") == 1
    assert not any("softmax" in op or "matmul" in op for op in ops), ops
    assert any("scaled_dot_product_attention: 1 rewritten" in line for line in result.log), result.log
    x = feeds()
    np.testing.assert_allclose(session.run(x)["y"], run_plain(model, x)["y"], rtol=1e-4, atol=1e-5)


def test_fully_masked_rows_keep_the_guards_zeros_not_nans():
    model = attention_graph(nan_guard=True)
    _, session = build(model)
    assert "aten.scaled_dot_product_attention.default" in ops_of(session)
    x = feeds(masked_row=True)
    want, got = run_plain(model, x)["y"], session.run(x)["y"]
    assert np.all(want[1] == 0) and not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_probabilities_read_elsewhere_are_not_rewritten():
    model = attention_graph(mask=False, probs_output=True)
    _, session = build(model)
    assert "aten.scaled_dot_product_attention.default" not in ops_of(session)
    x = {k: v for k, v in feeds().items() if k != "mask"}
    want, got = run_plain(model, x), session.run(x)
    for name in ("y", "probs"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_the_rewrite_can_be_turned_off_and_bad_values_are_refused():
    from enginesmith.errors import BuildError

    _, session = build(attention_graph(), fuse_attention=False)
    assert "aten.scaled_dot_product_attention.default" not in ops_of(session)
    with pytest.raises(BuildError, match="fuse_attention must be auto, true or false"):
        build(attention_graph(), fuse_attention="yes")


def test_by_default_fp32_engines_on_cuda_keep_attention_written_out():
    """fp32 attention kernels on CUDA missed the fp32 engines' 1e-4 check on a BERT-style encoder, so "auto"
    fuses attention on CUDA only below fp32; on the CPU fp32 engines fuse it too."""
    cuda = DEVICE.startswith("cuda")
    result, session = build(attention_graph(), fuse_attention="auto")
    assert ("aten.scaled_dot_product_attention.default" in ops_of(session)) is not cuda
    assert result.details["fuse_attention"] is not cuda
    if cuda:
        _, half = build(attention_graph(), precision="fp16", fuse_attention="auto")
        assert "aten.scaled_dot_product_attention.default" in ops_of(half)


def test_a_transformers_encoders_onnx_export_runs_every_layers_attention_fused():
    """transformers' BERT (a model nobody here wrote) exported to ONNX: one fused call per layer, and the
    engine's pooled and per-token outputs equal ONNX Runtime's on inputs with padding."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=200, max_position_embeddings=64)
    module = transformers.BertModel(config).eval()
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 200, (2, 16)).astype(np.int64)
    mask = np.ones((2, 16), np.int64)
    mask[1, 10:] = 0
    example = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    imported = import_model(module, ImportOptions(example_inputs=example))
    _, session = build(imported, source="onnx")
    assert ops_of(session).count("aten.scaled_dot_product_attention.default") == 3
    x = {"input_ids": ids, "attention_mask": mask}
    want, got = run_plain(imported.model, x), session.run(x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-5)
