"""The Engine: a loaded bundle you call with named inputs and get named outputs from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..backends import Session
from ..backends.base import DeviceOps, ImageGeometry
from ..bundle import SAMPLES_ENTRY, BundleContents, read_bundle, write_bundle
from ..errors import EnginesmithError, InputError
from ..manifest import Manifest
from ..signature import Signature
from .inputs import InputChecker, SymbolSizes, check_shape, describe_inputs


__all__ = ["DeviceIOUnsupportedError", "DeviceOps", "Engine", "ImageGeometry"]


class DeviceIOUnsupportedError(EnginesmithError):
    """The engine's backend runs on host memory only, so it cannot take or return device tensors."""


class Engine:
    """A built engine. Call it like ``engine(x=batch)`` or ``engine.infer({"x": batch})``.

    Safe to call from several threads at once: sessions are thread-safe and the
    engine keeps no per-call state.
    """

    def __init__(self, manifest: Manifest, session: Session, contents: BundleContents | None = None, path: Path | None = None):
        self._manifest = manifest
        self._session = session
        # A freshly built engine keeps its bundle contents until saved; a loaded
        # one only remembers its file, so the payload is not held twice in memory.
        self._contents = contents
        self._path = path
        self._checker: tuple[int | None, InputChecker] | None = None  # made at the first call

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def signature(self) -> Signature:
        return self._manifest.signature

    @property
    def backend(self) -> str:
        return self._manifest.backend

    @property
    def precision(self) -> str:
        return self._manifest.precision

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def max_batch(self) -> int | None:
        """The most items one call of the payload takes; larger batches are split."""
        return self.signature.fixed_batch() or self._manifest.build_options.get("backend_options", {}).get("max_batch")

    @property
    def compiled_batches(self) -> tuple[int, ...]:
        """Batch sizes the payload was compiled for ahead (CUDA engines of the torch backend: ``--option
        batches=[...]``), which run fastest; other sizes run too, but slower. Empty: every size runs alike."""
        return tuple(getattr(self._session, "compiled_batches", ()))

    def __call__(self, inputs: Mapping[str, Any] | None = None, /, **named: Any) -> dict[str, np.ndarray]:
        return self.infer({**(inputs or {}), **named})

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._checker is None:
            max_batch = self.max_batch
            self._checker = (max_batch, InputChecker(self.signature, batch_flexible=max_batch is not None))
        max_batch, checker = self._checker
        feeds = checker(inputs)
        if max_batch is None:
            return self._session.run(feeds)
        batch = _common_batch(feeds)
        if batch == max_batch:
            return self._session.run(feeds)
        return self._run_in_chunks(feeds, batch, max_batch)

    @property
    def supports_device_io(self) -> bool:
        """Whether :meth:`infer_device` works: the session takes CUDA tensors (the TensorRT backend)."""
        return bool(getattr(self._session, "supports_device_io", False))

    def infer_device(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run on device-resident tensors (torch or cupy CUDA tensors, through DLPack), without host copies.

        Inputs must already have the engine's dtypes (nothing is cast on the device) and a batch the
        engine takes in one call (nothing is split). ``outputs`` may give CUDA tensors to write into;
        otherwise fresh device arrays are returned, which ``torch.from_dlpack`` / ``cupy.from_dlpack``
        take without copying. Backends that run on host memory raise :class:`DeviceIOUnsupportedError`.
        """
        if not self.supports_device_io:
            raise DeviceIOUnsupportedError(
                f"this {self.backend} engine runs on host memory only, so infer_device cannot take device tensors; "
                "call engine.infer() with numpy arrays, or build with --backend tensorrt (or torch) for device-resident I/O"
            )
        self._check_device_feeds(inputs, outputs or {})
        return self._session.run_device(dict(inputs), dict(outputs) if outputs else None)

    @property
    def device_ops(self) -> DeviceOps | None:
        """Pre- and post-processing on the engine's device with its backend's array library (see
        :class:`~enginesmith.backends.base.DeviceOps`), for engines that support device I/O; else None."""
        return self._session.device_ops() if self.supports_device_io else None

    def _check_device_feeds(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Names, ranks and dims from the tensors' ``shape`` alone: nothing on the device is touched."""
        signature = self.signature
        unknown = [n for n in inputs if n not in signature.input_names]
        missing = [n for n in signature.input_names if n not in inputs]
        if unknown or missing:
            what = f"unknown input '{unknown[0]}'" if unknown else f"missing input '{missing[0]}'"
            raise InputError(f"{what}: this engine takes {describe_inputs(signature)}")
        strangers = [n for n in outputs if n not in signature.output_names]
        if strangers:
            raise InputError(f"unknown output '{strangers[0]}': this engine returns {', '.join(signature.output_names)}")
        symbols: SymbolSizes = {}
        for spec in signature.inputs:
            shape = _shape_of(spec.name, inputs[spec.name])
            check_shape(spec.name, _Shaped(shape), spec, symbols, batch_flexible=False)
        max_batch = self.max_batch
        batches = {_shape_of(n, v)[0] for n, v in inputs.items() if _shape_of(n, v)}
        if max_batch is not None and batches and max(batches) > max_batch:
            raise InputError(
                f"a batch of {max(batches)} is larger than this engine's batch of {max_batch}, and infer_device does "
                f"not split batches; feed at most {max_batch} items per call"
            )

    def _run_in_chunks(self, feeds: dict[str, np.ndarray], batch: int, max_batch: int) -> dict[str, np.ndarray]:
        """Split a batch the payload cannot take at once; pad the last chunk when the batch is fixed."""
        fixed = self.signature.fixed_batch() is not None
        pieces: dict[str, list[np.ndarray]] = {}
        for start in range(0, batch, max_batch):
            chunk = {name: value[start : start + max_batch] for name, value in feeds.items()}
            real = next(iter(chunk.values())).shape[0]
            if fixed and real < max_batch:
                chunk = {name: _pad_rows(value, max_batch) for name, value in chunk.items()}
            outputs = self._session.run(chunk)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != chunk[next(iter(chunk))].shape[0]:
                    raise InputError(
                        f"batch of {batch} is larger than this engine's batch of {max_batch}, and output '{name}' "
                        "has no batch axis to split along; feed at most that many items per call"
                    )
                pieces.setdefault(name, []).append(value[:real])
        return {name: np.concatenate(parts, axis=0) for name, parts in pieces.items()}

    def add_report(self, name: str, report_json: bytes, check: dict) -> None:
        """Record a check in the manifest; a not-yet-saved engine also keeps the full report."""
        self._manifest.checks[name] = check
        if self._contents is not None:
            self._contents.reports[name] = report_json

    def set_samples(self, raw: bytes | None) -> None:
        """Sample inputs (np.savez bytes) a not-yet-saved engine stores in its bundle."""
        if self._contents is not None:
            self._contents.samples = raw

    def stored_samples(self) -> bytes | None:
        """The sample inputs the bundle carries (checksum verified), or None."""
        if self._contents is not None:
            return self._contents.samples
        if self._path is not None and SAMPLES_ENTRY in self._manifest.files:
            return read_bundle(self._path, payload=False, samples=True).samples
        return None

    def save(self, path: str | Path, include_source: bool = True) -> Path:
        """Write the bundle (atomically). ``include_source=False`` leaves the source model out."""
        contents = self._contents or read_bundle(self._path, payload=True, source=include_source, reports=True, caches=True,
                                                  samples=True)
        if not include_source:
            contents = BundleContents(
                manifest=contents.manifest, payload=contents.payload, reports=contents.reports, caches=contents.caches,
                samples=contents.samples,
            )
        written = write_bundle(path, contents)
        self._path = written
        return written

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        where = f" from '{self._path}'" if self._path else ""
        return f"<Engine {self.backend} {self.precision}{where}\n{self.signature}>"


class _Shaped:
    """Just a shape, for the signature checks of tensors that are not read."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.ndim = len(shape)


def _shape_of(name: str, value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is None:
        raise InputError(
            f"input '{name}' is a {type(value).__name__}, not a tensor: infer_device takes CUDA tensors "
            "(torch, cupy, or the arrays it returns)"
        )
    return tuple(int(d) for d in shape)


def _common_batch(feeds: Mapping[str, np.ndarray]) -> int:
    batches = {name: value.shape[0] if value.ndim else None for name, value in feeds.items()}
    distinct = set(batches.values())
    if len(distinct) != 1 or None in distinct:
        raise InputError(f"inputs must share the same batch size along axis 0, got {batches}")
    return distinct.pop()


def _pad_rows(value: np.ndarray, rows: int) -> np.ndarray:
    pad = [(0, rows - value.shape[0])] + [(0, 0)] * (value.ndim - 1)
    return np.pad(value, pad, mode="edge")
