"""Backends: ``compile(model, settings) -> Runner``; ``Runner.run(feeds) -> {name: ndarray}``.

Backends are registered by name and imported on first use; ``available()`` never imports a
heavy module. A backend whose optional dependency is missing raises ``BackendUnavailable``
naming the extra to install. Feeds are validated once by the shared code
(``infertune.data.FeedValidator``), not by each backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Protocol, get_args, runtime_checkable

import numpy as np

from infertune.errors import BackendUnavailable, InfertuneWarning, ModelError, UsageError
from infertune.limits import check_threads
from infertune.model import Model

GraphOptimization = Literal["disable", "basic", "extended", "layout", "all"]
ExecutionMode = Literal["sequential", "parallel"]
GRAPH_OPTIMIZATION_LEVELS: tuple[GraphOptimization, ...] = get_args(GraphOptimization)
EXECUTION_MODES: tuple[ExecutionMode, ...] = get_args(ExecutionMode)


@dataclass(frozen=True)
class Settings:
    """Runtime settings common to backends; ``options`` carries backend-specific ones.

    Threads of 0 mean the runtime's default. ``optimized_model_path``: where to save the
    graph the runtime actually executes after its optimisations (when the backend can).
    ``static_shapes``: compile for these input shapes (what a deployment that always feeds one
    size runs; OpenVINO computed garbage for a Q/DQ detector compiled with dynamic dims).
    ``preallocate``: bind input and output buffers once and reuse them (I/O binding), so a
    steady-state ``run`` allocates nothing; its outputs are then the same arrays every call
    (copy what you keep). ``profile_prefix``: where the backend's own profiler writes.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: GraphOptimization = "all"
    execution_mode: ExecutionMode = "sequential"
    optimized_model_path: str | None = None
    preallocate: bool = False
    profile_prefix: str | None = None
    options: Mapping[str, object] = field(default_factory=dict)
    static_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise UsageError(
                f"graph optimization level must be one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}"
                f", got {self.graph_optimization!r}"
            )
        if self.execution_mode not in EXECUTION_MODES:
            raise UsageError(
                f"execution mode must be one of {', '.join(EXECUTION_MODES)}, "
                f"got {self.execution_mode!r}"
            )
        for key in ("intra_op_threads", "inter_op_threads"):
            check_threads(getattr(self, key), key)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = dict(self.options)
        d["static_shapes"] = {k: list(v) for k, v in self.static_shapes.items()}
        return d


