"""A torch source's ONNX export run in a child process, alongside the backend's build.

When the PyTorch backend builds from the torch source itself (``native_source.py``), the
ONNX conversion is not on the engine's path: the build needs it only for the bundle's
records and to know that the model still converts for other backends. The importer then
saves the ``torch.export`` program it made anyway (``.pt2``), and this module converts that
file in a separate Python process (:data:`CHILD_CODE`, which calls :func:`child_main`), so
the dynamo exporter runs in parallel with Inductor instead of taking turns with it for the
GIL.

The child reads ``job.json`` (the program file, input and output names, opset) from a
private temporary folder, and writes ``model.onnx`` then ``result.json`` there, each
atomically; its own prints go to ``child.log``. :meth:`OnnxJob.wait` joins it and
:meth:`OnnxJob.cancel` kills and joins it; either removes the folder, and a job dropped
without either is killed when it is garbage-collected or the interpreter exits, so no child
outlives the build.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import UnsupportedModelError

JOB_FILE, RESULT_FILE, MODEL_FILE, PROGRAM_FILE, CHILD_LOG = "job.json", "result.json", "model.onnx", "program.pt2", "child.log"


@dataclass
class OnnxOutcome:
    """What the child reported: the ONNX bytes and its log lines, or the dynamo exporter's failure."""

    model_bytes: bytes | None
    log: list[str] = field(default_factory=list)
    failure: str = ""  # the dynamo exporter's error, one line; empty when it converted
    seconds: float = 0.0  # wall time from starting the child to its result (its Python and torch imports included)


def _stop(process: subprocess.Popen, folder: str) -> None:
    """Kill the child (if still running), reap it, remove its folder."""
    if process.poll() is None:
        process.kill()
    process.wait()
    shutil.rmtree(folder, ignore_errors=True)


class OnnxJob:
    """One running export; join it with :meth:`wait`, or stop it with :meth:`cancel`."""

    def __init__(self, program_bytes: bytes, input_names: Sequence[str], output_names: Sequence[str], opset: int,
                 imports: Sequence[str] = ()):
        """``imports``: modules defining the program's input/output container types (transformers'
        ``ModelOutput`` classes register themselves as pytree nodes on import; without them the
        program does not load)."""
        self.folder = Path(tempfile.mkdtemp(prefix="enginesmith-onnx-"))
        (self.folder / PROGRAM_FILE).write_bytes(program_bytes)
        job = {"program": PROGRAM_FILE, "input_names": list(input_names), "output_names": list(output_names),
               "opset": int(opset), "imports": list(imports)}
        (self.folder / JOB_FILE).write_text(json.dumps(job))
        self.started = time.time()  # wall clock: the child stamps its finish with the same clock
        # The child imports the same enginesmith as this process, whatever put it on sys.path (the folder is
        # added only where the child's own path lacks it, so an installed package never goes before the stdlib).
        package_root = str(Path(__file__).resolve().parents[2])
        try:
            with open(self.folder / CHILD_LOG, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", CHILD_CODE, package_root, str(self.folder / JOB_FILE)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _stop, self.process, str(self.folder))
        self.outcome: OnnxOutcome | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self) -> OnnxOutcome:
        """The child's outcome, after it exits; raises UnsupportedModelError when it died without one."""
        if self.outcome is not None:
            return self.outcome
        try:
            code = self.process.wait()
            result = self.folder / RESULT_FILE
            if not result.is_file():
                tail = (self.folder / CHILD_LOG).read_text(errors="replace").strip().splitlines()[-1:] if (
                    self.folder / CHILD_LOG).is_file() else []
                raise UnsupportedModelError(f"the ONNX export process exited with code {code} before converting the model"
                                            + (f": {tail[0][:240]}" if tail else ""))
            record = json.loads(result.read_text())
            model = self.folder / MODEL_FILE
            self.outcome = OnnxOutcome(model.read_bytes() if record.get("ok") else None, list(record.get("log") or []),
                                       str(record.get("failure") or ""),
                                       max(0.0, float(record.get("finished_at") or time.time()) - self.started))
            return self.outcome
        finally:
            self._finalizer()

    def cancel(self) -> None:
        """Kill and join the child, if it still runs; remove its folder."""
        self._finalizer()


def _convert(job_path: Path) -> None:
    """The child's work: the program in ``job.json``'s folder to ONNX, results written next to it."""
    folder = job_path.parent
    job = json.loads(job_path.read_text())
    from ..files import write_atomic
    from . import ImportOptions
    from . import _convert as cv
    from .torch_to_onnx import dynamo_onnx, name_dims

    torch = cv.torch()
    log: list[str] = []
    record: dict = {"ok": False}
    try:
        for module in job.get("imports") or ():  # modules this process's parent had imported already
            importlib.import_module(module)
        with cv.quiet(cv.TORCH_LOGGERS, streams=True):
            program = torch.export.load(str(folder / job["program"]))
        proto = dynamo_onnx(program, job["input_names"], job["output_names"], ImportOptions(opset=job["opset"]), log)
        name_dims(proto, job["input_names"])
        write_atomic(folder / MODEL_FILE, proto.SerializeToString())
        record = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides what it means
        record = {"ok": False, "failure": cv.first_line(exc, 240)}
    record.update(log=log, finished_at=time.time())
    write_atomic(folder / RESULT_FILE, json.dumps(record).encode())


def child_main(job_path: str) -> None:
    """The child process: convert, then exit at once."""
    _convert(Path(job_path))
    # The result is on disk; skip the interpreter's teardown (seconds of freeing torch state) the parent would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


CHILD_CODE = (
    "import sys\n"
    "root, job = sys.argv[1:3]\n"
    "if root not in sys.path:\n"
    "    sys.path.insert(0, root)\n"
    "from enginesmith.importers.onnx_job import child_main\n"
    "child_main(job)\n"
)
