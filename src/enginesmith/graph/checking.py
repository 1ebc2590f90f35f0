"""Is a graph pass safe? The model before and the model after it, run by ONNX Runtime (through the backend
module) on the same inputs, must give the same outputs within a tolerance; a batch axis a pass made dynamic
must also give, item by item, what the model before gives for each item alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ..signature import is_named_symbol
from ._onnx import dims_of, plain_runner, produced_tensors, random_array, user_inputs, with_outputs


@dataclass(frozen=True)
class PassTolerance:
    """Outputs agree when |after - before| <= atol x max(1, max|before|) + rtol x |before| element-wise."""

    rtol: float = 1e-4
    atol: float = 1e-5


@dataclass
class CheckResult:
    ok: bool
    reason: str = ""
    max_abs_diff: float | None = None


class RunCache:
    """Outputs of models already run on given feeds (a model is run at most once per feed set)."""

    def __init__(self) -> None:
        self._runs: dict[tuple, tuple[onnx.ModelProto, dict[str, np.ndarray]]] = {}

    def run(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
        digest = tuple(sorted((k, v.shape, v.dtype.str, hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest())
                             for k, v in feeds.items()))
        key = (id(model), digest, tuple(extra))
        if key not in self._runs:
            runnable = with_outputs(model, extra) if extra else model
            outputs = plain_runner(runnable)(dict(feeds))
            self._runs[key] = (model, outputs)  # keeps the model alive so its id is not reused
        return self._runs[key][1]


# How the reason of a pass that was not applied because its check could not run begins.
UNCHECKABLE = "outputs cannot be checked"


def error_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def check_equivalent(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    tolerance: PassTolerance | None = None,
    *,
    seed: int = 0,
    batch: int = 2,
    other_dims: int = 8,
    cache: RunCache | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> CheckResult:
    """Do ``before`` and ``after`` compute the same outputs on generated inputs?

    Inputs and outputs are matched by name; a renamed one by position; a tensor that is an
    intermediate of ``before`` (after a cut) is read from ``before``'s run. Symbolic dimensions
    get ``batch`` on axis 0 and ``other_dims`` elsewhere. Dimensions ``after`` made dynamic are
    also run once at another size; an axis 0 that was fixed at 1 (a batch) is run at
    :data:`ITEMS_CHECKED` distinct items, each item's outputs compared with ``before`` run on that
    item alone (a model that runs at batch N but mixes its items fails). ``feeds`` (sample inputs
    by name) are used instead of generated inputs wherever their shapes fit both models.
    """
    tolerance = tolerance or PassTolerance()
    cache = cache or RunCache()
    pre_in, post_in = user_inputs(before.graph), user_inputs(after.graph)
    pre_out = [o.name for o in before.graph.output]
    post_out = [o.name for o in after.graph.output]
    pre_names = [v.name for v in pre_in]
    pre_tensors = set(produced_tensors(before.graph))
    renamed_in = len(pre_in) == len(post_in)
    renamed_out = len(pre_out) == len(post_out)

    in_map: dict[str, tuple[str, str]] = {}  # post input -> ("input"|"tensor", name in before)
    for j, value in enumerate(post_in):
        if value.name in pre_names:
            in_map[value.name] = ("input", value.name)
        elif value.name in pre_tensors:
            in_map[value.name] = ("tensor", value.name)
        elif renamed_in and pre_names[j] not in {v.name for v in post_in}:
            in_map[value.name] = ("input", pre_names[j])
        else:
            return CheckResult(False, f"input '{value.name}' has no counterpart in the model before the pass")
    out_map: dict[str, str] = {}
    for j, name in enumerate(post_out):
        if name in pre_out or name in pre_tensors:
            out_map[name] = name
        elif renamed_out and pre_out[j] not in post_out:
            out_map[name] = pre_out[j]
        else:
            return CheckResult(False, f"output '{name}' has no counterpart in the model before the pass")

    # Concrete shapes: fixed dims of either side win, symbols get sizes by name.
    post_by_pre = {src: value for value in post_in for kind, src in [in_map[value.name]] if kind == "input"}
    sizes: dict[str, int] = {}
    given = dict(feeds or {})
    feeds = {}
    rng = np.random.default_rng(seed)
    dynamic_axes: dict[str, list[int]] = {}
    for value in pre_in:
        post_value = post_by_pre.get(value.name)
        post_dims = dims_of(post_value.type) if post_value is not None else None
        pre_dims = dims_of(value.type)
        if pre_dims is None:
            if post_dims is None:
                return CheckResult(False, f"outputs cannot be checked: input '{value.name}' has no known rank "
                                          "(fix its shape first)")
            pre_dims = [None] * len(post_dims)
        if post_dims is not None and len(post_dims) != len(pre_dims):
            return CheckResult(False, f"input '{value.name}' changed rank from {len(pre_dims)} to {len(post_dims)}")
        shape = []
        for axis, d in enumerate(pre_dims):
            p = post_dims[axis] if post_dims is not None else None
            if isinstance(d, int) and d > 0:
                shape.append(d)
                if post_value is not None and not (isinstance(p, int) and p > 0):
                    dynamic_axes.setdefault(post_value.name, []).append(axis)
            elif isinstance(p, int) and p > 0:
                shape.append(p)
            else:
                # Only named symbols are shared; '?', '-1' and converters' 'unk__N' are each their own size.
                key = d if is_named_symbol(d) else f"{value.name}:{axis}"
                sizes.setdefault(key, batch if axis == 0 else other_dims)
                shape.append(sizes[key])
        elem = value.type.tensor_type.elem_type
        sample = given.get(value.name)
        if sample is not None and _fits(sample.shape, pre_dims) and (post_dims is None or _fits(sample.shape, post_dims)):
            feeds[value.name] = sample
            continue
        try:
            feeds[value.name] = random_array(helper.tensor_dtype_to_np_dtype(elem), tuple(shape), rng)
        except (TypeError, KeyError, ValueError) as exc:
            return CheckResult(False, f"cannot generate inputs to check with: {exc}")

    extra = [src for kind, src in in_map.values() if kind == "tensor"] + [
        src for name, src in out_map.items() if src not in pre_out
    ]
    try:
        reference = cache.run(before, feeds, extra)
    except Exception as exc:  # noqa: BLE001 - BuildError from the backend, or ORT run errors
        return CheckResult(False, f"outputs cannot be checked: ONNX Runtime cannot run the model before the pass ({error_line(exc)})")
    post_feeds = {name: (feeds[src] if kind == "input" else reference[src]) for name, (kind, src) in in_map.items()}
    try:
        got = cache.run(after, post_feeds)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(False, f"the model after the pass does not run: {error_line(exc)}")
    worst = 0.0
    for name, src in out_map.items():
        problem, max_abs = _compare(np.asarray(reference[src]), np.asarray(got[name]), tolerance)
        worst = max(worst, max_abs)
        if problem:
            return CheckResult(False, f"output '{name}' {problem}", max_abs if problem.startswith("differs:") else None)
    if not dynamic_axes:
        return CheckResult(True, "", worst)
    # A batch (axis 0 fixed at 1) made dynamic is checked item by item; other axes must accept another size.
    batched = [name for name, axes in dynamic_axes.items()
               if 0 in axes and post_feeds[name].shape[0] == 1 and in_map[name][0] == "input"]
    if batched and all(kind == "input" for kind, _ in in_map.values()):
        outcome = _check_items(before, after, feeds, in_map, out_map, batched, tolerance, cache, rng,
                               extra=[src for name, src in out_map.items() if src not in pre_out])
        if not outcome.ok:
            return outcome
        worst = max(worst, outcome.max_abs_diff or 0.0)
        dynamic_axes = {n: [a for a in axes if not (a == 0 and n in batched)] for n, axes in dynamic_axes.items()}
        dynamic_axes = {n: axes for n, axes in dynamic_axes.items() if axes}
    if dynamic_axes:
        alt = {}
        for name, value in post_feeds.items():
            shape = list(value.shape)
            for axis in dynamic_axes.get(name, []):
                shape[axis] += 1
            alt[name] = random_array(value.dtype, tuple(shape), rng)
        try:
            cache.run(after, alt)
        except Exception as exc:  # noqa: BLE001
            axes = ", ".join(f"{n} axis {a}" for n, ax in dynamic_axes.items() for a in ax)
            return CheckResult(False, f"the model does not run when the dynamic axes ({axes}) change size: {error_line(exc)}", worst)
    return CheckResult(True, "", worst)


# How many distinct items a batch made dynamic is checked with (see _check_items).
ITEMS_CHECKED = 3


def _compare(ref: np.ndarray, val: np.ndarray, tolerance: PassTolerance) -> tuple[str, float]:
    """What is wrong with ``val`` as ``ref`` ("" when they agree within ``tolerance``), and the max abs diff."""
    if ref.shape != val.shape:
        return f"has shape {val.shape}, was {ref.shape}", 0.0
    if ref.dtype != val.dtype:
        return f"has dtype {val.dtype}, was {ref.dtype}", 0.0
    if ref.dtype.kind != "f":
        differ = int(np.sum(ref != val))
        return (f"differs in {differ} of {ref.size} values" if differ else ""), 0.0
    r, v = ref.astype(np.float64), val.astype(np.float64)
    finite = np.isfinite(r)
    scale = float(np.abs(r[finite]).max(initial=0.0))
    diff = np.abs(r - v)
    bad_nan = np.isnan(r) != np.isnan(v)
    close = np.where(finite, diff <= tolerance.atol * max(1.0, scale) + tolerance.rtol * np.abs(r), r == v)
    max_abs = float(np.where(finite & np.isfinite(v), diff, 0.0).max(initial=0.0))
    if bad_nan.any() or not bool(np.all(close | (np.isnan(r) & np.isnan(v)))):
        return (f"differs: max abs diff {max_abs:.3g} "
                f"(values up to {scale:.3g}; tolerance rtol {tolerance.rtol:g}, atol {tolerance.atol:g})"), max_abs
    return "", max_abs


def _check_items(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    in_map: Mapping[str, tuple[str, str]],
    out_map: Mapping[str, str],
    batched: Sequence[str],
    tolerance: PassTolerance,
    cache: RunCache,
    rng: np.random.Generator,
    extra: Sequence[str] = (),
) -> CheckResult:
    """Run ``after`` once on :data:`ITEMS_CHECKED` distinct items stacked on axis 0 of its inputs ``batched``
    (fixed at 1 in ``before``); each item's slice of every output must be ``before``'s run on that item alone.

    ``feeds`` (by ``before``'s input names) is the first item; the others are generated. Inputs not
    batched get the same value for every item.
    """
    count = ITEMS_CHECKED
    batched_src = {in_map[name][1] for name in batched}
    items = [dict(feeds)] + [
        {name: random_array(value.dtype, value.shape, rng) if name in batched_src else value for name, value in feeds.items()}
        for _ in range(count - 1)
    ]
    post_feeds = {name: (np.concatenate([item[src] for item in items]) if name in batched else feeds[src])
                  for name, (_, src) in in_map.items()}
    axes = ", ".join(f"{name} axis 0" for name in batched)
    try:
        singles = [cache.run(before, item, extra) for item in items]
    except Exception as exc:  # noqa: BLE001
        # Not UNCHECKABLE: that would hold back every later pass, while only this one lacks a reference.
        return CheckResult(False, f"the batch cannot be checked item by item: ONNX Runtime cannot run the model before "
                                  f"the pass on a generated item ({error_line(exc)})")
    try:
        got = cache.run(after, post_feeds)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(False, f"the model does not run when the dynamic axes ({axes}) change size: {error_line(exc)}")
    stays = f"the model stays at batch 1 (checked at batch {count} against each item run alone)"
    worst = 0.0
    for name, src in out_map.items():
        refs = [np.asarray(single[src]) for single in singles]
        val = np.asarray(got[name])
        if refs[0].ndim == 0 or refs[0].shape[0] != 1:
            return CheckResult(False, f"output '{name}' has shape {refs[0].shape} for one item: its dim 0 is not the batch "
                                      f"(a flat list, e.g. of all detections?), so its items cannot be told apart; {stays}")
        expected = (count, *refs[0].shape[1:])
        if val.shape != expected:
            return CheckResult(False, f"output '{name}' has shape {val.shape} at batch {count}, not {expected}: its dim 0 "
                                      f"does not follow the batch, so the model mixes batch items (or lists them together); "
                                      f"{stays}")
        for index, ref in enumerate(refs):
            problem, max_abs = _compare(ref, val[index:index + 1], tolerance)
            worst = max(worst, max_abs)
            if problem:
                return CheckResult(False, f"output '{name}' mixes batch items: item {index + 1} of {count} is not what that "
                                          f"item gives alone at batch 1 ({problem}); {stays}", max_abs or None)
    return CheckResult(True, "", worst)


def _fits(shape: Sequence[int], dims: Sequence[Any]) -> bool:
    return len(shape) == len(dims) and all(not (isinstance(d, int) and d > 0) or d == n for d, n in zip(dims, shape))
