"""The module torch.export traces: signature dtypes in and out, the engine's precision inside.

``export_program`` marks the batch (and other non-fixed dims) dynamic and turns trace
failures into one error naming the converted op they came from.
"""

from __future__ import annotations

import io
import re
import sys
import time
from contextlib import redirect_stderr
from typing import Any, Callable, Mapping, Sequence

from ...errors import MissingDependencyError, UnsupportedModelError
from ...signature import Signature
from .common import _example_shape, _first_line, _quiet_loggers, _torch, example_inputs

def _wrapper_class():
    torch = _torch()
    from torch.utils import _pytree as pytree

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
            # Dicts, dataclasses (transformers' ModelOutput) and nested tuples become a flat tuple.
            outs = pytree.tree_leaves(self.inner(*ordered))
            return tuple(o.to(d) if o.is_floating_point() and o.dtype != d else o for o, d in zip(outs, self.out_dtypes))

    return EngineModule


def _has_conv2d(module) -> bool:
    torch = _torch()
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


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


def _attempts(torch, signature: Signature, batch_dim, has_samples: bool) -> list[tuple[str, tuple | None]]:
    """dynamic_shapes to try, most dynamic first: every open dim; the batch only; nothing (at the sample's shapes)."""
    every, batch_only = [], []
    for spec in signature.inputs:
        _, axes = _example_shape(spec, 2)
        every.append({axis: (batch_dim if axis == 0 else torch.export.Dim.AUTO) for axis in axes} or None)
        batch_only.append({0: batch_dim} if 0 in axes else None)
    attempts: list[tuple[str, tuple | None]] = []
    if any(every):
        attempts.append(("dynamic", tuple(every)))
    if any(batch_only) and batch_only != every:
        attempts.append(("batch", tuple(batch_only)))
    if not attempts or has_samples:
        attempts.append(("static", None))
    return attempts


def export_program(module, signature: Signature, device: str, log: list[str],
                   sample_shapes: Mapping[str, Sequence[int]] | None = None):
    """torch.export with the batch dim (and other open dims, where the model allows) dynamic.

    Example sizes come from the build's samples (``sample_shapes``) where given: a model with a
    pooling stage or a positional table may not run at the generic example size. Dims the model
    cannot keep symbolic are fixed at those sizes (``Dim.AUTO``; then, when tracing still fails,
    every dim but the batch; then all, at the sample's shapes): see :func:`served_shapes`.
    """
    torch = _torch()
    # The batch is bounded: CUDA kernels such as batch norm guard it at 65535 (a grid dimension), and a
    # slice whose end is compared with it (tf2onnx's detection graphs: ends of 1e9) otherwise adds a guard
    # that carries torch's working assumption "batch >= 2" into the program; either fails the export with
    # "Constraints violated (batch)".
    batch_dim = torch.export.Dim("batch", min=1, max=65535)
    started = time.perf_counter()
    first_error: BaseException | None = None
    for label, dynamic_shapes in _attempts(torch, signature, batch_dim, bool(sample_shapes)):
        if label == "static" and sample_shapes:
            inputs = tuple(_sample_examples(signature, device, sample_shapes))
        else:
            inputs = tuple(example_inputs(signature, 2, device, known=sample_shapes))
        # torch.export prints the partial graph of a failed trace straight to stderr (not through
        # logging); it is caught here and shown only when the export succeeds (then it holds warnings).
        printed = io.StringIO()
        try:
            with torch.no_grad(), _quiet_loggers("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export"), \
                    redirect_stderr(printed):
                program = torch.export.export(module, inputs, dynamic_shapes=(dynamic_shapes,) if dynamic_shapes else None,
                                              strict=False)
        except MissingDependencyError:
            raise
        except Exception as exc:  # noqa: BLE001 - export errors are model limitations
            first_error = first_error or exc
            continue
        sys.stderr.write(printed.getvalue())
        if first_error is not None:
            log.append(f"torch.export could not keep every open dim symbolic ({_first_line(first_error)[:200]}); "
                       f"exported with {'the batch dynamic' if label == 'batch' else 'the sample shapes fixed'}")
        log.append(f"torch.export: {len(list(program.graph.nodes))} graph nodes, "
                   f"{'static shapes' if label == 'static' else 'dynamic batch'}, {time.perf_counter() - started:.1f} s")
        return program
    assert first_error is not None
    raise UnsupportedModelError(f"torch.export could not trace the model{_export_failure_site(first_error)}: "
                                f"{_first_line(first_error)[:300]}; the PyTorch backend needs a model without data-dependent "
                                "shapes (use --backend onnxruntime, or give the input sizes with --input NAME:SHAPE "
                                "or --data)") from None


def _sample_examples(signature: Signature, device: str, sample_shapes: Mapping[str, Sequence[int]]) -> list:
    """Random inputs at exactly the samples' shapes (the signature's fixed dims where a sample is missing)."""
    known = {name: list(shape) for name, shape in sample_shapes.items()}
    batch = next((int(shape[0]) for shape in known.values() if shape), 2)
    return example_inputs(signature, batch, device, known=known)


def served_shapes(program, signature: Signature) -> dict[str, list[int | None]]:
    """Per input, the shape the exported program accepts: an int where fixed, None where symbolic."""
    torch = _torch()
    user = list(program.graph_signature.user_inputs)
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    served: dict[str, list[int | None]] = {}
    for spec, name in zip(signature.inputs, user):
        value = nodes[name].meta.get("val")
        if value is None:
            served[spec.name] = [d if isinstance(d, int) else None for d in spec.shape]
            continue
        served[spec.name] = [None if isinstance(d, torch.SymInt) else int(d) for d in value.shape]
    return served


