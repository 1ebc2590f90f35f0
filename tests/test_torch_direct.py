"""Torch sources built by the PyTorch backend directly (torch.export, no ONNX -> onnx2torch hop), flattened
outputs, and dims that cannot stay symbolic fixed at the build's sample sizes (backends/torch_compile/native.py, export.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_plain
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

import enginesmith as es  # noqa: E402
from enginesmith.errors import InputError  # noqa: E402
from enginesmith.importers import ImportOptions  # noqa: E402
from torch_models import MeanHead, SelfAttention, StridedPoolNet, TinyEncoder, onnx_of  # noqa: E402

# ENGINESMITH_TEST_DEVICE=cuda runs the same checks on the GPU (scripts/gpu_zoo.sh tests).
EAGER = {"device": os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu"), "compile": "eager"}


def build_module(module, example, **kwargs):
    return es.build(module.eval(), backend="torch", backend_options=kwargs.pop("backend_options", EAGER),
                    import_options=ImportOptions(example_inputs=example, dynamic_axes=kwargs.pop("dynamic_axes", {})),
                    **kwargs)


def test_module_is_exported_directly_and_its_engine_loads_without_the_class(tmp_path):
    torch.manual_seed(0)
    module = MeanHead()
    engine = build_module(module, (torch.randn(2, 3, 16, 16),))
    assert engine.manifest.checks["build"]["source"] == "torch"
    assert any("exported with torch.export directly" in line for line in engine.manifest.build_log)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine(x=x)["output"], want, rtol=1e-5, atol=1e-5)
    path = engine.save(tmp_path / "mean.engine")
    np.save(tmp_path / "x.npy", x)
    # A fresh interpreter that cannot import tests/torch_models.py: the payload must not need MeanHead.
    script = ("import sys, numpy as np, enginesmith as es\n"
              "out = es.load(sys.argv[1])(x=np.load(sys.argv[2]))['output']\nnp.save(sys.argv[3], out)\n")
    src = str(Path(es.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": src},
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-5)


def test_dict_outputs_become_named_outputs_with_a_dynamic_sequence():
    torch.manual_seed(0)
    module = TinyEncoder()
    ids = torch.randint(0, 50, (2, 7))
    engine = build_module(module, (ids, torch.ones_like(ids)), dynamic_axes={"input_ids": [1], "attention_mask": [1]})
    assert engine.signature.output_names == ["last_hidden_state", "pooler_output"]
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50, (3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    got = engine(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = module(torch.from_numpy(ids), torch.from_numpy(mask))
    for name in ("last_hidden_state", "pooler_output"):
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=1e-4, atol=1e-5)


def test_multihead_attention_module_matches_eager():
    torch.manual_seed(0)
    module = SelfAttention()
    engine = build_module(module, (torch.randn(2, 5, 16),))
    x = np.random.default_rng(3).standard_normal((4, 5, 16)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine(x=x)["output"], want, rtol=1e-4, atol=1e-5)


def test_source_onnx_option_builds_from_the_onnx_conversion():
    torch.manual_seed(0)
    module = MeanHead()
    engine = build_module(module, (torch.randn(2, 3, 16, 16),), backend_options={**EAGER, "source": "onnx"})
    assert engine.manifest.checks["build"]["source"] == "onnx"
    assert any("onnx2torch" in line for line in engine.manifest.build_log)
    with pytest.raises(es.errors.BuildError, match="source must be auto"):
        build_module(module, (torch.randn(2, 3, 16, 16),), backend_options={**EAGER, "source": "tflite"})


def test_pooling_model_with_dynamic_height_and_width_exports_at_the_sample_size():
    """At the generic example size (32) the pool gets a 1x1 map and fails; the samples (128x256) trace symbolically."""
    torch.manual_seed(0)
    auto = torch.export.Dim.AUTO
    model = onnx_of(StridedPoolNet(), (torch.randn(2, 3, 128, 256),), ({0: auto, 2: auto, 3: auto},))
    name = model.graph.input[0].name
    assert all(d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[2:])
    samples = np.random.default_rng(4).standard_normal((2, 3, 128, 256)).astype(np.float32)
    engine = es.build(model, backend="torch", backend_options=EAGER, data={name: samples})
    assert engine.manifest.checks["build"]["served_shapes"][name] == [None, 3, None, None]
    x = np.random.default_rng(5).standard_normal((3, 3, 160, 192)).astype(np.float32)
    np.testing.assert_allclose(engine(**{name: x})[engine.signature.output_names[0]],
                               run_plain(model, {name: x})[model.graph.output[0].name], rtol=1e-4, atol=1e-5)


def height_bound_model() -> onnx.ModelProto:
    """x[batch, 3, h, w] -> mean over w -> Flatten -> MatMul(12x4): only h = 4 runs, though the input leaves h open."""
    weight = numpy_helper.from_array(np.random.default_rng(6).standard_normal((12, 4)).astype(np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[3], keepdims=0),
         helper.make_node("Flatten", ["m"], ["f"], axis=1), helper.make_node("MatMul", ["f", "weight"], ["y"])], "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_dims_that_cannot_stay_symbolic_are_fixed_at_the_samples_and_other_sizes_refused():
    model = height_bound_model()
    samples = np.random.default_rng(7).standard_normal((2, 3, 4, 5)).astype(np.float32)
    engine = es.build(model, backend="torch", backend_options=EAGER, data={"x": samples})
    assert engine.manifest.checks["build"]["served_shapes"]["x"] == [None, 3, 4, None]
    assert any("the engine serves x: [?, 3, 4, ?]" in line for line in engine.manifest.build_log)
    wide = np.random.default_rng(8).standard_normal((3, 3, 4, 9)).astype(np.float32)
    np.testing.assert_allclose(engine(x=wide)["y"], run_plain(model, {"x": wide})["y"], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"serves x: \[\?, 3, 4, \?\].*--input x:2x3x6x5"):
        engine(x=np.zeros((2, 3, 6, 5), np.float32))


def test_exported_program_with_float32_constants_builds_in_fp16():
    """A .pt2 traced in fp32 bakes dtype=float32 into ops (the mask here); an fp16 build retargets them."""

    class MaskedScores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, mask):
            bias = (1.0 - mask.float()) * -1e4
            return self.proj(torch.softmax(self.proj(x) + bias[:, :, None], dim=1))

    torch.manual_seed(0)
    module = MaskedScores().eval()
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.int64)
    program = torch.export.export(module, (x, mask), dynamic_shapes=({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")}))
    mask[1, 3:] = 0
    engine = es.build(program, backend="torch", precision="fp16", force_precision=True, backend_options=EAGER,
                      data={"x": x.numpy(), "mask": mask.numpy()})
    assert engine.precision == "fp16"
    assert any("float32 constants" in line for line in engine.manifest.build_log)
    with torch.no_grad():
        want = module(x, mask).numpy()
    np.testing.assert_allclose(engine(x=x.numpy(), mask=mask.numpy())["output"], want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("source", ["auto", "onnx"])
def test_transformers_bert_builds_from_the_module_and_from_its_onnx_export(source):
    """The reported failure: a BERT encoder's ONNX (Reshape allowzero=1, mask built with Range/GatherND/Where)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=200, max_position_embeddings=64)
    module = transformers.BertModel(config).eval()
    rng = np.random.default_rng(10)
    ids = rng.integers(0, 200, (2, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    example = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    engine = build_module(module, example, backend_options={**EAGER, "source": source})
    assert engine.manifest.checks["build"]["source"] == ("torch" if source == "auto" else "onnx")
    assert engine.signature.output_names == ["last_hidden_state", "pooler_output"]
    assert engine.manifest.checks["build"]["served_shapes"]["input_ids"][0] is None  # the batch stays dynamic
    ids = rng.integers(0, 200, (3, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 10:] = 0
    got = engine(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    np.testing.assert_allclose(got["last_hidden_state"], want.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["pooler_output"], want.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def test_native_source_is_handed_over_in_the_build_options_not_in_the_onnx_model():
    """The importer's module reaches the backend only through BuildOptions.native_source: no tag in the ONNX
    (so none in any payload or bundle), nothing kept in module globals, nothing stored in the manifest."""
    from enginesmith.backends import BuildOptions, get_backend
    from enginesmith.importers import import_model

    torch.manual_seed(0)
    module = MeanHead().eval()
    imported = import_model(module, ImportOptions(example_inputs=(torch.randn(2, 3, 16, 16),)))
    assert imported.native is not None and imported.native.model is module
    assert not any("native" in prop.key for prop in imported.model.metadata_props)
    backend = get_backend("torch")
    handed = BuildOptions(backend_options=EAGER, native_source=imported.native)
    assert "native_source" not in handed.to_dict()
    direct = backend.build(imported.model, imported.signature, handed)
    assert direct.details["source"] == "torch"
    assert set(backend.op_support(imported.model, handed).values()) == {("supported", "")}
    # The same ONNX without the handoff (as read from a file) builds from the conversion.
    assert backend.build(imported.model, imported.signature, BuildOptions(backend_options=EAGER)).details["source"] == "onnx"
    # A signature whose names the graph passes changed falls back to the ONNX, saying why.
    from enginesmith.importers.onnx_importer import signature_of

    renamed = onnx.ModelProto()
    renamed.CopyFrom(imported.model)
    old = renamed.graph.output[0].name
    renamed.graph.output[0].name = "renamed"
    for node in renamed.graph.node:
        node.output[:] = ["renamed" if name == old else name for name in node.output]
    fallback = backend.build(renamed, signature_of(renamed), handed)
    assert fallback.details["source"] == "onnx"
    assert any("graph passes changed its inputs or outputs" in line for line in fallback.log)


@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="Inductor's CPU code needs a C++ compiler")
def test_integer_inputs_the_compiler_warms_with_stay_in_range_of_a_two_row_table():
    """The H200 run's BERT builds died with 'index out of bounds: 0 <= tmp11 < 2' (a device-side assert): the
    warm-up and compiled-vs-exported check fed token_type_ids in [0, 4) to a 2-row embedding. Inductor checks
    indirect indices on the CPU too, so the same build fails here without the fix."""

    class TypedEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.types = torch.nn.Embedding(2, 8)
            self.proj = torch.nn.Linear(8, 3)

        def forward(self, x, token_type_ids):
            return self.proj(x + self.types(token_type_ids))

    torch.manual_seed(0)
    module = TypedEmbedding().eval()
    example = {"x": torch.randn(2, 5, 8), "token_type_ids": torch.zeros(2, 5, dtype=torch.int64)}
    engine = build_module(module, example, backend_options={"device": "cpu", "compile": "inductor"})
    types = np.array([[0, 1, 1, 0, 1]] * 3, np.int64)
    x = np.random.default_rng(12).standard_normal((3, 5, 8)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x), torch.from_numpy(types)).numpy()
    np.testing.assert_allclose(engine(x=x, token_type_ids=types)["output"], want, rtol=1e-4, atol=1e-5)


def test_a_program_traced_on_the_cpu_is_retargeted_to_the_build_device():
    """The H200 run failed test_exported_program_with_float32_constants_builds_in_fp16: a program exported on the
    CPU asserts its inputs' device (aten._assert_tensor_metadata(mask, device=cpu)) and bakes device=cpu into
    factory ops. The meta device stands in for CUDA here."""
    from enginesmith.backends.torch_compile.native import retarget_program, source_module
    from enginesmith.native_source import NativeSource

    class MaskedOnes(torch.nn.Module):
        def forward(self, x, mask):
            keep = mask.float() * torch.ones(x.shape[1], dtype=torch.float32, device="cpu")
            return x * keep[:, :, None]

    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.int64)
    program = torch.export.export(MaskedOnes(), (x, mask))
    baked = [n for n in program.graph.nodes if "_assert_tensor_metadata" in str(n.target) or
             n.kwargs.get("device") == torch.device("cpu")]
    assert baked  # what the traced program holds: without it this test shows nothing
    module = source_module(NativeSource("torch", program, ("x", "mask"), ("output",)))
    assert retarget_program(module, torch.float16, "meta") >= 1
    out = module.to("meta")(x.to("meta", torch.float16), mask.to("meta"))[0]
    assert out.device.type == "meta" and out.dtype == torch.float16 and tuple(out.shape) == (2, 5, 8)


class SqueezesSizeOne(torch.nn.Module):
    """Takes another path when an axis has size 1 (what ``squeeze`` and exporters' If-on-a-size do)."""

    def forward(self, x):
        if x.shape[1] == 1:
            return x * 2
        return x + 1


def test_sizes_outside_the_traced_range_are_refused_not_run_down_the_wrong_path():
    """torch.export assumes open sizes are >= 2 and decides `size == 1` that way, but the exported module does
    not check its inputs: at size 1 it silently returned x + 1. The engine now refuses, naming the fix."""
    x = torch.randn(2, 3, 4)
    engine = build_module(SqueezesSizeOne(), (x,), dynamic_axes={"x": {0: "batch", 1: "width"}})
    np.testing.assert_allclose(engine.infer({"x": x.numpy()})[engine.signature.output_names[0]], (x + 1).numpy(), rtol=1e-6)
    with pytest.raises(InputError, match="serves sizes 2 to any there"):
        engine.infer({"x": np.ones((2, 1, 4), np.float32)})


class ReadsSecondColumn(torch.nn.Module):
    """Indexes past the end at size 1: an IndexError on the CPU, a device-side assert on CUDA."""

    def forward(self, x):
        return x[:, 1] + x[:, 0]


class Doubles(torch.nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("module, allowed", [(Doubles(), True), (ReadsSecondColumn(), False)])
def test_size_one_is_tried_on_cpu_copies_when_the_engine_is_for_a_gpu(module, allowed):
    """On CUDA an out-of-bounds index at the size-1 trial would poison the process's CUDA context (every
    later call failed in the CUDA test run); the trial runs on CPU copies first. Here device "cuda" is
    named but never touched: only the CPU trial can allow size 1 (a trial on a device that is not there
    would fail and refuse it), and the IndexError of the second model refuses it."""
    import io

    from enginesmith.backends.torch_compile.export import allow_size_one, cpu_copies, served_ranges
    from enginesmith.signature import Signature, TensorSpec

    x = torch.randn(3, 4)
    width = torch.export.Dim("width", min=2)
    program = torch.export.export(module, (x,), dynamic_shapes={"x": {1: width}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    signature = Signature((TensorSpec("x", "float32", (3, "width")),), (TensorSpec("y", "float32", (3,)),))
    ranges = served_ranges(program, signature)
    assert ranges == {"x": [None, [2, None]]}
    made = []

    def copies():
        made.append(True)
        return cpu_copies(module, buffer.getvalue(), lambda data: torch.export.load(io.BytesIO(data)))

    log: list[str] = []
    widened = allow_size_one(module, program, signature, ranges, "cuda:0", log, copies)
    assert made == [True]
    assert widened["x"][1][0] == (1 if allowed else 2)
    assert bool(log) is not allowed
