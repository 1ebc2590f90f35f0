"""Torch sources built directly: an ``nn.Module`` or ``ExportedProgram`` the importer handed over.

The build then skips PyTorch -> ONNX -> onnx2torch and exports the source itself. The module
built here takes the signature's inputs positionally and returns a flat tuple of tensors (dicts,
dataclasses such as transformers' ``ModelOutput`` and nested tuples are flattened in the order
the importer named the outputs). The payload holds the program this backend exports, so loading
the engine needs neither the user's Python classes nor the source.
"""

from __future__ import annotations

from typing import Any, Sequence

from ...native_source import NativeSource
from .common import _torch


def usable_source(source: Any, input_names: Sequence[str], output_names: Sequence[str], requested: str,
                  log: list[str]) -> NativeSource | None:
    """``source`` (the build's ``options.native_source``) when a build for these inputs and outputs may use it,
    else None (the reason logged when it matters)."""
    if requested == "onnx" or not isinstance(source, NativeSource) or source.framework != "torch":
        return None
    if tuple(input_names) != source.input_names or tuple(output_names) != source.output_names:
        log.append(f"{source.description}: the graph passes changed its inputs or outputs, so the engine is built from "
                   "the converted ONNX")
        return None
    return source


def _flat_module_classes() -> tuple[type, type]:
    torch = _torch()
    from torch.utils import _pytree as pytree

    class CallByName(torch.nn.Module):
        """The user's module called with keyword arguments (positionally when no names are known); outputs flattened."""

        def __init__(self, inner: Any, argument_names: tuple[str, ...]):
            super().__init__()
            self.inner = inner
            self.argument_names = tuple(argument_names)

        def forward(self, *inputs: Any) -> tuple:
            if not self.argument_names:
                return tuple(pytree.tree_leaves(self.inner(*inputs)))
            return tuple(pytree.tree_leaves(self.inner(**dict(zip(self.argument_names, inputs)))))

    class CallBySpec(torch.nn.Module):
        """An ExportedProgram's module called with its flat inputs unflattened by its input spec."""

        def __init__(self, inner: Any, in_spec: Any):
            super().__init__()
            self.inner = inner
            self.in_spec = in_spec

        def forward(self, *inputs: Any) -> tuple:
            if self.in_spec is None:
                result = self.inner(*inputs)
            else:
                args, kwargs = pytree.tree_unflatten(list(inputs), self.in_spec)
                result = self.inner(*args, **kwargs)
            return tuple(pytree.tree_leaves(result))

    return CallByName, CallBySpec


def source_module(source: NativeSource) -> Any:
    """An eval-mode copy of the source taking flat inputs in signature order and returning flat outputs."""
    import copy

    torch = _torch()
    by_name, by_spec = _flat_module_classes()
    if isinstance(source.model, torch.export.ExportedProgram):  # copied: the build moves and casts weights
        program = copy.deepcopy(source.model)
        return by_spec(program.module(), program.call_spec.in_spec)
    module = copy.deepcopy(source.model).eval()
    return by_name(module, source.argument_names)


def retarget_program(module: Any, dtype: Any, device: Any) -> int:
    """Make graph modules (an ExportedProgram's) run in ``dtype`` on ``device``, as their weights will.

    A program traced on the CPU in fp32 bakes both into its ops: ``full``/``_to_copy`` told to make
    float32 tensors (with half weights the next matmul fails), ``device=cpu`` factory arguments, and
    ``_assert_tensor_metadata`` checks that each input is on the CPU (every CUDA build of such a
    program failed them). Those checks are dropped (the build moves and casts on purpose); float32
    becomes ``dtype`` and the CPU becomes ``device``. Returns the number of float32 ops changed.
    """
    torch = _torch()
    target = torch.device(device)
    assert_metadata = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    changed = 0
    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        edited = False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if assert_metadata is not None and node.target in (assert_metadata, getattr(assert_metadata, "default", None)):
                graph.erase_node(node)
                edited = True
                continue
            if dtype != torch.float32 and node.kwargs.get("dtype") == torch.float32:
                node.kwargs = {**node.kwargs, "dtype": dtype}
                changed += 1
            if dtype != torch.float32 and any(arg is torch.float32 for arg in node.args):  # aten.to.dtype(x, torch.float32)
                node.args = tuple(dtype if arg is torch.float32 else arg for arg in node.args)
                changed += 1
            baked = node.kwargs.get("device")
            if isinstance(baked, torch.device) and baked != target:
                node.kwargs = {**node.kwargs, "device": target}
                edited = True
        if edited or changed:
            sub.recompile()
    return changed
