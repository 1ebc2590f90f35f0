"""The ``map`` accuracy budget: detectors judged by COCO mAP (engine vs source on labelled images) while building.

Uses the trained YOLOv8-style detector shipped in benchmarks/detection and scenes from its generator, so the
mAP numbers are real: the source reaches mAP@.5 > 0.8, and its int8 engine loses a fraction of a point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cv2")
pytest.importorskip("pycocotools")

import enginesmith as es  # noqa: E402
from enginesmith import vision  # noqa: E402
from enginesmith.cli.app import main  # noqa: E402
from enginesmith.errors import MissingDependencyError, ValidationDataError, VerificationFailedError  # noqa: E402
from enginesmith.validate import AccuracyBudget, parse_budget  # noqa: E402
from enginesmith.vision.evaluate import evaluate  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "detection"))
import scoring  # noqa: E402

SOURCE = scoring.MODELS / "yolov8_synth.onnx"
VAL_IMAGES = 30
# int8 of the shipped detector loses about half a point of mAP@[.5:.95] on these scenes (see test_detectors.py).
INT8_BUDGET = "map:2%"
TIGHT_BUDGET = "map:0.1%"


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> tuple[Path, Path]:
    return scoring.write_val_set(tmp_path_factory.mktemp("val"), VAL_IMAGES)


@pytest.fixture(scope="module")
def calib_images(tmp_path_factory) -> Path:
    return scoring.write_calib_images(tmp_path_factory.mktemp("calib"))


def _build_args(engine: Path, calib: Path, budget: str, val_set: tuple[Path, Path], precision: str = "int8") -> list[str]:
    annotations, images = val_set
    return ["build", str(SOURCE), "-o", str(engine), "--backend", "onnxruntime", "--precision", precision,
            "--calib", str(calib), "--max-accuracy-drop", budget, "--coco", str(annotations), "--images", str(images)]


@pytest.fixture(scope="module")
def int8_engine(tmp_path_factory, val_set, calib_images) -> Path:
    engine = tmp_path_factory.mktemp("int8") / "yolo.engine"
    assert main(_build_args(engine, calib_images, INT8_BUDGET, val_set)) == 0
    return engine


def _eval_scores(engine: Path, val_set: tuple[Path, Path]):
    annotations, images = val_set
    detector = vision.Detector(es.load(engine), vision.DetectorSettings(conf=0.001, iou=0.6))
    return evaluate(detector, annotations, images)


# --------------------------------------------------------------------------- the budget's text form


@pytest.mark.parametrize("text, metric, points", [("map:1%", "map", 1.0), ("map:0.5", "map", 0.5),
                                                  ("MAP50: 2 %", "map50", 2.0), ("map:0%", "map", 0.0)])
def test_map_budgets_read_as_points_of_map(text, metric, points):
    budget = parse_budget(text)
    assert (budget.metric, budget.value) == (metric, points) and budget.is_map
    assert AccuracyBudget.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget
    assert f"drops at most {points:g} point" in str(budget)


@pytest.mark.parametrize("text", ["map:", "map:-1%", "map:abc", "map:101", "mAP>=0.5"])
def test_unreadable_map_budgets_name_the_form(text):
    with pytest.raises(ValidationDataError, match="map:1%"):
        parse_budget(text)


# --------------------------------------------------------------------------- builds judged by mAP


def test_int8_build_within_a_map_budget_records_both_scores(int8_engine, val_set, capsys):
    engine = es.load(int8_engine)
    record = engine.manifest.checks["map_budget"]
    assert engine.manifest.precision == "int8" and engine.manifest.accuracy_budget == {"metric": "map", "max": 2.0}
    assert record["passed"] and record["images"] == VAL_IMAGES and record["metric"] == "mAP@[.5:.95]"
    # A trained detector, scored with its class names matched to the COCO categories (not a near-zero mAP).
    assert record["source"]["map50"] > 0.8 and record["engine"]["map50"] > 0.8
    assert 0 <= record["drop_points"] <= 2.0
    assert record["drop_points"] == pytest.approx(100 * (record["source"]["map"] - record["engine"]["map"]), abs=1e-2)
    # What the build measured is what scoring the written engine on the same images gives.
    assert _eval_scores(int8_engine, val_set).map == pytest.approx(record["engine"]["map"], abs=1e-5)


def test_the_build_prints_the_map_line(tmp_path, val_set, calib_images, capsys):
    engine = tmp_path / "fp32.engine"
    assert main(_build_args(engine, calib_images, "map50:1%", val_set, precision="fp32")) == 0
    out = " ".join(capsys.readouterr().out.split())
    record = es.load(engine).manifest.checks["map_budget"]
    assert record["metric"] == "mAP@.5" and record["drop_points"] == pytest.approx(0.0, abs=0.05)
    assert f"mAP budget: mAP@.5 source {record['source']['map50']:.4f}, engine {record['engine']['map50']:.4f}" in out


def test_an_int8_engine_over_a_tight_map_budget_stops_the_build_with_the_numbers(tmp_path, val_set, calib_images):
    annotations, images = val_set
    with pytest.raises(VerificationFailedError) as failure:
        es.build(SOURCE, backend="onnxruntime", precision="int8", calibration_data=calib_images,
                 accuracy_budget=TIGHT_BUDGET, coco_annotations=annotations, coco_images=images,
                 output=tmp_path / "tight.engine")
    message = str(failure.value)
    assert "over the accuracy budget" in message and "budget 0.1" in message and f"on {VAL_IMAGES} images" in message
    assert "mAP@[.5:.95] source 0." in message and "engine 0." in message and "points lost" in message
    assert not (tmp_path / "tight.engine").exists()


def test_the_cli_reports_a_failed_map_budget_in_one_line(tmp_path, val_set, calib_images, capsys):
    assert main(_build_args(tmp_path / "tight.engine", calib_images, TIGHT_BUDGET, val_set)) != 0
    err = capsys.readouterr().err
    # Before it, the notes on the small calibration set; the failure itself is one line.
    errors = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1 and errors[0].startswith("error:") and "points lost (budget 0.1)" in errors[0]
    assert "Traceback" not in err


def test_best_keeps_the_fastest_precision_within_the_map_budget_and_records_the_maps(tmp_path, val_set, calib_images):
    annotations, images = val_set
    # Timing is stubbed so the choice does not depend on this machine's load: int8 would be faster.
    timer = lambda targets, feeds, batch: {label: (1.0 if "int8" in label else 2.0) for label in targets}  # noqa: E731
    from enginesmith.pipeline import BuildRequest, run_build

    def best(budget: str):
        request = BuildRequest(SOURCE, backend="onnxruntime", precision="best", calibration_data=calib_images,
                               accuracy_budget=budget, coco_annotations=annotations, coco_images=images)
        return run_build(request, timer=timer)

    loose = best(INT8_BUDGET)
    rows = {row["precision"]: row for row in loose.manifest.checks["precision_candidates"]}
    assert loose.precision == "int8" and rows["int8"]["kept"] and {"fp32", "int8"} <= set(rows)
    for row in rows.values():
        assert row["source_map"]["map50"] > 0.8 and row["engine_map"]["map"] > 0
        assert row["map_drop_points"] == pytest.approx(100 * (row["source_map"]["map"] - row["engine_map"]["map"]), abs=1e-2)
    assert loose.manifest.checks["map_budget"]["engine"] == rows["int8"]["engine_map"]
    # A budget int8 cannot keep: fp32 is kept, and int8's row says by how much it missed.
    tight = best(TIGHT_BUDGET)
    rows = {row["precision"]: row for row in tight.manifest.checks["precision_candidates"]}
    assert tight.precision == "fp32" and rows["fp32"]["kept"] and not rows["int8"]["kept"]
    assert rows["int8"]["reason"] == f"over the accuracy budget: {rows['int8']['map_drop_points']:.2f} points of mAP@[.5:.95] lost > 0.1"
    assert rows["int8"]["map_drop_points"] > 0.1


def test_backend_auto_judges_every_candidate_by_map(tmp_path, val_set, calib_images, capsys):
    pytest.importorskip("openvino")
    engine = tmp_path / "auto.engine"
    args = _build_args(engine, calib_images, INT8_BUDGET, val_set)
    args.remove("--backend"), args.remove("onnxruntime")  # the CLI's default: auto
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    manifest = es.load(engine).manifest
    rows = manifest.checks["backend_candidates"]
    assert {row["backend"] for row in rows} >= {"onnxruntime", "openvino"} and "mAP drop" in out
    scored = [row for row in rows if "map_drop_points" in row]
    assert len(scored) >= 2 and any(row["chosen"] for row in scored)
    for row in scored:
        assert row["source_map"] == scored[0]["source_map"]  # the source is scored once, for all of them
        if row["map_drop_points"] > 2.0:
            assert not row["chosen"] and row["reason"].startswith("over the accuracy budget")
    assert manifest.checks["map_budget"]["drop_points"] <= 2.0


# --------------------------------------------------------------------------- bad input, one line each


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_map_budget_without_labelled_images_names_the_flags(tmp_path, calib_images, capsys):
    err = _one_line_error(capsys, ["build", str(SOURCE), "-o", str(tmp_path / "x.engine"), "--backend", "onnxruntime",
                                   "--precision", "int8", "--calib", str(calib_images), "--max-accuracy-drop", "map:1%"])
    assert "--coco" in err and "--images" in err
    assert not (tmp_path / "x.engine").exists()


def test_annotations_that_do_not_match_the_images_are_refused_before_building(tmp_path, val_set, calib_images, capsys):
    annotations, images = val_set
    # A folder of other images: none the annotations name.
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted(images.iterdir())[:3]:
        shutil.copy(path, other / f"other_{path.name}")
    err = _one_line_error(capsys, _build_args(tmp_path / "x.engine", calib_images, "map:1%", (annotations, other)))
    assert f"{VAL_IMAGES} of the {VAL_IMAGES} images" in err and "--images" in err
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    err = _one_line_error(capsys, _build_args(tmp_path / "x.engine", calib_images, "map:1%", (not_coco, calib_images)))
    assert "not COCO instances JSON" in err
    err = _one_line_error(capsys, _build_args(tmp_path / "x.engine", calib_images, "map:1%",
                                              (tmp_path / "missing.json", calib_images)))
    assert "missing.json" in err and "--coco" in err
    escaping = json.loads(annotations.read_text())
    escaping["images"][0]["file_name"] = "../" + escaping["images"][0]["file_name"]
    (tmp_path / "escaping.json").write_text(json.dumps(escaping))
    err = _one_line_error(capsys, _build_args(tmp_path / "x.engine", calib_images, "map:1%",
                                              (tmp_path / "escaping.json", images)))
    assert "not a file name inside the image folder" in err


def test_a_map_budget_on_a_model_that_is_not_a_detector_says_so(tmp_path, val_set):
    import onnx
    from conftest import make_mlp

    model = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), model)
    annotations, images = val_set
    with pytest.raises(ValidationDataError, match=r"'mAP@\[\.5:\.95\] drops at most 1 point' needs a detector: .*rank 4"):
        es.build(model, backend="onnxruntime", accuracy_budget="map:1", coco_annotations=annotations, coco_images=images)


def test_rebuilding_a_map_budget_bundle_asks_for_the_labelled_images_again(int8_engine, tmp_path, val_set,
                                                                          calib_images, capsys):
    again = ["build", str(int8_engine), "-o", str(tmp_path / "again.engine"), "--calib", str(calib_images)]
    err = _one_line_error(capsys, again)
    assert "mAP@[.5:.95] drops at most 2 points" in err and "--coco" in err
    annotations, images = val_set
    assert main([*again, "--coco", str(annotations), "--images", str(images)]) == 0
    rebuilt = es.load(tmp_path / "again.engine").manifest
    assert rebuilt.accuracy_budget == {"metric": "map", "max": 2.0} and rebuilt.checks["map_budget"]["passed"]


@pytest.mark.parametrize("module", ["pycocotools", "cv2"])
def test_without_the_vision_extra_a_map_budget_names_it_before_building(module, tmp_path, val_set, calib_images,
                                                                          monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == module] + [module]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed, submodules already imported included
    annotations, images = val_set
    with pytest.raises(MissingDependencyError, match=r"pip install 'enginesmith\[vision\]'") as failure:
        es.build(SOURCE, backend="onnxruntime", precision="int8", calibration_data=calib_images,
                 accuracy_budget="map:1%", coco_annotations=annotations, coco_images=images)
    assert failure.value.stage == "import"  # before anything is built


def test_labelled_images_without_a_map_budget_are_refused(tmp_path, val_set, capsys):
    annotations, images = val_set
    err = _one_line_error(capsys, ["build", str(SOURCE), "-o", str(tmp_path / "x.engine"), "--backend", "onnxruntime",
                                   "--coco", str(annotations), "--images", str(images)])
    assert "--max-accuracy-drop map:1%" in err


def test_building_without_a_map_budget_does_not_import_opencv():
    code = ("import sys, enginesmith as es, enginesmith.cli.engine_commands, enginesmith.pipeline.map_budget\n"
            f"es.build({str(SOURCE)!r}, backend='onnxruntime', accuracy_budget='rel_l2<=0.05')\n"
            "assert 'cv2' not in sys.modules and 'pycocotools' not in sys.modules, 'vision imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
