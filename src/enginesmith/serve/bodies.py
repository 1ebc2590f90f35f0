"""Reading an HTTP request body once, into a buffer that binary tensors can be viewed in place.

aiohttp's ``request.read()`` gathers the socket's chunks into a bytearray and copies that into
bytes; the binary tensor data then starts wherever the JSON header ends, usually off its dtype's
alignment, and engines read misaligned arrays element by element (ONNX Runtime: about 0.3 ms
more for a 600 KB image). Here, with a Content-Length, each chunk is copied once into a buffer
placed so that the binary part starts on a 64-byte boundary.

Large buffers are kept for the next request (:class:`BodyBuffers`): freeing one lets the C
allocator hand its pages back to the system (``madvise``), and the next request of that size
faults every page in again, about 1 ms of kernel time per 600 KB request on the loop's thread.
"""

from __future__ import annotations

from aiohttp import web
import numpy as np

from .protocol import HEADER_LENGTH, ProtocolError

ALIGNMENT = 64  # bytes: what SIMD loads and ONNX Runtime's own allocations use
POOLED_FROM = 64 * 1024  # smaller bodies are not worth keeping a buffer for


class BodyBuffers:
    """Idle buffers for bodies of POOLED_FROM bytes or more, at most ``largest`` bytes each and
    ``budget`` bytes together (the largest are kept), so that concurrent requests find one too.

    A buffer is given back only once nothing reads the request's tensors any more (its response is
    encoded); a request that fails or is cancelled drops its buffer instead.
    """

    def __init__(self, budget: int = 64 * 2**20, largest: int = 16 * 2**20):
        self.budget = budget
        self.largest = largest
        self._idle: list[np.ndarray] = []

    def take(self, size: int) -> np.ndarray:
        """A buffer of at least ``size`` bytes: the smallest idle one that fits, else a new one."""
        fitting = [i for i, b in enumerate(self._idle) if b.nbytes >= size]
        if fitting:
            return self._idle.pop(min(fitting, key=lambda i: self._idle[i].nbytes))
        return np.empty(size, np.uint8)

    def give_back(self, storage: np.ndarray | None) -> None:
        if storage is None or storage.nbytes < POOLED_FROM or storage.nbytes > self.largest:
            return
        while sum(b.nbytes for b in self._idle) + storage.nbytes > self.budget:
            # by position: list.remove would compare arrays with ==, elementwise
            smallest = min(range(len(self._idle)), key=lambda i: self._idle[i].nbytes)
            if self._idle[smallest].nbytes >= storage.nbytes:
                return  # the idle ones are all at least as large: keep them
            self._idle.pop(smallest)
        self._idle.append(storage)


def aligned_view(storage: np.ndarray, size: int, aligned_at: int) -> np.ndarray:
    """``size`` bytes of ``storage`` (which has ALIGNMENT spare) whose byte ``aligned_at`` sits on an ALIGNMENT boundary."""
    start = -(storage.ctypes.data + aligned_at) % ALIGNMENT
    return storage[start:start + size]


def binary_offset(header_length: str | None, body_length: int) -> int:
    """Where the binary tensor data starts in the body (0 when the header length is unusable; decoding says why)."""
    try:
        offset = int(header_length) if header_length is not None else 0
    except ValueError:
        return 0
    return offset if 0 <= offset <= body_length else 0


async def read_body(request: web.Request, max_request_bytes: int,
                    buffers: BodyBuffers) -> tuple[bytes | memoryview, np.ndarray | None]:
    """The body, and the pooled storage it lives in (None: not pooled) for ``buffers.give_back``."""
    length = request.content_length
    if length is None or request.headers.get("Content-Encoding", "identity") != "identity":
        try:  # chunked or compressed: the size is known only once read; aiohttp counts against the limit
            return await request.read(), None
        except web.HTTPRequestEntityTooLarge:
            raise ProtocolError(413, f"the request body is larger than the server's limit of {max_request_bytes} "
                                     "bytes (--max-request-bytes)") from None
    pooled = length >= POOLED_FROM
    storage = buffers.take(length + ALIGNMENT) if pooled else np.empty(length + ALIGNMENT, np.uint8)
    body = memoryview(aligned_view(storage, length, binary_offset(request.headers.get(HEADER_LENGTH), length)))
    stream = request.content
    if hasattr(stream, "set_read_chunk_size"):  # aiohttp >= 3.13: no pause and resume of the socket per 128 KiB
        stream.set_read_chunk_size(length)
    filled = 0
    while filled < length:
        chunk, _ = await stream.readchunk()  # one chunk as received (readany joins what is buffered)
        if not chunk:
            raise ProtocolError(400, f"the request body ended after {filled} of its {length} bytes (Content-Length)")
        body[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return body, storage if pooled else None
