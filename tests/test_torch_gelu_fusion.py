"""Linear + GELU as one product with a GELU epilogue (backends/torch_compile/gelu_fusion.py).

The rewrite is checked on the CPU, where ``enginesmith::linear_gelu`` computes the tanh form of GELU
that cuBLASLt's epilogue computes on CUDA: the rewritten program equals an explicit tanh-GELU
reference to float32 rounding and the exact-GELU source to within the approximation's error;
chains it must not touch stay as they are. GELU written out op by op (ONNX graphs' Erf form in
each exporter's operand order, checked against ONNX Runtime; GPT-2's and Keras' tanh form, which
the epilogue computes exactly) gets the same epilogue. ENGINESMITH_TEST_DEVICE=cuda builds the engine on the
GPU, where the operator runs cuBLASLt's epilogue.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from enginesmith.backends import BuildOptions, get_backend  # noqa: E402
from enginesmith.backends.torch_compile.gelu_fusion import fuse_linear_gelu  # noqa: E402
from enginesmith.errors import BuildError  # noqa: E402
from enginesmith.signature import Signature, TensorSpec  # noqa: E402

DEVICE = os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("ENGINESMITH_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)


class Mlp(torch.nn.Module):
    """A transformer MLP (exact GELU), then chains the rewrite must leave alone: a linear layer without a bias,
    one whose output is read twice, and a GELU of something that is not a linear layer."""

    def __init__(self, gelu_form: str = "none"):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.no_bias = torch.nn.Linear(16, 16, bias=False)
        self.shared = torch.nn.Linear(16, 16)
        self.gelu = torch.nn.GELU(approximate=gelu_form)

    def forward(self, x):
        y = self.down(self.gelu(self.up(x)))
        shared = self.shared(x)
        return y + self.gelu(self.no_bias(x)) + self.gelu(shared) + shared + self.gelu(x * 2.0)


def _tanh_reference(module: Mlp, x):
    """What the rewritten module must compute: the source with the first chain's GELU in its tanh form."""
    tanh = torch.nn.functional.gelu(module.up(x), approximate="tanh")
    shared = module.shared(x)
    return (module.down(tanh) + module.gelu(module.no_bias(x)) + module.gelu(shared) + shared
            + module.gelu(x * 2.0))


def _exported(module, x):
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(module, (x,), dynamic_shapes=({0: batch},)).module()


def _count(module, target) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.mark.parametrize("gelu_form", ["none", "tanh"])
def test_only_a_biased_linear_layer_read_by_gelu_alone_is_rewritten(gelu_form):
    module = Mlp(gelu_form).eval()
    x = torch.randn(3, 7, 16)
    program = _exported(module, x)
    gelus = _count(program, torch.ops.aten.gelu.default)
    assert fuse_linear_gelu(program) == 1
    assert _count(program, torch.ops.enginesmith.linear_gelu.default) == 1
    assert _count(program, torch.ops.aten.gelu.default) == gelus - 1  # the three other GELUs stay
    with torch.no_grad():
        for batch in (1, 2, 5):  # the batch stays dynamic
            x = torch.randn(batch, 7, 16)
            got = program(x)
            want = _tanh_reference(module, x) if gelu_form == "none" else module(x)
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
            # Against the exact-GELU source, only the approximation's own error (|erf - tanh form| < 3.1e-4).
            np.testing.assert_allclose(got.numpy(), module(x).numpy(), rtol=0, atol=3e-3)


def test_the_operator_matches_torch_on_rows_and_on_one_row():
    from enginesmith.backends.torch_compile.gelu_fusion import register_op

    register_op()
    torch.manual_seed(1)
    weight, bias = torch.randn(32, 8), torch.randn(32)
    for shape in [(5, 8), (1, 8), (2, 3, 8), (1, 1, 8)]:
        x = torch.randn(*shape)
        got = torch.ops.enginesmith.linear_gelu(x, weight, bias)
        want = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_a_transformers_encoder_runs_each_layers_mlp_as_one_product():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    module = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    program = torch.export.export(module, (ids,)).module()
    assert fuse_linear_gelu(program) == 2  # one per layer
    with torch.no_grad():
        got, want = program(ids)[0], module(ids).last_hidden_state
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=5e-3)
    assert not np.array_equal(got.numpy(), want.numpy())  # the tanh form is there, not the exact GELU


