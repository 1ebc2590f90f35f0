"""The inputs a build checks with, and the samples a bundle carries for later validation.

In order of preference: samples the user gave (``data=`` / ``--data``), samples a rebuilt
bundle carries, the held-out part of int8 calibration data, and last inputs generated from a
plan read from the graph (:mod:`enginesmith.graph.input_plan`), each plan tried on the source
model until one runs. A model that runs on none of them stops the build with one error naming
what was tried, the node that failed and the flag that fixes it.

A bounded part of real samples (:data:`MAX_STORED_BYTES`) is stored in the bundle as
``samples/samples.npz`` (``np.savez``, read back with ``allow_pickle=False``).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import BuildError, EnginesmithError, ValidationDataError
from .graph.input_plan import InputPlan, candidate_plans
from .signature import Signature, is_named_symbol, random_inputs
from .validate.data import check_against_signature, load_dataset

MAX_STORED_BYTES = 8 * 2**20
# The graph-pass checks run on this many samples at most (each pass runs the model twice).
CHECK_SAMPLES = 4

# Where build samples came from (``BuildInputs.kind``); the first three are real inputs.
REAL_KINDS = ("data", "stored", "calibration")

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass
class BuildInputs:
    """What a build checks with: real samples, or a plan to generate inputs from."""

    kind: str  # data | stored | calibration | generated | none
    label: str
    feeds: dict[str, np.ndarray] | None = None
    plan: InputPlan | None = None
    log: list[str] = field(default_factory=list)
    # The model's fixed batch, when it has one: checks feed at most that many samples at once.
    fixed_batch: int | None = None
    # Inputs whose samples lie along another axis than 0 (see :func:`sample_axes`).
    axes: dict[str, int] = field(default_factory=dict)

    @property
    def real(self) -> bool:
        return self.kind in REAL_KINDS and self.feeds is not None

    def check_feeds(self, limit: int = CHECK_SAMPLES) -> dict[str, np.ndarray] | None:
        """A few inputs for the graph-pass checks (no more than a fixed batch takes)."""
        if self.feeds is not None:
            return first_samples(self.feeds, min(limit, self.fixed_batch or limit), self.axes)
        if self.plan is not None:
            return self.plan.generate(seed=0)
        return None

    def validation_batches(self, signature: Signature, batches: int = 3) -> tuple[list[dict[str, np.ndarray]], str] | None:
        """Batches to verify or validate on; None when there is nothing better than random inputs."""
        if self.feeds is not None:
            return split_samples(self.feeds, signature, signature.fixed_batch() or 8), self.label
        if self.plan is not None:
            return [self.plan.generate(seed=i) for i in range(batches)], self.label
        return None

    def manifest_record(self, stored: int | None, note: str | None) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, "label": self.label}
        if self.feeds is not None:
            record["samples"] = sample_count(self.feeds, self.axes)
        if stored is not None:
            record["stored"] = stored
        if note:
            record["note"] = note
        if self.plan is not None:
            record["plan"] = self.plan.to_dict()
        return record


# Input name -> the axis its samples lie along, for inputs where that is not axis 0.
SampleAxes = Mapping[str, int]


def sample_axes(signature: Signature) -> dict[str, int]:
    """Inputs batched along another axis than 0: a recurrent state ``[2, batch, 128]`` -> 1.

    The batch is the named dim that leads the other inputs (``input[batch, 512]``); an input
    that holds it on a later axis, and not first, has its samples along that axis.
    """
    leading = {spec.shape[0] for spec in signature.inputs if spec.rank >= 2 and is_named_symbol(spec.shape[0])}
    axes = {}
    for spec in signature.inputs:
        if not spec.rank or spec.shape[0] in leading:
            continue
        axis = next((axis for axis, dim in enumerate(spec.shape) if axis and dim in leading), None)
        if axis is not None:
            axes[spec.name] = axis
    return axes


def _length(value: np.ndarray, axis: int) -> int | None:
    return int(value.shape[axis]) if value.ndim > axis else None


def sample_count(feeds: Mapping[str, np.ndarray], axes: SampleAxes | None = None) -> int:
    """Samples: the longest sample axis (axis 0 unless ``axes`` says otherwise; a scalar or
    [1]-shaped input is shared by all)."""
    axes = axes or {}
    return max((n for name, v in feeds.items() if (n := _length(v, axes.get(name, 0))) is not None), default=1)


def _per_sample(feeds: Mapping[str, np.ndarray], axes: SampleAxes | None = None) -> dict[str, int]:
    """Inputs that hold one entry per sample, with their sample axis; the others (an int64 sample
    rate) go whole with every batch."""
    axes = axes or {}
    total = sample_count(feeds, axes)
    return {name: axes.get(name, 0) for name, v in feeds.items() if _length(v, axes.get(name, 0)) == total}


def _cut(value: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return value[(slice(None),) * axis + (slice(start, stop),)]


def first_samples(feeds: Mapping[str, np.ndarray], count: int, axes: SampleAxes | None = None) -> dict[str, np.ndarray]:
    split = _per_sample(feeds, axes)
    return {name: _cut(value, split[name], 0, count) if name in split else value for name, value in feeds.items()}


def take_rows(feeds: Mapping[str, np.ndarray], rows: int, axes: SampleAxes | None = None) -> dict[str, np.ndarray]:
    """``rows`` samples of every per-sample input, cycled when there are fewer; the others whole."""
    split = _per_sample(feeds, axes)
    return {name: np.take(value, np.arange(rows) % value.shape[split[name]], axis=split[name]) if name in split
            else value for name, value in feeds.items()}


def split_samples(feeds: Mapping[str, np.ndarray], signature: Signature, size: int) -> list[dict[str, np.ndarray]]:
    """Batches of ``size`` samples, each input cut along its sample axis (:func:`sample_axes`);
    inputs without one are repeated in each."""
    axes = sample_axes(signature)
    split = _per_sample(feeds, axes)
    total = sample_count(feeds, axes)
    return [{name: _cut(value, split[name], start, start + size) if name in split else value
             for name, value in feeds.items()}
            for start in range(0, total, size)]


# --------------------------------------------------------------------------- user data


def load_samples(data: str | Path | Mapping[str, Any], signature: Signature, preprocess=None) -> dict[str, np.ndarray]:
    """Samples from a file, folder or dict, checked against the signature and cast to its dtypes.

    Wrong names, ranks, fixed dims, disagreeing named symbols and dtypes that would change
    value (floats for an int64 input) are refused with an error naming the input.
    """
    if isinstance(data, Mapping):
        where = "the given arrays"
        feeds = {name: np.asarray(value) for name, value in data.items()}
        unknown = sorted(set(feeds) - set(signature.input_names))
        missing = [n for n in signature.input_names if n not in feeds]
        if unknown or missing:
            raise ValidationDataError(
                f"{where} have arrays {sorted(feeds)}, the model takes {signature.input_names}"
                + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else "")
            )
        check_against_signature(feeds, signature, where)
    else:
        where = f"data '{Path(data).name}'"
        feeds = load_dataset(data, signature, preprocess)
    return _cast_and_check(feeds, signature, where)


def _cast_and_check(feeds: dict[str, np.ndarray], signature: Signature, where: str) -> dict[str, np.ndarray]:
    symbols: dict[str, tuple[int, str, int]] = {}
    out: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        value = feeds[spec.name]
        target = np.dtype(spec.dtype)
        if value.dtype != target:
            if value.dtype.kind not in "biuf" or not np.can_cast(value.dtype, target, "same_kind"):
                raise ValidationDataError(
                    f"{where}: input '{spec.name}' is {value.dtype} but the model takes {target}; "
                    f"a {value.dtype} -> {target} cast would change values, so save the data as {target}"
                )
            value = value.astype(target)
        # Axis 0 is the sample axis; named symbols elsewhere must agree across inputs.
        for axis, dim in enumerate(spec.shape):
            if axis and is_named_symbol(dim) and axis < value.ndim:
                size, name, first_axis = symbols.setdefault(dim, (value.shape[axis], spec.name, axis))
                if size != value.shape[axis]:
                    raise ValidationDataError(
                        f"{where}: input '{spec.name}' axis {axis} is {value.shape[axis]}, but symbol '{dim}' is "
                        f"{size} (input '{name}' axis {first_axis})"
                    )
        out[spec.name] = np.asarray(value, order="C")
    axes = sample_axes(signature)
    total = sample_count(out, axes)
    lengths = {n: length for n, v in out.items() if (length := _length(v, axes.get(n, 0))) is not None}
    if any(length not in (1, total) for length in lengths.values()):
        along = ", ".join(f"'{n}' along axis {a}" for n, a in axes.items())
        raise ValidationDataError(f"{where}: inputs hold different numbers of samples along axis 0"
                                  f"{f' ({along})' if along else ''}: {lengths}")
    return out


# --------------------------------------------------------------------------- stored samples


def encode_samples(feeds: Mapping[str, np.ndarray], limit_bytes: int = MAX_STORED_BYTES,
                   axes: SampleAxes | None = None) -> tuple[bytes | None, int, str | None]:
    """The first samples that fit in ``limit_bytes`` as .npz bytes, how many, and a note when not all fit."""
    total = sample_count(feeds, axes)
    split = _per_sample(feeds, axes)
    per_sample = sum(_cut(v, split[name], 0, 1).nbytes if name in split else v.nbytes for name, v in feeds.items())
    # .npy headers and the zip directory: a little room for each array.
    room = limit_bytes - 4096 * (len(feeds) + 1)
    fits = total if per_sample == 0 else min(total, max(room, 0) // per_sample)
    if fits < 1:
        return None, 0, (f"samples not stored: one sample is {per_sample / 2**20:.1f} MB, over the "
                         f"{limit_bytes / 2**20:.0f} MB limit for samples in a bundle")
    buffer = io.BytesIO()
    np.savez(buffer, **first_samples(feeds, fits, axes))
    note = None
    if fits < total:
        note = (f"stored the first {fits} of {total} samples in the bundle ({limit_bytes / 2**20:.0f} MB limit); "
                "validate with --data for the rest")
    return buffer.getvalue(), fits, note


def decode_samples(raw: bytes, signature: Signature, where: str) -> dict[str, np.ndarray]:
    """Samples a bundle carries; object arrays (pickles) are refused."""
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as loaded:
            feeds = {name: loaded[name] for name in loaded.files}
    except (ValueError, OSError, EOFError, KeyError) as exc:
        raise ValidationDataError(f"{where}: stored samples are unreadable ({exc}); validate with --data DATA") from None
    if sorted(feeds) != sorted(signature.input_names):
        raise ValidationDataError(
            f"{where}: stored samples have arrays {sorted(feeds)}, the engine takes {signature.input_names}; "
            "validate with --data DATA"
        )
    return feeds


# --------------------------------------------------------------------------- generated inputs


_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")
# ONNX Runtime prefixes its messages with "file.h:84 Namespace::Function(args)"; users need neither.
_SOURCE_LOCATION = re.compile(r"^\s*\S+\.(?:h|cc|cpp|c):\d+\s+[\w:~<>]+(?:\([^)]*\))?\s*(?:const\s+)?")


def failure_line(exc: BaseException) -> str:
    """ONNX Runtime's run error as one line: the innermost node that failed and its message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    nodes = _NODE.findall(text)
    message = text.rsplit("Status Message:", 1)[-1].strip() if "Status Message:" in text else text
    message = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", message)
    message = _SOURCE_LOCATION.sub("", message)
    message = message[:240] + ("..." if len(message) > 240 else "")
    if nodes:
        op_type, name = nodes[-1]
        return f"node '{name}' ({op_type}) failed: {message}"
    return message


