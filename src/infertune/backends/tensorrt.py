"""Native TensorRT (``tensorrt``): engine build from the ONNX file, and a runner that measures it.

Needs TensorRT 10 or 11 (``pip install 'infertune[tensorrt]'`` for 11; the ``gpu-cu12`` /
``gpu-cu13`` extras bring 10, the version ONNX Runtime's TensorRT provider loads), cuda-python
12 or 13 and a usable NVIDIA GPU. Written against the Python bindings of both majors, which
``tests/test_gpu_conformance.py`` imports for real (their native libraries stubbed) to check
every name used here:

- build: ``OnnxParser`` into a strongly typed network (precision from the graph: Q/DQ for INT8,
  an FP16 graph for FP16; see ``backends.gpu``), builder config from ``gpu.build_plan`` (workspace
  pool, builder optimisation level, version-compatible flag, hardware-compatibility level,
  detailed profiling verbosity, an optimisation profile), enum members looked up by name (their
  values differ between majors), a timing cache loaded and saved back, ``build_serialized_network``;
- engine cache: ``<engine_cache>/<key>.engine`` with its build record ``<key>.json`` (what
  ``infertune preflight`` reads); the key covers the model bytes, the plan, the TensorRT
  version and the GPU, so a changed input never reuses a stale engine. The record's CUDA version
  is TensorRT's (its package is built per CUDA major: ``tensorrt-cu12-*`` / ``tensorrt-cu13-*``),
  not cuda-python's, whose runtime is linked in statically;
- run: refused unless the driver reports a device (``cuda.require_gpu``); one execution context
  and CUDA stream per ``streams``; device buffers allocated once per input shape;
  ``execute_async_v3``; optional CUDA graph captured per shape and replayed;
- measurement: ``timed_run`` gives host-to-device, compute and device-to-host times from CUDA
  events; ``layer_times`` runs with an ``IProfiler`` (per-layer ms); ``layer_information`` is
  the engine inspector's JSON.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorrt as trt

from infertune._io import atomic_path, write_json
from infertune.backends import Settings, cuda
from infertune.backends.gpu import SUPPORTED_TENSORRT, BuildPlan, GpuOptions, build_plan
from infertune.errors import BackendUnavailable, DataError, ModelError
from infertune.model import Model

ENGINE_RECORD_SCHEMA = 2  # 2: cuda_runtime is TensorRT's CUDA major (1: cuda-python's runtime version)

cudart = cuda.runtime_api()  # cuda.bindings.runtime (cuda-python >= 12.6 / 13.x), else cuda.cudart
_LOGGER = trt.Logger(trt.Logger.WARNING)


def tensorrt_major() -> int:
    return int(str(trt.__version__).split(".")[0])


def _cuda(result):
    return cuda.checked(result, cudart)


def device_facts(device_id: int) -> dict:
    props = _cuda(cudart.cudaGetDeviceProperties(device_id))
    return {"name": props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name),
            "compute_capability": f"{props.major}.{props.minor}", "sm_count": props.multiProcessorCount,
            "memory_mib": props.totalGlobalMem // 2**20}


@functools.cache
def tensorrt_cuda() -> tuple[str | None, str | None]:
    """The CUDA major TensorRT was built for and the distribution that says so: TensorRT's pip
    packages are built per CUDA major and named for it (``tensorrt-cu13-libs``,
    ``tensorrt_cu12_bindings``); (None, None) for an install without one (a tarball or a container)."""
    owners = importlib.metadata.packages_distributions()
    for top in ("tensorrt_libs", "tensorrt_bindings", "tensorrt"):
        for dist in owners.get(top, []):
            m = re.search(r"cu(\d+)", dist.lower())
            if m:
                return m.group(1), dist
    return None, None


# ---- build ----------------------------------------------------------------------------------------
def build_engine(model: Model, options: GpuOptions) -> tuple[bytes, dict]:
    """Serialized engine and its build record (cached in ``options.engine_cache`` when given)."""
    plan = build_plan(model, options, tensorrt_major())
    gpu = device_facts(options.device_id)
    key = hashlib.sha256(model.to_bytes() + json.dumps(
        {"plan": plan.to_dict(), "trt": trt.__version__, "gpu": gpu}, sort_keys=True).encode()).hexdigest()[:24]
    if options.engine_cache:
        cached = Path(options.engine_cache) / f"{key}.engine"
        if cached.is_file() and cached.with_suffix(".json").is_file():
            return cached.read_bytes(), json.loads(cached.with_suffix(".json").read_text())
    blob = _build(model, plan)
    record = engine_record(plan, gpu, options, model)
    if options.engine_cache:
        save_engine(Path(options.engine_cache) / f"{key}.engine", blob, record)
    return blob, record


def engine_record(plan: BuildPlan, gpu: dict, options: GpuOptions, model: Model) -> dict:
    """What an engine was built for: read by preflight before anyone tries to deserialize it."""
    cuda_major, source = tensorrt_cuda()
    return {"schema_version": ENGINE_RECORD_SCHEMA, "kind": "infertune-tensorrt-engine",
            "tensorrt": trt.__version__, "version_compatible": options.version_compatible,
            "hardware_compatibility": options.hardware_compatibility, "gpu": gpu,
            "cuda_runtime": cuda_major, "cuda_runtime_source": source, "model": model.name,
            "plan": plan.to_dict()}


def save_engine(path: Path, blob: bytes, record: dict) -> None:
    """The engine and its build record, which carries the engine's sha256 (preflight checks the pair)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    write_json(path.with_suffix(".json"), {**record, "engine_sha256": hashlib.sha256(blob).hexdigest()})


