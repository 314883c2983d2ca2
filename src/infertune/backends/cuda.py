"""CUDA through cuda-python, and whether an NVIDIA GPU is usable here.

cuda-python moved its runtime bindings: ``cuda.bindings.runtime`` exists from cuda-python 12.6
and is the only layout in 13.x (where ``from cuda import cudart`` raises ImportError);
``cuda.cudart`` is the layout before 12.6. ``runtime_api()`` takes the first that imports.

"Listed" never means usable: onnxruntime-gpu lists its CUDA and TensorRT providers, and
TensorRT's bindings import, on a machine with no GPU and no driver. ``usable_gpus()`` asks the
driver instead: cuda-python's ``cudaGetDeviceCount`` (``cudaErrorInsufficientDriver`` without a
driver; cuda-python before 12.9 raises RuntimeError there), else libcuda's ``cuInit`` /
``cuDeviceGetCount`` through ctypes when cuda-python is not installed. cuda-python's
``cudaRuntimeGetVersion`` says nothing about this machine: its CUDA runtime is linked in
statically, so it returns the version cuda-python was built with.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from types import ModuleType

from infertune.errors import BackendUnavailable

RUNTIME_MODULES = ("cuda.bindings.runtime", "cuda.cudart")  # cuda-python >= 12.6 (and 13.x), then older


def runtime_api() -> ModuleType | None:
    """cuda-python's CUDA runtime API module, or None when cuda-python is not installed."""
    for name in RUNTIME_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def checked(result: object, api: ModuleType | None = None) -> object:
    """cuda-python returns ``(error, *values)``: raise on an error, else the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA call failed: {error_name(err, api)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def error_name(err: object, api: ModuleType | None) -> str:
    if api is not None:
        try:
            name = api.cudaGetErrorName(err)[1]
            return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - the name is a courtesy; the code is what matters
            pass
    return str(err)


@dataclass(frozen=True)
class GpuState:
    """How many CUDA devices the driver reports, the CUDA version it supports, and why none when none."""

    count: int
    driver_cuda: str | None
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.count > 0

    def to_dict(self) -> dict:
        return {"count": self.count, "driver_cuda": self.driver_cuda, "reason": self.reason}


def usable_gpus(api: ModuleType | None = None) -> GpuState:
    """Devices the driver reports, through ``api`` (cuda-python's runtime module; found when not
    given) or, without cuda-python, through libcuda."""
    api = api if api is not None else runtime_api()
    if api is None:
        return _driver_gpus()
    try:
        err, count = api.cudaGetDeviceCount()
    except RuntimeError as e:  # cuda-python < 12.9 without libcuda: 'Function "cuInit" not found'
        return GpuState(0, None, f"no NVIDIA driver ({str(e).splitlines()[0]})")
    if int(err) != 0:
        return GpuState(0, None, f"cudaGetDeviceCount failed: {error_name(err, api)}")
    err, version = api.cudaDriverGetVersion()
    driver = _cuda_version(version) if int(err) == 0 and version else None
    return GpuState(int(count), driver, "" if count else "the driver reports no CUDA device")


def _driver_gpus() -> GpuState:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return GpuState(0, None, "no NVIDIA driver (libcuda.so.1 cannot be loaded)")
    rc = lib.cuInit(0)
    if rc != 0:
        return GpuState(0, None, f"cuInit failed (CUresult {rc})")
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    driver = _cuda_version(version.value) if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return GpuState(0, driver, "cuDeviceGetCount failed")
    return GpuState(count.value, driver, "" if count.value else "the driver reports no CUDA device")


def _cuda_version(v: int) -> str:
    """12040 -> '12.4' (CUDA's 1000 * major + 10 * minor)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def require_gpu(api: ModuleType | None, what: str) -> GpuState:
    """``usable_gpus`` or BackendUnavailable naming ``what`` cannot run, why, and what to check."""
    state = usable_gpus(api)
    if not state.usable:
        raise BackendUnavailable(f"{what} needs an NVIDIA GPU, and none is usable here: {state.reason}; "
                                 "run `infertune doctor`, or use a CPU backend (--backend ort)")
    return state