@runtime_checkable
class Runner(Protocol):
    """A compiled model, ready to run feeds."""

    backend: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def compile(self, model: Model, settings: Settings) -> Runner: ...

    def versions(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Runtime:
    """Everything infertune knows about one runtime, in one place.

    ``name`` is what ``--backend`` / ``--runtimes`` take; ``placement`` the Q/DQ placement target
    (``quant.placement.TARGETS``) an INT8 variant for it is built with (None: no INT8 here);
    ``profiles``: per-node times (``profile``, ``explain``); ``intermediates``: any tensor can be
    exposed as an output and read back (``compare --layerwise``, fast sensitivity). ``settings``:
    the ``Settings`` fields it honours (another one set away from its default is refused, never
    ignored); ``options``: the families of ``--option`` keys it takes (``session``: ONNX Runtime
    session entries ``session.*``; ``property``: OpenVINO properties in UPPER_CASE; ``gpu``:
    ``backends.gpu.GpuOptions``). ``gpu``: runs on an NVIDIA GPU (tune adds it to ``--runtimes
    auto`` only when a GPU is usable); ``fp16``: an FP16 graph (``quant.fp16``) runs there in
    float16 (tune searches an FP16 variant on it); ``bf16``: the compile options that compute an FP32
    graph in bfloat16 (OpenVINO's inference precision; tune searches a BF16 variant where the backend's
    ``native_bf16()`` says the CPU computes bf16 in hardware: AVX512_BF16 / AMX); ``prepares_float``: its compiler folds
    BatchNormalization into convolutions and fuses decomposed HardSwish/HardSigmoid/Swish/GELU
    itself (OpenVINO's common transformations, TensorRT's builder), so FP32 of ``quant.prepare``'s
    graph is the same candidate as FP32 there (rec, benchmarks/results/tune.md, 1 thread: OpenVINO 9.19 ms
    as given vs 9.29 prepared; ONNX Runtime 16.36 vs 15.58).
    """

    name: str
    display: str
    module: str
    cls: str
    requires: str  # top-level module that must be importable
    extra: str | None  # pip extra that installs it
    placement: str | None
    profiles: bool = False
    intermediates: bool = False
    gpu: bool = False
    settings: frozenset[str] = frozenset({"intra_op_threads"})
    options: frozenset[str] = frozenset()
    fp16: bool = False
    bf16: tuple[tuple[str, str], ...] = ()
    prepares_float: bool = False

    def on(self) -> str:
        """' on OpenVINO' for labels ('' for the default runtime)."""
        return "" if self.name == DEFAULT else f" on {self.display}"


DEFAULT = "ort"
_ORT_SETTINGS = frozenset({"intra_op_threads", "inter_op_threads", "graph_optimization", "execution_mode",
                           "optimized_model_path", "preallocate", "profile_prefix"})
_REGISTRY: dict[str, Runtime] = {r.name: r for r in (
    Runtime("ort", "ONNX Runtime", "infertune.backends.ort", "OrtBackend", "onnxruntime", None, "ort-cpu",
            profiles=True, intermediates=True, settings=_ORT_SETTINGS, options=frozenset({"session"})),
    Runtime("openvino", "OpenVINO", "infertune.backends.openvino", "OpenVinoBackend", "openvino", "openvino",
            "openvino", intermediates=True, options=frozenset({"property"}), prepares_float=True,
            bf16=(("INFERENCE_PRECISION_HINT", "bf16"),)),
    # GPU: onnxruntime-gpu provides the same module as onnxruntime; the runner checks that a GPU is
    # usable and that its provider loaded (ONNX Runtime falls back to the CPU silently)
    Runtime("ort-cuda", "ONNX Runtime CUDA", "infertune.backends.ort_gpu", "OrtCudaBackend", "onnxruntime",
            "gpu-cu13", None, gpu=True, settings=_ORT_SETTINGS, options=frozenset({"session", "gpu"}), fp16=True),
    Runtime("ort-tensorrt", "ONNX Runtime TensorRT", "infertune.backends.ort_gpu", "OrtTensorrtBackend",
            "onnxruntime", "gpu-cu13", "tensorrt", gpu=True, settings=_ORT_SETTINGS,
            options=frozenset({"session", "gpu"}), fp16=True, prepares_float=True),
    Runtime("tensorrt", "TensorRT", "infertune.backends.tensorrt", "TensorRTBackend", "tensorrt", "tensorrt",
            "tensorrt", gpu=True, settings=frozenset(), options=frozenset({"gpu"}), fp16=True, prepares_float=True),
)}
_FLAGS = {"intra_op_threads": "--threads", "inter_op_threads": "--inter-threads", "graph_optimization": "--opt-level",
          "execution_mode": "--execution-mode", "optimized_model_path": "--save-optimized",
          "preallocate": "--preallocate", "profile_prefix": "a profiler"}
_OPTION_FAMILIES = {"session": "session.* (ONNX Runtime session entries)",
                    "property": "UPPER_CASE OpenVINO properties", "gpu": "GPU options (fp16, engine_cache, ...)"}
GPU_BACKENDS = tuple(n for n, r in _REGISTRY.items() if r.gpu)


def register(runtime: Runtime) -> None:
    """Register a runtime; nothing is imported until it is used."""
    _REGISTRY[runtime.name] = runtime


def names() -> list[str]:
    return list(_REGISTRY)


def runtime(name: str) -> Runtime:
    """The registry entry of ``name``; an unknown name is a usage error listing the known ones."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UsageError(f"unknown backend {name!r} (known: {', '.join(_REGISTRY)})")
    return entry


def require(name: str, capability: str, what: str) -> Runtime:
    """``name``'s entry when it has ``capability`` ('profiles', 'intermediates', 'placement');
    otherwise a usage error naming the runtimes that have it."""
    entry = runtime(name)
    if not getattr(entry, capability):
        able = [n for n, r in _REGISTRY.items() if getattr(r, capability)]
        raise UsageError(f"{what} cannot run on {name} ({entry.display}); it runs on: {', '.join(able)}")
    return entry


def available() -> dict[str, bool]:
    """Which registered backends could be imported here (without importing them)."""
    return {n: importlib.util.find_spec(e.requires) is not None for n, e in _REGISTRY.items()}


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; BackendUnavailable (naming the extra) when its package is
    missing or cannot load (TensorRT's bindings installed without its libraries raise ImportError
    for libnvinfer.so.N on import)."""
    entry = runtime(name)
    hint = f": pip install 'infertune[{entry.extra}]'" if entry.extra else ""
    if importlib.util.find_spec(entry.requires) is None:
        raise BackendUnavailable(f"backend {name!r} needs the {entry.requires} package{hint}")
    try:
        module = importlib.import_module(entry.module)
    except (ImportError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendUnavailable(f"backend {name!r}: the {entry.requires} package is installed but cannot be "
                                 f"loaded ({first}){hint}, then run `infertune doctor`") from None
    return getattr(module, entry.cls)()


def check_settings(name: str, settings: Settings) -> None:
    """Refuse a setting or option the runtime would silently ignore."""
    entry = runtime(name)
    default = Settings()
    for key in sorted(_FLAGS):
        if key not in entry.settings and getattr(settings, key) != getattr(default, key):
            raise UsageError(f"{_FLAGS[key]} has no effect on {name} ({entry.display}); "
                             f"it applies to: {', '.join(n for n, r in _REGISTRY.items() if key in r.settings)}")
    for key in settings.options:
        family = option_family(key)
        if family not in entry.options:
            takes = ", ".join(_OPTION_FAMILIES[f] for f in sorted(entry.options)) or "no --option"
            raise UsageError(f"--option {key}: {name} ({entry.display}) does not use {_OPTION_FAMILIES[family]}; "
                             f"it takes {takes}")


def fit_settings(name: str, settings: Settings) -> Settings:
    """``settings`` without what runtime ``name`` does not honour (defaults in its place): for the
    library reusing one runtime's settings on another (tune's evaluator on a GPU runtime); what a
    user gives is checked instead (``check_settings``)."""
    entry = runtime(name)
    default = Settings()
    fields = {k: getattr(default, k) for k in _FLAGS if k not in entry.settings}
    options = {k: v for k, v in settings.options.items() if option_family(k) in entry.options}
    return replace(settings, **fields, options=options)


def option_family(key: str) -> str:
    """Which runtime family an ``--option`` key belongs to (see ``Runtime.options``)."""
    if key.startswith("session."):
        return "session"
    return "property" if key.isupper() else "gpu"


def compile(model: Model, settings: Settings | None = None, *, backend: str = "ort") -> Runner:  # noqa: A001
    """Compile ``model`` with ``settings`` on the named backend (settings it cannot honour are refused)."""
    settings = settings or Settings()
    check_settings(backend, settings)
    runtime_backend = get_backend(backend)
    if settings.static_shapes:
        static = model.with_input_shapes(settings.static_shapes)
        try:
            return runtime_backend.compile(static, settings)
        except ModelError as e:
            # a model whose control flow the runtime cannot infer with fixed inputs (silero VAD's LSTM
            # inside an If, on ONNX Runtime): it runs as it is, with its dynamic dims, here and when deployed
            warnings.warn(f"{model.name} does not compile on {backend} for static input shapes "
                          f"({str(e).splitlines()[0][:200]}); compiled with its dynamic dims", InfertuneWarning,
                          stacklevel=2)
    return runtime_backend.compile(model, settings)


def static_shapes(feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, tuple[int, ...]]:
    """The input shapes every feed shares ({} when they differ: the model then stays dynamic)."""
    shapes: dict[str, tuple[int, ...]] | None = None
    for f in feeds:
        these = {k: tuple(int(d) for d in np.shape(v)) for k, v in f.items()}
        if shapes is None:
            shapes = these
        elif these != shapes:
            return {}
    return shapes or {}
