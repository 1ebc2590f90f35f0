"""PyTorch Inductor backend: ``torch.export`` + ``torch.compile`` engines for NVIDIA GPUs (and a CPU path).

Build
    ONNX models are converted to PyTorch with onnx2torch (after ONNX Runtime's
    provider-independent *basic* graph optimizations: constant folding, Dropout and
    Identity removal, Conv+BatchNorm folding), constant shape arguments are baked in,
    and the module is wrapped so it takes and returns the signature's dtypes while
    computing in the engine's precision (fp32, fp16 or bf16; channels-last on CUDA for
    convolutional models). ``torch.export`` turns it into an ExportedProgram (dynamic
    batch unless the signature fixes it), which is compiled by Inductor for this
    device: ``max-autotune`` (Triton/cuDNN autotuning + CUDA graphs) on CUDA for the
    fixed batch sizes in ``backend_options["batches"]``, no autotuning on the CPU. On
    CUDA, conv -> ReLU and conv -> add -> ReLU chains become cuDNN convolutions with
    fused epilogues first (``torch_conv_fusion``).

Payload
    A zip holding ``meta.json``, ``program.pt2`` (``torch.export.save``, checked on
    load to hold only JSON and raw tensors, so loading it unpickles nothing) and
    ``inductor_cache.bin`` (``torch.compiler.save_cache_artifacts()``: the compiled
    graphs, Triton kernels and autotuning results). Loading replays the cache, so a
    load on the same platform takes seconds instead of the minutes of autotuning.
    The compiler cache is *code* (pickled compiled graphs and kernel binaries): load
    engines of this backend only from builders you trust, or set
    ``ENGINESMITH_TORCH_CACHES=0`` to ignore the cache and recompile on load.

Backend options (``BuildOptions.backend_options``)
    ``device``     "auto" (CUDA when available), "cuda", "cuda:N" or "cpu"
    ``compile``    "inductor" (default), "eager" (run the exported program uncompiled)
                   or "aoti" (AOTInductor package, see ``_aoti_*``; experimental: on the H100 image
                   its packages crashed when loaded in a fresh process, so load() probes them
                   in a child process first)
    ``mode``       torch.compile mode; default "max-autotune" on CUDA, "default" on CPU
    ``batches``    batch sizes compiled ahead on CUDA (default: the fixed batch, else [1]);
                   other batch sizes run the exported program uncompiled, so no call
                   triggers minutes of autotuning
    ``tf32``       allow TF32 in fp32 engines (default False: only when the budget allows)
    ``channels_last``  "auto" (CUDA + 4-D convolution inputs), true or false
    ``inductor``   extra Inductor options, e.g. {"coordinate_descent_tuning": false} or {"freezing": true}
    ``cudnn_benchmark``  let cuDNN time its convolution algorithms for each shape (default true
                   on CUDA; process-wide, like PyTorch's flag): Inductor's autotuning compares
                   against the cuDNN convolution, so with heuristics alone it compares against a
                   possibly slower algorithm than cuDNN can run
    ``cudnn_benchmark_limit``  how many cuDNN algorithms that search times per shape (PyTorch's
                   default 10; 0 times every one): recorded, and set again at load
    ``fuse_conv``  "auto" (on CUDA for convolutional models), true or false: conv2d -> ReLU and
                   conv2d -> add -> ReLU run as cuDNN convolutions with fused epilogues
                   (``torch_conv_fusion``); the rewrite is applied before compiling, at build and
                   at load, so the saved program stays plain ATen. Not with compile="aoti".
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import types
import uuid
import warnings
import zipfile
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx

from ..errors import BackendUnavailableError, BuildError, MissingDependencyError, UnsupportedModelError
from ..host import host_fingerprint
from ..signature import Signature, TensorSpec
from .base import Availability, Backend, BuildOptions, BuildResult, Calibration, ProgressCallback, Session, node_names

PAYLOAD_NAME = "model.torch.zip"
PAYLOAD_FORMAT = 1
EXTRA_HINT = "pip install 'enginesmith[torch]'"
# onnx2torch's metadata asks for torchvision, which it needs only for NonMaxSuppression/RoiAlign;
# installing it with its dependencies could replace a CPU torch with a multi-GB CUDA build.
ONNX2TORCH_HINT = "pip install --no-deps 'onnx2torch==1.5.15'"
TORCH_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Environment switch: "0" ignores the compiler cache in payloads (recompile on load).
CACHES_ENV = "ENGINESMITH_TORCH_CACHES"
# Example size of non-batch dynamic dims at export (size 0/1 would be specialized).
DYNAMIC_DIM_EXAMPLE = 32


# --------------------------------------------------------------------------- lazy imports and facts


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(f"PyTorch is not installed: {EXTRA_HINT}") from None
    return torch


_O2T_LOCK = threading.Lock()


def _onnx2torch():
    """onnx2torch, importable without torchvision.

    onnx2torch imports torchvision at import time only for its NonMaxSuppression and
    RoiAlign converters; when torchvision is absent a placeholder stands in during the
    import (and is removed right after) so every other converter works. Models using
    those two ops then fail with a message naming torchvision (see ``_check_ops``).
    """
    with _O2T_LOCK:
        if "onnx2torch" in sys.modules:
            return sys.modules["onnx2torch"]
        if importlib.util.find_spec("onnx2torch") is None:
            raise MissingDependencyError(f"converting ONNX models for the PyTorch backend needs onnx2torch: {ONNX2TORCH_HINT}")
        placeholder = importlib.util.find_spec("torchvision") is None
        if placeholder:
            tv = types.ModuleType("torchvision")
            ops = types.ModuleType("torchvision.ops")

            def _missing(*_args: Any, **_kwargs: Any) -> Any:
                raise MissingDependencyError("this model's NonMaxSuppression/RoiAlign nodes need torchvision: pip install torchvision")

            ops.nms = ops.roi_align = ops.box_convert = _missing  # type: ignore[attr-defined]
            tv.ops = ops  # type: ignore[attr-defined]
            sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
        try:
            module = importlib.import_module("onnx2torch")
        except Exception as exc:  # noqa: BLE001 - a broken install must read as a dependency problem
            raise MissingDependencyError(f"onnx2torch could not be imported ({exc}): {ONNX2TORCH_HINT}") from None
        finally:
            if placeholder:
                sys.modules.pop("torchvision", None)
                sys.modules.pop("torchvision.ops", None)
        return module


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


# --------------------------------------------------------------------------- ONNX -> torch


def _basic_optimized(model: onnx.ModelProto, log: list[str]) -> onnx.ModelProto:
    """ONNX Runtime's provider-independent rewrites (constant folding, no-op removal, Conv+BN).

    Best effort: the original model is used when ONNX Runtime cannot load it, or the
    rewrite leaves ops outside the standard domain.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return model
    with tempfile.TemporaryDirectory(prefix="enginesmith-torch-") as tmp:
        path = os.path.join(tmp, "basic.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = path
        so.log_severity_level = 4
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            optimized = onnx.load(path)
        except Exception as exc:  # noqa: BLE001 - the pre-pass is optional
            log.append(f"ONNX basic optimizations skipped ({str(exc).splitlines()[0][:160]})")
            return model
    odd = sorted({n.op_type for n in optimized.graph.node if n.domain not in ("", "ai.onnx")})
    if odd:
        log.append(f"ONNX basic optimizations skipped (they introduced {', '.join(odd)})")
        return model
    log.append(f"ONNX basic optimizations (constant folding, Conv+BN): {len(model.graph.node)} nodes -> {len(optimized.graph.node)}")
    return optimized


def _opset(model: onnx.ModelProto, domain: str) -> int:
    for entry in model.opset_import:
        if entry.domain == domain or (domain in ("", "ai.onnx") and entry.domain in ("", "ai.onnx")):
            return int(entry.version)
    return 1


def _converter_for(node: onnx.NodeProto, model: onnx.ModelProto):
    from onnx2torch.node_converters import get_converter

    return get_converter(operation_type=node.op_type, version=_opset(model, node.domain), domain=node.domain)


def op_status(model: onnx.ModelProto) -> dict[int, tuple[str, str]]:
    """Per node index: (status, reason) by whether onnx2torch has a converter for it."""
    _onnx2torch()
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    status: dict[int, tuple[str, str]] = {}
    for i, node in enumerate(model.graph.node):
        try:
            _converter_for(node, model)
        except NotImplementedError:
            status[i] = ("unsupported", f"onnx2torch has no converter for {node.domain or 'ai.onnx'} {node.op_type} at opset {_opset(model, node.domain)}")
            continue
        if node.op_type in ("NonMaxSuppression", "RoiAlign") and not has_torchvision:
            status[i] = ("unsupported", "needs torchvision (pip install torchvision)")
        elif node.op_type in ("NonZero", "NonMaxSuppression", "Unique"):
            status[i] = ("conditional", "data-dependent output shape: torch.export may refuse it")
        else:
            status[i] = ("supported", "")
    return status


def _check_ops(model: onnx.ModelProto) -> None:
    """Raise one error naming every op the converter lacks, with the nodes using it."""
    status = op_status(model)
    bad: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    labels = node_names(model)
    for i, (state, reason) in status.items():
        if state == "unsupported":
            op = model.graph.node[i].op_type
            bad.setdefault(op, []).append(labels[i])
            reasons[op] = reason
    if bad:
        parts = [
            f"'{op}' (nodes: {', '.join(nodes[:5])}{'...' if len(nodes) > 5 else ''}; {reasons[op]})"
            for op, nodes in sorted(bad.items())
        ]
        raise UnsupportedModelError(
            f"the PyTorch backend cannot convert op{'s' if len(bad) > 1 else ''} {', '.join(parts)}; "
            "replace the ops in the model or use another backend (e.g. --backend onnxruntime)"
        )


def _locate_conversion_failure(model: onnx.ModelProto) -> str:
    """The first node whose converter fails, and why (run only after convert() failed)."""
    from onnx2torch.onnx_graph import OnnxGraph

    graph = OnnxGraph(model.graph)
    for onnx_node in graph.nodes.values():
        proto = onnx_node.proto
        try:
            _converter_for(proto, model)(onnx_node, graph)
        except Exception as exc:  # noqa: BLE001
            return f"node '{proto.name or onnx_node.unique_name}' (op {proto.op_type}): {exc}"
    return ""


# Shape arithmetic as Python values: ONNX computes shapes with tensors (Shape -> Gather ->
# Unsqueeze -> Concat -> Reshape); torch.export cannot read tensor values, but it traces
# Python ints and symbolic sizes. These helpers carry such values as lists (1-D) or scalars (0-D).


def _sv_shape(x, start, end):
    return list(x.shape[start:end])


def _sv_gather(values, index):
    return [values[i] for i in index] if isinstance(index, list) else values[index]


def _sv_unsqueeze(value):
    return [value]


def _sv_squeeze(values):
    return values[0]


def _sv_squeeze_dims(x, axes):
    result = x
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        result = result.squeeze(axis)
    return result


def _sv_unsqueeze_dims(x, axes):
    rank = x.dim() + len(axes)
    result = x
    for axis in sorted(a % rank for a in axes):
        result = result.unsqueeze(axis)
    return result


def _sv_concat(*parts):
    out: list = []
    for part in parts:
        out.extend(part if isinstance(part, list) else [part])
    return out


def _sv_binary(op: str, a, b):
    import operator

    fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.floordiv}[op]
    if isinstance(a, list) or isinstance(b, list):
        n = len(a) if isinstance(a, list) else len(b)
        a = a if isinstance(a, list) else [a] * n
        b = b if isinstance(b, list) else [b] * n
        return [fn(x, y) for x, y in zip(a, b)]
    return fn(a, b)


