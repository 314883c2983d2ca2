"""Per-layer 7-bit weights (quant.pair_overflow): the int16 pair sums it counts against a brute-force count,
and against ONNX Runtime's own int8 kernels, which saturate those sums on CPUs without VNNI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from infertune.data import Dataset
from infertune.fingerprint import cpu
from infertune.model import Model
from infertune.quant import pair_overflow
from infertune.quant.qparams import QParams, quantize_weight_per_channel
from infertune.quant.quantize import VNNI_FLAGS, quantize, rebuild
from infertune.quant.recipe import Recipe

VNNI = any(f in cpu()["isa"] for f in VNNI_FLAGS)


def _conv(cin: int, cout: int = 8, groups: int = 1, seed: int = 0) -> Model:
    w = np.random.default_rng(seed).normal(0, 1, (cout, cin // groups, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 12, 12])
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], group=groups)
    g = helper.make_graph([node], "conv", [x], [y], [numpy_helper.from_array(w, "w"),
                                                     numpy_helper.from_array(np.zeros(cout, np.float32), "b")])
    return Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _matmul(k: int = 10, n: int = 6) -> Model:
    w = np.random.default_rng(0).normal(0, 1, (k, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm", [x], [y],
                          [numpy_helper.from_array(w, "w")])
    return Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _feeds(m: Model, lo: float = -1.0, hi: float = 1.0, n: int = 4, spike: float | None = None) -> list[dict]:
    rng = np.random.default_rng(1)
    shape = [d if isinstance(d, int) else 1 for d in m.inputs[0].shape]
    feeds = []
    for _ in range(n):
        x = rng.uniform(lo, hi, shape).astype(np.float32)
        if spike is not None:
            x.flat[int(rng.integers(x.size))] = spike
        feeds.append({"x": x})
    return feeds


def _brute_force(m: Model, q, feeds: list[dict]) -> tuple[int, int]:
    """(pair sums, overflows) of the one layer, every output position of every feed, by loops: the kernels'
    reduction order is (tap, input channel) with channels innermost, consecutive elements paired."""
    rec = q.recipe.tensors["x"]
    scale, zp = rec["scale"], rec["zero_point"] + (128 if rec["dtype"] == "int8" else 0)  # s8 runs as u8 + 128
    node = m.graph.node[0]
    w = m.constant_tensors()[node.input[1]]
    axis = 0 if node.op_type == "Conv" else 1
    wq = quantize_weight_per_channel(w, axis, dtype="int8")[0].astype(np.int64)
    pairs = overflows = 0
    for f in feeds:
        a = np.clip(np.rint(f["x"] / np.float32(scale)) + zp, 0, 255).astype(np.int64)
        if node.op_type == "MatMul":
            rows = [(a[0, t], wq.T) for t in range(a.shape[1])]  # K vector per token, weights [N, K]
        else:
            groups = next((at.i for at in node.attribute if at.name == "group"), 1)
            cg, og = wq.shape[1], wq.shape[0] // groups
            x = np.pad(a[0], ((0, 0), (1, 1), (1, 1)), constant_values=zp)
            rows = []
            for gi in range(groups):
                wg = wq[gi * og:(gi + 1) * og].transpose(0, 2, 3, 1).reshape(og, -1)  # [O, (tap, channel)]
                for i in range(a.shape[2]):
                    for j in range(a.shape[3]):
                        patch = x[gi * cg:(gi + 1) * cg, i:i + 3, j:j + 3].transpose(1, 2, 0).reshape(-1)
                        rows.append((patch, wg))
        for vec, wk in rows:
            for o in range(wk.shape[0]):
                for k in range(0, vec.size - 1, 2):
                    s = vec[k] * wk[o, k] + vec[k + 1] * wk[o, k + 1]
                    pairs += 1
                    overflows += abs(s) > 32767
    return pairs, overflows


@pytest.mark.parametrize("make", [lambda: _conv(1), lambda: _conv(3), lambda: _conv(4), lambda: _conv(8, groups=2),
                                  lambda: _matmul()], ids=["conv-1ch", "conv-3ch", "conv-4ch", "grouped", "matmul"])
def test_pair_sums_counted_as_a_brute_force_loop_counts_them(make):
    m = make()
    feeds = _feeds(m)
    q = quantize(m, Dataset.from_iterable(feeds), target="ort-cpu", weight_reduce_range=False, stability_halves=0)
    qparams = {t: QParams.from_dict(q.recipe.tensors[t]) for t in q.plan.activations}
    layers = pair_overflow.measure(m, q.plan, qparams, Dataset.from_iterable(feeds), samples=len(feeds),
                                   positions=10**6)
    assert len(layers) == 1
    pairs, overflows = _brute_force(m, q, feeds)
    assert (layers[0].pairs, layers[0].overflows) == (pairs, overflows)
    assert overflows > 0  # inputs around the zero point 128 through full-scale weights do overflow


@pytest.mark.parametrize("make", [lambda: _conv(3), lambda: _matmul()], ids=["conv-3ch", "matmul"])
def test_int8_activations_are_measured_as_the_kernels_shift_them_to_uint8(make):
    """OpenVINO gives a balanced range int8 with zero point 0; without VNNI oneDNN adds 128 to run it as u8,
    so the pairs overflow as they would for u8 around 128."""
    m = make()
    feeds = _feeds(m)
    q = quantize(m, Dataset.from_iterable(feeds), target="openvino", weight_reduce_range=False, stability_halves=0)
    assert q.recipe.tensors["x"]["dtype"] == "int8" and q.recipe.tensors["x"]["zero_point"] == 0
    qparams = {t: QParams.from_dict(q.recipe.tensors[t]) for t in q.plan.activations}
    layers = pair_overflow.measure(m, q.plan, qparams, Dataset.from_iterable(feeds), samples=len(feeds),
                                   positions=10**6)
    assert len(layers) == 1
    pairs, overflows = _brute_force(m, q, feeds)
    assert (layers[0].pairs, layers[0].overflows) == (pairs, overflows) and overflows > 0


def test_depthwise_convolutions_have_no_pairs_to_measure(monkeypatch):
    """One input channel per group: the kernels widen to 16 bits and add in 32, nothing to pair."""
    import infertune.quant.quantize as qz

    monkeypatch.setattr(qz, "cpu", lambda: {"isa": ["avx2", "fma"]})
    m = _conv(8, cout=8, groups=8)
    q = quantize(m, Dataset.from_iterable(_feeds(m)), target="ort-cpu", stability_halves=0)
    assert q.recipe.weight_reduce_range == frozenset()
    assert q.recipe.pair_overflow == []


def _exact_and_runtime(model: Model, feed: dict) -> tuple[np.ndarray, np.ndarray]:
    """The Q/DQ model computed as written (graph optimisation off) and by ONNX Runtime's int8 kernels."""
    off = ort.SessionOptions()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = ort.InferenceSession(model.to_bytes(), off, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    fast = ort.InferenceSession(model.to_bytes(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return exact, fast


@pytest.mark.parametrize("cin", [1, 3, 16])
def test_seven_bits_where_onnx_runtime_saturates_make_its_int8_kernels_exact(monkeypatch, cin):
    """Inputs around zero point 128 through full-scale weights: without VNNI, ONNX Runtime's kernels saturate
    the 8-bit model's pair sums (outputs off by whole units); the per-layer choice gives this layer 7 bits and
    the kernels then compute what the file says. The choice is made as on a CPU without VNNI on any CPU."""
    import infertune.quant.quantize as qz

    monkeypatch.setattr(qz, "cpu", lambda: {"isa": ["avx2", "fma"]})
    m = _conv(cin)
    feeds = _feeds(m)
    data = Dataset.from_iterable(feeds)
    per_layer = quantize(m, data, target="ort-cpu", stability_halves=0)
    assert per_layer.recipe.weight_reduce_range == frozenset({"w"})
    assert per_layer.recipe.pair_overflow[0]["seven_bit"]
    exact, fast = _exact_and_runtime(per_layer.model, feeds[0])
    np.testing.assert_allclose(fast, exact, rtol=0, atol=1e-5 * float(np.abs(exact).max()))
    if not VNNI:  # the oracle for the measurement: ONNX Runtime's kernels saturate the 8-bit file here
        eight = quantize(m, data, target="ort-cpu", weight_reduce_range=False, stability_halves=0)
        exact8, fast8 = _exact_and_runtime(eight.model, feeds[0])
        assert np.abs(exact8 - fast8).max() > 0.05 * float(np.abs(exact8).max())


def test_small_activations_keep_8_bit_weights(monkeypatch):
    """Activations far below their range's top (a rare spike sets the scale): no pair reaches int16's limit."""
    import infertune.quant.quantize as qz

    monkeypatch.setattr(qz, "cpu", lambda: {"isa": ["avx2", "fma"]})
    m = _conv(16)
    feeds = _feeds(m, 0.0, 0.1, spike=0.5)
    q = quantize(m, Dataset.from_iterable(feeds), target="ort-cpu", stability_halves=0)
    assert q.recipe.weight_reduce_range == frozenset()
    assert q.weight_bits() == "8-bit: no int16 pair sum overflows"
    w = [numpy_helper.to_array(i) for i in q.model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert max(int(np.abs(x.astype(np.int32)).max()) for x in w) == 127
    exact, fast = _exact_and_runtime(q.model, feeds[0])
    np.testing.assert_allclose(fast, exact, rtol=0, atol=1e-5 * float(np.abs(exact).max()))


def test_the_recipe_keeps_the_per_layer_choice_and_rebuilds_the_same_model(monkeypatch, tmp_path):
    import infertune.quant.quantize as qz

    monkeypatch.setattr(qz, "cpu", lambda: {"isa": ["avx2", "fma"]})
    m = _conv(3)
    q = quantize(m, Dataset.from_iterable(_feeds(m)), target="ort-cpu", stability_halves=0)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(q.recipe.to_dict()))
    again = Recipe.load(path)
    assert again.weight_reduce_range == frozenset({"w"})
    assert rebuild(m, again).model.to_bytes() == q.model.to_bytes()


def test_a_layout_it_does_not_pair_gets_7_bits_as_before(monkeypatch):
    """OpenVINO quantizes ConvTranspose, whose kernel this module does not model: 7 bits, said why."""
    import infertune.quant.quantize as qz

    monkeypatch.setattr(qz, "cpu", lambda: {"isa": ["avx2", "fma"]})
    w = np.random.default_rng(0).normal(0, 1, (4, 6, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 14, 14])
    g = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up")], "up", [x], [y],
                          [numpy_helper.from_array(w, "w")])
    m = Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    q = quantize(m, Dataset.from_iterable(_feeds(m)), target="openvino", stability_halves=0)
    assert q.recipe.weight_reduce_range == frozenset({"w"})
    (entry,) = q.recipe.pair_overflow
    assert entry["seven_bit"] and entry["unmeasured"] == "ConvTranspose with this weight layout"


@pytest.mark.parametrize("attrs", [{"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                                   {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
                                   {"auto_pad": "SAME_UPPER", "strides": [3, 1]}, {"auto_pad": "VALID"},
                                   {"pads": [0, 1, 2, 1], "strides": [1, 2], "dilations": [2, 1]}, {}],
                         ids=["same-upper-s2", "same-lower-s2", "same-upper-s3", "valid", "pads", "none"])
def test_the_patches_it_pairs_are_the_convolutions_onnx_runtime_computes(attrs):
    """Every output position's patch (padding with the zero point, as the kernels pad) against the integer
    weights gives ONNX Runtime's own convolution of the same integers: the same values per output channel."""
    rng = np.random.default_rng(0)
    zp, cin, cout, size = 128, 3, 4, (7, 6)
    a = rng.integers(0, 256, (1, cin, *size)).astype(np.int32)
    q = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(q.astype(np.float32), "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": (a - zp).astype(np.float32)})[0]
    patches, w, groups = pair_overflow._conv_patches(node, a, q, zp, rng, positions=10**6)
    got = np.einsum("ptc,otc->po", (patches - zp).astype(np.float64), w.astype(np.float64))
    assert groups == 1 and got.shape[0] == want.shape[2] * want.shape[3]
    assert np.array_equal(np.sort(got, axis=0), np.sort(want[0].reshape(cout, -1).T.astype(np.float64), axis=0))
