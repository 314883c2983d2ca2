"""The GPU backends against the REAL bindings and wheels of the versions infertune supports, without a GPU.

What a GPU machine would have, fetched from PyPI and cached (tests/trt_stubs.py): TensorRT's Python
bindings for 10.x and 11.x (``tensorrt-cuXX-bindings``, native libraries stubbed, one process per
major), cuda-python 12.x and 13.x (``cuda-bindings``), onnxruntime-gpu 1.31.1. Checked:

- every TensorRT and cuda-python name the native backend touches exists in each version, each
  call fits a real signature, and every name in its source is reached (tests/trt_harness.py runs
  the backend against autospecs of the real classes and records what it touches);
- the build plan for every option combination (precision of the graph, version compatibility,
  hardware compatibility, timing cache, optimisation level, profile shapes, workspace, engine
  cache) touches no missing name: no ``BuilderFlag.FP16``, no ``EXPLICIT_BATCH`` or
  ``STRONGLY_TYPED`` on 11;
- the engine record's CUDA is TensorRT's (its package suffix), not cuda-python's own runtime;
- cuda-python 12 and 13 layouts, and "listed never means usable" with the real bindings;
- every ONNX Runtime provider option key infertune passes is in the provider library it is for;
- compat.json agrees with what the onnxruntime-gpu and TensorRT wheels declare;
- tests/test_gpu.py passes with the real onnxruntime-gpu 1.31.1 installed on a machine without a GPU;
- TensorRT's bindings without their libraries: BackendUnavailable (exit 3), not an ImportError;
- the GPU extras ask for what compat.json says goes together.

About 50 s here, cold or warm (the two harness runs of 2592 builds each dominate); the first run
downloads about 270 MB (onnxruntime-gpu is 255 MB of it).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import trt_stubs
from models import MODELS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

# infertune itself is imported inside each test: run against an older infertune, each check fails
# on its own finding rather than all of them on an import.

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("trt_harness.py")
PAIRS = {10: 12, 11: 13}  # TensorRT major -> the cuda-python major run with it (and its bindings' CUDA suffix)


@functools.cache
def harness(major: int) -> dict:
    """The harness run once per TensorRT major (with the cuXX bindings wheel of its paired CUDA)."""
    return trt_stubs.run_child(HARNESS, {"trt": trt_stubs.tensorrt_bindings(major, PAIRS[major]),
                                         "cuda": trt_stubs.cuda_python(PAIRS[major])})


@pytest.mark.parametrize("major", sorted(PAIRS))
def test_tensorrt_and_cuda_python_names_resolve_conformance(major):
    r = harness(major)
    assert r["tensorrt"] == trt_stubs.TENSORRT[major] and "tensorrt_bindings" in r["tensorrt_module"]
    assert r["cuda_runtime_module"] == "cuda.bindings.runtime"  # the layout of cuda-python >= 12.6 and 13.x
    assert r["missing"] == [], f"names infertune uses that TensorRT {r['tensorrt']} / cuda-python lack"
    assert r["bad_calls"] == [], "calls that fit no signature of the real bindings"
    assert r["runner_errors"] == [] and r["plan_errors"] == []
    assert r["unresolved"] == [], "names in the backend's source this version lacks"
    touched = set(r["touched"])
    # the harness really went through the build, the runner and the CUDA calls
    assert {"Builder.build_serialized_network", "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_flag",
            "trt.BuilderFlag.VERSION_COMPATIBLE", "IExecutionContext.execute_async_v3", "cudart.cudaGraphLaunch",
            "cudart.cudaMemcpyAsync", "cudart.cudaGetDeviceCount", "cudart.cudaDeviceProp.multiProcessorCount",
            "EngineInspector.get_engine_information", "trt.IProfiler.__init__"} <= touched
    assert len(r["static_names"]) > 40


def test_every_name_in_the_backend_is_reached_conformance():
    """Each `trt.X.Y` / `cudart.X` in backends/tensorrt.py and backends/cuda.py is touched by some
    scenario on some major (11 never reaches NetworkDefinitionCreationFlag: it needs no flag)."""
    uncovered = set(harness(10)["uncovered"]) & set(harness(11)["uncovered"])
    assert not uncovered, "names no scenario reached: extend tests/trt_harness.py"
    assert harness(11)["uncovered"] == ["trt.NetworkDefinitionCreationFlag"] and harness(10)["uncovered"] == []


@pytest.mark.parametrize("major", sorted(PAIRS))
def test_build_plan_every_option_combination_conformance(major):
    """6 graphs (fp32, fp16 from quant.fp16, int8 Q/DQ; static and with profile shapes) x the fp16
    switch x version_compatible x 3 hardware levels x timing cache (none, new, existing) x 3
    optimisation levels x workspace x engine cache: 1296 builds and 1296 refusals of the fp16
    switch (precision comes from the graph), none touching a missing name."""
    r = harness(major)
    assert r["plan_errors"] == [] and r["builds"] == r["refused"] == 6 * 2 * 3 * 3 * 3 * 2 * 2
    touched = set(r["touched"])
    assert not {"trt.BuilderFlag.FP16", "trt.BuilderFlag.INT8", "trt.BuilderFlag.STRICT_TYPES"} & touched
    if major == 11:  # strongly typed is the only mode: the flag is deprecated and ignored, EXPLICIT_BATCH gone
        assert not any(n.startswith("trt.NetworkDefinitionCreationFlag.") for n in touched)
        assert r["create_network_flags"] == {"fp32": [0], "fp16": [0], "int8": [0]}
    else:  # 10.x: the STRONGLY_TYPED bit, by name (its value is 1 in 10.x, 0 in 11.x)
        assert "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED" in touched
        bit = r["strongly_typed_bit"]
        assert bit == 2 and r["create_network_flags"] == {"fp32": [bit], "fp16": [bit], "int8": [bit]}
    assert {"trt.HardwareCompatibilityLevel.AMPERE_PLUS", "trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY",
            "trt.HardwareCompatibilityLevel.NONE", "trt.MemoryPoolType.WORKSPACE",
            "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "ITimingCache.serialize",
            "IOptimizationProfile.set_shape", "IBuilderConfig.builder_optimization_level"} <= touched


@pytest.mark.parametrize("major", sorted(PAIRS))
def test_engine_record_cuda_is_tensorrts_conformance(major):
    """cuda-python's cudaRuntimeGetVersion is its own static runtime (12090, 13040): not what the
    engine was built with. The record says TensorRT's CUDA major, from its package's suffix."""
    r = harness(major)
    record = r["record"]
    cuda = str(PAIRS[major])
    assert record["cuda_runtime"] == cuda and record["cuda_runtime_source"] == f"tensorrt_cu{cuda}_bindings"
    assert str(r["cuda_python_runtime_version"]).startswith(cuda)  # cuda-python 12.9 / 13.4 say 12090 / 13040
    assert record["tensorrt"] == trt_stubs.TENSORRT[major] and record["plan"]["tensorrt_major"] == major
    assert record["schema_version"] == 2 and record["kind"] == "infertune-tensorrt-engine"


CUDA_PROBE = """
import json, sys
sys.path[0:0] = {paths!r}
from infertune.backends import cuda
api = cuda.runtime_api()
try:
    from cuda import cudart  # noqa: F401
    legacy = True
