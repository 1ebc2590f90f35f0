"""The errors enginesmith raises at its boundary.

Every failure a user can cause (bad file, wrong input, engine from another
machine) is raised as a subclass of :class:`EnginesmithError` with a one-line
message that names the problem and, where there is one, the fix. The CLI prints
that line and exits non-zero; nothing below the library boundary should leak a
dependency's traceback for bad input.
"""

from __future__ import annotations


class EnginesmithError(Exception):
    """Base class of every error enginesmith raises on purpose.

    ``stage`` names the build stage it came from (``import``, ``check``, ``passes``, ...) when
    it was raised inside one; the CLI prints it as "build failed at stage 'verify': ...".
    """

    stage: str | None = None


class SourceError(EnginesmithError):
    """The model file or object cannot be read or is not a valid model."""


class MissingDependencyError(EnginesmithError):
    """An optional framework or backend library is not installed."""


class UnsupportedModelError(EnginesmithError):
    """The model uses something the chosen backend cannot build or run."""


class BackendUnavailableError(EnginesmithError):
    """The requested backend cannot be used on this machine."""


class BuildError(EnginesmithError):
    """Building the engine failed for a reason other than an unsupported op."""


def stage_failure_text(stage: str, message: str) -> str:
    """How a failure inside a build stage reads: "build failed at stage 'passes': ..."."""
    return f"build failed at stage '{stage}': {message}"


class StageFailedError(BuildError):
    """Something other than bad input failed inside a build stage (a bug, a library's own failure).

    The message names the stage; the original exception is chained as ``__cause__``, so a
    traceback (``--debug``) shows where it came from.
    """

    def __init__(self, stage: str, cause: BaseException):
        detail = " ".join(str(cause).split())[:300]
        what = f"{type(cause).__name__}: {detail}" if detail else type(cause).__name__
        super().__init__(stage_failure_text(stage, what))
        self.stage = stage


class VerificationFailedError(BuildError):
    """The built engine's outputs differ from the source model's beyond the tolerance."""


class InputError(EnginesmithError):
    """Inputs given to an engine do not match its signature."""


class BundleError(EnginesmithError):
    """An engine bundle is unreadable, corrupted, tampered with or unsafe."""


class PlatformMismatchError(BundleError):
    """An engine bundle was built for another platform than this one."""


class UntrustedCodeError(BundleError):
    """Loading this engine would run code carried in the file, and the caller did not say it trusts it."""


class ValidationDataError(EnginesmithError):
    """Data given for validation, calibration or benchmarking is unusable."""


class OutputExistsError(EnginesmithError):
    """A command would replace an existing file (or its own input) and was not told to (``--force``)."""


class NotExportableError(EnginesmithError):
    """An engine cannot be written in the asked serving format (its payload has no form that server loads)."""
