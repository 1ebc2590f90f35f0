"""ONNX -> PyTorch: onnx2torch (plus enginesmith's converters) and the fixes torch.export needs.

``onnx_to_torch`` converts after ONNX Runtime's basic rewrites, makes shape arithmetic
Python values (torch.export cannot read tensor values) and returns exactly the model's
outputs. ``op_status`` answers ``enginesmith inspect --target torch`` per node.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import threading
import types
from typing import Any

import onnx

from ...errors import MissingDependencyError, UnsupportedModelError
from ...signature import Signature
from ..base import node_names
from . import onnx_if, onnx_ops
from .common import ONNX2TORCH_HINT, _torch
from .onnx_shape_values import specialize_shape_values

_O2T_LOCK = threading.Lock()


def _onnx2torch():
    """onnx2torch with enginesmith's converters (``onnx_ops``) registered."""
    module = _import_onnx2torch()
    onnx_ops.register()
    return module


def _import_onnx2torch():
    """onnx2torch, importable without torchvision.

    onnx2torch imports torchvision at import time only for its NonMaxSuppression and
    RoiAlign converters; when torchvision is absent a placeholder stands in during the
    import (and is removed right after) so every other converter works. NonMaxSuppression
    is converted by ``onnx_ops`` without torchvision; models using RoiAlign then fail with
    a message naming torchvision (see ``_check_ops``).
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
                raise MissingDependencyError("this model's RoiAlign nodes need torchvision: pip install torchvision")

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
    """Per node index: (status, reason), by running the node's converter (onnx2torch's or ``onnx_ops``').

    A converter that exists but refuses the node's attributes (Reshape allowzero with a 0,
    Pad with axes, a Reduce with computed axes) makes the node unsupported with its reason.
    """
    _onnx2torch()
    from onnx2torch.onnx_graph import OnnxGraph

    has_torchvision = importlib.util.find_spec("torchvision") is not None
    try:
        graph = OnnxGraph(model.graph)
        graph_nodes = list(graph.nodes.values())
    except Exception:  # noqa: BLE001 - a graph onnx2torch cannot even read: judge by converter presence only
        graph_nodes = []
    status: dict[int, tuple[str, str]] = {}
    for i, node in enumerate(model.graph.node):
        try:
            converter = _converter_for(node, model)
        except NotImplementedError:
            status[i] = ("unsupported", f"onnx2torch has no converter for {node.domain or 'ai.onnx'} {node.op_type} at opset {_opset(model, node.domain)}")
            continue
        if len(graph_nodes) == len(model.graph.node):
            try:
                with onnx_if.converting(model):
                    converter(graph_nodes[i], graph)
            except NotImplementedError as exc:
                status[i] = ("unsupported", f"the converter refuses it: {exc}")
                continue
            except Exception:  # noqa: BLE001 - other converter failures surface at build with the node named
                pass
        if node.op_type == "RoiAlign" and not has_torchvision:
            status[i] = ("unsupported", "needs torchvision (pip install torchvision)")
        elif node.op_type in ("NonZero", "Unique"):
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
            with onnx_if.converting(model):
                _converter_for(proto, model)(onnx_node, graph)
        except Exception as exc:  # noqa: BLE001
            return f"node '{proto.name or onnx_node.unique_name}' (op {proto.op_type}): {exc}"
    return ""


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
        with onnx_if.converting(model):
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
    specialize_shape_values(gm, log)
    for branch in _if_branches(gm):  # each If's branches are converted modules of their own
        specialize_shape_values(branch, log)
    gm.eval()
    graph_inputs = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
    order = [graph_inputs.index(name) for name in signature.input_names]
    log.append(f"converted with onnx2torch {getattr(o2t, '__version__', _dist_version('onnx2torch'))}")
    return gm, order


def _if_branches(gm) -> list:
    found = []
    for module in gm.modules():
        if type(module).__name__ == "OnnxIf":
            found += [module.then_branch, module.else_branch]
    return found


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def retarget_casts(module, dtype, log: list[str]) -> int:
    """Casts to float32 inside a converted graph cast to the engine's ``dtype`` instead.

    The module's weights follow ``module.to(dtype)``, but an ONNX ``Cast(to=FLOAT)`` (a uint8 image
    made float inside a TensorFlow detector) would still hand float32 to fp16 convolutions.
    """
    torch = _torch()
    changed = 0
    for sub in module.modules():
        if type(sub).__name__ == "OnnxCast" and getattr(sub, "torch_dtype", None) is torch.float32:
            sub.torch_dtype = dtype
            changed += 1
    if changed:
        log.append(f"{changed} casts to float32 in the graph cast to {str(dtype).replace('torch.', '')} instead")
    return changed
