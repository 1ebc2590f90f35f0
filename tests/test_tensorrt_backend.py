"""The TensorRT backend.

Two halves. The first needs no TensorRT and runs everywhere: what happens when TensorRT
is missing, option validation, optimization profiles, the precision plan of each TensorRT
version's API, fingerprints and their mismatch messages, Jetson release parsing.

The second builds and runs real engines; each of its tests is skipped only when
``import tensorrt`` fails (or no CUDA GPU is usable), and says so. Nothing here
imitates TensorRT: no fake ``tensorrt`` module counts as coverage.
"""

from __future__ import annotations

import importlib.util
import threading
from datetime import datetime, timezone

import numpy as np
import onnx
import pytest
from conftest import make_int_input_model, make_mlp, make_two_in_two_out, make_unsupported_op_model, run_plain
from onnx import TensorProto, helper, numpy_helper

import enginesmith as es
from enginesmith.api import check_platform_compatible
from enginesmith.backends import get_backend, pick_backend
from enginesmith.backends.tensorrt import TensorRTBackend, fast_precisions, facts
from enginesmith.backends.tensorrt.alignment import misalignment, rejected_address
from enginesmith.backends.tensorrt.builder import ParserIssue, build_failure, parse_failure
from enginesmith.backends.tensorrt.calibration import (
    CalibrationFeeder,
    calibration_dtype,
    calibration_profiles,
    trt_dtype_name,
    uniform_batches,
)
from enginesmith.backends.tensorrt.options import (
    Profile,
    TrtApi,
    TrtOptions,
    check_in_profile,
    dla_core_problem,
    hardware_compatibility_problem,
    has_same_compute_capability,
    model_precisions,
    parse_options,
    plan_precision,
    profile_max_batch,
    resolve_profiles,
)
from enginesmith.manifest import Manifest
from enginesmith.signature import Signature, TensorSpec

TENSORRT_MISSING = importlib.util.find_spec("tensorrt") is None


def _signature(*inputs: TensorSpec) -> Signature:
    return Signature(inputs=tuple(inputs), outputs=(TensorSpec("y", "float32", ("batch", 4)),))


# ============================================================================ without TensorRT

needs_missing_tensorrt = pytest.mark.skipif(not TENSORRT_MISSING, reason="TensorRT is installed here")


@needs_missing_tensorrt
def test_unavailable_when_tensorrt_is_missing():
    status = get_backend("tensorrt").available()
    assert not status
    assert "TensorRT is not installed (import tensorrt failed:" in status.reason
    assert "--backend onnxruntime" in status.reason


@needs_missing_tensorrt
def test_auto_falls_back_to_another_backend():
    assert pick_backend("auto").name != "tensorrt"


@needs_missing_tensorrt
def test_build_with_tensorrt_says_what_to_do(mlp_path):
    with pytest.raises(es.BackendUnavailableError, match=r"backend 'tensorrt' is not available here: TensorRT is not installed.*--backend onnxruntime"):
        es.build(mlp_path, backend="tensorrt")


def test_auto_priority_is_above_onnxruntime():
    assert TensorRTBackend.auto_priority > get_backend("onnxruntime").auto_priority


# ---------------------------------------------------------------------------- options


def test_unknown_option_names_are_rejected_with_the_list():
    with pytest.raises(es.BuildError, match=r"unknown TensorRT backend option 'workspace'.*workspace_mb"):
        parse_options({"workspace": 512})


def test_options_of_other_backends_are_ignored_not_rejected():
    # A bundle built by ONNX Runtime records its providers; rebuilding it with TensorRT must work.
    options = parse_options({"providers": ["CPUExecutionProvider"], "workspace_mb": 64})
    assert options.ignored == ("providers",)
    assert options.workspace_mb == 64


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"workspace_mb": 0}, "workspace_mb must be at least 1"),
        ({"workspace_mb": "lots"}, "workspace_mb must be a whole number"),
        ({"optimization_level": 6}, "optimization_level must be between 0 and 5"),
        ({"dla_core": -1}, "dla_core must be a whole number"),
        ({"cuda_graphs": "maybe"}, "cuda_graphs must be true or false"),
        ({"hardware_compatibility": "turing_plus"}, "hardware_compatibility 'turing_plus' is not one of"),
        ({"opt_batch": 16, "max_batch": 8}, r"opt_batch \(16\) is larger than max_batch \(8\)"),
        ({"profiles": {"x": {"min": [1, 6], "opt": [8, 6]}}}, "needs exactly min, opt and max"),
        ({"profiles": {"x": {"min": [4, 6], "opt": [2, 6], "max": [8, 6]}}}, r"axis 0: needs min <= opt <= max, got 4, 2, 8"),
        ({"profiles": {"x": {"min": "1x6", "opt": "2x6", "max": "8x6x1"}}}, "different ranks"),
        ({"profiles": {"x": {"min": "1xa", "opt": "2x6", "max": "8x6"}}}, "'a' is not a dimension"),
    ],
)
def test_bad_options_name_the_problem(raw, message):
    with pytest.raises(es.BuildError, match=message):
        parse_options(raw)