def test_engines_built_with_fuse_gelu_match_the_module_and_load_again():
    module = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    signature = Signature((TensorSpec("x", "float32", ("batch", 7, 16)),), (TensorSpec("y", "float32", ("batch", 7, 16)),))
    backend = get_backend("torch")
    options = {"device": DEVICE, "fuse_gelu": True, "batches": [3], "mode": "reduce-overhead"}
    if not DEVICE.startswith("cuda"):
        options.update({"compile": "eager", "mode": "default"})
    result = backend.build(copy.deepcopy(module), signature, BuildOptions(backend_options=options))
    assert result.details["fuse_gelu"] is True
    assert "one product with a GELU epilogue: 1" in " ".join(result.log)
    x = np.random.default_rng(2).standard_normal((3, 7, 16)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = backend.load(result.payload, result.resolved_options, signature).run({"x": x})["y"]  # rewritten again at load
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-3)
    assert not np.array_equal(got, want)  # the tanh form ran, not the exact GELU
    eager = {"device": "cpu", "compile": "eager"}
    assert backend.build(module, signature, BuildOptions(backend_options=eager)).details["fuse_gelu"] is False
    if DEVICE.startswith("cuda"):  # on by default for fp16 engines on CUDA, off for fp32 ones (the tanh form's error)
        on_gpu = {"device": DEVICE, "compile": "eager"}
        for precision, expected in (("fp16", True), ("fp32", False)):
            result = backend.build(module, signature, BuildOptions(precision=precision, backend_options=on_gpu))
            assert result.details["fuse_gelu"] is expected
    with pytest.raises(BuildError, match="fuse_gelu must be auto, true or false"):
        backend.build(module, signature, BuildOptions(backend_options={**eager, "fuse_gelu": "yes"}))
    with pytest.raises(BuildError, match="fuse_gelu cannot be combined with compile=aoti"):
        backend.build(module, signature, BuildOptions(backend_options={"device": "cpu", "compile": "aoti", "fuse_gelu": True}))


# --------------------------------------------------------------------------- ONNX graphs

