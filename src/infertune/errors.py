"""One root error with a few subclasses; each carries the CLI exit code it maps to.

Messages say what failed and where (file, input, tensor, node), expected vs got, and the fix.
The CLI prints them on one line without a traceback; any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BACKEND_UNAVAILABLE = 3


class InfertuneError(Exception):
    """Base of every error infertune raises on purpose (bad input, unmet budget, ...)."""

    exit_code = EXIT_BAD_INPUT


class ModelError(InfertuneError):
    """The model file is missing, corrupt, invalid or uses something we cannot handle."""


class DataError(InfertuneError):
    """The data does not fit the model (missing/misnamed input, dtype, rank, shape, empty)."""


class CalibrationError(InfertuneError):
    """Calibration could not produce ranges (no finite values, nothing to quantize, ...)."""


class UsageError(InfertuneError):
    """An option or argument is malformed or contradicts another one."""


class OutputError(UsageError):
    """An output cannot be written where asked: it is an input, a directory infertune did not
    create, a protected location (home, the working directory, ...) or an unwritable place."""


class UserCodeError(InfertuneError):
    """The user's own Python (a metric or a data function given as FILE.py:FUNC) raised or returned
    something unusable; the message carries its traceback, only the frames of the user's file."""


class BackendUnavailable(InfertuneError):
    """A backend's optional dependency or device is missing; the message names the extra."""

    exit_code = EXIT_BACKEND_UNAVAILABLE


class CheckFailed(InfertuneError):
    """A tolerance or budget was not met. Carries the result that failed, for --json output."""

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class InfertuneWarning(UserWarning):
    """Something the user should know that does not stop the work (data notes, a stale lock taken
    over, a damaged journal line kept aside); the CLI prints each as one ``warning:`` line."""
