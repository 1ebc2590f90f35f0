"""Build, save, load and run engines from ONNX models; outputs checked against plain ONNX Runtime."""

from __future__ import annotations

import threading
import zipfile

import numpy as np
import onnx
import pytest
from conftest import make_int_input_model, make_mlp, make_two_in_two_out, run_plain

import enginesmith as es
from enginesmith.runtime.inputs import InputCastWarning


def test_build_from_path_matches_plain_onnxruntime(mlp_path):
    engine = es.build(mlp_path)
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    got = engine(x=x)
    expected = run_plain(onnx.load(mlp_path), {"x": x})
    assert list(got) == ["probs"]
    np.testing.assert_allclose(got["probs"], expected["probs"], rtol=1e-5, atol=1e-6)
    assert engine.signature.input_names == ["x"]
    assert engine.signature.inputs[0].shape == ("batch", 6)
    assert engine.manifest.checks["build_verification"]["passed"] is True


def test_call_styles_agree_and_dynamic_batch(mlp_path):
    engine = es.build(onnx.load(mlp_path))
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 6)).astype(np.float32)
        a = engine(x=x)["probs"]
        b = engine.infer({"x": x})["probs"]
        c = engine({"x": x})["probs"]
        assert a.shape == (batch, 4)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_save_load_round_trip_keeps_outputs_and_manifest(tmp_path, mlp_path):
    built = es.build(mlp_path)
    path = built.save(tmp_path / "out" / "mlp.engine")
    loaded = es.load(path)
    x = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_array_equal(built(x=x)["probs"], loaded(x=x)["probs"])
    m = loaded.manifest
    assert m.backend == "onnxruntime" and m.precision == "fp32"
    assert m.source_kind == "onnx" and m.source_name == "mlp.onnx"
    assert m.fingerprint["arch"] and "backend_version" in m.fingerprint
    assert m.has_source
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert {"manifest.json", "payload/model.optimized.onnx", "source/mlp.onnx"} <= names
        assert zf.read("source/mlp.onnx") == mlp_path.read_bytes()
    # The payload is the offline-optimized graph: the MatMul+Add pairs are fused.
    payload = onnx.load_from_string(zipfile.ZipFile(path).read("payload/model.optimized.onnx"))
    assert len(payload.graph.node) < len(onnx.load(mlp_path).graph.node)
    assert m.checks["build"]["node_placement"]


def test_no_temp_files_left_after_save(tmp_path, mlp_path):
    es.build(mlp_path).save(tmp_path / "a.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.engine", "mlp.onnx"]


def test_two_inputs_two_outputs_named(tmp_path):
    model = make_two_in_two_out()
    engine = es.build(model)
    rng = np.random.default_rng(3)
    feeds = {"left": rng.standard_normal((4, 3)).astype(np.float32), "right": rng.standard_normal((4, 3)).astype(np.float32)}
    got = engine(**feeds)
    expected = run_plain(model, feeds)
    assert set(got) == {"score", "ids"}
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["ids"], expected["ids"])
    assert got["ids"].dtype == np.int64


def test_safe_cast_is_applied_and_reported(mlp_path):
    engine = es.build(mlp_path)
    x64 = np.random.default_rng(4).standard_normal((2, 6))
    with pytest.warns(InputCastWarning, match="float64 to float32"):
        got = engine(x=x64)
    np.testing.assert_array_equal(got["probs"], engine(x=x64.astype(np.float32))["probs"])


def test_int32_to_int64_cast_and_lists_accepted():
    engine = es.build(make_int_input_model())
    with pytest.warns(InputCastWarning):
        got = engine(ids=np.array([[1, 2, 3, 4]], dtype=np.int32))
    np.testing.assert_allclose(got["total"], [[10.0]])
    np.testing.assert_allclose(engine(ids=[[1, 1, 1, 1], [2, 2, 2, 2]])["total"], [[4.0], [8.0]])