def _onnx_mlp(activation: list, extra: dict, opset: int = 18):
    """x [batch, 8] -> MatMul + Add (``h``) -> ``activation`` nodes (``h`` -> ``g``) -> MatMul -> y, with ``extra`` constants."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    consts = {"w1": rng.standard_normal((8, 16)), "b1": rng.standard_normal(16), "w2": rng.standard_normal((16, 4)), **extra}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["xw"]), helper.make_node("Add", ["xw", "b1"], ["h"]), *activation,
             helper.make_node("MatMul", ["g", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()])
    model = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # The newest onnx writes an IR version older ONNX Runtimes refuse (the GPU machine's); 9 covers opset 20.
    model.ir_version = 9
    return model


def _built_from_onnx(model):
    """(build log, engine output, ONNX Runtime output) of a CPU engine built from ``model`` with fuse_gelu."""
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    from conftest import run_plain

    from enginesmith.importers import import_model

    imported = import_model(model)
    backend = get_backend("torch")
    options = {"device": "cpu", "compile": "eager", "fuse_linear": True, "fuse_gelu": True}
    result = backend.build(imported.model, imported.signature, BuildOptions(backend_options=options))
    x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    got = backend.load(result.payload, result.resolved_options, imported.signature).run({"x": x})["y"]
    return " ".join(result.log), got, run_plain(model, {"x": x})["y"]


def _erf_mlp(form: str):
    """GELU spelled with Erf in ``form``: what ONNX exporters before opset 20 write."""
    from onnx import helper

    def node(op, inputs, out):
        return helper.make_node(op, inputs, [out])

    if form == "mul_inverse_root":
        nodes = [node("Mul", ["h", "inv_root2"], "scaled")]
    else:  # "wrong_constant" divides by 2, which is not GELU and must stay as written
        nodes = [node("Div", ["h", "two" if form == "wrong_constant" else "root2"], "scaled")]
    nodes += [node("Erf", ["scaled"], "erf"), node("Add", ["erf", "one"], "cdf2")]
    if form in ("half_then_x", "wrong_constant"):  # torch.onnx's dynamo exporter: 0.5 * (1 + erf), then * x
        nodes += [node("Mul", ["half", "cdf2"], "cdf"), node("Mul", ["h", "cdf"], "g")]
    elif form in ("x_then_half", "mul_inverse_root"):
        nodes += [node("Mul", ["cdf2", "h"], "xcdf2"), node("Mul", ["xcdf2", "half"], "g")]
    else:  # "half_x_first": (x * 0.5) * (1 + erf), as Keras' gelu reads
        nodes += [node("Mul", ["h", "half"], "hx"), node("Mul", ["hx", "cdf2"], "g")]
    return _onnx_mlp(nodes, {"root2": np.sqrt(2.0), "inv_root2": 2 ** -0.5, "one": 1.0, "half": 0.5, "two": 2.0})


@pytest.mark.parametrize("form", ["half_then_x", "x_then_half", "half_x_first", "mul_inverse_root", "wrong_constant"])
def test_gelu_written_out_with_erf_in_onnx_graphs_runs_in_the_epilogue(form):
    log, got, want = _built_from_onnx(_erf_mlp(form))
    if form == "wrong_constant":
        assert "GELU written out" not in log and "GELU epilogue: 0" in log
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert "GELU written out op by op run as one GELU: 1" in log and "GELU epilogue: 1" in log
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2)  # the tanh form, through a 16-wide product
        assert not np.array_equal(got, want)


# --------------------------------------------------------------------------- GELU's tanh form written out


class NewGelu(torch.nn.Module):
    """transformers' ``gelu_new`` (GPT-2), written out as it is there; ``cube="mul"`` spells x^3 as x * x * x."""

    def __init__(self, cube: str = "pow"):
        super().__init__()
        self.cube = cube

    def forward(self, x):
        cubed = torch.pow(x, 3.0) if self.cube == "pow" else x * x * x
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * cubed)))


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_gpt2_style_tanh_gelu_written_out_runs_in_the_epilogue_unchanged(cube):
    from enginesmith.backends.torch_compile.gelu_fusion import gelus_written_out

    torch.manual_seed(5)
    module = torch.nn.Sequential(torch.nn.Linear(16, 64), NewGelu(cube), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(3, 7, 16)
    program = _exported(module, x)
    assert gelus_written_out(program) == 1
    assert fuse_linear_gelu(program) == 1
    assert _count(program, torch.ops.aten.tanh.default) == 0
    with torch.no_grad():
        for batch in (1, 4):
            x = torch.randn(batch, 7, 16)
            # the epilogue's GELU is this very tanh form: equal to float32 rounding, not merely close
            np.testing.assert_allclose(program(x).numpy(), module(x).numpy(), rtol=1e-5, atol=1e-5)


def test_keras_style_tanh_gelu_in_an_onnx_graph_runs_in_the_epilogue_unchanged():
    from onnx import helper

    names = [("Pow", ["h", "three"], "h3"), ("Mul", ["k", "h3"], "kh3"), ("Add", ["h", "kh3"], "inner"),
             ("Mul", ["c", "inner"], "arg"), ("Tanh", ["arg"], "t"), ("Add", ["one", "t"], "t1"),
             ("Mul", ["half", "h"], "hh"), ("Mul", ["hh", "t1"], "g")]
    model = _onnx_mlp([helper.make_node(op, inputs, [out]) for op, inputs, out in names],
                      {"three": 3.0, "k": 0.044715, "c": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5})
    log, got, want = _built_from_onnx(model)
    assert "GELU written out op by op run as one GELU: 1" in log and "GELU epilogue: 1" in log
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_gelu_op_of_opset_20_runs_in_the_epilogue(approximate):
    from onnx import helper

    log, got, want = _built_from_onnx(_onnx_mlp([helper.make_node("Gelu", ["h"], ["g"], approximate=approximate)], {}, 20))
    assert "GELU epilogue: 1" in log
    # tanh: the epilogue's own function; none: within the tanh form's error, through a 16-wide product
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if approximate == "tanh" else 2e-2)
