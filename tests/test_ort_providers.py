"""ONNX Runtime's TensorRT and CUDA execution providers (backends/ort_gpu.py), and the cache plumbing of rebuilds.

What runs here for real: the option mapping onto ONNX Runtime's documented provider
options, profile strings, int8 calibration with ONNX Runtime's calibrators (CPU) and the
TensorRT calibration table written by ``write_calibration_table``, the bundle cache
bookkeeping, version parsing, and the errors. What cannot run here: a session on the
TensorRT or CUDA provider (onnxruntime-gpu and TensorRT are not installable in this
environment, nor on the project's GPU machine); those tests skip unless onnxruntime
lists the provider.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_mlp

import enginesmith as es
from enginesmith import api
from enginesmith.backends import BuildOptions, Calibration, get_backend
from enginesmith.backends import onnxruntime as ort_backend
from enginesmith.backends import ort_gpu
from enginesmith.backends.ort_gpu import CUDA_EP, TRT_EP
from enginesmith.backends.tensorrt.options import Profile
from enginesmith.signature import Signature, TensorSpec

CPU = ["CPUExecutionProvider"]
TRT = [TRT_EP, CUDA_EP, "CPUExecutionProvider"]


def _signature(*inputs: TensorSpec) -> Signature:
    return Signature(inputs=tuple(inputs), outputs=(TensorSpec("y", "float32", ("batch", 4)),))


SIG = _signature(TensorSpec("x", "float32", ("batch", 6)))


# ---------------------------------------------------------------------------- options


def test_tensorrt_options_need_the_tensorrt_provider():
    with pytest.raises(es.BuildError, match=r"backend options profiles, workspace_mb configure TensorRT, but this ONNX "
                                            r"Runtime build uses the CPU provider\(s\): add --provider tensorrt"):
        ort_gpu.gpu_settings({"workspace_mb": 64, "profiles": {}}, CPU)
    with pytest.raises(es.BuildError, match="backend option gpu selects a CUDA device: add --provider cuda"):
        ort_gpu.gpu_settings({"gpu": 1}, CPU)
    assert ort_gpu.gpu_settings({"gpu": 1}, [CUDA_EP, "CPUExecutionProvider"]) == ort_gpu.OrtGpuSettings(None, 1)
    # Options of no provider (another backend's, say) are left alone, as before.
    assert ort_gpu.gpu_settings({"device": "cuda"}, CPU).trt is None


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"version_compatible": True}, "cannot build version-compatible engines: drop --version-compatible"),
        ({"hardware_compatibility": "same_compute_capability"}, "knows hardware compatibility ampere_plus only"),
        ({"gpu_fallback": False}, "always lets layers the DLA cannot run fall back to the GPU"),
        ({"contexts": 2}, "contexts exist in the TensorRT backend only"),
        ({"engine_cache": "sometimes"}, "engine_cache must be true or false"),
        ({"workspace_mb": 0}, "workspace_mb must be at least 1"),
        ({"optimization_level": 7}, "optimization_level must be between 0 and 5"),
    ],
)
def test_what_the_tensorrt_provider_cannot_do_is_refused(raw, message):
    with pytest.raises(es.BuildError, match=message):
        ort_gpu.gpu_settings(raw, TRT)


def _plan(precision="fp32", table=False, workspace=None, **raw):
    settings = ort_gpu.gpu_settings(raw, TRT)
    profiles = {"x": Profile((1, 6), (4, 6), (16, 6))}
    return ort_gpu.TrtEpPlan(settings, precision, profiles, workspace, table)


def test_options_map_onto_the_documented_provider_options():
    plan = _plan("int8", table=True, workspace=512, dla_core=1, optimization_level=4,
                 hardware_compatibility="ampere_plus", cuda_graphs=True, gpu=0)
    assert ort_gpu.trt_provider_options(plan, "/tmp/cache") == {
        "device_id": "0",
        "trt_fp16_enable": "True",
        "trt_int8_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": "/tmp/cache",
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": "/tmp/cache",
        "trt_int8_calibration_table_name": "calibration.flatbuffers",
        "trt_int8_use_native_calibration_table": "False",
        "trt_max_workspace_size": str(512 * 2**20),
        "trt_dla_enable": "True",
        "trt_dla_core": "1",
        "trt_builder_optimization_level": "4",
        "trt_engine_hw_compatible": "True",
        "trt_cuda_graph_enable": "True",
        "trt_profile_min_shapes": "x:1x6",
        "trt_profile_opt_shapes": "x:4x6",
        "trt_profile_max_shapes": "x:16x6",
    }


def test_fp32_fp16_and_switched_off_caches():
    fp32 = ort_gpu.trt_provider_options(_plan("fp32"), "/c")
    assert fp32["trt_fp16_enable"] == fp32["trt_int8_enable"] == "False"
    assert "trt_max_workspace_size" not in fp32 and "trt_dla_enable" not in fp32
    fp16 = ort_gpu.trt_provider_options(_plan("fp16"), "/c")
    assert fp16["trt_fp16_enable"] == "True" and fp16["trt_int8_enable"] == "False"
    off = ort_gpu.trt_provider_options(_plan(timing_cache="off", engine_cache=False), "/c")
    assert off["trt_timing_cache_enable"] == "False" and "trt_timing_cache_path" not in off
    assert off["trt_engine_cache_enable"] == "False" and off["trt_engine_cache_path"] == "/c"  # the table lives there
    qdq = ort_gpu.trt_provider_options(_plan("int8", table=False), "/c")
    assert qdq["trt_int8_enable"] == "True" and "trt_int8_calibration_table_name" not in qdq


def test_provider_list_gives_options_to_the_gpu_providers_only():
    plan = _plan(gpu=1)
    listed = ort_gpu.provider_list(TRT, plan, plan.settings, "/c")
    assert listed[0][0] == TRT_EP and listed[0][1]["device_id"] == "1"
    assert listed[1] == (CUDA_EP, {"device_id": "1"})
    assert listed[2] == "CPUExecutionProvider"


def test_profile_strings():
    profiles = {"ids": Profile((1, 8), (4, 128), (8, 512)), "mask": Profile((1, 8), (4, 128), (8, 512))}
    assert ort_gpu.profile_shapes(profiles) == {
        "trt_profile_min_shapes": "ids:1x8,mask:1x8",
        "trt_profile_opt_shapes": "ids:4x128,mask:4x128",
        "trt_profile_max_shapes": "ids:8x512,mask:8x512",
    }
    with pytest.raises(es.BuildError, match=r"input name 'input:0' contains ':' or ','"):
        ort_gpu.profile_shapes({"input:0": Profile((1,), (1,), (1,))})


def test_plan_defaults_follow_the_tensorrt_backend():
    settings = ort_gpu.gpu_settings({"max_batch": 16}, TRT)
    no_device = ort_gpu.resolve_plan(settings, "fp16", SIG, None, False)
    assert no_device.profiles["x"].to_dict() == {"min": [1, 6], "opt": [1, 6], "max": [16, 6]}
    assert no_device.workspace_mb is None  # ONNX Runtime's own default when the GPU cannot be read
    jetson = ort_gpu.GpuFacts("Orin", (8, 7), True, 8 << 30, "12.2")
    h100 = ort_gpu.GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), False, 80 << 30, "12.4")
    assert ort_gpu.resolve_plan(ort_gpu.gpu_settings({}, TRT), "fp32", SIG, jetson, False).profiles["x"].max == (8, 6)
    assert ort_gpu.resolve_plan(settings, "fp32", SIG, jetson, False).workspace_mb == 256
    assert ort_gpu.resolve_plan(settings, "fp32", SIG, h100, False).workspace_mb == 4096
    tokens = _signature(TensorSpec("tokens", "int64", ("batch", "seq")))
    with pytest.raises(es.BuildError, match=r"dynamic dims besides the batch.*--min/--opt/--max"):
        ort_gpu.resolve_plan(settings, "fp32", tokens, None, False)


def test_manifest_options_give_the_same_provider_options_at_load():
    raw = {"providers": ["tensorrt"], "optimization_level": 2, "dla_core": 0}
    settings = ort_gpu.gpu_settings(raw, TRT)
    device = ort_gpu.GpuFacts("Xavier", (7, 2), True, 16 << 30, "11.4")
    built = ort_gpu.resolve_plan(settings, "int8", SIG, device, True)
    stored = json.loads(json.dumps(ort_gpu.resolved_backend_options(raw, TRT, built)))  # through the manifest
    assert stored["max_batch"] == 8 and stored["workspace_mb"] == 256 and stored["providers"] == TRT
    again = ort_gpu.plan_from_manifest(stored, TRT, "int8", True)
    assert ort_gpu.trt_provider_options(again, "/load") == {
        **ort_gpu.trt_provider_options(built, "/build"), "trt_engine_cache_path": "/load", "trt_timing_cache_path": "/load"
    }


def test_warmup_runs_at_the_opt_shapes():
    feeds = ort_gpu.warmup_feeds(SIG, {"x": Profile((1, 6), (4, 6), (16, 6))})
    assert feeds["x"].shape == (4, 6) and feeds["x"].dtype == np.float32
    assert ort_gpu.warmup_feeds(_signature(TensorSpec("x", "float32", (2, 6))), {})["x"].shape == (2, 6)


def test_shapes_outside_the_profile_are_refused_before_running():
    profiles = {"x": Profile((1, 6), (4, 6), (16, 6))}
    ort_backend.check_profiles(profiles, {"x": np.zeros((16, 6), np.float32)})
    with pytest.raises(es.InputError, match=r"input 'x' has shape \[32, 6\], outside the engine's optimization profile"):
        ort_backend.check_profiles(profiles, {"x": np.zeros((32, 6), np.float32)})


# ---------------------------------------------------------------------------- providers


def test_cuda_follows_tensorrt_when_onnxruntime_has_it(monkeypatch):
    class GpuOrt:  # stands in for onnxruntime-gpu's provider list only; nothing runs
        @staticmethod
        def get_available_providers():
            return [TRT_EP, CUDA_EP, "CPUExecutionProvider"]

    monkeypatch.setattr(ort_backend, "_ort", lambda: GpuOrt)
    assert ort_backend.resolve_providers(["tensorrt"]) == TRT
    assert ort_backend.resolve_providers(["tensorrt", "cpu"]) == TRT
    assert ort_backend.resolve_providers(["cuda"]) == [CUDA_EP, "CPUExecutionProvider"]


def test_providers_that_did_not_start_are_named():
    assert ort_gpu.missing_providers(TRT, [CUDA_EP, "CPUExecutionProvider"]) == [TRT_EP]
    assert ort_gpu.missing_providers(TRT, TRT) == []
    error = ort_gpu.explain_missing([TRT_EP], "1.22.0")
    assert isinstance(error, es.BackendUnavailableError)
    assert "ONNX Runtime 1.22.0 could not start its TensorRT execution provider" in str(error)
    assert "--provider cuda" in str(error) and "--backend tensorrt" in str(error)
    assert "cuDNN" in str(ort_gpu.explain_missing([CUDA_EP], "1.22.0"))


def test_tensorrt_provider_missing_here_says_what_to_install(mlp_path):
    if TRT_EP in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    with pytest.raises(es.BackendUnavailableError, match=r"provider 'tensorrt' is not available here.*onnxruntime-gpu"):
        es.build(mlp_path, backend="onnxruntime", backend_options={"providers": ["tensorrt"]})


def test_cpu_builds_refuse_tensorrt_options(mlp_path):
    with pytest.raises(es.BuildError, match="workspace_mb configure TensorRT.*add --provider tensorrt"):
        es.build(mlp_path, backend="onnxruntime", backend_options={"workspace_mb": 64})


def test_cpu_fingerprint_has_no_gpu_facts():
    fingerprint = get_backend("onnxruntime").fingerprint(BuildOptions())
    assert not {"gpu", "compute_capability", "tensorrt"} & set(fingerprint)


def test_gpu_platform_is_described_with_the_device():
    fingerprint = {"arch": "x86_64", "backend_version": "1.22.0", "providers": ",".join(TRT), "gpu": "NVIDIA L4",
                   "compute_capability": "8.9", "tensorrt": "10.9.0"}
    assert get_backend("onnxruntime").describe_platform(fingerprint) == (
        "x86_64 / ONNX Runtime 1.22 TensorRT on NVIDIA L4 (sm_89) / TensorRT 10.9.0"
    )


# ---------------------------------------------------------------------------- GPU facts and versions


def test_version_numbers():
    assert ort_gpu.parse_infer_lib_version(8601) == "8.6.1"
    assert ort_gpu.parse_infer_lib_version(8502) == "8.5.2"
    assert ort_gpu.parse_infer_lib_version(100300) == "10.3.0"
    assert ort_gpu.parse_infer_lib_version(101302) == "10.13.2"
    assert ort_gpu.parse_infer_lib_version(110100) == "11.1.0"
    assert ort_gpu.cuda_version_text(12040) == "12.4"
    assert ort_gpu.cuda_version_text(11080) == "11.8"


def test_gpu_facts_are_read_or_absent():
    facts = ort_gpu.gpu_facts(0)  # None on a machine without an NVIDIA driver, never an exception
    if facts is not None:
        assert facts.name and facts.compute_capability[0] >= 3
    fingerprint = ort_gpu.gpu_fingerprint(TRT, 0)
    assert set(fingerprint) <= {"gpu", "compute_capability", "cuda_driver", "cuda_runtime", "tensorrt"}


# ---------------------------------------------------------------------------- int8 calibration table


def _batches(count=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 6)).astype(np.float32)} for _ in range(count)]


def _read_table(blob: bytes) -> dict[str, float]:
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    table = TrtTable.TrtTable.GetRootAsTrtTable(blob, 0)
    return {table.Dict(i).Key().decode(): float(table.Dict(i).Value()) for i in range(table.DictLength())}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_table_for_the_tensorrt_provider(tmp_path, method):
    model_path = tmp_path / "model.onnx"
    onnx.save(make_mlp(), model_path)
    log: list[str] = []
    ranges = ort_gpu.calibrate_ranges(model_path, Calibration(_batches(), method), tmp_path, log)
    assert json.loads(ranges)["CLS"] == "TensorsData"
    assert f"int8: {method} calibration of" in log[0]
    table = _read_table(ort_gpu.calibration_table(ranges, tmp_path))
    assert {"x", "h1", "h3", "logits", "probs"} <= set(table)
    assert all(value > 0 for value in table.values())
    if method == "minmax":
        # Symmetric ranges: the table holds max(|lowest|, |highest|) of each tensor.
        x = np.concatenate([b["x"] for b in _batches()])
        assert table["x"] == pytest.approx(float(np.abs(x).max()), rel=1e-6)


def test_calibration_cache_is_reused_without_data(tmp_path):
    model_path = tmp_path / "model.onnx"
    onnx.save(make_mlp(), model_path)
    first = ort_gpu.calibrate_ranges(model_path, Calibration(_batches(), "minmax"), tmp_path, [])
    log: list[str] = []
    again = ort_gpu.calibrate_ranges(model_path, Calibration([], "minmax", first), tmp_path, log)
    assert again == first and "calibration skipped" in log[0]
    assert ort_gpu.calibration_table(first, tmp_path) == ort_gpu.calibration_table(again, tmp_path)
    with pytest.raises(es.ValidationDataError, match="int8 needs calibration data"):
        ort_gpu.calibrate_ranges(model_path, Calibration([], "minmax", b"TRT-8601EntropyCalibration2"), tmp_path, [])


def test_a_negative_only_tensor_gets_its_magnitude(tmp_path):
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, CalibrationMethod, save_tensors_data

    ranges = TensorsData(CalibrationMethod.MinMax, {"neg": TensorData(lowest=np.array(-3.0, np.float32),
                                                                      highest=np.array(-1.0, np.float32))})
    save_tensors_data(ranges, tmp_path / "r.json")
    table = _read_table(ort_gpu.calibration_table((tmp_path / "r.json").read_bytes(), tmp_path))
    assert table["neg"] == pytest.approx(3.0)


# ---------------------------------------------------------------------------- caches


def test_cache_folder_round_trip(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    (built / "TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_sm90.engine").write_bytes(b"engine")
    (built / "TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_sm90.profile").write_bytes(b"profile")
    (built / "TensorrtExecutionProvider_cache_sm90.timing").write_bytes(b"timing")
    (built / "calibration.flatbuffers").write_bytes(b"table")
    meta = {"gpu": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.9.0"}
    caches = ort_gpu.collect_caches(built, meta)
    assert all(name.startswith("ort_tensorrt.") for name in caches)
    assert json.loads(caches["ort_tensorrt.meta.json"]) == meta
    here = tmp_path / "here"
    here.mkdir()
    assert len(ort_gpu.restore_caches(caches, here)) == 4
    assert (here / "TensorrtExecutionProvider_cache_sm90.timing").read_bytes() == b"timing"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert ort_gpu.restore_caches(caches, elsewhere, keep_device_bound=False) == ["calibration.flatbuffers"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ort_gpu.collect_caches(empty, meta) == {}  # no files, no description either


def test_cache_names_never_leave_the_folder(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    written = ort_gpu.restore_caches({"ort_tensorrt.../evil": b"x", "ort_tensorrt.ok.engine": b"y",
                                      "calibration_cache.json": b"{}"}, folder)
    assert written == ["ok.engine"] and not (tmp_path / "evil").exists()


def test_engines_from_another_gpu_or_version_are_stale():
    caches = {"ort_tensorrt.meta.json": json.dumps({
        "gpu": "Xavier", "compute_capability": "7.2", "tensorrt": "8.5.2", "provider_options": {"trt_fp16_enable": "True"},
    }).encode()}
    assert ort_gpu.stale_reason(caches, {"gpu": "Xavier", "compute_capability": "7.2", "tensorrt": "8.5.2"}) is None
    nano = ort_gpu.stale_reason(caches, {"gpu": "NVIDIA Tegra X1", "compute_capability": "5.3", "tensorrt": "8.2.1"})
    assert "gpu is NVIDIA Tegra X1 (engines: Xavier)" in nano and "tensorrt is 8.2.1 (engines: 8.5.2)" in nano
    assert ort_gpu.stale_reason(caches, {}) is None  # facts unknown here: ONNX Runtime decides
    options = ort_gpu.stale_reason(caches, {"provider_options": {"trt_fp16_enable": "False"}})
    assert "the TensorRT provider options differ (trt_fp16_enable)" in options
    assert ort_gpu.stale_reason({"ort_tensorrt.meta.json": b"{not json"}, {}) == "their description is unreadable"
    assert ort_gpu.stale_reason({}, {"gpu": "x"}) is None


def test_settings_key_leaves_the_folders_out():
    key = ort_gpu.settings_key({"trt_engine_cache_path": "/a", "trt_timing_cache_path": "/a", "trt_fp16_enable": "True"})
    assert key == {"trt_fp16_enable": "True"}


def test_timing_caches_are_shared_between_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINESMITH_CACHE_DIR", str(tmp_path / "es"))
    shared = ort_gpu.shared_timing_folder("auto")
    assert shared == tmp_path / "es" / "onnxruntime-tensorrt"
    assert ort_gpu.shared_timing_folder("off") is None
    assert ort_gpu.shared_timing_folder(str(tmp_path / "mine")) == tmp_path / "mine"
    build = tmp_path / "build"
    build.mkdir()
    (build / "TensorrtExecutionProvider_cache_sm89.timing").write_bytes(b"t")
    (build / "x.engine").write_bytes(b"e")
    assert ort_gpu.copy_timing_caches(build, shared) == 1
    assert [p.name for p in shared.iterdir()] == ["TensorrtExecutionProvider_cache_sm89.timing"]
    assert ort_gpu.copy_timing_caches(tmp_path / "absent", shared) == 0


# ---------------------------------------------------------------------------- rebuilds pass caches (api)


def test_caches_are_kept_per_backend():
    caches = {"calibration_cache.json": b'{"CLS": "TensorsData"}', "tensorrt_timing.cache": b"t",
              "ort_tensorrt.x.engine": b"e"}
    assert api.reusable_caches(caches, same_backend=True) == caches
    assert api.reusable_caches(caches, same_backend=False) == {"calibration_cache.json": b'{"CLS": "TensorsData"}'}
    native = {"calibration_cache.json": b"TRT-8601EntropyCalibration2\nx: 3c010a14\n"}
    assert api.reusable_caches(native, same_backend=False) == {}


def test_rebuild_hands_the_bundle_caches_to_the_backend(tmp_path, mlp_path, monkeypatch):
    path = tmp_path / "int8.engine"
    with pytest.warns(api.RandomCalibrationWarning):
        es.build(mlp_path, precision="int8", calibration_random=True).save(path)
    assert "cache/calibration_cache.json" in es.info(path)["files"]
    seen: list[dict] = []
    original = ort_backend.OnnxRuntimeBackend.build

    def recording(self, model, signature, options, progress=None, calibration=None):
        seen.append(dict(options.previous_caches))
        return original(self, model, signature, options, progress, calibration)

    monkeypatch.setattr(ort_backend.OnnxRuntimeBackend, "build", recording)
    rebuilt = es.build(path)
    assert list(seen[0]) == ["calibration_cache.json"]
    assert "previous_caches" not in rebuilt.manifest.build_options  # never stored
    assert rebuilt.manifest.build_options["calibration_method"] == "minmax"


def test_load_reads_caches_only_for_backends_that_want_them(mlp_engine_path, monkeypatch):
    backend = get_backend("onnxruntime")
    calls: list[dict] = []
    original = type(backend).load_with_caches

    def recording(self, payload, options, signature, caches):
        calls.append(dict(caches))
        return original(self, payload, options, signature, caches)

    monkeypatch.setattr(type(backend), "load_with_caches", recording)
    es.load(mlp_engine_path)
    assert calls == [{}]
    monkeypatch.setattr(type(backend), "needs_caches_at_load", lambda self, options: True)
    es.load(mlp_engine_path)
    assert calls[1] == {}  # an fp32 CPU bundle holds no cache entries


# ---------------------------------------------------------------------------- with onnxruntime-gpu


@pytest.mark.skipif(TRT_EP not in ort.get_available_providers(),
                    reason="onnxruntime has no TensorRT execution provider here (onnxruntime-gpu with TensorRT needed)")
def test_tensorrt_provider_engine_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINESMITH_CACHE_DIR", str(tmp_path / "es"))
    path = tmp_path / "trt.engine"
    engine = es.build(make_mlp(), backend="onnxruntime", precision="fp16", backend_options={"providers": ["tensorrt"]})
    engine.save(path)
    entries = es.info(path)["files"]
    assert any(name.endswith(".engine") for name in entries) and "cache/ort_tensorrt.meta.json" in entries
    loaded = es.load(path)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_allclose(loaded(x=x)["probs"], engine(x=x)["probs"], atol=1e-2)
    rebuilt = es.build(path)
    assert any("reused" in line for line in rebuilt.manifest.build_log)


# ---------------------------------------------------------------------------- CLI flags


def test_tensorrt_flags_become_backend_options():
    from enginesmith.cli.engine_commands import tensorrt_options_from_args

    options = tensorrt_options_from_args(
        ["x:1x6"], ["x:4x6"], ["x:16x6"], workspace_mb=512, dla_core=0, builder_level=2, timing_cache="/tmp/t.cache",
        version_compatible=True, hardware_compat="ampere+",
    )
    assert options == {
        "profiles": {"x": {"min": [1, 6], "opt": [4, 6], "max": [16, 6]}}, "workspace_mb": 512, "dla_core": 0,
        "optimization_level": 2, "timing_cache": "/tmp/t.cache", "version_compatible": True,
        "hardware_compatibility": "ampere_plus",
    }
    assert tensorrt_options_from_args([], [], []) == {}
    # What the TensorRT backend reads from them is what was asked for.
    from enginesmith.backends.tensorrt.options import parse_options

    parsed = parse_options(options)
    assert parsed.profiles["x"].max == (16, 6) and parsed.optimization_level == 2 and parsed.version_compatible


def _capture_build(monkeypatch) -> list[dict]:
    """Record what the CLI hands to api.build, then stop (the CLI's own parsing is what is tested)."""
    from enginesmith.cli import engine_commands

    seen: list[dict] = []

    def build(model, **kwargs):
        seen.append(kwargs)
        raise es.BuildError("stopped after recording the options")

    monkeypatch.setattr(engine_commands.api, "build", build)
    return seen


def test_cli_flags_reach_api_build(mlp_path, monkeypatch, capsys):
    from enginesmith.cli.app import main

    seen = _capture_build(monkeypatch)
    args = ["build", str(mlp_path), "--backend", "tensorrt", "--min", "x:1x6", "--opt", "x:8x6", "--max", "x:32x6",
            "--workspace-mb", "128", "--dla-core", "1", "--builder-level", "5", "--timing-cache", "off",
            "--version-compatible", "--hardware-compat", "same_compute_capability", "--option", "cuda_graphs=true"]
    assert main(args) == 2
    options = seen[0]["backend_options"]
    assert seen[0]["backend"] == "tensorrt"
    assert options == {
        "cuda_graphs": True, "profiles": {"x": {"min": [1, 6], "opt": [8, 6], "max": [32, 6]}}, "workspace_mb": 128,
        "dla_core": 1, "optimization_level": 5, "timing_cache": "off", "version_compatible": True,
        "hardware_compatibility": "same_compute_capability",
    }


def test_cli_provider_and_flags_for_onnxruntime(mlp_path, monkeypatch, capsys):
    from enginesmith.cli.app import main

    seen = _capture_build(monkeypatch)
    assert main(["build", str(mlp_path), "--backend", "onnxruntime", "--provider", "tensorrt", "--workspace-mb", "64"]) == 2
    assert seen[0]["backend_options"] == {"workspace_mb": 64, "providers": ["tensorrt"]}


def test_cli_tensorrt_flags_on_the_cpu_provider_are_one_clear_line(mlp_path, tmp_path, capsys):
    from enginesmith.cli.app import main

    code = main(["build", str(mlp_path), "-o", str(tmp_path / "m.engine"), "--backend", "onnxruntime",
                 "--min", "x:1x6", "--opt", "x:2x6", "--max", "x:4x6"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "profiles configure TensorRT" in err and "--provider tensorrt" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min", "x:1x6"], "input 'x' has no --opt or --max"),
        (["--min", "x:1x6", "--opt", "x:4x6", "--max", "x:2x6"], r"axis 0: needs --min <= --opt <= --max, got 1, 4, 2"),
        (["--min", "x:1x6", "--opt", "x:4x6", "--max", "x:8x6x1"], "different ranks"),
        (["--min", "x:1xq", "--opt", "x:4x6", "--max", "x:8x6"], "--min: 'x:1xq' is not NAME:SHAPE"),
        (["--hardware-compat", "turing"], "--hardware-compat 'turing' is not one of none, ampere_plus"),
    ],
)
def test_cli_bad_tensorrt_flags(mlp_path, capsys, flags, message):
    from enginesmith.cli.app import main

    assert main(["build", str(mlp_path), "--backend", "onnxruntime", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert message in err


def test_cli_builder_level_range(mlp_path, capsys):
    from enginesmith.cli.app import main

    assert main(["build", str(mlp_path), "--builder-level", "9"]) == 2
    assert "--builder-level" in capsys.readouterr().err