def test_options_round_trip_through_the_manifest():
    options = parse_options(
        {"workspace_mb": "128", "dla_core": 1, "strongly_typed": "auto", "timing_cache": False, "cuda_graphs": "yes",
         "profiles": {"x": {"min": "1x6", "opt": [4, 6], "max": (16, 6)}}}
    )
    again = parse_options(options.to_backend_options())
    assert again == options
    assert again.timing_cache == "off" and again.cuda_graphs and again.profiles["x"].max == (16, 6)


# ---------------------------------------------------------------------------- profiles


def test_default_profile_comes_from_the_dynamic_batch():
    signature = _signature(TensorSpec("x", "float32", ("batch", 6)))
    profiles = resolve_profiles(signature, TrtOptions(), integrated=False)
    assert profiles["x"].to_dict() == {"min": [1, 6], "opt": [1, 6], "max": [32, 6]}
    assert resolve_profiles(signature, TrtOptions(), integrated=True)["x"].max == (8, 6)  # Jetson: small default
    custom = resolve_profiles(signature, TrtOptions(max_batch=64, opt_batch=16), integrated=False)
    assert custom["x"].to_dict() == {"min": [1, 6], "opt": [16, 6], "max": [64, 6]}
    assert profile_max_batch(custom) == 64


def test_static_inputs_need_no_profile():
    assert resolve_profiles(_signature(TensorSpec("x", "float32", (2, 6))), TrtOptions(), integrated=False) == {}


def test_dynamic_dims_besides_the_batch_need_a_profile():
    signature = _signature(TensorSpec("tokens", "int64", ("batch", "seq")))
    with pytest.raises(es.BuildError, match=r"input 'tokens' .* dynamic dims besides the batch \(axis 1 \(seq\)\).*--min/--opt/--max"):
        resolve_profiles(signature, TrtOptions(), integrated=False)
    given = parse_options({"profiles": {"tokens": {"min": "1x8", "opt": "4x128", "max": "8x512"}}})
    assert resolve_profiles(signature, given, integrated=False)["tokens"].max == (8, 512)


def test_profiles_must_fit_the_model():
    signature = _signature(TensorSpec("x", "float32", ("batch", 6)))
    wrong_rank = parse_options({"profiles": {"x": {"min": [1], "opt": [2], "max": [4]}}})
    with pytest.raises(es.BuildError, match="has rank 1; the input has rank 2"):
        resolve_profiles(signature, wrong_rank, integrated=False)
    wrong_fixed = parse_options({"profiles": {"x": {"min": [1, 5], "opt": [2, 6], "max": [4, 6]}}})
    with pytest.raises(es.BuildError, match="axis 1: the model fixes this dim to 6"):
        resolve_profiles(signature, wrong_fixed, integrated=False)
    stranger = parse_options({"profiles": {"images": {"min": [1, 6], "opt": [1, 6], "max": [1, 6]}}})
    with pytest.raises(es.BuildError, match="profiles name unknown inputs images: the inputs are x"):
        resolve_profiles(signature, stranger, integrated=False)


def test_shapes_outside_the_profile_are_input_errors():
    check_in_profile("x", (8, 6), (1, 6), (32, 6))
    with pytest.raises(es.InputError, match=r"input 'x' has shape \[64, 6\], outside the engine's optimization profile \(axis 0: 1..32"):
        check_in_profile("x", (64, 6), (1, 6), (32, 6))
    with pytest.raises(es.InputError, match="has rank 3"):
        check_in_profile("x", (1, 6, 1), (1, 6), (32, 6))


# ---------------------------------------------------------------------------- precision plans

TRT_86 = TrtApi((8, 6, 1), weak_typing=True, strongly_typed=False, calibrator=True, named_tensors=True, memory_pools=True,
                explicit_batch_flag=True, progress_monitor=False, compatibility_options=True, same_compute_capability=False)
TRT_10 = TrtApi((10, 3, 0), weak_typing=True, strongly_typed=True, calibrator=True, named_tensors=True, memory_pools=True,
                explicit_batch_flag=False, progress_monitor=True, compatibility_options=True, same_compute_capability=False)
TRT_11 = TrtApi((11, 1, 0), weak_typing=False, strongly_typed=True, calibrator=False, named_tensors=True, memory_pools=True,
                explicit_batch_flag=False, progress_monitor=True, compatibility_options=True, same_compute_capability=True)


