"""ONNX Runtime on an NVIDIA GPU: the CUDA (``ort-cuda``) and TensorRT (``ort-tensorrt``) providers.

Needs onnxruntime-gpu (``pip install 'infertune[gpu-cu13]'``, or ``gpu-cu12`` for CUDA 12;
``infertune doctor`` checks it against the CUDA, cuDNN and TensorRT found). Options come from
``Settings.options`` (``backends.gpu``): FP16, INT8 through the model's Q/DQ, engine and timing
caches, builder optimisation level, CUDA graphs, optimisation profiles.

"Listed" is not "usable": onnxruntime-gpu lists its CUDA and TensorRT providers on a machine
without a GPU, and a session asking for them falls back to the CPU with only a log line. So a
runner is refused (BackendUnavailable, exit 3) when the driver reports no device, and when the
session's first provider is not the one asked for: a "GPU" latency measured on the CPU would
mislead.

Inputs and outputs live in device memory through I/O binding: a call copies the feeds into the
bound device inputs in place (so a captured CUDA graph replays on the same addresses), runs, and
copies the outputs back; ``run_device`` skips that last copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from infertune.backends import Settings, cuda
from infertune.backends.gpu import GpuOptions, provider_chain
from infertune.backends.ort import FEED_ERRORS, create_session, rejected_feed
from infertune.errors import BackendUnavailable
from infertune.model import Model


class OrtGpuRunner:
    def __init__(self, model: Model, settings: Settings, backend: str) -> None:
        self.backend = backend
        self.options = GpuOptions.from_settings(settings)
        chain = provider_chain(backend, model, self.options)
        wanted = chain[0][0]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(f"{wanted} is not in this onnxruntime (it has {', '.join(available)}): "
                                     "pip install 'infertune[gpu-cu13]' (onnxruntime-gpu, not onnxruntime) and "
                                     "run `infertune doctor`")
        cuda.require_gpu(None, f"{backend} ({wanted}, listed by onnxruntime)")
        self.session = create_session(model, settings, chain)
        active = self.session.get_providers()
        if not active or active[0] != wanted:
            raise BackendUnavailable(f"{wanted} did not load for {model.name} (ONNX Runtime fell back to "
                                     f"{', '.join(active)}); run `infertune doctor` for the CUDA/cuDNN/TensorRT "
                                     "versions it needs")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.binding = self.session.io_binding()
        self._key: tuple | None = None
        self._inputs: dict[str, ort.OrtValue] = {}

    def run_device(self, feeds: Mapping[str, np.ndarray]) -> list[ort.OrtValue]:
        """Run with the outputs left in device memory (bound once, reused every call)."""
        key = tuple((k, v.shape, v.dtype.str) for k, v in feeds.items())
        try:
            if key != self._key:
                self._bind(feeds)
                self._key = key
            else:
                for k, v in feeds.items():
                    self._inputs[k].update_inplace(np.ascontiguousarray(v))
            self.session.run_with_iobinding(self.binding)
        except FEED_ERRORS as e:
            raise rejected_feed(e) from None
        return self.binding.get_outputs()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.run_device(feeds)
        return dict(zip(self.output_names, self.binding.copy_outputs_to_cpu(), strict=True))

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        device, dev = "cuda", self.options.device_id
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, dev)
                        for k, v in feeds.items()}
        for k, v in self._inputs.items():
            self.binding.bind_ortvalue_input(k, v)
        for name in self.output_names:  # first run: ONNX Runtime allocates, which tells the shapes
            self.binding.bind_output(name, device, dev)
        self.session.run_with_iobinding(self.binding)
        shapes = [(o.shape(), o.data_type()) for o in self.binding.get_outputs()]
        self.binding.clear_binding_outputs()
        for name, (shape, dtype) in zip(self.output_names, shapes, strict=True):
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, _numpy_dtype(dtype), device, dev)
            self.binding.bind_ortvalue_output(name, value)


def _numpy_dtype(ort_type: str) -> type:
    """'tensor(float)' -> np.float32, as OrtValue.data_type() names them."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64,
            "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}[name]


class OrtCudaBackend:
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"

    def compile(self, model: Model, settings: Settings) -> OrtGpuRunner:
        return OrtGpuRunner(model, settings, self.name)

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (its provider is not in this onnxruntime), or None."""
        listed = ort.get_available_providers()
        return None if self.provider in listed else f"{self.provider} is not in this onnxruntime ({', '.join(listed)})"

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": ort.__version__}


class OrtTensorrtBackend(OrtCudaBackend):
    name = "ort-tensorrt"
    provider = "TensorrtExecutionProvider"
