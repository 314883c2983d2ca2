"""Q/DQ placement and writing, ONNX Runtime fusion, TensorRT rules, recipes and the quantize CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from infertune.cli import main
from infertune.data import Dataset
from infertune.errors import CalibrationError, ModelError, UsageError
from infertune.model import Model
from infertune.quant.fusion import fusion_report
from infertune.quant.placement import Exclusions, plan, weight_axis
from infertune.quant.qparams import dequantize, quantize_weight_per_channel
from infertune.quant.quantize import quantize, rebuild
from infertune.quant.recipe import SCHEMA_VERSION, Recipe
from infertune.quant.trt_rules import validate_tensorrt
from models import MODELS


def _model(name: str) -> Model:
    return Model.from_proto(MODELS[name]())


def _data(m: Model, n: int = 16) -> Dataset:
    return Dataset.synthetic(m, samples=n, seed=0, dims={"N": 2, "B": 1, "S": 4})


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run(m: Model, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.to_bytes(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("name", ["conv", "grouped_conv", "gemm", "attention", "reshape_matmul", "small_cnn"])
@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_quantized_models_are_checker_clean_and_close_to_float(name, target):
    m = _model(name)
    r = quantize(m, _data(m), target=target, stability_halves=0)
    onnx.checker.check_model(r.model.proto, full_check=True)
    assert [i.name for i in r.model.inputs] == [i.name for i in m.inputs]
    assert [o.name for o in r.model.outputs] == [o.name for o in m.outputs]
    feed = next(iter(_data(m, 1)))
    for ref, got in zip(_run(m, feed), _run(r.model, feed), strict=True):
        assert _cosine(ref, got) > 0.99
    ops = {n.op_type for n in r.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("op,shape,attrs,axis", [
    ("Conv", (8, 3, 3, 3), {}, 0),
    ("ConvTranspose", (4, 6, 2, 2), {}, 1),
    ("Gemm", (10, 32), {"transB": 1}, 0),
    ("Gemm", (32, 10), {}, 1),
    ("MatMul", (24, 5), {}, 1),
    ("MatMul", (2, 24, 5), {}, 2),
])
def test_weight_axis_is_the_output_channel_axis(op, shape, attrs, axis):
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    assert weight_axis(node, len(shape)) == axis
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    w[(slice(None),) * axis + (0,)] *= 100  # one loud channel must not coarsen the others
    q, scales, zps = quantize_weight_per_channel(w, axis)
    assert q.dtype == np.int8 and q.min() >= -127 and not zps.any() and scales.shape == (shape[axis],)
    bshape = [1] * w.ndim
    bshape[axis] = -1
    err = np.abs(dequantize(q, scales.reshape(bshape), 0) - w)
    assert (err <= scales.reshape(bshape) / 2 * 1.0001).all()
    assert scales[1:].max() < scales[0] / 10


def test_ort_cpu_placement_fuses_into_int8_kernels():
    """Verified on the graph ONNX Runtime actually runs: every Conv/Gemm fused, Q/DQ only at the edges."""
    m = _model("small_cnn")
    r = quantize(m, _data(m), stability_halves=0)
    rep = fusion_report(r.model)
    assert rep.float_compute == 0, rep.ops
    assert rep.ops.get("QLinearConv") == 2 and rep.ops.get("QGemm") == 1, rep.ops
    assert rep.ops.get("QLinearAdd") == 1 and rep.ops.get("QLinearGlobalAveragePool") == 1, rep.ops
    assert rep.unfused_quantize + rep.unfused_dequantize == rep.boundary == 2, rep.ops
    # relu absorbed into the conv's output Q; the pool and flatten share their input's parameters
    assert set(r.plan.absorbed) == {"relu1", "relu2"}
    assert r.plan.shared == {"p1": "r1", "flat": "gap"}


def test_tensorrt_output_passes_the_validator_and_int8_symmetric():
    m = _model("small_cnn")
    r = quantize(m, _data(m), target="tensorrt", stability_halves=0)
    assert validate_tensorrt(r.model) == []
    consts = r.model.constant_tensors()
    for n in r.model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert consts[n.input[2]].dtype == np.int8 and not consts[n.input[2]].any()
    # TensorRT's rules: Q/DQ on the residual Add's inputs and on the pool, none on conv outputs by themselves
    assert "residual" in r.plan.quantized_nodes and "gap" in r.plan.quantized_nodes


def _edit(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(proto.graph.initializer):
        if t.name == name:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))


def test_tensorrt_validator_catches_each_rule():
    m = _model("conv")
    good = quantize(m, _data(m), target="tensorrt", stability_halves=0).model
    assert validate_tensorrt(good) == []
    cases = {
        "zero point 0": lambda p: _edit(p, "x_zero_point", np.array(3, np.int8)),
        "positive scale": lambda p: _edit(p, "x_scale", np.array(-1.0, np.float32)),
        "per-channel axis": lambda p: [a.CopyFrom(helper.make_attribute("axis", 1)) for n in p.graph.node
                                       if n.name == "w_DequantizeLinear" for a in n.attribute if a.name == "axis"],
        "weight range": lambda p: _edit(p, "w_quantized", np.full((8, 3, 3, 3), -128, np.int8)),
        "all inputs quantized": lambda p: [n.input.__setitem__(0, "x") for n in p.graph.node if n.name == "conv"],
        "int8": lambda p: _edit(p, "x_zero_point", np.array(0, np.uint8)),
    }
    for rule, mutate in cases.items():
        proto = onnx.ModelProto()
        proto.CopyFrom(good.proto)
        mutate(proto)
        found = {v.rule for v in validate_tensorrt(Model(proto=proto))}
        assert rule in found, (rule, found)


def test_exclusions_keep_nodes_float_with_reasons():
    m = _model("small_cnn")
    p = plan(m, "ort-cpu", Exclusions.parse(["conv2", "op:Gemm", "re:^gap$"]))
    assert p.float_nodes == {"conv2": "excluded by name", "fc": "excluded by op type Gemm",
                             "gap": "excluded by regex '^gap$'"}
    assert "conv2" not in p.quantized_nodes and "fc" not in p.quantized_nodes
    with pytest.raises(UsageError, match="names no node: nope"):
        plan(m, "ort-cpu", Exclusions.parse(["nope"]))


def test_nonfinite_tensor_leaves_its_readers_float():
    m = _model("masked_matmul")
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((16, 2, 8)) < 0.3, -np.inf, 0).astype(np.float32)
    data = Dataset.from_iterable([{"x": rng.standard_normal((2, 8)).astype(np.float32), "mask": mask[i]}
                                  for i in range(16)])
    r = quantize(m, data, stability_halves=0)
    assert "masked_mm" in r.plan.float_nodes and "non-finite" in r.plan.float_nodes["masked_mm"]
    assert r.plan.quantized_nodes == ["plain_mm"]
    assert any("non-finite" in w for w in r.warnings)
    assert r.recipe.auto_exclusions.keys() == {"masked_mm"}
    rebuilt = rebuild(m, r.recipe)
    assert rebuilt.model.to_bytes() == r.model.to_bytes()


def test_nothing_to_quantize_is_an_error():
    m = _model("if_subgraph")
    with pytest.raises(CalibrationError, match="nothing to quantize"):
        quantize(m, _data(m))


def test_recipe_rebuilds_the_same_model_and_edits_take_effect(tmp_path):
    m = _model("small_cnn")
    r = quantize(m, _data(m), method="auto", stability_halves=2)
    d = json.loads(json.dumps(r.recipe.to_dict()))
    assert d["schema_version"] == SCHEMA_VERSION and d["tensors"]["x"]["method"] == "minmax"
    again = rebuild(m, Recipe.from_dict(d))
    assert again.model.to_bytes() == r.model.to_bytes()
    d["tensors"]["r1"]["max"] *= 2
    edited = rebuild(m, Recipe.from_dict(d))
    scale = {t.name: numpy_helper.to_array(t) for t in edited.model.graph.initializer}["r1_scale"]
    assert float(scale) == pytest.approx(2 * r.recipe.tensors["r1"]["scale"], rel=1e-5)
    other = _model("conv")
    with pytest.raises(ModelError, match="made for a model"):
        rebuild(other, Recipe.from_dict(d))
    d["tensors"]["r1"]["min"] = 100.0
    with pytest.raises(UsageError, match="min 100.0 > max"):
        Recipe.from_dict(d)


def test_quantize_cli_writes_model_and_recipe(tmp_path, model_file, capsys):
    src = model_file("small_cnn")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "--data", str(data), "--method", "entropy", "--json", "-o", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    recipe = json.load(open(doc["recipe"]))
    used = [t for t, e in recipe["tensors"].items() if e["used"]]
    assert doc["quantized_nodes"] == 7 and doc["methods"] == {"entropy": len(used)} == {"entropy": 6}
    assert set(recipe["tensors"]) == set(used)
    assert doc["fusion"]["float_compute"] == 0
    assert out.exists() and (tmp_path / "q.recipe.json").exists()
    out2 = tmp_path / "r.onnx"
    assert main(["quantize", str(src), "--recipe", str(tmp_path / "q.recipe.json"), "-o", str(out2)]) == 0
    assert out2.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--method", "fast"], "fast"),
    (["--exclude", "nope"], "names no node"),
    (["--target", "gpu"], "gpu"),
    (["--override", "x"], "bad method override"),
])
def test_quantize_cli_bad_usage_exits_2_without_output(tmp_path, model_file, capsys, args, message):
    src = model_file("small_cnn")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), *args, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "q.recipe.json").exists()
    assert not list(tmp_path.glob(".q*"))


def test_quantize_cli_nothing_to_quantize_exits_2(tmp_path, model_file, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model_file("if_subgraph")), "-o", str(out)]) == 2
    assert "nothing to quantize" in capsys.readouterr().err
    assert not out.exists()


def test_observe_all_lets_the_recipe_rebuild_any_exclusion_set():
    m = _model("small_cnn")
    full = quantize(m, _data(m), observe_all=True, stability_halves=0)
    assert {"c1", "c2"} <= set(full.recipe.tensors) - set(full.used_tensors())  # pre-ReLU conv outputs
    from dataclasses import replace

    excluded = rebuild(m, replace(full.recipe, exclusions=["relu1"]))  # c1 now needs its own range
    assert "relu1" not in excluded.plan.absorbed and "c1" in excluded.plan.activations
    direct = quantize(m, _data(m), exclude=["relu1"], stability_halves=0)
    assert excluded.model.to_bytes() == direct.model.to_bytes()
    partial = quantize(m, _data(m), stability_halves=0)
    with pytest.raises(ModelError, match="no range for tensor"):
        rebuild(m, replace(partial.recipe, exclusions=["relu1"]))


def test_the_same_plan_gives_the_same_bytes_in_every_process(tmp_path):
    """String hashing differs between processes: no set iteration order may reach the written graph."""
    import subprocess
    import sys

    # four convs whose outputs are graph outputs: each is 8-bit after its producer and read by no
    # quantized node, so only the plan's set of such tensors orders their Q/DQ parameters
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), f"w{i}") for i in range(4)]
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"y{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]) for i in range(4)]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 12, 12])
    ys = [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [None, 4, 12, 12]) for i in range(4)]
    g = helper.make_graph(nodes, "outs", [x], ys, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    code = (
        "import hashlib, sys, numpy as np\n"
        "from infertune.data import Dataset\n"
        "from infertune.quant.quantize import quantize\n"
        "x = np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32)\n"
        f"r = quantize({str(tmp_path / 'm.onnx')!r}, Dataset.from_arrays({{'x': x}}), method='minmax',"
        " stability_halves=0)\n"
        "assert len(r.plan.replaced - set(r.plan.consumers_q)) >= 4, r.plan.replaced\n"
        "print(hashlib.sha256(r.model.proto.SerializeToString()).hexdigest())\n")
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        digests.add(p.stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("isa,target,per_layer", [
    (["avx2", "fma"], "ort-cpu", True),
    (["avx2", "fma"], "openvino", True),  # OpenVINO's CPU kernels saturate the same way without VNNI
    (["avx2", "fma"], "tensorrt", False),  # a GPU: no int16 pair sums
    (["avx2", "avx512_vnni"], "ort-cpu", False),
    (["avx2", "avx_vnni"], "openvino", False),
])
def test_weight_bits_are_chosen_per_layer_for_cpu_targets_without_vnni(monkeypatch, isa, target, per_layer):
    """Without VNNI the u8 x s8 pair sums are measured (tests/test_pair_overflow.py); with it, or on a GPU,
    every weight is 8-bit. ``weight_reduce_range`` True / False forces 7 / 8 bits everywhere."""
    import infertune.quant.quantize as q

    monkeypatch.setattr(q, "cpu", lambda: {"isa": isa})
    m = _model("conv")
    r = quantize(m, _data(m), target=target, stability_halves=0)
    assert isinstance(r.recipe.weight_reduce_range, frozenset) is per_layer
    assert (r.recipe.pair_overflow is not None) is per_layer
    if not per_layer:
        assert r.recipe.weight_reduce_range is False
    for forced, peak in ((True, 63), (False, 127)):
        f = quantize(m, _data(m), target=target, stability_halves=0, weight_reduce_range=forced)
        assert f.recipe.weight_reduce_range is forced and f.recipe.pair_overflow is None
        weights = [numpy_helper.to_array(i) for i in f.model.graph.initializer
                   if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
        assert weights
        # the widest channel of each weight reaches the grid's end
        assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == peak


def _one_matmul(k: int = 16, n: int = 8) -> Model:
    w = np.random.default_rng(0).normal(0, 1, (k, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6, k])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6, n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm", [x], [y],
                          [numpy_helper.from_array(w, "w")])
    return Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


@pytest.mark.parametrize("lo,hi,dtype,zero_point_is_0", [
    (-1.0, 1.0, "int8", True),  # balanced: zero point 0 costs nothing
    (-0.9, 1.0, "int8", True),  # the step widens 1.06x
    (-0.1, 1.0, "uint8", False),  # one-sided (a SiLU's output): zero point 0 would double the step
    (0.0, 1.0, "uint8", True),  # non-negative: zero point 0 already
])
def test_openvino_activations_drop_the_zero_point_where_the_range_is_balanced(lo, hi, dtype, zero_point_is_0):
    m = _one_matmul()
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.uniform(lo, hi, (1, 6, 16)).astype(np.float32)} for _ in range(8)]
    for f in feeds:  # the calibrated range is exactly [lo, hi]
        f["x"].flat[:2] = [lo, hi]
    q = quantize(m, Dataset.from_iterable(feeds), method="minmax", target="openvino", stability_halves=0)
    rec = q.recipe.tensors["x"]
    assert rec["dtype"] == dtype and (rec["zero_point"] == 0) == zero_point_is_0
    plain = (hi - lo) / 255
    assert rec["scale"] <= 1.25 * plain * (1 + 1e-6)  # never more than 1.25x the asymmetric step
    # the file computes what the recipe says: numpy's Q/DQ of x and of the weights, then the product
    s, zp = np.float32(rec["scale"]), rec["zero_point"]
    qmin, qmax = (-128, 127) if dtype == "int8" else (0, 255)
    wq, ws, _ = quantize_weight_per_channel(m.constant_tensors()["w"], 1)
    sess = ort.InferenceSession(q.model.to_bytes(), providers=["CPUExecutionProvider"])
    for f in feeds:
        xq = (np.clip(np.rint(f["x"] / s) + zp, qmin, qmax) - zp) * s
        want = xq @ dequantize(wq, ws[None, :], 0)
        np.testing.assert_allclose(sess.run(None, f)[0], want, rtol=1e-5, atol=1e-5)


def test_a_recipe_rebuilds_each_range_as_the_kind_it_recorded():
    """A recipe written before OpenVINO's balanced ranges became int8 recorded uint8: it rebuilds uint8 with the
    zero point it had, not what the rule chooses now; one written now rebuilds the same bytes."""
    m = _one_matmul()
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.uniform(-1, 1, (1, 6, 16)).astype(np.float32)} for _ in range(8)]
    q = quantize(m, Dataset.from_iterable(feeds), method="minmax", target="openvino", stability_halves=0)
    assert q.recipe.tensors["x"]["dtype"] == "int8"
    assert rebuild(m, Recipe.from_dict(q.recipe.to_dict())).model.to_bytes() == q.model.to_bytes()
    old = q.recipe.to_dict()
    old["tensors"]["x"] = {k: v for k, v in old["tensors"]["x"].items() if k not in ("scale", "zero_point")}
    old["tensors"]["x"]["dtype"] = "uint8"
    rebuilt = rebuild(m, Recipe.from_dict(old))
    zp = next(numpy_helper.to_array(i) for i in rebuilt.model.graph.initializer if i.name == "x_zero_point")
    assert zp.dtype == np.uint8 and 120 < int(zp) < 136  # [-1, 1] in uint8: zero point about 128
    assert rebuilt.recipe.tensors["x"]["dtype"] == "uint8"


@pytest.mark.parametrize("padded_rule", [True, False])
def test_the_padded_convolution_rule_drops_only_the_zero_point_a_padded_convolution_reads(monkeypatch, padded_rule):
    """silu_convnet: x (signed, one-sided) -> 3x3 padded conv1 -> SiLU -> r1 (one-sided) -> 1x1 conv2. With
    ``symmetric_padded`` x becomes int8 with zero point 0 although that doubles its step; r1, read only by the
    unpadded conv2, keeps uint8 and its zero point. Without it (OpenVINO's default) both keep theirs. The file
    holds what the recipe says, and the recipe records the kind: rebuild gives the same bytes."""
    import dataclasses

    import infertune.quant.placement as placement_module

    rules = dataclasses.replace(placement_module.TARGETS["openvino"], symmetric_padded=padded_rule)
    monkeypatch.setitem(placement_module.TARGETS, "openvino", rules)
    m = Model.from_proto(MODELS["silu_convnet"]())
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.uniform(-0.3, 1.0, (1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    q = quantize(m, Dataset.from_iterable(feeds), method="minmax", target="openvino", stability_halves=0)
    x, r1 = q.recipe.tensors["x"], q.recipe.tensors["r1"]
    assert r1["dtype"] == "uint8" and r1["zero_point"] != 0
    if padded_rule:
        assert x["dtype"] == "int8" and x["zero_point"] == 0
        assert x["scale"] == pytest.approx(float(x["max"]) / 127, rel=1e-6)  # max(|lo|, hi) / 127: the doubled step
    else:
        assert x["dtype"] == "uint8" and x["zero_point"] != 0
    inits = {i.name: i for i in q.model.proto.graph.initializer}
    q_of_x = next(n for n in q.model.proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert inits[q_of_x.input[2]].data_type == (onnx.TensorProto.INT8 if padded_rule else onnx.TensorProto.UINT8)
    assert rebuild(m, Recipe.from_dict(q.recipe.to_dict())).model.to_bytes() == q.model.to_bytes()


@pytest.mark.parametrize("attrs,padded", [
    ({"pads": [1, 1, 1, 1]}, True), ({"pads": [0, 0, 0, 0]}, False), ({}, False),
    ({"auto_pad": "SAME_UPPER"}, True), ({"auto_pad": "VALID"}, False), ({"auto_pad": "NOTSET"}, False),
])
def test_padded_conv_inputs_reads_pads_and_auto_pad(attrs, padded):
    from infertune.quant.placement import padded_conv_inputs

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 6, 6])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, None, None])
    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)], "g", [x], [y],
                          [w])
    m = Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert padded_conv_inputs(m) == ({"x"} if padded else set())