except ImportError:
    legacy = False
state = cuda.usable_gpus(api)
print(json.dumps({{"module": api.__name__, "legacy_cudart": legacy, "state": state.to_dict(),
                  "runtime_version": api.cudaRuntimeGetVersion()[1]}}))
"""


@pytest.mark.parametrize("major", [12, 13])
def test_cuda_python_layouts_and_no_usable_gpu_conformance(major, tmp_path):
    """cuda-python 13 has no `cuda.cudart`; both have `cuda.bindings.runtime`, taken first. Without a
    driver cudaGetDeviceCount says cudaErrorInsufficientDriver: the runtime loads, no GPU is usable."""
    site = trt_stubs.cuda_python(major)["site"]
    script = tmp_path / "probe.py"
    script.write_text(CUDA_PROBE.format(paths=[site, str(ROOT / "src")]))
    out = trt_stubs.run_child(script, {})
    assert out["module"] == "cuda.bindings.runtime"
    assert out["legacy_cudart"] is (major == 12)  # `from cuda import cudart` is gone in 13
    assert str(out["runtime_version"]).startswith(str(major))
    if not Path("/dev/nvidia0").exists():
        assert out["state"]["count"] == 0 and "cudaErrorInsufficientDriver" in out["state"]["reason"]


# ---- onnxruntime-gpu --------------------------------------------------------------------------------
@functools.cache
def ort_gpu() -> Path:
    return trt_stubs.onnxruntime_gpu()


@functools.cache
def strings(path: Path) -> frozenset[bytes]:
    """The NUL-terminated printable strings of a binary (what `strings` shows)."""
    return frozenset(re.findall(rb"([\x21-\x7e]{3,})\x00", path.read_bytes()))


def _max_options(tmp: Path):
    """Every optional GPU setting given, so every provider option key infertune can pass is passed."""
    from infertune.backends.gpu import GpuOptions, parse_profile_shapes

    return GpuOptions(device_id=1, fp16=True, engine_cache=str(tmp / "e"), timing_cache=str(tmp / "t"),
                      builder_optimization_level=5, cuda_graph=True, workspace_mib=64,
                      hardware_compatibility="ampere+", version_compatible=True, streams=2,
                      profile_shapes=parse_profile_shapes("x:1x3x12x12/4x3x12x12/16x3x12x12"))


def test_ort_provider_option_keys_are_in_the_provider_libraries_conformance(tmp_path):
    from infertune.backends.gpu import CONV_ALGO_SEARCH, provider_chain
    from infertune.model import Model

    capi = ort_gpu() / "onnxruntime" / "capi"
    libs = {"CUDAExecutionProvider": capi / "libonnxruntime_providers_cuda.so",
            "TensorrtExecutionProvider": capi / "libonnxruntime_providers_tensorrt.so"}
    cnn = Model.from_proto(MODELS["small_cnn"]())
    passed: dict[str, set[str]] = {}
    for backend in ("ort-cuda", "ort-tensorrt"):
        for provider, options in provider_chain(backend, cnn, _max_options(tmp_path)):
            passed.setdefault(provider, set()).update(options)
    assert {"trt_fp16_enable", "trt_engine_cache_path", "trt_profile_min_shapes", "enable_cuda_graph"} <= set().union(
        *passed.values())
    for provider, keys in passed.items():
        if provider == "CPUExecutionProvider":
            continue
        found = strings(libs[provider])
        assert not sorted(k for k in keys if k.encode() not in found), f"keys {provider} does not know"
    cuda_strings = strings(libs["CUDAExecutionProvider"])
    assert all(v.encode() in cuda_strings for v in CONV_ALGO_SEARCH)  # cudnn_conv_algo_search's values


def _requires(dist_info: Path, extra: str) -> list[str]:
    meta = (dist_info / "METADATA").read_text()
    return [m.group(1) for m in re.finditer(rf"^Requires-Dist: ([\w.-]+)\S*.*extra == \"{extra}\"", meta, re.M)]


def test_compat_table_matches_what_the_wheels_declare_conformance():
    """onnxruntime-gpu 1.31.1: built for CUDA 13 (build info, libcudart.so.13), cuDNN 9, its TensorRT
    provider loads libnvinfer.so.10; its 'cuda' extra names the CUDA 13 runtime package; TensorRT's
    bindings need libnvinfer.so.<major>. compat.json and doctor must say the same."""
    from infertune.deploy.compat import check, compat_table, in_range, row_for
    from infertune.deploy.doctor import normalize_probe

    site, t = ort_gpu(), compat_table()
    version = trt_stubs.ONNXRUNTIME_GPU
    info = (site / "onnxruntime" / "capi" / "build_and_package_info.py").read_text()
    cuda_major = int(re.search(r"cuda_version = '(\d+)\.", info).group(1))
    needed = {n: trt_stubs.elf_needed(site / "onnxruntime" / "capi" / f"libonnxruntime_providers_{n}.so")
              for n in ("cuda", "tensorrt")}
    row = row_for(t["onnxruntime_gpu"], version)
    assert row["cuda_major"] == [cuda_major] == [13]
    assert f"libcudart.so.{cuda_major}" in needed["cuda"] and f"libcublas.so.{cuda_major}" in needed["cuda"]
    cudnn = [int(n.rsplit(".", 1)[1]) for n in needed["tensorrt"] if n.startswith("libcudnn.so.")]
    assert cudnn and set(cudnn) <= set(row["cudnn_major"])
    trt_row = row_for(t["onnxruntime_tensorrt"], version)
    assert trt_row["needs"] in needed["tensorrt"] and trt_row["tensorrt_major"] == [10]
    dist_info = next(site.glob("onnxruntime_gpu-*.dist-info"))
    assert t["pip"]["cuda_runtime"][str(cuda_major)] in _requires(dist_info, "cuda")  # nvidia-cuda-runtime
    assert t["pip"]["cudnn"][str(cuda_major)] in _requires(dist_info, "cudnn")
    for major, cuda in PAIRS.items():
        bindings = trt_stubs.tensorrt_bindings(major, cuda)
        assert f"libnvinfer.so.{major}" in trt_stubs.elf_needed(bindings["so"])
        trt = row_for(t["tensorrt"], bindings["version"])
        assert trt["native"] and cuda in trt["cuda_major"] and t["pip"]["tensorrt"][str(cuda)] == f"tensorrt-cu{cuda}"
    # doctor on a machine that has exactly what the wheel declares: no error; CUDA 12 only: an error
    l4 = [{"name": "NVIDIA L4", "compute_capability": "8.9"}]
    good = normalize_probe({"packages": {"onnxruntime-gpu": version}, "cuda_runtime": f"{cuda_major}.0",
                            "cudnn": f"{cudnn[0]}.0", "driver": t["cuda"][str(cuda_major)]["min_driver_linux"],
                            "gpus": l4})
    assert not [f for f in check(good) if f.severity == "error"]
    bad = normalize_probe({"packages": {"onnxruntime-gpu": version}, "cuda_runtime": "12.4", "gpus": l4})
    assert [f.topic for f in check(bad) if f.severity == "error"] == ["cuda"]
    assert in_range(version, row) and not in_range("1.26.0", row)


def _with_ort_gpu(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INFERTUNE_FORCE_GPU_TESTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ort_gpu()), str(ROOT / "src"), str(ROOT / "tests")])
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_gpu_tests_pass_with_onnxruntime_gpu_on_a_machine_without_a_gpu_conformance(tmp_path):
    """onnxruntime-gpu lists its CUDA and TensorRT providers here, and sessions fall back to the CPU:
    tests/test_gpu.py must pass in that state (models it builds are IR <= 13: 1.31 reads no newer),
    and the GPU backends must refuse with exit 3."""
    from infertune.model import Model

    where = _with_ort_gpu([sys.executable, "-c", "import json, onnxruntime as o; print(json.dumps("
                           "[o.__file__, o.__version__, o.get_available_providers()]))"])
    path, version, providers = json.loads(where.stdout)
    assert str(ort_gpu()) in path and version == trt_stubs.ONNXRUNTIME_GPU
    assert {"CUDAExecutionProvider", "TensorrtExecutionProvider"} <= set(providers)  # listed, not usable
    run = _with_ort_gpu([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                         "-m", "not gpu", "-k", "not conformance"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    model = tmp_path / "m.onnx"
    Model.from_proto(MODELS["grouped_conv"]()).save(model)  # static shapes: no profile needed
    for backend in ("ort-cuda", "ort-tensorrt"):
        cli = _with_ort_gpu([sys.executable, "-m", "infertune", "bench", str(model), "--backend", backend,
                             "--iterations", "2"])
        if not Path("/dev/nvidia0").exists():
            assert cli.returncode == 3 and "none is usable" in cli.stderr, cli.stderr


TRT_WITHOUT_LIBRARIES = """
import json, sys
sys.path[0:0] = {paths!r}
from infertune import backends
from infertune.errors import BackendUnavailable
try:
    backends.get_backend("tensorrt")
    print(json.dumps({{"raised": None}}))
