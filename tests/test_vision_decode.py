"""JPEG files decoded at a reduced size for detection: header sizes, EXIF rotation, boxes back at full size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

import enginesmith as es
from enginesmith import vision
from enginesmith.cli.app import main
from enginesmith.vision.decode import jpeg_size, read_image
from enginesmith.vision.sources import SyntheticScene, VideoCapture, open_source

from vision_models import build_colour_engine

NAMES = ["red", "green", "blue"]


def jpeg(pixels: np.ndarray, **flags: int) -> bytes:
    ok, data = cv2.imencode(".jpg", pixels, [v for pair in flags.items() for v in (getattr(cv2, pair[0]), pair[1])])
    assert ok
    return data.tobytes()


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment (little-endian TIFF, one IFD entry: Orientation) after its SOI."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:]


def test_jpeg_size_reads_the_frame_header_of_baseline_and_progressive_files_and_refuses_the_rest(tmp_path) -> None:
    picture = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
    assert jpeg_size(jpeg(picture)) == (37, 53)
    assert jpeg_size(jpeg(picture, IMWRITE_JPEG_PROGRESSIVE=1)) == (37, 53)
    assert jpeg_size(with_exif_orientation(jpeg(picture), 6)) == (37, 53)  # stored size, before rotation
    assert jpeg_size(np.frombuffer(jpeg(picture), np.uint8)) == (37, 53)
    ok, png = cv2.imencode(".png", picture)
    for not_sized in (png.tobytes(), b"", b"\xff\xd8", jpeg(picture)[:20], b"\xff\xd8\xff\xda\x00\x02", b"GIF89a"):
        assert jpeg_size(not_sized) is None


def test_a_jpeg_is_decoded_at_the_reduction_asked_and_says_its_full_size(tmp_path) -> None:
    picture = np.zeros((481, 643, 3), np.uint8)  # sizes that 4 does not divide
    picture[100:200, 300:500] = (0, 0, 255)
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(picture, IMWRITE_JPEG_QUALITY=95))
    pixels, k, full = read_image(path, lambda h, w: 4)
    assert k == 4 and full == (481, 643) and pixels.shape == (121, 161, 3)
    # the red patch sits where the full-size one is, divided by k
    red = np.argwhere((pixels[..., 2] > 128) & (pixels[..., 0] < 100))
    assert abs(red[:, 0].min() * 4 - 100) <= 4 and abs(red[:, 1].max() * 4 - 500) <= 4
    assert read_image(path, lambda h, w: 1)[1:] == (1, None)
    assert read_image(path)[0].shape == (481, 643, 3)
    # EXIF orientation 6 (90 degrees): OpenCV turns the picture; the full size turns with it
    turned = tmp_path / "turned.jpg"
    turned.write_bytes(with_exif_orientation(jpeg(picture), 6))
    pixels, k, full = read_image(turned, lambda h, w: 2)
    assert k == 2 and full == (643, 481) and pixels.shape == (322, 241, 3)
    # not a JPEG, or unreadable: full size, or None
    png = tmp_path / "b.png"
    cv2.imwrite(str(png), picture)
    assert read_image(png, lambda h, w: 4)[1:] == (1, None)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert read_image(tmp_path / "broken.jpg", lambda h, w: 4)[0] is None
    assert read_image(tmp_path / "missing.jpg", lambda h, w: 4)[0] is None


@pytest.fixture(scope="module")
def colour_engine(tmp_path_factory) -> Path:
    return build_colour_engine(tmp_path_factory.mktemp("colour"), NAMES)


def test_the_reduction_is_the_largest_that_the_model_input_still_shrinks(colour_engine) -> None:
    detector = vision.Detector(es.load(colour_engine))  # a 160x160 letterboxed input
    assert [detector.decode_reduction(h, w) for h, w in [(480, 640), (240, 320), (200, 150), (3000, 4000), (160, 160)]] \
        == [4, 2, 1, 8, 1]


def write_video(path: Path, pictures: list[np.ndarray], fourcc: str = "MJPG") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, pictures[0].shape[1::-1])
    for picture in pictures:
        writer.write(picture)
    writer.release()
    return path


def ffmpeg_frames(path: Path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(path)), []
    while (got := capture.read())[0]:
        frames.append(got[1])
    capture.release()
    return frames


def test_mjpeg_video_frames_are_its_jpeg_packets_decoded_here_at_full_or_reduced_size(tmp_path) -> None:
    scene = SyntheticScene(width=640, height=480, frames=5, seed=2)
    video = write_video(tmp_path / "v.avi", [scene.render(i)[0] for i in range(5)])
    source = open_source(str(video))
    assert isinstance(source, VideoCapture) and source._packets  # noqa: SLF001 - which path reads it
    ours = [frame.pixels for frame in source.frames()]
    theirs = ffmpeg_frames(video)
    assert len(ours) == len(theirs) == 5
    for i, (a, b) in enumerate(zip(ours, theirs)):
        # Two JPEG decoders (libjpeg-turbo; FFmpeg's, then its YUV -> BGR conversion) differ in their rounding by
        # far less than the codec's own loss on this noisy scene (about 12 levels), and neither is further from it.
        assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 3
        picture = scene.render(i)[0].astype(int)
        assert abs(np.abs(a - picture).mean() - np.abs(b - picture).mean()) < 0.5
    reduced = open_source(str(video), reduction=lambda h, w: 2)
    frames = list(reduced.frames())
    assert [f.index for f in frames] == list(range(5)) and reduced.reduced == 5
    assert {(f.pixels.shape, f.reduction, f.full_size) for f in frames} == {((240, 320, 3), 2, (480, 640))}
    # other codecs are decoded by FFmpeg as before
    mp4 = open_source(str(write_video(tmp_path / "v.mp4", [scene.render(i)[0] for i in range(3)], "mp4v")), reduction=lambda h, w: 2)
    assert not mp4._packets and [f.pixels.shape for f in mp4.frames()] == [(480, 640, 3)] * 3  # noqa: SLF001


def test_an_mjpeg_video_whose_first_packet_does_not_decode_is_left_to_ffmpeg(tmp_path) -> None:
    video = write_video(tmp_path / "v.avi", [np.full((64, 96, 3), i * 20, np.uint8) for i in range(6)])
    data = bytearray(video.read_bytes())
    first = data.index(b"\xff\xd8")
    data[first : first + 200] = bytes(200)  # frame 0 loses its JPEG header
    (tmp_path / "broken.avi").write_bytes(bytes(data))
    source = open_source(str(tmp_path / "broken.avi"))
    assert not source._packets  # noqa: SLF001
    frames = list(source.frames())
    assert [f.index for f in frames] == [1, 2, 3, 4, 5] and source.corrupt == 1


@pytest.mark.parametrize("kind", ["jpeg folder", "mjpeg video"])
def test_detect_on_frames_decoded_reduced_finds_the_boxes_full_decoding_finds_in_full_size_pixels(colour_engine, tmp_path, kind) -> None:
    scene = SyntheticScene(width=640, height=480, frames=6, objects=3, seed=7)
    if kind == "jpeg folder":
        media = tmp_path / "frames"
        media.mkdir()
        for i in range(scene.frames):
            (media / f"{i:02d}.jpg").write_bytes(jpeg(scene.render(i)[0], IMWRITE_JPEG_QUALITY=95))
    else:
        media = write_video(tmp_path / "scene.avi", [scene.render(i)[0] for i in range(scene.frames)])
    runs = {}
    for label, extra in (("reduced", []), ("full", ["--full-decode"])):
        out, summary = tmp_path / f"{label}.jsonl", tmp_path / f"{label}.json"
        assert main(["detect", str(colour_engine), "--source", str(media), "--conf", "0.5", "--jsonl", str(out),
                     "--summary", str(summary), "--quiet", *extra]) == 0
        runs[label] = [json.loads(line) for line in out.read_text().splitlines()]
        reduced = json.loads(summary.read_text())["sources"][0]["reduced"]
        assert reduced == (scene.frames if label == "reduced" else 0)
    matched = 0
    for fast, full in zip(runs["reduced"], runs["full"]):
        assert (fast["height"], fast["width"]) == (full["height"], full["width"]) == (480, 640)
        truth = scene.truth(fast["source_frame"])
        for d in fast["detections"]:  # in full-size pixels, on a rectangle of its own colour
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
            assert any(iou(d["box"], t[:4]) > 0 and t[4] == d["class"] for t in truth), (d, truth)
        # the confident detections of either run are the other's (this model's boxes are grid cells)
        for one, other in ((fast, full), (full, fast)):
            for d in one["detections"]:
                if d["score"] >= 0.9:
                    assert any(e["class"] == d["class"] and iou(e["box"], d["box"]) > 0.85 for e in other["detections"]), d
                    matched += 1
    assert matched >= 20
    assert max(d["box"][2] for r in runs["reduced"] for d in r["detections"]) > 320  # not the reduced pictures' pixels


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_save_decodes_at_full_size(colour_engine, tmp_path) -> None:
    """Annotated pictures are drawn on the frames, so --save (and --show) keep them whole."""
    scene = SyntheticScene(width=640, height=480, frames=2, seed=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(jpeg(scene.render(i)[0]))
    summary = tmp_path / "s.json"
    assert main(["detect", str(colour_engine), "--source", str(folder), "--save", str(tmp_path / "saved"),
                 "--summary", str(summary), "--quiet"]) == 0
    assert json.loads(summary.read_text())["sources"][0]["reduced"] == 0
    assert cv2.imread(str(next((tmp_path / "saved").iterdir()))).shape == (480, 640, 3)


def test_a_multipart_mjpeg_http_stream_like_an_ip_cameras_is_read_as_packets_at_reduced_size() -> None:
    """IP cameras serve MJPEG as multipart/x-mixed-replace over HTTP; FFmpeg demuxes it, the JPEGs are decoded here."""
    import http.server
    import threading
    import time

    pictures = [jpeg(np.full((240, 320, 3), i * 20, np.uint8)) for i in range(10)]

    class Camera(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for picture in pictures:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(picture)
                                 + picture + b"\r\n")
                time.sleep(0.005)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Camera)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = open_source(f"http://127.0.0.1:{server.server_address[1]}/video.mjpg", vision.CaptureSettings(reconnect=0),
                             reduction=lambda h, w: 2)
        assert source.live and source._packets  # noqa: SLF001
        frames = list(source.frames())
    finally:
        server.shutdown()
        server.server_close()
    assert [f.index for f in frames] == list(range(10)) and source.reduced == 10
    assert {(f.pixels.shape, f.full_size) for f in frames} == {((120, 160, 3), (240, 320))}
    assert [round(float(f.pixels.mean())) for f in frames] == [i * 20 for i in range(10)]  # in order, none lost