def _sv_reshape(x, shape):
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _sv_expand(x, shape):
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ss = [1] * (rank - len(shape)) + list(shape)
    return x.reshape(xs).expand([xd if isinstance(s, int) and s == 1 else s for xd, s in zip(xs, ss)])


def _sv_tile(x, repeats):
    return x.repeat(repeats)


def _sv_slice(x, starts, ends, axes, steps):
    index: list[Any] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis % x.dim()] = slice(start, end, step)
    return x[tuple(index)]


def _sv_reduce_sum(x, axes, keepdims: bool, noop: bool):
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    return x.sum(dim=sorted(a % x.dim() for a in axes), keepdim=keepdims)


_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "_onnx_div": "div"}


def _specialize_constants(gm, log: list[str]) -> None:
    """Make shape arithmetic and shape-like initializer arguments Python values; drop Dropout.

    onnx2torch passes shape-like inputs (Reshape's shape, Slice's starts, ReduceSum's axes)
    as tensors and reads their values at run time, and computes dynamic shapes with
    tensors (Shape -> Gather -> Concat -> Reshape). torch.export traces weights and
    intermediate tensors symbolically, so such reads are data-dependent and fail. Here
    the values become Python constants and symbolic sizes instead.
    """
    torch = _torch()
    graph = gm.graph
    lowered: set = set()

    def const(arg):
        """An integer initializer as a Python int (0-D) or list (1-D); else None."""
        if getattr(arg, "op", None) != "get_attr":
            return None
        value = gm
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dim() > 1 or value.numel() > 64:
            return None
        return int(value.item()) if value.dim() == 0 else [int(v) for v in value.tolist()]

    def value(arg):
        if arg in lowered:
            return arg
        return const(arg)

    changed: dict[str, int] = {}

    def replace(node, fn, args) -> None:
        with graph.inserting_before(node):
            new = graph.call_function(fn, tuple(args))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        kind = node.target if isinstance(node.target, str) else str(node.target)
        changed[kind_of.get(kind, kind)] = changed.get(kind_of.get(kind, kind), 0) + 1
        return new

    kind_of: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        kind = type(module).__name__
        kind_of[str(node.target)] = kind
        args = list(node.args)
        if node.kwargs and kind not in ("OnnxSlice",):
            continue
        first_lowered = bool(args) and args[0] in lowered
        if kind in ("Dropout", "OnnxDropoutDynamic", "Identity", "OnnxCopyIdentity") and args:
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
            changed[kind] = changed.get(kind, 0) + 1
        elif kind == "OnnxShape":
            lowered.add(replace(node, _sv_shape, [args[0], module._start, module._end]))
        elif kind == "OnnxGather" and first_lowered and module._axis == 0 and (idx := const(args[1])) is not None:
            lowered.add(replace(node, _sv_gather, [args[0], idx]))
        elif kind == "OnnxUnsqueezeStaticAxes" and first_lowered and list(module._axes) == [0]:
            lowered.add(replace(node, _sv_unsqueeze, [args[0]]))
        elif kind == "OnnxSqueezeStaticAxes" and first_lowered and list(module.axes or [0]) == [0]:
            lowered.add(replace(node, _sv_squeeze, [args[0]]))
        elif kind in ("OnnxSqueezeDynamicAxes", "OnnxUnsqueezeDynamicAxes") and len(args) == 2 \
                and (axes := const(args[1])) is not None:
            axes = axes if isinstance(axes, list) else [axes]
            if first_lowered and axes == [0]:
                fn = _sv_squeeze if kind == "OnnxSqueezeDynamicAxes" else _sv_unsqueeze
                lowered.add(replace(node, fn, [args[0]]))
            elif not first_lowered:
                fn = _sv_squeeze_dims if kind == "OnnxSqueezeDynamicAxes" else _sv_unsqueeze_dims
                replace(node, fn, [args[0], axes])
        elif kind == "OnnxCast" and first_lowered and not module.torch_dtype.is_floating_point:
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
        elif kind == "OnnxConcat" and any(a in lowered for a in args) and all(value(a) is not None for a in args):
            lowered.add(replace(node, _sv_concat, [value(a) for a in args]))
        elif kind == "OnnxBinaryMathOperation" and len(args) == 2 and any(a in lowered for a in args) \
                and all(value(a) is not None for a in args) and module.broadcast is None:
            op = _BINARY.get(getattr(module.math_op_function, "__name__", ""))
            if op is not None:
                lowered.add(replace(node, _sv_binary, [op, value(args[0]), value(args[1])]))
        elif kind in ("OnnxReshape", "OnnxExpand", "OnnxTile") and len(args) == 2 and value(args[1]) is not None:
            fn = {"OnnxReshape": _sv_reshape, "OnnxExpand": _sv_expand, "OnnxTile": _sv_tile}[kind]
            replace(node, fn, [args[0], value(args[1])])
        elif kind == "OnnxSlice" and len(args) >= 3:
            params = args[1:] + [node.kwargs[k] for k in ("axes", "steps") if k in node.kwargs]
            values = [const(a) for a in params]
            if all(isinstance(v, list) for v in values):
                starts, ends = values[0], values[1]
                axes = values[2] if len(values) > 2 else list(range(len(starts)))
                steps = values[3] if len(values) > 3 else [1] * len(starts)
                if all(step > 0 for step in steps):
                    replace(node, _sv_slice, [args[0], starts, ends, axes, steps])
        elif kind == "OnnxReduceSumDynamicAxes" and len(args) == 2 and (axes := const(args[1])) is not None:
            axes = axes if isinstance(axes, list) else [axes]
            replace(node, _sv_reduce_sum, [args[0], axes, bool(module._keepdims), bool(module._noop_with_empty_axes)])
    if changed:
        graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        log.append("shape arguments made static for torch.export: " + ", ".join(f"{k} x{v}" for k, v in sorted(changed.items())))


