"""GPU backends: every part that needs no GPU is tested here (options, provider options, the
TensorRT build plan, refusal without a usable GPU); the runs themselves carry the `gpu` marker.

On the first GPU machine: `pip install -e '.[gpu-cu13,dev]'` (or `.[tensorrt,dev]` for native
TensorRT 11), swap onnxruntime for onnxruntime-gpu as the README says, then `pytest -m gpu`.
Against the real TensorRT / cuda-python / onnxruntime-gpu bindings without a GPU:
tests/test_gpu_conformance.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from infertune import backends
from infertune.backends import cuda
from infertune.backends.gpu import (
    GpuOptions,
    build_plan,
    cuda_provider_options,
    graph_precision,
    parse_profile_shapes,
    provider_chain,
    resolved_profile,
    tensorrt_provider_options,
)
from infertune.data import Dataset
from infertune.errors import BackendUnavailable, UsageError
from infertune.model import Model
from infertune.quant.fp16 import to_fp16
from infertune.quant.quantize import quantize
from models import MODELS


def _settings(**options) -> backends.Settings:
    return backends.Settings(options=options)


@pytest.fixture(scope="module")
def cnn() -> Model:
    return Model.from_proto(MODELS["small_cnn"]())  # x [N, 3, 12, 12]


@pytest.fixture(scope="module")
def static_conv() -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "s", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10  # onnx 1.23 writes IR 14 by default, which onnxruntime-gpu 1.31 refuses (it reads <= 13)
    return Model.from_proto(m)


@pytest.fixture(scope="module")
def qdq(cnn) -> Model:
    rng = np.random.default_rng(0)
    data = Dataset.from_arrays({"x": rng.standard_normal((8, 3, 12, 12)).astype(np.float32)})
    return quantize(cnn, data, target="tensorrt", stability_halves=0).model


PROFILE = "x:1x3x12x12/4x3x12x12/16x3x12x12"


# ---- options ---------------------------------------------------------------------------------------
def test_options_parse_from_strings_as_the_cli_gives_them():
    o = GpuOptions.from_settings(_settings(fp16="true", builder_optimization_level="5", cuda_graph="1",
                                           workspace_mib="512", hardware_compatibility="ampere+", streams="2",
                                           profile_shapes=PROFILE, **{"session.x": "1", "NUM_STREAMS": "1"}))
    assert (o.fp16, o.builder_optimization_level, o.cuda_graph, o.workspace_mib, o.streams) == (True, 5, True, 512, 2)
    assert o.profile_shapes == {"x": ((1, 3, 12, 12), (4, 3, 12, 12), (16, 3, 12, 12))}
    assert GpuOptions.from_settings(backends.Settings()) == GpuOptions()


@pytest.mark.parametrize("options, message", [
    ({"fp61": "1"}, "unknown GPU option 'fp61'"),
    ({"fp16": "maybe"}, "takes true or false"),
    ({"builder_optimization_level": "7"}, "0..5"),
    ({"builder_optimization_level": "high"}, "takes an integer"),
    ({"hardware_compatibility": "turing"}, "hardware_compatibility must be one of"),
    ({"streams": "0"}, "streams must be >= 1"),
    ({"profile_shapes": "x:1x3/4x3"}, "expected NAME:MINxDIMS"),
    ({"profile_shapes": "x:8x3/4x3/16x3"}, "min <= opt <= max"),
    ({"profile_shapes": "x:1x3/4x3x1/16x3"}, "one rank"),
    ({"cudnn_conv_algo_search": "FAST"}, "cudnn_conv_algo_search must be one of"),
])
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(UsageError, match=message):
        GpuOptions.from_settings(_settings(**options))


def test_profile_needed_for_dynamic_inputs_and_checked_against_the_model(cnn, static_conv):
    with pytest.raises(UsageError, match=r"input 'x' has dynamic dimensions \[N, 3, 12, 12\].*'x:1x3x12x12/8x3x12x12"):
        resolved_profile(cnn, GpuOptions())
    with pytest.raises(UsageError, match="name no input of"):
        resolved_profile(cnn, GpuOptions(profile_shapes=parse_profile_shapes("y:1x3/1x3/1x3")))
    with pytest.raises(UsageError, match="dimension 1 is fixed at 3"):
        resolved_profile(cnn, GpuOptions(profile_shapes=parse_profile_shapes("x:1x1x12x12/1x3x12x12/1x3x12x12")))
    with pytest.raises(UsageError, match="rank 2; the input has rank 4"):
        resolved_profile(cnn, GpuOptions(profile_shapes=parse_profile_shapes("x:1x3/1x3/1x3")))
    assert resolved_profile(static_conv, GpuOptions()) == {"x": ((1, 3, 8, 8),) * 3}


# ---- ONNX Runtime providers --------------------------------------------------------------------------
def test_cuda_provider_options():
    assert cuda_provider_options(GpuOptions(device_id=1, cuda_graph=True, cudnn_conv_algo_search="HEURISTIC")) == {
        "device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1",
        "enable_cuda_graph": "1"}


def test_tensorrt_provider_options_for_a_float_model(cnn, tmp_path):
    o = GpuOptions(fp16=True, engine_cache=str(tmp_path / "engines"), timing_cache=str(tmp_path / "timing.cache"),
                   builder_optimization_level=4, cuda_graph=True, workspace_mib=256, hardware_compatibility="ampere+",
                   profile_shapes=parse_profile_shapes(PROFILE))
    assert tensorrt_provider_options(cnn, o) == {
        "device_id": "0", "trt_fp16_enable": "1", "trt_int8_enable": "0", "trt_builder_optimization_level": "4",
        "trt_cuda_graph_enable": "1", "trt_max_workspace_size": str(256 * 2**20),
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(tmp_path / "engines"),
        "trt_engine_hw_compatible": "1",
        "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(tmp_path / "timing.cache"),
        "trt_profile_min_shapes": "x:1x3x12x12", "trt_profile_opt_shapes": "x:4x3x12x12",
        "trt_profile_max_shapes": "x:16x3x12x12"}


def test_tensorrt_provider_takes_int8_from_the_qdq_nodes(qdq, static_conv):
    o = GpuOptions(profile_shapes=parse_profile_shapes(PROFILE))
    assert tensorrt_provider_options(qdq, o)["trt_int8_enable"] == "1"
    opts = tensorrt_provider_options(static_conv, GpuOptions())
    assert opts["trt_int8_enable"] == "0" and not any(k.startswith("trt_profile") for k in opts)  # static: none


def test_provider_chain_order(cnn):
    o = GpuOptions(cuda_graph=True, profile_shapes=parse_profile_shapes(PROFILE))
    assert [p for p, _ in provider_chain("ort-cuda", cnn, o)] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = provider_chain("ort-tensorrt", cnn, o)
    assert [p for p, _ in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chain[0][1]["trt_cuda_graph_enable"] == "1" and chain[1][1]["enable_cuda_graph"] == "0"  # one captures
    with pytest.raises(UsageError, match="no GPU provider chain"):
        provider_chain("ort", cnn, o)


def _gpu_usable() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda.usable_gpus().usable


def test_ort_gpu_backends_refuse_a_cpu_only_onnxruntime(static_conv):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here (tests/test_gpu_conformance.py runs this with it)")
    for name in ("ort-cuda", "ort-tensorrt"):
        with pytest.raises(BackendUnavailable, match=r"not in this onnxruntime .*pip install 'infertune\[gpu-cu13\]'"):
            backends.compile(static_conv, backend=name)


def test_listed_providers_without_a_usable_gpu_are_refused(static_conv, monkeypatch):
    """onnxruntime-gpu lists CUDA and TensorRT on a machine without a GPU: listed is not usable."""
    from infertune.backends import ort_gpu

    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_gpu.ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(cuda, "usable_gpus", lambda api=None: cuda.GpuState(0, None, "no NVIDIA driver (test)"))
    for name in ("ort-cuda", "ort-tensorrt"):
        with pytest.raises(BackendUnavailable, match=r"needs an NVIDIA GPU, and none is usable here: no NVIDIA driver"):
            backends.compile(static_conv, backend=name)
        assert backends.get_backend(name).unavailable() is None  # listed: only the driver can tell


def test_a_session_that_fell_back_to_the_cpu_is_refused(static_conv, monkeypatch):
    """ONNX Runtime logs and falls back to the CPU when a GPU provider fails to load: refused, exit 3."""
    from infertune.backends import ort_gpu

    class CpuSession:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_gpu.ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(cuda, "usable_gpus", lambda api=None: cuda.GpuState(1, "13.0"))
    chains = []
    monkeypatch.setattr(ort_gpu, "create_session", lambda model, settings, chain: chains.append(chain) or CpuSession())
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider did not load .*fell back to CPUExecution"):
        backends.compile(static_conv, backends.Settings(options={"cuda_graph": "1"}), backend="ort-cuda")
    assert chains[0][0] == ("CUDAExecutionProvider", cuda_provider_options(GpuOptions(cuda_graph=True)))


def test_native_tensorrt_without_the_package_names_the_extra(static_conv):
    try:
        import tensorrt  # noqa: F401, TID251 - only probing whether it is installed
    except ImportError:
        with pytest.raises(BackendUnavailable, match=r"pip install 'infertune\[tensorrt\]'"):
            backends.compile(static_conv, backend="tensorrt")
    else:
        pytest.skip("tensorrt is installed here")


def test_a_backend_module_that_cannot_load_is_backend_unavailable(monkeypatch, static_conv):
    """TensorRT's bindings without its libraries raise ImportError (libnvinfer.so.N) on import: exit 3."""
    broken = backends.Runtime("broken", "Broken", "infertune_no_such_module.backend", "X", "onnxruntime", "tensorrt",
                              None, gpu=True)
    monkeypatch.setitem(backends._REGISTRY, "broken", broken)
    with pytest.raises(BackendUnavailable, match=r"backend 'broken': the onnxruntime package is installed but cannot "
                                                 r"be loaded \(No module named .*pip install 'infertune\[tensorrt\]'"):
        backends.compile(static_conv, backend="broken")


