"""infertune: the fastest deployable variant of an ONNX model within an accuracy budget."""

from infertune.errors import (
    BackendUnavailable,
    CalibrationError,
    CheckFailed,
    DataError,
    InfertuneError,
    ModelError,
    UsageError,
)

__version__ = "0.1.0"


def load(path, *, strict: bool = False):
    """Open a tuned artifact directory after verifying every file's sha256 and this machine.

    Raises ``infertune.artifact.ArtifactError`` naming what was changed or is missing; see
    ``infertune.artifact`` for what ``strict`` adds.
    """
    from infertune.artifact import load as _load

    return _load(path, strict=strict)


__all__ = [
    "BackendUnavailable",
    "CalibrationError",
    "CheckFailed",
    "DataError",
    "InfertuneError",
    "ModelError",
    "UsageError",
    "__version__",
    "load",
]
