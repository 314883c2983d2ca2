"""Runtimes that exist only in tests, registered by the tests that use them (backends.register)."""

from __future__ import annotations

import numpy as np

from infertune.backends import Settings
from infertune.backends.ort import OrtBackend
from infertune.model import Model


class NoisyRunner:
    """ONNX Runtime underneath, with 10% noise on every output: a runtime whose FP32 disagrees."""

    backend = "noisy"

    def __init__(self, model: Model, settings: Settings) -> None:
        self.inner = OrtBackend().compile(model, settings)
        self.input_names, self.output_names = self.inner.input_names, self.inner.output_names
        self.rng = np.random.default_rng(0)

    def run(self, feeds):
        out = self.inner.run(feeds)
        return {k: v + 0.1 * np.std(v) * self.rng.standard_normal(v.shape).astype(v.dtype) for k, v in out.items()}


class NoisyBackend:
    name = "noisy"

    def compile(self, model: Model, settings: Settings) -> NoisyRunner:
        return NoisyRunner(model, settings)

    def versions(self) -> dict[str, str]:
        return {}


class RecordingGpuBackend:
    """A GPU runtime as tune sees one (tests/test_tune_gpu.py): ONNX Runtime on the CPU underneath,
    every compile recorded (which graph, with which options), its options checked by ``GpuOptions``
    as the real GPU backends check them."""

    name = "fake-gpu"
    compiles: list[dict] = []

    def compile(self, model: Model, settings: Settings):
        from dataclasses import replace

        from infertune.backends.gpu import GpuOptions, graph_precision

        GpuOptions.from_settings(settings)
        RecordingGpuBackend.compiles.append({"precision": graph_precision(model), "options": dict(settings.options),
                                             "threads": settings.intra_op_threads})
        return OrtBackend().compile(model, replace(settings, options={}))

    def versions(self) -> dict[str, str]:
        return {"fake-gpu": "1"}