# ---- cuda-python layouts and GPU detection (with the real wheels: tests/test_gpu_conformance.py) ------
class _FakeRuntime:
    """cuda-python's runtime API as far as usable_gpus uses it."""

    def __init__(self, count=None, error=0, raises=None):
        self.count, self.error, self.raises = count, error, raises

    def cudaGetDeviceCount(self):  # noqa: N802 - cuda-python's name
        if self.raises:
            raise self.raises
        return (self.error, self.count)

    def cudaDriverGetVersion(self):  # noqa: N802
        return (0, 13000)

    def cudaGetErrorName(self, err):  # noqa: N802
        return (0, b"cudaErrorInsufficientDriver")


def test_cuda_runtime_module_layouts(monkeypatch):
    import sys
    import types

    new, old = types.ModuleType("cuda.bindings.runtime"), types.ModuleType("cuda.cudart")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", new)
    monkeypatch.setitem(sys.modules, "cuda.cudart", old)
    assert cuda.runtime_api() is new  # cuda-python >= 12.6 and 13.x
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)  # import raises ImportError
    assert cuda.runtime_api() is old  # before 12.6
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    assert cuda.runtime_api() is None


def test_usable_gpus_asks_the_driver():
    assert cuda.usable_gpus(_FakeRuntime(2)) == cuda.GpuState(2, "13.0", "")
    none = cuda.usable_gpus(_FakeRuntime(None, error=35))
    assert not none.usable and "cudaErrorInsufficientDriver" in none.reason
    old = cuda.usable_gpus(_FakeRuntime(raises=RuntimeError('Function "cuInit" not found')))
    assert not old.usable and "no NVIDIA driver" in old.reason
    assert not cuda.usable_gpus(_FakeRuntime(0)).usable
    here = cuda.usable_gpus()  # this machine: cuda-python absent, so libcuda through ctypes
    assert here.usable == Path("/dev/nvidia0").exists() and (here.usable or here.reason)