def run_error(run: Runner, feeds: Mapping[str, np.ndarray]) -> str | None:
    """None when ``run`` runs on ``feeds``, else what failed (one line)."""
    try:
        run(dict(feeds))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own pybind types
        return failure_line(exc)
    return None


def choose_plan(
    model, signature: Signature, overrides: Mapping[str, Sequence[int]] | None, run: Runner,
    limits: Mapping[str, tuple[int, str]] | None = None,
) -> tuple[InputPlan | None, list[tuple[InputPlan, str]]]:
    """The first candidate plan the model runs on, and the (plan, failure) of those it did not."""
    failures: list[tuple[InputPlan, str]] = []
    for plan in candidate_plans(model, signature, overrides, limits=limits):
        try:
            feeds = plan.generate(seed=0)
        except TypeError as exc:
            failures.append((plan, str(exc)))
            continue
        error = run_error(run, feeds)
        if error is None:
            return plan, failures
        failures.append((plan, error))
    return None, failures


def fix_hint(signature: Signature) -> str:
    """The flags that give the build inputs the model runs on."""
    keys = ", ".join(signature.input_names)
    free = any(spec.is_dynamic or np.dtype(spec.dtype).kind in "iub" for spec in signature.inputs)
    if not free:
        # Fixed shapes and float inputs: no other input would take another path through the model.
        return ("its inputs have fixed shapes, so the model itself fails at that node: "
                "re-export or fix the model (check it with 'enginesmith inspect MODEL')")
    hint = f"give real inputs with --data FILE (.npz keyed by {keys}; data=... in Python)"
    # --input helps only where sizes beyond the batch axis are free.
    shaped = [spec for spec in signature.inputs if any(not isinstance(d, int) for d in spec.shape[1:])]
    if shaped:
        # A named batch dim is the batch (1) wherever it appears: state[2, batch, 128] -> 2x1x128.
        batch_symbols = {spec.shape[0] for spec in signature.inputs if spec.rank >= 2 and is_named_symbol(spec.shape[0])}
        flags = []
        for spec in shaped:
            dims = [str(d) if isinstance(d, int) else ("1" if axis == 0 or d in batch_symbols else "?")
                    for axis, d in enumerate(spec.shape)]
            flags.append(f"--input {spec.name}:{'x'.join(dims)}")
        hint = f"fix the shapes with {' '.join(flags)} (a size the model takes for each ?) or " + hint
    return hint


