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

__all__ = [
    "BackendUnavailable",
    "CalibrationError",
    "CheckFailed",
    "DataError",
    "InfertuneError",
    "ModelError",
    "UsageError",
    "__version__",
]