def test_checked_raises_backend_unavailable_with_the_error_name():
    assert cuda.checked((0, 7)) == 7 and cuda.checked((0,)) is None and cuda.checked((0, 1, 2)) == [1, 2]
    with pytest.raises(BackendUnavailable, match="CUDA call failed: cudaErrorInsufficientDriver"):
        cuda.checked((35, None), _FakeRuntime())


# ---- native TensorRT build plan ------------------------------------------------------------------------
def test_build_plan_is_strongly_typed_per_major(cnn, tmp_path):
    o = GpuOptions(workspace_mib=1024, builder_optimization_level=5, hardware_compatibility="same-cc",
                   version_compatible=True, timing_cache=str(tmp_path / "t.cache"),
                   profile_shapes=parse_profile_shapes(PROFILE))
    ten, eleven = build_plan(cnn, o, 10), build_plan(cnn, o, 11)
    assert ten.network_flags == ("STRONGLY_TYPED",)  # 10.x: the flag makes it strongly typed
    assert eleven.network_flags == ()  # 11.x: always strongly typed; the flag is deprecated and ignored
    for p in (ten, eleven):
        assert p.builder_flags == ("VERSION_COMPATIBLE",) and p.precision == "fp32"
        assert (p.workspace_bytes, p.builder_optimization_level) == (2**30, 5)
        assert p.hardware_compatibility_level == "SAME_COMPUTE_CAPABILITY" and p.profiling_verbosity == "DETAILED"
        assert p.timing_cache == str(tmp_path / "t.cache")
        assert p.to_dict()["profile"] == {"x": [[1, 3, 12, 12], [4, 3, 12, 12], [16, 3, 12, 12]]}
    with pytest.raises(UsageError, match=r"TensorRT 8.x is not supported .*10.x, 11.x"):
        build_plan(cnn, o, 8)