except BackendUnavailable as e:
    print(json.dumps({{"raised": "BackendUnavailable", "message": str(e), "exit": e.exit_code}}))
"""


@pytest.mark.parametrize("major", sorted(PAIRS))
def test_tensorrt_bindings_without_their_libraries_are_backend_unavailable_conformance(major, tmp_path):
    """`pip install tensorrt-cu13-bindings` alone: `import tensorrt` raises ImportError (libnvinfer.so.N
    cannot be opened); infertune says BackendUnavailable (exit 3) naming the extra."""
    b = trt_stubs.tensorrt_bindings(major, PAIRS[major])
    script = tmp_path / "no_libs.py"
    script.write_text(TRT_WITHOUT_LIBRARIES.format(paths=[b["shim"], b["site"], str(ROOT / "src")]))
    out = trt_stubs.run_child(script, {})
    assert out["raised"] == "BackendUnavailable" and out["exit"] == 3
    assert f"libnvonnxparser.so.{major}" in out["message"] or "libnvinfer" in out["message"]
    assert "pip install 'infertune[tensorrt]'" in out["message"]


def _requirement(extra: list[str], name: str) -> tuple[str, str | None, str | None]:
    """(name with extras, lower bound, upper bound) of ``name``'s requirement in an extra."""
    spec = next(r for r in extra if re.match(rf"{re.escape(name)}(\[|>|<|=|$)", r))
    lo, hi = re.search(r">=([\d.]+)", spec), re.search(r"<([\d.]+)", spec)
    return spec, lo.group(1) if lo else None, hi.group(1) if hi else None


