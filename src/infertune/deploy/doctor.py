"""doctor: will this run here, and run well? Versions, devices and ISA, checked against a table.

``probe()`` reads what is installed and present: Python and the packages that matter (onnxruntime,
onnxruntime-gpu, openvino, tensorrt, the pip-installed CUDA/cuDNN libraries), ONNX Runtime's
execution providers, the CUDA driver (through libcuda, else nvidia-smi), the CUDA runtime and
cuDNN libraries that can be loaded, every GPU (name, compute capability, SM count, memory), the CPU
and its ISA flags. ``check(probe)`` applies the rules to a probe (a plain dict, so recorded probes
from other machines can be checked too) against ``compat.json``, the compatibility table kept as
data, and returns findings with their fix. The CLI exits 1 when an error is found.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from infertune.fingerprint import cpu

SCHEMA_VERSION = 1
PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "openvino", "tensorrt",
            "tensorrt-cu12", "tensorrt-cu13", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13",
            "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "infertune")
SEVERITIES = ("error", "warning", "info")
CUDART = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


def compat_table() -> dict:
    return json.loads((Path(__file__).with_name("compat.json")).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    topic: str
    message: str
    fix: str = ""

    def to_dict(self) -> dict:
        return {"severity": self.severity, "topic": self.topic, "message": self.message, "fix": self.fix}


@dataclass
class DoctorReport:
    probe: dict
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "doctor", "ok": not self.errors, "probe": self.probe,
                "findings": [f.to_dict() for f in self.findings]}


# ---- probing --------------------------------------------------------------------------------------
def probe() -> dict:
    """What is installed and present on this machine (no GPU needed: absent parts are None)."""
    packages = {}
    for dist in PACKAGES:
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            packages[dist] = None
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash
        providers = [f"<onnxruntime failed to import: {e}>"]
    driver = _cuda_driver()
    return {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "packages": packages, "ort_providers": providers,
            "cuda": {"driver_cuda": driver.get("cuda"), "driver_version": driver.get("version"),
                     "runtime": _lib_version(CUDART, "cudaRuntimeGetVersion"),
                     "cudnn": _cudnn_version()},
            "gpus": driver.get("gpus", []), "cpu": cpu()}


def _load(names: tuple[str, ...]):
    for n in names:
        try:
            return ctypes.CDLL(n)
        except OSError:
            continue
    return None


def _lib_version(names: tuple[str, ...], fn: str) -> str | None:
    """CUDA-style version (1000 * major + 10 * minor) of the first library that loads."""
    lib = _load(names)
    if lib is None:
        return None
    v = ctypes.c_int(0)
    try:
        if getattr(lib, fn)(ctypes.byref(v)) != 0:
            return None
    except AttributeError:
        return None
    return f"{v.value // 1000}.{(v.value % 1000) // 10}"


def _cudnn_version() -> str | None:
    lib = _load(("libcudnn.so", "libcudnn.so.9", "libcudnn.so.8"))
    if lib is None:
        return None
    try:
        lib.cudnnGetVersion.restype = ctypes.c_size_t
        v = int(lib.cudnnGetVersion())
    except AttributeError:
        return None
    major = v // 10000 if v >= 10000 else v // 1000  # cuDNN 9: 90100; cuDNN 8: 8906
    minor = (v % 10000) // 100 if v >= 10000 else (v % 1000) // 100
    return f"{major}.{minor}"


def _cuda_driver() -> dict:
    """CUDA version the driver supports, its version string, and the GPUs (libcuda, then nvidia-smi)."""
    out: dict = {}
    lib = _load(("libcuda.so.1", "libcuda.so"))
    if lib is not None:
        v = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            out["cuda"] = f"{v.value // 1000}.{(v.value % 1000) // 10}"
            count = ctypes.c_int(0)
            lib.cuDeviceGetCount(ctypes.byref(count))
            gpus = []
            for i in range(count.value):
                dev = ctypes.c_int(0)
                lib.cuDeviceGet(ctypes.byref(dev), i)
                name = ctypes.create_string_buffer(256)
                lib.cuDeviceGetName(name, 256, dev)
                attrs = {}
                for key, code in (("major", 75), ("minor", 76), ("sm_count", 16)):
                    a = ctypes.c_int(0)
                    lib.cuDeviceGetAttribute(ctypes.byref(a), code, dev)
                    attrs[key] = a.value
                mem = ctypes.c_size_t(0)
                lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
                gpus.append({"name": name.value.decode(errors="replace"),
                             "compute_capability": f"{attrs['major']}.{attrs['minor']}",
                             "sm_count": attrs["sm_count"], "memory_mib": mem.value // 2**20})
            out["gpus"] = gpus
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total,driver_version",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
            rows = [[c.strip() for c in line.split(",")] for line in p.stdout.strip().splitlines() if line.strip()]
            if rows:
                out["version"] = rows[0][3]
                if not out.get("gpus"):
                    out["gpus"] = [{"name": r[0], "compute_capability": r[1], "sm_count": None,
                                    "memory_mib": int(float(r[2]))} for r in rows]
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return out


# ---- rules ----------------------------------------------------------------------------------------
def version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    parts = []
    for p in v.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _in_range(version: str, row: dict) -> bool:
    v = version_tuple(version)[:2]
    lo = version_tuple(row["from"])[:2]
    hi = version_tuple(row["to"])[:2] if row.get("to") else None
    return v >= lo and (hi is None or v <= hi)


def _major(v: str | None) -> int | None:
    t = version_tuple(v)
    return t[0] if t else None


def check(p: dict, table: dict | None = None) -> list[Finding]:
    """Findings for probe ``p`` (see ``probe``), most severe first."""
    t = table or compat_table()
    pk = p.get("packages", {})
    cuda = p.get("cuda", {})
    gpus = p.get("gpus", [])
    out: list[Finding] = []
    ort_cpu, ort_gpu = pk.get("onnxruntime"), pk.get("onnxruntime-gpu")
    if ort_cpu and ort_gpu:
        out.append(Finding("error", "onnxruntime", f"onnxruntime {ort_cpu} and onnxruntime-gpu {ort_gpu} are both "
                           "installed: they share the 'onnxruntime' module and the one installed last wins",
                           "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"))
    if not ort_cpu and not ort_gpu and not pk.get("onnxruntime-openvino"):
        out.append(Finding("error", "onnxruntime", "ONNX Runtime is not installed", "pip install onnxruntime"))
    runtime_major = _major(cuda.get("runtime")) or _pip_cuda_major(pk, "nvidia-cuda-runtime")
    cudnn_major = _major(cuda.get("cudnn")) or _pip_cuda_major(pk, "nvidia-cudnn")
    driver_major = _major(cuda.get("driver_cuda"))
    if ort_gpu:
        row = next((r for r in t["onnxruntime_gpu"] if _in_range(ort_gpu, r)), None)
        if not gpus:
            out.append(Finding("warning", "gpu", f"onnxruntime-gpu {ort_gpu} is installed but no NVIDIA GPU or driver "
                               "was found: sessions will fall back to the CPU",
                               "install the NVIDIA driver, or use plain onnxruntime on this machine"))
        if row is not None:
            need = row["cuda_major"]
            if runtime_major is not None and runtime_major not in need:
                out.append(Finding("error", "cuda", f"onnxruntime-gpu {ort_gpu} needs CUDA {_list(need)}.x "
                                   f"({row['note']}); CUDA runtime {runtime_major}.x is installed",
                                   f"install the CUDA {need[-1]} runtime "
                                   f"(pip install nvidia-cuda-runtime-cu{need[-1]}) "
                                   f"or an onnxruntime-gpu built for CUDA {runtime_major}"))
            if runtime_major is None and gpus:
                out.append(Finding("error", "cuda", f"onnxruntime-gpu {ort_gpu} needs the CUDA {_list(need)}.x "
                                   "runtime, which cannot be loaded",
                                   f"pip install nvidia-cuda-runtime-cu{need[-1]} or install CUDA {need[-1]} and put "
                                   "its lib64 on LD_LIBRARY_PATH"))
            cudnn_need = row["cudnn_major"]
            if cudnn_major is not None and cudnn_major not in cudnn_need:
                out.append(Finding("error", "cudnn", f"onnxruntime-gpu {ort_gpu} needs cuDNN {_list(cudnn_need)}.x; "
                                   f"cuDNN {cudnn_major}.x is installed (8.x and 9.x are not interchangeable)",
                                   f"pip install nvidia-cudnn-cu{need[-1]}=={cudnn_need[-1]}.*"))
            if cudnn_major is None and gpus:
                out.append(Finding("error", "cudnn", f"onnxruntime-gpu {ort_gpu} needs cuDNN {_list(cudnn_need)}.x, "
                                   "which cannot be loaded", f"pip install nvidia-cudnn-cu{need[-1]}"))
        else:
            out.append(Finding("warning", "onnxruntime", f"onnxruntime-gpu {ort_gpu} is not in infertune's "
                               "compatibility table; its CUDA/cuDNN needs are not checked", "see compat.json sources"))
    want_cuda = runtime_major or (_compat_cuda(t, ort_gpu) if ort_gpu else None)
    if driver_major is not None and want_cuda is not None and driver_major < want_cuda:
        floor = t["min_driver_linux"].get(str(want_cuda), "?")
        out.append(Finding("error", "driver", f"the driver supports CUDA up to {cuda.get('driver_cuda')} "
                           f"(driver {cuda.get('driver_version') or '?'}), CUDA {want_cuda}.x is needed",
                           f"update the NVIDIA driver to >= {floor}"))
    elif cuda.get("driver_version") and want_cuda is not None:
        floor = t["min_driver_linux"].get(str(want_cuda))
        if floor and version_tuple(cuda["driver_version"]) < version_tuple(floor):
            out.append(Finding("error", "driver", f"driver {cuda['driver_version']} is older than {floor}, the "
                               f"minimum for CUDA {want_cuda}.x", f"update the NVIDIA driver to >= {floor}"))
    trt = pk.get("tensorrt") or pk.get("tensorrt-cu12") or pk.get("tensorrt-cu13")
    if trt:
        row = next((r for r in t["tensorrt"] if r["major"] == _major(trt)), None)
        if row and want_cuda is not None and want_cuda not in row["cuda_major"]:
            out.append(Finding("error", "tensorrt", f"TensorRT {trt} supports CUDA {_list(row['cuda_major'])}; "
                               f"CUDA {want_cuda} is in use", f"install the TensorRT build for CUDA {want_cuda}"))
        ort_row = next((r for r in t["onnxruntime_tensorrt"] if ort_gpu and _in_range(ort_gpu, r)), None)
        if ort_row and _major(trt) not in ort_row["tensorrt_major"]:
            out.append(Finding("error", "tensorrt", f"onnxruntime-gpu {ort_gpu}'s TensorRT execution provider needs "
                               f"TensorRT {_list(ort_row['tensorrt_major'])}.x; {trt} is installed",
                               f"pip install 'tensorrt=={ort_row['tensorrt_major'][0]}.*'"))
    for g in gpus:
        cc = version_tuple(str(g.get("compute_capability")))
        if cc and cc < (7, 5):
            out.append(Finding("warning", "gpu", f"{g['name']} (compute capability {g['compute_capability']}) has no "
                               "INT8 tensor cores of the Turing+ kind: FP16 is the precision to try",
                               "prefer --target tensorrt with FP16, or keep FP32"))
    out += _cpu_findings(p.get("cpu", {}))
    if not pk.get("openvino"):
        out.append(Finding("info", "openvino", "OpenVINO is not installed: only ONNX Runtime is compared on the CPU",
                           "pip install 'infertune[openvino]'"))
    if not gpus:
        out.append(Finding("info", "gpu", "no NVIDIA GPU found: CPU backends only", ""))
    return sorted(out, key=lambda f: SEVERITIES.index(f.severity))


def _cpu_findings(c: dict) -> list[Finding]:
    isa = set(c.get("isa", []))
    arch = c.get("arch", "")
    if arch not in ("x86_64", "AMD64", "i686"):
        return [Finding("info", "cpu", f"{arch} CPU: ONNX Runtime's int8 kernels use its dot-product instructions "
                        "where present; measure INT8 against FP32 before choosing", "")]
    if "avx2" not in isa:
        return [Finding("warning", "cpu", f"{c.get('model', 'this CPU')} has no AVX2: ONNX Runtime's int8 kernels "
                        "fall back to SSE and INT8 rarely beats FP32", "keep FP32 on this machine")]
    out = []
    if "amx_int8" in isa:
        out.append(Finding("info", "cpu", "AMX-INT8 present: int8 matrix tiles; INT8 can be several times FP32", ""))
    if "avx512_vnni" in isa or "avx_vnni" in isa:
        out.append(Finding("info", "cpu", "VNNI present: int8 dot products in one instruction; INT8 GEMM ~2-4x FP32",
                           ""))
    else:
        out.append(Finding("info", "cpu", f"{c.get('model', 'this CPU')}: AVX2 without VNNI: int8 GEMM reaches "
                           "~1.5-2x FP32 at best, weights are quantized to 7 bits (reduce_range) so that 16-bit "
                           "intermediate sums cannot saturate, and Q/DQ overhead can eat the gain on small layers",
                           "measure with 'infertune profile --roofline' and let 'infertune tune' decide"))
    if "avx512f" not in isa:
        out.append(Finding("info", "cpu", "no AVX-512: FP32 and INT8 kernels use 256-bit vectors", ""))
    return out


def _pip_cuda_major(pk: dict, prefix: str) -> int | None:
    for dist, v in pk.items():
        if v and dist.startswith(prefix):
            return _major(v)
    return None


def _compat_cuda(t: dict, ort_gpu: str) -> int | None:
    row = next((r for r in t["onnxruntime_gpu"] if _in_range(ort_gpu, r)), None)
    return row["cuda_major"][-1] if row else None


def _list(v: list) -> str:
    return " or ".join(str(x) for x in v)


def doctor() -> DoctorReport:
    p = probe()
    return DoctorReport(p, check(p))