def unrunnable_error(signature: Signature, failures: list[tuple[InputPlan, str]]) -> BuildError:
    tried = "; ".join(f"[{plan.describe()}] -> {error}" for plan, error in failures)
    return BuildError(
        f"the source model does not run on the inputs enginesmith generated for its checks, tried {tried}; "
        + fix_hint(signature)
    )


def plan_label(plan: InputPlan) -> str:
    return f"generated ({plan.describe()})"


def plan_from_record(record: Mapping[str, Any] | None) -> InputPlan | None:
    """The input plan a manifest's ``checks["samples"]`` records, if any."""
    plan = (record or {}).get("plan")
    return InputPlan.from_dict(plan) if plan else None


# --------------------------------------------------------------------------- what a build does


@dataclass(frozen=True)
class StoredSamples:
    """Samples a bundle being rebuilt carries, and where they first came from."""

    raw: bytes
    origin: str


_STORED_SUFFIX = " (stored in the rebuilt bundle)"


def resolve_build_inputs(
    model,
    signature: Signature,
    shapes: Mapping[str, Sequence[int]] | None,
    data: str | Path | Mapping[str, Any] | None,
    preprocess,
    stored: StoredSamples | None,
    *,
    needed: bool,
    strict: bool,
    run: Runner | None = None,
    limits: Mapping[str, tuple[int, str]] | None = None,
) -> BuildInputs:
    """The inputs a build checks with: ``data``, a rebuilt bundle's samples, or a plan the source runs on.

    ``model`` is the imported ONNX model, run by ONNX Runtime to probe, unless ``run`` is given (the
    source run by its own framework; ``model`` is then None while its ONNX conversion runs alongside the
    build, and plans come from the signature and ``limits``, see :func:`candidate_plans`); ``shapes`` are
    the ``--input`` shapes. With
    ``strict`` (verification on) a source that runs on none of them stops the build with one error;
    otherwise the build goes on and the log says why checks could not run.
    """
    from .graph._onnx import plain_runner

    if data is not None:
        label = "given arrays" if isinstance(data, Mapping) else f"samples from '{Path(data).name}'"
        inputs = BuildInputs("data", label, load_samples(data, signature, preprocess))
    elif stored is not None:
        label = stored.origin if stored.origin.endswith(_STORED_SUFFIX) else stored.origin + _STORED_SUFFIX
        inputs = BuildInputs("stored", label, decode_samples(stored.raw, signature, "the rebuilt bundle"))
    else:
        inputs = BuildInputs("none", "")
    inputs.fixed_batch = signature.fixed_batch()
    inputs.axes = sample_axes(signature)
    if not needed:
        return inputs
    try:
        run = run or plain_runner(model, quiet=True)
    except EnginesmithError as exc:
        # The backend's own build reports an unloadable model better; nothing to probe inputs with here.
        inputs.log.append(f"inputs not checked on the source: {exc}")
        return inputs
    if inputs.feeds is not None:
        error = run_error(run, inputs.check_feeds())
        if error is not None:
            message = (f"the source model does not run on the {inputs.label}: {error}; give samples the model takes "
                       f"(inputs: {', '.join(str(s) for s in signature.inputs)})")
            if strict:
                raise BuildError(message)
            inputs.log.append(message)
        return inputs
    plan, failures = choose_plan(model, signature, shapes, run, limits)
    if plan is None:
        if strict:
            raise unrunnable_error(signature, failures)
        inputs.log.append(f"graph passes and checks could not run: {unrunnable_error(signature, failures)}")
        return inputs
    inputs.kind, inputs.label, inputs.plan = "generated", plan_label(plan), plan
    line = f"checks run on generated inputs {plan.describe()}"
    if failures:
        line += " (the source does not run on " + "; ".join(f"[{p.describe()}]: {error}" for p, error in failures) + ")"
    inputs.log.append(line + "; give real ones with --data FILE")
    return inputs


