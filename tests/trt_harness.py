"""Child process of tests/test_gpu_conformance.py: infertune's native TensorRT backend run against the
REAL TensorRT and cuda-python bindings of one version each, with every object they create replaced
by an autospec of its real class.

    python tests/trt_harness.py '{"trt": {...tensorrt_bindings()...}, "cuda": {...cuda_python()...}}'

``import tensorrt`` inside ``infertune.backends.tensorrt`` gets a recording proxy of the real
module (``Spec``): every attribute read is recorded ("BuilderFlag.VERSION_COMPATIBLE"), one the
real module lacks raises AttributeError and is recorded as missing; an enum member is the real
one; calling a class gives an ``Instance``: ``create_autospec(cls, instance=True, spec_set=True)``
behind a proxy that records every attribute read and write (a write to a name the class lacks
raises, as spec_set does), checks each call's arguments against the signatures pybind11 writes
into the method's docstring (overloads included), and returns an autospec of the return type the
docstring names (``World.results`` overrides a few, with the values a GPU would give). The cuda-python
runtime module is proxied the same way; its functions' real signatures are bound, and they return
what a GPU machine would.

Scenarios: the build plan for every option combination on fp32, fp16 (quant.fp16) and int8
(Q/DQ) graphs, static and dynamic; the runner (streams, CUDA graphs, timing, layer times, layer
information, new shapes, freeing); the error paths (no GPU, parse error, failed build, the fp16
switch). A static pass over the backend's source lists every ``trt.X.Y`` / ``cudart.X`` it names,
so a name on a path no scenario reaches is reported as uncovered. Prints one JSON line.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import gc
import inspect
import itertools
import json
import re
import sys
import tempfile
import traceback
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
SIGNATURE = re.compile(r"^(?:\d+\. )?(\w+)\((.*)\) -> (.+)$", re.M)
TRT_CLASS = re.compile(r"tensorrt_bindings\.tensorrt\.(\w+)$")
RETURN_ALIASES = {"nvonnxparser::IParserError": "ParserError"}


def split_params(text: str) -> list[str]:
    """'a: X[int, str], b: Y = <E.A: 0>' -> ['a: X[int, str]', 'b: Y = <E.A: 0>'] (brackets respected)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{<"
        depth -= ch in ")]}>"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in [*out, cur.strip()] if p]


def doc_signatures(fn: object, name: str) -> list[tuple[inspect.Signature, str]]:
    """(signature, return annotation) of each overload pybind11 wrote into ``fn``'s docstring."""
    return _signatures(getattr(fn, "__doc__", None) or "", name)


