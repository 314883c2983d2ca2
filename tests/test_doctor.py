"""doctor: every rule on recorded probes (no GPU needed), `doctor --probe FILE`, and a real run here."""

from __future__ import annotations

import copy
import itertools
import json

import pytest

from infertune.cli import main
from infertune.deploy.compat import in_range
from infertune.deploy.doctor import check, compat_table, normalize_probe, probe, version_tuple

AVX2 = {"model": "AMD EPYC", "arch": "x86_64", "logical_cores": 2, "isa": ["sse4_2", "avx", "avx2", "fma"]}
A100 = {"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0", "sm_count": 108, "memory_mib": 40536}

# A healthy GPU box: onnxruntime-gpu 1.20 with CUDA 12.4, cuDNN 9.1, driver 550 (CUDA 12.4), TensorRT 10.
HEALTHY = {
    "python": "3.11.7", "platform": "Linux x86_64",
    "packages": {"numpy": "2.1.0", "onnx": "1.17.0", "onnxruntime": None, "onnxruntime-gpu": "1.20.1",
                 "openvino": "2024.4.0", "tensorrt": "10.4.0", "nvidia-cudnn-cu12": "9.1.0.70"},
    "ort_providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": {"driver_cuda": "12.4", "driver_version": "550.54.15", "runtime": "12.4", "cudnn": "9.1"},
    "gpus": [A100], "cpu": AVX2,
}


def with_(**changes) -> dict:
    p = copy.deepcopy(HEALTHY)
    for path, value in changes.items():
        node = p
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return p


def errors(p: dict) -> list:
    return [f for f in check(p) if f.severity == "error"]


def test_healthy_gpu_box_has_no_error():
    assert errors(HEALTHY) == []
    assert any("without VNNI" in f.message for f in check(HEALTHY))


def test_cpu_and_gpu_onnxruntime_side_by_side():
    (e,) = errors(with_(packages__onnxruntime="1.20.1"))
    assert e.topic == "onnxruntime" and "both" in e.message and "pip uninstall" in e.fix


def test_cuda_runtime_major_mismatch():
    (e,) = errors(with_(cuda__runtime="11.8"))
    assert e.topic == "cuda" and "needs CUDA 12.x" in e.message and "11.x is installed" in e.message


def test_old_onnxruntime_gpu_wants_cuda_11_and_cudnn_8():
    es = errors(with_(**{"packages__onnxruntime-gpu": "1.17.1"}))
    assert {e.topic for e in es} >= {"cuda", "cudnn"}
    assert any("cuDNN 8.x" in e.message and "9.x is installed" in e.message for e in es)


def test_cudnn_8_with_ort_1_19():
    (e,) = errors(with_(cuda__cudnn="8.9", **{"packages__nvidia-cudnn-cu12": None}))
    assert e.topic == "cudnn" and "not interchangeable" in e.message


def test_driver_too_old_for_cuda_12():
    (e,) = errors(with_(cuda__driver_cuda="11.4", cuda__driver_version="470.82.01"))
    assert e.topic == "driver" and ">= 525.60.13" in e.fix


def test_driver_version_below_the_floor_when_libcuda_is_not_readable():
    (e,) = errors(with_(cuda__driver_cuda=None, cuda__driver_version="520.61.05"))  # the r520 branch: CUDA 11
    assert e.topic == "driver" and "runs CUDA up to 11.x" in e.message and ">= 525.60.13" in e.fix


def test_tensorrt_8_with_ort_gpu_1_20():
    (e,) = errors(with_(packages__tensorrt="8.6.1"))  # neither ORT's provider nor the native backend can use it
    assert e.topic == "tensorrt" and "TensorRT 10.x" in e.message and "libnvinfer.so.10" in e.message


def test_missing_cuda_libraries_with_a_gpu():
    es = errors(with_(cuda__runtime=None, cuda__cudnn=None, **{"packages__nvidia-cudnn-cu12": None}))
    assert {e.topic for e in es} == {"cuda", "cudnn"} and all("cannot be loaded" in e.message for e in es)