def samples_to_store(
    inputs: BuildInputs, holdout: list[dict[str, np.ndarray]] | None, holdout_label: str, holdout_random: bool
) -> tuple[bytes | None, dict[str, Any] | None, str | None]:
    """What goes into the bundle: (.npz bytes, the manifest record, a build-log line).

    Real samples only: the build's data (or a rebuilt bundle's), else int8's held-out calibration
    data. Generated inputs are not stored; their plan is recorded so validate can regenerate them.
    """
    feeds, kind, label = None, inputs.kind, inputs.label
    if inputs.real:
        feeds = inputs.feeds
    elif holdout and not holdout_random:
        # 0-d inputs are per-call settings that every batch carries whole.
        feeds = {name: np.concatenate([batch[name] for batch in holdout]) if holdout[0][name].ndim else holdout[0][name]
                 for name in holdout[0]}
        kind, label = "calibration", holdout_label
    if feeds is None:
        return None, inputs.manifest_record(None, None) if inputs.plan is not None else None, None
    raw, count, note = encode_samples(feeds, axes=inputs.axes)
    record = BuildInputs(kind, label, feeds, inputs.plan, axes=inputs.axes).manifest_record(count, note)
    return raw, record, note or f"{count} samples ({label}) stored in the bundle for validate and rebuilds"


