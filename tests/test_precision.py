"""fp16, int8 with calibration, calibration caches, preprocessing specs and `best`.

The int8 tests use a small CNN trained here (torch, CPU, a few seconds) on
scikit-learn's digits, so accuracy numbers mean something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest
from conftest import make_mlp

import enginesmith as es
from enginesmith.api import RandomCalibrationWarning
from enginesmith.bundle import read_bundle
from enginesmith.cli.app import main
from enginesmith.runtime.preprocess import PreprocessSpec, load_image, parse_spec

torch = pytest.importorskip("torch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A trained digits CNN as ONNX, plus train/test arrays saved as .npz."""
    from sklearn.model_selection import train_test_split

    folder = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    data = sklearn_datasets.load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, data.target, test_size=0.2, random_state=0,
                                                        stratify=data.target)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(25):
        net.train()
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            optimizer.step()
    net.eval()
    model_path = folder / "digits.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), model_path, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17)
    np.savez(folder / "train.npz", image=x_train)
    return {"model": model_path, "train": folder / "train.npz", "x_test": x_test, "y_test": y_test, "folder": folder}


@pytest.fixture(scope="module")
def int8_engine(digits):
    path = digits["folder"] / "digits_int8.engine"
    es.build(digits["model"], precision="int8", calibration_data=digits["train"], output=path)
    return path


def accuracy(engine, x, y) -> float:
    return float(np.mean(engine(image=x)["logits"].argmax(-1) == y))


def test_int8_keeps_test_accuracy_within_one_point(digits, int8_engine):
    fp32 = es.build(digits["model"])
    int8 = es.load(int8_engine)
    assert int8.precision == "int8"
    acc32 = accuracy(fp32, digits["x_test"], digits["y_test"])
    acc8 = accuracy(int8, digits["x_test"], digits["y_test"])
    assert acc32 > 0.9, "the digits CNN did not train"
    assert abs(acc32 - acc8) <= 0.01
    # The payload really is quantized: QDQ nodes around int8 weights.
    payload = onnx.load_from_string(read_bundle(int8_engine).payload)
    assert any(init.data_type == onnx.TensorProto.INT8 for init in payload.graph.initializer)
    calibration = int8.manifest.checks["calibration"]
    assert calibration["random"] is False and calibration["holdout_samples"] > 0
    assert int8.manifest.checks["build_verification"]["passed"] is True


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_keeps_accuracy_whatever_the_sample_count(digits, method, tmp_path):
    # 101 samples, 81 after the hold-out: batches of 8 leave a short last one, which ONNX Runtime's
    # histogram calibrators cannot stack.
    np.savez(tmp_path / "calib.npz", image=np.load(digits["train"])["image"][:101])
    engine = es.build(digits["model"], precision="int8", calibration_method=method, calibration_data=tmp_path / "calib.npz")
    assert engine.manifest.build_options["calibration_method"] == method
    fp32 = es.build(digits["model"])
    assert abs(accuracy(fp32, digits["x_test"], digits["y_test"]) - accuracy(engine, digits["x_test"], digits["y_test"])) <= 0.02


def test_calibration_cache_is_reused_on_rebuild(digits, int8_engine, tmp_path):
    rebuilt_path = tmp_path / "rebuilt.engine"
    rebuilt = es.build(int8_engine, output=rebuilt_path)
    assert rebuilt.precision == "int8"
    assert rebuilt.manifest.checks["calibration"]["cache_reused"] is True
    first = read_bundle(int8_engine, payload=True, caches=True)
    second = read_bundle(rebuilt_path, payload=True, caches=True)
    assert second.caches["calibration_cache.json"] == first.caches["calibration_cache.json"]
    ranges = json.loads(second.caches["calibration_cache.json"])
    assert ranges, "the cache holds activation ranges"
    x = digits["x_test"][:32]
    np.testing.assert_array_equal(es.load(rebuilt_path)(image=x)["logits"], es.load(int8_engine)(image=x)["logits"])


