"""The build as named stages: a failure names its stage, unexpected errors are chained, stage times are recorded.

Also what the stages left behind is used later: run --random, bench and validate --layerwise
feed a model the build's stored samples or input plan, and info says where they came from.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_mlp, make_unsupported_op_model, run_plain
from wild_models import rate_branch

import enginesmith as es
from enginesmith.cli.app import main
from enginesmith.errors import StageFailedError
from enginesmith.graph.compat import IncompatibleModelError
from enginesmith.pipeline import BUILD_STAGES, BuildRequest
from enginesmith.pipeline.runner import Stage, run_stages
from enginesmith.validate import Tolerance

STAGE_NAMES = ["import", "check", "inputs", "passes", "build", "verify", "package"]


def save(model: onnx.ModelProto, path):
    onnx.save(model, path)
    return path


# ----------------------------------------------------------------------------- failures name their stage


def test_a_missing_source_fails_in_the_import_stage(tmp_path, capsys):
    with pytest.raises(es.SourceError, match="model not found") as info:
        es.build(tmp_path / "missing.onnx")
    assert info.value.stage == "import"
    assert main(["build", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "m.engine")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: build failed at stage 'import': model not found") and err.count("\n") == 1


def test_an_unbuildable_model_fails_in_the_check_stage_and_keeps_its_report(tmp_path, capsys):
    path = save(make_unsupported_op_model(), tmp_path / "custom.onnx")
    with pytest.raises(IncompatibleModelError) as info:
        es.build(path)
    assert info.value.stage == "check" and info.value.report.blocking
    assert main(["build", str(path), "-o", str(tmp_path / "custom.engine")]) == 2
    assert capsys.readouterr().err.startswith("error: build failed at stage 'check': the model cannot be built")
    assert not (tmp_path / "custom.engine").exists()


def test_a_requested_pass_that_cannot_apply_fails_in_the_passes_stage(tmp_path):
    # Renaming shapes onto an input that has another rank: fix_shapes refuses, and it was asked for.
    with pytest.raises(es.EnginesmithError) as info:
        es.build(make_mlp(), import_options=es.ImportOptions(input_shapes={"x": (2, 7)}), output=tmp_path / "m.engine")
    assert info.value.stage == "passes"
    assert not (tmp_path / "m.engine").exists()


def test_a_failed_verification_fails_in_the_verify_stage_and_writes_nothing(mlp_path, tmp_path, capsys, monkeypatch):
    impossible = Tolerance(max_rel_l2=-1.0, min_cosine=2.0, min_argmax_agreement=2.0)
    with pytest.raises(es.errors.VerificationFailedError) as info:
        es.build(mlp_path, tolerance=impossible, output=tmp_path / "m.engine")
    assert info.value.stage == "verify"
    assert not (tmp_path / "m.engine").exists()
    from enginesmith.validate import engine_checks

    monkeypatch.setattr(engine_checks, "tolerance_for", lambda *a, **k: impossible)
    assert main(["build", str(mlp_path), "-o", str(tmp_path / "m.engine"), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: build failed at stage 'verify': the built fp32 engine does not match")
    assert err.rstrip().endswith("(--no-verify)")


def test_an_unexpected_error_in_a_stage_becomes_a_build_error_naming_it_with_the_cause_chained(
        mlp_path, tmp_path, capsys, monkeypatch):
    import enginesmith.graph.passes as passes

    def broken(*args, **kwargs):
        raise RuntimeError("the optimizer fell over")

    monkeypatch.setattr(passes, "optimize", broken)
    with pytest.raises(StageFailedError) as info:
        es.build(mlp_path, output=tmp_path / "m.engine")
    error = info.value
    assert isinstance(error, es.BuildError) and error.stage == "passes"
    assert str(error) == "build failed at stage 'passes': RuntimeError: the optimizer fell over"
    assert isinstance(error.__cause__, RuntimeError)
    assert not (tmp_path / "m.engine").exists()
    # The CLI: exit 1 (not the user's fault), one line, the traceback only with --debug.
    assert main(["build", str(mlp_path), "-o", str(tmp_path / "m.engine")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: build failed at stage 'passes': RuntimeError: the optimizer fell over (run with --debug")
    assert "Traceback" not in err
    assert main(["--debug", "build", str(mlp_path), "-o", str(tmp_path / "m.engine")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "direct cause" in err and "the optimizer fell over" in err


def test_arguments_are_checked_before_any_stage_runs(tmp_path):
    # The source does not even exist: the request is refused first, and by no stage.
    with pytest.raises(es.BuildError, match="unknown precision 'fp64'") as info:
        es.build(tmp_path / "missing.onnx", precision="fp64")
    assert info.value.stage is None
    with pytest.raises(es.BuildError, match="unknown calibration method 'median'"):
        BuildRequest(tmp_path / "missing.onnx", calibration_method="median")
    with pytest.raises(es.ValidationDataError, match=r"--holdout 1 is outside \[0, 1\)"):
        BuildRequest(tmp_path / "missing.onnx", holdout=1.0)
    request = BuildRequest(make_mlp(), accuracy_budget="1%", disabled_passes=["simplify"])
    assert request.accuracy_budget.metric == "agreement" and request.disabled_passes == ("simplify",)


def test_the_runner_reports_progress_times_stages_and_lets_interrupts_through():
    seen: list[tuple[str, int, int | None]] = []
    order: list[str] = []
    stages = [Stage("first", lambda state: order.append("first")), Stage("second", lambda state: order.append("second"))]
    timings: dict[str, float] = {}
    run_stages(stages, None, timings, progress=lambda label, done, total: seen.append((label, done, total)))
    assert order == ["first", "second"] and list(timings) == ["first", "second"]
    assert all(seconds >= 0 for seconds in timings.values())
    assert seen == [("first (1/2)", 0, 1), ("first (1/2)", 1, 1), ("second (2/2)", 0, 1), ("second (2/2)", 1, 1)]

    def interrupted(state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stages([Stage("slow", interrupted)], None, {})


# ----------------------------------------------------------------------------- stage times


def test_stage_times_are_recorded_and_build_and_info_say_where_the_time_went(mlp_path, tmp_path, capsys):
    assert [stage.name for stage in BUILD_STAGES] == STAGE_NAMES
    target = tmp_path / "m.engine"
    assert main(["build", str(mlp_path), "-o", str(target)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    stages = es.load(target).manifest.checks["stages"]
    assert sorted(stages) == sorted(STAGE_NAMES) and all(isinstance(s, float) and s >= 0 for s in stages.values())
    line = out.split("time: ", 1)[1]
    positions = [line.index(f"{name} ") for name in STAGE_NAMES]
    assert positions == sorted(positions)  # in the order the stages ran
    assert main(["info", str(target)]) == 0
    assert "build time: " in " ".join(capsys.readouterr().out.split())
    # A rebuild from the bundle runs (and records) the same stages.
    rebuilt = es.build(target)
    assert sorted(rebuilt.manifest.checks["stages"]) == sorted(STAGE_NAMES)


# ----------------------------------------------------------------------------- inputs the build left behind


def test_run_random_bench_and_layerwise_use_the_build_input_plan(tmp_path, capsys):
    # The model takes the failing branch for any sample rate but 16000: random inputs cannot run it.
    target = tmp_path / "rate.engine"
    es.build(rate_branch(), output=target)
    assert main(["run", str(target), "--random", "--batch", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "inputs: generated from the build's input plan" in out and "(3, 16)" in out
    report = es.layerwise(target)
    assert report.passed and report.layers
    assert report.inputs.startswith("generated from the build's input plan")
    assert main(["info", str(target)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "samples: checks ran on inputs generated from the graph (x float32[2, 16], sr int64[] = 16000); no samples stored" in out


def test_run_random_bench_and_layerwise_use_the_samples_the_bundle_stores(tmp_path, capsys):
    # An opaque rate check: no plan runs it, so the build needed data, and everything after uses it.
    model = rate_branch(opaque=True)
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    target = tmp_path / "vad.engine"
    es.build(model, data={"x": x, "sr": np.array(16000, np.int64)}, output=target)
    engine = es.load(target)
    feeds, label = es.api.engine_inputs(engine, batch=7)
    assert label == "samples stored in the bundle (given arrays)"
    assert feeds["x"].shape == (7, 16) and feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    np.testing.assert_allclose(engine(feeds)["y"], run_plain(model, feeds)["y"])
    assert main(["run", str(target), "--random"]) == 0
    assert "inputs: samples stored in the bundle (given arrays)" in " ".join(capsys.readouterr().out.split())
    result = es.bench(target, batches=[2], runs=3, warmup=1)
    assert result.results[0].batch == 2
    report = es.layerwise(target)
    assert report.passed and report.inputs == "first samples stored in the bundle (given arrays)"
    assert main(["info", str(target)]) == 0
    assert "samples: 5 samples stored (given arrays)" in " ".join(capsys.readouterr().out.split())


def test_the_samples_record_in_words_says_what_was_stored_and_what_was_not():
    from enginesmith.build_inputs import BuildInputs, samples_text

    inputs = BuildInputs("data", "samples from 'big.npz'", {"x": np.zeros((10, 6), np.float32)})
    assert samples_text(inputs.manifest_record(10, None)) == "10 samples stored (samples from 'big.npz')"
    assert (samples_text(inputs.manifest_record(4, "stored the first 4 of 10 samples"))
            == "4 of 10 samples stored (samples from 'big.npz'); validate with --data for the rest")
    too_large = "samples not stored: one sample is 9.0 MB, over the 8 MB limit for samples in a bundle"
    assert samples_text(inputs.manifest_record(None, too_large)) == f"10 samples (samples from 'big.npz'); {too_large}"
    assert samples_text(None) is None
