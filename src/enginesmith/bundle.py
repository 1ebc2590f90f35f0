"""The ``.engine`` bundle: one zip file with a manifest, a payload, the source and reports.

Reading is defensive: entry names are checked for path escapes, sizes for zip
bombs, and every entry against the checksum the manifest records. Nothing is
extracted to disk; entries are read into memory by name. Writing goes to a
temporary file in the target folder and is renamed into place, so a crash or
an error never leaves a half-written engine behind.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import BundleError
from .files import atomic_writer
from .manifest import FileRecord, Manifest

MANIFEST_NAME = "manifest.json"
REPORTS_DIR = "reports/"
CACHES_DIR = "cache/"
# Sample inputs the build checked with (an .npz keyed by input name): what validate and rebuilds use by default.
SAMPLES_ENTRY = "samples/samples.npz"

# Limits against hostile archives; large enough for multi-GB LLM engines.
MAX_ENTRY_BYTES = int(os.environ.get("ENGINESMITH_MAX_ENTRY_BYTES", 32 * 2**30))
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_COMPRESSION_RATIO = 200
_CHUNK = 2**20

# What zipfile, zlib and the manifest parser raise on a damaged archive: flipped bytes, truncation,
# an unknown compression method, a broken central directory or entry name. All become BundleError.
DAMAGED_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    NotImplementedError,
    EOFError,
    OSError,
    struct.error,
    UnicodeDecodeError,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    RuntimeError,  # an entry marked encrypted
    TypeError,  # a self-consistent but malformed manifest (a size that is not a number)
)


@dataclass
class BundleContents:
    manifest: Manifest
    payload: bytes | None = None
    source: bytes | None = None
    # report name (without folder and .json) -> raw JSON bytes
    reports: dict[str, bytes] = field(default_factory=dict)
    # backend caches later builds of the same model reuse (calibration, timing): file name -> bytes
    caches: dict[str, bytes] = field(default_factory=dict)
    # sample inputs (np.savez bytes, no pickles) for validate and rebuilds
    samples: bytes | None = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def looks_like_bundle(path: str | os.PathLike) -> bool:
    """True for a zip file with a manifest: used to tell bundles from models."""
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST_NAME in zf.namelist()
    except DAMAGED_ZIP_ERRORS:
        return False


def write_bundle(path: str | os.PathLike, contents: BundleContents) -> Path:
    """Write atomically; records checksums of every entry in the manifest."""
    if contents.payload is None:
        raise BundleError("cannot write a bundle without a payload")
    entries: dict[str, bytes] = {contents.manifest.payload_entry: contents.payload}
    if contents.source is not None:
        entries[contents.manifest.source_entry] = contents.source
    for name, raw in contents.reports.items():
        entries[f"{REPORTS_DIR}{name}.json"] = raw
    for name, raw in contents.caches.items():
        entries[CACHES_DIR + name] = raw
    if contents.samples is not None:
        entries[SAMPLES_ENTRY] = contents.samples
    contents.manifest.files = {
        name: FileRecord(sha256=sha256_bytes(data), size=len(data)) for name, data in entries.items()
    }
    target = Path(path)
    with atomic_writer(target) as raw_file:
        # Weights barely compress and stored entries load faster, so only JSON is deflated.
        with zipfile.ZipFile(raw_file, "w") as zf:
            zf.writestr(MANIFEST_NAME, contents.manifest.to_json(), compress_type=zipfile.ZIP_DEFLATED)
            for name, data in entries.items():
                method = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
                zf.writestr(name, data, compress_type=method)
    return target


def _check_entry_names(zf: zipfile.ZipFile, where: str) -> None:
    seen: set[str] = set()
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (parts and parts[0].endswith(":")):
            raise BundleError(f"{where} contains an unsafe entry name '{name}' (path escape); refusing to read it")
        if name in seen:
            raise BundleError(f"{where} contains the entry '{name}' twice; the bundle was tampered with")
        seen.add(name)
        if info.file_size > MAX_ENTRY_BYTES:
            raise BundleError(
                f"{where}: entry '{name}' declares {info.file_size} bytes, over the limit of {MAX_ENTRY_BYTES} "
                "(set ENGINESMITH_MAX_ENTRY_BYTES to raise it)"
            )
        if info.compress_size and info.file_size > 2**20 and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
            raise BundleError(f"{where}: entry '{name}' has a suspicious compression ratio; refusing to read it")


def _read_entry(zf: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    """Read at most ``limit`` bytes, whatever the header claims."""
    chunks: list[bytes] = []
    total = 0
    try:
        with zf.open(name) as handle:
            while chunk := handle.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise BundleError(f"{where}: entry '{name}' is larger than its limit; refusing to read it")
                chunks.append(chunk)
    except DAMAGED_ZIP_ERRORS as exc:
        raise BundleError(f"{where}: entry '{name}' is corrupted ({_error_text(exc)}); rebuild the engine") from None
    return b"".join(chunks)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def extract_verified_entry(path: str | os.PathLike, manifest: Manifest, entry: str, target: Path) -> Path:
    """Stream one entry to ``target``, hashing as it goes; nothing is held whole in memory.

    Large payloads are loaded by backends from a file, so a bundle's weights are
    never in memory twice (once as bytes, once inside the runtime).
    """
    record = manifest.files[entry]
    where = f"engine bundle '{Path(path).name}'"
    digest = hashlib.sha256()
    total = 0
    try:
        with zipfile.ZipFile(path) as zf, zf.open(entry) as src, open(target, "wb") as dst:
            while chunk := src.read(_CHUNK):
                total += len(chunk)
                if total > record.size:
                    break
                digest.update(chunk)
                dst.write(chunk)
    except DAMAGED_ZIP_ERRORS as exc:
        target.unlink(missing_ok=True)
        raise BundleError(f"{where}: entry '{entry}' is corrupted ({_error_text(exc)}); rebuild the engine") from None
    if total != record.size or digest.hexdigest() != record.sha256:
        target.unlink(missing_ok=True)
        raise BundleError(f"{where}: checksum mismatch for '{entry}': the file was modified or corrupted; rebuild the engine")
    return target


def read_bundle(
    path: str | os.PathLike,
    *,
    payload: bool = True,
    source: bool = False,
    reports: bool = False,
    caches: bool = False,
    samples: bool = False,
) -> BundleContents:
    """Open a bundle, check its structure and the checksums of the entries read.

    Whatever the damage (flipped bytes, truncation, a broken central directory), the only
    error is a :class:`BundleError`.
    """
    path = Path(path)
    where = f"engine bundle '{path.name}'"
    if not path.exists():
        raise BundleError(f"engine not found: '{path}': check the path")
    if not path.is_file():
        raise BundleError(f"'{path}' is not a file; an engine bundle is a single .engine file")
    try:
        zf = zipfile.ZipFile(path)
    except DAMAGED_ZIP_ERRORS as exc:
        raise BundleError(
            f"'{path.name}' is not an enginesmith bundle (not a zip archive, or truncated: {_error_text(exc)}); "
            "build one with 'enginesmith build MODEL'"
        ) from None
    try:
        return _read_open_bundle(zf, where, payload=payload, source=source, reports=reports, caches=caches,
                                 samples=samples)
    except BundleError:
        raise
    except DAMAGED_ZIP_ERRORS as exc:
        raise BundleError(f"{where} is corrupted ({_error_text(exc)}); rebuild the engine") from None


def _read_open_bundle(
    zf: zipfile.ZipFile, where: str, *, payload: bool, source: bool, reports: bool, caches: bool, samples: bool
) -> BundleContents:
    with zf:
        _check_entry_names(zf, where)
        names = set(zf.namelist())
        if MANIFEST_NAME not in names:
            raise BundleError(f"{where} has no {MANIFEST_NAME}: not an enginesmith bundle")
        manifest = Manifest.from_json(_read_entry(zf, MANIFEST_NAME, MAX_MANIFEST_BYTES, where))
        listed = set(manifest.files)
        if names - {MANIFEST_NAME} != listed:
            extra = sorted(names - {MANIFEST_NAME} - listed)
            missing = sorted(listed - names)
            raise BundleError(
                f"{where}: entries do not match the manifest (unlisted: {extra or 'none'}, missing: {missing or 'none'}); "
                "the bundle was tampered with or truncated"
            )
        payload_entry = manifest.payload_entry
        if payload_entry not in listed:
            raise BundleError(f"{where}: the manifest names payload '{manifest.payload_name}' but the bundle has none")
        contents = BundleContents(manifest=manifest)

        def verified(entry: str) -> bytes:
            record = manifest.files[entry]
            data = _read_entry(zf, entry, min(MAX_ENTRY_BYTES, record.size), where)
            if len(data) != record.size or sha256_bytes(data) != record.sha256:
                raise BundleError(
                    f"{where}: checksum mismatch for '{entry}': the file was modified or corrupted; rebuild the engine"
                )
            return data

        if payload:
            contents.payload = verified(payload_entry)
        if source and contents.manifest.source_entry in listed:
            contents.source = verified(contents.manifest.source_entry)
        if reports:
            for entry in sorted(listed):
                if entry.startswith(REPORTS_DIR) and entry.endswith(".json"):
                    contents.reports[entry[len(REPORTS_DIR) : -len(".json")]] = verified(entry)
        if caches:
            for entry in sorted(listed):
                if entry.startswith(CACHES_DIR):
                    contents.caches[entry[len(CACHES_DIR) :]] = verified(entry)
        if samples and SAMPLES_ENTRY in listed:
            contents.samples = verified(SAMPLES_ENTRY)
    return contents
