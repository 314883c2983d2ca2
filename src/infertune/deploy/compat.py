"""The compatibility rules doctor applies, to a probe of this machine or a recorded one.

A probe is plain data (``doctor.probe()`` makes one here; ``probe_from_file`` reads a recorded
one, in doctor's own ``--json`` format or a short one, see ``normalize_probe``). A key that is
absent means unknown and its rules are skipped; None means probed and not found. The table
(``compat.json``) is data: every row names its sources, and ``tests/test_gpu_conformance.py``
checks the rows it can against the real wheels.

Rules, in order: ONNX Runtime packages; what onnxruntime-gpu needs (CUDA and cuDNN majors);
the driver (a CUDA major needs a driver branch: minor versions within a major are compatible);
TensorRT (its row, its CUDA build from the package suffix, what ONNX Runtime's TensorRT provider
loads); each GPU's compute capability against TensorRT and the CUDA majors in use; the CPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SEVERITIES = ("error", "warning", "info")
TENSORRT_DISTS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-bindings", "tensorrt-cu13-bindings",
                  "tensorrt-cu12-libs", "tensorrt-cu13-libs")
CUDA_RUNTIME_DISTS = {"nvidia-cuda-runtime": 13, "nvidia-cuda-runtime-cu12": 12, "nvidia-cuda-runtime-cu11": 11}
CUDNN_DISTS = ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "nvidia-cudnn-cu11")


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


def version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    parts = []
    for p in str(v).split("."):
        digits = re.match(r"\d+", p)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def at_least(version: str, floor: str) -> bool:
    """``version >= floor`` on the components both give ('580.65' meets '580.65.06')."""
    v, f = version_tuple(version), version_tuple(floor)
    n = min(len(v), len(f))
    return v[:n] >= f[:n]


def in_range(version: str, row: dict) -> bool:
    """``row['from'] <= version <= row['to']``, each bound compared on as many components as it gives."""
    lo = version_tuple(row["from"])
    hi = version_tuple(row["to"]) if row.get("to") else None
    v = version_tuple(version) + (0,) * len(lo)  # '11' is 11.0
    return v[:len(lo)] >= lo and (hi is None or v[:len(hi)] <= hi)


def major(v: str | None) -> int | None:
    t = version_tuple(v)
    return t[0] if t else None


def row_for(rows: list[dict], version: str | None) -> dict | None:
    return next((r for r in rows if version and in_range(version, r)), None)


@dataclass
class Facts:
    """What the rules read, derived once from a probe (None: unknown)."""

    packages: dict
    ort_gpu: str | None
    ort_row: dict | None
    trt: str | None
    trt_cuda: int | None  # the CUDA major of TensorRT's build, from its package suffix
    trt_row: dict | None
    runtimes: set[int] | None  # CUDA runtime majors that can be loaded
    cudnn: set[int] | None
    driver_version: str | None
    driver_cuda: int | None  # the newest CUDA major the driver runs
    gpus: list[dict]

    @classmethod
    def of(cls, p: dict, t: dict) -> Facts:
        pk = p.get("packages", {})
        cuda = p.get("cuda", {})
        ort_gpu = pk.get("onnxruntime-gpu")
        present = [d for d in TENSORRT_DISTS if pk.get(d)]
        trt = pk[present[0]] if present else None
        suffixes = [int(m.group(1)) for d in present if (m := re.search(r"-cu(\d+)", d))]
        return cls(pk, ort_gpu, row_for(t["onnxruntime_gpu"], ort_gpu), trt, suffixes[0] if suffixes else None,
                   row_for(t["tensorrt"], trt), _runtimes(cuda, pk), _cudnn(cuda, pk), cuda.get("driver_version"),
                   driver_cuda_major(cuda, t), p.get("gpus") or [])

    def cuda_in_use(self) -> dict[int, list[str]]:
        """CUDA major -> who needs it (onnxruntime-gpu, TensorRT's build, else the runtimes found)."""
        used: dict[int, list[str]] = {}
        if self.ort_row is not None and len(self.ort_row["cuda_major"]) == 1:
            used.setdefault(self.ort_row["cuda_major"][0], []).append(f"onnxruntime-gpu {self.ort_gpu}")
        if self.trt_cuda is not None:
            used.setdefault(self.trt_cuda, []).append(f"TensorRT {self.trt} (CUDA {self.trt_cuda} build)")
        if not used and self.runtimes:
            used[max(self.runtimes)] = [f"the CUDA {max(self.runtimes)} runtime"]
        return used


def _runtimes(cuda: dict, pk: dict) -> set[int] | None:
    known = any(k in cuda for k in ("runtime", "runtimes")) or any(d in pk for d in CUDA_RUNTIME_DISTS)
    if not known:
        return None
    found = {major(v) for v in [cuda.get("runtime"), *(cuda.get("runtimes") or [])] if major(v) is not None}
    found |= {m for d, m in CUDA_RUNTIME_DISTS.items() if pk.get(d)}
    return found  # type: ignore[return-value]


def _cudnn(cuda: dict, pk: dict) -> set[int] | None:
    if "cudnn" not in cuda and not any(d in pk for d in CUDNN_DISTS):
        return None
    found = {major(cuda.get("cudnn"))} - {None}
    found |= {major(pk[d]) for d in CUDNN_DISTS if pk.get(d)}
    return found  # type: ignore[return-value]


def driver_cuda_major(cuda: dict, t: dict | None = None) -> int | None:
    """The newest CUDA major the driver runs: from libcuda's answer, else from the driver's branch
    (a branch runs every minor of its CUDA major: minor version compatibility)."""
    t = t or compat_table()
    if cuda.get("driver_cuda"):
        return major(cuda["driver_cuda"])
    version = cuda.get("driver_version")
    if not version:
        return None
    able = [int(m) for m, row in t["cuda"].items() if at_least(version, row["min_driver_linux"])]
    return max(able) if able else None


def check(p: dict, table: dict | None = None) -> list[Finding]:
    """Findings for probe ``p``, most severe first."""
    t = table or compat_table()
    f = Facts.of(p, t)
    out = [*_onnxruntime(f), *_ort_gpu(f, t), *_driver(f, t), *_tensorrt(f, t), *_gpus(f, t),
           *_cpu_findings(p.get("cpu") or {})]
    if not f.packages.get("openvino") and "openvino" in f.packages:
        out.append(Finding("info", "openvino", "OpenVINO is not installed: only ONNX Runtime is compared on the CPU",
                           "pip install 'infertune[openvino]'"))
    if not f.gpus:
        out.append(Finding("info", "gpu", "no NVIDIA GPU found: CPU backends only", ""))
    return sorted(out, key=lambda x: SEVERITIES.index(x.severity))


def _onnxruntime(f: Facts) -> list[Finding]:
    pk = f.packages
    if pk.get("onnxruntime") and f.ort_gpu:
        return [Finding("error", "onnxruntime", f"onnxruntime {pk['onnxruntime']} and onnxruntime-gpu {f.ort_gpu} "
                        "are both installed: they share the 'onnxruntime' module and the one installed last wins",
                        "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")]
    names = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")
    if all(n in pk for n in names) and not any(pk[n] for n in names):
        return [Finding("error", "onnxruntime", "ONNX Runtime is not installed", "pip install onnxruntime")]
    return []


def _ort_gpu(f: Facts, t: dict) -> list[Finding]:
    if not f.ort_gpu:
        return []
    out = []
    if not f.gpus:
        out.append(Finding("warning", "gpu", f"onnxruntime-gpu {f.ort_gpu} is installed but no NVIDIA GPU or driver "
                           "was found: it still lists its CUDA and TensorRT providers, and infertune refuses them "
                           "(exit 3) rather than measure on the CPU", "install the NVIDIA driver, or use plain "
                           "onnxruntime on this machine"))
    row = f.ort_row
    if row is None:
        return [*out, Finding("warning", "onnxruntime", f"onnxruntime-gpu {f.ort_gpu} is not in infertune's "
                              "compatibility table; its CUDA/cuDNN needs are not checked", "see compat.json sources")]
    need, want = row["cuda_major"], row["cuda_major"][-1]
    pip = t["pip"]
    if f.runtimes and not f.runtimes & set(need):
        have = max(f.runtimes)
        other = next((r for r in t["onnxruntime_gpu"] if have in r["cuda_major"]), None)
        alt = f", or {_pin(other)} (built for CUDA {have})" if other else ""
        out.append(Finding("error", "cuda", f"onnxruntime-gpu {f.ort_gpu} needs CUDA {_list(need)}.x ({row['note']}); "
                           f"only CUDA runtime {_list(sorted(f.runtimes))}.x is installed",
                           f"pip install {pip['cuda_runtime'].get(str(want), 'the CUDA runtime')} (CUDA {want}){alt}"))
    elif f.runtimes is not None and not f.runtimes and f.gpus:
        out.append(Finding("error", "cuda", f"onnxruntime-gpu {f.ort_gpu} needs the CUDA {_list(need)}.x runtime, "
                           "which cannot be loaded", f"pip install {pip['cuda_runtime'].get(str(want))} or install "
                           f"CUDA {want} and put its lib64 on LD_LIBRARY_PATH"))
    cudnn_need = row["cudnn_major"]
    if f.cudnn and not f.cudnn & set(cudnn_need):
        out.append(Finding("error", "cudnn", f"onnxruntime-gpu {f.ort_gpu} needs cuDNN {_list(cudnn_need)}.x; cuDNN "
                           f"{_list(sorted(f.cudnn))}.x is installed (8.x and 9.x are not interchangeable)",
                           f"pip install '{pip['cudnn'].get(str(want))}=={cudnn_need[-1]}.*'"))
    elif f.cudnn is not None and not f.cudnn and f.gpus:
        out.append(Finding("error", "cudnn", f"onnxruntime-gpu {f.ort_gpu} needs cuDNN {_list(cudnn_need)}.x, which "
                           "cannot be loaded", f"pip install {pip['cudnn'].get(str(want))}"))
    return out


def _driver(f: Facts, t: dict) -> list[Finding]:
    out = []
    for cuda_major, who in sorted(f.cuda_in_use().items()):
        row = t["cuda"].get(str(cuda_major))
        if row is None:
            continue
        floor = row["min_driver_linux"]
        if f.trt_cuda == cuda_major and row.get("min_driver_linux_tensorrt"):
            floor = max(floor, row["min_driver_linux_tensorrt"], key=version_tuple)
        if f.driver_cuda is not None and f.driver_cuda < cuda_major:
            out.append(Finding("error", "driver", f"the driver ({f.driver_version or 'version unknown'}) runs CUDA up "
                               f"to {f.driver_cuda}.x; {', '.join(who)} needs CUDA {cuda_major}.x",
                               f"update the NVIDIA driver to >= {floor}"))
        elif f.driver_version and not at_least(f.driver_version, floor):
            out.append(Finding("error", "driver", f"driver {f.driver_version} is older than {floor}, the minimum for "
                               f"{', '.join(who)} on CUDA {cuda_major}.x", f"update the NVIDIA driver to >= {floor}"))
    return out


def _tensorrt(f: Facts, t: dict) -> list[Finding]:
    if not f.trt:
        return []
    row = f.trt_row
    if row is None:
        return [Finding("warning", "tensorrt", f"TensorRT {f.trt} is not in infertune's compatibility table",
                        "see compat.json sources")]
    out = []
    if f.trt_cuda is not None and f.trt_cuda not in row["cuda_major"]:
        dist = t["pip"]["tensorrt"].get(str(row["cuda_major"][-1]))
        out.append(Finding("error", "tensorrt", f"TensorRT {f.trt} has no CUDA {f.trt_cuda} build (its builds: CUDA "
                           f"{_list(row['cuda_major'])})", f"install {dist}"))
    ort_row = row_for(t["onnxruntime_tensorrt"], f.ort_gpu)
    ep_ok = ort_row is None or major(f.trt) in ort_row["tensorrt_major"]
    if not ep_ok:
        cuda = f.ort_row["cuda_major"][-1] if f.ort_row else None
        pin = f"{t['pip']['tensorrt'].get(str(cuda), 'tensorrt')}>={ort_row['built_against'].split(' ')[0]},<" \
              f"{ort_row['tensorrt_major'][-1] + 1}"
        native = " (the native TensorRT backend uses it)" if row.get("native") else ""
        out.append(Finding("warning" if row.get("native") else "error", "tensorrt",
                           f"onnxruntime-gpu {f.ort_gpu}'s TensorRT execution provider (ort-tensorrt) loads "
                           f"{ort_row['needs']} (TensorRT {_list(ort_row['tensorrt_major'])}.x, built against "
                           f"{ort_row['built_against']}); TensorRT {f.trt} is installed{native}",
                           f"pip install '{pin}' for ort-tensorrt"))
    elif not row.get("native"):
        out.append(Finding("warning", "tensorrt", f"TensorRT {f.trt}: {row['note']}",
                           "pip install 'infertune[tensorrt]'"))
    if ep_ok and ort_row is not None and f.ort_row and f.trt_cuda and f.trt_cuda not in f.ort_row["cuda_major"]:
        out.append(Finding("warning", "tensorrt", f"TensorRT {f.trt} is a CUDA {f.trt_cuda} build and onnxruntime-gpu "
                           f"{f.ort_gpu} a CUDA {_list(f.ort_row['cuda_major'])} one: ort-tensorrt mixes them",
                           f"install {t['pip']['tensorrt'].get(str(f.ort_row['cuda_major'][-1]))} instead"))
    return out


def _gpus(f: Facts, t: dict) -> list[Finding]:
    out = []
    for g in f.gpus:
        cc_text = str(g.get("compute_capability"))
        cc = version_tuple(cc_text)
        if not cc:
            continue
        name = g.get("name", "the GPU")
        before = len(out)
        row = f.trt_row
        if row is not None and cc < version_tuple(row["min_compute_capability"]):
            out.append(Finding("error", "gpu", f"{name} (compute capability {cc_text}): TensorRT {f.trt} supports "
                               f"compute capability >= {row['min_compute_capability']} only",
                               "use a Turing or newer GPU, or keep ONNX Runtime CPU"))
        elif row is not None and row.get("deprecated_below") and cc < version_tuple(row["deprecated_below"]):
            out.append(Finding("warning", "gpu", f"{name} (compute capability {cc_text}): deprecated in TensorRT "
                               f"{f.trt} and removed from 10.5 on", "stay on TensorRT <= 10.4 for this GPU"))
        for cuda_major, who in sorted(f.cuda_in_use().items()):
            floor = t["cuda"].get(str(cuda_major), {}).get("min_compute_capability")
            if floor and cc < version_tuple(floor):
                out.append(Finding("error", "gpu", f"{name} (compute capability {cc_text}): CUDA {cuda_major}.x (for "
                                   f"{', '.join(who)}) supports compute capability >= {floor} only",
                                   "use builds for an older CUDA major on this GPU, or a newer GPU"))
        if len(out) == before and cc < (7, 5):
            out.append(Finding("warning", "gpu", f"{name} (compute capability {cc_text}) has no INT8 tensor cores of "
                               "the Turing+ kind: FP16 is the precision to try",
                               "prefer --target tensorrt with FP16, or keep FP32"))
    return out


def _cpu_findings(c: dict) -> list[Finding]:
    if not c:
        return []
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
                           "~1.5-2x FP32 at best, its 16-bit pair sums can saturate with 8-bit weights (quantize "
                           "gives 7 bits to the layers where they do on the data), and Q/DQ overhead can eat the "
                           "gain on small layers",
                           "measure with 'infertune profile --roofline' and let 'infertune tune' decide"))
    if "avx512f" not in isa:
        out.append(Finding("info", "cpu", "no AVX-512: FP32 and INT8 kernels use 256-bit vectors", ""))
    return out


def _pin(row: dict | None) -> str:
    if row is None:
        return ""
    hi = version_tuple(row["to"]) if row.get("to") else None
    upper = f",<{hi[0]}.{hi[1] + 1}" if hi and len(hi) >= 2 else ""
    return f"pip install 'onnxruntime-gpu>={row['from']}{upper}'"


def _list(v: list) -> str:
    return " or ".join(str(x) for x in v)