def test_calibration_cache_taken_from_another_engine(digits, int8_engine):
    engine = es.build(digits["model"], precision="int8", calibration_cache=int8_engine, verify=False)
    assert engine.manifest.checks["calibration"]["cache_reused"] is True
    x = digits["x_test"][:16]
    np.testing.assert_array_equal(engine(image=x)["logits"], es.load(int8_engine)(image=x)["logits"])


def test_best_rejects_int8_over_a_tight_budget(digits):
    engine = es.build(digits["model"], precision="best", calibration_data=digits["train"], accuracy_budget="rel_l2<=1e-5")
    assert engine.precision == "fp32"
    rows = {row["precision"]: row for row in engine.manifest.checks["precision_candidates"]}
    assert rows["int8"]["kept"] is False and "over the accuracy budget" in rows["int8"]["reason"]
    assert rows["fp32"]["kept"] is True
    assert engine.manifest.accuracy_budget == {"metric": "rel_l2", "max": 1e-5}


def test_best_with_a_loose_budget_keeps_a_candidate_within_it(digits):
    engine = es.build(digits["model"], precision="best", calibration_data=digits["train"], accuracy_budget="2%")
    rows = {row["precision"]: row for row in engine.manifest.checks["precision_candidates"]}
    assert set(rows) == {"fp32", "int8"}
    kept = [r for r in rows.values() if r["kept"]]
    assert len(kept) == 1 and kept[0]["precision"] == engine.precision
    assert all(r["argmax_agreement"] >= 0.98 for r in rows.values())


def test_best_without_calibration_data_is_refused_with_the_fix(digits, tmp_path):
    # It used to exit 0 with an fp32 engine, int8 silently left out.
    with pytest.raises(es.ValidationDataError, match="best also tries int8, which needs calibration data: give --calib"):
        es.build(digits["model"], precision="best")
    assert main(["build", str(digits["model"]), "-o", str(tmp_path / "best.engine"), "--precision", "best"]) != 0
    assert not (tmp_path / "best.engine").exists()


def test_fp16_on_cpu_stays_fp32_unless_forced():
    model = make_mlp()
    engine = es.build(model, precision="fp16")
    assert engine.precision == "fp32"
    assert any("fp16 does not pay on the CPU" in line for line in engine.manifest.build_log)
    forced = es.build(model, precision="fp16", force_precision=True)
    assert forced.precision == "fp16"
    x = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    got, want = forced(x=x)["probs"], engine(x=x)["probs"]
    assert got.dtype == np.float32  # inputs and outputs stay fp32
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < error < 1e-2  # fp16 rounding is there, and small


def test_int8_without_data_needs_an_explicit_random_flag(digits):
    with pytest.raises(es.ValidationDataError, match="int8 needs calibration data"):
        es.build(digits["model"], precision="int8")
    with pytest.warns(RandomCalibrationWarning):
        engine = es.build(digits["model"], precision="int8", calibration_random=True, verify=False)
    assert engine.manifest.checks["calibration"]["random"] is True
    assert "random data" in engine.manifest.checks["calibration"]["warning"]


# ----------------------------------------------------------------------------- images and preprocessing


def write_digit_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"digit_{i:03d}.png"
        Image.fromarray((img[0] * 255).round().astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def test_image_folder_calibration_and_spec_round_trip(digits, tmp_path, capsys):
    folder = tmp_path / "images"
    paths = write_digit_pngs(folder, digits["x_test"][:40])
    spec = "resize=8x8;layout=NCHW;color=GRAY;scale=0.00392156862745098"
    engine_path = tmp_path / "img.engine"
    es.build(digits["model"], precision="int8", calibration_data=folder, preprocess=spec, output=engine_path)
    engine = es.load(engine_path)
    assert PreprocessSpec.from_dict(engine.manifest.preprocess) == parse_spec(spec)
    # `run --image` applies exactly the stored preprocessing.
    out = tmp_path / "out.npz"
    assert main(["run", str(engine_path), "--image", str(paths[0]), "--out", str(out)]) == 0
    manual = load_image(paths[0], parse_spec(spec))[None]
    np.testing.assert_allclose(manual, digits["x_test"][:1], atol=1 / 255)
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["logits"], engine(image=manual)["logits"])


