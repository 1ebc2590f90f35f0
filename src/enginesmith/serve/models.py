"""The served models: an engine, its batcher and counters, and the checks a request passes first.

A request is checked against the engine's signature before it is queued (names, datatypes,
ranks, fixed dims, named symbols), so a bad request is refused alone and never reaches a batch
it could spoil. Only version "1" of each model exists.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..runtime.engine import Engine
from ..runtime.inputs import SymbolSizes, check_shape, describe_inputs
from .batcher import BatcherStoppedError, BatchingOptions, DynamicBatcher, QueueFullError, QueueTimeoutError
from .metrics import ModelStats
from .protocol import InferRequest, InferResponse, ProtocolError, bad_request, datatype_of

VERSION = "1"
# The fast path runs the engine on the event loop, which serves nothing else meanwhile (health checks,
# metrics, arriving requests wait in their sockets): only for models whose latest call was this short.
# Longer calls gain nothing measurable from skipping the two thread hand-offs (~0.1-0.2 ms).
LOOP_CALL_LIMIT_NS = 20_000_000


def _dims(shape: tuple) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]  # -1 for a dimension of any size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


class InFlight:
    """Inference requests begun and not yet answered, over every model a server serves (``with`` counts one).

    Touched only on the server's event loop thread. A front end enters it when a request begins (for
    HTTP before its body is read), so a request that finds itself alone knows no other is arriving.
    """

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> "InFlight":
        self.count += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.count -= 1


class ServedModel:
    """One engine behind the protocol: metadata, request checks, batching, counters.

    ``in_flight`` is shared by the models of one server; a request that is the only one in flight on
    an idle model whose latest engine call was short (LOOP_CALL_LIMIT_NS) runs the engine on the event
    loop's thread at once (the batcher's fast path) instead of going through the queue and a worker
    thread; requests that overlap are queued and batched.
    """

    def __init__(self, name: str, engine: Engine, batching: BatchingOptions, timeout_ms: float | None = None,
                 in_flight: InFlight | None = None):
        self._describe(name, engine, timeout_ms, in_flight)
        self.stats = ModelStats(name, VERSION, pending=lambda: self.batcher.pending)
        self.batcher = DynamicBatcher(
            engine.infer, batching, name=name,
            on_execution=lambda record: self.stats.executed(record.items, record.compute_ns),
            on_dequeue=self.stats.queued,
        )

    def _describe(self, name: str, engine: Engine, timeout_ms: float | None, in_flight: InFlight | None = None) -> None:
        """What the protocol shows of the model and checks requests against (engine: anything with a signature)."""
        self.name = name
        self.in_flight = in_flight or InFlight()
        self.version = VERSION
        self.engine = engine
        self.timeout_ms = timeout_ms
        self.inputs = [TensorMetadata(s.name, datatype_of(s.dtype), _dims(s.shape)) for s in engine.signature.inputs]
        self.outputs = [TensorMetadata(s.name, datatype_of(s.dtype), _dims(s.shape)) for s in engine.signature.outputs]
        self._input_types = {t.name: t.datatype for t in self.inputs}

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": f"enginesmith_{self.engine.backend}",
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    def check_inputs(self, request: InferRequest) -> dict[str, np.ndarray]:
        """The request's inputs as the engine takes them, or a 400 naming what is wrong."""
        signature = self.engine.signature
        unknown = [name for name in request.inputs if name not in self._input_types]
        if unknown:
            raise bad_request(f"unknown input '{unknown[0]}': model '{self.name}' takes {describe_inputs(signature)}")
        missing = [name for name in self._input_types if name not in request.inputs]
        if missing:
            raise bad_request(f"missing input '{missing[0]}': model '{self.name}' takes {describe_inputs(signature)}")
        symbols: SymbolSizes = {}
        flexible = self.engine.max_batch is not None
        for spec in signature.inputs:
            given, wanted = request.datatypes[spec.name], self._input_types[spec.name]
            if given != wanted:
                raise bad_request(f"input '{spec.name}' is {given}, but model '{self.name}' takes {wanted}")
            try:
                check_shape(spec.name, request.inputs[spec.name], spec, symbols, batch_flexible=flexible)
            except InputError as exc:
                raise bad_request(str(exc)) from None
        return {spec.name: request.inputs[spec.name] for spec in signature.inputs}

    async def _run(self, feeds: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        if self.in_flight.count <= 1 and self.batcher.last_call_ns <= LOOP_CALL_LIMIT_NS:
            # Yield once first: requests that arrived together with this one start their handlers
            # (and count themselves) on this loop pass; running the engine now would keep them out of
            # a batch for one engine call each.
            await asyncio.sleep(0)
            if self.in_flight.count <= 1:
                outputs = self.batcher.run_if_idle(feeds)
                if outputs is not None:
                    return outputs
        return await asyncio.wrap_future(self.batcher.submit(feeds, timeout_s))

    def _selected_outputs(self, request: InferRequest) -> dict[str, bool]:
        """Output name -> whether it goes back as binary data."""
        names = [t.name for t in self.outputs]
        if request.outputs is None:
            return {name: request.binary_outputs for name in names}
        for wanted in request.outputs:
            if wanted.name not in names:
                raise bad_request(f"unknown output '{wanted.name}': model '{self.name}' returns {', '.join(names)}")
        return {wanted.name: wanted.binary for wanted in request.outputs}

    async def infer(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter_ns()
        ok = False
        try:
            response = await self._infer(request)
            ok = True
            return response
        finally:
            self.stats.request_done(ok, time.perf_counter_ns() - started)

    async def _infer(self, request: InferRequest) -> InferResponse:
        feeds = self.check_inputs(request)
        selected = self._selected_outputs(request)
        timeout_ms = request.timeout_us / 1000 if request.timeout_us else self.timeout_ms
        try:
            outputs = await self._run(feeds, None if timeout_ms is None else timeout_ms / 1000)
        except QueueFullError as exc:
            raise ProtocolError(503, f"model '{self.name}' is busy: {exc}; retry later", retry_after_s=1) from None
        except Exception as exc:  # noqa: BLE001 - the engine failed on this request; the server keeps serving
            raise failure_answer(self.name, exc) from None
        return self._response(request, selected, outputs)

    def _response(self, request: InferRequest, selected: dict[str, bool], outputs: dict[str, np.ndarray]) -> InferResponse:
        return InferResponse(
            model_name=self.name,
            model_version=self.version,
            outputs={name: outputs[name] for name in selected},
            datatypes={name: datatype_of(outputs[name].dtype.name) for name in selected},
            binary=selected,
            id=request.id,
        )


def failure_answer(model: str, exc: Exception) -> ProtocolError:
    """The protocol's answer to a request whose batch (or engine call) raised ``exc``."""
    if isinstance(exc, QueueTimeoutError):
        return ProtocolError(503, f"model '{model}' is busy: {exc}", retry_after_s=1)
    if isinstance(exc, BatcherStoppedError):
        return ProtocolError(503, str(exc))
    if isinstance(exc, InputError):
        return bad_request(str(exc))
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ProtocolError(500, f"model '{model}' failed on this request: {type(exc).__name__}: {detail}")


class Repository:
    """The models a server serves, by name."""

    def __init__(self, models: list[ServedModel]):
        self.models = {model.name: model for model in models}

    def get(self, name: str, version: str = "") -> ServedModel:
        model = self.models.get(name)
        if model is None:
            served = ", ".join(f"'{n}'" for n in self.models)
            raise ProtocolError(404, f"unknown model '{name}': this server serves {served}")
        if version not in ("", model.version):
            raise ProtocolError(404, f"model '{name}' has no version '{version}'; it serves version {model.version}")
        return model
