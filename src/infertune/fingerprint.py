"""Where a number was measured: machine fingerprint and library versions.

Every saved result carries ``environment()`` so it can be traced to the machine and the
versions that produced it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from pathlib import Path

# CPU flags that decide INT8 / FP16 speed on x86 (names as /proc/cpuinfo spells them).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


@functools.cache
def cpu() -> dict:
    """CPU model (with its x86 family and model numbers), logical cores and the ISA flags of ``ISA_FLAGS``
    that are present."""
    model, flags, generation = platform.processor() or platform.machine(), set(), {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key in ("cpu family", "model") and value.strip().isdigit():
                generation.setdefault(key, value.strip())
    if len(generation) == 2:
        # a VM's model name can be just "AMD EPYC": Zen 1 (family 23) and Zen 3 (family 25) time differently
        model = f"{model} (family {generation['cpu family']}, model {generation['model']})"
    return {
        "model": model,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count() or 1,
        "isa": [f for f in ISA_FLAGS if f in flags],
    }


# a package published under several distribution names (TensorRT's CUDA builds by suffix): the first found
DIST_ALIASES = {"tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11")}


def gpus() -> list[str]:
    """NVIDIA GPU models the driver lists (/proc/driver/nvidia), without importing anything."""
    out = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model":
                out.append(value.strip())
    return out


def machine_kind() -> dict:
    """What makes latency comparable between machines: CPU model, architecture, ISA flags, GPUs."""
    c = cpu()
    return {"cpu": c["model"], "arch": c["arch"], "isa": c["isa"], "gpus": gpus()}


def kind_label() -> str:
    """A short stable name of ``machine_kind()``: machines with the same label time alike."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(machine_kind(), sort_keys=True).encode()).hexdigest()[:12]


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for name in ("infertune", "numpy", "onnx", "onnxruntime", *extra):
        for dist in DIST_ALIASES.get(name, (name,)):
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def environment() -> dict:
    """Machine fingerprint and library versions, for every saved result."""
    return {
        "machine": {
            "cpu": cpu(),
            "memory_gib": _memory_gib(),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "hostname_hash": _short_hash(platform.node()),
        },
        "versions": versions(),
    }


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * size / 2**30, 1)


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]
