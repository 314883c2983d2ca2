"""Triton export: the config parses as Triton's ModelConfig protobuf text format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from infertune import backends
from infertune.deploy import artifact
from infertune.deploy.manifest import signed
from infertune.deploy.triton import export_triton
from infertune.errors import UsageError
from infertune.model import Model
from models import MODELS

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] is in the dev extra")
from google.protobuf import text_format  # noqa: E402


def _artifact(tmp_path, proto, threads=1, cores=None):
    path = artifact.save_artifact(tmp_path / "tuned", Model.from_proto(proto), source_sha256="0" * 64,
                                  settings=backends.Settings(intra_op_threads=threads))
    if cores:
        m = json.loads((path / "manifest.json").read_text())
        m["target"]["logical_cores"] = cores
        (path / "manifest.json").write_text(json.dumps(signed(m)))  # as if saved on a machine with `cores`
    return path


def _parse(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_dynamic_batch_model(tmp_path):
    a = _artifact(tmp_path, MODELS["conv"](), threads=1, cores=4)  # x[N,3,16,16] -> y[N,8,16,16]
    d = export_triton(a, tmp_path / "repo", max_batch_size=16, queue_delay_us=250)
    c = _parse(d)
    assert c.name == "tuned" and c.backend == "onnxruntime" and c.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in c.input] == [("x", model_config_pb2.TYPE_FP32, [3, 16, 16])]
    assert [(o.name, list(o.dims)) for o in c.output] == [("y", [8, 16, 16])]
    assert list(c.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8, 16]
    assert c.dynamic_batching.max_queue_delay_microseconds == 250
    assert c.instance_group[0].count == 4 and c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert c.parameters["intra_op_thread_count"].string_value == "1"
    assert (d / "1" / "model.onnx").read_bytes() == (a / "model.onnx").read_bytes()


def test_fixed_shape_model_is_not_batched_by_triton(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [2, "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [2, "seq"])
    proto = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "ids", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    c = _parse(export_triton(_artifact(tmp_path, proto), tmp_path / "repo", name="ids"))
    assert c.max_batch_size == 0 and not c.HasField("dynamic_batching")
    assert list(c.input[0].dims) == [2, -1] and c.input[0].data_type == model_config_pb2.TYPE_INT64


def test_gpu_artifact_is_served_on_gpu_instances_with_the_tensorrt_accelerator(tmp_path):
    from infertune.data import Dataset
    from infertune.quant.quantize import quantize

    m = Model.from_proto(MODELS["conv"]())
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    settings = backends.Settings(options={"fp16": "1", "workspace_mib": "256"})
    for model, backend, precision in ((m, "ort-tensorrt", "FP16"),
                                      (quantize(m, Dataset.from_arrays({"x": x}), target="tensorrt",
                                                stability_halves=0).model, "tensorrt", "INT8"),
                                      (m, "ort-cuda", None)):
        a = artifact.save_artifact(tmp_path / backend, model, source_sha256="0" * 64, settings=settings,
                                   backend=backend)
        c = _parse(export_triton(a, tmp_path / "repo"))
        assert c.backend == "onnxruntime" and c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        accelerators = c.optimization.execution_accelerators.gpu_execution_accelerator
        if precision is None:
            assert not accelerators
            continue
        (trt,) = accelerators
        assert trt.name == "tensorrt" and dict(trt.parameters) == {
            "precision_mode": precision, "max_workspace_size_bytes": str(256 * 2**20)}


def test_tampered_artifact_is_not_exported(tmp_path):
    a = _artifact(tmp_path, MODELS["conv"]())
    with open(a / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(artifact.ArtifactError, match="changed after saving"):
        export_triton(a, tmp_path / "repo")
    assert not (tmp_path / "repo" / "tuned").exists()


def test_cli_export_triton(tmp_path, capsys):
    from infertune.cli import main

    a = _artifact(tmp_path, MODELS["small_cnn"]())
    code = main(["export", "triton", str(a), "--repo", str(tmp_path / "repo"), "--name", "cnn", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and text_format.Parse(doc["config"], model_config_pb2.ModelConfig()).name == "cnn"
    code = main(["export", "triton", str(tmp_path / "missing"), "--repo", str(tmp_path / "repo")])
    assert code == 2 and "artifact not found" in capsys.readouterr().err


def test_bad_options(tmp_path):
    with pytest.raises(UsageError):
        export_triton(_artifact(tmp_path, MODELS["conv"]()), tmp_path / "repo", instances=0)
    assert not (tmp_path / "repo").exists()
