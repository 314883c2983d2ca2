"""ONNX Runtime CPU backend (the default)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infertune.backends import Settings
from infertune.errors import DataError, ModelError
from infertune.model import Model

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "layout": getattr(
        ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ),
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
_PROTO_LIMIT = 2**31 - 2**24  # in-memory models must stay under protobuf's 2 GB
# ORT's MatMulAddFusion (a basic-level rewrite) turns MatMul + bias Add into Gemm, reshaping 3-D inputs to 2-D
# where their shapes are static, before the Q/DQ fusions (extended level) look at the graph. A Gemm without a Q
# on its output has no 8-bit kernel, so a DQ -> MatMul -> Add that becomes MatMulIntegerToFloat ran instead as
# DequantizeLinear + float Gemm on every call. In the committed tune benchmark (Zen 3 EPYC, ORT 1.32), MiniLM's
# full INT8 on ORT timed 100.7 ms at 1 thread with the rewrite and 39.4 ms without it (FP32 about 54 ms).
# Off for Q/DQ models that feed a MatMul from a DequantizeLinear; FP32 keeps it.
QDQ_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def session_options(settings: Settings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = settings.inter_op_threads
    so.graph_optimization_level = _LEVELS[settings.graph_optimization]
    so.execution_mode = _MODES[settings.execution_mode]
    so.log_severity_level = 4  # errors come back as exceptions; ORT would also print them
    if settings.profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = settings.profile_prefix
    for key, value in settings.options.items():
        if key.startswith("session."):
            so.add_session_config_entry(key, str(value))
    return so


def disabled_optimizers(model: Model) -> list[str]:
    """ORT graph rewrites that would keep a Q/DQ model's MatMuls out of their 8-bit kernels."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    if any(n.op_type == "MatMul" and dq.intersection(n.input) for n in model.graph.node):
        return list(QDQ_DISABLED_OPTIMIZERS)
    return []


def create_session(model: Model, settings: Settings,
                   providers: list[tuple[str, dict[str, str]]] | None = None) -> ort.InferenceSession:
    """An InferenceSession for ``model`` with ``settings`` on ``providers`` (default: CPU), or a clear error."""
    so = session_options(settings)
    tmp_optimized: Path | None = None
    if settings.optimized_model_path:
        target = Path(settings.optimized_model_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_optimized = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        so.optimized_model_filepath = str(tmp_optimized)
    source: str | bytes
    if model.proto.ByteSize() < _PROTO_LIMIT:
        source = model.to_bytes()
    elif model.path is not None and not model.renamed_nodes:
        source = str(model.path)
    else:
        raise ModelError(f"{model.name}: a model over 2 GB must be run from its file, unmodified")
    chain = providers or [("CPUExecutionProvider", {})]
    try:
        session = ort.InferenceSession(source, sess_options=so, providers=[p for p, _ in chain],
                                       provider_options=[o for _, o in chain],
                                       disabled_optimizers=disabled_optimizers(model))
    except Exception as e:  # noqa: BLE001 - ORT raises several pybind types for bad models
        if tmp_optimized is not None:
            tmp_optimized.unlink(missing_ok=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"ONNX Runtime cannot load {model.name}: {first}") from None
    if tmp_optimized is not None:
        os.replace(tmp_optimized, settings.optimized_model_path)
    return session


def rejected_feed(e: Exception) -> DataError:
    first = str(e).strip().splitlines()[0]
    return DataError(f"ONNX Runtime rejected the feed: {first}")


FEED_ERRORS = (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail)


class OrtRunner:
    backend = "ort"

    def __init__(self, model: Model, settings: Settings) -> None:
        self.session = create_session(model, settings)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._bound = _Bound(self.session, self.output_names) if settings.preallocate else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if self._bound is not None:
                return self._bound.run(feeds)
            outs = self.session.run(self.output_names, feeds)
        except FEED_ERRORS as e:
            raise rejected_feed(e) from None
        return dict(zip(self.output_names, outs, strict=True))


class _Bound:
    """Input and output buffers bound once (ORT I/O binding), rebound only when shapes change.

    A call copies the feeds into the bound input arrays and runs; the outputs land in the same
    preallocated arrays every time, so steady state allocates no array per call.
    """

    def __init__(self, session: ort.InferenceSession, output_names: list[str]) -> None:
        self.session = session
        self.output_names = output_names
        self.binding = session.io_binding()
        self.key: tuple | None = None
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple((k, v.shape, v.dtype.str) for k, v in feeds.items())
        if key != self.key:
            self._bind(feeds)
            self.key = key
        for k, v in feeds.items():
            if v is not self.inputs[k]:
                np.copyto(self.inputs[k], v)
        self.session.run_with_iobinding(self.binding)
        return self.outputs

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self.inputs = {k: np.ascontiguousarray(v).copy() for k, v in feeds.items()}
        for k, v in self.inputs.items():
            self.binding.bind_input(k, "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)
        first = self.session.run(self.output_names, dict(self.inputs))  # learns the output shapes
        self.outputs = {k: np.empty_like(o) for k, o in zip(self.output_names, first, strict=True)}
        for k, v in self.outputs.items():
            self.binding.bind_output(k, "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)


class OrtBackend:
    name = "ort"

    def compile(self, model: Model, settings: Settings) -> OrtRunner:
        return OrtRunner(model, settings)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": ort.__version__}
