"""Layerwise compare, sensitivity and mixed precision on a model with one planted sensitive layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infertune import Budget, Evaluator, QuantSpace, meet_budget, sensitivity
from infertune.analysis.layerwise import layerwise, tensor_map
from infertune.checks import Check
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.model import Model
from infertune.quant.fp16 import to_fp16
from infertune.quant.quantize import quantize
from models import _model, _w


def planted() -> onnx.ModelProto:
    """x -> conv_a -> relu -> scale (Div, float: one channel x200) -> conv_b -> relu -> conv_c -> y.

    The scaled tensor 's' has one channel 200x louder than the rest: quantized per tensor for
    conv_b's input it leaves the other channels a handful of levels. conv_b compensates with a
    tiny weight on that channel, so the float model is well behaved."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])
    divisor = np.ones((1, 8, 1, 1), np.float32)
    divisor[0, 5] = 1 / 200
    wb = (np.random.default_rng(31).standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    wb[:, 5] /= 200
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Div", ["ra", "divisor"], ["s"], name="scale"),
        helper.make_node("Conv", ["s", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["rb", "wc", "bc"], ["y"], name="conv_c", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
    ]
    inits = [_w("wa", (8, 4, 3, 3), 30, 0.3), _w("ba", (8,), 32, 0.1), numpy_helper.from_array(divisor, "divisor"),
             numpy_helper.from_array(wb, "wb"), _w("bb", (8,), 33, 0.1), _w("wc", (8, 8, 3, 3), 34, 0.3),
             _w("bc", (8,), 35, 0.1)]
    return _model(nodes, [x], [y], inits, "planted")


@pytest.fixture(scope="module")
def setup():
    m = Model.from_proto(planted())
    rng = np.random.default_rng(0)
    calib = Dataset.from_arrays({"x": rng.standard_normal((32, 4, 8, 8)).astype(np.float32)})
    feeds = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(16)]
    q = quantize(m, calib, method="minmax", observe_all=True, stability_halves=0)
    return m, q, feeds


def test_layerwise_names_the_planted_tensor_first(setup):
    m, q, feeds = setup
    assert tensor_map(m, q.model)["s"] == "s_dequantized"
    lw = layerwise(m, q.model, Dataset.from_iterable(feeds), threshold_db=20)
    assert [t.tensor for t in lw.tensors][:3] == ["a", "ra", "s"]  # topological order
    # 's' itself keeps a high SQNR (its loud channel dominates the signal power); the damage shows
    # where conv_b turns the crushed quiet channels into its output
    d = lw.first_divergence
    assert (d.tensor, d.node, d.op_type) == ("b", "conv_b", "Conv")
    assert d.upstream_db > 30 > 20 > d.sqnr_db
    assert lw.message() == (f"divergence starts at node conv_b (Conv), tensor b: {d.upstream_db:.1f} dB upstream, "
                            f"{d.sqnr_db:.1f} dB here")
    assert lw.largest_drops(1)[0].node == "conv_b"


def test_layerwise_on_fp16_maps_the_fp16_tensors(setup):
    m, _, feeds = setup
    half = to_fp16(m).model
    assert tensor_map(m, half)["s"] == "s__fp16"
    lw = layerwise(m, half, Dataset.from_iterable(feeds))
    assert lw.first_divergence is None and min(t.sqnr_db for t in lw.tensors) > 40


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_sensitivity_ranks_the_planted_layer_first(setup, mode):
    m, q, feeds = setup
    space = QuantSpace(m, q)
    assert space.groups == ["conv_a", "conv_b", "conv_c"]
    r = sensitivity(space, Evaluator(m, feeds), mode=mode)
    assert r.ranking[0] == "conv_b", r.to_dict()
    assert r.forward_passes == (1 + 1 + 3 if mode == "exact" else 1 + 2)
    assert r.baseline["sqnr_db"] < 25


def test_exact_sensitivity_on_openvino_evaluates_there(setup, monkeypatch):
    pytest.importorskip("openvino")
    m, _, feeds = setup
    rng = np.random.default_rng(0)
    calib = Dataset.from_arrays({"x": rng.standard_normal((32, 4, 8, 8)).astype(np.float32)})
    space = QuantSpace(m, quantize(m, calib, method="minmax", target="openvino", observe_all=True,
                                   stability_halves=0))
    ev = Evaluator(m, feeds)
    assert ev.ref_outputs and ev.passes == 1  # the float reference: ONNX Runtime, computed on first use
    ran_on = []
    real = ev.run
    monkeypatch.setattr(ev, "run", lambda model, backend="ort": ran_on.append(backend) or real(model, backend))
    r = sensitivity(space, ev, mode="exact", backend="openvino")
    assert r.ranking[0] == "conv_b" and ran_on == ["openvino"] * (1 + len(space.groups))
    with pytest.raises(UsageError, match="rank on openvino with --mode exact"):
        sensitivity(space, ev, mode="fast", backend="openvino")


def test_mixed_precision_excludes_it_and_meets_the_budget(setup):
    m, q, feeds = setup
    space = QuantSpace(m, q)
    ev = Evaluator(m, feeds)
    ranking = sensitivity(space, ev, mode="fast").ranking
    r = meet_budget(space, ev, Budget.parse("sqnr>=30"), ranking, latency=False)
    assert r.met and r.chosen.excluded == ("conv_b",)
    assert r.steps[0].excluded == () and not r.steps[0].met
    assert r.chosen.metrics["sqnr_db"] >= 30
    # the returned model is the chosen variant: conv_b float, conv_a and conv_c in INT8
    dq_readers = {n.name for n in r.model.graph.node for i in n.input if i.endswith("_dequantized")}
    assert {"conv_a", "conv_c"} <= dq_readers and "conv_b" not in dq_readers


def test_mixed_precision_does_not_take_a_step_that_meets_the_budget_only_by_luck(setup):
    m, q, feeds = setup
    space = QuantSpace(m, q)
    ev = Evaluator(m, feeds)
    one_float = ev.evaluate(space.build(["conv_b"]))["sqnr_db"]
    r = meet_budget(space, ev, Budget.parse(f"sqnr>={one_float - 0.01:.4f}"), ["conv_b", "conv_a", "conv_c"],
                    latency=False)
    edge = next(s for s in r.steps if s.excluded == ("conv_b",))
    assert edge.metrics["sqnr_db"] >= one_float - 0.01 and not edge.met and "too close to call" in edge.note
    assert r.met and len(r.chosen.excluded) >= 2


def test_unreachable_budget_reports_the_best_reachable(setup):
    m, q, feeds = setup
    space = QuantSpace(m, q)
    ev = Evaluator(m, feeds)
    # out of reach even in float: Budget.parse refuses it, the library still reports the best reachable
    r = meet_budget(space, ev, Budget(Check("cosine", ">=", 1.5)), ["conv_b", "conv_a", "conv_c"], latency=False)
    assert not r.met and r.best.excluded == ("conv_b", "conv_a", "conv_c")
    with pytest.raises(UsageError):
        Budget.parse("speed>=3")
    with pytest.raises(UsageError, match="labels"):
        meet_budget(space, ev, Budget.parse("top1_drop<=0.5"), ["conv_b"], latency=False)


@pytest.fixture
def planted_files(tmp_path):
    model = tmp_path / "planted.onnx"
    onnx.save(planted(), str(model))
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float32))
    return model, data