def stored_validation_batches(
    signature: Signature,
    raw: bytes | None,
    record: Mapping[str, Any] | None,
    where: str,
    *,
    batch: int | None,
    batches: int,
    seed: int,
) -> tuple[list[dict[str, np.ndarray]], str, bool] | None:
    """Batches from a bundle's samples (real) or its input plan (generated): (batches, label, real), or None."""
    record = record or {}
    if raw is not None:
        feeds = decode_samples(raw, signature, where)
        size = batch or signature.fixed_batch() or 8
        label = f"samples stored in the bundle ({record.get('label', 'build samples')})"
        return split_samples(feeds, signature, size), label, True
    plan = plan_from_record(record)
    if plan is not None:
        generated = [plan.generate(seed=seed + i, batch=batch) for i in range(batches)]
        return generated, f"generated from the build's input plan ({plan.describe()})", False
    return None


def sample_feeds(
    signature: Signature,
    raw: bytes | None,
    record: Mapping[str, Any] | None,
    where: str,
    *,
    batch: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], str]:
    """``batch`` inputs a built model runs on when no data is given, and where they came from.

    The samples the bundle carries (cycled to ``batch``), else inputs generated from the
    build's input plan, else seeded random inputs: a model that fails on random shapes or
    values (a sample rate it branches on) still runs.
    """
    record = record or {}
    if raw is not None:
        feeds = decode_samples(raw, signature, where)
        return (take_rows(feeds, batch, sample_axes(signature)),
                f"samples stored in the bundle ({record.get('label', 'build samples')})")
    plan = plan_from_record(record)
    if plan is not None:
        return plan.generate(seed=seed, batch=batch), f"generated from the build's input plan ({plan.describe()})"
    return random_inputs(signature.inputs, batch=batch, seed=seed), f"random (seed {seed}, batch {batch})"


def samples_text(record: Mapping[str, Any] | None) -> str | None:
    """A manifest's ``checks["samples"]`` for people: what the build checked with and what the bundle stores."""
    if not record:
        return None
    label = record.get("label", "")
    if record.get("plan") and record.get("kind") not in REAL_KINDS:
        plan = InputPlan.from_dict(record["plan"])
        return f"checks ran on inputs generated from the graph ({plan.describe()}); no samples stored"
    total, stored = record.get("samples"), record.get("stored")
    if stored is None:  # too large to store: the note says why
        return f"{total} samples ({label}); {record.get('note', 'none stored')}"
    if total is not None and stored < total:
        return f"{stored} of {total} samples stored ({label}); validate with --data for the rest"
    return f"{stored} samples stored ({label})"
