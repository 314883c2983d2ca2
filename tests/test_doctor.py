"""doctor: every rule on recorded probes (no GPU needed), and a real run on this machine."""

from __future__ import annotations

import copy
import json

import pytest

from infertune.deploy.doctor import check, compat_table, probe

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
    (e,) = errors(with_(cuda__driver_cuda=None, cuda__driver_version="520.61.05"))
    assert e.topic == "driver" and "older than 525.60.13" in e.message


def test_tensorrt_8_with_ort_gpu_1_20():
    (e,) = errors(with_(packages__tensorrt="8.6.1"))
    assert e.topic == "tensorrt" and "TensorRT 10.x" in e.message


def test_missing_cuda_libraries_with_a_gpu():
    es = errors(with_(cuda__runtime=None, cuda__cudnn=None, **{"packages__nvidia-cudnn-cu12": None}))
    assert {e.topic for e in es} == {"cuda", "cudnn"} and all("cannot be loaded" in e.message for e in es)


def test_gpu_package_without_gpu_is_a_warning_not_an_error():
    p = with_(gpus=[], cuda__driver_cuda=None, cuda__driver_version=None, cuda__runtime=None, cuda__cudnn=None,
              **{"packages__nvidia-cudnn-cu12": None})
    assert errors(p) == [] and any(f.severity == "warning" and f.topic == "gpu" for f in check(p))


def test_old_gpu_and_cpu_without_avx2():
    p = with_(gpus=[{**A100, "name": "Tesla P100", "compute_capability": "6.0"}],
              cpu={"model": "Old Xeon", "arch": "x86_64", "logical_cores": 4, "isa": ["sse4_2"]})
    warnings = [f for f in check(p) if f.severity == "warning"]
    assert {f.topic for f in warnings} == {"gpu", "cpu"}


def test_vnni_cpu_is_reported():
    p = with_(cpu={**AVX2, "isa": [*AVX2["isa"], "avx512f", "avx512_vnni"]})
    assert any("VNNI present" in f.message for f in check(p))
    assert not any("no AVX-512" in f.message for f in check(p))


def test_findings_come_most_severe_first():
    sev = [f.severity for f in check(with_(packages__onnxruntime="1.20.1", gpus=[]))]
    assert sev == sorted(sev, key=["error", "warning", "info"].index)


def test_compat_table_is_consistent():
    t = compat_table()
    for row in t["onnxruntime_gpu"]:
        assert set(row["cuda_major"]) <= {int(k) for k in t["min_driver_linux"]}
    rows = sorted(t["onnxruntime_gpu"], key=lambda r: tuple(map(int, r["from"].split("."))))
    for a, b in zip(rows, rows[1:], strict=False):  # ranges do not overlap
        assert tuple(map(int, a["to"].split("."))) < tuple(map(int, b["from"].split(".")))


def test_real_probe_and_cli(capsys):
    from infertune.cli import main

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
