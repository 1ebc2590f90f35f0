"""A small RTSP camera for tests: MJPEG over RTP (RFC 2435) or H.264 over RTP (RFC 6184), interleaved on the
RTSP connection (RFC 2326) or as UDP datagrams.

Real RTSP clients (here FFmpeg inside OpenCV) talk to it as to an IP camera: OPTIONS, DESCRIBE (an SDP
with one video track: JPEG, payload type 26, or H.264, payload type 96 with its parameter sets), SETUP,
PLAY, then RTP packets framed as ``$ channel length`` on the same TCP connection (OpenCV asks FFmpeg for
TCP by default). H.264 comes from an Annex B stream given as bytes (tests/data/*.h264: no H.264 encoder
is installed for the tests), sent access unit by access unit, NAL units larger than a packet as FU-A
fragments, from its first frame (an IDR) at the start of every session and again after its last.

With ``udp=True`` a SETUP may ask for UDP instead, and the packets go as datagrams to the client's RTP port;
with ``udp=False`` such a SETUP is answered 461 (Unsupported Transport), as cameras behind NAT do. After ``frames_per_session`` frames the
camera closes the connection: a stream that drops, for reconnect tests. Frame ``i`` is ``render(i)`` (BGR),
by default a flat grey of level ``level(i)``, so a reader can tell which frame it got.

Written for tests here: no RTSP server can be installed on these machines (mediamtx and GStreamer's
rtsp-server are not on the package registries), and this keeps the whole exchange in the test's process.
"""

from __future__ import annotations

import base64
import re
import socket
import socketserver
import struct
import threading
import time
from typing import Callable

import cv2
import numpy as np

RTP_JPEG_PAYLOAD_TYPE = 26
RTP_H264_PAYLOAD_TYPE = 96  # dynamic, named by the SDP's rtpmap
RTP_CLOCK_HZ = 90_000
MAX_FRAGMENT = 1200


def level(index: int) -> int:
    """The grey level of frame ``index``."""
    return 20 + (index * 10) % 220


def jpeg_parts(jpeg: bytes) -> tuple[int, int, bytes, bytes]:
    """(width, height, the two quantisation tables as 128 bytes, the entropy-coded scan without EOI) of a
    baseline 4:2:0 JPEG from libjpeg (one scan, standard Huffman tables, no restart markers)."""
    tables: dict[int, bytes] = {}
    width = height = 0
    offset = 2
    while offset < len(jpeg):
        marker, length = jpeg[offset + 1], struct.unpack(">H", jpeg[offset + 2:offset + 4])[0]
        segment = jpeg[offset + 4:offset + 2 + length]
        if marker == 0xDB:  # DQT: one or more 8-bit tables, each a Pq/Tq byte and 64 values
            for start in range(0, len(segment), 65):
                tables[segment[start] & 0x0F] = segment[start + 1:start + 65]
        elif marker == 0xC0:  # SOF0
            height, width = struct.unpack(">HH", segment[1:5])
        elif marker == 0xDA:  # SOS: the scan follows the header, up to the final EOI
            return width, height, tables[0] + tables[1], jpeg[offset + 2 + length:-2]
        offset += 2 + length
    raise ValueError("no scan in this JPEG")