def _qdq_model() -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dequant"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [scale, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_model_precisions_are_read_from_the_graph():
    assert not model_precisions(make_mlp()).own_precisions
    assert model_precisions(_qdq_model()).has_qdq
    from enginesmith.backends.onnxruntime import convert_fp16

    assert model_precisions(convert_fp16(make_mlp())).has_half


def test_plans_on_tensorrt_8_6_use_builder_flags_and_a_calibrator():
    fp32 = model_precisions(make_mlp())
    assert plan_precision("fp16", TRT_86, fp32, None).builder_flags == ("FP16",)
    int8 = plan_precision("int8", TRT_86, fp32, None, "entropy")
    assert not int8.strongly_typed and int8.builder_flags == ("FP16", "INT8")
    assert int8.calibrator == "IInt8EntropyCalibrator2"
    assert plan_precision("int8", TRT_86, fp32, None, "minmax").calibrator == "IInt8MinMaxCalibrator"
    with pytest.raises(es.BuildError, match="strongly typed networks need TensorRT 10 or newer; this is TensorRT 8.6.1"):
        plan_precision("fp32", TRT_86, fp32, True)


def test_plans_on_tensorrt_10_go_strongly_typed_when_the_model_carries_precisions():
    assert not plan_precision("fp16", TRT_10, model_precisions(make_mlp()), None).strongly_typed
    qdq = plan_precision("int8", TRT_10, model_precisions(_qdq_model()), None)
    assert qdq.strongly_typed and qdq.builder_flags == () and not qdq.calibrator and not qdq.quantize_qdq
    forced = plan_precision("fp16", TRT_10, model_precisions(make_mlp()), True)
    assert forced.strongly_typed and forced.convert_fp16


def test_plans_on_tensorrt_11_rewrite_the_model():
    fp32 = model_precisions(make_mlp())
    fp16 = plan_precision("fp16", TRT_11, fp32, None)
    assert fp16.strongly_typed and fp16.convert_fp16 and fp16.builder_flags == ()
    int8 = plan_precision("int8", TRT_11, fp32, None)
    assert int8.quantize_qdq and not int8.calibrator
    with pytest.raises(es.BuildError, match="builds strongly typed networks only"):
        plan_precision("fp32", TRT_11, fp32, False)


def test_fast_precisions_follow_the_support_matrix():
    assert fast_precisions((5, 3)) == ["fp32", "fp16"]  # Jetson Nano: no int8
    assert fast_precisions((6, 1)) == ["fp32", "int8"]  # GTX 1080: slow fp16
    assert fast_precisions((6, 2)) == ["fp32", "fp16"]  # Jetson TX2
    assert fast_precisions((7, 2)) == ["fp32", "fp16", "int8"]  # Xavier
    assert fast_precisions((9, 0)) == ["fp32", "fp16", "int8"]


# ---------------------------------------------------------------------------- failures put into words


def test_parser_failure_lists_every_node():
    issues = [
        ParserIssue("fancy_1", "FancyActivation", "UNSUPPORTED_NODE", "No importer registered for op: FancyActivation"),
        ParserIssue("fancy_2", "FancyActivation", "UNSUPPORTED_NODE", "No importer registered for op: FancyActivation"),
    ]
    error = parse_failure(issues, "10.3.0")
    assert isinstance(error, es.UnsupportedModelError)
    text = str(error)
    assert "(2 errors)" in text and "node 'fancy_1' (FancyActivation)" in text and "node 'fancy_2'" in text
    assert "replace the ops FancyActivation" in text and "--backend onnxruntime" in text
    other = parse_failure([ParserIssue("", "", "INVALID_GRAPH", "bad graph")], "8.6.1")
    assert type(other) is es.BuildError and "the model: INVALID_GRAPH: bad graph" in str(other)


def test_build_failures_are_classified():
    options = TrtOptions(workspace_mb=256, dla_core=None)
    oom = build_failure(["[virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory (no further information)"], options, "8.6.2")
    assert "ran out of memory" in str(oom) and "workspace_mb (now 256)" in str(oom) and "swap" in str(oom)
    no_tactic = build_failure(["Could not find any implementation for node /fc1/MatMul."], TrtOptions(dla_core=0), "10.3.0")
    assert isinstance(no_tactic, es.UnsupportedModelError) and "/fc1/MatMul" in str(no_tactic) and "gpu_fallback" in str(no_tactic)
    assert "could not build the engine: something else" in str(build_failure(["something else"], options, "10.3.0"))


def test_calibration_batches_of_another_shape_are_left_out():
    log: list[str] = []
    batches = [{"x": np.zeros((8, 6))}, {"x": np.zeros((8, 6))}, {"x": np.zeros((3, 6))}]
    assert len(uniform_batches(batches, log)) == 2
    assert "1 calibration batch(es) of another shape left out" in log[0]


# ---------------------------------------------------------------------------- int8 calibration (issue 20)


