"""OpenVINO CPU backend: the same ONNX (or Q/DQ ONNX) file, compiled by OpenVINO.

Compiled for latency (one stream, ``PERFORMANCE_HINT=LATENCY``) with float32 inference precision,
so an FP32 model is not silently run in bf16/f16 on CPUs that have them; ``intra_op_threads``
maps to ``INFERENCE_NUM_THREADS``. Q/DQ models run OpenVINO's own int8 kernels: measure their
fidelity here, not on ONNX Runtime (the same file can give different outputs on each).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openvino as ov

from infertune.backends import Settings
from infertune.errors import DataError, ModelError
from infertune.model import Model

_CORE: ov.Core | None = None


def core() -> ov.Core:
    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


def compile_config(settings: Settings) -> dict[str, str]:
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32"}
    if settings.intra_op_threads:
        config["INFERENCE_NUM_THREADS"] = str(settings.intra_op_threads)
    for key, value in settings.options.items():
        if key.isupper():  # OpenVINO property names are upper case
            config[key] = str(value)
    return config


class OpenVinoRunner:
    backend = "openvino"

    def __init__(self, model: Model, settings: Settings) -> None:
        try:
            if model.path is not None and Path(model.path).is_file() and not model.renamed_nodes:
                ov_model = core().read_model(str(model.path))
            else:
                with tempfile.TemporaryDirectory(prefix="infertune-ov-") as d:
                    path = model.save(Path(d) / "model.onnx")
                    ov_model = core().read_model(str(path))
            self.compiled = core().compile_model(ov_model, "CPU", compile_config(settings))
        except RuntimeError as e:
            raise ModelError(f"OpenVINO cannot compile {model.name}: {_reason(e)}") from None
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except RuntimeError as e:
            raise DataError(f"OpenVINO rejected the feed: {_reason(e)}") from None
        return {name: np.array(self.request.get_output_tensor(i).data, copy=True)
                for i, name in enumerate(self.output_names)}


def _reason(e: Exception) -> str:
    """OpenVINO's messages start with the C++ source location; the reason is in the lines after it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Exception from")]
    return (" ".join(lines) or type(e).__name__)[:400]


class OpenVinoBackend:
    name = "openvino"

    def compile(self, model: Model, settings: Settings) -> OpenVinoRunner:
        return OpenVinoRunner(model, settings)

    def versions(self) -> dict[str, str]:
        return {"openvino": ov.__version__}