@functools.cache
def _signatures(doc: str, name: str) -> list[tuple[inspect.Signature, str]]:
    out = []
    for m in SIGNATURE.finditer(doc):
        if m.group(1) != name or "*args" in m.group(2):
            continue
        params = []
        for p in split_params(m.group(2)):
            pname = p.split(":")[0].split("=")[0].strip()
            default = None if "=" in p else inspect.Parameter.empty
            params.append(inspect.Parameter(pname, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
        out.append((inspect.Signature(params), m.group(3).strip()))
    return out


class World:
    """What the proxies record, and what calls return (a GPU machine's answers)."""

    def __init__(self, trt, cudart) -> None:
        self.trt, self.cudart = trt, cudart
        self.touched: set[str] = set()
        self.missing: list[str] = []
        self.bad_calls: list[str] = []
        self.calls: list[tuple[str, tuple, dict]] = []
        self.handles = itertools.count(0x1000, 0x100)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.parse_ok, self.build_ok = True, True
        self.cuda_overrides: dict[str, tuple] = {}
        self.specs: dict[type, object] = {}
        self.properties = {"ICudaEngine.num_io_tensors": 2, "OnnxParser.num_errors": 1}
        self.results = {
            "OnnxParser.parse": lambda *a, **k: self.parse_ok,
            "Builder.build_serialized_network": lambda *a: b"serialized engine" if self.build_ok else None,
            "ITimingCache.serialize": lambda: b"timing cache",
            "ICudaEngine.get_tensor_name": lambda i: ["x", "y"][i],
            "ICudaEngine.get_tensor_mode": lambda n: trt.TensorIOMode.INPUT if n == "x" else trt.TensorIOMode.OUTPUT,
            "ICudaEngine.get_tensor_dtype": lambda n: trt.DataType.FLOAT,
            "IExecutionContext.get_tensor_shape": lambda n: self.shapes[n],
            "EngineInspector.get_engine_information": lambda fmt: json.dumps({"Layers": ["conv"]}),
            "ParserError.node_name": lambda: "conv", "ParserError.node_operator": lambda: "Conv",
            "ParserError.desc": lambda: "unsupported (simulated)",
        }

    def touch(self, path: str) -> None:
        self.touched.add(path)

    def lacks(self, path: str) -> AttributeError:
        self.missing.append(path)
        return AttributeError(f"{path} does not exist in this version")

    def wrap(self, path: str, value: object) -> object:
        if isinstance(value, type) and hasattr(value, "__members__"):
            return Namespace(value, path, self)
        if isinstance(value, type):
            return ClassProxy(value, path, self)
        return value

    def instance(self, cls: type) -> Instance:
        """A proxy of a spec_set autospec of ``cls``: one autospec per class, shared (creating and
        first touching one costs milliseconds; the records that matter are the proxy's)."""
        if cls not in self.specs:
            self.specs[cls] = mock.create_autospec(cls, instance=True, spec_set=True)
        return Instance(cls, self.specs[cls], self)

    def result(self, path: str, annotation: str, args: tuple, kwargs: dict) -> object:
        if path in self.results:
            return self.results[path](*args, **kwargs)
        annotation = RETURN_ALIASES.get(annotation, annotation)
        name = TRT_CLASS.match(annotation)
        name = name.group(1) if name else annotation
        if name == "IHostMemory":
            return b"host memory"  # a buffer: bytes() of it is what the code does
        if hasattr(self.trt, name) and isinstance(getattr(self.trt, name), type):
            cls = getattr(self.trt, name)
            return next(iter(cls.__members__.values())) if hasattr(cls, "__members__") else self.instance(cls)
        return {"bool": True, "int": 0, "str": "", "float": 0.0, "None": None}.get(annotation, mock.MagicMock())

    def cuda_result(self, name: str) -> tuple:
        ok = self.cudart.cudaError_t.cudaSuccess
        if name in self.cuda_overrides:
            return self.cuda_overrides[name]
        if name == "cudaGetDeviceProperties":
            cls = self.cudart.cudaDeviceProp
            if cls not in self.specs:
                props = mock.create_autospec(cls, instance=True, spec_set=True)
                props.name, props.major, props.minor = b"NVIDIA L4", 8, 9
                props.multiProcessorCount, props.totalGlobalMem = 58, 23034 * 2**20
                self.specs[cls] = props
            return ok, Instance(cls, self.specs[cls], self, prefix="cudart.cudaDeviceProp")
        if name == "cudaRuntimeGetVersion":
            return self.cudart.cudaRuntimeGetVersion()  # cuda-python's own (static) runtime: no driver needed
        values = {"cudaGetDeviceCount": 1, "cudaDriverGetVersion": 13000, "cudaEventElapsedTime": 0.25,
                  "cudaGetErrorName": b"cudaErrorUnknown"}
        if name in values:
            return ok, values[name]
        if name in ("cudaMalloc", "cudaStreamCreate", "cudaEventCreate", "cudaStreamEndCapture",
                    "cudaGraphInstantiate"):
            return ok, next(self.handles)
        return (ok,)


class Namespace:
    """An enum (or nested class) of the real bindings: member reads recorded, members real."""

    def __init__(self, real: type, path: str, world: World) -> None:
        self._real, self._path, self._world = real, path, world

    def __getattr__(self, name: str) -> object:
        path = f"{self._path}.{name}"
        self._world.touch(path)
        if not hasattr(self._real, name):
            raise self._world.lacks(path)
        return getattr(self._real, name)


class ClassProxy:
    """A class of the real bindings: calling it checks the constructor's signature and gives an
    ``Instance``; subclassing it subclasses the real class; attribute reads are recorded."""

    def __init__(self, cls: type, path: str, world: World) -> None:
        object.__setattr__(self, "_state", (cls, path, world))

    def __getattribute__(self, name: str) -> object:
        cls, path, world = object.__getattribute__(self, "_state")
        if name in ("__mro_entries__", "_state"):
            return object.__getattribute__(self, name)
        world.touch(f"{path}.{name}")
        if not hasattr(cls, name):
            raise world.lacks(f"{path}.{name}")
        return world.wrap(f"{path}.{name}", getattr(cls, name))

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object.__getattribute__(self, "_state")[0],)

    def __call__(self, *args, **kwargs) -> Instance:
        cls, path, world = object.__getattribute__(self, "_state")
        check_call(world, path, doc_signatures(cls.__init__, "__init__"), (None, *args), kwargs)
        return world.instance(cls)


class Instance:
    """An object the bindings would have created: a spec_set autospec of its real class, recorded."""

    def __init__(self, cls: type, spec: object, world: World, prefix: str | None = None) -> None:
        object.__setattr__(self, "_state", (cls, spec, world, prefix or cls.__name__))

    def __getattr__(self, name: str) -> object:
        cls, spec, world, prefix = object.__getattribute__(self, "_state")
        path = f"{prefix}.{name}"
        world.touch(path)
        try:
            value = getattr(spec, name)
        except AttributeError:
            raise world.lacks(path) from None
        static = inspect.getattr_static(cls, name, None)
        if isinstance(static, property) or not callable(value) or static is None:
            return world.properties.get(path, value)
        return Method(path, cls, name, value, world)

    def __setattr__(self, name: str, value: object) -> None:
        cls, spec, world, prefix = object.__getattribute__(self, "_state")
        path = f"{prefix}.{name}"
        world.touch(path)
        if not isinstance(inspect.getattr_static(cls, name, None), property):
            world.bad_calls.append(f"{path} = ...: not a property of {cls.__name__}")
        try:
            setattr(spec, name, value)
        except AttributeError:
            raise world.lacks(path) from None


class Method:
    def __init__(self, path: str, cls: type, name: str, spec: object, world: World) -> None:
        self.path, self.cls, self.name, self.spec, self.world = path, cls, name, spec, world

    def __call__(self, *args, **kwargs) -> object:
        sigs = doc_signatures(getattr(self.cls, self.name), self.name)
        annotation = check_call(self.world, self.path, sigs, (None, *args), kwargs)
        self.world.calls.append((self.path, args, kwargs))
        self.spec(*args, **kwargs)
        return self.world.result(self.path, annotation, args, kwargs)


def check_call(world: World, path: str, sigs: list, args: tuple, kwargs: dict) -> str:
    """The return annotation of the first overload the arguments bind to; a bad call is recorded."""
    if not sigs:
        return ""
    for sig, annotation in sigs:
        try:
            sig.bind(*args, **kwargs)
            return annotation
        except TypeError:
            continue
    world.bad_calls.append(f"{path}: {len(args) - 1} positional {sorted(kwargs)} keyword argument(s) fit none of "
                           + " | ".join(str(s) for s, _ in sigs))
    return sigs[0][1]


class Spec:
    """A module of the real bindings (``prefix`` 'trt' or 'cudart'), recorded."""

    def __init__(self, real: object, prefix: str, world: World) -> None:
        self._real, self._prefix, self._world = real, prefix, world

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name != "__version__":
            return getattr(self._real, name)
        path = f"{self._prefix}.{name}"
        self._world.touch(path)
        if not hasattr(self._real, name):
            raise self._world.lacks(path)
        value = getattr(self._real, name)
        if self._prefix == "cudart" and callable(value) and not isinstance(value, type):
            return CudaCall(path, value, self._world)
        return self._world.wrap(path, value)


class CudaCall:
    def __init__(self, path: str, real: object, world: World) -> None:
        self.path, self.real, self.world = path, real, world

    def __call__(self, *args, **kwargs) -> tuple:
        try:
            inspect.signature(self.real).bind(*args, **kwargs)
        except TypeError as e:
            self.world.bad_calls.append(f"{self.path}: {e} {inspect.signature(self.real)}")
        except ValueError:
            pass  # no signature to check
        self.world.calls.append((self.path, args, kwargs))
        return self.world.cuda_result(self.path.split(".", 1)[1])


# ---- scenarios ------------------------------------------------------------------------------------
def models():
    """(label, model, profile option) for fp32 / fp16 / int8 graphs, dynamic and static."""
    import numpy as np

    from infertune.data import Dataset
    from infertune.model import Model
    from infertune.quant.fp16 import to_fp16
    from infertune.quant.quantize import quantize
    from models import MODELS

    out = []
    rng = np.random.default_rng(0)
    for label, name, profile, shape in (("dynamic", "small_cnn", "x:1x3x12x12/4x3x12x12/16x3x12x12", (8, 3, 12, 12)),
                                        ("static", "grouped_conv", None, (1, 4, 10, 10))):
        m = Model.from_proto(MODELS[name]())
        data = Dataset.from_arrays({m.inputs[0].name: rng.standard_normal(shape).astype(np.float32)})
        variants = {"fp32": m, "fp16": to_fp16(m).model,
                    "int8": quantize(m, data, target="tensorrt", stability_halves=0).model}
        out += [(f"{label}-{p}", v, profile) for p, v in variants.items()]
    return out


def plan_scenarios(backend, world: World, tmp: Path) -> dict:
    """``build_engine`` for every combination; the fp16 switch must be refused (UsageError: the
    precision comes from the graph), everything else must build."""
    from infertune.backends.gpu import GpuOptions, parse_profile_shapes
    from infertune.errors import UsageError

    existing = tmp / "existing.cache"
    existing.write_bytes(b"timing cache")
    counts = {"builds": 0, "refused": 0, "errors": []}
    flags: dict[str, set] = {}
    for (label, model, profile), fp16, vc, hw, timing, level, workspace, engines in itertools.product(
            models(), (False, True), (False, True), ("none", "ampere+", "same-cc"), (None, "fresh", "existing"),
            (0, 3, 5), (None, 256), (None, "dir")):
        timing_path = {None: None, "fresh": tmp / f"t{counts['builds']}.cache", "existing": existing}[timing]
        options = GpuOptions(fp16=fp16, version_compatible=vc, hardware_compatibility=hw,
                             builder_optimization_level=level, workspace_mib=workspace,
                             timing_cache=str(timing_path) if timing_path else None,
                             engine_cache=str(tmp / "engines") if engines else None,
                             profile_shapes=parse_profile_shapes(profile) if profile else {})
        first = len(world.calls)
        try:
            _, record = backend.build_engine(model, options)
        except UsageError:
            if fp16:
                counts["refused"] += 1
            else:
                counts["errors"].append(f"{label} {options}: {traceback.format_exc(limit=3)}")
            continue
        except Exception:  # noqa: BLE001 - reported, the parent test fails on it
            counts["errors"].append(f"{label} {options}: {traceback.format_exc(limit=3)}")
            continue
        if fp16:
            counts["errors"].append(f"{label}: the fp16 switch was not refused (TensorRT 11 has no BuilderFlag.FP16)")
        counts["builds"] += 1
        for path, args, _ in world.calls[first:]:
            if path == "Builder.create_network":
                flags.setdefault(label.split("-")[1], set()).add(args[0] if args else 0)
        counts["record"] = record
    counts["create_network_flags"] = {k: sorted(v) for k, v in flags.items()}
    return counts


def runner_scenarios(backend, world: World, tmp: Path) -> list[str]:
    import numpy as np

    from infertune.backends import Settings
    from infertune.errors import BackendUnavailable, ModelError, UsageError
    from infertune.model import Model
    from models import MODELS

    errors = []
    model = Model.from_proto(MODELS["small_cnn"]())
    x = np.zeros((2, 3, 12, 12), np.float32)

    def expect(what, error, fn):
        try:
            fn()
        except error:
            return
        except Exception:  # noqa: BLE001
            errors.append(f"{what}: {traceback.format_exc(limit=4)}")
            return
        errors.append(f"{what}: no {error.__name__} raised")

    for graph in ("0", "1"):
        try:
            world.shapes = {"x": x.shape, "y": (2, 10)}
            options = {"profile_shapes": "x:1x3x12x12/4x3x12x12/16x3x12x12", "streams": "2", "cuda_graph": graph,
                       "engine_cache": str(tmp / "runner-engines"), "timing_cache": str(tmp / "runner.cache")}
            r = backend.TensorRTBackend().compile(model, Settings(options=options))
            assert set(r.run({"x": x})) == {"y"} and r.run({"x": x}, slot=1)["y"].shape == (2, 10)
            t = r.timed_run({"x": x})
            assert (t.h2d_ms, t.compute_ms, t.d2h_ms) == (0.25, 0.25, 0.25)
            assert isinstance(r.layer_times({"x": x}, runs=2), dict)
            assert r.layer_information() == {"Layers": ["conv"]}
            world.shapes = {"x": (4, 3, 12, 12), "y": (4, 10)}
            assert r.run({"x": np.zeros((4, 3, 12, 12), np.float32)})["y"].shape == (4, 10)  # new shape: rebound
            assert backend.TensorRTBackend().unavailable() is None and backend.TensorRTBackend().versions()
            del r
            gc.collect()
        except Exception:  # noqa: BLE001
            errors.append(f"runner (cuda_graph={graph}): {traceback.format_exc(limit=6)}")
    settings = Settings(options={"profile_shapes": "x:1x3x12x12/4x3x12x12/16x3x12x12"})
    world.parse_ok = False
    expect("parse error", ModelError, lambda: backend.build_engine(model, _options(settings)))
    world.parse_ok, world.build_ok = True, False
    expect("failed build", ModelError, lambda: backend.build_engine(model, _options(settings)))
    world.build_ok = True
    expect("fp16 switch", UsageError, lambda: backend.build_engine(model, _options(settings, fp16="1")))
    world.cuda_overrides["cudaGetDeviceCount"] = (world.cudart.cudaError_t.cudaErrorInsufficientDriver, None)
    expect("no GPU", BackendUnavailable, lambda: backend.TensorRTBackend().compile(model, settings))
    world.cuda_overrides.clear()
    return errors


def _options(settings, **extra):
    from infertune.backends import Settings
    from infertune.backends.gpu import GpuOptions

    return GpuOptions.from_settings(Settings(options={**settings.options, **extra}))


def static_names(path: Path, roots: dict[str, str]) -> set[str]:
    """Every attribute chain in ``path``'s source rooted at a name of ``roots`` (renamed to its value):
    'trt.BuilderFlag', 'trt.Logger.WARNING', 'cudart.cudaMemcpyKind.cudaMemcpyHostToDevice'."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in roots and chain:
            names.add(".".join([roots[cur.id], *reversed(chain)]))
    return names


def resolves(roots: dict, dotted: str) -> bool:
    root, *parts = dotted.split(".")
    obj = roots[root]
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def main() -> None:
    config = json.loads(sys.argv[1])
    for lib in config["trt"]["stubs"]:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)  # NEEDED libnvinfer.so.N is satisfied by soname
    sys.path[0:0] = [config["trt"]["shim"], config["trt"]["site"], config["cuda"]["site"], str(ROOT / "src"),
                     str(ROOT / "tests")]
    import tensorrt as real_trt
    from cuda.bindings import runtime as real_cudart

    world = World(real_trt, real_cudart)
    sys.modules["tensorrt"] = Spec(real_trt, "trt", world)
    import infertune.backends.tensorrt as backend

    chosen_runtime = backend.cudart.__name__  # the cuda-python layout the backend picked
    backend.cudart = Spec(real_cudart, "cudart", world)
    with tempfile.TemporaryDirectory() as tmp:
        plans = plan_scenarios(backend, world, Path(tmp))
        runner_errors = runner_scenarios(backend, world, Path(tmp))
    wanted = static_names(Path(backend.__file__), {"trt": "trt", "cudart": "cudart"})
    if hasattr(backend, "cuda"):  # where the CUDA helpers live (an older infertune has none)
        wanted |= static_names(Path(backend.cuda.__file__), {"api": "cudart"})
    reals = {"trt": real_trt, "cudart": real_cudart}
    print(json.dumps({
        "tensorrt": real_trt.__version__, "tensorrt_module": real_trt.__file__,
        "cuda_python_runtime_version": real_cudart.cudaRuntimeGetVersion()[1],
        "cuda_runtime_module": chosen_runtime,
        "touched": sorted(world.touched), "missing": sorted(set(world.missing)),
        "bad_calls": sorted(set(world.bad_calls)),
        "static_names": sorted(wanted), "uncovered": sorted(wanted - world.touched),
        "unresolved": sorted(n for n in wanted if not resolves(reals, n)),
        "plan_errors": plans["errors"], "builds": plans["builds"], "refused": plans["refused"],
        "record": plans.get("record"),
        "create_network_flags": plans["create_network_flags"], "runner_errors": runner_errors,
        "strongly_typed_bit": 1 << int(real_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),
    }))


if __name__ == "__main__":
    main()