@pytest.mark.parametrize(
    "network_type, fed_as",
    [
        ("FLOAT", "float32"),
        ("INT32", "int32"),  # TensorRT 8.6 parses int64 ONNX inputs as INT32
        ("INT64", "int64"),  # TensorRT >= 9 keeps them INT64: 8 bytes per element must be fed
        ("BOOL", "bool"),
        ("HALF", "float32"),  # "non-index calibration inputs" are fed as float32 (Polygraphy's rule)
        ("BF16", "float32"),
        ("INT8", "float32"),
        ("UINT8", "float32"),
        ("FP8", "float32"),
    ],
)
def test_calibration_feeds_each_input_in_the_type_its_network_input_has(network_type, fed_as):
    assert calibration_dtype(network_type) == np.dtype(fed_as)
    assert calibration_dtype(trt_dtype_name(f"DataType.{network_type}")) == np.dtype(fed_as)  # str() of TensorRT's enum


def test_calibration_batches_are_cast_to_the_network_types_on_the_host():
    # An int64 token input of a TensorRT 10 network (INT64) next to a float64 image input (FLOAT).
    ids = np.arange(12, dtype=np.int64).reshape(2, 6) * 1000
    image = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float64)
    feeder = CalibrationFeeder([], {"ids": calibration_dtype("INT64"), "x": calibration_dtype("FLOAT")}, gpu=0)
    x_host, ids_host = feeder.host_arrays({"ids": ids, "x": image}, ["x", "ids"])
    assert ids_host.dtype == np.int64 and ids_host.nbytes == 8 * ids.size  # what TensorRT reads for INT64
    np.testing.assert_array_equal(ids_host, ids)
    assert x_host.dtype == np.float32 and x_host.flags.c_contiguous
    np.testing.assert_allclose(x_host, image.astype(np.float32))
    # TensorRT 8.6: the same input is INT32; values that do not fit are refused, not wrapped.
    narrow = CalibrationFeeder([], {"ids": calibration_dtype("INT32")}, gpu=0)
    assert narrow.host_arrays({"ids": ids}, ["ids"])[0].dtype == np.int32
    with pytest.raises(es.ValidationDataError, match=r"calibration input 'ids' has values 0..11000000000, outside int32"):
        narrow.host_arrays({"ids": ids * 1_000_000}, ["ids"])
    with pytest.raises(es.ValidationDataError, match="calibration batches lack input"):
        feeder.host_arrays({"x": image}, ["x", "ids"])


def test_dynamic_networks_get_a_calibration_profile_even_from_a_cache_alone():
    profiles = {"x": Profile((1, 6), (4, 6), (32, 6))}
    from_cache = calibration_profiles(profiles, [])  # no batches: scales come from the calibration cache
    assert from_cache == {"x": Profile((4, 6), (4, 6), (4, 6))}  # the optimization profile's OPT
    from_batches = calibration_profiles(profiles, [{"x": np.zeros((8, 6), np.float32)}])
    assert from_batches == {"x": Profile((8, 6), (8, 6), (8, 6))}  # the shape calibration runs at
    assert calibration_profiles({}, [{"x": np.zeros((2, 6))}]) == {}  # static networks need none
    with pytest.raises(es.ValidationDataError, match="calibration batches lack input"):
        calibration_profiles(profiles, [{"other": np.zeros((8, 6))}])


def test_scalar_inputs_stay_scalars_on_the_way_into_tensorrt():
    """A 0-d input (a sample rate) keeps shape (): np.ascontiguousarray would make it (1,), a shape the engine refuses."""
    from enginesmith.backends.tensorrt.calibration import calibration_array
    from enginesmith.backends.tensorrt.runtime import IoTensor, _to_engine_dtype

    rate = np.array(16000, np.int64)
    same = _to_engine_dtype(IoTensor("sr", True, np.dtype(np.int64), ()), rate)
    narrowed = _to_engine_dtype(IoTensor("sr", True, np.dtype(np.int32), ()), rate)
    assert same.shape == () and narrowed.shape == () and narrowed.dtype == np.int32 and int(narrowed) == 16000
    assert calibration_array("sr", rate, np.dtype(np.int32)).shape == ()
    view = np.arange(12, dtype=np.float32).reshape(3, 4)[:, 1:]  # not contiguous: still made contiguous
    assert _to_engine_dtype(IoTensor("x", True, np.dtype(np.float32), (3, 3)), view).flags.c_contiguous


# ---------------------------------------------------------------------------- version and device gates (issue 20)


@pytest.mark.parametrize(
    "version, has", [((8, 6, 1), False), ((10, 0, 1), False), ((10, 8, 0), False), ((10, 9, 0), True), ((10, 16), True), ((11, 1, 0), True)]
)
def test_same_compute_capability_arrived_in_tensorrt_10_9(version, has):
    assert has_same_compute_capability(version) is has
    problem = hardware_compatibility_problem("same_compute_capability", version, (9, 0))
    if has:
        assert problem is None
    else:
        assert problem.startswith("hardware_compatibility same_compute_capability needs TensorRT 10.9 or newer; this is TensorRT")


