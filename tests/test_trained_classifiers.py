"""The data and file plumbing of benchmarks/trained_classifiers.py (the training itself needs a GPU).

precision.py --trained measures int8 agreement on models trained elsewhere; these check that the
scenes it calibrates and measures on are the ones the models were trained for, reproducibly, and
that the packing which gets the models back from the GPU machine loses nothing but fp16 rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from enginesmith import samples

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import trained_classifiers as tc  # noqa: E402  (a benchmark script)


def test_scenes_are_reproducible_normalized_and_show_the_digit():
    digits, _ = tc.split("train")
    first = tc.render(digits[:6], seed=3)
    assert first.shape == (6, 3, tc.IMAGE_SIZE, tc.IMAGE_SIZE) and first.dtype == np.float32
    np.testing.assert_array_equal(first, tc.render(digits[:6], seed=3))
    assert not np.allclose(first, tc.render(digits[:6], seed=4))
    pixels = first * tc.STD + tc.MEAN
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # The digit is drawn in a colour that stands out: a blank digit gives a different, flatter scene.
    blank = tc.render(np.zeros_like(digits[:6]), seed=3)
    assert np.abs(first - blank).max(axis=(1, 2, 3)).min() > 1.0


def test_held_out_and_calibration_sets_never_touch_each_other():
    train, _ = tc.split("train")
    test, test_labels = tc.split("test")
    assert len(train) == tc.TRAIN_DIGITS and len(train) + len(test) == 1797
    scenes, labels = tc.held_out_set(20)
    np.testing.assert_array_equal(labels, test_labels[:20])
    np.testing.assert_array_equal(scenes, tc.held_out_set(20)[0])
    assert tc.calibration_set(8).shape == (8, 3, tc.IMAGE_SIZE, tc.IMAGE_SIZE)


def test_parallel_rendering_matches_rendering_in_one_process():
    digits, _ = tc.split("train")
    one = tc.Renderer(workers=1, chunks=3)
    many = tc.Renderer(workers=2, chunks=3)
    try:
        one.submit(digits[:9], seed=5)
        many.submit(digits[:9], seed=5)
        np.testing.assert_array_equal(one.next(), many.next())
    finally:
        one.close()
        many.close()


def test_pack_and_unpack_round_trip_an_onnx_model_in_chunks(tmp_path, monkeypatch):
    model_path = tmp_path / "full.onnx"
    onnx.save(samples.small_cnn(), model_path)
    monkeypatch.setattr(tc, "CHUNK_BYTES", 1024)
    parts = tc.pack(model_path, tmp_path, "mobilenet_v2_trained")
    assert len(parts) > 1 and all(p.stat().st_size <= 1024 for p in parts)
    assert tc.unpack(tmp_path) == [tmp_path / "mobilenet_v2_trained.onnx"]
    assert tc.trained_models(tmp_path) == {"mobilenet_v2_trained": tmp_path / "mobilenet_v2_trained.onnx"}

    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(model_path)).run(None, {"image": x})[0]
    got = ort.InferenceSession(str(tmp_path / "mobilenet_v2_trained.onnx")).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, atol=2e-3)  # fp16-rounded weights, nothing else


def test_unpack_without_weight_chunks_says_what_is_missing(tmp_path):
    model_path = tmp_path / "full.onnx"
    onnx.save(samples.small_cnn(), model_path)
    tc.pack(model_path, tmp_path, "resnet50_trained")
    for part in tmp_path.glob("resnet50_trained.weights.*"):
        part.unlink()
    with pytest.raises(SystemExit, match="no resnet50_trained.weights.NN"):
        tc.unpack(tmp_path)


def test_unpack_refuses_a_chunk_whose_checksum_differs_from_the_training_record(tmp_path):
    import json

    model_path = tmp_path / "full.onnx"
    onnx.save(samples.small_cnn(), model_path)
    parts = tc.pack(model_path, tmp_path, "resnet50_trained")
    record = {"models": {"resnet50_trained": {"files": {p.name: tc._sha256(p) for p in parts}}}}
    (tmp_path / "training.json").write_text(json.dumps(record))
    assert tc.unpack(tmp_path) == [tmp_path / "resnet50_trained.onnx"]
    parts[0].write_bytes(parts[0].read_bytes()[:-10])
    with pytest.raises(SystemExit, match="checksum differs"):
        tc.unpack(tmp_path)

