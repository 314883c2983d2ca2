"""preflight: engine build records and artifacts against recorded probes (no GPU needed)."""

from __future__ import annotations

import hashlib
import json

import pytest

from infertune import backends
from infertune.cli import main
from infertune.deploy.artifact import save_artifact
from infertune.deploy.preflight import check_artifact, check_engine, preflight
from infertune.errors import UsageError
from infertune.model import Model
from models import MODELS
from test_doctor import A100, HEALTHY, with_

L4 = {"name": "NVIDIA L4", "compute_capability": "8.9", "sm_count": 58, "memory_mib": 23034}
T4 = {"name": "Tesla T4", "compute_capability": "7.5", "sm_count": 40, "memory_mib": 15360}


def record(**changes) -> dict:
    r = {"schema_version": 1, "kind": "infertune-tensorrt-engine", "tensorrt": "10.4.0",
         "version_compatible": False, "hardware_compatibility": "none", "gpu": dict(A100), "cuda_runtime": "12.4",
         "model": "m", "plan": {}}
    r.update(changes)
    return r


def severities(findings) -> list[tuple[str, str]]:
    return [(f.severity, f.topic) for f in findings]


def test_engine_on_the_machine_that_built_it_is_fine():
    assert check_engine(record(), HEALTHY) == []


@pytest.mark.parametrize("rec, probe, expected, words", [
    (record(tensorrt="10.3.0"), HEALTHY, ("error", "tensorrt"), "loads only on the exact version"),
    (record(tensorrt="10.6.0", version_compatible=True), HEALTHY, ("error", "tensorrt"), "older 10.4.0"),
    (record(tensorrt="10.2.0", version_compatible=True), HEALTHY, ("info", "tensorrt"), "lean runtime"),
    (record(), with_(packages__tensorrt=None), ("error", "tensorrt"), "not installed"),
    (record(), with_(gpus=[]), ("error", "gpu"), "no NVIDIA GPU"),
    (record(), with_(gpus=[L4]), ("error", "gpu"), "compute capability 8.0"),
    (record(hardware_compatibility="ampere+"), with_(gpus=[T4]), ("error", "gpu"), "< 8.0"),
    (record(hardware_compatibility="ampere+"), with_(gpus=[L4]), ("info", "gpu"), "Ampere+ engine"),
    (record(hardware_compatibility="same-cc"), with_(gpus=[dict(A100, name="NVIDIA A30", sm_count=56)]), None, ""),
    (record(), with_(gpus=[dict(A100, name="NVIDIA A30", sm_count=56)]), ("warning", "gpu"), "tactics may be slow"),
    # a driver older in minor than the engine's CUDA runs it (minor version compatibility)
    (record(cuda_runtime="12.8"), HEALTHY, ("info", "driver"), "minor version compatibility"),
    (record(cuda_runtime="13"), HEALTHY, ("error", "driver"), "CUDA 13 build"),  # schema 2: TensorRT's CUDA major
    (record(cuda_runtime="12"), with_(cuda__driver_cuda=None, cuda__driver_version="530.30.02"), ("error", "driver"),
     "older than 535, TensorRT's minimum"),  # r530 runs CUDA 12, but TensorRT wants r535
    (record(cuda_runtime="13"), with_(cuda__driver_cuda="13.0", cuda__driver_version="580.65.06",
                                      packages__tensorrt="10.4.0"), None, ""),
    # version compatibility holds within a major only
    (record(tensorrt="10.16.1.11", version_compatible=True), with_(packages__tensorrt="11.4.0.106"),
     ("error", "tensorrt"), "never load across major versions"),
    (record(tensorrt="10.4.0", version_compatible=True), with_(packages__tensorrt="11.4.0.106"),
     ("error", "tensorrt"), "version-compatible or not"),
])
def test_engine_rules(rec, probe, expected, words):
    found = check_engine(rec, probe)
    if expected is None:
        assert found == []
        return
    assert severities(found) == [expected], found
    assert words in found[0].message and found[0].fix