def test_extras_agree_with_the_compat_table_conformance():
    """What each GPU extra asks for is what compat.json (checked against the wheels above) says goes
    together; the dev extra stays installable without a GPU index (no GPU package in it)."""
    from infertune.deploy.compat import compat_table, row_for

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    t = compat_table()
    for extra, cuda in (("gpu-cu13", 13), ("gpu-cu12", 12)):
        _, lo, hi = _requirement(extras[extra], "onnxruntime-gpu")
        last = f"{hi.split('.')[0]}.{int(hi.split('.')[1]) - 1}" if hi else None
        for version in filter(None, (lo, last)):
            assert row_for(t["onnxruntime_gpu"], version)["cuda_major"] == [cuda], (extra, version)
            assert row_for(t["onnxruntime_tensorrt"], version)["tensorrt_major"] == [10]
        _, trt_lo, trt_hi = _requirement(extras[extra], f"tensorrt-cu{cuda}")  # the major ORT's provider loads
        assert trt_hi == "11" and row_for(t["tensorrt"], trt_lo)["native"] and cuda in row_for(
            t["tensorrt"], trt_lo)["cuda_major"]
        assert _requirement(extras[extra], "cuda-python")[1].split(".")[0] == str(cuda)
    _, trt_lo, trt_hi = _requirement(extras["tensorrt"], "tensorrt-cu13")
    assert (trt_lo, trt_hi) == ("11", "12") and row_for(t["tensorrt"], trt_lo)["native"]
    for version in trt_stubs.TENSORRT.values():  # the versions these tests pin are natively supported rows
        assert row_for(t["tensorrt"], version)["native"]
    gpu_packages = ("onnxruntime-gpu", "tensorrt", "cuda-python", "nvidia-")
    assert not [r for r in extras["dev"] if r.startswith(gpu_packages)]
