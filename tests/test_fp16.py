"""FP16 conversion: I/O kept, sensitive ops kept float32 by rule, fidelity measured with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import DIGITS
from infertune.data import Dataset
from infertune.errors import ModelError, UsageError
from infertune.model import Model
from infertune.quant.fp16 import to_fp16
from models import MODELS, _model, _w


def _run(m: Model, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.to_bytes(), providers=["CPUExecutionProvider"]).run(None, feed)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def layernorm_block() -> onnx.ModelProto:
    """x[N,16] -> MatMul -> Add bias -> LayerNormalization -> MatMul (shared weight W) -> Softmax."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
        helper.make_node("LayerNormalization", ["hb", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "W"], ["z"], name="mm2"),
        helper.make_node("Add", ["z", "big"], ["zb"], name="add_big"),
        helper.make_node("Softmax", ["zb"], ["y"], name="softmax", axis=-1),
    ]
    big = numpy_helper.from_array(np.where(np.arange(16) == 3, -1e9, 0).astype(np.float32), "big")
    inits = [_w("W", (16, 16), 20, 0.3), _w("b", (16,), 21), _w("gamma", (16,), 22), _w("beta", (16,), 23), big]
    return _model(nodes, [x], [y], inits, "layernorm_block")


@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("if_subgraph", "stateful_vad")])
def test_fp16_keeps_io_and_stays_close(name):
    m = Model.from_proto(MODELS[name]())
    r = to_fp16(m)
    onnx.checker.check_model(r.model.proto, full_check=True)
    assert [(i.name, i.dtype) for i in r.model.inputs] == [(i.name, i.dtype) for i in m.inputs]
    assert [(o.name, o.dtype) for o in r.model.outputs] == [(o.name, o.dtype) for o in m.outputs]
    feed = next(iter(Dataset.synthetic(m, samples=1, dims={"N": 2, "B": 1, "S": 4})))
    for ref, got in zip(_run(m, feed), _run(r.model, feed), strict=True):
        assert got.dtype == np.float32
        assert _cosine(ref, got) > 0.9999
    assert r.fp16_nodes


def test_reductions_stay_float32_and_shared_constants_are_copied():
    m = Model.from_proto(layernorm_block())
    r = to_fp16(m)
    assert set(r.fp32_nodes) == {"ln", "softmax"}
    assert set(r.fp16_nodes) == {"mm1", "bias", "mm2", "add_big"}
    nodes = {n.name: n for n in r.model.graph.node}
    inits = {t.name: t.data_type for t in r.model.graph.initializer}
    assert inits["W__fp16"] == TensorProto.FLOAT16 and "W" not in inits  # only fp16 readers: one fp16 copy
    assert inits["gamma"] == TensorProto.FLOAT  # read by the float32 LayerNorm
    assert nodes["ln"].input[0] == "hb" and nodes["mm2"].input[0] == "ln__fp16"
    assert r.clipped_values == 1 and r.warnings
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    ref, got = _run(m, {"x": x})[0], _run(r.model, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_keep_nodes_and_unknown_names():
    m = Model.from_proto(layernorm_block())
    r = to_fp16(m, keep_nodes=["mm2"])
    assert r.fp32_nodes["mm2"] == "kept float32 by name"
    with pytest.raises(UsageError, match="nope"):
        to_fp16(m, keep_nodes=["nope"])


def test_subgraph_nodes_stay_float32_and_run():
    m = Model.from_proto(MODELS["if_subgraph"]())
    r = to_fp16(m)
    assert r.fp32_nodes["then_relu"] == "inside an If/Loop/Scan subgraph"
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(r.model, {"x": x})[0], _run(m, {"x": x})[0], atol=1e-3)


def test_already_fp16_model_is_refused():
    m = Model.from_proto(layernorm_block())
    half = to_fp16(m, keep_fp32_ops=())
    proto = half.model.proto
    for vi in [*proto.graph.input, *proto.graph.output]:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    proto.graph.node.remove(next(n for n in proto.graph.node if n.name == "x_to_fp16"))
    for n in proto.graph.node:
        for i, t in enumerate(n.input):
            if t == "x__fp16":
                n.input[i] = "x"
    with pytest.raises(ModelError, match="no float32 tensor"):
        to_fp16(Model(proto=proto))


def test_digits_cnn_fp16_top1_matches_fp32():
    m = Model.load(DIGITS / "digits_cnn.onnx")
    with np.load(DIGITS / "test.npz") as z:
        x, labels = z["image"], z["label"]
    ref, got = _run(m, {"image": x})[0], _run(to_fp16(m).model, {"image": x})[0]
    assert _cosine(ref, got) > 0.99999
    assert np.mean(got.argmax(-1) == labels) == np.mean(ref.argmax(-1) == labels)