def test_gpu_package_without_gpu_is_a_warning_not_an_error():
    p = with_(gpus=[], cuda__driver_cuda=None, cuda__driver_version=None, cuda__runtime=None, cuda__cudnn=None,
              **{"packages__nvidia-cudnn-cu12": None})
    assert errors(p) == [] and any(f.severity == "warning" and f.topic == "gpu" for f in check(p))


def test_old_gpu_and_cpu_without_avx2():
    p = with_(gpus=[{**A100, "name": "Tesla P100", "compute_capability": "6.0"}], packages__tensorrt=None,
              cpu={"model": "Old Xeon", "arch": "x86_64", "logical_cores": 4, "isa": ["sse4_2"]})
    warnings = [f for f in check(p) if f.severity == "warning"]  # CUDA 12 still runs Pascal
    assert {f.topic for f in warnings} == {"gpu", "cpu"} and not errors(p)
    (e,) = errors(with_(gpus=[{**A100, "name": "Tesla P100", "compute_capability": "6.0"}]))  # TensorRT 10.4: SM 7.0+
    assert e.topic == "gpu" and "TensorRT 10.4.0 supports compute capability >= 7.0 only" in e.message


def test_vnni_cpu_is_reported():
    p = with_(cpu={**AVX2, "isa": [*AVX2["isa"], "avx512f", "avx512_vnni"]})
    assert any("VNNI present" in f.message for f in check(p))
    assert not any("no AVX-512" in f.message for f in check(p))


def test_findings_come_most_severe_first():
    sev = [f.severity for f in check(with_(packages__onnxruntime="1.20.1", gpus=[]))]
    assert sev == sorted(sev, key=["error", "warning", "info"].index)


def test_compat_table_is_consistent():
    t = compat_table()
    for section in ("onnxruntime_gpu", "onnxruntime_tensorrt", "tensorrt"):
        rows = t[section]
        for row in rows:  # every rule names where it comes from
            assert row["source"] and set(row["source"]) <= set(t["sources"]), (section, row)
        for a, b in itertools.combinations(rows, 2):  # version ranges do not overlap
            assert not (in_range(a["from"], b) or in_range(b["from"], a)), (section, a["from"], b["from"])
    for row in t["onnxruntime_gpu"] + t["tensorrt"]:
        assert {str(m) for m in row["cuda_major"]} <= set(t["cuda"]) | {"10"}
    for row in t["cuda"].values():
        assert row["source"] and set(row["source"]) <= set(t["sources"]) and version_tuple(row["min_driver_linux"])
    assert set(t["pip"]["source"]) <= set(t["sources"])