def test_hardware_compatibility_needs_a_recent_enough_gpu_to_build_on():
    turing_only = hardware_compatibility_problem("same_compute_capability", (10, 9, 0), (7, 2))  # Xavier
    assert "can only be built on Turing (sm_75) or newer GPUs; this GPU is sm_72" in turing_only
    assert hardware_compatibility_problem("same_compute_capability", (10, 9, 0), (7, 5)) is None
    assert "Ampere (sm_80) or newer GPUs; this GPU is sm_75" in hardware_compatibility_problem("ampere_plus", (8, 6, 1), (7, 5))
    assert hardware_compatibility_problem("ampere_plus", (8, 6, 1), (8, 6)) is None
    assert hardware_compatibility_problem("none", (8, 5, 2), (5, 3)) is None


def test_no_dla_cores_names_the_tensorrt_version_where_it_may_be_the_cause():
    for version in ((11, 0, 0), (11, 3, 1)):
        text = dla_core_problem(0, 0, version)
        assert "TensorRT reports 0 DLA cores here" in text and "this device has no DLA" in text  # the hardware may lack it
        assert "DLA was unavailable in TensorRT 11.0 through 11.3" in text  # ...or the release does
    assert "supports DLA only on Windows on ARM" in dla_core_problem(0, 0, (11, 4, 0))
    assert "JetPack 7.2.2 or later" in dla_core_problem(0, 0, (11, 4, 1))
    assert "10.7 as the last 10.x release with DLA support" in dla_core_problem(0, 0, (10, 8, 0))
    jetpack_6 = dla_core_problem(0, 0, (10, 3, 0))  # a TensorRT with DLA: only the hardware is to blame
    assert "this device has no DLA" in jetpack_6 and "this TensorRT cannot use it" not in jetpack_6
    assert dla_core_problem(2, 2, (8, 5, 2)) == "dla_core 2: TensorRT reports 2 DLA cores here (cores 0..1); pick one of those"
    assert dla_core_problem(1, 2, (8, 5, 2)) is None


def test_rejected_tensor_addresses_are_explained():
    assert misalignment(0x7F0000000000) == 0 and misalignment(0x7F0000000004) == 4
    assert "lies 4 bytes past a 256-byte boundary" in rejected_address("x", 0x7F0000000004)
    assert "set_tensor_address returned False" in rejected_address("x", 0x7F0000000100)
    assert "no input or output of that name" in rejected_address("x", 0x7F0000000100)


def test_engines_tensorrt_cannot_read_are_explained():
    from enginesmith.backends.tensorrt.runtime import load_failure

    foreign = load_failure(["IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion "
                            "stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match.)"], "10.3.0")
    assert isinstance(foreign, es.PlatformMismatchError)
    assert "TensorRT 10.3.0 cannot load this engine" in str(foreign) and "rebuild it here with 'enginesmith build'" in str(foreign)
    garbage = load_failure(["Error Code 1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.)"], "10.3.0")
    assert type(garbage) is es.BundleError and "not a TensorRT engine" in str(garbage)


def test_timing_cache_of_the_rebuilt_bundle_seeds_the_build(tmp_path):
    from enginesmith.backends.tensorrt.builder import timing_cache_source

    shared = tmp_path / "timing.cache"
    assert timing_cache_source(shared, None) == (b"", "")
    assert timing_cache_source(shared, b"bundled") == (b"bundled", "the rebuilt bundle")
    shared.write_bytes(b"grown")  # the shared file holds every build's timings on this GPU: it wins
    assert timing_cache_source(shared, b"bundled") == (b"grown", str(shared))


def test_tensorrt_sessions_take_device_tensors():
    from enginesmith.backends.tensorrt.runtime import TensorRTSession

    assert TensorRTSession.supports_device_io  # Engine.infer_device routes to run_device


# ---------------------------------------------------------------------------- fingerprints

XAVIER = {
    "os": "linux", "arch": "aarch64", "cpu": "ARMv8 Processor rev 0 (v8l)", "cpu_flags": "asimd",
    "l4t": "R35.4.1 (JetPack 5)", "board": "Jetson AGX Xavier", "backend_version": "8.5.2.2", "tensorrt": "8.5.2.2",
    "gpu": "Xavier", "compute_capability": "7.2", "gpu_target": "Xavier (sm_72)", "cuda_runtime": "11.4", "cuda_driver": "11.4",
}
NANO = {
    "os": "linux", "arch": "aarch64", "cpu": "ARMv8 Processor rev 1 (v8l)", "cpu_flags": "asimd",
    "l4t": "R32.7.4 (JetPack 4)", "board": "Jetson Nano", "backend_version": "8.2.1.8", "tensorrt": "8.2.1.8",
    "gpu": "NVIDIA Tegra X1", "compute_capability": "5.3", "gpu_target": "NVIDIA Tegra X1 (sm_53)",
    "cuda_runtime": "10.2", "cuda_driver": "10.2",
}