def test_engine_files_on_disk(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\x00" * 64)
    (f,) = preflight(engine, HEALTHY)  # random bytes named .engine: nothing vouches for them
    assert f.severity == "error" and "no build record" in f.message and "cannot tell" in f.message
    digest = hashlib.sha256(engine.read_bytes()).hexdigest()
    engine.with_suffix(".json").write_text(json.dumps(record(tensorrt="9.0.0", engine_sha256=digest)))
    assert severities(preflight(engine, HEALTHY)) == [("error", "tensorrt")]
    engine.with_suffix(".json").write_text(json.dumps(record(engine_sha256=digest)))
    assert preflight(engine, HEALTHY) == []
    engine.write_bytes(b"\x01" * 64)  # not the engine the record describes
    (f,) = preflight(engine, HEALTHY)
    assert f.severity == "error" and "not the engine its build record" in f.message
    engine.with_suffix(".json").write_text(json.dumps(record()))  # an older record, without the hash
    assert severities(preflight(engine, HEALTHY)) == [("warning", "engine")]
    engine.with_suffix(".json").write_text("{not json")
    assert "not valid JSON" in preflight(engine, HEALTHY)[0].message
    engine.with_suffix(".json").write_text(json.dumps(record(gpu="A100", engine_sha256=digest)))
    assert "'gpu' has the wrong type" in preflight(engine, HEALTHY)[0].message
    with pytest.raises(UsageError, match="neither an artifact directory"):
        preflight(tmp_path / "model.onnx", HEALTHY)


@pytest.fixture
def artifact(tmp_path):
    m = Model.from_proto(MODELS["conv"]())
    return save_artifact(tmp_path / "art", m, source_sha256="0" * 64, settings=backends.Settings())


def test_artifact_here_has_no_error_and_a_changed_byte_is_one(artifact):
    from infertune.deploy.doctor import probe

    here = probe()
    assert not [f for f in preflight(artifact, here) if f.severity == "error"]
    model = artifact / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    assert any(f.severity == "error" and "changed after saving" in f.message for f in preflight(artifact, here))


def test_artifact_rules():
    target = {"cpu": "Intel Xeon", "arch": "x86_64", "isa": ["avx2", "avx512f", "avx512_vnni"],
              "versions": {"onnxruntime": "1.20.1"}}
    here = with_(packages__onnxruntime="1.22.0")
    found = check_artifact({"backend": "ort", "target": target}, here)
    assert severities(found) == [("warning", "onnxruntime"), ("warning", "cpu")]
    assert "dot-product" in found[1].message  # VNNI lost: INT8 is what suffers
    assert severities(check_artifact({"backend": "openvino", "target": {}}, with_(packages__openvino=None))) == [
        ("error", "backend")]
    gpu_target = {**target, "gpus": [A100]}
    no_gpu = check_artifact({"backend": "ort-cuda", "target": gpu_target}, with_(gpus=[]))
    assert severities(no_gpu) == [("error", "gpu")]
    missing = check_artifact({"backend": "tensorrt", "target": {}}, with_(packages__tensorrt=None))
    assert severities(missing) == [("error", "backend")] and "infertune[tensorrt]" in missing[0].fix
    here = with_(packages__tensorrt=None, **{"packages__tensorrt-cu13-bindings": "11.4.0.106"})
    assert not check_artifact({"backend": "tensorrt", "target": {}}, here)  # the bindings count as TensorRT
    assert severities(check_artifact({"backend": "tensorrt", "target": gpu_target}, with_(gpus=[L4]))) == [
        ("warning", "gpu")]
    assert severities(check_artifact({"backend": "tvm", "target": {}}, HEALTHY)) == [("error", "backend")]


def test_cli_preflight(artifact, tmp_path, capsys):
    assert main(["preflight", str(artifact), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "preflight" and doc["ok"] is True
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"x")
    engine.with_suffix(".json").write_text(json.dumps(record(tensorrt="1.0.0")))
    assert main(["preflight", str(engine)]) == 1  # TensorRT 1.0.0 (or no TensorRT): an error here
    assert main(["preflight", str(tmp_path / "nothing")]) == 2


def test_tensorrt_is_recorded_whichever_cuda_build_provides_it(monkeypatch):
    import importlib.metadata

    from infertune.fingerprint import versions

    real = importlib.metadata.version

    def fake(dist):
        if dist == "tensorrt-cu13":
            return "11.4.0.106"
        if dist.startswith("tensorrt"):
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", fake)
    assert versions(("tensorrt",))["tensorrt"] == "11.4.0.106"
