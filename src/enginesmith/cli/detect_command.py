"""detect, eval: live detection from cameras, videos, streams and files; COCO mAP of a detector engine."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from .. import api
from ..errors import InputError
from ..files import write_atomic
from .app import add_columns, app, console, err_console, table
from .output_paths import FORCE_HELP, check_output

HEAD_HELP = "Detector head: ssd, ssd-raw, yolov8, yolov5, yolox or boxes-scores (default: told from the outputs)."
NAMES_HELP = "Class names: a file with one per line (or JSON) (default: the model's 'names' metadata)."


def _parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        dims = [int(v) for v in text.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or any(d < 16 for d in dims):
        raise typer.BadParameter(f"'{text}' is not a size such as 640 or 480x640 (at least 16)", param_hint="--size")
    return (dims[0], dims[-1])


def _detector(engine_path: Path, trust_code: bool, head: Optional[str], names: Optional[Path], conf: float, iou: float,
              size: Optional[str], infer=None):
    from ..vision import Detector, DetectorSettings, HeadMismatchError

    engine = api.load(engine_path, trust_code=trust_code)
    settings = DetectorSettings(head=head, names=names, conf=conf, iou=iou, size=_parse_size(size))
    try:
        return Detector(engine, settings, infer=infer)
    except HeadMismatchError as exc:
        raise HeadMismatchError(f"{exc} (--head NAME)") from None


def _status_text(summary) -> Text:
    stages = summary.to_dict()["stages"]
    ms = lambda name: stages[name]["mean_ms"]  # noqa: E731
    return Text(
        f"{summary.frames} frames  {summary.fps:.1f} fps  capture {ms('capture'):.1f} ms  preprocess "
        f"{ms('preprocess'):.1f} ms  inference {ms('inference'):.1f} ms  postprocess {ms('postprocess'):.1f} ms  "
        f"end-to-end {ms('end_to_end'):.1f} ms  dropped {sum(s.dropped for s in summary.sources)}"
    )


@contextmanager
def _status_line(enabled: bool) -> Iterator:
    """A one-line live status on stderr when it is a terminal; nothing in a pipe."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    with Live(Text("starting"), console=err_console, transient=True, refresh_per_second=4) as live:
        yield lambda summary: live.update(_status_text(summary))


def _print_summary(summary) -> None:
    data = summary.to_dict()
    tbl = table(title=f"{summary.frames} frames in {summary.seconds:.2f} s: {summary.fps:.1f} fps end to end"
                + (f", engine alone {data['engine_fps']:.1f} fps" if data["engine_fps"] else ""))
    add_columns(tbl, "stage", "mean ms", "p50 ms", "p95 ms", right=("mean ms", "p50 ms", "p95 ms"))
    for name, stats in data["stages"].items():
        if stats["mean_ms"] is not None:
            tbl.add_row(name.replace("_", "-"), f"{stats['mean_ms']:.2f}", f"{stats['p50_ms']:.2f}", f"{stats['p95_ms']:.2f}")
    err_console.print(tbl)
    for source in summary.sources:
        line = f"{source.name}: {source.processed} frames"
        if source.dropped:
            line += f", {source.dropped} dropped (the pipeline fell behind the live source)"
        if source.corrupt:
            line += f", {source.corrupt} unreadable frames skipped"
        if source.reconnects:
            line += f", reconnected {source.reconnects} time(s) after it stopped delivering"
        if source.lost:
            line += ", then lost: it stopped delivering and could not be opened again (see --reconnect)"
        if source.reduced:
            line += f", {source.reduced} decoded at a reduced size (see --full-decode)"
        err_console.print(escape(line), highlight=False)
    if summary.interrupted:
        err_console.print("interrupted: the summary covers the frames processed until then")