def test_describe_platform_reads_like_the_device():
    backend = TensorRTBackend()
    assert backend.describe_platform(XAVIER) == "Jetson AGX Xavier (sm_72) / TensorRT 8.5.2.2 / L4T R35.4.1 (JetPack 5)"
    desktop = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "backend_version": "10.3.0"}
    assert backend.describe_platform(desktop) == "NVIDIA H100 80GB HBM3 (sm_90) / TensorRT 10.3.0"


class _HereIs(TensorRTBackend):
    """The TensorRT backend as seen on another machine: only the facts it reads are replaced."""

    def __init__(self, here: dict[str, str]):
        self._here = here

    def fingerprint(self, options):  # noqa: D102 - the facts of the imagined machine
        return dict(self._here)


def _manifest(fingerprint: dict[str, str]) -> Manifest:
    return Manifest(
        enginesmith_version="0.1.0", backend="tensorrt", backend_version=fingerprint["backend_version"], precision="fp16",
        signature=_signature(TensorSpec("x", "float32", ("batch", 6))), source_kind="onnx", source_name="mlp.onnx",
        source_sha256="0" * 64, build_options={"backend_options": {}}, payload_name="model.plan", fingerprint=fingerprint,
        fingerprint_must_match=TensorRTBackend().must_match(), created_at=datetime.now(timezone.utc).isoformat(),
    )


def test_a_xavier_engine_on_a_nano_is_explained_in_device_terms():
    with pytest.raises(es.PlatformMismatchError) as raised:
        check_platform_compatible(_manifest(XAVIER), _HereIs(NANO))
    text = str(raised.value)
    assert text.startswith("engine was built for Jetson AGX Xavier (sm_72) / TensorRT 8.5.2.2 / L4T R35.4.1 (JetPack 5);")
    assert "tensorrt is 8.2.1.8 (engine: 8.5.2.2)" in text
    assert "gpu_target is NVIDIA Tegra X1 (sm_53) (engine: Xavier (sm_72))" in text
    assert "l4t is R32.7.4 (JetPack 4) (engine: R35.4.1 (JetPack 5))" in text
    assert "cpu is" not in text  # the CPU model differs but does not matter


def test_same_platform_passes_and_cuda_versions_do_not_matter():
    newer_driver = {**XAVIER, "cuda_driver": "11.8", "cpu": "another revision"}
    check_platform_compatible(_manifest(XAVIER), _HereIs(newer_driver))


def test_hardware_and_version_compatible_targets():
    ampere_plus = facts.gpu_target("NVIDIA A100-SXM4-40GB", (8, 0), "ampere_plus")
    assert ampere_plus == facts.gpu_target("NVIDIA GeForce RTX 4090", (8, 9), "ampere_plus") == "Ampere or newer (sm_80+)"
    assert facts.gpu_target("Xavier", (7, 2), "ampere_plus") == "Xavier (sm_72, older than Ampere)"
    assert facts.gpu_target("NVIDIA L4", (8, 9), "same_compute_capability") == "any GPU of sm_89"
    assert facts.gpu_target("NVIDIA L4", (8, 9), "none") == "NVIDIA L4 (sm_89)"
    assert facts.tensorrt_target("10.3.0", True) == facts.tensorrt_target("10.8.0", True) == "10.x (version-compatible)"
    assert facts.tensorrt_target("10.3.0", False) == "10.3.0"


# ---------------------------------------------------------------------------- Jetson releases


@pytest.mark.parametrize(
    "line, release, described",
    [
        ("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, EABI: aarch64, DATE: Fri Jun  9 04:25:08 UTC 2023",
         "R32.7.4", "R32.7.4 (JetPack 4)"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023",
         "R35.4.1", "R35.4.1 (JetPack 5)"),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024",
         "R36.4.0", "R36.4.0 (JetPack 6)"),
    ],
)
def test_l4t_release_parsing(line, release, described):
    assert facts.parse_l4t_release(line) == release
    assert facts.describe_l4t(release) == described


def test_jetson_facts_from_files(tmp_path):
    assert facts.jetson_facts(str(tmp_path)) == {}
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R35 (release), REVISION: 3.1, GCID: 32827747, BOARD: t186ref, EABI: aarch64, DATE: Sun Mar 19 15:19:21 UTC 2023\n"
    )
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_text("NVIDIA Jetson Xavier NX Developer Kit\x00")
    assert facts.jetson_facts(str(tmp_path)) == {"l4t": "R35.3.1 (JetPack 5)", "board": "Jetson Xavier NX"}
    assert facts.parse_l4t_release("not a release file") is None


