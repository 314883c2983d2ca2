"""The real GPU Python bindings, on a machine without a GPU: fetched from PyPI, cached, native parts stubbed.

Used by tests/test_gpu_conformance.py:

- ``tensorrt_bindings(version, cuda)``: the ``tensorrt-cuXX-bindings`` wheel (the only TensorRT
  package on PyPI that is a real wheel; ``tensorrt-cuXX-libs`` is a downloader of NVIDIA's index)
  unpacked, plus one stub library per TensorRT soname its extension needs (``libnvinfer.so.N``,
  ``libnvinfer_plugin.so.N``, ``libnvonnxparser.so.N``) defining the symbols it imports. Every stub
  aborts the process with ``TRT STUB CALLED: <symbol>``: importing the bindings calls none of them,
  so reaching one means a test ran native TensorRT code it must not; and a ``tensorrt`` alias
  package (the ``tensorrt-cuXX`` frontend is ``from tensorrt_bindings import *``, and
  ``tensorrt_bindings.plugin`` imports ``tensorrt``);
- ``cuda_python(version)``: ``cuda-bindings`` + ``cuda-pathfinder`` unpacked (they import without a
  driver; the CUDA runtime is linked in statically);
- ``onnxruntime_gpu(version)``: the onnxruntime-gpu wheel unpacked (its ``onnxruntime`` package
  imports and runs on the CPU without CUDA; its provider libraries are only read);
- ``elf_needed`` / ``elf_undefined``: a small ELF64 reader (NEEDED entries, undefined dynamic
  symbols), so no binutils are needed; stubs need a C compiler (``cc``/``gcc``).

Everything lands in ``$INFERTUNE_CACHE`` or ``~/.cache/infertune`` under ``gpu-conformance/``
(about 420 MB unpacked, most of it onnxruntime-gpu), downloaded once (about 270 MB). One TensorRT
major per process: both are the module ``tensorrt_bindings`` (``run_child``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TENSORRT = {10: "10.16.1.11", 11: "11.4.0.106"}  # newest of each major on PyPI when pinned
CUDA_PYTHON = {12: "12.9.10", 13: "13.4.4"}  # cuda-bindings
CUDA_PATHFINDER = "1.9.1"
ONNXRUNTIME_GPU = "1.31.1"


def cache() -> Path:
    d = Path(os.environ.get("INFERTUNE_CACHE") or Path.home() / ".cache" / "infertune") / "gpu-conformance"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---- fetching -------------------------------------------------------------------------------------
def wheel(package: str, version: str) -> Path:
    """``package==version`` for this Python from PyPI (binary only, no dependencies), cached."""
    wheels = cache() / "wheels"
    wheels.mkdir(exist_ok=True)
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(stem + "*.whl"))
    if found:
        return found[0]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           py, "--implementation", "cp", "-d", str(wheels), f"{package}=={version}"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(stem + "*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pip download {package}=={version} failed (needs PyPI): {done.stderr.strip()[-400:]}")
    return found[0]


def unpacked(name: str, requirements: list[tuple[str, str]], keep_wheels: bool = True) -> Path:
    """The wheels of ``requirements`` ((package, version) pairs) unpacked together into ``cache()/name``,
    fetched only when that is not there yet (a marker file says the unpacking finished)."""
    dest = cache() / name
    if (dest / ".unpacked").exists():
        return dest
    wheels = [wheel(package, version) for package, version in requirements]
    tmp = Path(tempfile.mkdtemp(dir=cache(), prefix=f".{name}."))
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(tmp)
    (tmp / ".unpacked").write_text(json.dumps([w.name for w in wheels]))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    if not keep_wheels:
        for w in wheels:
            w.unlink()
    return dest


def tensorrt_bindings(major: int, cuda: int = 12) -> dict:
    """{'site', 'shim', 'stubs', 'version', 'dist'} for TensorRT ``major`` (the pinned version)."""
    version = TENSORRT[major]
    package = f"tensorrt-cu{cuda}-bindings"
    site = unpacked(f"{package}-{version}", [(package, version)])
    so = next((site / "tensorrt_bindings").glob("tensorrt*.so"))
    return {"site": str(site), "shim": str(shim()), "stubs": [str(s) for s in stubs(so, site / "stubs")],
            "version": version, "dist": package.replace("-", "_"), "so": str(so)}


def cuda_python(major: int) -> dict:
    version = CUDA_PYTHON[major]
    site = unpacked(f"cuda-bindings-{version}", [("cuda-bindings", version), ("cuda-pathfinder", CUDA_PATHFINDER)])
    return {"site": str(site), "version": version}


def onnxruntime_gpu(version: str = ONNXRUNTIME_GPU) -> Path:
    """The onnxruntime-gpu wheel unpacked (about 350 MB; the 255 MB wheel is not kept)."""
    return unpacked(f"onnxruntime-gpu-{version}", [("onnxruntime-gpu", version)], keep_wheels=False)


def shim() -> Path:
    pkg = cache() / "shim" / "tensorrt"
    pkg.mkdir(parents=True, exist_ok=True)
    init = pkg / "__init__.py"
    if not init.exists():
        init.write_text("# what the tensorrt-cuXX frontend is: the bindings under the name tensorrt\n"
                        "import sys\nimport tensorrt_bindings\n\nsys.modules[__name__] = tensorrt_bindings\n")
    return pkg.parent


# ---- stubs ----------------------------------------------------------------------------------------
def stubs(so: Path, out: Path) -> list[Path]:
    """One stub library per TensorRT soname ``so`` needs, defining the symbols it imports that this
    interpreter does not provide; each aborts when called. libnvinfer first (the others need it)."""
    marker = out / ".built"
    sonames = [n for n in elf_needed(so) if n.startswith("libnv")]
    if marker.exists():
        return [out / n for n in json.loads(marker.read_text())]
    here = ctypes.CDLL(None)  # libc, libpython, libstdc++ ...: what is already resolvable
    per_lib: dict[str, list[str]] = {n: [] for n in sonames}
    for sym in elf_undefined(so):
        if not hasattr(here, sym):
            per_lib[_owner(sym, sonames)].append(sym)
    out.mkdir(parents=True, exist_ok=True)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("building TensorRT stubs needs a C compiler (cc or gcc)")
    for soname, syms in per_lib.items():
        src = out / f"{soname}.c"
        src.write_text("#include <stdio.h>\n#include <stdlib.h>\n" + "".join(
            f'void* {s}(void) {{ fprintf(stderr, "TRT STUB CALLED: {s}\\n"); abort(); }}\n' for s in syms))
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(out / soname), f"-Wl,-soname,{soname}", str(src)],
                       check=True, capture_output=True)
    order = sorted(per_lib, key=lambda n: (not n.startswith("libnvinfer.so"), n))
    marker.write_text(json.dumps(order))
    return [out / n for n in order]


def _owner(sym: str, sonames: list[str]) -> str:
    """The TensorRT library a symbol belongs to (any choice links; the lookup is global)."""
    def pick(prefix: str) -> str:
        return next((s for s in sonames if s.startswith(prefix + ".so")), sonames[0])
    if "OnnxParser" in sym or "NvOnnx" in sym:
        return pick("libnvonnxparser")
    if sym.startswith("initLibNvInferPlugins"):
        return pick("libnvinfer_plugin")
    return pick("libnvinfer")


# ---- ELF ------------------------------------------------------------------------------------------
def _sections(f) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, size, link, entsize) of every section of an ELF64 little-endian file."""
    head = f.read(64)
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        raise ValueError(f"{f.name}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", head, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    out = []
    for i in range(shnum):
        _, kind, _, _, offset, size, link, _, _, entsize = struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize)
        out.append((kind, offset, size, link, entsize))
    return out


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _cstr(table: bytes, at: int) -> str:
    return table[at:table.index(b"\0", at)].decode()


