"""The zoo's corpus: the manifest (``benchmarks/zoo/models.toml``), and each model fetched from
the package it ships in: the wheel (``pip download --no-deps``) or npm tarball (``npm pack``)
downloaded once into a cache, the model extracted from it without path escapes, its sha256 checked.

Used by ``benchmarks/zoo.py`` and ``tests/test_zoo.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

import numpy as np

MANIFEST = Path(__file__).parent / "zoo" / "models.toml"
DEFAULT_CACHE = Path(os.environ.get("ENGINESMITH_ZOO_CACHE", Path.home() / ".cache" / "enginesmith-zoo"))


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class InputSpec:
    """How to make one meaningful input: its shape, dtype and how to fill it."""

    shape: tuple[int, ...]
    dtype: str
    fill: str = "normal"  # normal | uniform | zeros | ones | randint | value
    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0
    value: float = 0.0

    def make(self, rng: np.random.Generator) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        if self.fill == "normal":
            data = rng.standard_normal(self.shape) * self.scale
        elif self.fill == "uniform":
            data = rng.uniform(self.low, self.high, self.shape)
        elif self.fill == "randint":
            data = rng.integers(int(self.low), int(self.high), self.shape)
        elif self.fill in ("zeros", "ones", "value"):
            data = np.full(self.shape, {"zeros": 0, "ones": 1}.get(self.fill, self.value))
        else:
            raise ValueError(f"unknown fill '{self.fill}'")
        return np.asarray(data).astype(dtype)


@dataclass(frozen=True)
class ZooModel:
    id: str
    package: str
    version: str
    path: str  # inside the wheel; a trailing '/' means a folder (a SavedModel)
    sha256: str
    license: str
    task: str
    tier: str
    flags: tuple[str, ...] = ()
    # The outputs depend on input *values* the generated data gets wrong (a sample rate that
    # selects a branch): the build also needs --data with the manifest's sample.
    needs_data: bool = False
    inputs: dict[str, InputSpec] = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        return self.path.endswith("/")

    @property
    def source_format(self) -> str:
        return "savedmodel" if self.is_folder else PurePosixPath(self.path).suffix.lstrip(".")

    def sample(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {name: spec.make(rng) for name, spec in self.inputs.items()}


def load_manifest(path: Path = MANIFEST) -> list[ZooModel]:
    entries = tomllib.loads(path.read_text())["models"]
    models = []
    for entry in entries:
        inputs = {name: InputSpec(**{**spec, "shape": tuple(spec["shape"])}) for name, spec in entry.pop("inputs", {}).items()}
        models.append(ZooModel(**{**entry, "flags": tuple(entry.get("flags", ())), "inputs": inputs}))
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate model ids in {path}")
    return models


def select(models: list[ZooModel], ids: str | None, tier: str) -> list[ZooModel]:
    chosen = [m for m in models if tier == "all" or m.tier == tier]
    if ids:
        wanted = ids.split(",")
        unknown = sorted(set(wanted) - {m.id for m in models})
        if unknown:
            raise SystemExit(f"unknown model ids: {', '.join(unknown)}")
        chosen = [m for m in models if m.id in wanted]
    return chosen


# --------------------------------------------------------------------------- download, extract, verify


class RegistryError(RuntimeError):
    """pip (or npm) could not download a package (registry unreachable, or the version is gone)."""


NPM = "npm:"  # a package name with this prefix is an npm package: its tarball, not a wheel


def download_wheel(package: str, version: str, cache: Path) -> Path:
    """The package's wheel (or npm tarball), downloaded once into ``cache/wheels/<package>-<version>/``."""
    folder = cache / "wheels" / f"{package.removeprefix(NPM).replace('/', '+')}-{version}"
    pattern = "*.tgz" if package.startswith(NPM) else "*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    # Downloaded into a folder of this process's own, then renamed in: another process (a second pytest worker)
    # that finds the wheel never reads one still being written.
    partial = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        if package.startswith(NPM):
            npm = shutil.which("npm")
            if npm is None:
                raise RegistryError(f"{package}: npm is not installed")
            cmd = [npm, "pack", f"{package.removeprefix(NPM)}@{version}", "--pack-destination", str(partial), "--silent"]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(partial), f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        downloaded = sorted(partial.glob(pattern))
        if proc.returncode != 0 or not downloaded:
            last = (proc.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
            raise RegistryError(f"download of {package}=={version} failed: {last}")
        for path in downloaded:
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return sorted(folder.glob(pattern))[0]


@contextmanager
def open_archive(path: Path) -> Iterator[tuple[list[str], Callable[[str], IO[bytes]]]]:
    """(regular-file member names, open member) of a wheel (zip) or an npm tarball (.tgz)."""
    if path.suffix == ".tgz":
        with tarfile.open(path, "r:gz") as archive:
            files = {m.name: m for m in archive.getmembers() if m.isfile()}  # no links, devices
            yield list(files), lambda name: archive.extractfile(files[name])
    else:
        with zipfile.ZipFile(path) as archive:
            yield [n for n in archive.namelist() if not n.endswith("/")], archive.open


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    """A file's sha256; for a folder, the sha256 of its sorted 'relative/path sha256' lines."""
    if path.is_file():
        return _sha256_file(path)
    lines = sorted(f"{p.relative_to(path).as_posix()} {_sha256_file(p)}\n" for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _safe_target(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths, '..' and anything resolving outside root."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts or "\\" in relative or ":" in parts[0]:
        raise ValueError(f"unsafe path in wheel: '{relative}'")
    target = (root / Path(*parts)).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"path escapes the extraction folder: '{relative}'")
    return target


def extract_model(wheel: Path, member: str, dest: Path) -> Path:
    """Extract the file (or the folder, ``member`` ending in '/') from the wheel into ``dest``.

    Returns the model's path: ``dest/<file name>`` or ``dest/<folder name>``. Written to a temp
    folder first and renamed, so an interrupted extraction leaves nothing that looks complete.
    """
    name = PurePosixPath(member.rstrip("/")).name
    final = dest / name
    with open_archive(wheel) as (names, open_member):
        if member.endswith("/"):
            members = [n for n in names if n.startswith(member)]
        else:
            members = [member] if member in names else []
        if not members:
            raise FileNotFoundError(f"'{member}' is not in {wheel.name}")
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            for item in members:
                relative = item[len(member):] if member.endswith("/") else name
                target = _safe_target(staging / name if member.endswith("/") else staging, relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open_member(item) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            (staging / name).rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def fetch_model(model: ZooModel, cache: Path) -> Path:
    """The model file from the cache, or downloaded and extracted; its sha256 always checked."""
    dest = cache / "models" / model.id
    path = dest / PurePosixPath(model.path.rstrip("/")).name
    if not path.exists() or sha256_of(path) != model.sha256:
        wheel = download_wheel(model.package, model.version, cache)
        path = extract_model(wheel, model.path, dest)
    digest = sha256_of(path)
    if digest != model.sha256:
        raise ValueError(f"{model.id}: sha256 of {model.path} is {digest}, the manifest says {model.sha256}")
    return path