def test_preprocessing_spec_from_toml(tmp_path):
    path = tmp_path / "pre.toml"
    path.write_text('[preprocess]\nresize = 256\ncenter_crop = [224, 224]\nlayout = "NHWC"\ncolor = "BGR"\n'
                    "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n")
    spec = parse_spec(str(path))
    assert spec.resize == 256 and spec.center_crop == (224, 224) and spec.layout == "NHWC" and spec.color == "BGR"
    from PIL import Image

    Image.new("RGB", (320, 300), (255, 0, 0)).save(tmp_path / "red.png")
    pixels = load_image(tmp_path / "red.png", spec)
    assert pixels.shape == (224, 224, 3)
    # BGR: red lands in the last channel, normalized with that channel's mean/std as given.
    np.testing.assert_allclose(pixels[0, 0], [(0 - 0.485) / 0.229, (0 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-5)


# ----------------------------------------------------------------------------- bad calibration data


def test_calibration_data_with_wrong_shape(digits, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 1, 9, 9), np.float32))
    with pytest.raises(es.ValidationDataError, match="needs 8 on axis 2"):
        es.build(digits["model"], precision="int8", calibration_data=bad)


def test_calibration_data_with_wrong_input_name(digits, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(es.ValidationDataError, match="unknown: \\['pixels'\\]"):
        es.build(digits["model"], precision="int8", calibration_data=bad)


def test_empty_calibration_folder(digits, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(es.ValidationDataError, match="no images"):
        es.build(digits["model"], precision="int8", calibration_data=tmp_path / "empty")


def test_unreadable_image(digits, tmp_path):
    folder = tmp_path / "imgs"
    write_digit_pngs(folder, digits["x_test"][:3])
    (folder / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(es.ValidationDataError, match="cannot read image .*broken.png"):
        es.build(digits["model"], precision="int8", calibration_data=folder)


def test_bad_budget_and_method(digits):
    with pytest.raises(es.ValidationDataError, match="cannot read accuracy budget"):
        es.build(digits["model"], precision="best", accuracy_budget="very accurate")
    with pytest.raises(es.BuildError, match="unknown calibration method"):
        es.build(digits["model"], precision="int8", calibration_method="magic", calibration_data=digits["train"])


def test_cli_best_prints_candidates(digits, tmp_path, capsys):
    out = tmp_path / "best.engine"
    assert main(["build", str(digits["model"]), "-o", str(out), "--backend", "onnxruntime", "--precision", "best",
                 "--calib", str(digits["train"]),
                 "--max-accuracy-drop", "1%"]) == 0
    printed = capsys.readouterr().out
    assert "precision candidates" in printed and "int8" in printed and "fp32" in printed


def test_int8_engine_that_passed_build_verification_passes_plain_validate(int8_engine, capsys):
    """Issue 14: validate without --data uses the held-out calibration data the bundle carries."""
    engine = es.load(int8_engine)
    assert engine.manifest.checks["build_verification"]["passed"] is True
    assert engine.manifest.checks["samples"]["kind"] == "calibration"
    report = es.validate(int8_engine, store=False)
    assert report.passed and not report.inconclusive
    assert report.inputs.startswith("samples stored in the bundle (held-out part of 'train.npz')")
    assert report.samples == engine.manifest.checks["calibration"]["holdout_samples"]
    assert main(["validate", str(int8_engine), "--no-store"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_onnx_runtime_shape_inference_leftovers_are_removed_from_the_working_directory(tmp_path, monkeypatch):
    """ONNX Runtime's symbolic shape inference saves a model it cannot finish as sym_shape_infer_temp.onnx plus
    external data files in the current directory; an int8 build must not leave them in the user's folder."""
    from enginesmith.backends.onnxruntime_int8 import SHAPE_INFERENCE_LEFTOVER, no_shape_inference_leftovers

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.data").write_bytes(b"the user's")
    weights = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weights])
    with no_shape_inference_leftovers():  # what ONNX Runtime does when its inference is incomplete
        onnx.save_model(helper.make_model(graph), SHAPE_INFERENCE_LEFTOVER, save_as_external_data=True,
                        location="1234-abcd.data", size_threshold=0)
        assert (tmp_path / "1234-abcd.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.data"]
