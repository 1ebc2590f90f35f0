"""What every part of the PyTorch backend shares: lazy torch import, devices, example inputs.

Nothing here imports onnx2torch or compiles anything; the other modules of the package
depend on this one, never the other way round.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ...errors import BackendUnavailableError, BuildError, MissingDependencyError
from ...signature import Signature, TensorSpec

PAYLOAD_NAME = "model.torch.zip"
PAYLOAD_FORMAT = 1
EXTRA_HINT = "pip install 'enginesmith[torch]'"
# onnx2torch's metadata asks for torchvision, which it needs only for RoiAlign (and its own NMS, replaced by onnx_ops');
# installing it with its dependencies could replace a CPU torch with a multi-GB CUDA build.
ONNX2TORCH_HINT = "pip install --no-deps 'onnx2torch==1.5.15'"
TORCH_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Environment switch: "0" ignores the compiler cache in payloads (recompile on load).
CACHES_ENV = "ENGINESMITH_TORCH_CACHES"
# Example size of non-batch dynamic dims at export (size 0/1 would be specialized).
DYNAMIC_DIM_EXAMPLE = 32


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(f"PyTorch is not installed: {EXTRA_HINT}") from None
    return torch




def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - absent or broken: the fingerprint says so
        return "none"


def _nvidia_driver() -> str:
    text = ""
    try:
        text = Path("/proc/driver/nvidia/version").read_text(errors="replace")
    except OSError:
        pass
    match = re.search(r"Kernel Module(?: for [\w-]+)?\s+([\d.]+)", text)
    if match:
        return match.group(1)
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001
        pass
    try:
        api = int(_torch()._C._cuda_getDriverVersion())
        return f"cuda-driver-api {api // 1000}.{api % 1000 // 10}"
    except Exception:  # noqa: BLE001
        return "unknown"


def _nvidia_present() -> bool:
    """An NVIDIA driver is loaded (checked without importing torch)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def _cxx_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def resolve_device(requested: str | None) -> str:
    """'cuda:N' or 'cpu' from a user request ('auto', 'cuda', 'cuda:1', 'cpu')."""
    torch = _torch()
    requested = (requested or "auto").lower()
    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda") or requested == "gpu":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "CUDA is not available to PyTorch here (no GPU, or a CPU-only torch build); "
                "build with backend_options device='cpu' or on the GPU machine"
            )
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise BackendUnavailableError(f"there is no GPU {index} here ({torch.cuda.device_count()} visible)")
        return f"cuda:{index}"
    raise BuildError(f"unknown device '{requested}': use auto, cuda, cuda:N or cpu")


def device_facts(device: str) -> dict[str, str]:
    """GPU name, compute capability, driver, CUDA and Triton versions ('none' on the CPU)."""
    torch = _torch()
    if not device.startswith("cuda"):
        return {"device": "cpu", "gpu": "none", "compute_capability": "none", "cuda": "none",
                "triton_version": "n/a (cpu)", "driver": "none"}
    if not torch.cuda.is_available():
        return {"device": "cuda", "gpu": "unavailable", "compute_capability": "none", "cuda": str(torch.version.cuda),
                "triton_version": _triton_version(), "driver": "none"}
    index = int(device.split(":")[1]) if ":" in device else 0
    props = torch.cuda.get_device_properties(index)
    return {
        "device": "cuda",
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": str(torch.version.cuda),
        "triton_version": _triton_version(),
        "driver": _nvidia_driver(),
        "gpu_memory_gib": f"{props.total_memory / 2**30:.0f}",
    }



def _example_shape(spec: TensorSpec, batch: int, known: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """A concrete example shape and the axes to mark dynamic.

    ``known``: a shape the model is known to run on (the build's sample), whose sizes are used for
    the open dims other than the batch; else those get ``DYNAMIC_DIM_EXAMPLE``.
    """
    shape, dynamic = [], []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
            dynamic.append(axis)
        else:
            shape.append(int(known[axis]) if known is not None and axis < len(known) else DYNAMIC_DIM_EXAMPLE)
            dynamic.append(axis)
    return shape, dynamic


def example_inputs(signature: Signature, batch: int, device: str, seed: int = 0,
                   known: Mapping[str, Sequence[int]] | None = None) -> list:
    """Random inputs of the signature at this batch (``known``: per input, sizes of the other open dims)."""
    torch = _torch()
    generator = np.random.default_rng(seed)
    tensors = []
    for spec in signature.inputs:
        shape, _ = _example_shape(spec, batch, (known or {}).get(spec.name))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            array = generator.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            array = generator.integers(0, 2, shape).astype(bool)
        else:
            # 0 and 1 only: integer inputs are mostly indices (BERT's token_type_ids index a 2-row table, and a
            # larger value trips Inductor's bounds check, a device-side assert on CUDA) or 0/1 masks.
            array = generator.integers(0, 2, shape).astype(dtype)
        tensors.append(torch.from_numpy(array).to(device))
    return tensors


def _torch_dtype(name: str):
    torch = _torch()
    return getattr(torch, TORCH_PRECISIONS.get(name, name))


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)



@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """torch logs whole graphs at warning level when export fails; the error we raise says enough."""
    import logging

    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

