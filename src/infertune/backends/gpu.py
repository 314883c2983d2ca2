"""GPU settings: what ONNX Runtime's CUDA / TensorRT execution providers and native TensorRT get.

Plain data and validation only, so every part of it is tested without a GPU: ``GpuOptions``
parsed from ``Settings.options``, the provider option strings ONNX Runtime documents
(``cuda_provider_options``, ``tensorrt_provider_options``, ``provider_chain``), and the build plan
for native TensorRT (``build_plan``: network creation flags, builder flags, memory pool, builder
optimisation level, hardware and version compatibility, timing cache, optimisation profile).

Precision comes from the ONNX file on native TensorRT: it builds every network strongly typed
(TensorRT 11 knows nothing else: ``BuilderFlag.FP16`` / ``INT8`` and weak typing are gone, and
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is deprecated and ignored there; TensorRT 10
needs the flag). A Q/DQ model runs INT8 where its Q/DQ say; FP16 means an FP16 graph
(``quant.fp16.to_fp16``, what tune builds for its fp16 precision); asking native TensorRT for the
``fp16`` option is refused with that fix. ONNX Runtime's TensorRT provider (built against
TensorRT 10) still takes ``trt_fp16_enable`` for a float model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import onnx

from infertune.backends import Settings
from infertune.errors import UsageError
from infertune.model import Model

HARDWARE_COMPATIBILITY = ("none", "ampere+", "same-cc")  # TensorRT HardwareCompatibilityLevel
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class GpuOptions:
    """GPU knobs, from ``Settings.options`` (lower-case keys; ``session.*`` keys belong to ORT).

    ``profile_shapes``: input name -> (min, opt, max) shapes for TensorRT's optimisation profile;
    inputs with symbolic dimensions need one. ``streams``: execution contexts, each on its own
    CUDA stream (native TensorRT), for concurrent requests.
    """

    device_id: int = 0
    fp16: bool = False
    engine_cache: str | None = None  # directory
    timing_cache: str | None = None  # file
    builder_optimization_level: int = 3
    cuda_graph: bool = False
    workspace_mib: int | None = None
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    streams: int = 1
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    profile_shapes: Mapping[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise UsageError(f"device_id must be >= 0, got {self.device_id}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise UsageError(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UsageError(f"workspace_mib must be >= 1, got {self.workspace_mib}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise UsageError(f"hardware_compatibility must be one of {', '.join(HARDWARE_COMPATIBILITY)}, "
                             f"got {self.hardware_compatibility!r}")
        if self.streams < 1:
            raise UsageError(f"streams must be >= 1, got {self.streams}")
        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCH:
            raise UsageError(f"cudnn_conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCH)}, "
                             f"got {self.cudnn_conv_algo_search!r}")
        for name, shapes in self.profile_shapes.items():
            if len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
                raise UsageError(f"profile shapes of {name!r}: give min, opt and max of one rank, got {shapes}")
            lo, opt, hi = shapes
            if not all(0 < a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                raise UsageError(f"profile shapes of {name!r}: need 0 < min <= opt <= max per dimension, "
                                 f"got {lo} / {opt} / {hi}")

    @classmethod
    def from_settings(cls, settings: Settings) -> GpuOptions:
        known = set(cls.__dataclass_fields__)
        picked: dict = {}
        for key, value in settings.options.items():
            if key.startswith("session.") or key.isupper():
                continue  # ONNX Runtime session entries / OpenVINO properties
            if key not in known:
                raise UsageError(f"unknown GPU option {key!r} (known: {', '.join(sorted(known))})")
            picked[key] = _coerce(key, value, cls.__dataclass_fields__[key].type)
        return cls(**picked)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profile_shapes"] = {k: [list(s) for s in v] for k, v in self.profile_shapes.items()}
        return d


def _coerce(key: str, value: object, annotation: str) -> object:
    if key == "profile_shapes":
        return parse_profile_shapes(value) if isinstance(value, str) else {
            k: tuple(tuple(int(d) for d in s) for s in v) for k, v in dict(value).items()}  # type: ignore[arg-type]
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"option {key} takes true or false, got {value!r}")
    if annotation.startswith("int"):
        try:
            return int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise UsageError(f"option {key} takes an integer, got {value!r}") from None
    return None if value is None else str(value)


def parse_profile_shapes(text: str) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``"x:1x3x224x224/8x3x224x224/32x3x224x224,y:..."`` -> {name: (min, opt, max)}."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(.+):([\dx]+)/([\dx]+)/([\dx]+)", item)
        if not m:
            raise UsageError(f"profile shape {item!r}: expected NAME:MINxDIMS/OPTxDIMS/MAXxDIMS")
        out[m.group(1)] = tuple(tuple(int(d) for d in s.split("x")) for s in m.groups()[1:])
    return out  # type: ignore[return-value]


def is_quantized(model: Model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def resolved_profile(model: Model, options: GpuOptions) -> dict[str, tuple[Shape, Shape, Shape]]:
    """A (min, opt, max) per input: static inputs pinned; symbolic ones must be in ``profile_shapes``."""
    unknown = set(options.profile_shapes) - {i.name for i in model.inputs}
    if unknown:
        raise UsageError(f"profile shapes name no input of {model.name}: {', '.join(sorted(unknown))} "
                         f"(inputs: {', '.join(i.name for i in model.inputs)})")
    out = {}
    for i in model.inputs:
        given = options.profile_shapes.get(i.name)
        fixed = [d if isinstance(d, int) and d > 0 else None for d in (i.shape or ())]
        if given is not None:
            if i.shape is not None and len(given[0]) != len(i.shape):
                raise UsageError(f"profile shapes of {i.name!r} have rank {len(given[0])}; the input has "
                                 f"rank {len(i.shape)} {i.shape_str()}")
            for d, (lo, _, hi) in enumerate(zip(*given, strict=True)):
                if i.shape is not None and fixed[d] is not None and not lo == hi == fixed[d]:
                    raise UsageError(f"profile shapes of {i.name!r}: dimension {d} is fixed at {fixed[d]} in "
                                     f"the model, the profile gives {lo}..{hi}")
            out[i.name] = given
        elif i.shape is None or None in fixed:
            raise UsageError(f"input {i.name!r} has dynamic dimensions {i.shape_str()}: TensorRT needs an "
                             f"optimisation profile; give profile_shapes, e.g. '{i.name}:{_example(i.shape, 1)}/"
                             f"{_example(i.shape, 8)}/{_example(i.shape, 32)}'")
        else:
            s = tuple(fixed)
            out[i.name] = (s, s, s)
    return out


def _example(shape: tuple | None, n: int) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else str(n) for d in (shape or (n,)))


# ---- ONNX Runtime execution providers -------------------------------------------------------------
def cuda_provider_options(o: GpuOptions) -> dict[str, str]:
    """CUDAExecutionProvider options, as ONNX Runtime documents them (strings)."""
    return {"device_id": str(o.device_id), "cudnn_conv_algo_search": o.cudnn_conv_algo_search,
            "do_copy_in_default_stream": "1", "enable_cuda_graph": "1" if o.cuda_graph else "0"}


def tensorrt_provider_options(model: Model, o: GpuOptions) -> dict[str, str]:
    """TensorrtExecutionProvider options (strings). A Q/DQ model needs trt_int8_enable, no table."""
    opts = {"device_id": str(o.device_id), "trt_fp16_enable": "1" if o.fp16 else "0",
            "trt_int8_enable": "1" if is_quantized(model) else "0",
            "trt_builder_optimization_level": str(o.builder_optimization_level),
            "trt_cuda_graph_enable": "1" if o.cuda_graph else "0"}
    if o.workspace_mib:
        opts["trt_max_workspace_size"] = str(o.workspace_mib * 2**20)
    if o.engine_cache:
        opts.update(trt_engine_cache_enable="1", trt_engine_cache_path=o.engine_cache)
        if o.hardware_compatibility == "ampere+":
            opts["trt_engine_hw_compatible"] = "1"
    if o.timing_cache:
        opts.update(trt_timing_cache_enable="1", trt_timing_cache_path=o.timing_cache)
    profile = {k: v for k, v in resolved_profile(model, o).items() if v[0] != v[2]}
    if profile:  # dynamic inputs only; static ones need no profile
        for key, idx in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
            opts[key] = ",".join(f"{name}:{'x'.join(map(str, s[idx]))}" for name, s in profile.items())
    return opts


def provider_chain(backend: str, model: Model, o: GpuOptions) -> list[tuple[str, dict[str, str]]]:
    """Providers in priority order; nodes a provider cannot take fall to the next one."""
    cuda = ("CUDAExecutionProvider", cuda_provider_options(o))
    cpu = ("CPUExecutionProvider", {})
    if backend == "ort-cuda":
        return [cuda, cpu]
    if backend == "ort-tensorrt":
        # CUDA graphs are captured by the TensorRT provider here; the CUDA one must not capture too
        return [("TensorrtExecutionProvider", tensorrt_provider_options(model, o)),
                (cuda[0], {**cuda[1], "enable_cuda_graph": "0"}), cpu]
    raise UsageError(f"no GPU provider chain for backend {backend!r}")


# ---- native TensorRT ------------------------------------------------------------------------------
SUPPORTED_TENSORRT = (10, 11)  # majors the native backend is written and conformance-tested for


@dataclass(frozen=True)
class BuildPlan:
    """What native TensorRT is asked to build, as enum member names (applied by ``backends.tensorrt``;
    member values differ between majors: ``VERSION_COMPATIBLE`` is 13 in 10.x and 12 in 11.x)."""

    tensorrt_major: int
    precision: str  # what the graph says: fp32 | fp16 | int8 (Q/DQ), for the record
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # BuilderFlag members
    workspace_bytes: int | None
    builder_optimization_level: int
    hardware_compatibility_level: str  # HardwareCompatibilityLevel member
    profiling_verbosity: str  # ProfilingVerbosity member
    timing_cache: str | None
    profile: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        return d


_HW_LEVEL = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


def graph_precision(model: Model) -> str:
    """int8 when the graph holds Q/DQ nodes, fp16 when any tensor is float16, else fp32."""
    if is_quantized(model):
        return "int8"
    fp16 = onnx.TensorProto.FLOAT16
    typed = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    if any(t.data_type == fp16 for t in model.graph.initializer) or any(
            v.type.tensor_type.elem_type == fp16 for v in typed):
        return "fp16"
    if any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in model.graph.node):
        return "fp16"
    return "fp32"


def build_plan(model: Model, o: GpuOptions, tensorrt_major: int) -> BuildPlan:
    """The build of ``model`` with ``o`` on TensorRT ``tensorrt_major`` (10 or 11), strongly typed."""
    if tensorrt_major not in SUPPORTED_TENSORRT:
        raise UsageError(f"native TensorRT {tensorrt_major}.x is not supported (supported: "
                         f"{', '.join(f'{m}.x' for m in SUPPORTED_TENSORRT)}): pip install 'infertune[tensorrt]'")
    if o.fp16:
        raise UsageError(f"native TensorRT builds {model.name} strongly typed, taking every type from the ONNX file, "
                         "so there is no fp16 switch: convert the model first (infertune fp16 MODEL -o "
                         "MODEL.fp16.onnx, or quant.fp16.to_fp16; tune does it for its fp16 precision) and drop "
                         "the fp16 option")
    return BuildPlan(tensorrt_major=tensorrt_major, precision=graph_precision(model),
                     # 11.x: strongly typed is the only mode (the flag is deprecated and ignored); 10.x: the flag
                     network_flags=("STRONGLY_TYPED",) if tensorrt_major == 10 else (),
                     builder_flags=("VERSION_COMPATIBLE",) if o.version_compatible else (),
                     workspace_bytes=o.workspace_mib * 2**20 if o.workspace_mib else None,
                     builder_optimization_level=o.builder_optimization_level,
                     hardware_compatibility_level=_HW_LEVEL[o.hardware_compatibility],
                     profiling_verbosity="DETAILED",  # layer information for the engine inspector
                     timing_cache=o.timing_cache, profile=resolved_profile(model, o))