def _build(model: Model, plan: BuildPlan) -> bytes:
    builder = trt.Builder(_LOGGER)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse(model.to_bytes()):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" at node {first.node_name()!r} ({first.node_operator()})" if first is not None else ""
        raise ModelError(f"TensorRT cannot parse {model.name}{where}: "
                         f"{first.desc() if first is not None else 'unknown error'}")
    config = builder.create_builder_config()
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.builder_optimization_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compatibility_level)
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, plan.profiling_verbosity)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in plan.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ModelError(f"TensorRT could not build an engine for {model.name} (see the TensorRT log above)")
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))
    return bytes(blob)


# ---- run ------------------------------------------------------------------------------------------
class _LayerProfiler(trt.IProfiler):
    def __init__(self) -> None:
        trt.IProfiler.__init__(self)
        self.ms: dict[str, float] = {}

    def report_layer_time(self, layer_name: str, ms: float) -> None:
        self.ms[layer_name] = self.ms.get(layer_name, 0.0) + ms


@dataclass
class _Slot:
    """One execution context with its stream, device buffers and (optional) CUDA graph."""

    context: object
    stream: int
    key: tuple | None = None
    device: dict | None = None  # tensor name -> (pointer, nbytes)
    outputs: dict | None = None  # output name -> host array
    graph: object | None = None


@dataclass(frozen=True)
class Timing:
    h2d_ms: float
    compute_ms: float
    d2h_ms: float

    def to_dict(self) -> dict:
        return {"h2d_ms": self.h2d_ms, "compute_ms": self.compute_ms, "d2h_ms": self.d2h_ms}


