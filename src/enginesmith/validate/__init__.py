"""Validation: does the engine give the same answers as the original model?

The same inputs go to the reference (the source run by its own framework) and
to the engine; each output is compared with several metrics, and a tolerance
per precision decides pass or fail.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import ValidationDataError

Runner = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]

# Why comparing an int8 engine on random inputs fails whatever the engine's quality.
RANDOM_INT8_INPUTS = (
    "int8 engine compared on random inputs: values outside the calibrated ranges are clipped, so large errors "
    "are expected; give real inputs with --data"
)


@dataclass(frozen=True)
class Tolerance:
    max_rel_l2: float
    min_cosine: float
    # Only checked for outputs whose last axis looks like class scores.
    min_argmax_agreement: float
    # Optional absolute bound; ``None`` leaves it unchecked (scale-dependent).
    max_abs: float | None = None
    # Limits for outputs that are not class scores (boxes, regressions) where this tolerance judges
    # class scores by agreement alone (an agreement budget); ``None``: the limits above apply to all.
    other_outputs: "Tolerance | None" = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Tolerance":
        limits = {k: data[k] for k in ("max_rel_l2", "min_cosine", "min_argmax_agreement", "max_abs") if k in data}
        others = data.get("other_outputs")
        return cls(**limits, other_outputs=cls.from_dict(others) if others else None)

    def __str__(self) -> str:
        # ASCII comparison signs: these lines end up in logs and consoles that are not UTF-8.
        parts = []
        if self.max_rel_l2 < NO_LIMIT:
            parts.append(f"rel L2 <= {_number(self.max_rel_l2)}")
        if self.min_cosine > -1.0:
            parts.append(f"cosine >= {_number(self.min_cosine, 6)}")
        if self.min_argmax_agreement > 0:
            parts.append(f"top-1 agreement >= {_percent(self.min_argmax_agreement)}")
        if self.max_abs is not None:
            parts.append(f"max abs <= {_number(self.max_abs)}")
        text = ", ".join(parts) or "no limits"
        if self.other_outputs is not None:
            text += f" (other outputs: {self.other_outputs})"
        return text


def _number(value: float, digits: int = 3) -> str:
    """0.15, 0.0001, 1e-5: short, and exact for the round limits people write."""
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _percent(share: float) -> str:
    """99%, 99.5%, 1.7%: as many decimals as the value needs, at most two."""
    return f"{share * 100:.2f}".rstrip("0").rstrip(".") + "%"


# Defaults per precision. fp32 engines differ from the reference only by the
# rounding of fused or reordered kernels; fp16 keeps about 3 decimal digits;
# int8 is judged mostly on whether it keeps the same decisions.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_l2=1e-4, min_cosine=0.99999, min_argmax_agreement=0.99),
    "fp16": Tolerance(max_rel_l2=1e-2, min_cosine=0.999, min_argmax_agreement=0.95),
    "bf16": Tolerance(max_rel_l2=3e-2, min_cosine=0.995, min_argmax_agreement=0.95),
    "int8": Tolerance(max_rel_l2=0.15, min_cosine=0.98, min_argmax_agreement=0.9),
}


# From the tightest tolerance to the loosest.
PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")


def judged_precision(engine_precision: str, source_precision: str | None = None) -> str:
    """The precision whose tolerance judges an engine: its own, or its source's where that is looser.

    A quantized source (an int8 TFLite model) computes in int8 itself, so even an fp32 engine of it
    differs from it by int8 rounding: judging that against fp32's 1e-4 would fail every faithful engine.
    """
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    source = source_precision or "fp32"
    return max(engine_precision, source, key=lambda p: rank.get(p, 0))


def tolerance_for(precision: str, **overrides: float | None) -> Tolerance:
    base = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])
    changes = {k: v for k, v in overrides.items() if v is not None}
    return Tolerance(**{**base.to_dict(), **changes})


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    argmax_agreement: float | None
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    passed: bool
    precision: str
    reference: str
    inputs: str
    samples: int
    tolerance: dict[str, Any]
    outputs: list[OutputComparison]
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # Reasons a pass may say little (e.g. a reference output that is the same for every input).
    warnings: list[str] = field(default_factory=list)
    # Why these inputs cannot judge the engine (an int8 engine on generated inputs): not a failure.
    inconclusive: str = ""

    @property
    def failed(self) -> bool:
        """Outside the tolerance on inputs that can judge the engine."""
        return not self.passed and not self.inconclusive

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default).encode()

    def tolerance_text(self) -> str:
        return str(Tolerance.from_dict(self.tolerance))

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: o.rel_l2, default=None)
        status = "INCONCLUSIVE" if self.inconclusive else "PASS" if self.passed else "FAIL"
        detail = f", worst rel L2 {worst.rel_l2:.2e} on '{worst.name}'" if worst else ""
        warned = f" ({self.inconclusive})" if self.inconclusive else ""
        warned += f" (warning: {self.warnings[0]})" if self.warnings else ""
        return f"{status}: {len(self.outputs)} outputs on {self.samples} samples vs {self.reference}{detail}{warned}"


def failures_text(report: "ValidationReport") -> str:
    """Every failed check, named by its output: ``probs: argmax agreement 95.00% < 99%; box: ...``."""
    return "; ".join(f"{o.name}: {', '.join(o.failures)}" for o in report.outputs if not o.passed)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(x: float) -> float:
    """JSON has no inf/nan; large sentinels keep reports writable and comparisons honest."""
    return 1e308 if np.isnan(x) else float(min(x, 1e308))


# Words in an output's name that mark it as something other than class scores (boxes, regressed
# values, embeddings): its largest value says nothing, so argmax agreement is not computed for it.
NOT_CLASS_SCORES = re.compile(
    r"(box|coord|regress|reg(?![a-z])|offset|delta|landmark|keypoint|kpt|depth|embed|feature|anchor)",
    re.IGNORECASE,
)


def looks_like_classes(ref: np.ndarray, name: str = "") -> bool:
    """Whether argmax agreement means something for this output: a float array of rank >= 2 whose last
    axis has >= 2 values (scores of classes), unless its name says it is a box, a regression or an
    embedding (see :data:`NOT_CLASS_SCORES`; only its last ``/`` part is read)."""
    if ref.ndim < 2 or ref.dtype.kind != "f" or not 2 <= ref.shape[-1] <= 1_000_000:
        return False
    return not NOT_CLASS_SCORES.search(name.rsplit("/", 1)[-1])


# Probabilities below this are "nothing there" for every threshold anyone uses (see compare()).
PROBABILITY_FLOOR = 1e-3


def _argmax_agreement(ref: np.ndarray, got: np.ndarray, floor: float | None) -> float | None:
    """Share of rows (last axis) whose top-1 agrees, over the rows that have a top-1: rows whose two
    largest reference scores are equal (saturated ties) and, for probabilities, rows with nothing
    above ``floor`` are left out. ``None`` when no row is left."""
    rows = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    top2 = np.sort(rows, axis=-1)[:, -2:]
    decided = top2[:, 1] > top2[:, 0]
    if floor is not None:
        decided &= top2[:, 1] >= floor
    if not decided.any():
        return None
    same = np.argmax(rows, axis=-1) == np.argmax(np.nan_to_num(got.reshape(rows.shape)), axis=-1)
    return float(np.mean(same[decided]))


def compare(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> OutputComparison:
    """Metrics of one output, concatenated over all samples."""
    failures: list[str] = []
    if ref.shape != got.shape:
        return OutputComparison(name, list(got.shape), 1e308, 1e308, 1e308, -1.0, None, False,
                                [f"shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}"])
    if ref.dtype.kind in "iub":
        mismatch = float(np.mean(ref != got)) if ref.size else 0.0
        if mismatch:
            failures.append(f"{mismatch:.2%} of integer values differ")
        return OutputComparison(name, list(ref.shape), float(np.max(np.abs(ref.astype(np.int64) - got.astype(np.int64)), initial=0)),
                                mismatch, mismatch, 1.0 - mismatch, None, not failures, failures)
    r = ref.astype(np.float64).ravel()
    g = got.astype(np.float64).ravel()
    bad = ~np.isfinite(g) & np.isfinite(r)
    if bad.any():
        failures.append(f"{int(bad.sum())} values are NaN or infinite where the reference is finite")
    diff = np.abs(r - g)
    diff = np.where(np.isfinite(diff), diff, 0.0)
    max_abs = float(diff.max(initial=0.0))
    mean_abs = float(diff.mean()) if diff.size else 0.0
    ref_norm = float(np.linalg.norm(np.nan_to_num(r)))
    # A probability map (every reference value in [0, 1]) that is nearly all zero (a detector that
    # found nothing, a sigmoid saturated on random inputs) is judged on the probability scale: its
    # error is relative to PROBABILITY_FLOOR per value, not to its own norm of rounding-sized values.
    probability = bool(r.size) and float(np.nanmin(r)) >= 0.0 and float(np.nanmax(r)) <= 1.0
    floor = PROBABILITY_FLOOR * np.sqrt(r.size) if probability else 0.0
    saturated = ref_norm < floor
    rel_l2 = float(np.linalg.norm(diff)) / max(ref_norm, floor, 1e-30) if diff.size else 0.0
    got_norm = float(np.linalg.norm(np.nan_to_num(g)))
    if ref_norm == 0.0 and got_norm == 0.0:
        cosine = 1.0
    else:
        cosine = float(np.dot(np.nan_to_num(r), np.nan_to_num(g)) / max(ref_norm * got_norm, 1e-300))
    agreement = None
    if looks_like_classes(ref, name):
        agreement = _argmax_agreement(ref, got, PROBABILITY_FLOOR if probability else None)
    limits = tol.other_outputs if agreement is None and tol.other_outputs is not None else tol
    if rel_l2 > limits.max_rel_l2:
        failures.append(f"relative L2 error {rel_l2:.3e} > {_number(limits.max_rel_l2)}")
    # The direction of a vector of rounding-sized values says nothing: the floored rel L2 judges it.
    if cosine < limits.min_cosine and not saturated:
        failures.append(f"cosine similarity {cosine:.6f} < {_number(limits.min_cosine, 6)}")
    if agreement is not None and agreement < tol.min_argmax_agreement:
        failures.append(f"argmax agreement {agreement:.2%} < {_percent(tol.min_argmax_agreement)}")
    if limits.max_abs is not None and max_abs > limits.max_abs:
        failures.append(f"max abs error {max_abs:.3e} > {_number(limits.max_abs)}")
    return OutputComparison(name, list(ref.shape), _finite(max_abs), _finite(mean_abs), _finite(rel_l2),
                            cosine if np.isfinite(cosine) else -1.0, agreement, not failures, failures)


def run_validation(
    engine_run: Runner,
    reference_run: Runner,
    batches: Iterable[dict[str, np.ndarray]],
    tolerance: Tolerance,
    precision: str,
    reference_label: str,
    inputs_label: str,
    output_names: list[str],
) -> ValidationReport:
    """Run both sides on every batch and compare the concatenated outputs."""
    refs: dict[str, list[np.ndarray]] = {n: [] for n in output_names}
    gots: dict[str, list[np.ndarray]] = {n: [] for n in output_names}
    samples = 0
    for feeds in batches:
        expected = reference_run(feeds)
        actual = engine_run(feeds)
        for name in output_names:
            if name not in expected:
                raise ValidationDataError(
                    f"the reference has no output '{name}' (it has {', '.join(expected)}); "
                    "the engine and the reference model do not match"
                )
            refs[name].append(np.asarray(expected[name]))
            gots[name].append(np.asarray(actual[name]))
        samples += next(iter(feeds.values())).shape[0] if feeds else 1
    if not samples:
        raise ValidationDataError("no validation data: give at least one batch")
    outputs = [
        compare(name, _concat(refs[name]), _concat(gots[name]), tolerance) for name in output_names
    ]
    warnings = [
        f"the reference's '{name}' is the same for every input (an untrained model?), so agreeing with it says "
        "little about the engine"
        for name in output_names if samples > 1 and _same_for_every_sample(_concat(refs[name]))
    ]
    return ValidationReport(
        passed=all(o.passed for o in outputs),
        precision=precision,
        reference=reference_label,
        inputs=inputs_label,
        samples=samples,
        tolerance=tolerance.to_dict(),
        outputs=outputs,
        warnings=warnings,
    )


def _same_for_every_sample(ref: np.ndarray) -> bool:
    """Float outputs identical along the batch axis: nothing the inputs change is being compared."""
    if ref.dtype.kind != "f" or ref.ndim < 1 or ref.shape[0] < 2:
        return False
    return bool(np.all(ref == ref[:1]))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if all(p.ndim >= 1 for p in parts):
        try:
            return np.concatenate(parts, axis=0)
        except ValueError:
            pass
    return np.concatenate([p.ravel() for p in parts])


# Tolerances are JSON-serialized with reports; "no limit" must be a finite number.
NO_LIMIT = 1e308


@dataclass(frozen=True)
class AccuracyBudget:
    """The rule a reduced-precision engine must keep against the fp32 reference.

    ``agreement``: the smallest share of samples whose top-1 class stays the same
    (classifiers); ``rel_l2``: the largest relative L2 error of every output; ``map`` / ``map50``:
    the most points (100 x mAP) of COCO mAP@[.5:.95] / mAP@.5 the engine may lose against the
    source on labelled images (detectors; the build needs COCO annotations and their images).
    """

    metric: str
    value: float

    def to_dict(self) -> dict[str, Any]:
        bound = "min" if self.metric == "agreement" else "max"
        return {"metric": self.metric, bound: self.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AccuracyBudget":
        return cls(data["metric"], data.get("min", data.get("max")))

    def tolerance(self, precision: str = "int8") -> Tolerance:
        """The limits a ``precision`` engine must keep: an agreement budget judges class scores by top-1
        agreement alone and every other output (boxes, regressions) by the precision's default tolerance."""
        if self.metric == "agreement":
            others = replace(tolerance_for(precision), min_argmax_agreement=0.0)
            return Tolerance(max_rel_l2=NO_LIMIT, min_cosine=-1.0, min_argmax_agreement=self.value, other_outputs=others)
        if self.is_map:
            # Raw detector outputs are not compared: near-tied boxes swap places under int8; the mAP judges.
            return Tolerance(max_rel_l2=NO_LIMIT, min_cosine=-1.0, min_argmax_agreement=0.0)
        return Tolerance(max_rel_l2=self.value, min_cosine=-1.0, min_argmax_agreement=0.0)

    @property
    def is_map(self) -> bool:
        """Judged by COCO mAP on labelled images rather than by the raw outputs."""
        return self.metric in MAP_METRICS

    def __str__(self) -> str:
        if self.metric == "agreement":
            return f"at most {_percent(1.0 - self.value)} of top-1 decisions change"
        if self.is_map:
            return f"{MAP_METRICS[self.metric]} drops at most {self.value:g} point{'' if self.value == 1 else 's'}"
        return f"rel L2 <= {self.value:g} on every output"


