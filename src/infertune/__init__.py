"""infertune: the fastest deployable variant of an ONNX model within an accuracy budget.

The public API (everything else is internal and may move)::

    from infertune import Model, Dataset, Settings, quantize, compare, bench, profile, explain
    from infertune import Budget, Evaluator, calibrated_space, sensitivity, meet_budget, tune, load

Names are imported on first use, so ``import infertune`` stays light and loads no runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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

_PUBLIC = {
    "Model": "infertune.model",
    "Dataset": "infertune.data",
    "Settings": "infertune.backends",
    "quantize": "infertune.quant.quantize",
    "AlgorithmOptions": "infertune.quant.algorithms",
    "QuantSpace": "infertune.quant.space",
    "calibrated_space": "infertune.quant.space",
    "compare": "infertune.analysis.compare",
    "layerwise": "infertune.analysis.layerwise",
    "Budget": "infertune.analysis.accuracy",
    "Evaluator": "infertune.analysis.accuracy",
    "sensitivity": "infertune.analysis.sensitivity",
    "bench": "infertune.perf.latency",
    "profile": "infertune.perf.profile",
    "explain": "infertune.perf.explain",
    "meet_budget": "infertune.search.mixed_precision",
    "tune": "infertune.search.tuner",
    "load": "infertune.deploy.artifact",
}

if TYPE_CHECKING:
    from infertune.analysis.accuracy import Budget, Evaluator
    from infertune.analysis.compare import compare
    from infertune.analysis.layerwise import layerwise
    from infertune.analysis.sensitivity import sensitivity
    from infertune.backends import Settings
    from infertune.data import Dataset
    from infertune.deploy.artifact import load
    from infertune.model import Model
    from infertune.perf.explain import explain
    from infertune.perf.latency import bench
    from infertune.perf.profile import profile
    from infertune.quant.algorithms import AlgorithmOptions
    from infertune.quant.quantize import quantize
    from infertune.quant.space import QuantSpace, calibrated_space
    from infertune.search.mixed_precision import meet_budget
    from infertune.search.tuner import tune


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'infertune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AlgorithmOptions",
    "BackendUnavailable",
    "Budget",
    "CalibrationError",
    "CheckFailed",
    "DataError",
    "Dataset",
    "Evaluator",
    "InfertuneError",
    "Model",
    "ModelError",
    "QuantSpace",
    "Settings",
    "UsageError",
    "__version__",
    "bench",
    "calibrated_space",
    "compare",
    "explain",
    "layerwise",
    "load",
    "meet_budget",
    "profile",
    "quantize",
    "sensitivity",
    "tune",
]