def test_real_probe_and_cli(capsys):
    p = probe()
    assert p["packages"]["onnxruntime"] and "CPUExecutionProvider" in p["ort_providers"]
    assert p["cpu"]["logical_cores"] >= 1
    code = main(["doctor", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == (1 if any(f["severity"] == "error" for f in doc["findings"]) else 0)
    assert doc["kind"] == "doctor" and doc["probe"]["python"]


@pytest.mark.gpu
def test_probe_reads_the_gpu():
    p = probe()
    assert p["gpus"] and p["cuda"]["driver_cuda"] and p["gpus"][0]["compute_capability"]


# ---- CUDA 13, TensorRT 11 and recorded probes (doctor --probe) ------------------------------------------
L4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}
V100 = {"name": "Tesla V100-SXM2-16GB", "compute_capability": "7.0"}


def short(packages: dict, gpus=(L4,), **cuda) -> dict:
    """A recorded probe in the short form doctor --probe takes (keys left out are unknown)."""
    return normalize_probe({"packages": packages, "gpus": list(gpus), **cuda})


def short_errors(*args, **kwargs) -> list:
    return [(f.topic, f.message) for f in check(short(*args, **kwargs)) if f.severity == "error"]


def test_probe_file_ort_gpu_1_31_with_cuda_13_on_an_l4_is_fine(tmp_path, capsys):
    path = tmp_path / "l4.json"
    path.write_text(json.dumps({"packages": {"onnxruntime-gpu": "1.31.1", "tensorrt-cu13": "10.16.1.11"},
                                "cuda_runtime": "13.0", "driver": "580.65", "cudnn": "9.14", "gpus": [L4]}))
    assert main(["doctor", "--probe", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["source"] == str(path) and doc["probe"]["cuda"]["runtimes"] == ["13.0"]
    assert not [f for f in doc["findings"] if f["severity"] != "info"]  # no warning either


def test_probe_file_ort_gpu_1_31_with_only_cuda_12_4_is_an_error(tmp_path, capsys):
    path = tmp_path / "cu12.json"
    path.write_text(json.dumps({"packages": {"onnxruntime-gpu": "1.31.1"}, "cuda_runtime": "12.4",
                                "driver": "550.54.15", "gpus": [L4]}))
    assert main(["doctor", "--probe", str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    es = {f["topic"]: f for f in doc["findings"] if f["severity"] == "error"}
    assert "needs CUDA 13.x" in es["cuda"]["message"] and "nvidia-cuda-runtime (CUDA 13)" in es["cuda"]["fix"]
    assert "'onnxruntime-gpu>=1.19,<1.27'" in es["cuda"]["fix"]  # the CUDA 12 builds
    assert "runs CUDA up to 12.x" in es["driver"]["message"] and ">= 580.65.06" in es["driver"]["fix"]


def test_probe_file_tensorrt_11_on_a_v100_is_an_error(tmp_path):
    path = tmp_path / "v100.json"
    path.write_text(json.dumps({"packages": {"tensorrt": "11.4.0.106"}, "cuda_runtime": "12.8",
                                "driver": "570.86", "gpus": [V100]}))
    assert main(["doctor", "--probe", str(path)]) == 1
    (e,) = short_errors({"tensorrt": "11.4.0.106"}, [V100], cuda_runtime="12.8", driver="570.86")
    assert e == ("gpu", "Tesla V100-SXM2-16GB (compute capability 7.0): TensorRT 11.4.0.106 supports compute "
                        "capability >= 7.5 only")


@pytest.mark.parametrize("trt, severity", [("10.4.0", "warning"), ("10.5.0", "error"), ("10.13.3.9", "error")])
def test_volta_is_deprecated_in_tensorrt_10_0_and_removed_in_10_5(trt, severity):
    found = [f for f in check(short({"tensorrt-cu12": trt}, [V100], cuda_runtime="12.6", driver="560.35"))
             if f.topic == "gpu"]
    assert [f.severity for f in found] == [severity]


def test_cuda_13_needs_turing_even_without_tensorrt():
    (e,) = short_errors({"onnxruntime-gpu": "1.31.1"}, [V100], cuda_runtime="13.0", driver="580.65", cudnn="9.1")
    assert e[0] == "gpu" and "CUDA 13.x (for onnxruntime-gpu 1.31.1) supports compute capability >= 7.5" in e[1]
    assert not short_errors({"onnxruntime-gpu": "1.26.0"}, [V100], cuda_runtime="12.8", driver="570.86")  # CUDA 12


@pytest.mark.parametrize("packages, runtime, driver, expected", [
    ({"onnxruntime-gpu": "1.26.0"}, "12.8", "530.30.02", None),  # CUDA 12: r525 is enough for ONNX Runtime
    ({"tensorrt-cu12": "10.16.1.11"}, "12.8", "530.30.02", "older than 535"),  # TensorRT on CUDA 12: r535
    ({"tensorrt-cu12": "10.16.1.11"}, "12.8", "535.54.03", None),
    ({"tensorrt-cu13": "11.4.0.106"}, "13.0", "575.51.03", "runs CUDA up to 12.x"),  # CUDA 13: r580
    ({"tensorrt-cu13": "11.4.0.106"}, "13.0", "580.65.06", None),
])
def test_driver_floors_per_cuda_major(packages, runtime, driver, expected):
    es = short_errors(packages, cuda_runtime=runtime, driver=driver, cudnn="9.1")
    if expected is None:
        assert es == []
    else:
        ((topic, message),) = es
        assert topic == "driver" and expected in message


def test_a_driver_older_in_minor_than_the_runtime_is_fine():
    """Minor version compatibility: a CUDA 12.4 driver runs the CUDA 12.8 runtime ONNX Runtime 1.26 ships with."""
    p = with_(**{"packages__onnxruntime-gpu": "1.26.0"}, cuda__runtime="12.8")
    assert errors(p) == []


def test_pip_cuda_runtime_packages_are_probed():
    """nvidia-cuda-runtime (13.x) is CUDA 13's runtime; nvidia-cuda-runtime-cu13 is a placeholder."""
    assert not short_errors({"onnxruntime-gpu": "1.31.1", "nvidia-cuda-runtime": "13.0.96",
                             "nvidia-cudnn-cu13": "9.14.0.64"}, driver="580.65")
    ((topic, message),) = short_errors({"onnxruntime-gpu": "1.31.1", "nvidia-cuda-runtime-cu12": "12.9.79",
                                        "nvidia-cudnn-cu12": "9.14.0.64"}, driver="580.65")
    assert topic == "cuda" and "only CUDA runtime 12.x is installed" in message
    assert "nvidia-cuda-runtime" in probe()["packages"] and "nvidia-cuda-runtime-cu12" in probe()["packages"]


@pytest.mark.parametrize("packages, severity, words", [
    ({"onnxruntime-gpu": "1.31.1", "tensorrt-cu13": "11.4.0.106"}, "warning", "loads libnvinfer.so.10"),
    ({"onnxruntime-gpu": "1.31.1", "tensorrt-cu13": "10.16.1.11"}, None, ""),
    ({"onnxruntime-gpu": "1.31.1", "tensorrt-cu12": "10.16.1.11"}, "warning", "CUDA 12 build"),
    ({"onnxruntime-gpu": "1.20.1", "tensorrt": "8.6.1"}, "error", "loads libnvinfer.so.10"),
])
def test_tensorrt_for_onnx_runtimes_provider(packages, severity, words):
    cuda = "12.4" if packages["onnxruntime-gpu"] == "1.20.1" else "13.0"
    found = [f for f in check(short(packages, cuda_runtime=cuda, driver="580.65", cudnn="9.1"))
             if f.topic == "tensorrt"]
    assert [f.severity for f in found] == ([severity] if severity else []), found
    assert all(words in f.message for f in found)


def test_doctors_own_json_is_a_probe_file(tmp_path, capsys):
    assert main(["doctor", "--json", "-o", str(tmp_path / "here.json")]) in (0, 1)
    here = json.loads((tmp_path / "here.json").read_text())
    capsys.readouterr()
    main(["doctor", "--probe", str(tmp_path / "here.json"), "--json"])
    again = json.loads(capsys.readouterr().out)
    assert again["findings"] == here["findings"] and again["probe"]["packages"] == here["probe"]["packages"]


@pytest.mark.parametrize("text, words", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"gpus": [{"name": "x", "compute_capability": "eight"}]}', "gpus[0].compute_capability must be like '8.9'"),
    ('{"gpus": {"name": "x"}}', "gpus must be a list"),
    ('{"packages": {"tensorrt": true}}', "packages.tensorrt must be a version string"),
    ('{"cuda_runtme": "13.0"}', "unknown key 'cuda_runtme'"),
    ('{"driver": "latest"}', "cuda.driver_version must be a version string"),
])
def test_malformed_probe_files_are_usage_errors(tmp_path, capsys, text, words):
    path = tmp_path / "p.json"
    path.write_text(text)
    assert main(["doctor", "--probe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["doctor", "--probe", str(tmp_path / "missing.json")]) == 2