def test_cli_sensitivity_layerwise_and_budget(planted_files, tmp_path, capsys):
    import json

    from infertune.cli import main

    model, data = planted_files
    assert main(["sensitivity", str(model), "--data", str(data), "--method", "minmax", "--mode", "exact",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups"][0]["node"] == "conv_b" and doc["mode"] == "exact"
    q = tmp_path / "q.onnx"
    assert main(["quantize", str(model), "--data", str(data), "--method", "minmax", "-o", str(q)]) == 0
    capsys.readouterr()
    assert main(["compare", str(model), str(q), "--data", str(data), "--layerwise", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["first_divergence"]["node"] == "conv_b"
    b = tmp_path / "b.onnx"
    assert main(["quantize", str(model), "--data", str(data), "--method", "minmax", "--budget", "sqnr>=30",
                 "--json", "-o", str(b)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["budget"]["met"] and doc["budget"]["chosen"]["excluded"] == ["conv_b"]
    assert "conv_b" in doc["float_nodes"] and b.exists()
    never = tmp_path / "never.onnx"
    assert main(["quantize", str(model), "--data", str(data), "--method", "minmax", "--budget", "cosine>=1.5",
                 "-o", str(never)]) == 2
    assert "cannot be met even by the FP32 model" in capsys.readouterr().err and not never.exists()


def _ort_qdq_nsr(x: np.ndarray, scale, zp, axis: int | None = None) -> float:
    """Oracle: ONNX Runtime's own QuantizeLinear -> DequantizeLinear on x."""
    import onnxruntime as ort

    attrs = {} if axis is None else {"axis": axis}
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.asarray(scale, np.float32), "s"), numpy_helper.from_array(zp, "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(np.sum((x.astype(np.float64) - y) ** 2) / np.sum(x.astype(np.float64) ** 2))


def test_fast_mode_noise_terms_match_onnx_runtime_qdq(setup):
    from infertune.analysis.noise_propagation import ActivationNoise, weight_nsr

    m, q, feeds = setup
    space = QuantSpace(m, q)
    full = space.build()
    consts = {i.name: numpy_helper.to_array(i) for i in full.graph.initializer}
    noise = ActivationNoise(full)
    assert noise.params, "the Q/DQ model has activation Q/DQ"
    known = set(m.tensor_order()) | {i.name for i in m.inputs}
    names = [t for t in noise.params if t in known]  # what layerwise exposes: the float model's tensors
    assert names
    exposed = backends_run(m, [t for t in names if t not in {i.name for i in m.inputs}], feeds)
    for f in exposed:
        noise.add(f)
    got = noise.nsr()
    for t in names:
        q = next(n for n in full.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == t)
        x = np.concatenate([f[t] for f in exposed])
        assert got[t] == pytest.approx(_ort_qdq_nsr(x, consts[q.input[1]], consts[q.input[2]]), rel=1e-4, abs=1e-12)
    w_nsr = weight_nsr(space.source, full)
    src = space.source.constant_tensors()
    for n in full.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in consts:
            reader = next(r for r in full.graph.node if n.output[0] in r.input)
            w = src[n.input[0].removesuffix("_quantized")].astype(np.float32)
            axis = next((a.i for a in n.attribute if a.name == "axis"), None)
            per_channel = consts[n.input[1]].size > 1
            oracle = _ort_qdq_nsr(w, consts[n.input[1]], consts[n.input[2]], axis if per_channel else None)
            assert w_nsr[reader.name] == pytest.approx(oracle, rel=1e-3, abs=1e-12)


def backends_run(model, names, feeds):
    from infertune import backends

    runner = backends.compile(model.with_outputs(names, keep_original=False))
    return [{**f, **runner.run(f)} for f in feeds]


def _spearman(a: list[str], b: list[str]) -> float:
    pos = {x: i for i, x in enumerate(a)}
    return float(np.corrcoef([pos[x] for x in b], np.arange(len(b)))[0, 1])


def _masked_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Sequences of 8 to 15 valid positions out of 16: the rest masked with float32 min, as BERT does."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        mask = np.zeros((1, 1, 16), np.float32)
        mask[..., rng.integers(8, 16):] = np.finfo(np.float32).min
        feeds.append({"x": rng.standard_normal((1, 16, 32)).astype(np.float32), "mask": mask})
    return feeds


def test_fast_ranking_follows_exact_through_a_masked_attention_block():
    """The mask's huge values own the power of the scores + mask sum, so its NSR says nothing:
    the gain is measured across the Softmax. q @ k^T reads two quantized activations, and the
    query, key and value projections share one quantized input, each through its own path."""
    from models import masked_attention

    m = Model.from_proto(masked_attention())
    q = quantize(m, Dataset.from_iterable(_masked_feeds(32, 0)), method="minmax", observe_all=True,
                 stability_halves=0)
    space = QuantSpace(m, q)
    assert set(space.groups) == {"query", "key", "value", "scores", "context", "out_proj"}
    from infertune.analysis.noise_propagation import noise_probe

    probe = noise_probe(m, space.build())  # the residual reads x in float in the Q/DQ model, and so in the probe
    assert sorted(n.name for n in probe.graph.node if "x" in n.input) == ["residual", "x/probe_div"]
    feeds = _masked_feeds(16, 1)
    exact = sensitivity(space, Evaluator(m, feeds), mode="exact")
    ev = Evaluator(m, feeds)
    fast = sensitivity(space, ev, mode="fast")
    assert fast.ranking[0] == exact.ranking[0] == "scores"
    assert _spearman(exact.ranking, fast.ranking) >= 0.8, (exact.to_dict(), fast.to_dict())
    # three passes: the float model (every tensor exposed: also the reference), the probe, the baseline
    assert fast.forward_passes == 3 and ev.passes == 1
    direct = Evaluator(m, feeds).ref_outputs
    for adopted, ran in zip(ev.ref_outputs, direct, strict=True):
        np.testing.assert_allclose(adopted["y"], ran["y"], rtol=1e-5, atol=1e-5)
    assert fast.baseline["cosine"] == pytest.approx(exact.baseline["cosine"], abs=1e-6)


def test_noise_probe_rounds_each_quantized_activation_at_a_sixteenth_of_its_step(setup):
    from infertune.analysis.noise_propagation import PROBE_STEP, activation_qdq, noise_probe

    m, q, feeds = setup
    full = QuantSpace(m, q).build()
    params = {t: p for t, p in activation_qdq(full).items() if t in m.value_info()}  # not the renamed output
    probe = noise_probe(m, full)
    assert {n.op_type for n in probe.graph.node}.isdisjoint({"QuantizeLinear", "DequantizeLinear"})  # weights float
    assert set(params) >= {"x", "ra", "s"}
    for t in params:
        assert tensor_map(m, probe)[t] == f"{t}_dequantized"
        readers = [n.name for n in probe.graph.node if t in n.input]
        assert readers == [f"{t}/probe_div"], "every reader of a quantized tensor reads the rounded one"
        assert ({n.name for n in probe.graph.node if f"{t}_dequantized" in n.input}
                == {n.name for n in full.graph.node if f"{t}_dequantized" in n.input})
    exposed = [n for t in params for n in (t, f"{t}_dequantized") if t != "x"] + ["x_dequantized"]
    from infertune import backends

    runner = backends.compile(probe.with_outputs(exposed, keep_original=False))
    for f in feeds[:4]:
        out = {**f, **runner.run(f)}
        for t, (scale, *_) in params.items():
            step = np.float32(scale * PROBE_STEP)
            np.testing.assert_allclose(out[f"{t}_dequantized"], np.rint(out[t] / step) * step, rtol=1e-6, atol=1e-7)