def elf_needed(path: str | Path) -> list[str]:
    """The DT_NEEDED sonames of a shared library, in order."""
    with open(path, "rb") as f:
        sections = _sections(f)
        out = []
        for kind, offset, size, link, _ in sections:
            if kind != 6:  # SHT_DYNAMIC
                continue
            strtab = _read(f, sections[link][1], sections[link][2])
            data = _read(f, offset, size)
            for tag, value in struct.iter_unpack("<qQ", data):
                if tag == 1:  # DT_NEEDED
                    out.append(_cstr(strtab, value))
        return out


def elf_undefined(path: str | Path) -> list[str]:
    """Undefined, unversioned global dynamic symbols (what a stub must provide)."""
    with open(path, "rb") as f:
        sections = _sections(f)
        versym = next((_read(f, o, s) for k, o, s, _, _ in sections if k == 0x6FFFFFFF), b"")  # SHT_GNU_versym
        out = []
        for kind, offset, size, link, entsize in sections:
            if kind != 11:  # SHT_DYNSYM
                continue
            strtab = _read(f, sections[link][1], sections[link][2])
            data = _read(f, offset, size)
            for i in range(1, size // entsize):
                name, info, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, i * entsize)
                version = struct.unpack_from("<H", versym, 2 * i)[0] & 0x7FFF if versym else 0
                if shndx == 0 and name and info >> 4 == 1 and version <= 1:  # STB_GLOBAL; weak ones may stay unresolved
                    out.append(_cstr(strtab, name))
        return out


# ---- running in a child ---------------------------------------------------------------------------
def run_child(script: Path, config: dict, timeout: float = 600) -> dict:
    """``python script CONFIG`` in a clean directory; its last stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "INFERTUNE_FORCE_GPU_TESTS")}
    with tempfile.TemporaryDirectory() as cwd:  # a `tensorrt` in the caller's cwd stays out of the way
        done = subprocess.run([sys.executable, str(script), json.dumps(config)], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{script.name} failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
