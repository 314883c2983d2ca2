"""Graph preparation before quantization: every rewrite against ONNX Runtime's outputs of the
original graph (and numpy for BatchNormalization folding); INT8 placed in the prepared graph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from infertune import Budget, Evaluator, backends, tune
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.model import Model
from infertune.quant import prepare as prep_mod
from infertune.quant.fusion import fusion_report
from infertune.quant.prepare import prepare
from infertune.quant.quantize import quantize, rebuild
from infertune.quant.recipe import Recipe
from models import MODELS

DECOMPOSED = {"BatchNormalization", "Clip", "Div", "Erf", "Tanh", "Pow", "Add"}


def _feeds(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal(shape) * 2).astype(np.float32)} for _ in range(n)]


def _ort(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _consts(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


@pytest.mark.parametrize("name, shape", [("paddle_block", (1, 3, 12, 12)), ("activations", (1, 4, 8, 8))])
def test_every_rewrite_reproduces_the_original_on_onnx_runtime(name, shape):
    source = MODELS[name]()
    r = prepare(Model.from_proto(source), _feeds(shape))
    assert r.prepared and not r.refused and r.max_rel_error < 1e-5
    ops = Counter(n.op_type for n in r.model.graph.node)
    if name == "paddle_block":  # 3 BN (2 after Conv, 1 after Gemm), HardSwish in both orders, opset 11
        assert ops == {"Conv": 2, "HardSwish": 2, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
        assert r.model.opset == 14  # HardSwish needs 14
    else:  # HardSigmoid gate, Swish's x * 1.0 gone, GELU erf and tanh forms
        assert ops == {"Conv": 5, "HardSigmoid": 1, "Mul": 2, "Sigmoid": 1, "Gelu": 2}
        assert r.model.opset == 20  # Gelu needs 20
        assert {n.attribute[0].s for n in r.model.graph.node if n.op_type == "Gelu" and n.attribute} == {b"tanh"}
    for feed in _feeds(shape, 3, seed=1):  # ORT on the original graph as written is the oracle
        for a, b in zip(_ort(source, feed), _ort(r.model.proto, feed), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_batchnorm_folding_matches_numpy_and_keeps_the_conv_name():
    source = MODELS["paddle_block"]()
    r = prepare(Model.from_proto(source), _feeds((1, 3, 12, 12)))
    before, after = _consts(source), _consts(r.model.proto)
    conv = next(n for n in r.model.graph.node if n.op_type == "Conv" and n.name == "b1_conv")  # the Conv's name
    k = before["b1_scale"] / np.sqrt(before["b1_var"] + 1e-5)
    np.testing.assert_allclose(after[conv.input[1]], before["b1_w"] * k[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(after[conv.input[2]], before["b1_bias"] - before["b1_mean"] * k, rtol=1e-5, atol=1e-6)
    gemm = next(n for n in r.model.graph.node if n.op_type == "Gemm")  # Gemm(transB) -> BN: rows of W scaled
    k = before["fc_scale"] / np.sqrt(before["fc_var"] + 1e-5)
    np.testing.assert_allclose(after[gemm.input[1]], before["fc_w"] * k[:, None], rtol=1e-5)
    np.testing.assert_allclose(after[gemm.input[2]], (before["fc_b"] - before["fc_mean"]) * k + before["fc_bias"],
                               rtol=1e-5, atol=1e-6)
    assert "b1_bn" in r.removed and "BatchNormalization" not in {n.op_type for n in r.model.graph.node}


def test_a_prepared_graph_that_changes_the_outputs_is_refused(monkeypatch):
    real = prep_mod.rewrite

    def off_by_one_percent(proto):
        out, steps = real(proto)
        w = next(t for t in out.graph.initializer if t.dims and len(t.dims) == 4)
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
        return out, steps

    monkeypatch.setattr(prep_mod, "rewrite", off_by_one_percent)
    source = Model.from_proto(MODELS["paddle_block"]())
    r = prepare(source, _feeds((1, 3, 12, 12)))
    assert not r.prepared and r.model is source and "differ from the source's" in r.refused
    q = quantize(source, Dataset.from_iterable(_feeds((1, 3, 12, 12))), stability_halves=0)
    assert not q.recipe.prepared and any("refused" in w for w in q.warnings)


@pytest.mark.parametrize("name, shape", [("paddle_block", (1, 3, 12, 12)), ("activations", (1, 4, 8, 8))])
def test_int8_on_ort_leaves_no_batchnorm_or_decomposed_activation_between_qdq(name, shape):
    source = Model.from_proto(MODELS[name]())
    calib = Dataset.from_iterable(_feeds(shape))
    prepared = fusion_report(quantize(source, calib, stability_halves=0).model).ops  # prepare: on for ort-cpu
    plain = fusion_report(quantize(source, calib, stability_halves=0, prepare=False).model).ops
    assert DECOMPOSED & set(plain)  # without preparation they run in float in ONNX Runtime's optimized graph
    assert not DECOMPOSED & set(prepared), prepared
    assert prepared["QuantizeLinear"] <= plain["QuantizeLinear"]
    assert prepared.get("QLinearConv") == plain.get("QLinearConv")


def test_the_recipe_rebuilds_the_prepared_int8_model_and_old_recipes_still_load():
    source = Model.from_proto(MODELS["paddle_block"]())
    q = quantize(source, Dataset.from_iterable(_feeds((1, 3, 12, 12))), stability_halves=0)
    assert q.recipe.prepared and q.summary()["preparation"]["prepared"]
    again = rebuild(source, Recipe.from_dict(q.recipe.to_dict()))
    assert again.model.to_bytes() == q.model.to_bytes()
    old = {k: v for k, v in q.recipe.to_dict().items() if k not in ("prepared", "preparation")}
    assert not Recipe.from_dict(old).prepared
    trt = quantize(source, Dataset.from_iterable(_feeds((1, 3, 12, 12))), stability_halves=0, target="tensorrt")
    assert not trt.recipe.prepared  # TensorRT folds at build time: its placement keeps the graph as exported


def test_an_exclusion_of_a_node_preparation_removed_says_what_became_of_it():
    source = Model.from_proto(MODELS["paddle_block"]())
    calib = Dataset.from_iterable(_feeds((1, 3, 12, 12)))
    with pytest.raises(UsageError, match="b1_bn: graph preparation removed that node .folded into"):
        quantize(source, calib, stability_halves=0, exclude=["b1_bn"])
    kept = quantize(source, calib, stability_halves=0, exclude=["b1_conv"])  # the Conv kept its name
    assert "b1_conv" in kept.plan.float_nodes and kept.recipe.prepared


def test_tune_tries_the_prepared_fp32_graph_and_places_int8_in_it(tmp_path, monkeypatch):
    source = Model.from_proto(MODELS["paddle_block"]())
    evaluator = Evaluator(source, _feeds((1, 3, 12, 12), 16, seed=3), settings=backends.Settings(intra_op_threads=1))
    r = tune(source, Dataset.from_iterable(_feeds((1, 3, 12, 12))), evaluator, Budget.parse("cosine>=0.9"),
             run_dir=tmp_path / "run", threads=(1,), latency_s=0.1)
    fp32 = {t.spec.prepared: t for t in r.trials if t.spec.precision == "fp32"}
    assert set(fp32) == {False, True} and fp32[True].met
    assert fp32[True].spec.label() == "FP32, prepared, 1 thread" and fp32[True].model_file
    assert all(t.spec.prepared for t in r.trials if t.spec.precision == "int8")
    assert any("graph preparation: opset 11 -> 14" in d for d in r.decisions)
    plain = tune(source, Dataset.from_iterable(_feeds((1, 3, 12, 12))), evaluator, Budget.parse("cosine>=0.9"),
                 run_dir=tmp_path / "plain", threads=(1,), latency_s=0.1, prepare=False)
    assert not any(t.spec.prepared for t in plain.trials)


def test_trial_keys_recorded_before_preparation_still_match_and_prepared_ones_differ():
    import hashlib
    import json

    from infertune.search.trials import TrialSpec

    old = {"precision": "int8", "method": "auto", "exclude": ["a"], "threads": 1, "opt": "all", "backend": "ort",
           "target": "ort-cpu"}  # a journal line's spec from before TrialSpec.prepared
    key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    spec = TrialSpec.from_dict(old)
    assert spec.key == key and not spec.prepared
    prepared = TrialSpec("int8", "auto", ("a",), 1, prepared=True)
    assert prepared.key != key and TrialSpec.from_dict(prepared.to_dict()) == prepared


def test_no_prepared_fp32_candidate_on_a_runtime_whose_compiler_prepares_itself(tmp_path):
    """OpenVINO folds BatchNormalization and fuses decomposed activations when it compiles: FP32 of the
    prepared graph is no other candidate there (INT8 is still placed in the prepared graph)."""
    pytest.importorskip("openvino")
    source = Model.from_proto(MODELS["paddle_block"]())
    evaluator = Evaluator(source, _feeds((1, 3, 12, 12), 16, seed=3), settings=backends.Settings(intra_op_threads=1))
    r = tune(source, Dataset.from_iterable(_feeds((1, 3, 12, 12))), evaluator, Budget.parse("cosine>=0.9"),
             run_dir=tmp_path / "run", threads=(1,), latency_s=0.1, runtimes=("ort", "openvino"))
    fp32 = {(t.spec.backend, t.spec.prepared) for t in r.trials if t.spec.precision == "fp32"}
    assert fp32 == {("ort", False), ("ort", True), ("openvino", False)}
    assert any("not on OpenVINO, whose compiler folds and fuses the same itself" in d for d in r.decisions)
    assert all(t.spec.prepared for t in r.trials if t.spec.precision == "int8")


def test_an_algorithm_set_that_keeps_the_float_graph_reuses_the_plain_calibration(monkeypatch):
    """Bias correction and learned rounding run after calibration, on the same float graph: the plain
    variant's statistics give the same model as calibrating again; CLE rewrites the graph: it calibrates."""
    from infertune.quant import quantize as quantize_mod

    source = Model.from_proto(MODELS["paddle_block"]())
    calib = Dataset.from_iterable(_feeds((1, 3, 12, 12), 16))
    plain = quantize(source, calib, stability_halves=0, observe_all=True)
    fresh = quantize(source, calib, stability_halves=0, observe_all=True, algorithms=("bias_correction",))
    calls = []
    real = quantize_mod.calibrate
    monkeypatch.setattr(quantize_mod, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    reused = quantize(source, calib, stability_halves=0, observe_all=True, algorithms=("bias_correction",),
                      calibration=plain.calibration)
    assert calls == [] and reused.calibration is plain.calibration
    assert reused.model.proto.SerializeToString() == fresh.model.proto.SerializeToString()
    cle = quantize(source, calib, stability_halves=0, observe_all=True, algorithms=("cle",),
                   calibration=plain.calibration)
    assert calls == [1] and cle.calibration is not plain.calibration