def _finite(bound) -> int | None:
    """A range bound as an int; None for sympy's / torch's infinities (``oo``, ``int_oo``)."""
    return None if "oo" in str(bound) else int(bound)


def served_ranges(program, signature: Signature) -> dict[str, list[list[int | None] | None]]:
    """Per input and axis, [lowest, highest] size (None: unbounded) the program was traced for, for symbolic axes.

    torch.export assumes an open size is at least 2 and decides size-1 tests (a squeeze, an If on a size)
    that way, but the exported module does not check its inputs against those ranges: size 1 there
    would run silently the other path. The session checks them (``TorchSession._check_served``).
    """
    torch = _torch()
    user = list(program.graph_signature.user_inputs)
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    bounds = {str(symbol): value for symbol, value in program.range_constraints.items()}
    ranges: dict[str, list[list[int | None] | None]] = {}
    for spec, name in zip(signature.inputs, user):
        value = nodes[name].meta.get("val")
        if value is None:
            continue
        axes: list[list[int | None] | None] = []
        for d in value.shape:
            found = bounds.get(str(d.node.expr)) if isinstance(d, torch.SymInt) else None
            if found is None:
                axes.append(None)
                continue
            axes.append([_finite(found.lower), _finite(found.upper)])
        if any(axes):
            ranges[spec.name] = axes
    return ranges


def allow_size_one(module, program, signature: Signature, ranges: dict, device: str, log: list[str],
                   make_cpu_copies: Callable[[], tuple[Any, Any] | None] | None = None) -> dict:
    """``ranges`` with size 1 allowed on the open axes where the program at size 1 gives the source's results.

    torch.export's working assumption "an open size is at least 2" matters only where the model
    decides something on that size; elsewhere size 1 runs fine and refusing it would break working
    engines (a detector with one class). So each such size (all the axes sharing its symbol at once)
    is tried at 1 on the module that was exported and on the program; equal results allow it.

    On a GPU the trial runs first on CPU copies (``make_cpu_copies`` makes them): a model that indexes out
    of bounds at size 1 raises an ``IndexError`` there, where CUDA would stop at a device-side assert
    that leaves the process's CUDA context unusable (every later call fails). Only when the CPU cannot
    tell (an op without a CPU kernel for this dtype) is the trial made on the device.
    """
    torch = _torch()
    user = list(program.graph_signature.user_inputs)
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    shapes, positions = [], {}
    for spec, name in zip(signature.inputs, user):
        value = nodes[name].meta.get("val")
        dims = list(value.shape) if value is not None else []
        concrete = []
        for axis, d in enumerate(dims):
            if isinstance(d, torch.SymInt):
                positions.setdefault(str(d.node.expr), []).append((spec.name, axis))
                concrete.append(int(d.node.hint) if d.node.hint is not None else 2)
            else:
                concrete.append(int(d))
        shapes.append(concrete)
    widened = {name: [list(b) if b else b for b in axes] for name, axes in ranges.items()}
    runner = program.module()
    gpu = str(device).startswith("cuda")
    on_cpu = make_cpu_copies() if make_cpu_copies is not None and positions and gpu else None
    for symbol, places in positions.items():
        if any(not widened.get(name) or not widened[name][axis] or widened[name][axis][0] != 2 for name, axis in places):
            continue
        trial = [list(shape) for shape in shapes]
        for name, axis in places:
            trial[signature.input_names.index(name)][axis] = 1
        known = {spec.name: shape for spec, shape in zip(signature.inputs, trial)}
        batch = trial[0][0] if trial and trial[0] else 1
        same = None
        if on_cpu is not None:
            try:
                same = _same_results(*on_cpu, example_inputs(signature, batch, "cpu", seed=7, known=known))
            except Exception as exc:  # noqa: BLE001 - sorted below
                if isinstance(exc, IndexError) or "out of bounds" in str(exc):
                    same = False
        if same is None:
            try:
                same = _same_results(module, runner, example_inputs(signature, batch, device, seed=7, known=known))
            except Exception:  # noqa: BLE001 - a model that cannot run at size 1 keeps its floor of 2
                same = False
        where = ", ".join(f"{name} axis {axis}" for name, axis in places)
        if same:
            for name, axis in places:
                widened[name][axis][0] = 1
        else:
            log.append(f"size 1 on {where} takes another path than the traced one: the engine refuses it")
    return widened


def _same_results(module, runner, inputs: Sequence[Any]) -> bool:
    torch = _torch()
    with torch.no_grad():
        want, got = module(*inputs), runner(*inputs)
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    return len(want) == len(got) and all(
        w.shape == g.shape and torch.allclose(g.double(), w.double(), rtol=1e-3, atol=1e-5, equal_nan=True)
        for w, g in zip(want, got))


def cpu_copies(module, program_bytes: bytes, load: Callable[[bytes], Any]) -> tuple[Any, Any] | None:
    """The module and a fresh load of the program, both moved to the CPU; None where that cannot be done."""
    import copy

    try:
        from torch.export.passes import move_to_device_pass

        return copy.deepcopy(module).to("cpu"), move_to_device_pass(load(program_bytes), "cpu").module()
    except Exception:  # noqa: BLE001 - an older torch or a module that will not copy: the trial runs on the device
        return None


def specialized_dims(served: Mapping[str, Sequence[int | None]], signature: Signature) -> dict[str, list[int]]:
    """Per input, the axes the signature leaves open but the program fixed."""
    fixed: dict[str, list[int]] = {}
    for spec in signature.inputs:
        axes = [axis for axis, (want, got) in enumerate(zip(spec.shape, served.get(spec.name, [])))
                if not (isinstance(want, int) and want >= 0) and got is not None]
        if axes:
            fixed[spec.name] = axes
    return fixed


def shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
