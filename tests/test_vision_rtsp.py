"""RTSP sources for real: FFmpeg inside OpenCV pulls MJPEG or H.264 over RTP from an RTSP camera on 127.0.0.1
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
# H.264 streams of 30 frames (tests/data/make_rtsp_h264.py): flat greys of level(i), and SCENE's rectangles
DATA = Path(__file__).parent / "data"
GREY_H264, SCENE_H264 = DATA / "rtsp_grey_320x240.h264", DATA / "rtsp_scene_320x240.h264"


def decoded_here(stream: Path) -> list[np.ndarray]:
    """The stream's frames as OpenCV decodes the file itself: what a camera sending it must deliver."""
    capture = cv2.VideoCapture(str(stream))
    frames = []
    while True:
        ok, pixels = capture.read()
        if not ok:
            return frames
        frames.append(pixels)


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


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_an_h264_rtsp_camera_gives_the_frames_of_its_stream(camera_factory, monkeypatch, udp) -> None:
    """Most IP cameras send H.264: parameter sets in the SDP, frames larger than a packet in FU-A fragments."""
    if udp:
        monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;udp")
    camera = camera_factory(frames_per_session=30, udp=udp, h264=GREY_H264.read_bytes())
    source = open_source(camera.url, vision.CaptureSettings(reconnect=0))
    frames = list(source.frames())
    source.close()
    expected = decoded_here(GREY_H264)
    assert len(expected) == 30 and len(frames) == 30 and camera.setups == ["udp" if udp else "tcp"]
    for frame, pixels in zip(frames, expected):  # the same decoder on the same bits: the same pixels
        assert frame.pixels.shape == (240, 320, 3) and np.array_equal(frame.pixels, pixels)
    assert source.reduced == 0 and source.corrupt == 0


@pytest.mark.parametrize("codec", ["mjpeg", "h264"])
def test_detect_on_an_rtsp_camera_finds_the_boxes_of_the_frames_it_was_sent(colour_engine, camera_factory, tmp_path,
                                                                            codec) -> None:
    scene = parse_synthetic(SCENE)
    if codec == "h264":  # the scene's rectangles on a flat background, frames 0-29 and again
        camera = camera_factory(h264=SCENE_H264.read_bytes())
    else:
        camera = camera_factory(render=lambda index: scene.render(index)[0])
    out, summary = tmp_path / "boxes.jsonl", tmp_path / "summary.json"
    assert main(["detect", str(colour_engine), "--source", camera.url, "--conf", "0.5", "--max-frames", "20",
                 "--jsonl", str(out), "--summary", str(summary), "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 20 and all(r["source"] == camera.url for r in records)
    found = 0
    for record in records:
        assert (record["height"], record["width"]) == (240, 320)
        # frames come in order from 0 (a live source may drop some when detection falls behind, counted in the
        # index): the index names the frame sent
        index = record["source_frame"]
        truth = scene.truth(index % 30 if codec == "h264" else index)
        for d in record["detections"]:
            assert any(overlaps(d["box"], t) and t[4] == d["class"] for t in truth), (d, truth)
        for t in truth:
            if (t[2] - t[0]) >= 40 and (t[3] - t[1]) >= 40:
                assert any(overlaps(d["box"], t) and d["class"] == t[4] for d in record["detections"]), (t, record)
                found += 1
    assert found > 0
    stats = json.loads(summary.read_text())
    assert stats["frames"] == 20 and stats["sources"][0]["reconnects"] == 0
    # MJPEG: the stream's JPEG packets were decoded here at half size (the 160-pixel model shrinks 320x240 frames
    # anyway); H.264: FFmpeg decodes every frame whole
    reduced = stats["sources"][0]["reduced"]  # counted as decoded: the source reads ahead of the 20 frames taken
    assert reduced == 0 if codec == "h264" else reduced >= 20


@pytest.mark.parametrize("codec", ["mjpeg", "h264"])
def test_an_rtsp_stream_that_drops_is_set_up_again_and_counted(colour_engine, camera_factory, codec) -> None:
    camera = camera_factory(frames_per_session=12, h264=GREY_H264.read_bytes() if codec == "h264" else None)
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
