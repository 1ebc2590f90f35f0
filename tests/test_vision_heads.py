"""Detector heads, NMS, letterbox and class names: hand-made outputs with known boxes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from enginesmith.errors import InputError
from enginesmith.runtime.preprocess import PreprocessSpec, load_image, parse_spec
from enginesmith.vision.detector import DetectorSettings, select_detections
from enginesmith.vision.heads import HeadMismatchError, choose_head, yolo_cells
from enginesmith.vision.labels import check_names, names_from_metadata, read_names_file
from enginesmith.vision.nms import nms
from enginesmith.vision.transform import Placement, placement_for, to_tensor

HW = (64, 64)
IDENTITY = Placement(1.0, 1.0, 0.0, 0.0, 64, 64)


def detect(outputs: dict[str, np.ndarray], head: str | None = None, names=None, conf=0.25, iou=0.45):
    shapes = {k: v.shape for k, v in outputs.items()}
    chosen = choose_head(shapes, HW, head, values=outputs)
    found = chosen.decode(outputs, 0, HW)
    kept = select_detections(found, DetectorSettings(conf=conf, iou=iou), IDENTITY, names, chosen.first_class)
    return chosen, kept


def boxes_of(detections) -> list[tuple]:
    return [(tuple(round(v, 3) for v in d.box), round(d.score, 3), d.class_id) for d in detections]


def test_yolov8_head_decodes_centre_boxes_and_runs_class_aware_nms() -> None:
    cells = yolo_cells(HW)  # 8*8 + 4*4 + 2*2
    raw = np.zeros((1, 4 + 2, cells), np.float32)
    raw[0, :, 5] = [20, 30, 10, 20, 0.1, 0.9]  # class 1, box 15,20,25,40
    raw[0, :, 6] = [21, 30, 10, 20, 0.0, 0.8]  # same class, IoU 0.82: suppressed
    raw[0, :, 7] = [21, 30, 10, 20, 0.7, 0.0]  # other class: kept
    raw[0, :, 8] = [50, 50, 4, 4, 0.2, 0.1]  # below --conf
    head, kept = detect({"output0": raw})
    assert head.name == "yolov8" and head.classes == 2
    assert boxes_of(kept) == [((15, 20, 25, 40), 0.9, 1), ((16, 20, 26, 40), 0.7, 0)]


def test_yolov5_head_multiplies_objectness_and_is_told_from_yolox_by_anchor_count() -> None:
    raw = np.zeros((1, 3 * yolo_cells(HW), 5 + 2), np.float32)
    raw[0, 10] = [32, 32, 8, 16, 0.5, 0.2, 0.9]  # score 0.45, class 1
    raw[0, 11] = [10, 10, 4, 4, 0.2, 0.9, 0.0]  # 0.18 < 0.25
    head, kept = detect({"output": raw})
    assert head.name == "yolov5"
    assert boxes_of(kept) == [((28, 24, 36, 40), 0.45, 1)]


def test_yolox_head_decodes_grid_offsets_and_log_sizes() -> None:
    raw = np.zeros((1, yolo_cells(HW), 5 + 3), np.float32)
    # stride 8 level, row 3, column 2 -> index 3 * 8 + 2; centre ((2 + .5) * 8, (3 + .5) * 8) = (20, 28)
    raw[0, 26] = [0.5, 0.5, np.log(2), np.log(3), 0.9, 0.0, 0.0, 1.0]
    # stride 16 level starts at 64: row 1, column 2 -> 64 + 6; centre (2 * 16, 1 * 16), size 16 x 16
    raw[0, 70] = [0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.0]
    head, kept = detect({"output": raw})
    assert head.name == "yolox" and head.classes == 3
    assert boxes_of(kept) == [((12, 16, 28, 40), 0.9, 2), ((24, 8, 40, 24), 0.5, 1)]


def test_ssd_head_reads_tf_object_detection_outputs_with_in_graph_nms() -> None:
    outputs = {
        "detection_boxes": np.array([[[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.5], [0, 0, 1, 1]]], np.float32),
        "detection_scores": np.array([[0.9, 0.6, 0.99]], np.float32),
        "detection_classes": np.array([[3, 1, 2]], np.float32),
        "num_detections": np.array([2], np.float32),  # the third row is padding
    }
    head, kept = detect(outputs, names=["person", "bicycle", "car"])
    assert head.name == "ssd" and head.first_class == 1
    assert boxes_of(kept) == [((32, 16, 64, 48), 0.9, 3), ((0, 0, 32, 32), 0.6, 1)]
    assert [d.label for d in kept] == ["car", "person"]


def test_ssd_head_found_by_shapes_when_outputs_are_renamed() -> None:
    outputs = {"a": np.array([[[0.0, 0.0, 0.5, 0.5]]], np.float32), "b": np.array([[0.8]], np.float32),
               "c": np.array([[1.0]], np.float32), "d": np.array([1.0], np.float32)}
    head, kept = detect(outputs)
    assert head.outputs == ("a", "b", "c", "d")
    assert boxes_of(kept) == [((0, 0, 32, 32), 0.8, 1)]


def test_ssd_raw_head_drops_the_background_column_and_runs_nms() -> None:
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.01, 0.5, 0.51], [0.5, 0.5, 1.0, 1.0]]], np.float32)
    scores = np.array([[[0.1, 0.8, 0.0], [0.1, 0.7, 0.0], [0.95, 0.0, 0.3]]], np.float32)  # column 0: background
    head, kept = detect({"raw_detection_boxes": boxes, "raw_detection_scores": scores})
    assert head.name == "ssd-raw"
    assert boxes_of(kept) == [((0, 0, 32, 32), 0.8, 1), ((32, 32, 64, 64), 0.3, 2)]


def test_boxes_scores_head_takes_pixel_or_normalized_boxes_and_either_score_layout() -> None:
    pixel = {"boxes": np.array([[[4, 8, 20, 40], [30, 30, 60, 60]]], np.float32),
             "scores": np.array([[[0.1, 0.6, 0.0], [0.9, 0.0, 0.2]]], np.float32)}
    head, kept = detect(pixel)
    assert head.name == "boxes-scores"
    assert boxes_of(kept) == [((30, 30, 60, 60), 0.9, 0), ((4, 8, 20, 40), 0.6, 1)]
    normalized = {"boxes": pixel["boxes"] / 64, "scores": pixel["scores"].transpose(0, 2, 1).copy()}
    _, kept_again = detect(normalized)
    assert boxes_of(kept_again) == boxes_of(kept)


def test_outputs_matching_no_head_say_what_was_seen_and_how_to_name_one() -> None:
    with pytest.raises(HeadMismatchError, match=r"logits \[1, 1000\].*yolov8"):
        choose_head({"logits": (1, 1000)}, HW)
    with pytest.raises(HeadMismatchError, match="do not have the 'ssd' layout"):
        choose_head({"output0": (1, 84, 8400)}, (640, 640), "ssd")
    with pytest.raises(HeadMismatchError, match="unknown detector head 'yolo9'"):
        choose_head({"output0": (1, 84, 8400)}, (640, 640), "yolo9")


def brute_force_nms(boxes, scores, classes, iou):
    def overlap(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(classes[i] != classes[k] or overlap(boxes[i], boxes[k]) <= iou for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_a_brute_force_reference_on_random_boxes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    corners = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 60, (n, 2))], axis=1)
    scores = rng.permutation(n) / n  # distinct scores: one right order
    classes = rng.integers(0, 3, n)
    for iou in (0.3, 0.5, 0.7):
        kept = nms(boxes, scores, classes, iou, max_detections=n)
        assert kept.tolist() == brute_force_nms(boxes, scores, classes, iou)
    assert len(nms(boxes, scores, classes, 0.5, max_detections=7)) == 7


@pytest.mark.parametrize("frame_hw", [(480, 640), (640, 480), (100, 300), (64, 64)])
def test_letterbox_round_trips_boxes_and_matches_the_pixels(frame_hw: tuple[int, int]) -> None:
    spec = PreprocessSpec(resize=(320, 320), letterbox=True)
    height, width = frame_hw
    place = placement_for(height, width, spec, (320, 320))
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, [width / 2, height / 2], (20, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, [width / 2, height / 2], (20, 2))], axis=1)
    assert np.allclose(place.to_frame(place.to_input(boxes)), boxes)
    # A white patch lands in the tensor where the placement says, and the padding is 114/255.
    frame = np.zeros((height, width, 3), np.uint8)
    frame[height // 4 : height // 2, width // 4 : width // 2] = 255
    tensor, same_place = to_tensor(frame, spec, (320, 320))
    assert same_place == place and tensor.shape == (3, 320, 320)
    x1, y1, x2, y2 = place.to_input(np.array([[width / 4, height / 4, width / 2, height / 2]]))[0]
    assert tensor[0, int(y1 + 2) : int(y2 - 2), int(x1 + 2) : int(x2 - 2)].min() > 0.99
    if place.offset_y >= 1:
        assert tensor[:, 0, :].max() == pytest.approx(114 / 255)
    if place.offset_x >= 1:
        assert tensor[:, :, 0].max() == pytest.approx(114 / 255)


def test_plain_resize_and_crop_placements_map_boxes_back() -> None:
    for spec, target in ((PreprocessSpec(resize=(300, 300)), (300, 300)),
                         (PreprocessSpec(resize=256, center_crop=(224, 224)), (224, 224))):
        place = placement_for(480, 640, spec, target)
        box = np.array([[100.0, 120.0, 400.0, 360.0]])
        assert np.allclose(place.to_frame(place.to_input(box)), box)
        tensor, _ = to_tensor(np.zeros((480, 640, 3), np.uint8), spec, target)
        assert tensor.shape == (3, *target)


def test_letterbox_spec_parses_round_trips_and_loads_images_like_opencv(tmp_path) -> None:
    from PIL import Image

    spec = parse_spec("resize=320x320;letterbox=true")
    assert spec.letterbox and PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict({"resize": [224, 224]}).letterbox is False  # manifests from before letterbox
    with pytest.raises(Exception, match="letterbox needs an exact size"):
        parse_spec("resize=320;letterbox=true")
    pixels = np.random.default_rng(1).integers(0, 255, (60, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    via_pil = load_image(tmp_path / "a.png", spec)
    via_cv, _ = to_tensor(pixels[..., ::-1].copy(), spec, (320, 320))
    assert via_pil.shape == via_cv.shape
    assert np.abs(via_pil - via_cv).mean() < 0.02  # two resizers, same geometry


def test_class_names_from_files_and_ultralytics_metadata(tmp_path) -> None:
    (tmp_path / "names.txt").write_text("person\nbicycle\n\ncar\n")
    assert read_names_file(tmp_path / "names.txt") == ["person", "bicycle", "car"]
    (tmp_path / "names.json").write_text('{"0": "cat", "1": "dog"}')
    assert read_names_file(tmp_path / "names.json") == ["cat", "dog"]
    assert names_from_metadata({"names": "{0: 'person', 1: 'bicycle'}"}) == ["person", "bicycle"]
    assert names_from_metadata({"names": "__import__('os').system('true')"}) is None  # never evaluated
    with pytest.raises(InputError, match="has 2 class names but the model scores 3 classes"):
        check_names(["a", "b"], 3, 0, "class names file 'x.txt'")