# Budget metric -> what it measures; its value is the most points (100 x mAP) the engine may lose.
MAP_METRICS = {"map": "mAP@[.5:.95]", "map50": "mAP@.5"}


def one_change(samples: int) -> str:
    """The statistical resolution of an agreement measured on ``samples``: what one changed answer weighs."""
    return f"{samples} samples: one changed answer is {100.0 / samples:.1f}%" if samples else "no samples"


def parse_budget(text: str) -> AccuracyBudget:
    """``1%`` (at most 1% of top-1 decisions change), ``agreement>=0.99``, ``rel_l2<=0.05``, or
    ``map:1%`` / ``map:1`` / ``map50:0.5`` (the most points of mAP, 100 x mAP, the engine may lose)."""
    cleaned = text.replace(" ", "").lower()
    try:
        metric, colon, points = cleaned.partition(":")
        if colon and metric in MAP_METRICS:
            value = float(points[:-1] if points.endswith("%") else points)
            if not 0 <= value <= 100:
                raise ValueError
            return AccuracyBudget(metric, value)
        if cleaned.endswith("%"):
            drop = float(cleaned[:-1]) / 100
            if not 0 <= drop < 1:
                raise ValueError
            return AccuracyBudget("agreement", 1.0 - drop)
        for prefix, metric in (("agreement>=", "agreement"), ("top1>=", "agreement"), ("rel_l2<=", "rel_l2")):
            if cleaned.startswith(prefix):
                value = float(cleaned[len(prefix) :])
                if value < 0 or (metric == "agreement" and value > 1):
                    raise ValueError
                return AccuracyBudget(metric, value)
    except ValueError:
        pass
    raise ValidationDataError(
        f"cannot read accuracy budget '{text}': use '1%' (top-1 decisions that may change), "
        "'agreement>=0.99', 'rel_l2<=0.05' or 'map:1%' (points of COCO mAP@[.5:.95] the engine may lose; map50:1% for mAP@.5)"
    )
