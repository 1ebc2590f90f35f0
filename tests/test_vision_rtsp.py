"""RTSP sources for real: FFmpeg inside OpenCV pulls MJPEG over RTP from an RTSP camera on 127.0.0.1
(tests/rtsp_server.py: OPTIONS, DESCRIBE, SETUP over TCP interleaved or UDP, PLAY)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

import enginesmith as es  # noqa: E402
from enginesmith import vision  # noqa: E402
from enginesmith.cli.app import main  # noqa: E402
from enginesmith.vision.sources import open_source, parse_synthetic  # noqa: E402

from rtsp_server import RtspCamera, level  # noqa: E402
from vision_models import build_colour_engine  # noqa: E402

NAMES = ["red", "green", "blue"]
SCENE = "synthetic:frames=1000,width=320,height=240,objects=3,seed=3"


@pytest.fixture(scope="module")
def colour_engine(tmp_path_factory) -> Path:
    return build_colour_engine(tmp_path_factory.mktemp("colour"), NAMES)


@pytest.fixture
def camera_factory():
    cameras: list[RtspCamera] = []

    def make(**options) -> RtspCamera:
        cameras.append(RtspCamera(**options))
        return cameras[-1]

    yield make
    for camera in cameras:
        camera.stop()


def overlaps(box, truth) -> bool:
    return min(box[2], truth[2]) > max(box[0], truth[0]) and min(box[3], truth[3]) > max(box[1], truth[1])


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_an_rtsp_camera_gives_every_frame_in_order_at_its_size(camera_factory, monkeypatch, udp) -> None:
    # OpenCV asks FFmpeg for RTSP over TCP unless told otherwise, as here (the option README gives users)
    if udp:
        monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;udp")
    camera = camera_factory(frames_per_session=30, udp=udp)
    source = open_source(camera.url, vision.CaptureSettings(reconnect=0))
    assert source.live
    frames = list(source.frames())
    source.close()
    assert len(frames) == 30 and camera.setups == ["udp" if udp else "tcp"]
    assert all(frame.pixels.shape == (240, 320, 3) for frame in frames)
    # each frame is the camera's frame of that index: a flat grey of its own level, through JPEG
    assert [round(float(frame.pixels.mean())) for frame in frames] == [level(i) for i in range(30)]
    assert source.reconnects == 0 and not source.lost  # told not to reconnect: the stream's end is the end


def test_detect_on_an_rtsp_camera_finds_the_boxes_of_the_frames_it_was_sent(colour_engine, camera_factory, tmp_path) -> None:
    scene = parse_synthetic(SCENE)
    camera = camera_factory(render=lambda index: scene.render(index)[0])
    out, summary = tmp_path / "boxes.jsonl", tmp_path / "summary.json"
    assert main(["detect", str(colour_engine), "--source", camera.url, "--conf", "0.5", "--max-frames", "20",
                 "--jsonl", str(out), "--summary", str(summary), "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 20 and all(r["source"] == camera.url for r in records)
    found = 0
    for record in records:
        assert (record["height"], record["width"]) == (240, 320)
        truth = scene.truth(record["source_frame"])  # frames come in order from 0: the index names the frame sent
        for d in record["detections"]:
            assert any(overlaps(d["box"], t) and t[4] == d["class"] for t in truth), (d, truth)
        for t in truth:
            if (t[2] - t[0]) >= 40 and (t[3] - t[1]) >= 40:
                assert any(overlaps(d["box"], t) and d["class"] == t[4] for d in record["detections"]), (t, record)
                found += 1
    assert found > 0
    stats = json.loads(summary.read_text())
    assert stats["frames"] == 20 and stats["sources"][0]["reconnects"] == 0
    # the stream's JPEG packets were decoded here at half size (the 160-pixel model shrinks 320x240 frames anyway)
    assert stats["sources"][0]["reduced"] >= 20


def test_an_rtsp_stream_that_drops_is_set_up_again_and_counted(colour_engine, camera_factory) -> None:
    camera = camera_factory(frames_per_session=12)
    detector = vision.Detector(es.load(colour_engine), vision.DetectorSettings(conf=0.5))
    source = open_source(camera.url, vision.CaptureSettings(reconnect=2, reconnect_delay_s=0.01))
    summary = vision.run_pipeline(detector, [source], lambda frame, result: None, max_frames=30)
    counts = summary.sources[0]
    # 30 frames take three sessions of 12: the stream is set up again after each drop
    assert summary.frames == 30 and counts.reconnects >= 2 and len(camera.setups) >= 3 and not counts.lost


def test_an_rtsp_camera_that_is_gone_ends_as_lost_after_its_attempts(camera_factory) -> None:
    camera = camera_factory(frames_per_session=5)
    source = open_source(camera.url, vision.CaptureSettings(reconnect=2, reconnect_delay_s=0.01))
    frames = source.frames()
    first = [next(frames) for _ in range(5)]
    camera.stop()  # the camera is switched off: nothing answers at its address any more
    assert next(frames, None) is None
    assert len(first) == 5 and source.reconnects == 0 and source.lost
    assert np.array_equal([round(float(f.pixels.mean())) for f in first], [level(i) for i in range(5)])


def test_a_camera_that_refuses_the_transport_asked_for_is_one_clear_error(colour_engine, camera_factory, monkeypatch,
                                                                         capsys) -> None:
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;udp")  # UDP only, which this camera refuses (461)
    camera = camera_factory(udp=False)
    assert main(["detect", str(colour_engine), "--source", camera.url, "--max-frames", "5", "--quiet"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot open source '{camera.url}'" in message and "did not answer" in message
    assert camera.setups == []  # no session was set up