def rtp_jpeg_packets(jpeg: bytes, sequence: int, timestamp: int, ssrc: int = 0x0E5C0DE) -> list[bytes]:
    """One JPEG frame as RTP packets (RFC 2435 type 1, Q 255 with the tables in the first packet)."""
    width, height, tables, scan = jpeg_parts(jpeg)
    packets = []
    for offset in range(0, len(scan), MAX_FRAGMENT):
        chunk = scan[offset:offset + MAX_FRAGMENT]
        last = offset + MAX_FRAGMENT >= len(scan)
        rtp = struct.pack(">BBHII", 0x80, (0x80 if last else 0) | RTP_JPEG_PAYLOAD_TYPE,
                          (sequence + len(packets)) & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc)
        jpeg_header = struct.pack(">I", offset & 0xFFFFFF) + bytes([1, 255, width // 8, height // 8])
        quant = struct.pack(">BBH", 0, 0, len(tables)) + tables if offset == 0 else b""
        packets.append(rtp + jpeg_header + quant + chunk)
    return packets


def access_units(annex_b: bytes) -> list[list[bytes]]:
    """The NAL units of an Annex B H.264 stream grouped by frame: each group ends with its frame's one slice
    (the streams here have one slice per frame), parameter sets and SEI go with the frame they precede."""
    starts = [m.end() for m in re.finditer(b"\x00\x00\x01", annex_b)]
    nals = [annex_b[start:end].rstrip(b"\x00") for start, end in zip(starts, [s - 3 for s in starts[1:]] + [len(annex_b)])]
    units, pending = [], []
    for nal in filter(None, nals):
        pending.append(nal)
        if 1 <= nal[0] & 0x1F <= 5:  # a coded slice
            units.append(pending)
            pending = []
    return units


def rtp_h264_packets(unit: list[bytes], sequence: int, timestamp: int, ssrc: int = 0x0E5C0DE) -> list[bytes]:
    """One frame's NAL units as RTP packets (RFC 6184 packetization mode 1): a NAL unit that fits whole goes
    alone, a larger one as FU-A fragments; the marker bit is set on the frame's last packet."""
    payloads = []
    for nal in unit:
        if len(nal) <= MAX_FRAGMENT:
            payloads.append(nal)
            continue
        indicator, kind = (nal[0] & 0xE0) | 28, nal[0] & 0x1F
        body = nal[1:]
        for offset in range(0, len(body), MAX_FRAGMENT):
            start, end = offset == 0, offset + MAX_FRAGMENT >= len(body)
            payloads.append(bytes([indicator, (0x80 if start else 0) | (0x40 if end else 0) | kind])
                            + body[offset:offset + MAX_FRAGMENT])
    return [struct.pack(">BBHII", 0x80, (0x80 if i == len(payloads) - 1 else 0) | RTP_H264_PAYLOAD_TYPE,
                        (sequence + i) & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc) + payload
            for i, payload in enumerate(payloads)]


def h264_sdp_format(units: list[list[bytes]]) -> str:
    """The SDP attributes that tell a client the stream's profile and parameter sets."""
    sps = next(nal for nal in units[0] if nal[0] & 0x1F == 7)
    pps = next(nal for nal in units[0] if nal[0] & 0x1F == 8)
    sets = ",".join(base64.b64encode(nal).decode() for nal in (sps, pps))
    return (f"a=rtpmap:{RTP_H264_PAYLOAD_TYPE} H264/{RTP_CLOCK_HZ}\r\n"
            f"a=fmtp:{RTP_H264_PAYLOAD_TYPE} packetization-mode=1;profile-level-id={sps[1:4].hex()};"
            f"sprop-parameter-sets={sets}\r\n")


class _Session(socketserver.BaseRequestHandler):
    server: "_Server"
    udp_port: int | None = None  # the client's RTP port when it set up UDP

    def handle(self) -> None:
        connection: socket.socket = self.request
        reader = connection.makefile("rb")
        streaming: threading.Thread | None = None
        stop = threading.Event()
        try:
            while True:
                first = reader.read(1)
                if not first:
                    return
                if first == b"$":  # the client's RTCP reports, interleaved: skipped
                    header = reader.read(3)
                    reader.read(struct.unpack(">H", header[1:3])[0])
                    continue
                lines = [first + reader.readline()]
                while lines[-1] not in (b"\r\n", b"\n", b""):
                    lines.append(reader.readline())
                request = [line.decode().strip() for line in lines if line.strip()]
                headers = dict(line.split(":", 1) for line in request[1:] if ":" in line)
                headers = {key.strip().lower(): value.strip() for key, value in headers.items()}
                if int(headers.get("content-length", 0)):
                    reader.read(int(headers["content-length"]))
                method, url = request[0].split()[:2]
                reply = self._answer(method, url, headers)
                connection.sendall(reply)
                if method == "PLAY" and streaming is None:
                    streaming = threading.Thread(target=self._stream, args=(connection, stop), daemon=True)
                    streaming.start()
                if method == "TEARDOWN":
                    return
        except OSError:
            return
        finally:
            stop.set()
            if streaming is not None:
                streaming.join(5)

    def _answer(self, method: str, url: str, headers: dict[str, str]) -> bytes:
        fields = [f"CSeq: {headers.get('cseq', '0')}"]
        status = "200 OK"
        body = b""
        if method == "OPTIONS":
            fields.append("Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER")
        elif method == "DESCRIBE":
            units = self.server.h264_units
            track = (f"m=video 0 RTP/AVP {RTP_H264_PAYLOAD_TYPE}\r\n" + h264_sdp_format(units) if units else
                     f"m=video 0 RTP/AVP {RTP_JPEG_PAYLOAD_TYPE}\r\n")
            body = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=enginesmith test camera\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
                    f"a=control:*\r\n{track}a=control:track0\r\na=framerate:{self.server.fps}\r\n").encode()
            fields += ["Content-Type: application/sdp", f"Content-Base: {url.rstrip('/')}/"]
        elif method == "SETUP":
            transport = headers.get("transport", "")
            client_ports = re.search(r"client_port=(\d+)-(\d+)", transport)
            if "TCP" in transport.upper():
                fields += ["Transport: RTP/AVP/TCP;unicast;interleaved=0-1", "Session: 5E551011;timeout=60"]
                self.udp_port = None
            elif self.server.udp and client_ports:
                fields += [f"Transport: RTP/AVP;unicast;client_port={client_ports[1]}-{client_ports[2]};"
                           f"server_port={self.server.udp_socket.getsockname()[1]}-{self.server.udp_socket.getsockname()[1] + 1}",
                           "Session: 5E551011;timeout=60"]
                self.udp_port = int(client_ports[1])
            else:
                status = "461 Unsupported Transport"
            if status.startswith("200"):
                self.server.setups.append("udp" if self.udp_port else "tcp")
        elif method in ("PLAY", "GET_PARAMETER", "TEARDOWN"):
            fields.append("Session: 5E551011")
        else:
            status = "405 Method Not Allowed"
        if body:
            fields.append(f"Content-Length: {len(body)}")
        return (f"RTSP/1.0 {status}\r\n" + "".join(f"{field}\r\n" for field in fields) + "\r\n").encode() + body

    def _stream(self, connection: socket.socket, stop: threading.Event) -> None:
        server = self.server
        sequence = 0
        started = time.perf_counter()
        for index in range(server.frames_per_session):
            if stop.is_set() or server.stopping.is_set():
                return
            timestamp = index * RTP_CLOCK_HZ // server.fps
            if server.h264_units:
                packets = rtp_h264_packets(server.h264_units[index % len(server.h264_units)], sequence, timestamp)
            else:
                jpeg = cv2.imencode(".jpg", server.render(index), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                packets = rtp_jpeg_packets(jpeg, sequence, timestamp)
            sequence += len(packets)
            try:
                if self.udp_port:
                    for packet in packets:
                        server.udp_socket.sendto(packet, ("127.0.0.1", self.udp_port))
                else:
                    connection.sendall(b"".join(b"$\x00" + struct.pack(">H", len(p)) + p for p in packets))
            except OSError:
                return
            time.sleep(max(0.0, started + (index + 1) / server.fps - time.perf_counter()))
        try:  # the stream drops: the client sees its connection closed
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, render: Callable[[int], np.ndarray], fps: int, frames_per_session: int, udp: bool,
                 h264: bytes | None):
        super().__init__(("127.0.0.1", 0), _Session)
        self.render, self.fps, self.frames_per_session, self.udp = render, fps, frames_per_session, udp
        self.h264_units = access_units(h264) if h264 else []
        self.udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_socket.bind(("127.0.0.1", 0))
        self.stopping = threading.Event()
        self.setups: list[str] = []  # the transport of each session set up: "tcp" or "udp"


class RtspCamera:
    """``RtspCamera(...).url`` serves until ``stop()``. MJPEG of ``render(i)`` by default; with ``h264`` (an Annex B
    stream's bytes) that stream's frames instead, as H.264."""

    def __init__(self, render: Callable[[int], np.ndarray] | None = None, fps: int = 30,
                 frames_per_session: int = 1_000_000, udp: bool = False, h264: bytes | None = None):
        render = render or (lambda index: np.full((240, 320, 3), level(index), np.uint8))
        self._server = _Server(render, fps, frames_per_session, udp, h264)
        self.url = f"rtsp://127.0.0.1:{self._server.server_address[1]}/camera"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def setups(self) -> list[str]:
        """The transport of every session set up so far ("tcp" or "udp")."""
        return list(self._server.setups)

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._server.udp_socket.close()