def _fix_outputs(gm, model: onnx.ModelProto, output_names: list[str]) -> None:
    """Make the graph return exactly the model's outputs, in signature order.

    onnx2torch returns one value per producing node; a node with several outputs would
    return them all. Each output is looked up through the modules' ONNX mapping instead.
    """
    import operator

    producers: dict[str, tuple[Any, int, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mapping = getattr(gm.get_submodule(node.target), "onnx_mapping", None)
        if mapping is None:
            continue
        for index, value in enumerate(mapping.outputs):
            producers[value] = (node, index, len(mapping.outputs))
    outputs = []
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    for name in output_names:
        if name not in producers:
            raise UnsupportedModelError(
                f"output '{name}' is not computed by a node (it is a graph input or a weight); "
                "the PyTorch backend needs every output produced by an op"
            )
        node, index, count = producers[name]
        if count == 1:
            outputs.append(node)
        else:
            with gm.graph.inserting_before(output_node):
                outputs.append(gm.graph.call_function(operator.getitem, (node, index)))
    output_node.args = (tuple(outputs),)
    gm.recompile()


def onnx_to_torch(model: onnx.ModelProto, signature: Signature, log: list[str]):
    """An eval-mode torch module taking the signature's inputs in order and returning a tuple of outputs."""
    o2t = _onnx2torch()
    _check_ops(model)
    model = _basic_optimized(model, log)
    try:
        gm = o2t.convert(model, attach_onnx_mapping=True)
    except MissingDependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - converter errors are user-facing model problems
        where = _locate_conversion_failure(model)
        raise UnsupportedModelError(
            f"onnx2torch could not convert the model: {where or str(exc).splitlines()[0]}; "
            "use another backend (e.g. --backend onnxruntime)"
        ) from None
    _fix_outputs(gm, model, signature.output_names)
    _specialize_constants(gm, log)
    gm.eval()
    graph_inputs = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    order = [graph_inputs.index(name) for name in signature.input_names]
    log.append(f"converted with onnx2torch {getattr(o2t, '__version__', _dist_version('onnx2torch'))}")
    return gm, order


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


# --------------------------------------------------------------------------- the exported module


def _wrapper_class():
    torch = _torch()

    class EngineModule(torch.nn.Module):
        """Signature dtypes in and out, compute dtype and memory format inside."""

        def __init__(self, inner, order: list[int], compute_dtype, float_inputs: list[bool],
                     out_dtypes: list, channels_last: bool):
            super().__init__()
            self.inner = inner
            self.order = order
            self.compute_dtype = compute_dtype
            self.float_inputs = float_inputs
            self.out_dtypes = out_dtypes
            self.channels_last = channels_last

        def forward(self, *inputs):
            xs = []
            for x, is_float in zip(inputs, self.float_inputs):
                if is_float:
                    x = x.to(self.compute_dtype)
                    if self.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                xs.append(x)
            ordered = [None] * len(xs)
            for position, index in enumerate(self.order):
                ordered[index] = xs[position]
            out = self.inner(*ordered)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return tuple(o.to(d) if o.is_floating_point() and o.dtype != d else o for o, d in zip(outs, self.out_dtypes))

    return EngineModule


def _has_conv2d(module) -> bool:
    torch = _torch()
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def _example_shape(spec: TensorSpec, batch: int) -> tuple[list[int], list[int]]:
    """A concrete example shape and the axes to mark dynamic."""
    shape, dynamic = [], []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
            dynamic.append(axis)
        else:
            shape.append(DYNAMIC_DIM_EXAMPLE)
            dynamic.append(axis)
    return shape, dynamic


def example_inputs(signature: Signature, batch: int, device: str, seed: int = 0) -> list:
    torch = _torch()
    generator = np.random.default_rng(seed)
    tensors = []
    for spec in signature.inputs:
        shape, _ = _example_shape(spec, batch)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            array = generator.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            array = generator.integers(0, 2, shape).astype(bool)
        else:
            array = generator.integers(0, 4, shape).astype(dtype)
        tensors.append(torch.from_numpy(array).to(device))
    return tensors


def _torch_dtype(name: str):
    torch = _torch()
    return getattr(torch, TORCH_PRECISIONS.get(name, name))


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _export_failure_site(exc: BaseException) -> str:
    """Which converted op torch.export failed in, read from its error text and traceback."""
    import traceback

    text = str(exc) + "".join(traceback.format_tb(exc.__traceback__))
    converter = re.findall(r"onnx2torch/node_converters/(\w+)\.py", text)
    executing = re.search(r"While executing %\S+ : .*?target=([^\]\s,]+)", text)
    parts = []
    if converter:
        parts.append(f"onnx2torch's {converter[-1]} converter")
    if executing:
        parts.append(f"module '{executing.group(1)}'")
    return f" (in {', '.join(parts)})" if parts else ""


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


def export_program(module, signature: Signature, device: str, log: list[str]):
    """torch.export with the batch dim (and other non-fixed dims) dynamic."""
    torch = _torch()
    # CUDA kernels such as batch norm guard the batch at 65535 (a grid dimension); without the
    # bound, export of such models fails with "Constraints violated (batch)".
    batch_dim = torch.export.Dim("batch", min=1, max=65535) if device.startswith("cuda") else torch.export.Dim("batch", min=1)
    dynamic_shapes = []
    any_dynamic = False
    for spec in signature.inputs:
        _, axes = _example_shape(spec, 2)
        spec_dims = {axis: (batch_dim if axis == 0 else torch.export.Dim.AUTO) for axis in axes}
        any_dynamic |= bool(axes)
        dynamic_shapes.append(spec_dims or None)
    inputs = tuple(example_inputs(signature, 2, device))
    started = time.perf_counter()
    # torch.export prints the partial graph of a failed trace straight to stderr (not through
    # logging); it is caught here and shown only when the export succeeds (then it holds warnings).
    printed = io.StringIO()
    try:
        with torch.no_grad(), _quiet_loggers("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export"), \
                redirect_stderr(printed):
            program = torch.export.export(module, inputs, dynamic_shapes=(tuple(dynamic_shapes),) if any_dynamic else None,
                                          strict=False)
        sys.stderr.write(printed.getvalue())
    except MissingDependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - export errors are model limitations
        raise UnsupportedModelError(f"torch.export could not trace the model{_export_failure_site(exc)}: "
                                    f"{_first_line(exc)[:300]}; the PyTorch backend needs a model without data-dependent "
                                    "shapes (use --backend onnxruntime, or fix the batch size in the model)") from None
    log.append(f"torch.export: {len(list(program.graph.nodes))} graph nodes, "
               f"{'dynamic batch' if any_dynamic else 'static shapes'}, {time.perf_counter() - started:.1f} s")
    return program


# --------------------------------------------------------------------------- payload


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


def pack_payload(meta: dict[str, Any], program: bytes, cache: bytes | None, aoti: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("meta.json", json.dumps(meta, indent=1, sort_keys=True))
        archive.writestr("program.pt2", program)
        if cache:
            archive.writestr("inductor_cache.bin", cache)
        if aoti:
            archive.writestr("aoti.pt2", aoti)
    return buffer.getvalue()


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


# --------------------------------------------------------------------------- compile


@contextmanager
def _fresh_artifacts() -> Iterator[None]:
    """Collect only the cache artifacts of the compile inside (not earlier ones in this process)."""
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:  # pragma: no cover - torch without the mega-cache: nothing to isolate
        yield
        return
    fresh = getattr(CacheArtifactManager, "with_fresh_cache", None)
    if fresh is not None:
        with fresh():
            yield
    else:  # pragma: no cover - older torch
        CacheArtifactManager.clear()
        yield


@contextmanager
def _cache_tag(tag: str) -> Iterator[None]:
    """Key the compiler caches by this engine, so a build always compiles (and records) afresh."""
    torch = _torch()
    config = getattr(torch.compiler, "config", None)
    if config is not None and hasattr(config, "cache_key_tag"):
        with config.patch(cache_key_tag=tag):
            yield
    else:  # pragma: no cover - older torch
        yield


def _set_fp32_math(torch, tf32: bool) -> None:
    """TF32 on or off for matmuls and cuDNN (process-wide, as PyTorch has it).

    The legacy flags on purpose: torch 2.11-2.13 read ``cudnn.allow_tf32`` internally (in
    torch.export, for one) and raise once the newer ``fp32_precision`` API has been used.
    """
    if torch.backends.cuda.matmul.allow_tf32 != tf32:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if torch.backends.cudnn.allow_tf32 != tf32:
        torch.backends.cudnn.allow_tf32 = tf32


def _set_cudnn_benchmark(torch, meta: Mapping[str, Any]) -> None:
    """Turn cuDNN's per-shape algorithm search on for engines that ask for it (never off: other code may rely on it)."""
    if not (meta["device"].startswith("cuda") and meta.get("cudnn_benchmark")):
        return
    if not torch.backends.cudnn.benchmark:
        torch.backends.cudnn.benchmark = True
    limit = meta.get("cudnn_benchmark_limit")
    if limit is not None and hasattr(torch.backends.cudnn, "benchmark_limit"):
        torch.backends.cudnn.benchmark_limit = int(limit)


def _benchmark_limit(value: Any) -> int | None:
    if value is None:
        return None
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = -1
    if limit < 0 or str(value).strip() not in (str(limit), f"{limit}.0"):
        raise BuildError(f"cudnn_benchmark_limit must be a whole number >= 0 (0 times every algorithm), not {value!r}")
    return limit


def inductor_options(meta: Mapping[str, Any]) -> dict[str, Any]:
    torch = _torch()
    options = dict(torch._inductor.list_mode_options(meta["mode"]))
    if not meta["device"].startswith("cuda"):
        options.pop("triton.cudagraphs", None)
    options.update(meta.get("inductor") or {})
    return options


def _fused_module(program, meta: Mapping[str, Any], log: list[str]):
    """A fresh module of the program with cuDNN-fused convolution epilogues (``torch_conv_fusion``)."""
    from enginesmith.backends.torch_conv_fusion import fuse_conv_epilogues

    module = program.module()
    counts = fuse_conv_epilogues(module)
    log.append("cuDNN fused epilogues" + (" (on CUDA; unfused reference kernels elsewhere)" if not
                                          meta["device"].startswith("cuda") else "") + ": "
               + ", ".join(f"{pattern} x{n}" for pattern, n in counts.items()))
    return module


def compile_module(module, meta: Mapping[str, Any]):
    """The callable a session runs: torch.compile'd (lazily compiled on first calls) or eager."""
    torch = _torch()
    if meta["compile"] == "eager":
        return module
    limit = len(meta.get("batches") or []) + 4
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    return torch.compile(module, backend="inductor", options=inductor_options(meta),
                         dynamic=meta["dynamic"], fullgraph=True)


def _warm(fn, meta: Mapping[str, Any], signature: Signature, device: str) -> dict[int, float]:
    """Run every precompiled batch size (compiling, recording CUDA graphs); seconds per batch."""
    torch = _torch()
    seconds: dict[int, float] = {}
    for batch in meta["warm_batches"]:
        inputs = example_inputs(signature, batch, device, seed=batch)
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(3 if meta.get("cudagraphs") else 1):
                fn(*inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        seconds[batch] = round(time.perf_counter() - started, 2)
    return seconds


def _aoti_compile(program, meta: Mapping[str, Any], tmp: str) -> bytes:
    """AOTInductor: the program compiled ahead of time into a .so inside a .pt2 package."""
    torch = _torch()
    options = {k: v for k, v in inductor_options(meta).items() if k != "triton.cudagraphs"}
    path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "aoti.pt2"),
                                                    inductor_configs=options)
    return Path(path).read_bytes()


class _GraphedRunner:
    """CUDA graphs around a runner (an AOTInductor model) for fixed batch sizes.

    AOTInductor has no CUDA-graph support of its own, and at batch 1 kernel launches
    dominate; each compiled batch size is captured once and replayed with its inputs
    copied into the graph's static buffers. Other shapes call the runner directly.
    """

    def __init__(self, runner, signature: Signature, device: str, batches: list[int], log: list[str]):
        torch = _torch()
        self._runner = runner
        self._graphs: dict[tuple, tuple] = {}
        for batch in batches:
            static = example_inputs(signature, batch, device, seed=batch)
            try:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(2):
                        runner(*static)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), torch.no_grad():
                    outputs = runner(*static)
            except Exception as exc:  # noqa: BLE001 - capture is an optimization; run uncaptured instead
                log.append(f"CUDA graph capture of the AOTInductor model failed at batch {batch}: "
                           f"{_first_line(exc)[:200]}; it runs without CUDA graphs")
                torch.cuda.synchronize(device)
                self._graphs.clear()
                return
            outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            self._graphs[tuple(tuple(t.shape) for t in static)] = (graph, static, outs)
        if self._graphs:
            log.append(f"AOTInductor model captured in CUDA graphs for batches {', '.join(map(str, batches))}")

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def __call__(self, *inputs):
        entry = self._graphs.get(tuple(tuple(t.shape) for t in inputs))
        if entry is None:
            return self._runner(*inputs)
        graph, static, outs = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return outs


# Packages that loaded in a child process already (sha256), so each is probed once per process.
_AOTI_PROBED: set[str] = set()
AOTI_PROBE_ENV = "ENGINESMITH_TORCH_AOTI_PROBE"

_AOTI_PROBE_SCRIPT = """
import sys, torch
index = int(sys.argv[2])
if index >= 0:
    torch.zeros(1, device=f"cuda:{index}")
torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True, device_index=index)
print("aoti-load-ok")
"""


def _aoti_probe(path: str, index: int, digest: str) -> None:
    """Load the package in a child process first: with PyTorch 2.11+cu130 on the H100 image, loading an
    AOTInductor package in a process other than the one that compiled it died with SIGSEGV inside
    AOTIModelPackageLoader (benchmarks/results/gpu_torch.json). A crash there must not take the caller
    down, so it becomes a BuildError. ENGINESMITH_TORCH_AOTI_PROBE=0 skips the probe."""
    import signal
    import subprocess

    if digest in _AOTI_PROBED or os.environ.get(AOTI_PROBE_ENV, "1") == "0":
        return
    try:
        done = subprocess.run([sys.executable, "-c", _AOTI_PROBE_SCRIPT, path, str(index)], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BuildError("loading the engine's AOTInductor package did not finish in 600 s; rebuild the engine "
                         "with backend_options compile='inductor'") from None
    if done.returncode == 0 and "aoti-load-ok" in done.stdout:
        _AOTI_PROBED.add(digest)
        return
    if done.returncode < 0:
        try:
            why = f"it crashed with {signal.Signals(-done.returncode).name}"
        except ValueError:
            why = f"it was killed by signal {-done.returncode}"
    else:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = f"it failed: {lines[-1][:300] if lines else f'exit status {done.returncode}'}"
    raise BuildError(f"this PyTorch ({_torch().__version__}) cannot load the engine's AOTInductor package ({why} in a "
                     "probe process); rebuild the engine with backend_options compile='inductor' (the default)")


def _aoti_load(data: bytes, device: str, probe: bool = True):
    torch = _torch()
    with tempfile.NamedTemporaryFile(prefix="enginesmith-aoti-", suffix=".pt2", delete=False) as handle:
        handle.write(data)
    try:
        index = int(device.split(":")[1]) if device.startswith("cuda:") else -1
        if probe:
            _aoti_probe(handle.name, index, hashlib.sha256(data).hexdigest())
        # Calls are serialized by the session's lock, and the runner's own locking breaks CUDA-graph capture.
        return torch._inductor.aoti_load_package(handle.name, run_single_threaded=True, device_index=index)
    finally:
        Path(handle.name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- session


class TorchSession(Session):
    """Runs the compiled program; numpy in/out through pinned staging buffers on CUDA.

    ``run_torch`` keeps inputs and outputs on the device (torch tensors, or anything with
    ``__dlpack__`` as input). Calls are serialized by a lock: CUDA graph replays share
    static buffers.
    """

    def __init__(self, compiled, eager, meta: dict[str, Any], signature: Signature, load_seconds: float = 0.0,
                 cache_info: str = ""):
        torch = _torch()
        self._torch = torch
        self._compiled = compiled
        self._eager = eager
        self.meta = meta
        self._signature = signature
        self._device = torch.device(meta["device"])
        self._cuda = self._device.type == "cuda"
        self._batches = set(meta.get("batches") or [])
        self._lock = threading.Lock()
        self._staging: dict[tuple, Any] = {}
        self._warned: set[int] = set()
        self.load_seconds = load_seconds
        self.cache_info = cache_info
        self.load_steps: dict[str, float] = {}

    @property
    def device(self) -> str:
        return str(self._device)

    def _pick(self, batch: int):
        if not self._cuda or self.meta["dynamic"] or batch in self._batches or self.meta["compile"] != "inductor":
            return self._compiled
        if batch not in self._warned:
            self._warned.add(batch)
            warnings.warn(
                f"batch {batch} was not compiled into this engine (compiled: {sorted(self._batches)}); it runs the "
                "exported program uncompiled. Rebuild with backend_options batches=[...] to compile it.",
                RuntimeWarning,
                stacklevel=3,
            )
        return self._eager

    def _call(self, tensors: list):
        torch = self._torch
        batch = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
        fn = self._pick(batch)
        if self._cuda and self.meta["precision"] == "fp32":
            _set_fp32_math(torch, bool(self.meta.get("tf32")))
        with torch.no_grad():
            outputs = fn(*tensors)
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    def _staged(self, key: tuple, shape, dtype):
        buffer = self._staging.get(key)
        if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
            if len(self._staging) > 32:
                self._staging.clear()
            buffer = self._torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
            self._staging[key] = buffer
        return buffer

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with self._lock:
            tensors = []
            for spec in self._signature.inputs:
                array = np.ascontiguousarray(feeds[spec.name])
                if self._cuda:
                    host = self._staged(("in", spec.name), array.shape, torch.from_numpy(array[:0]).dtype)
                    np.copyto(host.numpy(), array, casting="no")
                    tensors.append(host.to(self._device, non_blocking=True))
                else:
                    tensors.append(torch.from_numpy(array))
            outputs = self._call(tensors)
            result: dict[str, np.ndarray] = {}
            if self._cuda:
                hosts = []
                for name, out in zip(self._signature.output_names, outputs):
                    host = self._staged(("out", name), out.shape, out.dtype)
                    host.copy_(out, non_blocking=True)
                    hosts.append((name, host))
                torch.cuda.current_stream(self._device).synchronize()
                for name, host in hosts:
                    result[name] = host.numpy().copy()
            else:
                for name, out in zip(self._signature.output_names, outputs):
                    result[name] = out.detach().numpy().copy()
            return result

    def run_torch(self, feeds: Mapping[str, Any], clone: bool = True) -> dict[str, Any]:
        """Run on tensors (moved to the engine's device if elsewhere); outputs stay on the device.

        With CUDA graphs the outputs live in static buffers the next call overwrites;
        ``clone=False`` skips the copy for callers that consume outputs before calling again.
        """
        with self._lock:
            outputs = self._call(self._device_tensors(feeds))
            return {name: (out.clone() if clone else out) for name, out in zip(self._signature.output_names, outputs)}

    # Engine.infer_device: tensors on the engine's device in and out, no host copies.
    supports_device_io = True

    def run_device(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Torch tensors (or any DLPack producer) in, torch tensors out; ``outputs`` given are filled in place."""
        if not outputs:
            return self.run_torch(feeds)
        torch = self._torch
        with self._lock:
            results = self._call(self._device_tensors(feeds))
            filled = {}
            # Copied while the lock is held: CUDA-graph outputs are static buffers the next call reuses.
            for name, value in zip(self._signature.output_names, results):
                target = outputs.get(name)
                if target is None:
                    filled[name] = value.clone()
                    continue
                target = target if isinstance(target, torch.Tensor) else torch.from_dlpack(target)
                target.copy_(value)
                filled[name] = target
            return filled

    def _device_tensors(self, feeds: Mapping[str, Any]) -> list:
        torch = self._torch
        tensors = []
        for spec in self._signature.inputs:
            value = feeds[spec.name]
            if not isinstance(value, torch.Tensor):
                value = torch.from_dlpack(value) if hasattr(value, "__dlpack__") else torch.as_tensor(value)
            if value.device != self._device:
                value = value.to(self._device, non_blocking=True)
            tensors.append(value)
        return tensors

    def close(self) -> None:
        self._compiled = self._eager = None
        self._staging.clear()


# --------------------------------------------------------------------------- backend

# The session compiled by the last build, handed to the load() that api.build does right after.
_HANDOFF: dict[str, TorchSession] = {}


class TorchCompileBackend(Backend):
    name = "torch"
    display_name = "PyTorch Inductor"

    @property
    def auto_priority(self) -> int:  # type: ignore[override]
        """Above ONNX Runtime (10) with a CUDA GPU, below it on CPU-only machines."""
        if not _nvidia_present() or importlib.util.find_spec("torch") is None:
            return 5
        try:
            return 15 if _torch().cuda.is_available() else 5
        except Exception:  # noqa: BLE001
            return 5

    def available(self) -> Availability:
        if importlib.util.find_spec("torch") is None:
            return Availability(False, f"PyTorch is not installed: {EXTRA_HINT}")
        try:
            _torch()
        except Exception as exc:  # noqa: BLE001 - a broken torch install is "not available"
            return Availability(False, f"PyTorch cannot be imported: {str(exc).splitlines()[0]}")
        return Availability(True)

    def version(self) -> str:
        return str(_torch().__version__)

    def fingerprint(self, options: BuildOptions) -> dict[str, str]:
        requested = str(options.backend_options.get("device", "auto"))
        torch = _torch()
        if requested == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        else:
            device = requested if requested != "gpu" else "cuda:0"
        return {**host_fingerprint(), "backend_version": self.version(), **device_facts(device)}

    def must_match(self) -> list[str]:
        return ["os", "arch", "device", "gpu", "compute_capability", "backend_version", "triton_version", "cuda"]

    def payload_runs_code(self, options: BuildOptions) -> str | None:
        compile_mode = options.backend_options.get("compile", "inductor")
        if compile_mode == "aoti":
            return "its AOTInductor package is a native shared library"
        if compile_mode != "eager" and os.environ.get(CACHES_ENV, "1") != "0":
            return (f"its Inductor compiler cache holds pickled compiled graphs and kernels; set {CACHES_ENV}=0 "
                    "to ignore the cache and compile again on load instead (minutes with max-autotune)")
        return None

    def describe_platform(self, fingerprint: Mapping[str, str]) -> str:
        version = fingerprint.get("backend_version", "?")
        if fingerprint.get("device") == "cuda":
            return (f"{fingerprint.get('gpu', '?')} (compute {fingerprint.get('compute_capability', '?')}) / "
                    f"PyTorch Inductor {version}, CUDA {fingerprint.get('cuda', '?')}, Triton {fingerprint.get('triton_version', '?')}")
        return f"{fingerprint.get('arch', '?')} CPU / PyTorch Inductor {version}"

    def precisions(self, options: BuildOptions) -> list[str]:
        device = resolve_device(options.backend_options.get("device"))
        if not device.startswith("cuda"):
            return ["fp32"]
        torch = _torch()
        bf16 = torch.cuda.is_bf16_supported()
        return ["fp32", "bf16", "fp16"] if bf16 else ["fp32", "fp16"]

    def op_support(self, model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str, str]]:
        status = op_status(model)
        return {label: status[i] for i, label in enumerate(node_names(model))}

    # ---------------------------------------------------------------- build

    def _resolve(self, options: BuildOptions, signature: Signature, module, log: list[str]) -> dict[str, Any]:
        bo = dict(options.backend_options)
        device = resolve_device(bo.get("device"))
        cuda = device.startswith("cuda")
        precision = options.precision
        if precision == "int8":
            raise UnsupportedModelError("the PyTorch Inductor backend builds fp32, fp16 and bf16 engines; "
                                        "for int8 use --backend onnxruntime")
        if precision not in TORCH_PRECISIONS:
            raise BuildError(f"unknown precision '{precision}' for the PyTorch backend: use fp32, fp16 or bf16")
        if precision != "fp32" and not cuda and not options.force_precision:
            log.append(f"{precision} does not pay on the CPU (Inductor's CPU kernels are fastest in fp32), so the "
                       "engine stays fp32; pass --force-precision to build it anyway")
            precision = "fp32"
        kind = str(bo.get("compile", "inductor")).lower()
        if kind not in ("inductor", "eager", "aoti"):
            raise BuildError(f"unknown compile '{kind}' for the PyTorch backend: use inductor, eager or aoti")
        if kind != "eager" and not cuda and _cxx_compiler() is None:
            log.append("no C++ compiler found: Inductor cannot generate CPU code here, so the engine runs the "
                       "exported program uncompiled (compile=eager)")
            kind = "eager"
        mode = str(bo.get("mode") or ("max-autotune" if cuda else "default"))
        fixed = signature.fixed_batch()
        dynamic_batch = fixed is None and any(s.rank and not isinstance(s.shape[0], int) for s in signature.inputs)
        if cuda:
            batches = [int(b) for b in bo.get("batches") or [fixed or 1]]
            if fixed is not None and batches != [fixed]:
                log.append(f"the model's batch is fixed at {fixed}: compiling that batch only")
                batches = [fixed]
            dynamic, warm = False, batches
        else:
            batches = []
            dynamic = dynamic_batch
            warm = [fixed] if fixed else ([2, 1] if dynamic_batch else [1])
        channels_last = bo.get("channels_last", "auto")
        if channels_last == "auto":
            channels_last = cuda and _has_conv2d(module) and any(s.rank == 4 for s in signature.inputs)
        options_inductor = dict(bo.get("inductor") or {})
        try:
            mode_options = _torch()._inductor.list_mode_options(mode)
        except RuntimeError:
            raise BuildError(f"unknown torch.compile mode '{mode}': use default, reduce-overhead, max-autotune "
                             "or max-autotune-no-cudagraphs") from None
        cudagraphs = cuda and bool({**mode_options, **options_inductor}.get("triton.cudagraphs"))
        benchmark_limit = _benchmark_limit(bo.get("cudnn_benchmark_limit"))  # checked on every device
        fuse_conv = bo.get("fuse_conv", "auto")
        if fuse_conv == "auto":
            fuse_conv = cuda and kind != "aoti" and _has_conv2d(module)
        elif not isinstance(fuse_conv, bool):
            raise BuildError(f"fuse_conv must be auto, true or false, not {fuse_conv!r}")
        elif fuse_conv and kind == "aoti":
            raise BuildError("fuse_conv cannot be combined with compile=aoti (an AOTInductor package cannot call "
                             "enginesmith's fused operators): pass fuse_conv=false")
        return {
            "format": PAYLOAD_FORMAT,
            "device": device,
            "precision": precision,
            "compile": kind,
            "mode": mode,
            "inductor": options_inductor,
            "batches": batches if cuda else [],
            "warm_batches": warm,
            "dynamic": bool(dynamic),
            "cudagraphs": cudagraphs,
            "channels_last": bool(channels_last),
            "tf32": bool(bo.get("tf32", False)) and precision == "fp32",
            "cudnn_benchmark": bool(bo.get("cudnn_benchmark", True)) and cuda,
            "cudnn_benchmark_limit": benchmark_limit if cuda else None,
            "fuse_conv": fuse_conv,
            "tag": f"enginesmith-{uuid.uuid4().hex}",
            "torch": self.version(),
            "triton": _triton_version() if cuda else "n/a",
        }

    def build(
        self,
        model: Any,
        signature: Signature,
        options: BuildOptions,
        progress: ProgressCallback | None = None,
        calibration: Calibration | None = None,
    ) -> BuildResult:
        """``model`` is an ONNX ModelProto, or natively a torch.nn.Module / torch.export.ExportedProgram
        taking the signature's inputs in order."""
        torch = _torch()
        log = [f"PyTorch {torch.__version__}"]
        started = time.perf_counter()

        def step(stage: str, done: int, total: int | None) -> None:
            if progress:
                progress(stage, done, total)

        step("converting", 0, 1)
        if isinstance(model, onnx.ModelProto):
            inner, order = onnx_to_torch(model, signature, log)
        elif isinstance(model, torch.export.ExportedProgram):  # copied: the build moves and casts weights
            inner, order = copy.deepcopy(model).module(), list(range(len(signature.inputs)))
            log.append("source: torch.export program (no conversion)")
        elif isinstance(model, torch.nn.Module):
            inner, order = copy.deepcopy(model).eval(), list(range(len(signature.inputs)))
            log.append("source: torch module (no conversion)")
        else:
            raise BuildError(f"the PyTorch backend cannot build from a {type(model).__name__}")
        convert_s = time.perf_counter() - started
        step("converting", 1, 1)
        meta = self._resolve(options, signature, inner, log)
        device = meta["device"]
        cuda = device.startswith("cuda")
        if cuda:
            facts = device_facts(device)
            log.append(f"device {facts['gpu']} (compute {facts['compute_capability']}), CUDA {facts['cuda']}, "
                       f"Triton {facts['triton_version']}, driver {facts['driver']}")
        dtype = _torch_dtype(meta["precision"])
        inner = inner.to(device=device, dtype=dtype)
        if meta["channels_last"]:
            inner = inner.to(memory_format=torch.channels_last)
        with torch.no_grad():  # each weight gets its own dense storage (onnx2torch keeps some as views)
            for tensor in list(inner.parameters()) + list(inner.buffers()):
                layout = torch.channels_last if meta["channels_last"] and tensor.dim() == 4 else torch.contiguous_format
                tensor.data = tensor.data.clone(memory_format=layout)
        wrapper = _wrapper_class()(
            inner, order, dtype,
            [np.dtype(s.dtype).kind == "f" for s in signature.inputs],
            [_torch_dtype(np.dtype(s.dtype).name) if np.dtype(s.dtype).kind in "fiub" else dtype for s in signature.outputs],
            meta["channels_last"],
        ).eval()
        log.append(f"precision {meta['precision']}" + (", channels-last" if meta["channels_last"] else "")
                   + (", TF32 allowed" if meta["tf32"] else (", TF32 off" if cuda and meta["precision"] == "fp32" else "")))
        step("exporting", 0, 1)
        export_started = time.perf_counter()
        program = export_program(wrapper, signature, device, log)
        export_s = time.perf_counter() - export_started
        step("exporting", 1, 1)
        program_bytes = _save_program(program)
        program = _load_program(program_bytes)  # compile exactly what load() will compile
        eager = program.module()
        runnable = _fused_module(program, meta, log) if meta["fuse_conv"] else eager
        cache: bytes | None = None
        aoti: bytes | None = None
        warm_s: dict[int, float] = {}
        _set_cudnn_benchmark(torch, meta)
        compile_started = time.perf_counter()
        step("compiling", 0, len(meta["warm_batches"]))
        if meta["compile"] == "eager":
            compiled = runnable
            log.append("compile=eager: the exported program runs uncompiled (no Inductor)")
        elif meta["compile"] == "aoti":
            # AOTInductor wants example inputs (size hints for autotuning); the saved program has none.
            program.example_inputs = (tuple(example_inputs(signature, meta["warm_batches"][0], device)), {})
            with tempfile.TemporaryDirectory(prefix="enginesmith-aoti-") as tmp:
                try:
                    aoti = _aoti_compile(program, meta, tmp)
                except Exception as exc:  # noqa: BLE001
                    raise BuildError(f"AOTInductor compile failed: {str(exc).splitlines()[0][:300]}") from None
            compiled = _aoti_load(aoti, device, probe=False)  # the compiling process itself loaded it before
            log.append(f"AOTInductor package compiled ({len(aoti) / 2**20:.1f} MiB, mode {meta['mode']}) in "
                       f"{time.perf_counter() - compile_started:.1f} s")
            if cuda and meta["cudagraphs"]:
                compiled = _GraphedRunner(compiled, signature, device, meta["batches"], log)
        else:
            compiled = compile_module(runnable, meta)
            if cuda and meta["precision"] == "fp32":
                _set_fp32_math(torch, meta["tf32"])
            with _fresh_artifacts(), _cache_tag(meta["tag"]):
                try:
                    warm_s = _warm(compiled, meta, signature, device)
                except Exception as exc:  # noqa: BLE001 - Inductor failures are build failures
                    raise BuildError(f"Inductor could not compile the model: {str(exc).strip().splitlines()[-1][:300]}") from None
                saved = torch.compiler.save_cache_artifacts()
            cache = saved[0] if saved else None
            where = "CUDA, fixed batches " + ", ".join(map(str, meta["batches"])) if cuda else (
                "CPU, dynamic batch" if meta["dynamic"] else "CPU")
            log.append(
                f"Inductor mode '{meta['mode']}' ({where}{', CUDA graphs' if meta['cudagraphs'] else ''})"
                + ("" if cuda else ": no autotuning on the CPU, so builds stay fast")
                + f"; compile {sum(warm_s.values()):.1f} s"
                + (f"; compiler cache {len(cache) / 2**20:.1f} MiB stored for warm loads" if cache else "; no compiler cache recorded")
            )
        compile_s = time.perf_counter() - compile_started
        step("compiling", len(meta["warm_batches"]), len(meta["warm_batches"]))
        check = self._self_check(compiled, eager, meta, signature)
        meta_out = {k: v for k, v in meta.items() if k != "warm_batches"}
        meta_out["warm_batches"] = meta["warm_batches"]
        meta_out["build_seconds"] = round(time.perf_counter() - started, 2)
        payload = pack_payload(meta_out, program_bytes, cache, aoti)
        session = TorchSession(compiled, runnable, meta_out, signature)
        _HANDOFF.clear()
        _HANDOFF[hashlib.sha256(payload).hexdigest()] = session
        backend_options = {**options.backend_options, "device": device, "compile": meta["compile"], "mode": meta["mode"]}
        if cuda:
            backend_options["batches"] = meta["batches"]
        resolved = BuildOptions(precision=meta["precision"], threads=options.threads, force_precision=options.force_precision,
                                calibration_method=options.calibration_method, backend_options=backend_options)
        details = {
            "device": device,
            "compile": meta["compile"],
            "mode": meta["mode"],
            "batches": meta["batches"],
            "dynamic": meta["dynamic"],
            "cudagraphs": meta["cudagraphs"],
            "channels_last": meta["channels_last"],
            "cudnn_benchmark": meta["cudnn_benchmark"],
            "cudnn_benchmark_limit": meta["cudnn_benchmark_limit"],
            "fuse_conv": meta["fuse_conv"],
            "inductor_options": meta["inductor"],
            "convert_seconds": round(convert_s, 2),
            "export_seconds": round(export_s, 2),
            "compile_seconds": round(compile_s, 2),
            "compile_seconds_per_batch": {str(k): v for k, v in warm_s.items()},
            "build_seconds": meta_out["build_seconds"],
            "cache_bytes": len(cache or b""),
            "program_bytes": len(program_bytes),
            "compiled_vs_exported_rel_l2": check,
        }
        return BuildResult(payload=payload, payload_name=PAYLOAD_NAME, resolved_options=resolved, log=log, details=details)

    def _self_check(self, compiled, eager, meta, signature: Signature) -> dict[str, float]:
        """Relative L2 distance of the compiled (and fused) program from the exported one, per compiled batch."""
        torch = _torch()
        if compiled is eager:
            return {}
        result = {}
        for batch in meta["warm_batches"]:
            inputs = example_inputs(signature, batch, meta["device"], seed=1000 + batch)
            with torch.no_grad():
                got = compiled(*inputs)
                want = eager(*inputs)
            got = got if isinstance(got, (tuple, list)) else (got,)
            want = want if isinstance(want, (tuple, list)) else (want,)
            worst = 0.0
            for g, w in zip(got, want):
                if not w.is_floating_point():
                    continue
                g64, w64 = g.double(), w.double()
                worst = max(worst, float(torch.linalg.vector_norm(g64 - w64) / torch.linalg.vector_norm(w64).clamp_min(1e-30)))
            result[str(batch)] = worst
        return result

    # ---------------------------------------------------------------- load

    def load(self, payload: bytes | Path, options: BuildOptions, signature: Signature) -> Session:
        torch = _torch()
        data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
        handed = _HANDOFF.pop(hashlib.sha256(data).hexdigest(), None)
        if handed is not None:  # the session the build just compiled; the process settings are set again all the same
            _set_cudnn_benchmark(torch, handed.meta)
            return handed
        started = time.perf_counter()
        steps: dict[str, float] = {}

        def lap(name: str, since: float) -> float:
            now = time.perf_counter()
            steps[name] = round(now - since, 2)
            return now

        meta, program_bytes, cache, aoti = unpack_payload(data)
        cuda = meta["device"].startswith("cuda")
        if cuda:
            resolve_device(meta["device"])  # raises a clear error without a GPU
            _set_cudnn_benchmark(torch, meta)
        eager = None
        if meta["compile"] != "aoti":  # an AOTInductor model serves every batch size itself
            try:
                program = _load_program(program_bytes)
            except BuildError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise BuildError(f"PyTorch could not load the engine's program: {str(exc).splitlines()[0][:300]}") from None
            eager = _fused_module(program, meta, []) if meta.get("fuse_conv") else program.module()
        mark = lap("program", started)
        info = ""
        if meta["compile"] == "eager":
            compiled = eager
        elif meta["compile"] == "aoti":
            if aoti is None:
                raise BuildError("the engine was built with AOTInductor but carries no package: rebuild it")
            compiled = _aoti_load(aoti, meta["device"])
            mark = lap("aoti_package", mark)
            if cuda and meta.get("cudagraphs"):
                notes: list[str] = []
                compiled = _GraphedRunner(compiled, signature, meta["device"], meta.get("batches") or [], notes)
                info = "; ".join(notes)
                lap("cuda_graphs", mark)
        else:
            if cache and os.environ.get(CACHES_ENV, "1") != "0":
                loaded = torch.compiler.load_cache_artifacts(cache)
                info = "compiler cache loaded" if loaded is not None else "compiler cache unreadable here (recompiling)"
            else:
                info = "compiler cache not used (recompiling)"
            mark = lap("cache_artifacts", mark)
            compiled = compile_module(eager, meta)
            if cuda and meta["precision"] == "fp32":
                _set_fp32_math(torch, bool(meta.get("tf32")))
            with _cache_tag(meta["tag"]):
                for batch, seconds in _warm(compiled, meta, signature, meta["device"]).items():
                    steps[f"compile_batch_{batch}"] = seconds
        session = TorchSession(compiled, eager, meta, signature, load_seconds=time.perf_counter() - started, cache_info=info)
        session.load_steps = steps
        return session