# ============================================================================ with TensorRT


@pytest.fixture
def trt():
    """TensorRT and a CUDA GPU, or a skip that says which is missing."""
    module = pytest.importorskip("tensorrt", reason="TensorRT is not installed: 'import tensorrt' failed")
    from enginesmith.backends.tensorrt import cuda

    if cuda.device_count() == 0:
        pytest.skip(f"TensorRT is installed but no CUDA GPU is usable: {cuda.no_device_reason()}")
    return module


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINESMITH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 6)).astype(np.float32)}


def _build(model, precision="fp32", calibration=None, **backend_options):
    from enginesmith.backends import BuildOptions

    from enginesmith.importers import ImportOptions, import_model

    options = BuildOptions(precision=precision, backend_options=backend_options)
    signature = import_model(model, ImportOptions()).signature
    return TensorRTBackend().build(model, signature, options, calibration=calibration), signature


@pytest.mark.tensorrt
def test_fp32_engine_matches_onnxruntime(trt, cache_dir):
    engine = es.build(make_mlp(), backend="tensorrt")  # verify=True compares with the source
    for batch in (1, 3, 32):
        feeds = _feeds(batch, seed=batch)
        np.testing.assert_allclose(engine(feeds)["probs"], run_plain(make_mlp(), feeds)["probs"], rtol=1e-4, atol=1e-5)
    assert engine.manifest.payload_name == "model.plan"
    options = engine.manifest.build_options["backend_options"]
    assert options["max_batch"] == options["profiles"]["x"]["max"][0]  # the engine splits larger batches


@pytest.mark.tensorrt
def test_engine_saves_and_loads(trt, cache_dir, tmp_path):
    path = tmp_path / "mlp.engine"
    es.build(make_mlp(), backend="tensorrt").save(path)
    loaded = es.load(path)
    feeds = _feeds(4)
    np.testing.assert_allclose(loaded(feeds)["probs"], run_plain(make_mlp(), feeds)["probs"], rtol=1e-4, atol=1e-5)
    assert es.info(path)["runs_here"]


@pytest.mark.tensorrt
def test_fp16_engine_is_close(trt, cache_dir):
    engine = es.build(make_mlp(), backend="tensorrt", precision="fp16")
    feeds = _feeds(8)
    np.testing.assert_allclose(engine(feeds)["probs"], run_plain(make_mlp(), feeds)["probs"], atol=2e-2)


@pytest.mark.tensorrt
def test_dynamic_shapes_inside_and_outside_the_profile(trt, cache_dir):
    result, signature = _build(make_mlp(), max_batch=8, opt_batch=4)
    session = TensorRTBackend().load(result.payload, result.resolved_options, signature)
    for batch in (1, 5, 8, 2):
        feeds = _feeds(batch, seed=batch)
        np.testing.assert_allclose(session.run(feeds)["probs"], run_plain(make_mlp(), feeds)["probs"], rtol=1e-4, atol=1e-5)
    with pytest.raises(es.InputError, match=r"input 'x' has shape \[9, 6\], outside the engine's optimization profile"):
        session.run(_feeds(9))
    session.close()


@pytest.mark.tensorrt
def test_several_inputs_and_outputs_with_int_outputs(trt, cache_dir):
    model = make_two_in_two_out()
    engine = es.build(model, backend="tensorrt")
    rng = np.random.default_rng(1)
    feeds = {"left": rng.standard_normal((5, 3)).astype(np.float32), "right": rng.standard_normal((5, 3)).astype(np.float32)}
    out, ref = engine(feeds), run_plain(model, feeds)
    np.testing.assert_allclose(out["score"], ref["score"], rtol=1e-4, atol=1e-5)
    assert out["ids"].dtype == np.int64 and np.array_equal(out["ids"], ref["ids"])


@pytest.mark.tensorrt
def test_parser_failure_names_the_unsupported_node(trt, cache_dir):
    with pytest.raises(es.UnsupportedModelError, match=r"node 'fancy_1' \(FancyActivation\)"):
        _build(make_unsupported_op_model())


@pytest.mark.tensorrt
def test_timing_cache_is_kept_and_reused(trt, cache_dir):
    first, _ = _build(make_mlp())
    assert "tensorrt_timing.cache" in first.caches
    assert list((cache_dir / "tensorrt").glob("timing-*.cache"))
    second, _ = _build(make_mlp())
    assert any(line.startswith("timing cache reused") for line in second.log)


