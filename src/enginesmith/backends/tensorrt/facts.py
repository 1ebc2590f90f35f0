"""The platform facts a TensorRT engine depends on, and how a mismatch is put into words.

A serialized TensorRT engine runs only with the TensorRT version that built it
(or a later one of the same major, when built version-compatible) and on the GPU
model it was tuned for (or any Ampere-or-newer GPU, when built hardware-compatible).
On a Jetson the L4T release pins TensorRT, CUDA and the driver together, so it is
part of the fingerprint too. Reading and comparing these facts needs no TensorRT;
only collecting them on a live machine does (``TensorRTBackend.fingerprint``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

# Keys whose difference makes an engine unloadable (see module docstring).
MUST_MATCH = ["os", "arch", "tensorrt", "gpu_target", "l4t", "dla"]

# L4T major -> JetPack major (NVIDIA's JetPack archive: R32 = 4.x, R35 = 5.x, R36 = 6.x, R38 = 7.x).
JETPACK_OF_L4T = {32: "4", 34: "5 (developer preview)", 35: "5", 36: "6", 38: "7"}


def parse_l4t_release(text: str) -> str | None:
    """``"R35.4.1"`` from /etc/nv_tegra_release (``# R35 (release), REVISION: 4.1, GCID: ...``)."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2)}" if match else None


def describe_l4t(release: str | None) -> str | None:
    """``"R35.4.1 (JetPack 5)"``; the JetPack major is implied by the L4T major."""
    if not release:
        return None
    match = re.match(r"R(\d+)", release)
    jetpack = JETPACK_OF_L4T.get(int(match.group(1))) if match else None
    return f"{release} (JetPack {jetpack})" if jetpack else release


def board_name(model: str) -> str:
    """``"Jetson AGX Xavier"`` from the device-tree model ``"NVIDIA Jetson AGX Xavier Developer Kit"``."""
    name = model.strip("\x00 \n")
    name = re.sub(r"^NVIDIA\s+", "", name)
    return re.sub(r"\s+(Developer Kit|Engineering Reference Developer Kit)$", "", name).strip()


def jetson_facts(root: str = "/") -> dict[str, str]:
    """``l4t`` and ``board`` on a Jetson (from /etc/nv_tegra_release and the device tree); empty elsewhere."""
    base = Path(root)
    facts: dict[str, str] = {}
    release = parse_l4t_release(_read(base / "etc" / "nv_tegra_release"))
    if release:
        facts["l4t"] = describe_l4t(release) or release
    model = _read(base / "proc" / "device-tree" / "model")
    if model and ("jetson" in model.lower() or release):
        facts["board"] = board_name(model)
    return facts


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def gpu_target(name: str, compute_capability: tuple[int, int], hardware_compatibility: str) -> str:
    """The GPUs an engine built with ``hardware_compatibility`` on this GPU runs on, as one comparable string.

    Computed the same way on the building and the loading machine, so equality means the
    loading GPU is inside the set the engine was built for.
    """
    major, minor = compute_capability
    sm = f"sm_{major}{minor}"
    if hardware_compatibility == "ampere_plus":
        return "Ampere or newer (sm_80+)" if major >= 8 else f"{name} ({sm}, older than Ampere)"
    if hardware_compatibility == "same_compute_capability":
        return f"any GPU of {sm}"
    return f"{name} ({sm})"


def tensorrt_target(version: str, version_compatible: bool) -> str:
    """Exact version, or ``"10.x (version-compatible)"``: such engines run on later releases of the same major."""
    if version_compatible:
        return f"{version.split('.')[0]}.x (version-compatible)"
    return version


def describe_platform(fingerprint: Mapping[str, str]) -> str:
    """E.g. ``Jetson AGX Xavier (sm_72) / TensorRT 8.6.2 / L4T R35.4.1 (JetPack 5)``."""
    where = fingerprint.get("board") or fingerprint.get("gpu") or fingerprint.get("arch", "?")
    capability = fingerprint.get("compute_capability")
    if capability:
        where += f" (sm_{capability.replace('.', '')})"
    text = f"{where} / TensorRT {fingerprint.get('backend_version', '?')}"
    if fingerprint.get("l4t"):
        text += f" / L4T {fingerprint['l4t']}"
    if fingerprint.get("dla"):
        text += f" / {fingerprint['dla']}"
    return text
