"""Every kind of bad input gives one clear EnginesmithError and leaves no partial file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_int_input_model, make_mlp, make_unsupported_op_model

import enginesmith as es
from enginesmith.cli.app import main


def rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy a bundle entry by entry, letting ``change(name, data)`` alter or drop entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


# ----------------------------------------------------------------------------- sources


def test_missing_model_file(tmp_path):
    with pytest.raises(es.SourceError, match="not found"):
        es.build(tmp_path / "nope.onnx")


def test_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("this is not a protobuf, just some text\n" * 10)
    with pytest.raises(es.SourceError, match="not a readable ONNX model|not an ONNX model"):
        es.build(path)


def test_truncated_onnx_file(tmp_path, mlp_path):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(mlp_path.read_bytes()[: len(mlp_path.read_bytes()) // 2])
    with pytest.raises(es.SourceError):
        es.build(path)


def test_unknown_file_kind(tmp_path):
    path = tmp_path / "model.xyz"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(es.SourceError, match="cannot tell what kind of model"):
        es.build(path)


def test_op_the_backend_cannot_run_names_op_and_node(tmp_path):
    path = tmp_path / "fancy.onnx"
    onnx.save(make_unsupported_op_model(), path)
    out = tmp_path / "fancy.engine"
    with pytest.raises(es.UnsupportedModelError) as info:
        es.build(path, output=out)
    assert "FancyActivation" in str(info.value) and "fancy_1" in str(info.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fancy.onnx"]


def test_unknown_precision_and_backend(mlp_path):
    with pytest.raises(es.BuildError, match="unknown precision"):
        es.build(mlp_path, precision="fp7")
    with pytest.raises(es.BackendUnavailableError, match="unknown backend"):
        es.build(mlp_path, backend="nonsense")


def test_unavailable_provider(mlp_path):
    with pytest.raises(es.BackendUnavailableError, match="not available here"):
        es.build(mlp_path, backend_options={"providers": ["nonexistent"]})


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def mlp_engine():
    return es.build(make_mlp())


def test_unknown_input_name(mlp_engine):
    with pytest.raises(es.InputError, match="unknown input 'y'.*x \\(float32\\[batch, 6\\]\\)"):
        mlp_engine(x=np.zeros((1, 6), np.float32), y=np.zeros(1))


def test_missing_input(mlp_engine):
    with pytest.raises(es.InputError, match="missing input 'x'"):
        mlp_engine()


def test_wrong_rank(mlp_engine):
    with pytest.raises(es.InputError, match="rank 2"):
        mlp_engine(x=np.zeros((6,), np.float32))


def test_wrong_fixed_dimension(mlp_engine):
    with pytest.raises(es.InputError, match="axis 1 is 5, the engine needs 6"):
        mlp_engine(x=np.zeros((2, 5), np.float32))


def test_non_castable_dtype():
    engine = es.build(make_int_input_model())
    with pytest.raises(es.InputError, match="float32 but the engine takes int64"):
        engine(ids=np.zeros((1, 4), np.float32))


def test_complex_input_is_refused(mlp_engine):
    with pytest.raises(es.InputError, match="complex64 but the engine takes float32"):
        mlp_engine(x=np.zeros((1, 6), np.complex64))


def test_ragged_input(mlp_engine):
    with pytest.raises(es.InputError, match="cannot be converted to an array"):
        mlp_engine(x=[[1, 2], [1, 2, 3]])


def test_inconsistent_symbolic_dims():
    from conftest import make_two_in_two_out

    engine = es.build(make_two_in_two_out())
    with pytest.raises(es.InputError, match=r"input 'right' axis 0 is 3, but symbol 'batch' is 2 \(input 'left' axis 0\)"):
        engine(left=np.zeros((2, 3), np.float32), right=np.zeros((3, 3), np.float32))


# ----------------------------------------------------------------------------- bundles


def test_corrupted_bundle(tmp_path):
    path = tmp_path / "junk.engine"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(es.BundleError, match="not an enginesmith bundle"):
        es.load(path)


def test_truncated_bundle(tmp_path, mlp_engine_path):
    path = tmp_path / "truncated.engine"
    raw = mlp_engine_path.read_bytes()
    path.write_bytes(raw[: len(raw) - 200])
    with pytest.raises(es.BundleError):
        es.load(path)


def test_tampered_payload(tmp_path, mlp_engine_path):
    path = tmp_path / "tampered.engine"

    def change(name, data):
        if name.startswith("payload/"):
            model = onnx.load_from_string(data)
            init = model.graph.initializer[0]
            arr = onnx.numpy_helper.to_array(init).copy()
            arr.flat[0] += 1.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            return model.SerializeToString()
        return data

    rewrite_zip(mlp_engine_path, path, change)
    with pytest.raises(es.BundleError, match="checksum mismatch for 'payload/"):
        es.load(path)


def test_tampered_manifest(tmp_path, mlp_engine_path):
    path = tmp_path / "tampered.engine"

    def change(name, data):
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["precision"] = "int8"
            return json.dumps(manifest).encode()
        return data

    rewrite_zip(mlp_engine_path, path, change)
    with pytest.raises(es.BundleError, match="manifest checksum does not match"):
        es.load(path)


def test_path_escape_entry(tmp_path, mlp_engine_path):
    path = tmp_path / "escape.engine"
    rewrite_zip(mlp_engine_path, path, lambda name, data: data)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("../../evil.txt", b"owned")
    with pytest.raises(es.BundleError, match="unsafe entry name '../../evil.txt'"):
        es.load(path)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_unlisted_extra_entry(tmp_path, mlp_engine_path):
    path = tmp_path / "extra.engine"
    rewrite_zip(mlp_engine_path, path, lambda name, data: data)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("payload/extra.bin", b"sneaky")
    with pytest.raises(es.BundleError, match="do not match the manifest"):
        es.load(path)


def test_missing_entry(tmp_path, mlp_engine_path):
    path = tmp_path / "missing.engine"
    rewrite_zip(mlp_engine_path, path, lambda name, data: None if name.startswith("payload/") else data)
    with pytest.raises(es.BundleError, match="missing"):
        es.load(path)


def test_fingerprint_mismatch(monkeypatch, mlp_engine_path):
    import enginesmith.backends.onnxruntime as ort_backend

    real = ort_backend.host_fingerprint
    monkeypatch.setattr(ort_backend, "host_fingerprint", lambda: {**real(), "arch": "aarch64"})
    with pytest.raises(es.PlatformMismatchError) as info:
        es.load(mlp_engine_path)
    message = str(info.value)
    assert "engine was built for x86_64 / ONNX Runtime" in message or "engine was built for" in message
    assert "arch is aarch64" in message
    assert "rebuild it here with 'enginesmith build mlp.engine' (the bundle carries its source)" in message
    # The bundle can still be rebuilt for "this" machine from its embedded source.
    rebuilt = es.build(mlp_engine_path, output=mlp_engine_path.with_name("rebuilt.engine"))
    assert rebuilt.manifest.fingerprint["arch"] == "aarch64"


def test_fingerprint_mismatch_without_source_points_to_original(monkeypatch, tmp_path, mlp_path):
    import enginesmith.backends.onnxruntime as ort_backend

    path = es.build(mlp_path, include_source=False, output=tmp_path / "nosrc.engine").path
    real = ort_backend.host_fingerprint
    monkeypatch.setattr(ort_backend, "host_fingerprint", lambda: {**real(), "cpu_flags": "avx avx2 avx512f"})
    with pytest.raises(es.PlatformMismatchError, match="from the original model \\('mlp.onnx'\\)"):
        es.load(path)


def test_bad_data_file_for_validation(tmp_path, mlp_engine_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((2, 6), np.float32))
    with pytest.raises(es.ValidationDataError, match="unknown: \\['wrong'\\]"):
        es.validate(mlp_engine_path, data=bad)


# ----------------------------------------------------------------------------- CLI


def test_cli_prints_one_line_and_exits_nonzero(tmp_path, capsys, mlp_engine_path):
    junk = tmp_path / "junk.engine"
    junk.write_bytes(b"garbage")
    assert main(["run", str(junk), "--random"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_failed_build_leaves_no_output(tmp_path, capsys):
    src = tmp_path / "fancy.onnx"
    onnx.save(make_unsupported_op_model(), src)
    out = tmp_path / "fancy.engine"
    assert main(["build", str(src), "-o", str(out)]) == 2
    assert "FancyActivation" in capsys.readouterr().err
    assert not out.exists()


def test_cli_input_error_writes_no_outputs_file(tmp_path, capsys, mlp_engine_path):
    bad = tmp_path / "x.npy"
    np.save(bad, np.zeros((2, 5), np.float32))
    out = tmp_path / "out.npz"
    assert main(["run", str(mlp_engine_path), "--input", f"x={bad}", "--out", str(out)]) == 2
    assert "axis 1 is 5" in capsys.readouterr().err
    assert not out.exists()


def test_outputs_get_ordinary_permissions_and_no_temp_files(tmp_path, mlp_path):
    import os
    import stat

    from enginesmith.files import write_atomic

    umask = os.umask(0o022)
    try:
        engine_path = es.build(mlp_path, output=tmp_path / "m.engine").path
        write_atomic(tmp_path / "r.json", b"{}")
    finally:
        os.umask(umask)
    for path in (engine_path, tmp_path / "r.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's 0600 would hide results from others
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "mlp.onnx", "r.json"]


def test_bf16_is_refused_by_backends_that_do_not_build_it(tmp_path):
    # bf16 is a known precision (the OpenVINO and PyTorch backends build it); the others say so
    # instead of building fp32 under a bf16 label.
    with pytest.raises(es.BuildError, match="builds fp32, fp16 and int8 engines, not bf16; for bf16 use --backend openvino"):
        es.build(make_mlp(), precision="bf16", output=tmp_path / "x.engine")
    assert list(tmp_path.iterdir()) == []
    from enginesmith.backends import get_backend
    from enginesmith.backends.base import BuildOptions
    from enginesmith.importers import import_model

    imported = import_model(make_mlp())
    with pytest.raises(es.BuildError, match="unknown precision 'bf16' for TensorRT"):
        get_backend("tensorrt").build(imported.model, imported.signature, BuildOptions(precision="bf16"))
    with pytest.raises(es.BuildError, match="unknown precision 'fp8': choose one of fp32, fp16, bf16, int8 or best"):
        es.build(make_mlp(), precision="fp8")
