"""Facts about the host that decide whether an engine built elsewhere can run here.

Backends add their own facts (library version, provider, GPU) on top of these
in ``Backend.fingerprint()``. Everything here is read from the OS without
third-party libraries so it works on any machine, including a bare Jetson.
"""

from __future__ import annotations

import os
import platform as _platform
from functools import lru_cache
from pathlib import Path

# The CPU features that change which kernels an optimizing runtime picks.
# An engine optimized on a machine with AVX-512 may contain layouts or fused
# kernels that a machine without it cannot run, so these are part of the
# fingerprint; the other hundred flags in /proc/cpuinfo are not.
RELEVANT_CPU_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    # Arm
    "asimd",
    "asimddp",
    "sve",
    "sve2",
    "i8mm",
    "bf16",
    "fphp",
    "asimdhp",
)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_fields() -> list[dict[str, str]]:
    """Processor blocks of /proc/cpuinfo as dicts (empty off Linux)."""
    blocks: list[dict[str, str]] = []
    for block in _read_text("/proc/cpuinfo").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


@lru_cache(maxsize=1)
def cpu_model() -> str:
    for fields in _cpuinfo_fields():
        for key in ("model name", "Hardware", "cpu model"):
            if fields.get(key):
                return fields[key]
    return _platform.processor() or _platform.machine() or "unknown"


@lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, ...]:
    """The fingerprint-relevant ISA features of this CPU, sorted."""
    blocks = _cpuinfo_fields()
    present: set[str] = set()
    if blocks:
        flags = blocks[0].get("flags") or blocks[0].get("Features") or ""
        present = set(flags.split())
    return tuple(sorted(f for f in RELEVANT_CPU_FLAGS if f in present))


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores (not hyper-threads); ORT runs best with one thread per core."""
    pairs = {
        (fields.get("physical id", "0"), fields["core id"])
        for fields in _cpuinfo_fields()
        if "core id" in fields
    }
    logical = os.cpu_count() or 1
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if pairs:
        return max(1, min(len(pairs), logical))
    return max(1, logical)


@lru_cache(maxsize=1)
def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def jetson_release() -> str | None:
    """The L4T release on an NVIDIA Jetson, or its device-tree model; ``None`` elsewhere."""
    release = _read_text("/etc/nv_tegra_release").strip()
    if release:
        return release.splitlines()[0]
    model = _read_text("/proc/device-tree/model").strip("\x00 \n")
    if "jetson" in model.lower() or "nvidia" in model.lower():
        return model
    return None


def host_fingerprint() -> dict[str, str]:
    """OS, CPU architecture and model, and the ISA features that matter."""
    facts = {
        "os": _platform.system().lower(),
        "arch": _platform.machine().lower(),
        "cpu": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
    }
    jetson = jetson_release()
    if jetson:
        facts["jetson"] = jetson
    return facts
