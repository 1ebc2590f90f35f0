"""Directory sources (TensorFlow SavedModel folders) packed into, and safely unpacked from, a zip.

A bundle embeds a folder source as ``<dirname>.dir.zip``. Packing is deterministic
(sorted entries, fixed timestamps) so the same folder always gives the same bytes and
the same ``source_sha256``. Unpacking treats the archive as untrusted: absolute paths,
``..`` components, drive letters, backslashes, links and special files are refused, and
the number of entries, the total unpacked size and the compression ratio are capped
(counting the bytes actually written, not the sizes the zip claims).
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..errors import BundleError, SourceError

# Limits for unpacking an embedded folder (and for packing one).
MAX_ENTRIES = 20_000
MAX_TOTAL_BYTES = 8 * 1024**3  # 8 GiB unpacked
# Above this ratio (unpacked / compressed) an entry of some size is treated as a zip bomb.
MAX_RATIO = 1000
_RATIO_FLOOR = 1024**2  # entries under 1 MiB unpacked are never refused for their ratio

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1024**2


def pack_directory(path: str | Path, *, max_bytes: int = MAX_TOTAL_BYTES, max_entries: int = MAX_ENTRIES) -> bytes:
    """The folder as zip bytes: regular files and (empty) folders, relative POSIX names, sorted.

    Links and special files are refused rather than followed, so what is packed is
    exactly what is inside the folder.
    """
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"'{root}' is not a folder")
    entries: list[tuple[str, Path | None]] = []
    total = 0
    for current, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        here = Path(current)
        for name in sorted(dirs) + sorted(files):
            full = here / name
            rel = full.relative_to(root).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise SourceError(
                    f"'{root.name}' contains a link ('{rel}'); copy the real file in its place before building"
                )
            if stat.S_ISDIR(mode):
                entries.append((rel + "/", None))
            elif stat.S_ISREG(mode):
                total += full.stat().st_size
                entries.append((rel, full))
            else:
                raise SourceError(f"'{root.name}' contains '{rel}', which is not a regular file or folder")
            if len(entries) > max_entries:
                raise SourceError(f"'{root.name}' holds more than {max_entries} files; that is not a model folder")
            if total > max_bytes:
                raise SourceError(f"'{root.name}' is larger than {max_bytes // 1024**2} MiB; too large to embed")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for name, full in sorted(entries, key=lambda e: e[0]):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            if full is None:
                info.external_attr = (stat.S_IFDIR | 0o755) << 16
                archive.writestr(info, b"")
                continue
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(full, "rb") as src, archive.open(info, "w", force_zip64=True) as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
    return buffer.getvalue()


def _safe_name(name: str) -> PurePosixPath:
    """The entry name as a relative path, or BundleError when it could escape the target folder."""
    if not name or "\\" in name or "\x00" in name:
        raise BundleError(f"embedded folder archive has an unsafe entry name {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"embedded folder archive has an absolute path {name!r}; refusing to unpack it")
    parts = [p for p in path.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BundleError(f"embedded folder archive has a '..' path {name!r}; refusing to unpack it")
    if not parts:
        raise BundleError(f"embedded folder archive has an empty entry name {name!r}")
    return PurePosixPath(*parts)


def _read(handle, name: str) -> bytes:
    try:
        return handle.read(_CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise BundleError(f"embedded folder entry '{name}' is corrupted ({exc})") from None


def unpack_directory(
    zip_path: str | Path,
    target_dir: str | Path,
    *,
    max_bytes: int = MAX_TOTAL_BYTES,
    max_entries: int = MAX_ENTRIES,
) -> Path:
    """Unpack a folder packed by :func:`pack_directory` into ``target_dir`` (new or empty) and return it."""
    zip_path, target = Path(zip_path), Path(target_dir)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"embedded folder '{zip_path.name}' is not a readable zip ({exc})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_entries:
            raise BundleError(f"embedded folder '{zip_path.name}' has {len(infos)} entries (limit {max_entries})")
        if sum(i.file_size for i in infos) > max_bytes:
            raise BundleError(f"embedded folder '{zip_path.name}' unpacks to more than {max_bytes // 1024**2} MiB")
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath, bool]] = []
        seen: set[PurePosixPath] = set()
        for info in infos:
            rel = _safe_name(info.filename)
            mode = info.external_attr >> 16
            is_dir = info.is_dir()
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                kind = "a link" if stat.S_ISLNK(mode) else "a special file"
                raise BundleError(f"embedded folder '{zip_path.name}' holds {kind} ('{info.filename}'); refusing to unpack it")
            if info.flag_bits & 0x1:
                raise BundleError(f"embedded folder '{zip_path.name}' has an encrypted entry ('{info.filename}')")
            if rel in seen:
                raise BundleError(f"embedded folder '{zip_path.name}' lists '{rel}' twice")
            seen.add(rel)
            plan.append((info, rel, is_dir))
        target.mkdir(parents=True, exist_ok=True)
        if any(target.iterdir()):
            raise BundleError(f"cannot unpack '{zip_path.name}': '{target}' is not empty")
        root = target.resolve()
        written = 0
        for info, rel, is_dir in plan:
            dest = root.joinpath(*rel.parts)
            if not dest.resolve().is_relative_to(root):
                raise BundleError(f"embedded folder entry '{info.filename}' points outside the target folder")
            if is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.parent.resolve().is_relative_to(root):
                raise BundleError(f"embedded folder entry '{info.filename}' points outside the target folder")
            entry_bytes = 0
            try:
                src_handle = archive.open(info)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
                raise BundleError(f"embedded folder entry '{info.filename}' cannot be read ({exc})") from None
            with src_handle as src, open(dest, "xb") as dst:
                while chunk := _read(src, info.filename):
                    entry_bytes += len(chunk)
                    written += len(chunk)
                    if written > max_bytes or entry_bytes > info.file_size:
                        raise BundleError(
                            f"embedded folder '{zip_path.name}' unpacks to more than it declares; refusing it"
                        )
                    if entry_bytes > _RATIO_FLOOR and entry_bytes > MAX_RATIO * max(info.compress_size, 1):
                        raise BundleError(
                            f"embedded folder entry '{info.filename}' has a compression ratio over {MAX_RATIO}; "
                            "refusing a likely zip bomb"
                        )
                    dst.write(chunk)
    return target


def write_embedded_source(name: str, raw: bytes, folder: str | Path) -> Path:
    """A source a bundle embeds, written into ``folder`` as a path importers read.

    A folder source (``<name>.dir.zip``, a SavedModel) is unpacked next to its archive; a
    file is written as it is. Only the base name of ``name`` is used, so nothing lands
    outside ``folder``.
    """
    target = Path(folder) / Path(name).name
    target.write_bytes(raw)
    if target.suffix == ".zip" and target.stem.endswith(".dir"):
        return unpack_directory(target, target.with_suffix(""))
    return target