def test_build_plan_takes_precision_from_the_graph_and_refuses_the_fp16_switch(cnn, qdq):
    o = GpuOptions(profile_shapes=parse_profile_shapes(PROFILE))
    half = to_fp16(cnn).model
    assert [build_plan(m, o, 11).precision for m in (cnn, half, qdq)] == ["fp32", "fp16", "int8"]
    assert [graph_precision(m) for m in (cnn, half, qdq)] == ["fp32", "fp16", "int8"]
    for major in (10, 11):
        p = build_plan(qdq, o, major)
        assert "FP16" not in p.builder_flags and "INT8" not in p.builder_flags and p.workspace_bytes is None
        assert p.hardware_compatibility_level == "NONE"
        with pytest.raises(UsageError, match="strongly typed.*infertune fp16 MODEL"):
            build_plan(cnn, GpuOptions(fp16=True, profile_shapes=o.profile_shapes), major)


def test_cli_option_flag_reaches_the_backend(capsys, static_conv, tmp_path):
    from infertune.cli import main

    path = static_conv.save(tmp_path / "m.onnx")
    assert main(["bench", str(path), "--option", "nonsense", "--iterations", "2"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    code = main(["bench", str(path), "--backend", "ort-cuda", "--option", "cuda_graph=1", "--iterations", "2"])
    err = capsys.readouterr().err
    if _gpu_usable():
        assert code == 0, err
    else:  # a CPU onnxruntime, or onnxruntime-gpu on a machine without a usable GPU
        assert code == 3 and ("onnxruntime-gpu" in err or "none is usable" in err), err


# ---- on a GPU ------------------------------------------------------------------------------------------
def _close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-tensorrt", "tensorrt"])
def test_gpu_backend_matches_the_cpu(backend, cnn, tmp_path):
    x = {"x": np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)}
    s = _settings(profile_shapes=PROFILE, engine_cache=str(tmp_path / "engines"),
                  timing_cache=str(tmp_path / "timing.cache"))
    r = backends.compile(cnn, s, backend=backend)
    _close(r.run(x), backends.compile(cnn).run(x), 1e-3)
    _close(r.run(x), backends.compile(cnn).run(x), 1e-3)  # second call: bound buffers reused
    if backend != "ort-cuda":
        assert any((tmp_path / "engines").iterdir()) and (tmp_path / "timing.cache").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ort-cuda", "tensorrt"])
def test_cuda_graph_replays_with_new_inputs(backend, static_conv):
    r = backends.compile(static_conv, _settings(cuda_graph="1"), backend=backend)
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
        np.testing.assert_allclose(r.run(x)["y"], np.maximum(x["x"], 0), atol=1e-6)


@pytest.mark.gpu
def test_native_tensorrt_qdq_timings_layers_streams_and_preflight(qdq, cnn, tmp_path):
    from infertune.deploy.preflight import preflight

    s = _settings(profile_shapes=PROFILE, engine_cache=str(tmp_path), streams="2")
    r = backends.compile(qdq, s, backend="tensorrt")
    x = {"x": np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    ref = backends.compile(cnn).run(x)["logits"].ravel()
    for slot in (0, 1):
        got = r.run(x, slot=slot)["logits"].ravel()
        assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.98
    t = r.timed_run(x)
    assert t.h2d_ms > 0 and t.compute_ms > 0 and t.d2h_ms > 0
    assert r.layer_times(x) and "Layers" in r.layer_information()
    engine = next(tmp_path.glob("*.engine"))
    assert not [f for f in preflight(engine) if f.severity == "error"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-tensorrt", "tensorrt"])
def test_an_fp16_graph_runs_in_fp16_on_the_gpu(backend, cnn, tmp_path):
    """FP16 as tune builds it: an FP16 graph (quant.fp16), built strongly typed on native TensorRT."""
    half = to_fp16(cnn).model
    x = {"x": np.random.default_rng(4).standard_normal((4, 3, 12, 12)).astype(np.float32)}
    r = backends.compile(half, _settings(profile_shapes=PROFILE, engine_cache=str(tmp_path)), backend=backend)
    _close(r.run(x), backends.compile(cnn).run(x), 5e-2)
    if backend == "tensorrt":
        record = json.loads(next(tmp_path.glob("*.json")).read_text())
        assert record["plan"]["precision"] == "fp16" and record["cuda_runtime"] in ("12", "13")


@pytest.mark.gpu
def test_tune_searches_the_gpu_runtimes_here(tmp_path):
    from infertune import Budget, Evaluator, tune
    from infertune.search.runtimes import auto_runtimes

    runtimes = auto_runtimes()
    assert any(backends.runtime(r).gpu for r in runtimes), "a usable GPU, but no GPU runtime loads"
    digits = Path(__file__).resolve().parents[1] / "examples" / "digits"
    m = Model.load(digits / "digits_cnn.onnx")
    with np.load(digits / "calib.npz") as z:
        calib = Dataset.from_iterable([{"image": z["image"][i:i + 1]} for i in range(16)])
        feeds = [{"image": z["image"][i:i + 1]} for i in range(16, 48)]
    r = tune(m, calib, Evaluator(m, feeds), Budget.parse("cosine>=0.99"), run_dir=tmp_path / "run",
             runtimes=runtimes, latency_s=0.2)
    gpu = [t for t in r.trials if backends.runtime(t.spec.backend).gpu]
    assert {t.spec.precision for t in gpu} >= {"fp32", "fp16"} and all(not t.note.startswith("failed") for t in gpu)
    assert any(t.spec.options for t in gpu)  # CUDA graphs tried
