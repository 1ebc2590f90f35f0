"""The PyTorch Inductor backend on tiny models: export, compile, save, load, run, compare.

On the CPU (CI) one test compiles with Inductor (C++ codegen, no autotuning) and warm-loads
the engine in a fresh process from the compiler cache it carries; the others run the
exported program uncompiled (``compile="eager"``) to stay fast. With
``ENGINESMITH_TEST_DEVICE=cuda`` (scripts/gpu_torch_backend.sh on the GPU machine) the same
tests build CUDA engines (Inductor "reduce-overhead": CUDA graphs, no autotuning).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_int_input_model, make_mlp, make_two_in_two_out, make_unsupported_op_model, run_plain
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:  # imported through the backend (it may lack torchvision)
    pytest.skip("onnx2torch is not installed (pip install --no-deps 'onnx2torch==1.5.15')", allow_module_level=True)

import enginesmith as es  # noqa: E402
from enginesmith import samples  # noqa: E402
from enginesmith.api import check_platform_compatible, platform_differences  # noqa: E402
from enginesmith.backends import BuildOptions, get_backend, pick_backend  # noqa: E402
from enginesmith.backends import torch_compile as tc  # noqa: E402
from enginesmith.cli.app import main  # noqa: E402
from enginesmith.errors import BuildError, PlatformMismatchError, UnsupportedModelError  # noqa: E402
from enginesmith.signature import Signature, TensorSpec, random_inputs  # noqa: E402

DEVICE = os.environ.get("ENGINESMITH_TEST_DEVICE", "cpu")
CUDA = DEVICE.startswith("cuda")
if CUDA and not torch.cuda.is_available():
    pytest.skip("ENGINESMITH_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)
# Compiled engines: cheap modes only (no autotuning) so the suite stays fast.
COMPILED = {"device": DEVICE, "mode": "reduce-overhead" if CUDA else "default", "batches": [1, 3]}
EAGER = {"device": DEVICE, "compile": "eager"}


def shape_ops_model(dynamic_reshape: bool) -> onnx.ModelProto:
    """x[batch, 4, 6] -> Reshape [0, -1] (constant, or from Shape->Gather->Concat) -> Dropout -> Unsqueeze
    -> Slice -> Expand -> Tile -> Softmax -> Transpose -> y[batch, 36, 3]: shape arguments torch.export must see as values."""

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    inits = [ints("shape0", [0, -1]), ints("axes1", [1]), ints("starts", [2]), ints("ends", [20]), ints("axes2", [2]),
             ints("eshape", [1, 3, 18]), ints("reps", [1, 1, 2]), numpy_helper.from_array(np.array(0.1, np.float32), "ratio")]
    nodes = []
    if dynamic_reshape:
        inits += [ints("zero", [0]), ints("minus1", [-1])]
        nodes += [helper.make_node("Shape", ["x"], ["xs"], name="shape"),
                  helper.make_node("Gather", ["xs", "zero"], ["b"], name="gather", axis=0),
                  helper.make_node("Concat", ["b", "minus1"], ["dshape"], name="concat", axis=0),
                  helper.make_node("Reshape", ["x", "dshape"], ["r"], name="reshape")]
    else:
        nodes.append(helper.make_node("Reshape", ["x", "shape0"], ["r"], name="reshape"))
    nodes += [
        helper.make_node("Dropout", ["r", "ratio"], ["d"], name="dropout"),
        helper.make_node("Unsqueeze", ["d", "axes1"], ["u"], name="unsqueeze"),
        helper.make_node("Slice", ["u", "starts", "ends", "axes2"], ["s"], name="slice"),
        helper.make_node("Expand", ["s", "eshape"], ["e"], name="expand"),
        helper.make_node("Tile", ["e", "reps"], ["t"], name="tile"),
        helper.make_node("Softmax", ["t"], ["sm"], name="softmax", axis=-1),
        helper.make_node("Transpose", ["sm"], ["y"], name="transpose", perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(nodes, "shape_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 36, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def assert_matches_onnxruntime(engine, model, batches=(1, 3, 7), rtol=1e-4, atol=1e-5):
    for batch in batches:
        feeds = random_inputs(engine.signature.inputs, batch=batch, seed=batch)
        got, want = engine(feeds), run_plain(model, feeds)
        assert list(got) == engine.signature.output_names
        for name, expected in want.items():
            assert got[name].dtype == expected.dtype, name
            np.testing.assert_allclose(got[name], expected, rtol=rtol, atol=atol, err_msg=f"{name} at batch {batch}")


# --------------------------------------------------------------------------- registry and platform


def test_registered_available_and_ranked_below_onnxruntime_without_a_gpu():
    backend = get_backend("torch")
    assert backend.display_name == "PyTorch Inductor"
    assert backend.available()
    if not torch.cuda.is_available():
        assert backend.auto_priority == 5 < get_backend("onnxruntime").auto_priority
        assert pick_backend("auto").name == "onnxruntime"
        assert backend.precisions(BuildOptions()) == ["fp32"]
    else:
        assert set(backend.precisions(BuildOptions())) >= {"fp32", "fp16"}


def test_fingerprint_names_the_gpu_and_toolchain_and_mismatches_are_refused():
    backend = get_backend("torch")
    cpu = backend.fingerprint(BuildOptions(backend_options={"device": "cpu"}))
    assert cpu["device"] == "cpu" and cpu["gpu"] == "none" and cpu["backend_version"] == torch.__version__
    assert set(backend.must_match()) >= {"gpu", "compute_capability", "backend_version", "triton_version", "cuda"}
    h100 = {**cpu, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda": "13.0",
            "triton_version": "3.6.0", "backend_version": "2.11.0+cu130"}
    text = backend.describe_platform(h100)
    assert "NVIDIA H100 80GB HBM3" in text and "9.0" in text and "CUDA 13.0" in text and "Triton 3.6.0" in text
    assert "CPU" in backend.describe_platform(cpu)

    engine = es.build(make_mlp(), backend="torch", backend_options=EAGER)
    assert engine.manifest.fingerprint["device"] == ("cuda" if CUDA else "cpu")
    assert not platform_differences(engine.manifest, backend)
    engine.manifest.fingerprint.update({"gpu": "Some Other GPU", "compute_capability": "8.6"})
    keys = {key for key, _, _ in platform_differences(engine.manifest, backend)}
    assert keys == {"gpu", "compute_capability"}
    with pytest.raises(PlatformMismatchError, match="Some Other GPU"):
        check_platform_compatible(engine.manifest, backend)


# --------------------------------------------------------------------------- compiled engines


def test_compiled_engine_saves_loads_warm_in_a_fresh_process_and_matches_onnxruntime(tmp_path, monkeypatch):
    model = make_mlp()
    engine = es.build(model, backend="torch", backend_options=COMPILED)
    details = engine.manifest.checks["build"]
    assert details["compile"] == "inductor" and details["cache_bytes"] > 0
    if not CUDA:
        assert engine.compiled_batches == ()  # one dynamic-batch program on the CPU: every size runs alike
    assert all(err < 1e-5 for err in details["compiled_vs_exported_rel_l2"].values())
    for batch, seconds in details["compile_seconds_per_batch"].items():  # where each batch's compile went
        parts = [details["compile_breakdown"][f"batch_{batch}_{step}"] for step in ("trace", "inductor", "run")]
        assert parts[1] > 0 and sum(parts) == pytest.approx(seconds, abs=0.05)
    if not CUDA:
        assert details["dynamic"] and any("no autotuning on the CPU" in line for line in engine.manifest.build_log)
    assert_matches_onnxruntime(engine, model, batches=(1, 3) if CUDA else (1, 3, 7))
    path = engine.save(tmp_path / "mlp.engine")

    # The compiler cache is pickled code: loading it needs the caller's word, or a recompile.
    with pytest.raises(es.UntrustedCodeError, match="compiler cache.*--trust-code"):
        es.load(path)
    assert main(["run", str(path), "--random"]) == 2
    loaded = es.load(path, trust_code=True)
    assert_matches_onnxruntime(loaded, model, batches=(1, 3))

    # A fresh process with empty compiler caches: the engine's own cache makes it a warm load.
    # Inductor's counters say whether the load compiled anything, and a patched autotuner counts the Triton
    # kernels a load benchmarked again (private APIs: left out where this torch lacks them).
    script = (
        "import json, sys, numpy as np, enginesmith as es\n"
        "from torch._dynamo.utils import counters\n"
        "benchmarked = []\n"
        "try:\n"
        "    from torch._inductor.runtime import triton_heuristics as th\n"
        "    plain = th.CachingAutotuner.benchmark_all_configs\n"
        "    th.CachingAutotuner.benchmark_all_configs = lambda self, *a, **k: benchmarked.append(1) or plain(self, *a, **k)\n"
        "except (ImportError, AttributeError):\n"
        "    benchmarked = None\n"
        "from torch._inductor import cpp_builder\n"
        "libraries = []\n"
        "build = cpp_builder.CppBuilder.build\n"
        "cpp_builder.CppBuilder.build = lambda self, *a, **k: (libraries.append(self.get_target_file_path())\n"
        "                                                      or build(self, *a, **k))\n"
        "e = es.load(sys.argv[1], trust_code=True)\n"
        "y = e(x=np.ones((3, 6), np.float32))['probs']\n"
        "print(json.dumps({'cache': e._session.cache_info, 'load_s': e._session.load_seconds, 'y': y.tolist(),\n"
        "                  'steps': e._session.load_steps, 'breakdown': e._session.load_breakdown,\n"
        "                  'fx_hits': counters['inductor']['fxgraph_cache_hit'],\n"
        "                  'fx_misses': counters['inductor']['fxgraph_cache_miss'],\n"
        "                  'benchmarked': benchmarked if benchmarked is None else len(benchmarked),\n"
        "                  'compiled_libraries': [p for p in libraries if p.endswith('.so')]}))\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": os.pathsep.join([str(Path(es.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cache"].startswith("compiler cache loaded")
    assert result["fx_hits"] >= 1 and result["fx_misses"] == 0  # every graph came from the engine's cache
    if CUDA and result["benchmarked"] is not None:  # and the kernels' autotuning results with it
        assert result["benchmarked"] == 0
    if not CUDA:  # and the C++ kernels compiled at build, which PyTorch's cache artifacts leave out
        assert "compiled kernel libraries installed" in result["cache"]
        assert result["compiled_libraries"] == []
    # Each batch's compile on load is split into Dynamo's tracing, Inductor and the first calls, which add up.
    batches = [key.removeprefix("compile_batch_") for key in result["steps"] if key.startswith("compile_batch_")]
    assert batches
    for batch in batches:
        parts = [result["breakdown"][f"batch_{batch}_{step}"] for step in ("trace", "inductor", "run")]
        assert parts[0] > 0 and all(part >= 0 for part in parts)
        assert sum(parts) == pytest.approx(result["steps"][f"compile_batch_{batch}"], abs=0.05)
    expected = run_plain(model, {"x": np.ones((3, 6), np.float32)})["probs"]
    np.testing.assert_allclose(np.array(result["y"], dtype=np.float32), expected, rtol=1e-4, atol=1e-6)

    # Without trust, the cache can be left out: the engine compiles again on load.
    monkeypatch.setenv(tc.CACHES_ENV, "0")
    recompiled = es.load(path)
    assert recompiled._session.cache_info.startswith("compiler cache not used")
    assert_matches_onnxruntime(recompiled, model, batches=(3,))


@pytest.mark.skipif(CUDA, reason="the kernel libraries are a CPU engine's")
def test_each_cpu_engine_carries_every_kernel_library_it_uses(tmp_path):
    """Two engines built in one process with the same kernels: the second carries them too (compiled again into
    its own folder, not reused from the first build's in-process tables and left out)."""
    from enginesmith.backends.torch_compile.payload import read_native
    from enginesmith.bundle import read_bundle

    libraries = []
    for seed in (1, 2):
        engine = es.build(make_mlp(seed=seed), backend="torch", backend_options=COMPILED, verify=False)
        libraries.append(read_native(read_bundle(engine.save(tmp_path / f"mlp{seed}.engine")).payload))
    assert libraries[0] and set(libraries[1]) == set(libraries[0])


def test_compiled_kernel_libraries_go_into_the_cache_folder_and_nowhere_else(tmp_path, monkeypatch):
    """A CPU engine's kernel libraries: collected by their cache paths, written where none is yet, and a payload
    entry outside a cache's layout (a path escape) refused by name."""
    from enginesmith.backends.torch_compile import native_kernels
    from enginesmith.backends.torch_compile.payload import read_native

    monkeypatch.setattr(native_kernels, "_PROCESS_HELPERS", {})
    built = tmp_path / "built"
    for name, data in {"ab/cab1.so": b"one", "cd/ccd2.main.so": b"two", "ab/cab1.cpp": b"source"}.items():
        (built / name).parent.mkdir(parents=True, exist_ok=True)
        (built / name).write_bytes(data)
    kernels = native_kernels.collect(built)
    assert kernels == {"ab/cab1.so": b"one", "cd/ccd2.main.so": b"two"}
    # A later build's folder lacks the helper the process compiled once; its payload gets it all the same.
    later = tmp_path / "later"
    (later / "ef").mkdir(parents=True)
    (later / "ef" / "cef3.main.so").write_bytes(b"three")
    assert native_kernels.collect(later) == {"ab/cab1.so": b"one", "ef/cef3.main.so": b"three"}

    cache = tmp_path / "cache"
    (cache / "cd").mkdir(parents=True)
    (cache / "cd" / "ccd2.main.so").write_bytes(b"already here")
    monkeypatch.setenv(native_kernels.CACHE_DIR_ENV, str(cache))
    assert native_kernels.install(kernels) == 1
    assert (cache / "ab" / "cab1.so").read_bytes() == b"one"
    assert (cache / "cd" / "ccd2.main.so").read_bytes() == b"already here"
    assert sorted(p.name for p in cache.rglob("*")) == ["ab", "cab1.so", "ccd2.main.so", "cd"]  # no temp files left

    payload = tc.pack_payload({"format": tc.PAYLOAD_FORMAT}, b"program", None, None, kernels)
    assert read_native(payload) == kernels
    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as archive:
        archive.writestr("meta.json", "{}")
        archive.writestr("native/../../evil.so", b"x")
    with pytest.raises(es.EnginesmithError, match=r"native kernel at '\.\./\.\./evil\.so'.*refusing"):
        read_native(escaping.getvalue())
    with pytest.raises(es.EnginesmithError, match="refusing"):
        tc.pack_payload({}, b"program", None, None, {"/etc/evil.so": b"x"})


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need ENGINESMITH_TEST_DEVICE=cuda")
def test_cuda_engines_replay_their_own_graphs_from_any_thread(tmp_path):
    """Captured graphs (not Inductor's per-thread graph trees): the same answers from a thread that did not build
    or load the engine, before and after a save and load."""
    model = make_mlp()
    engine = es.build(model, backend="torch", backend_options=COMPILED)
    assert any("captured in CUDA graphs for batches 1, 3" in line for line in engine.manifest.build_log)
    assert engine.compiled_batches == (1, 3)  # what a server pads its batches up to
    loaded = es.load(engine.save(tmp_path / "mlp.engine"), trust_code=True)
    assert "cuda_graphs" in loaded._session.load_steps
    x = np.random.default_rng(3).standard_normal((3, 6)).astype(np.float32)
    expected = run_plain(model, {"x": x})["probs"]
    for candidate in (engine, loaded):
        answers: list[np.ndarray] = []
        worker = threading.Thread(target=lambda: answers.extend(candidate(x=x[i : i + 1])["probs"] for i in range(3)))
        worker.start()
        worker.join()
        np.testing.assert_allclose(np.concatenate(answers), expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(candidate(x=x)["probs"], expected, rtol=1e-4, atol=1e-6)


def test_run_torch_keeps_tensors_on_the_device_and_takes_dlpack():
    model = make_mlp()
    engine = es.build(model, backend="torch", backend_options=EAGER)
    session = engine._session
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    out = session.run_torch({"x": torch.from_numpy(x).to(DEVICE)})["probs"]
    assert isinstance(out, torch.Tensor) and out.device.type == torch.device(DEVICE).type
    np.testing.assert_allclose(out.cpu().numpy(), run_plain(model, {"x": x})["probs"], rtol=1e-4, atol=1e-6)
    via_dlpack = session.run_torch({"x": x})["probs"]  # numpy arrays implement __dlpack__
    np.testing.assert_allclose(via_dlpack.cpu().numpy(), out.cpu().numpy(), rtol=1e-6)


def test_infer_device_keeps_tensors_on_the_device_and_fills_given_outputs():
    model = make_mlp()
    engine = es.build(model, backend="torch", backend_options=EAGER)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)).to(DEVICE)
    expected = run_plain(model, {"x": x.cpu().numpy()})["probs"]
    out = engine.infer_device({"x": x})["probs"]
    assert isinstance(out, torch.Tensor) and out.device == x.device
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-4, atol=1e-6)
    target = torch.zeros((4, 4), dtype=torch.float32, device=DEVICE)
    filled = engine.infer_device({"x": x}, {"probs": target})["probs"]
    assert filled.data_ptr() == target.data_ptr()
    np.testing.assert_allclose(target.cpu().numpy(), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(es.EnginesmithError, match="x"):
        engine.infer_device({"x": x[:, :5]})  # a fixed dimension is wrong: refused before the run


# --------------------------------------------------------------------------- models and conversion


@pytest.mark.parametrize("make", [make_two_in_two_out, make_int_input_model], ids=["two_in_two_out", "int_input"])
def test_multi_input_output_and_integer_tensors(make):
    model = make()
    engine = es.build(model, backend="torch", backend_options=EAGER)
    assert_matches_onnxruntime(engine, model)


@pytest.mark.parametrize("dynamic_reshape", [False, True], ids=["constant_shapes", "shape_arithmetic"])
def test_shape_arguments_become_static_for_export(dynamic_reshape):
    model = shape_ops_model(dynamic_reshape)
    # Graph passes off: they would fold the shape arithmetic before the backend sees it.
    engine = es.build(model, backend="torch", backend_options=EAGER, graph_passes=False)
    log = " ".join(engine.manifest.build_log)
    assert "OnnxReshape" in log and "OnnxSlice" in log
    if dynamic_reshape:
        assert "OnnxShape" in log
    assert_matches_onnxruntime(engine, model)


def squeeze_axes_model() -> onnx.ModelProto:
    """Opset-13 Squeeze takes its axes as an input (tf2onnx writes GlobalAveragePool -> Squeeze for Keras'
    pooling heads): x[batch, 3, 5, 5] -> GAP -> Squeeze(axes [2, 3]) -> y[batch, 3]; and z[batch, 4, 6] reshaped
    to [batch, 24] through Shape -> Gather([0]) -> Squeeze(axes [0]) -> Unsqueeze -> Concat."""

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"], name="gap"),
        helper.make_node("Squeeze", ["pooled", "hw"], ["y"], name="squeeze_hw"),
        helper.make_node("Shape", ["z"], ["zs"], name="shape"),
        helper.make_node("Gather", ["zs", "first"], ["b1"], name="gather", axis=0),
        helper.make_node("Squeeze", ["b1", "zero"], ["b"], name="squeeze_batch"),
        helper.make_node("Unsqueeze", ["b", "zero"], ["b_again"], name="unsqueeze_batch"),
        helper.make_node("Concat", ["b_again", "minus1"], ["zshape"], name="concat", axis=0),
        helper.make_node("Reshape", ["z", "zshape"], ["w"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "squeeze_axes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 5, 5]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, ["batch", 24])],
        [ints("hw", [2, -1]), ints("first", [0]), ints("zero", [0]), ints("minus1", [-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_squeeze_with_axes_input_becomes_static_for_export():
    model = squeeze_axes_model()
    engine = es.build(model, backend="torch", backend_options=EAGER, graph_passes=False)
    assert "OnnxSqueezeDynamicAxes x2" in " ".join(engine.manifest.build_log)
    assert_matches_onnxruntime(engine, model)


def test_conv_net_with_batchnorm_and_dropout_matches_onnxruntime(tmp_path):
    model = samples.small_cnn()
    engine = es.build(model, backend="torch", backend_options=EAGER)
    assert any("Conv+BN" in line for line in engine.manifest.build_log)
    assert_matches_onnxruntime(engine, model)
    loaded = es.load(engine.save(tmp_path / "cnn.engine"))
    assert_matches_onnxruntime(loaded, model, batches=(2,))


def test_data_dependent_shape_fails_export_with_one_message_and_no_graph_dump(capsys):
    class ReshapeByValue(torch.nn.Module):
        def forward(self, *inputs):
            return inputs[0].reshape(int(inputs[0].argmax()), -1)

    signature = Signature(inputs=[TensorSpec("x", "float32", ["batch", 4])], outputs=[TensorSpec("y", "float32", [None, None])])
    with pytest.raises(UnsupportedModelError, match="torch.export could not trace the model.*data-dependent"):
        tc.export_program(ReshapeByValue(), signature, "cpu", [])
    assert "def forward" not in capsys.readouterr().err


def test_unsupported_op_is_named_with_its_nodes():
    model = make_unsupported_op_model()
    # build stops at the compatibility report; without it the backend's converter says the same.
    with pytest.raises(UnsupportedModelError, match=r"fancy_1.*FancyActivation"):
        es.build(model, backend="torch", backend_options=EAGER)
    with pytest.raises(UnsupportedModelError, match=r"FancyActivation.*fancy_1"):
        es.build(model, backend="torch", backend_options=EAGER, check_compatibility=False)
    support = get_backend("torch").op_support(model, BuildOptions())
    assert support["relu"][0] == "supported" and support["fancy_1"][0] == "unsupported"


def test_precisions_int8_refused_and_fp16_stays_fp32_on_the_cpu():
    with pytest.raises(UnsupportedModelError, match="int8"):
        get_backend("torch").build(make_mlp(), Signature((TensorSpec("x", "float32", ("batch", 6)),),
                                                         (TensorSpec("probs", "float32", ("batch", 4)),)),
                                   BuildOptions(precision="int8", backend_options=EAGER))
    if not CUDA:
        engine = es.build(make_mlp(), backend="torch", precision="fp16", backend_options=EAGER)
        assert engine.precision == "fp32"
        assert any("does not pay on the CPU" in line for line in engine.manifest.build_log)


@pytest.mark.parametrize("limit", [-1, 2.5, "all"])
def test_bad_cudnn_benchmark_limit_is_refused_by_name(limit):
    with pytest.raises(BuildError, match=r"cudnn_benchmark_limit must be a whole number >= 0"):
        es.build(make_mlp(), backend="torch", backend_options={**EAGER, "cudnn_benchmark_limit": limit})


def test_cudnn_benchmark_limit_is_recorded_and_set_again_at_load():
    """The limit applies to cuDNN's search, so the engine asks for the search (an MLP alone would not)."""
    from enginesmith.importers import import_model

    imported = import_model(make_mlp())
    backend = get_backend("torch")
    result = backend.build(imported.model, imported.signature,
                           BuildOptions(backend_options={**EAGER, "cudnn_benchmark": True, "cudnn_benchmark_limit": 0}))
    meta = tc.unpack_payload(result.payload)[0]
    if not CUDA:  # no cuDNN on the CPU: nothing to record
        assert meta["cudnn_benchmark_limit"] is None
        return
    import torch

    assert meta["cudnn_benchmark_limit"] == 0
    torch.backends.cudnn.benchmark_limit = 10
    backend.load(result.payload, result.resolved_options, imported.signature)
    assert torch.backends.cudnn.benchmark_limit == 0


@pytest.mark.parametrize("value", ["sometimes", 2])
def test_bad_cudnn_benchmark_is_refused_by_name(value):
    with pytest.raises(BuildError, match=r"cudnn_benchmark must be auto, true or false"):
        es.build(make_mlp(), backend="torch", backend_options={**EAGER, "cudnn_benchmark": value})


def test_heuristics_are_kept_only_when_as_fast_at_every_batch():
    from enginesmith.backends.torch_compile.cudnn_search import keeps_heuristics

    assert keeps_heuristics({"1": 0.300, "128": 5.00}, {"1": 0.305, "128": 5.05})
    assert not keeps_heuristics({"1": 0.300, "128": 5.00}, {"1": 0.290, "128": 5.20})  # 4% slower at 128
    assert not keeps_heuristics({}, {})  # nothing timed: nothing shows the heuristics are as fast


def test_convolutions_are_found_in_the_exported_program():
    from enginesmith.backends.torch_compile.cudnn_search import has_convolutions

    conv = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.ReLU())
    assert has_convolutions(torch.export.export(conv, (torch.zeros(1, 2, 8),)))
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    assert not has_convolutions(torch.export.export(mlp, (torch.zeros(1, 4),)))


def test_cudnn_search_is_decided_by_timing_at_build_and_followed_at_load(tmp_path):
    """"auto": a conv engine in CUDA graphs times cuDNN's search against its heuristics and records which it
    kept; the load searches only when the search was kept. Forced values and models without convolutions
    are not timed."""
    from enginesmith.backends.torch_compile.cudnn_search import keeps_heuristics

    model = samples.small_cnn(image_size=16, channels=3)
    options = COMPILED if CUDA else EAGER
    engine = es.build(model, backend="torch", backend_options=options)
    details = engine.manifest.checks["build"]
    path = engine.save(tmp_path / "cnn.engine")
    meta = tc.unpack_payload(zipfile.ZipFile(path).read(f"payload/{tc.PAYLOAD_NAME}"))[0]
    if not CUDA:  # no cuDNN: nothing to search or time
        assert meta["cudnn_benchmark"] is False and not details["cudnn_search_ms"]
        return
    timings = details["cudnn_search_ms"]
    assert set(timings) == {"1", "3"} and all(t["search"] > 0 and t["heuristics"] > 0 for t in timings.values())
    kept_heuristics = keeps_heuristics({b: t["search"] for b, t in timings.items()},
                                       {b: t["heuristics"] for b, t in timings.items()})
    assert meta["cudnn_benchmark"] is (not kept_heuristics)
    assert any(line.startswith("cuDNN") for line in engine.manifest.build_log)
    torch.backends.cudnn.benchmark = False
    try:
        loaded = es.load(path, trust_code=True)
        assert torch.backends.cudnn.benchmark is (not kept_heuristics)
        assert_matches_onnxruntime(loaded, model, batches=(1, 3), rtol=1e-3, atol=1e-4)
    finally:
        torch.backends.cudnn.benchmark = False
    forced = es.build(model, backend="torch", backend_options={**options, "cudnn_benchmark": True})
    assert forced.manifest.checks["build"]["cudnn_search_ms"] == {}
    mlp = es.build(make_mlp(), backend="torch", backend_options=options)
    assert mlp.manifest.checks["build"]["cudnn_benchmark"] is False  # no convolutions: nothing to search


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_engines_take_and_return_fp32(precision):
    """Forced on the CPU (CI), native on a GPU: fp32 in and out, reduced precision inside."""
    model = make_mlp()
    backend = get_backend("torch")
    from enginesmith.importers import import_model

    imported = import_model(model)
    result = backend.build(imported.model, imported.signature,
                           BuildOptions(precision=precision, force_precision=True, backend_options=EAGER))
    assert result.resolved_options.precision == precision
    session = backend.load(result.payload, result.resolved_options, imported.signature)
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    got = session.run({"x": x})["probs"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, run_plain(model, {"x": x})["probs"], atol=3e-2)


def test_native_torch_module_is_built_without_onnx():
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    signature = Signature((TensorSpec("x", "float32", ("batch", 6)),), (TensorSpec("y", "float32", ("batch", 3)),))
    backend = get_backend("torch")
    result = backend.build(module, signature, BuildOptions(backend_options=EAGER))
    assert any("torch module" in line for line in result.log)
    session = backend.load(result.payload, result.resolved_options, signature)
    x = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- payload safety


def _rewrite_program(payload: bytes, edit) -> bytes:
    meta, program, cache, aoti = tc.unpack_payload(payload)
    source = zipfile.ZipFile(io.BytesIO(program))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            data = edit(info.filename, source.read(info.filename))
            if data is not None:
                target.writestr(info.filename, data)
    return tc.pack_payload(meta, buffer.getvalue(), cache, aoti)


def test_payload_that_would_unpickle_is_refused():
    model = make_mlp()
    backend = get_backend("torch")
    from enginesmith.importers import import_model

    imported = import_model(model)
    result = backend.build(imported.model, imported.signature, BuildOptions(backend_options=EAGER))
    names = zipfile.ZipFile(io.BytesIO(tc.unpack_payload(result.payload)[1])).namelist()
    assert not any(name.endswith(".pt") and "sample_inputs" not in name for name in names)

    def pickled_inputs(name, data):
        return b"\x80\x04N." if "sample_inputs" in name else data

    def pickled_weights(name, data):
        if name.endswith("weights_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    for edit, message in ((pickled_inputs, "example inputs"), (pickled_weights, "pickle")):
        with pytest.raises(BuildError, match=message):
            backend.load(_rewrite_program(result.payload, edit), result.resolved_options, imported.signature)
    with pytest.raises(BuildError, match="not a PyTorch backend payload"):
        backend.load(b"not a zip", result.resolved_options, imported.signature)


def test_aoti_package_that_cannot_load_is_refused_without_taking_the_process_down():
    """Loading AOTInductor packages crashed fresh processes on the GPU image (SIGSEGV), so load()
    first loads the package in a child process; here the child really fails, on a broken package."""
    backend = get_backend("torch")
    from enginesmith.importers import import_model

    imported = import_model(make_mlp())
    result = backend.build(imported.model, imported.signature, BuildOptions(backend_options=EAGER))
    meta, program, _, _ = tc.unpack_payload(result.payload)
    payload = tc.pack_payload({**meta, "compile": "aoti", "cudagraphs": False}, program, None, b"not an AOTInductor package")
    with pytest.raises(BuildError, match="cannot load the engine's AOTInductor package.*compile='inductor'"):
        backend.load(payload, result.resolved_options, imported.signature)


@pytest.mark.parametrize("value", [np.float32(0.5), np.int64(3), np.bool_(True), np.float16(2.0)])
def test_staging_buffers_take_the_dtype_of_0d_inputs(value):
    """CUDA sessions stage numpy inputs in pinned buffers of the input's torch dtype; a 0-d input (a Clip bound
    fed at run time) once raised IndexError there (found on the H200: every such Clip test failed)."""
    from enginesmith.backends.torch_compile.session import torch_dtype_of

    array = np.asarray(value)
    assert array.ndim == 0
    assert torch_dtype_of(array) == torch.from_numpy(array.reshape(1)).dtype
    assert torch_dtype_of(np.zeros((2, 3), array.dtype)) == torch_dtype_of(array)
