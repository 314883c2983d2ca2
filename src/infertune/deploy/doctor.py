"""doctor: will this run here, and run well? Versions, devices and ISA, checked against a table.

``probe()`` reads what is installed and present: Python and the packages that matter (onnxruntime,
onnxruntime-gpu, openvino, tensorrt and its per-CUDA packages, cuda-python, the pip-installed
CUDA runtime / cuDNN libraries: ``nvidia-cuda-runtime`` is CUDA 13's, ``-cu12`` CUDA 12's), ONNX
Runtime's execution providers, the CUDA driver (through libcuda, else nvidia-smi), each CUDA
runtime and cuDNN library that can be loaded, every GPU (name, compute capability, SM count,
memory), the CPU and its ISA flags. ``compat.check(probe)`` applies the rules to a probe (plain
data, so a probe recorded on another machine can be judged too: ``probe_from_file``) against
``compat.json``, the compatibility table kept as data, and returns findings with their fix. The
CLI exits 1 when an error is found.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from infertune.deploy.compat import SEVERITIES, Finding, check, compat_table, version_tuple
from infertune.errors import UsageError
from infertune.fingerprint import cpu

__all__ = ["SEVERITIES", "DoctorReport", "Finding", "check", "compat_table", "doctor", "normalize_probe", "probe",
           "probe_from_file", "version_tuple"]

SCHEMA_VERSION = 1
PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "openvino", "tensorrt",
            "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-bindings", "tensorrt-cu13-bindings",
            "tensorrt-cu12-libs", "tensorrt-cu13-libs", "cuda-python", "cuda-bindings",
            "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "infertune")
CUDART = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


@dataclass
class DoctorReport:
    probe: dict
    findings: list[Finding] = field(default_factory=list)
    source: str = "this machine"  # or the recorded probe file judged

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "doctor", "source": self.source, "ok": not self.errors,
                "probe": self.probe, "findings": [f.to_dict() for f in self.findings]}


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
    runtimes = [v for v in (_lib_version((name,), "cudaRuntimeGetVersion") for name in CUDART) if v]
    return {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "packages": packages, "ort_providers": providers,
            "cuda": {"driver_cuda": driver.get("cuda"), "driver_version": driver.get("version"),
                     "runtime": runtimes[0] if runtimes else None, "runtimes": runtimes,
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


def doctor(probe_file: str | Path | None = None) -> DoctorReport:
    """This machine judged against the table; with ``probe_file``, the machine recorded there."""
    if probe_file is not None:
        p = probe_from_file(probe_file)
        return DoctorReport(p, check(p), source=str(probe_file))
    p = probe()
    return DoctorReport(p, check(p))


# ---- recorded probes ------------------------------------------------------------------------------
SHORT_KEYS = {"cuda_runtime": "runtimes", "driver": "driver_version", "driver_cuda": "driver_cuda", "cudnn": "cudnn"}
PROBE_KEYS = {"python", "platform", "packages", "ort_providers", "cuda", "gpus", "cpu", *SHORT_KEYS}


def probe_from_file(path: str | Path) -> dict:
    """A recorded probe (see ``normalize_probe``); a file that is not one is a usage error (exit 2)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"probe file {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UsageError(f"probe file {path} is not JSON: {e}") from None
    return normalize_probe(doc, str(path))


def normalize_probe(doc: object, where: str = "probe") -> dict:
    """A probe in doctor's own format from ``doc``: ``doctor --json`` output, a bare ``probe()``, or the
    short form ``{"packages": {"onnxruntime-gpu": "1.31.1", ...}, "cuda_runtime": "13.0" (or a list),
    "driver": "580.65", "cudnn": "9.1", "gpus": [{"name": "NVIDIA L4", "compute_capability": "8.9"}]}``.
    Keys left out are unknown (their rules are skipped), not absent."""
    if isinstance(doc, dict) and doc.get("kind") == "doctor":
        doc = doc.get("probe")
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a JSON object like {{\"packages\": {{\"tensorrt\": \"11.4.0.106\"}}, "
                         f"\"gpus\": [...]}}, got {type(doc).__name__}")
    unknown = sorted(set(doc) - PROBE_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(PROBE_KEYS))})")
    out = {k: doc[k] for k in ("python", "platform", "ort_providers", "cpu") if k in doc}
    packages = _mapping(doc, "packages", where)
    out["packages"] = {str(k): _version(v, f"{where}: packages.{k}") for k, v in packages.items()}
    cuda = dict(_mapping(doc, "cuda", where))
    for short, key in SHORT_KEYS.items():
        if short in doc:
            cuda[key] = doc[short]
    if isinstance(cuda.get("runtimes"), str):
        cuda["runtimes"] = [cuda["runtimes"]]
    for key in ("driver_cuda", "driver_version", "runtime", "cudnn"):
        if key in cuda:
            cuda[key] = _version(cuda[key], f"{where}: cuda.{key}")
    if "runtimes" in cuda:
        if not isinstance(cuda["runtimes"], list):
            raise UsageError(f"{where}: cuda_runtime must be a version like '13.0' or a list of them")
        cuda["runtimes"] = [_version(v, f"{where}: cuda_runtime") for v in cuda["runtimes"]]
        cuda.setdefault("runtime", cuda["runtimes"][0] if cuda["runtimes"] else None)
    out["cuda"] = cuda
    out["gpus"] = [_gpu(g, f"{where}: gpus[{i}]") for i, g in enumerate(_list_of(doc, "gpus", where))]
    return out


def _mapping(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {key} must be an object, got {type(value).__name__}")
    return value


def _list_of(doc: dict, key: str, where: str) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise UsageError(f"{where}: {key} must be a list, got {type(value).__name__}")
    return value


def _version(value: object, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not version_tuple(value):
        raise UsageError(f"{what} must be a version string like '13.0', got {value!r}")
    return value


def _gpu(g: object, where: str) -> dict:
    if not isinstance(g, dict):
        raise UsageError(f"{where} must be an object like {{\"name\": \"NVIDIA L4\", \"compute_capability\": "
                         f"\"8.9\"}}, got {g!r}")
    cc = g.get("compute_capability")
    if not re.fullmatch(r"\d+\.\d+", str(cc)):
        raise UsageError(f"{where}.compute_capability must be like '8.9', got {cc!r}")
    return {**g, "name": str(g.get("name", "GPU")), "compute_capability": str(cc)}