@app.command(short_help="Detect objects in camera, video, stream or image frames.")
def detect(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Detector engine (.engine)."),
    source: list[str] = typer.Option(..., "--source", "-s", metavar="SRC", help="Image, folder, glob, video, camera (0 or /dev/video0), rtsp:// or http:// stream, GStreamer pipeline, or synthetic[:frames=100,fps=30,live=1,...]; repeat for several cameras (batched into one engine call)."),
    head: Optional[str] = typer.Option(None, "--head", metavar="NAME", help=HEAD_HELP),
    names: Optional[Path] = typer.Option(None, "--names", metavar="FILE", help=NAMES_HELP),
    conf: float = typer.Option(0.25, "--conf", min=0.0, max=1.0, metavar="SCORE", help="Lowest score kept."),
    iou: float = typer.Option(0.45, "--iou", min=0.0, max=1.0, metavar="IOU", help="NMS: a box overlapping a better one of its class by more is dropped."),
    size: Optional[str] = typer.Option(None, "--size", metavar="HxW", help="Input size for engines with dynamic image dims (default: the preprocessing spec, else 640)."),
    width: Optional[int] = typer.Option(None, "--width", min=1, metavar="PX", help="Camera frame width to ask for."),
    height: Optional[int] = typer.Option(None, "--height", min=1, metavar="PX", help="Camera frame height to ask for."),
    fps: Optional[float] = typer.Option(None, "--fps", min=0.1, metavar="N", help="Camera frame rate to ask for (also the --save video's rate)."),
    reconnect: int = typer.Option(5, "--reconnect", min=0, metavar="N", help="A camera or stream that stops delivering is opened again up to N times in a row, waiting 0.5 s, then twice as long each time (0: its end ends the source)."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", metavar="FILE", help="Write JSON Lines here ('-': stdout, the default when no other output is chosen)."),
    udp: Optional[str] = typer.Option(None, "--udp", metavar="HOST:PORT", help="Send each frame as ROS 2 Detection2DArray-shaped JSON over UDP (never blocks)."),
    zmq: Optional[str] = typer.Option(None, "--zmq", metavar="ENDPOINT", help="Publish the same on a ZeroMQ PUB socket, e.g. tcp://*:5556 (needs pyzmq)."),
    save: Optional[Path] = typer.Option(None, "--save", metavar="DIR|FILE", help="Annotated frames: a folder of JPEGs, or a .mp4/.avi/.mkv video."),
    show: bool = typer.Option(False, "--show", help="Show annotated frames in a window (q or Esc ends)."),
    full_decode: bool = typer.Option(False, "--full-decode", help="Decode JPEG files and MJPEG videos or streams at full size even when the model shrinks them by 2x or more (by default they are decoded at 1/2, 1/4 or 1/8, faster; --save and --show always decode at full size)."),
    summary_path: Optional[Path] = typer.Option(None, "--summary", metavar="FILE", help="Write per-stage latency, FPS and drop counts as JSON (also after Ctrl-C)."),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, metavar="N", help="Stop after N frames."),
    quiet: bool = typer.Option(False, "--quiet", help="No status line or summary on stderr."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow engines whose payload runs code when loaded."),
) -> int:
    """Run a detector engine over frames and write boxes as they come, within a frame budget.

    Capture, preprocessing, inference and post-processing run at the same time; live sources
    drop their oldest frame when the pipeline falls behind (counted), files never drop.
    """
    from ..vision import CaptureSettings, open_source, run_pipeline
    from ..vision.sinks import JsonLines, UdpSender, Window, ZmqPublisher, save_sink, stdout_lines

    inputs = [engine_path, names, *(Path(s) for s in source)]
    to_stdout = jsonl is not None and str(jsonl) == "-"
    jsonl_file = None if jsonl is None or to_stdout else check_output(jsonl, inputs=inputs, force=force, flag="--jsonl")
    check_output(summary_path, inputs=inputs, force=force, flag="--summary")
    if save is not None and not save.suffix:
        if save.is_dir() and any(save.iterdir()) and not force:
            raise InputError(f"--save folder '{save}' is not empty; give another folder, or add --force")
    elif save is not None:
        check_output(save, inputs=inputs, force=force, flag="--save")
    detector = _detector(engine_path, trust_code, head, names, conf, iou, size)
    note = detector.batching_note(len(source))
    if note and not quiet:
        typer.echo(f"note: {note}", err=True)
    settings = CaptureSettings(width, height, fps, reconnect=reconnect)
    with ExitStack() as stack:
        sources = []
        for text in source:
            opened = open_source(text, settings, None if full_decode or save is not None or show else detector.decode_reduction)
            stack.callback(opened.close)
            sources.append(opened)
        sinks = []
        if jsonl_file is not None:
            sinks.append(JsonLines(jsonl_file))
        if to_stdout or (jsonl is None and not (udp or zmq or save or show)):
            sinks.append(stdout_lines())
        if udp:
            sinks.append(UdpSender(udp))
        if zmq:
            sinks.append(ZmqPublisher(zmq))
        if save is not None:
            sinks.append(save_sink(save, fps or 30.0))
        if show:
            sinks.append(Window())

        def deliver(frame, result) -> None:
            for sink in sinks:
                sink.write(frame, result)

        try:
            with _status_line(not quiet) as on_status:
                summary = run_pipeline(detector, sources, deliver, max_frames=max_frames, on_status=on_status)
        except BaseException:
            for sink in sinks:
                getattr(sink, "abort", sink.close)()
            raise
        for sink in sinks:
            sink.close()
    report = summary.to_dict()
    report["sockets"] = {type(s).__name__: {"sent": s.sent, "dropped": s.dropped} for s in sinks if hasattr(s, "sent")}
    if summary_path is not None:
        write_atomic(summary_path, json.dumps(report, indent=2).encode())
    if not quiet:
        _print_summary(summary)
        for path in (jsonl_file, save, summary_path):
            if path is not None:
                err_console.print(f"wrote {escape(str(path))}", highlight=False)
    return 130 if summary.interrupted else 0


@app.command("eval", short_help="COCO mAP of a detector engine, optionally against its source model.")
def eval_command(
    engine_path: Path = typer.Argument(..., metavar="ENGINE", help="Detector engine (.engine)."),
    coco: Path = typer.Option(..., "--coco", metavar="FILE", help="COCO instances JSON (annotations)."),
    images: Path = typer.Option(..., "--images", metavar="DIR", help="Folder with the annotated images."),
    against: Optional[Path] = typer.Option(None, "--against", metavar="SOURCE", help="Also score the source model (run by its own framework) on the same images."),
    head: Optional[str] = typer.Option(None, "--head", metavar="NAME", help=HEAD_HELP),
    names: Optional[Path] = typer.Option(None, "--names", metavar="FILE", help=NAMES_HELP),
    conf: float = typer.Option(0.001, "--conf", min=0.0, max=1.0, metavar="SCORE", help="Lowest score kept (mAP wants low)."),
    iou: float = typer.Option(0.6, "--iou", min=0.0, max=1.0, metavar="IOU", help="NMS IoU threshold."),
    size: Optional[str] = typer.Option(None, "--size", metavar="HxW", help="Input size for engines with dynamic image dims."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, metavar="N", help="Score only the first N images."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the scores as JSON ('-': stdout)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow sources and engines that run code when loaded."),
) -> None:
    """Score a detector engine with COCO mAP@[.5:.95] and mAP@.5 (pycocotools)."""
    from ..importers import ImportOptions, reference_runner
    from ..vision.evaluate import evaluate

    check_output(json_path, inputs=[engine_path, coco, against], force=force, flag="--json")
    rows = [("engine", engine_path, evaluate(_detector(engine_path, trust_code, head, names, conf, iou, size), coco, images, limit))]
    if against is not None:
        if not against.exists():
            raise InputError(f"source model '{against}' not found (--against)")
        runner = reference_runner(against, ImportOptions(trust_code=trust_code))
        source_detector = _detector(engine_path, trust_code, head, names, conf, iou, size, infer=runner)
        rows.append(("source", against, evaluate(source_detector, coco, images, limit)))
    tbl = table(title=f"COCO box mAP on {rows[0][2].images} images")
    add_columns(tbl, "model", "mAP@[.5:.95]", "mAP@.5", "detections", right=("mAP@[.5:.95]", "mAP@.5", "detections"))
    for role, path, scores in rows:
        tbl.add_row(f"{path.name} ({role})", f"{scores.map:.4f}", f"{scores.map50:.4f}", str(scores.detections))
    if json_path is None or str(json_path) != "-":
        console.print(tbl)
        if len(rows) == 2:
            drop = rows[1][2].map - rows[0][2].map
            console.print(f"the engine's mAP@[.5:.95] is {abs(drop):.4f} {'below' if drop > 0 else 'above'} the source's",
                          highlight=False)
    if json_path is not None:
        from .app import print_json

        print_json(json.dumps({role: s.to_dict() for role, _, s in rows}, indent=2), json_path)
