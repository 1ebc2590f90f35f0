"""The payload zip: ``meta.json``, ``program.pt2`` (pickle-free, checked), compiler cache, AOTI package, a CPU
engine's compiled kernel libraries."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from typing import Any, Mapping

from ...errors import BuildError
from . import native_kernels
from .common import PAYLOAD_FORMAT, _torch

def _check_pt2(data: bytes) -> None:
    """Refuse a .pt2 whose loading would unpickle anything.

    ``torch.export.load`` reads ordinary tensors raw, but unpickles tensor subclasses,
    custom objects, legacy weight files and example inputs. Engines built here contain
    none of those (example inputs are dropped before saving), so any of them means the
    file was not written by this backend.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise BuildError("the engine payload's program is not a valid .pt2 archive") from None
    for info in archive.infolist():
        name = info.filename
        if "/data/sample_inputs/" in name:
            if info.file_size:
                raise BuildError("the engine's program carries pickled example inputs; refusing to load it")
            continue
        if name.endswith(".pt") or "/data/aotinductor/" in name:
            raise BuildError(f"the engine's program holds '{name}', which loading would unpickle or execute; refusing it")
        if name.endswith("_config.json") and ("/data/weights/" in name or "/data/constants/" in name):
            config = json.loads(archive.read(name)).get("config", {})
            for fqn, meta in config.items():
                path = str(meta.get("path_name", ""))
                if meta.get("use_pickle") or path.startswith(("custom_obj", "opaque_obj")):
                    raise BuildError(f"the engine's program stores '{fqn}' as a pickle; refusing to load it")


def _save_program(program) -> bytes:
    torch = _torch()
    program.example_inputs = None  # stored as a pickle otherwise
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # channels-last and transposed weights are not "complete" to torch 2.11+; harmless
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(program, buffer)
    data = buffer.getvalue()
    _check_pt2(data)
    return data


def _load_program(data: bytes):
    torch = _torch()
    _check_pt2(data)
    with warnings.catch_warnings():  # raw weights are read from an immutable buffer and copied where they go
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.export.load(io.BytesIO(data))


def pack_payload(meta: dict[str, Any], program: bytes, cache: bytes | None, aoti: bytes | None = None,
                 native: Mapping[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("meta.json", json.dumps(meta, indent=1, sort_keys=True))
        archive.writestr("program.pt2", program)
        if cache:
            archive.writestr("inductor_cache.bin", cache)
        if aoti:
            archive.writestr("aoti.pt2", aoti)
        for name, data in (native or {}).items():  # a CPU engine's compiled kernels (native_kernels)
            archive.writestr(native_kernels.ENTRY_PREFIX + native_kernels.checked_name(name), data)
    return buffer.getvalue()


def read_native(payload: bytes) -> dict[str, bytes]:
    """The compiled kernel libraries a payload carries, by their path in a compiler cache folder (checked)."""
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        return {native_kernels.checked_name(name[len(native_kernels.ENTRY_PREFIX):]): archive.read(name)
                for name in archive.namelist() if name.startswith(native_kernels.ENTRY_PREFIX)}


def unpack_payload(payload: bytes) -> tuple[dict[str, Any], bytes, bytes | None, bytes | None]:
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            names = set(archive.namelist())
            meta = json.loads(archive.read("meta.json"))
            program = archive.read("program.pt2")
            cache = archive.read("inductor_cache.bin") if "inductor_cache.bin" in names else None
            aoti = archive.read("aoti.pt2") if "aoti.pt2" in names else None
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise BuildError(f"not a PyTorch backend payload ({exc})") from None
    if meta.get("format") != PAYLOAD_FORMAT:
        raise BuildError(f"PyTorch backend payload format {meta.get('format')} is not {PAYLOAD_FORMAT}: rebuild the engine")
    return meta, program, cache, aoti
