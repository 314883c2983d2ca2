"""OpenVINO CPU backend: the same ONNX (or Q/DQ ONNX) file, compiled by OpenVINO.

Compiled for latency (one stream, ``PERFORMANCE_HINT=LATENCY``) with float32 inference precision,
so an FP32 model is not silently run in bf16/f16 on CPUs that have them (bf16 is a variant of its own,
``INFERENCE_PRECISION_HINT=bf16``, which tune measures where ``native_bf16``); ``intra_op_threads``
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


def native_bf16() -> bool:
    """The CPU computes bfloat16 in hardware (AVX512_BF16 or AMX): OpenVINO's CPU plugin then lists BF16
    among its optimization capabilities (and would run FP32 models in bf16 by default)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(settings: Settings) -> dict[str, str]:
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32"}
    if settings.intra_op_threads:
        config["INFERENCE_NUM_THREADS"] = str(settings.intra_op_threads)
    for key, value in settings.options.items():
        if key.isupper():  # OpenVINO property names are upper case
            config[key] = str(value)
    return config


class OpenVinoRunner:
    """An OpenVINO compiled model per input shape: a model with dynamic dims is reshaped to each
    feed's static shapes before it is compiled (a deployment feeding one size compiles that;
    OpenVINO computed garbage for a Q/DQ detector compiled with dynamic dims). Up to
    ``MAX_SHAPES`` shapes are kept compiled."""

    backend = "openvino"
    MAX_SHAPES = 8

    def __init__(self, model: Model, settings: Settings) -> None:
        self.name, self.config = model.name, compile_config(settings)
        try:
            if model.path is not None and Path(model.path).is_file() and not model.renamed_nodes:
                self.ov_model = core().read_model(str(model.path))
            else:
                with tempfile.TemporaryDirectory(prefix="infertune-ov-") as d:
                    path = model.save(Path(d) / "model.onnx")
                    self.ov_model = core().read_model(str(path))
        except RuntimeError as e:
            raise ModelError(f"OpenVINO cannot read {model.name}: {_reason(e)}") from None
        self.input_names = [i.get_any_name() for i in self.ov_model.inputs]
        self.output_names = [o.get_any_name() for o in self.ov_model.outputs]
        self.dynamic = any(i.get_partial_shape().is_dynamic for i in self.ov_model.inputs)
        self.requests: dict[tuple, ov.InferRequest] = {}
        if not self.dynamic:
            self.requests[()] = self._compile(self.ov_model)

    def _compile(self, ov_model) -> ov.InferRequest:
        try:
            return core().compile_model(ov_model, "CPU", self.config).create_infer_request()
        except RuntimeError as e:
            raise ModelError(f"OpenVINO cannot compile {self.name}: {_reason(e)}") from None

    def _request(self, feeds: Mapping[str, np.ndarray]) -> ov.InferRequest:
        if not self.dynamic:
            return self.requests[()]
        key = tuple((k, tuple(np.shape(v))) for k, v in sorted(feeds.items()))
        if key not in self.requests:
            if len(self.requests) >= self.MAX_SHAPES:
                self.requests.pop(next(iter(self.requests)))
            static = self.ov_model.clone()
            try:
                static.reshape({name: ov.PartialShape(list(shape)) for name, shape in key})
            except RuntimeError as e:
                shapes = ", ".join(f"{name} {list(shape)}" for name, shape in key)
                raise DataError(f"OpenVINO rejected the feed's shapes ({shapes}): {_reason(e)}") from None
            self.requests[key] = self._compile(static)
        return self.requests[key]

    @property
    def compiled_models(self) -> list:
        """The compiled models so far, one per static input shape (one in all for a static model)."""
        return [r.get_compiled_model() for r in self.requests.values()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._request(feeds)
        try:
            request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except RuntimeError as e:
            raise DataError(f"OpenVINO rejected the feed: {_reason(e)}") from None
        return {name: np.array(request.get_output_tensor(i).data, copy=True)
                for i, name in enumerate(self.output_names)}


def _reason(e: Exception) -> str:
    """OpenVINO's messages start with the C++ source location; the reason is in the lines after it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Exception from")]
    return (" ".join(lines) or type(e).__name__)[:400]


class OpenVinoBackend:
    name = "openvino"

    def compile(self, model: Model, settings: Settings) -> OpenVinoRunner:
        return OpenVinoRunner(model, settings)

    def native_bf16(self) -> bool:
        return native_bf16()

    def versions(self) -> dict[str, str]:
        return {"openvino": ov.__version__}
