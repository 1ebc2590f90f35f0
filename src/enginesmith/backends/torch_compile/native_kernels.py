"""The C++ kernels Inductor compiles for a CPU engine, carried in its payload.

PyTorch's cache artifacts (``torch.compiler.save_cache_artifacts``) hold a CPU graph's generated C++
source but not the shared libraries compiled from it, so a load in a fresh process ran the C++
compiler for every kernel again: 12.5 s of an 18 s warm load of a six-layer convolutional net on a
2-core CPU. A CPU build therefore compiles inside a cache folder of its own and the payload keeps
that folder's ``.so`` files under their paths in it; a load first writes them into Inductor's cache
folder, where Inductor finds them under the same content-derived paths and skips the compiler
(18.0 s -> 3.9 s for that net). A library compiled for another CPU or compiler sits under another
path, so a load elsewhere compiles as before. The libraries are native code: loading them needs the
same trust as the compiler cache itself.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from ...errors import BuildError

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# "0": a load leaves the carried libraries out and compiles the kernels again (as loads before them did)
INSTALL_ENV = "ENGINESMITH_TORCH_KERNEL_LIBRARIES"
ENTRY_PREFIX = "native/"
# Inductor names a compiled kernel library <two characters of its key>/<key>[.main].so
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_]{1,8}/[A-Za-z0-9_.-]{1,200}\.so$")


def _forget_loaded_kernels() -> None:
    """Empty Inductor's in-process tables of loaded C++ kernels, so that a kernel an earlier build in this
    process compiled (identical C++ for identical layers) is compiled into the fresh folder too, instead
    of reused from memory and missing from the payload (a second MLP of the same shapes carried none of
    its kernels). Kernels already loaded stay in use by what loaded them."""
    try:
        from torch._inductor import codecache
    except ImportError:  # pragma: no cover
        return
    for name in ("CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache"):
        table = getattr(codecache, name, None)
        if table is not None and hasattr(table, "cache_clear"):
            table.cache_clear()


@contextmanager
def private_cache_dir() -> Iterator[Path]:
    """Inductor's caches in a fresh folder for the duration (process-wide, as its environment variable is)."""
    previous = os.environ.get(CACHE_DIR_ENV)
    _forget_loaded_kernels()
    with tempfile.TemporaryDirectory(prefix="enginesmith-inductor-") as folder:
        os.environ[CACHE_DIR_ENV] = folder
        try:
            yield Path(folder)
        finally:
            if previous is None:
                os.environ.pop(CACHE_DIR_ENV, None)
            else:
                os.environ[CACHE_DIR_ENV] = previous


# Libraries Inductor compiles once per process whatever the model (its probes of the CPU's vector
# instruction sets, cached in memory after the first compile): what a process's first CPU build found,
# for the payloads of its later builds, whose folders do not see them compiled. A load compiles them
# otherwise (6 libraries, 8-10 s of a load on a 2-core CPU). The model's own kernels are the ".main.so" ones.
_PROCESS_HELPERS: dict[str, bytes] = {}


def collect(folder: Path) -> dict[str, bytes]:
    """The compiled kernel libraries in ``folder`` by their path in it, with this process's helper libraries."""
    found = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*.so"))}
    kernels = {name: path.read_bytes() for name, path in found.items() if _SAFE_PATH.match(name)}
    for name, data in kernels.items():
        if not name.endswith(".main.so"):
            _PROCESS_HELPERS.setdefault(name, data)
    return {**_PROCESS_HELPERS, **kernels}


def checked_name(name: str) -> str:
    """``name`` if it is a kernel library's path inside a cache folder, else a BuildError (no path escapes)."""
    if not _SAFE_PATH.match(name) or ".." in name.split("/"):
        raise BuildError(f"the engine's payload holds a native kernel at '{name}', outside a compiler cache's "
                         "layout; refusing it (rebuild the engine)")
    return name


def install(kernels: Mapping[str, bytes]) -> int:
    """Write the libraries into Inductor's cache folder where none is yet; how many were written."""
    if not kernels or os.environ.get(INSTALL_ENV, "1") == "0":
        return 0
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # pragma: no cover - a torch without it compiles the kernels again
        return 0

    root = Path(cache_dir())
    written = 0
    for name, data in kernels.items():
        target = root / checked_name(name)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # Another process may load the same engine at once: each writes its own file and renames it.
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.chmod(temporary, 0o755)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        written += 1
    return written