class TensorRTRunner:
    backend = "tensorrt"

    def __init__(self, model: Model, settings: Settings) -> None:
        if cudart is None:
            raise BackendUnavailable("native TensorRT needs cuda-python: pip install 'infertune[tensorrt]'")
        if tensorrt_major() not in SUPPORTED_TENSORRT:
            raise BackendUnavailable(f"TensorRT {trt.__version__} is installed; the native backend supports "
                                     f"{' and '.join(f'{m}.x' for m in SUPPORTED_TENSORRT)}: "
                                     "pip install 'infertune[tensorrt]'")
        self.options = GpuOptions.from_settings(settings)
        cuda.require_gpu(cudart, "native TensorRT")
        _cuda(cudart.cudaSetDevice(self.options.device_id))
        blob, self.record = build_engine(model, self.options)
        self.engine = trt.Runtime(_LOGGER).deserialize_cuda_engine(blob)
        if self.engine is None:
            raise ModelError(f"TensorRT could not deserialize the engine built for {model.name}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.slots = [_Slot(self.engine.create_execution_context(), _cuda(cudart.cudaStreamCreate()))
                      for _ in range(self.options.streams)]

    def run(self, feeds: Mapping[str, np.ndarray], slot: int = 0) -> dict[str, np.ndarray]:
        s = self._prepare(self.slots[slot], feeds)
        self._h2d(s, feeds)
        self._execute(s)
        self._d2h(s)
        _cuda(cudart.cudaStreamSynchronize(s.stream))
        return {k: v.copy() for k, v in s.outputs.items()}

    def timed_run(self, feeds: Mapping[str, np.ndarray], slot: int = 0) -> Timing:
        """One run with CUDA events between the copies and the compute."""
        s = self._prepare(self.slots[slot], feeds)
        events = [_cuda(cudart.cudaEventCreate()) for _ in range(4)]
        _cuda(cudart.cudaEventRecord(events[0], s.stream))
        self._h2d(s, feeds)
        _cuda(cudart.cudaEventRecord(events[1], s.stream))
        self._execute(s)
        _cuda(cudart.cudaEventRecord(events[2], s.stream))
        self._d2h(s)
        _cuda(cudart.cudaEventRecord(events[3], s.stream))
        _cuda(cudart.cudaEventSynchronize(events[3]))
        ms = [_cuda(cudart.cudaEventElapsedTime(a, b)) for a, b in zip(events[:-1], events[1:], strict=True)]
        for e in events:
            _cuda(cudart.cudaEventDestroy(e))
        return Timing(*ms)

    def layer_times(self, feeds: Mapping[str, np.ndarray], runs: int = 10) -> dict[str, float]:
        """Mean ms per layer over ``runs`` (IProfiler; CUDA graphs are bypassed while profiling)."""
        s = self._prepare(self.slots[0], feeds)
        profiler = _LayerProfiler()
        s.context.profiler = profiler
        try:
            self._h2d(s, feeds)
            for _ in range(runs):
                if not s.context.execute_async_v3(s.stream):
                    raise DataError("TensorRT failed to execute the engine")
                _cuda(cudart.cudaStreamSynchronize(s.stream))
        finally:
            s.context.profiler = None
        return {k: v / runs for k, v in profiler.ms.items()}

    def layer_information(self) -> dict:
        inspector = self.engine.create_engine_inspector()
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))

    # -- internals
    def _prepare(self, s: _Slot, feeds: Mapping[str, np.ndarray]) -> _Slot:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise DataError(f"missing input(s) {', '.join(sorted(missing))} (the engine takes "
                            f"{', '.join(self.input_names)})")
        key = tuple((k, feeds[k].shape, feeds[k].dtype.str) for k in self.input_names)
        if key == s.key:
            return s
        self._free(s)
        s.device, s.outputs = {}, {}
        for name in self.input_names:
            want = trt.nptype(self.engine.get_tensor_dtype(name))
            if feeds[name].dtype != want:
                raise DataError(f"input {name!r}: dtype {feeds[name].dtype}, the engine takes {np.dtype(want)}")
            if not s.context.set_input_shape(name, feeds[name].shape):
                raise DataError(f"input {name!r}: shape {feeds[name].shape} is outside the engine's optimisation "
                                "profile (give profile_shapes that cover it)")
        for name in self.input_names + self.output_names:
            shape = tuple(s.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            ptr = _cuda(cudart.cudaMalloc(max(nbytes, 1)))
            s.device[name] = (ptr, nbytes)
            s.context.set_tensor_address(name, ptr)
            if name in self.output_names:
                s.outputs[name] = np.empty(shape, dtype)
        s.key = key
        if self.options.cuda_graph:
            s.context.execute_async_v3(s.stream)  # a first run outside capture finishes lazy setup
            _cuda(cudart.cudaStreamSynchronize(s.stream))
            _cuda(cudart.cudaStreamBeginCapture(s.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            s.context.execute_async_v3(s.stream)
            graph = _cuda(cudart.cudaStreamEndCapture(s.stream))
            s.graph = _cuda(cudart.cudaGraphInstantiate(graph, 0))
        return s

    def _h2d(self, s: _Slot, feeds: Mapping[str, np.ndarray]) -> None:
        for name in self.input_names:
            a = np.ascontiguousarray(feeds[name])
            ptr, nbytes = s.device[name]
            _cuda(cudart.cudaMemcpyAsync(ptr, a.ctypes.data, nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, s.stream))

    def _execute(self, s: _Slot) -> None:
        if s.graph is not None:
            _cuda(cudart.cudaGraphLaunch(s.graph, s.stream))
        elif not s.context.execute_async_v3(s.stream):
            raise DataError("TensorRT failed to execute the engine")

    def _d2h(self, s: _Slot) -> None:
        for name, host in s.outputs.items():
            ptr, nbytes = s.device[name]
            _cuda(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, s.stream))

    def _free(self, s: _Slot) -> None:
        for ptr, _ in (s.device or {}).values():
            cudart.cudaFree(ptr)
        if s.graph is not None:
            cudart.cudaGraphExecDestroy(s.graph)
        s.device, s.graph, s.key = None, None, None

    def __del__(self) -> None:
        for s in getattr(self, "slots", []):
            try:
                self._free(s)
                cudart.cudaStreamDestroy(s.stream)
            except Exception:  # noqa: BLE001,S110 - interpreter shutdown
                pass


class TensorRTBackend:
    name = "tensorrt"

    def compile(self, model: Model, settings: Settings) -> TensorRTRunner:
        return TensorRTRunner(model, settings)

    def versions(self) -> dict[str, str]:
        return {"tensorrt": trt.__version__}

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (no cuda-python, an unsupported TensorRT major), or None."""
        if cudart is None:
            return "cuda-python is not installed"
        if tensorrt_major() not in SUPPORTED_TENSORRT:
            return f"TensorRT {trt.__version__} is not a supported major ({SUPPORTED_TENSORRT})"
        return None