@pytest.mark.tensorrt
def test_int8_calibration_cache_is_stored_and_reused(trt, cache_dir):
    from enginesmith.backends import Calibration
    from enginesmith.backends.tensorrt import cuda

    if "int8" not in fast_precisions(cuda.device_facts(0).compute_capability):
        pytest.skip("this GPU has no int8 kernels (TensorRT's support matrix)")

    batches = [_feeds(8, seed=i) for i in range(4)]
    first, signature = _build(make_mlp(), "int8", Calibration(batches, "entropy"))
    cache = first.caches["calibration_cache.json"]
    second, _ = _build(make_mlp(), "int8", Calibration([], "entropy", cache))
    assert any("reused" in line for line in second.log)
    session = TensorRTBackend().load(second.payload, second.resolved_options, signature)
    feeds = _feeds(8, seed=9)
    agreement = (session.run(feeds)["probs"].argmax(1) == run_plain(make_mlp(), feeds)["probs"].argmax(1)).mean()
    assert agreement >= 0.75


@pytest.mark.tensorrt
def test_int8_calibration_of_an_int64_input(trt, cache_dir):
    """TensorRT >= 9 keeps the int64 input INT64 (8.6: INT32): the calibrator must feed that type."""
    from enginesmith.backends import Calibration
    from enginesmith.backends.tensorrt import cuda

    if "int8" not in fast_precisions(cuda.device_facts(0).compute_capability):
        pytest.skip("this GPU has no int8 kernels (TensorRT's support matrix)")
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, 10, size=(8, 4)).astype(np.int64)} for _ in range(3)]
    result, signature = _build(make_int_input_model(), "int8", Calibration(batches, "entropy"))
    session = TensorRTBackend().load(result.payload, result.resolved_options, signature)
    feeds = {"ids": rng.integers(0, 10, size=(5, 4)).astype(np.int64)}
    np.testing.assert_allclose(session.run(feeds)["total"], run_plain(make_int_input_model(), feeds)["total"], rtol=0.1, atol=1.0)
    session.close()


@pytest.mark.tensorrt
def test_device_tensors_that_are_misaligned_views(trt, cache_dir):
    """x[1:] starts 24 bytes into its allocation: TensorRT needs 256-byte aligned addresses."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    result, signature = _build(make_mlp())
    session = TensorRTBackend().load(result.payload, result.resolved_options, signature)
    rows = torch.from_numpy(_feeds(5, seed=3)["x"]).cuda()
    holder = torch.full((1 + 4 * 4,), -1.0, device="cuda")
    out = holder[1:].view(4, 4)
    results = session.run_device({"x": rows[1:]}, outputs={"probs": out})
    assert results["probs"].ptr == out.data_ptr()
    expected = run_plain(make_mlp(), {"x": _feeds(5, seed=3)["x"][1:]})["probs"]
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert float(holder[0]) == -1.0
    session.close()


@pytest.mark.tensorrt
def test_concurrent_calls_from_threads(trt, cache_dir):
    result, signature = _build(make_mlp(), contexts=2, cuda_graphs=True)
    session = TensorRTBackend().load(result.payload, result.resolved_options, signature)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(20):
                feeds = _feeds(1 + (seed + i) % 4, seed=seed * 100 + i)
                np.testing.assert_allclose(session.run(feeds)["probs"], run_plain(make_mlp(), feeds)["probs"], rtol=1e-4, atol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    session.close()
    assert not errors, errors[0]


@pytest.mark.tensorrt
def test_device_tensors_in_and_out_without_copies(trt, cache_dir):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    result, signature = _build(make_mlp())
    session = TensorRTBackend().load(result.payload, result.resolved_options, signature)
    x = torch.from_numpy(_feeds(4)["x"]).cuda()
    out = torch.empty((4, 4), device="cuda")
    results = session.run_device({"x": x}, outputs={"probs": out})
    assert results["probs"].ptr == out.data_ptr()
    np.testing.assert_allclose(out.cpu().numpy(), run_plain(make_mlp(), _feeds(4))["probs"], rtol=1e-4, atol=1e-5)
    fresh = torch.from_dlpack(session.run_device({"x": x})["probs"])
    assert torch.allclose(fresh, out)


@pytest.mark.tensorrt
def test_a_payload_that_is_not_an_engine(trt):
    signature = _signature(TensorSpec("x", "float32", ("batch", 6)))
    from enginesmith.backends import BuildOptions

    with pytest.raises(es.BundleError, match="TensorRT"):
        TensorRTBackend().load(b"not an engine at all" * 10, BuildOptions(), signature)


@pytest.mark.tensorrt
def test_rebuild_reuses_the_bundle_timing_cache(trt, cache_dir, tmp_path):
    path = tmp_path / "mlp.engine"
    es.build(make_mlp(), backend="tensorrt").save(path)
    for shared in (cache_dir / "tensorrt").glob("timing-*.cache"):
        shared.unlink()  # only the bundle's own timing cache is left to reuse
    rebuilt = es.build(path)
    assert any(line.startswith("timing cache reused: the rebuilt bundle") for line in rebuilt.manifest.build_log)
