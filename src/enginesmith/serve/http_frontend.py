"""The protocol's REST endpoints (and the metrics page) as aiohttp applications.

Every error goes back as ``{"error": "..."}`` with its status, also for aiohttp's own refusals
(an unknown route, a body over the size limit), so ``tritonclient.http`` can read it.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web

from .. import __version__
from .bodies import BodyBuffers, read_body
from .models import Repository
from .protocol import HEADER_LENGTH, ProtocolError, decode_http_request, encode_http_response

SERVER_NAME = "enginesmith"
EXTENSIONS = ["binary_tensor_data"]
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, retry_after_s: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProtocolError as exc:
        return error_response(exc.status, str(exc), exc.retry_after_s)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason if exc.text is None else exc.text.removeprefix(f"{exc.status}: "))
    except Exception as exc:  # noqa: BLE001 - a bug answers 500 for this request only
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


def inference_app(repository: Repository, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[json_errors])
    buffers = BodyBuffers()

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: web.Request) -> web.Response:
        return web.json_response(repository.get(request.match_info["model"], _version(request)).metadata())

    async def model_ready(request: web.Request) -> web.Response:
        model = repository.get(request.match_info["model"], _version(request))
        return web.json_response({"name": model.name, "ready": True})

    async def infer(request: web.Request) -> web.StreamResponse:
        model = repository.get(request.match_info["model"], _version(request))
        if request.content_length is not None and request.content_length > max_request_bytes:
            raise ProtocolError(413, f"the request body is {request.content_length} bytes, larger than the server's "
                                     f"limit of {max_request_bytes} bytes (--max-request-bytes)")
        # counted from here, before the body is read: a request still arriving keeps others off the fast path
        with model.in_flight:
            try:
                body, storage = await read_body(request, max_request_bytes, buffers)
            except ConnectionError:
                return web.Response(status=499)  # the client is gone; nobody reads this
            parsed = decode_http_request(body, request.headers.get(HEADER_LENGTH))
            response = await model.infer(parsed)
        payload, header_length = encode_http_response(response)
        buffers.give_back(storage)  # the inputs (views of it) are no longer read: the response is a copy
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})

    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    return app


def metrics_app(render: Callable[[], str]) -> web.Application:
    app = web.Application(middlewares=[json_errors])

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render().encode(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    app.router.add_get("/metrics", metrics)
    return app

