"""Split-range activations (quant.algorithms.range_split): FP32 outputs unchanged, the quantized model's
error against FP32 lower, the parts' ranges kept as split, the recipe rebuilt without data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from infertune import backends
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.model import Model
from infertune.quant.algorithms import AlgorithmOptions, Context, range_split
from infertune.quant.placement import TARGETS
from infertune.quant.qdq import ensure_opset
from infertune.quant.quantize import quantize, rebuild
from infertune.quant.recipe import Recipe
from models import MODELS, tailed_feeds


def _model() -> Model:
    return Model.from_proto(MODELS["tailed_convnet"]())


def _outputs(m: Model, feeds: list[dict]) -> np.ndarray:
    runner = backends.compile(m, backends.Settings(graph_optimization="disable"))
    return np.concatenate([runner.run(f)["y"] for f in feeds]).astype(np.float64)


def test_the_split_leaves_fp32_outputs_unchanged_and_reads_both_parts_with_the_same_weight():
    m = ensure_opset(_model())
    feeds = tailed_feeds(12)
    step = range_split.apply(Context(model=m, target="openvino", reduce_range=False,
                                     data=Dataset.from_iterable(feeds)))
    onnx.checker.check_model(step.model.proto, full_check=True)
    (entry,) = step.record["splits"]
    assert entry["tensor"] == "a" and entry["layers"] == ["conv2"]
    assert entry["split"] * range_split.MIN_GAIN <= entry["one"]
    ref, got = _outputs(m, feeds), _outputs(step.model, feeds)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    readers = [n for n in step.model.graph.node if n.op_type == "Conv" and n.input[1] == "w2"]
    assert sorted(n.input[0] for n in readers) == ["a" + range_split.HIGH, "a" + range_split.LOW]
    assert sum(len(n.input) == 3 for n in readers) == 1  # the bias is added once


def test_the_noise_it_predicts_is_the_noise_numpy_measures_and_a_flat_tensor_is_not_split():
    rng = np.random.default_rng(0)
    tail = np.abs(rng.standard_normal(50_000)) * np.where(rng.random(50_000) < 0.01, 40.0, 1.0)
    got = range_split.choose(tail, TARGETS["openvino"])
    t = got["threshold"]
    assert 0 < t < tail.max() and got["split"] * range_split.MIN_GAIN <= got["one"]

    def measured(v, lo, hi):  # 8-bit Q/DQ over [lo, hi], written out independently
        scale = (hi - lo) / 255
        zero = np.round(-lo / scale)
        return (np.clip(np.round(v / scale) + zero, 0, 255) - zero) * scale

    low = measured(np.minimum(tail, t), 0.0, t)
    # the upper part's range is the best of the clips, so its error is at most the full range's
    high = measured(np.maximum(tail - t, 0), 0.0, tail.max() - t)
    assert got["split"] <= np.mean((low + high - tail) ** 2) / tail.var() * (1 + 1e-9)
    assert got["one"] <= np.mean((measured(tail, 0.0, tail.max()) - tail) ** 2) / tail.var() * (1 + 1e-9)
    flat = rng.uniform(0, 1, 50_000)
    plain = range_split.choose(flat, TARGETS["openvino"])
    assert plain["split"] * range_split.MIN_GAIN > plain["one"]  # at most one bit more: not worth its layers


@pytest.mark.parametrize("target", ["openvino", "ort-cpu"])
def test_the_quantized_model_is_closer_to_fp32_and_the_parts_keep_their_ranges(target):
    """conv1 kept float: the input's own spikes would otherwise cost more than the activation's tail."""
    m = _model()
    calib, held = tailed_feeds(16), tailed_feeds(16, seed=9)
    ref = _outputs(m, held)

    def run(algorithms):
        r = quantize(m, Dataset.from_iterable(calib), target=target, algorithms=algorithms, stability_halves=0,
                     exclude=["conv1"])
        return r, float(np.sum((_outputs(r.model, held) - ref) ** 2))

    (_, before), (split, after) = run(()), run(("range_split",))
    assert after < 0.5 * before
    (record,) = split.recipe.algorithms
    t = record["splits"][0]["threshold"]
    low = split.recipe.tensors["a" + range_split.LOW]
    assert low["max"] == pytest.approx(t) and low["method"] == "minmax"  # no clip: the parts meet at T
    assert split.recipe.tensors["a" + range_split.HIGH]["min"] == 0.0
    g = split.model.graph
    producers = {o: n for n in g.node for o in n.output}
    (total,) = [n for n in g.node if n.op_type == "Add" and n.output[0] == "y"]
    # OpenVINO's placement puts no Q/DQ between the partial sums and their Add (a residual Add would get
    # them); ONNX Runtime's gives each convolution its output Q, as QLinearConv computes
    want = ["Conv", "Conv"] if target == "openvino" else ["DequantizeLinear", "DequantizeLinear"]
    assert [producers[i].op_type for i in total.input] == want


def test_range_refinement_leaves_the_parts_alone_and_the_recipe_rebuilds_without_data():
    m = _model()
    r = quantize(m, Dataset.from_iterable(tailed_feeds(8)), algorithms=("range_split", "range_refinement",
                                                                        "bias_correction"),
                 stability_halves=0, algorithm_options=AlgorithmOptions(range_samples=4))
    split, refined, _ = r.recipe.algorithms
    assert split["splits"] and not any(range_split.is_part(t) for t in refined["refined"])
    assert refined["tensors"] == sum(not range_split.is_part(t) for t in r.plan.activations)
    again = rebuild(m, Recipe.from_dict(json.loads(json.dumps(r.recipe.to_dict()))))
    assert again.model.to_bytes() == r.model.to_bytes()


def test_no_split_when_asked_for_none():
    m = _model()
    r = quantize(m, Dataset.from_iterable(tailed_feeds(4)), algorithms=("range_split",), stability_halves=0,
                 algorithm_options=AlgorithmOptions(split_tensors=0))
    assert r.recipe.algorithms[0]["splits"] == [] and r.recipe.algorithms[0]["candidates"] == 1
    with pytest.raises(UsageError, match="split_tensors"):
        AlgorithmOptions(split_tensors=-1)


def test_smoothquant_runs_after_the_split_and_leaves_its_parts_alone():
    """Asked in either order, the split comes first (a tail inside every channel is not SmoothQuant's to
    flatten): the tailed activation is still split, SmoothQuant smooths none of the parts, and the recipe
    rebuilds the same bytes."""
    m = _model()
    r = quantize(m, Dataset.from_iterable(tailed_feeds(8)), target="openvino",
                 algorithms=("smoothquant", "range_split"), stability_halves=0)
    split, smooth = r.recipe.algorithms
    assert (split["name"], smooth["name"]) == ("range_split", "smoothquant")
    assert split["splits"] and not any(range_split.is_part(g["tensor"]) for g in smooth["groups"])
    assert not any(range_split.is_part(t) for t in smooth["skipped"])
    again = rebuild(m, Recipe.from_dict(json.loads(json.dumps(r.recipe.to_dict()))))
    assert again.model.to_bytes() == r.model.to_bytes()
