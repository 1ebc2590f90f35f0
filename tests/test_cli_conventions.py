"""What a newcomer hits on the command line (issue 14, issue 13 part 4): files never overwritten by
accident, one-line errors, no tracebacks, output readable at 80 columns and in a pipe, one syntax
for inputs, bench numbers people can read."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

import enginesmith as es
from enginesmith.bundle import looks_like_bundle
from enginesmith.cli import app
from enginesmith.cli.app import main
from conftest import make_mlp

COMMANDS = ["", "build", "run", "validate", "bench", "info", "inspect", "surgeon", "demo", "serve", "export",
            "export triton", "export kserve", "map"]
BOX_CHARACTERS = set("╭╮╰╯│─┃━┏┓┗┛")


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- --help at 80 columns


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_has_no_truncation_bool_metavars_or_boxes(command):
    args = [*command.split(), "--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Usage: enginesmith" in text
    assert "…" not in text and "<bool>" not in text and "<list" not in text
    assert not BOX_CHARACTERS & set(text), "help drawn in boxes"
    assert all(len(line) <= 80 for line in text.splitlines()), "help wider than 80 columns"
    if not command:
        listing = text.split("Commands:")[1]
        assert "..." not in listing, "a command's summary was cut"
        assert "--debug" in text and "--verbose" in text


# --------------------------------------------------------------------------- never overwrite by accident


def test_build_refuses_to_overwrite_its_own_input(tmp_path, capsys, mlp_path):
    copy = tmp_path / "copy.onnx"
    shutil.copy(mlp_path, copy)
    before = copy.read_bytes()
    assert main(["build", str(copy), "-o", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite the input" in err and "--force" in err and len(_error_lines(err)) == 1
    assert copy.read_bytes() == before
    # Told to, it does; rebuilding an engine in place needs no --force.
    assert main(["build", str(copy), "-o", str(copy), "--force"]) == 0
    assert looks_like_bundle(copy)
    assert main(["build", str(copy)]) == 0


def test_commands_refuse_to_replace_files_they_did_not_write(tmp_path, capsys, mlp_path, mlp_engine_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("precious")
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 6), np.float32))
    engine = str(mlp_engine_path)
    attempts = [
        ["build", str(mlp_path), "-o", str(keep)],
        ["run", engine, "--data", f"x={x}", "--out", str(keep)],
        ["run", engine, "--data", f"x={x}", "--out", str(x)],
        ["validate", engine, "--json", str(keep)],
        ["validate", engine, "--json", engine],
        ["bench", engine, "--runs", "2", "--json", str(keep)],
        ["bench", engine, "--runs", "2", "--plot", str(keep)],
        ["info", engine, "--json", str(keep)],
        ["inspect", str(mlp_path), "--json", str(keep)],
        ["surgeon", str(mlp_path), "-o", str(keep)],
        ["surgeon", str(mlp_path), "-o", str(mlp_path)],
    ]
    engine_bytes = mlp_engine_path.read_bytes()
    for args in attempts:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "refusing to overwrite" in err and len(_error_lines(err)) == 1, (args, err)
    assert keep.read_text() == "precious"
    assert mlp_engine_path.read_bytes() == engine_bytes
    np.testing.assert_array_equal(np.load(x), np.ones((2, 6), np.float32))
    assert main(["info", engine, "--json", str(keep), "--force"]) == 0
    assert json.loads(keep.read_text())["backend"] == "onnxruntime"


def test_a_json_option_that_swallowed_a_flag_is_refused(mlp_engine_path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(mlp_engine_path), "--json", "--no-store"]) == 2
    assert "is not a file name" in capsys.readouterr().err
    assert not (tmp_path / "--no-store").exists()


# --------------------------------------------------------------------------- one-line errors, no tracebacks


def test_usage_errors_are_one_line_with_where_to_look(capsys):
    assert main(["build", "model.onnx", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [l for l in _error_lines(err) if l.startswith("error:")] and len(_error_lines(err)) == 1
    assert "--bogus" in err and "(see 'enginesmith build --help')" in err
    assert not BOX_CHARACTERS & set(err)


@pytest.mark.parametrize("args", [["run", "E", "--random", "--batch", "0"], ["bench", "E", "--runs", "0"]])
def test_zero_batch_and_zero_runs_are_refused(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and ("--batch" in err or "--runs" in err)


def test_unexpected_exceptions_become_one_line_and_debug_shows_the_traceback(mlp_engine_path, capsys, monkeypatch):
    def broken(path):
        raise RuntimeError("something inside broke\nsecond line of detail")

    monkeypatch.setattr(es.api, "info", broken)
    monkeypatch.delenv("ENGINESMITH_DEBUG", raising=False)
    assert main(["info", str(mlp_engine_path)]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Traceback" not in err
    assert "'enginesmith info' failed: RuntimeError: something inside broke" in err and "--debug" in err
    assert main(["--debug", "info", str(mlp_engine_path)]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["info", str(mlp_engine_path), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ENGINESMITH_DEBUG", "1")
    assert main(["info", str(mlp_engine_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_verification_failure_names_the_cli_flag_not_a_python_argument(mlp_path, tmp_path, capsys, monkeypatch):
    from enginesmith.validate import Tolerance, engine_checks

    impossible = Tolerance(max_rel_l2=-1.0, min_cosine=2.0, min_argmax_agreement=2.0)
    monkeypatch.setattr(engine_checks, "tolerance_for", lambda *a, **k: impossible)
    assert main(["build", str(mlp_path), "-o", str(tmp_path / "m.engine"), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert "does not match the source model" in err and "(--no-verify)" in err and "verify=False" not in err
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(es.errors.VerificationFailedError) as info:
        es.build(mlp_path, tolerance=impossible)
    assert "--no-verify" not in str(info.value) and "verify=False" not in str(info.value)


# --------------------------------------------------------------------------- warnings and library noise


def test_library_warnings_are_one_note_each_without_source_paths(mlp_engine_path, tmp_path, capsys, monkeypatch):
    _warnings_printed_like_a_terminal(monkeypatch)
    x = tmp_path / "x64.npy"
    np.save(x, np.ones((2, 6), np.float64))
    assert main(["run", str(mlp_engine_path), "--data", f"x={x}", "--data", f"x={x}"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: input 'x' cast from float64 to float32") == 1
    assert ".py:" not in err and "Warning" not in err


def _warnings_printed_like_a_terminal(monkeypatch):
    """pytest records warnings instead of printing them; print them as Python does outside pytest."""
    import warnings

    monkeypatch.setattr(warnings, "_showwarnmsg_impl", lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg)))


def test_random_calibration_is_warned_once(mlp_path, tmp_path, capsys, monkeypatch):
    _warnings_printed_like_a_terminal(monkeypatch)
    assert main(["build", str(mlp_path), "-o", str(tmp_path / "m.engine"), "--precision", "int8",
                 "--calib-random", "--no-verify"]) == 0
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert both.count("calibrated on random data") == 1, both
    assert ".py:" not in both


def test_onnx_runtime_log_stays_off_the_terminal_unless_verbose(tmp_path, capfd, mlp_engine_path):
    model = make_mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused_weight"))
    source = tmp_path / "unused.onnx"
    onnx.save(model, source)
    assert main(["validate", str(mlp_engine_path), "--against", str(source), "--no-store"]) == 0
    assert "Removing initializer" not in capfd.readouterr().err
    assert main(["--verbose", "validate", str(mlp_engine_path), "--against", str(source), "--no-store"]) == 0
    assert "Removing initializer" in capfd.readouterr().err
    main(["info", str(mlp_engine_path)])  # back to quiet for the tests that follow
    capfd.readouterr()


# --------------------------------------------------------------------------- 80 columns, piped


def _long_named_model(path):
    inp, out = "image_input_with_a_rather_long_descriptive_name", "class_probabilities_after_the_final_softmax"
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [inp, "w"], ["logits_of_the_classifier_head_layer"], name="classifier_head_matmul"),
         helper.make_node("Softmax", ["logits_of_the_classifier_head_layer"], [out], name="softmax", axis=-1)],
        "long_names",
        [helper.make_tensor_value_info(inp, onnx.TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tf2onnx",
                              producer_version="1.17.0 None")
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture
def narrow_terminal(monkeypatch):
    """Output at 80 columns whatever COLUMNS the test runner has (captured output is not a tty)."""
    cli_app = importlib.import_module("enginesmith.cli.app")  # the module; enginesmith.cli.app is the Typer app
    monkeypatch.setattr(cli_app.console, "width", 80)
    monkeypatch.setattr(cli_app.err_console, "width", 80)


def test_output_at_80_columns_piped_is_not_cut(tmp_path, capsys, narrow_terminal):
    source = _long_named_model(tmp_path / "a_model_file_with_a_long_name_for_the_twohead_case.onnx")
    engine = tmp_path / "long.engine"
    for args in (["build", str(source), "-o", str(engine)], ["run", str(engine), "--random"], ["info", str(engine)],
                 ["inspect", str(source), "--target", "tensorrt:8.6"], ["validate", str(engine), "--no-store"],
                 ["bench", str(engine), "--runs", "3", "--vs", str(source)]):
        assert main(args) == 0, args
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert "…" not in text, (args, text)
        assert ".py:" not in text and "Traceback" not in text
        assert all(len(line) <= 80 for line in text.splitlines()), (args, text)
        if args[0] == "inspect":
            assert "producer tf2onnx 1.17.0" in text and "None" not in text


# --------------------------------------------------------------------------- inputs: one syntax


def test_run_data_errors_name_the_problem(mlp_engine_path, tmp_path, capsys):
    folder = tmp_path / "afolder"
    folder.mkdir()
    assert main(["run", str(mlp_engine_path), "--data", f"x={folder}"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and f"--data {folder}" in err
    text_file = tmp_path / "notes.npy"
    text_file.write_text("not an array")
    assert main(["run", str(mlp_engine_path), "--data", f"x={text_file}"]) == 2
    err = capsys.readouterr().err
    assert "not a valid .npy" in err and "allow_pickle" not in err and "pickle.load" not in err
    assert main(["validate", str(mlp_engine_path), "--data", str(text_file)]) == 2
    assert "allow_pickle" not in capsys.readouterr().err


def test_run_takes_data_files_folders_and_the_old_input_spelling(mlp_engine_path, tmp_path, capsys):
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    expected = es.load(mlp_engine_path)(x=x)["probs"]
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, row in enumerate(x):
        np.save(folder / f"{i}.npy", row)
    for i, args in enumerate((["--data", f"x={tmp_path / 'x.npy'}"], ["--data", str(tmp_path / "x.npy")],
                              ["--data", str(folder)], ["--input", f"x={tmp_path / 'x.npy'}"])):
        out = tmp_path / f"out{i}.npz"
        assert main(["run", str(mlp_engine_path), *args, "--out", str(out)]) == 0, args
        with np.load(out) as saved:
            np.testing.assert_allclose(saved["probs"], expected, rtol=1e-6)
        err = capsys.readouterr().err
        assert ("is now 'run --data" in err) == (args[0] == "--input")


def test_validate_and_bench_take_named_data_files(mlp_engine_path, mlp_path, tmp_path, capsys):
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["validate", str(mlp_engine_path), "--against", str(mlp_path), "--data", f"x={tmp_path / 'x.npy'}",
                 "--json", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["samples"] == 5
    assert main(["bench", str(mlp_engine_path), "--runs", "3", "--data", f"x={tmp_path / 'x.npy'}",
                 "--batch", "8"]) == 0


# --------------------------------------------------------------------------- bench readability


def test_bench_says_how_much_faster_against_what_and_how_long_it_ran(mlp_engine_path, mlp_path, tmp_path, capsys):
    report = tmp_path / "b.json"
    assert main(["bench", str(mlp_engine_path), "--vs", str(mlp_path), "--duration", "0.2",
                 "--json", str(report), "--plot", str(tmp_path / "b.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # sentences may wrap at 80 columns
    assert "(a default ONNX Runtime session)" in out
    assert any(w in out for w in ("faster than mlp.onnx", "slower than mlp.onnx", "about as fast as mlp.onnx"))
    assert "0.00x" not in out and "timed" in out and " s" in out
    data = json.loads(report.read_text())
    assert data["baseline_how"] == "a default ONNX Runtime session"
    # duration-based by default: at least the minimum count, and about the asked time
    for r in data["results"]:
        assert r["runs"] >= 10 and r["seconds"] > 0
    assert data["ratios"][0]["text"].startswith("engine is")


def test_speed_ratios_read_well():
    from enginesmith.bench import comparison_text

    assert comparison_text("engine", 1702.08, "m.onnx") == "engine is 1,702x faster than m.onnx"
    assert comparison_text("engine", 17.24, "m.onnx") == "engine is 17.2x faster than m.onnx"
    assert comparison_text("engine", 0.5, "m.onnx") == "engine is 2.00x slower than m.onnx"
    assert comparison_text("engine", 1.01, "m.onnx").startswith("engine is about as fast as m.onnx")


def test_plots_stay_linear_with_legends_numbers_and_facts_in_the_title(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from enginesmith.bench import BenchReport, LatencyStats

    seen = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (seen.append(fig), real_close(fig))[1])
    results = [LatencyStats.from_samples("engine", 1, [1e-5] * 20), LatencyStats.from_samples("keras", 1, [2e-2] * 20)]
    report = BenchReport(results, baseline="keras", machine={"precision": "fp32", "cpu": "Test CPU"})
    report.plot(tmp_path / "p.png")
    fig = seen[-1]
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "linear"]
    assert all(ax.get_legend() is not None for ax in fig.axes)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "0.01" in labels and "20" in labels  # p50 ms of the two bars
    title = fig._suptitle.get_text()
    assert "engine vs keras" in title and "fp32" in title and "Test CPU" in title and "20 runs" in title
    BenchReport(results[:1], baseline=None, machine={}).plot(tmp_path / "q.png", log_scale=True)
    assert "engine only" in seen[-1]._suptitle.get_text()
    assert [ax.get_yscale() for ax in seen[-1].axes] == ["log", "log"]


# --------------------------------------------------------------------------- demo


def test_demo_reports_missing_scikit_learn_before_importing_tensorflow(monkeypatch):
    from enginesmith import demo
    from enginesmith.errors import MissingDependencyError

    for name in ("sklearn", "sklearn.datasets", "keras", "tensorflow"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match="scikit-learn is missing"):
        demo._require_frameworks()


def test_onnx_runtime_errors_of_internal_checks_stay_off_the_terminal(tmp_path, capfd):
    # A pass check that makes ONNX Runtime fail: the summary says so; ORT's own error log is not repeated.
    baked = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")], "baked",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 2])],
        [numpy_helper.from_array(np.array([2, 3, 2], np.int64), "shape")]), opset_imports=[helper.make_opsetid("", 17)])
    baked.ir_version = 9
    path = tmp_path / "baked.onnx"
    onnx.save(baked, path)
    assert main(["surgeon", str(path), "--dynamic", "x:0", "--no-optimize"]) == 1
    err = capfd.readouterr().err
    assert "rolled back" in err and "[E:onnxruntime" not in err and "ExecuteKernel" not in err


def test_build_verifies_on_the_given_data(mlp_path, tmp_path, capsys):
    x = np.random.default_rng(3).standard_normal((7, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for i, spec in enumerate((str(tmp_path / "x.npy"), f"x={tmp_path / 'x.npy'}")):
        engine = tmp_path / f"m{i}.engine"
        assert main(["build", str(mlp_path), "-o", str(engine), "--data", spec]) == 0
        summary = es.load(engine).manifest.checks["build_verification"]["summary"]
        assert "7 samples" in summary, summary


def test_json_dash_prints_one_json_document_and_nothing_else(mlp_engine_path, mlp_path, capsys):
    for args in (["validate", str(mlp_engine_path), "--against", str(mlp_path), "--json", "-", "--no-store"],
                 ["validate", str(mlp_engine_path), "--json", "-", "--no-store", "--layerwise"],
                 ["bench", str(mlp_engine_path), "--runs", "3", "--json", "-"],
                 ["info", str(mlp_engine_path), "--json", "-"],
                 ["inspect", str(mlp_path), "--json", "-"]):
        assert main(args) == 0, args
        document = json.loads(capsys.readouterr().out)
        assert isinstance(document, dict) and document, args
    assert main(["validate", str(mlp_engine_path), "--json", "-", "--no-store", "--layerwise"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["validation"]["passed"] and both["layerwise"]["passed"]


def test_demo_refuses_a_folder_whose_files_it_did_not_write(tmp_path, capsys):
    (tmp_path / "digits.keras").write_bytes(b"somebody's model")
    assert main(["demo", "-o", str(tmp_path), "--epochs", "1"]) == 2
    assert "not written by an earlier demo" in capsys.readouterr().err
    assert (tmp_path / "digits.keras").read_bytes() == b"somebody's model"


def test_demo_folder_is_recognised_by_its_report(tmp_path):
    from enginesmith.demo import is_demo_folder

    assert not is_demo_folder(tmp_path)
    (tmp_path / "demo.json").write_text(json.dumps({"keras_test_accuracy": 0.98}))
    assert is_demo_folder(tmp_path)
    (tmp_path / "demo.json").write_text("not json")
    assert not is_demo_folder(tmp_path)


def test_python_dash_m_enginesmith_is_the_command_line():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "enginesmith", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Usage: enginesmith" in done.stdout and "Traceback" not in done.stderr