class DlpackOnly:
    """An object offering only the DLPack protocol, like a CPU tensor of another framework."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class ArrayOnly:
    def __init__(self, array: np.ndarray):
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array


def test_dlpack_and_array_interface_inputs(mlp_path):
    engine = es.build(mlp_path)
    x = np.random.default_rng(5).standard_normal((2, 6)).astype(np.float32)
    expected = engine(x=x)["probs"]
    np.testing.assert_array_equal(engine(x=DlpackOnly(x))["probs"], expected)
    np.testing.assert_array_equal(engine(x=ArrayOnly(x))["probs"], expected)


def test_torch_tensors_go_in_when_torch_is_installed(mlp_path):
    torch = pytest.importorskip("torch")
    engine = es.build(mlp_path)
    x = torch.randn(3, 6)
    np.testing.assert_array_equal(engine(x=x)["probs"], engine(x=x.numpy())["probs"])


def test_an_input_layout_accepted_once_is_not_checked_again(mlp_path, monkeypatch, tmp_path):
    import enginesmith.runtime.inputs as inputs

    engine = es.load(es.build(onnx.load(mlp_path), output=tmp_path / "m.engine").path)  # never called yet
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    want = run_plain(onnx.load(mlp_path), {"x": x})["probs"]
    checked = []
    real = inputs.check_shape
    monkeypatch.setattr(inputs, "check_shape", lambda *a, **k: (checked.append(a[0]), real(*a, **k))[1])
    for _ in range(3):
        np.testing.assert_allclose(engine(x=x)["probs"], want, rtol=1e-5, atol=1e-6)
    assert checked == ["x"]  # the first call only
    # Other layouts are still checked: a new batch size, a wrong shape, a dtype to cast (every time).
    engine(x=x[:2])
    assert checked == ["x", "x"]
    with pytest.raises(es.InputError, match="axis 1 is 5, the engine needs 6"):
        engine(x=np.zeros((4, 5), np.float32))
    for _ in range(2):
        with pytest.warns(InputCastWarning):
            np.testing.assert_allclose(engine(x=x.astype(np.float64))["probs"], want, rtol=1e-5, atol=1e-6)
    # A view that is not C-contiguous is copied by the checks, never passed on as it is.
    strided = np.ascontiguousarray(np.repeat(x, 2, axis=1))[:, ::2]
    np.testing.assert_allclose(engine(x=strided)["probs"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(es.InputError, match="unknown input 'y'"):
        engine(y=x)


def test_unpickled_arrays_of_an_accepted_layout_are_not_checked_again(mlp_path, monkeypatch, tmp_path):
    # Arrays that crossed a process boundary (multiprocessing, Ray's object store) are unpickled with an equal
    # but distinct dtype object; they were checked on every call (about 15 us: 10% of a 0.14 ms model).
    import pickle

    import enginesmith.runtime.inputs as inputs

    engine = es.load(es.build(onnx.load(mlp_path), output=tmp_path / "m.engine").path)
    x = pickle.loads(pickle.dumps(np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)))
    assert x.dtype == np.float32 and x.dtype is not np.dtype(np.float32)
    want = run_plain(onnx.load(mlp_path), {"x": x})["probs"]
    checked = []
    real = inputs.check_shape
    monkeypatch.setattr(inputs, "check_shape", lambda *a, **k: (checked.append(a[0]), real(*a, **k))[1])
    for _ in range(3):
        np.testing.assert_allclose(engine(x=x)["probs"], want, rtol=1e-5, atol=1e-6)
    assert checked == ["x"]  # the first call only
    big_endian = x.astype(">f4")  # equal values, another byte order: not the engine's dtype, so checked and cast
    with pytest.warns(InputCastWarning):
        np.testing.assert_allclose(engine(x=big_endian)["probs"], want, rtol=1e-5, atol=1e-6)
    assert checked == ["x", "x"]


def test_feeds_of_an_accepted_layout_reach_the_session_as_they_are(mlp_path, monkeypatch):
    # No copy of the arrays nor of the dict once a layout is known; other mappings still work.
    from types import MappingProxyType

    engine = es.build(mlp_path)
    x = np.random.default_rng(4).standard_normal((2, 6)).astype(np.float32)
    want = run_plain(onnx.load(mlp_path), {"x": x})["probs"]
    seen = []
    real = engine._session.run
    monkeypatch.setattr(engine._session, "run", lambda feeds: (seen.append(feeds), real(feeds))[1])
    feeds = {"x": x}
    for _ in range(2):
        np.testing.assert_allclose(engine.infer(feeds)["probs"], want, rtol=1e-5, atol=1e-6)
    assert seen[1] is feeds and seen[1]["x"] is x and feeds == {"x": x}
    np.testing.assert_allclose(engine.infer(MappingProxyType(feeds))["probs"], want, rtol=1e-5, atol=1e-6)
    assert seen[2]["x"] is x
    # A same-shaped array of another dtype, or a missing name, is checked again (not taken as known).
    with pytest.warns(InputCastWarning):
        engine.infer({"x": x.astype(np.float64)})
    with pytest.raises(es.InputError, match="missing input 'x'"):
        engine.infer({})


def test_onnxruntime_cpu_session_calls_the_compiled_run(mlp_path):
    from enginesmith.backends.onnxruntime import OnnxRuntimeSession

    engine = es.build(mlp_path)
    session = engine._session
    assert session._run == session._session._sess.run  # the Python wrapper's re-checks are skipped

    class WrapperOnly:  # an ONNX Runtime whose wrapper keeps its compiled session elsewhere
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def get_providers(self):
            return ["CPUExecutionProvider"]

        def run(self, names, feeds, run_options=None):
            self.calls += 1
            return self.inner.run(names, feeds, run_options)

    wrapper = WrapperOnly(session._session)
    fallback = OnnxRuntimeSession(wrapper, ["probs"])
    x = np.ones((1, 6), np.float32)
    np.testing.assert_array_equal(fallback.run({"x": x})["probs"], engine(x=x)["probs"])
    assert wrapper.calls == 1


def test_concurrent_calls_from_threads_match_serial(mlp_path):
    engine = es.build(mlp_path)
    rng = np.random.default_rng(6)
    inputs = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(16)]
    serial = [engine(x=x)["probs"] for x in inputs]
    results: list = [None] * len(inputs)
    errors: list = []

    def worker(i: int) -> None:
        try:
            for _ in range(20):
                results[i] = engine(x=inputs[i])["probs"]
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_batch_larger_than_fixed_batch_is_split_and_padded():
    model = make_mlp(batch=4)
    engine = es.build(model)
    assert engine.max_batch == 4
    x = np.random.default_rng(7).standard_normal((10, 6)).astype(np.float32)
    got = engine(x=x)["probs"]
    assert got.shape == (10, 4)
    padded = np.concatenate([x, x[:2]])  # the reference runs the fixed batch of 4 three times
    expected = np.concatenate([run_plain(model, {"x": padded[i : i + 4]})["probs"] for i in range(0, 12, 4)])[:10]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_smaller_batch_than_fixed_is_padded():
    model = make_mlp(batch=4)
    engine = es.build(model)
    x = np.random.default_rng(8).standard_normal((1, 6)).astype(np.float32)
    got = engine(x=x)["probs"]
    assert got.shape == (1, 4)
    np.testing.assert_allclose(got[0], run_plain(model, {"x": np.repeat(x, 4, axis=0)})["probs"][0], rtol=1e-5)


def test_rebuild_from_bundle_uses_embedded_source(tmp_path, mlp_engine_path):
    rebuilt = es.build(mlp_engine_path, output=tmp_path / "rebuilt.engine")
    original = es.load(mlp_engine_path)
    x = np.random.default_rng(9).standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt(x=x)["probs"], original(x=x)["probs"])
    assert rebuilt.manifest.source_sha256 == original.manifest.source_sha256
    assert es.load(tmp_path / "rebuilt.engine").manifest.has_source


def test_rebuild_starts_from_what_was_asked_not_what_this_machine_resolved(tmp_path, mlp_path):
    # fp16 on the CPU provider resolves to fp32 and the providers to this machine's; a rebuild on a
    # GPU machine must ask for fp16 again and pick its own providers.
    es.build(mlp_path, precision="fp16", output=tmp_path / "m.engine")
    options = es.load(tmp_path / "m.engine").manifest.build_options
    assert options["precision"] == "fp32" and options["backend_options"]["providers"] == ["CPUExecutionProvider"]
    assert options["requested"]["precision"] == "fp16" and options["requested"]["backend_options"] == {}
    rebuilt = es.build(tmp_path / "m.engine").manifest.build_options
    assert rebuilt["requested"] == options["requested"]


def test_no_source_bundle_cannot_be_rebuilt(tmp_path, mlp_path):
    path = es.build(mlp_path, include_source=False, output=tmp_path / "nosrc.engine").path
    with zipfile.ZipFile(path) as zf:
        assert not any(n.startswith("source/") for n in zf.namelist())
    with pytest.raises(es.BundleError, match="does not carry its source"):
        es.build(path)
    assert es.load(path)(x=np.zeros((1, 6), np.float32))["probs"].shape == (1, 4)


def test_info_reports_manifest_and_compatibility(mlp_engine_path):
    data = es.info(mlp_engine_path)
    assert data["runs_here"] is True and data["differences_here"] == []
    assert data["signature"]["inputs"][0]["name"] == "x"
    assert data["platform_summary"].startswith(data["fingerprint"]["arch"] + " / ONNX Runtime")
    assert "build_verification" in data["reports"]


def test_external_data_model_is_loaded_and_embedded_whole(tmp_path):
    model = make_mlp()
    path = tmp_path / "ext" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    assert (path.parent / "weights.bin").exists()
    engine = es.build(path, output=tmp_path / "ext.engine")
    x = np.random.default_rng(10).standard_normal((2, 6)).astype(np.float32)
    # onnx.save moved the weights out of ``model``, so compare with a fresh copy.
    np.testing.assert_allclose(engine(x=x)["probs"], run_plain(make_mlp(), {"x": x})["probs"], rtol=1e-5, atol=1e-6)
    # The embedded source carries the weights inline, so a rebuild elsewhere needs no side files.
    (path.parent / "weights.bin").unlink()
    rebuilt = es.build(tmp_path / "ext.engine", output=tmp_path / "rebuilt.engine")
    np.testing.assert_array_equal(rebuilt(x=x)["probs"], engine(x=x)["probs"])


def test_initializers_listed_as_inputs_are_not_user_inputs():
    model = make_mlp()
    for init in model.graph.initializer:
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    engine = es.build(model)
    assert engine.signature.input_names == ["x"]
    assert engine(x=np.zeros((1, 6), np.float32))["probs"].shape == (1, 4)


def test_missing_external_data_is_a_clear_error(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(es.SourceError, match="external weights"):
        es.build(path)
