"""compare() against metrics computed independently with numpy on raw ORT outputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper

from infertune.analysis.compare import compare
from infertune.analysis.metrics import ErrorAccumulator, cosine
from infertune.data import Dataset
from infertune.errors import DataError, UsageError
from infertune.model import Model
from models import MODELS


def perturbed(name: str, scale: float, seed: int = 1) -> onnx.ModelProto:
    proto = MODELS[name]()
    rng = np.random.default_rng(seed)
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(
            (w + rng.standard_normal(w.shape) * scale).astype(w.dtype), init.name))
    return proto


def raw_run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])


def test_metrics_match_numpy_on_raw_outputs():
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    ref_p, cand_p = MODELS["conv"](), perturbed("conv", 0.05)
    r = raw_run(ref_p, x).astype(np.float64)
    c = raw_run(cand_p, x).astype(np.float64)
    res = compare(Model.from_proto(ref_p), Model.from_proto(cand_p),
                  Dataset.from_arrays({"x": x}), atol=1e-2, rtol=1e-2)
    m = res.outputs[0].metrics
    d = c - r
    assert m["max_abs"] == pytest.approx(np.abs(d).max(), rel=1e-9)
    assert m["mean_abs"] == pytest.approx(np.abs(d).mean(), rel=1e-9)
    nz = r != 0
    assert m["max_rel"] == pytest.approx((np.abs(d[nz]) / np.abs(r[nz])).max(), rel=1e-9)
    per_sample = [np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
                  for a, b in zip(r, c, strict=True)]
    assert m["cosine"] == pytest.approx(np.mean(per_sample), rel=1e-12)
    assert m["cosine_min"] == pytest.approx(np.min(per_sample), rel=1e-12)
    assert m["sqnr_db"] == pytest.approx(10 * np.log10((r**2).sum() / (d**2).sum()), rel=1e-9)
    assert m["allclose_frac"] == pytest.approx(np.isclose(c, r, rtol=1e-2, atol=1e-2).mean())
    assert 0.9 < m["cosine"] < 1.0 and res.samples == 6


def test_top1_agreement_and_label_accuracy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    ref_p, cand_p = MODELS["gemm"](), perturbed("gemm", 0.3)
    sr = ort.InferenceSession(ref_p.SerializeToString(), providers=["CPUExecutionProvider"])
    sc = ort.InferenceSession(cand_p.SerializeToString(), providers=["CPUExecutionProvider"])
    r, c = sr.run(None, {"x": x})[0], sc.run(None, {"x": x})[0]
    labels = r.argmax(-1).copy()
    labels[:5] = (labels[:5] + 1) % 10  # the reference is wrong on 5 of 40
    res = compare(Model.from_proto(ref_p), Model.from_proto(cand_p),
                  Dataset.from_arrays({"x": x, "label": labels}), checks=["top1_drop<=100"])
    agree = (r.argmax(-1) == c.argmax(-1)).mean()
    assert res.outputs[0].metrics["top1_agreement"] == pytest.approx(agree)
    assert res.accuracy["reference_top1"] == pytest.approx(100 * 35 / 40)
    cand_acc = 100 * (c.argmax(-1) == labels).mean()
    assert res.accuracy["candidate_top1"] == pytest.approx(cand_acc)
    assert res.accuracy["top1_drop"] == pytest.approx(100 * 35 / 40 - cand_acc)


def test_checks_pass_and_fail():
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref, cand = Model.from_proto(MODELS["conv"]()), Model.from_proto(perturbed("conv", 0.05))
    data = Dataset.from_arrays({"x": x})
    same = compare(ref, Model.from_proto(MODELS["conv"]()), data)
    assert same.passed and same.outputs[0].metrics["sqnr_db"] == math.inf
    default = compare(ref, cand, data)
    assert not default.passed and default.checks[0].check == "allclose_frac>=1"
    loose = compare(ref, cand, data, checks=["cosine>=0.9", "sqnr>=5"])
    assert loose.passed and [c.check for c in loose.checks] == ["cosine>=0.9", "sqnr_db>=5"]
    strict = compare(ref, cand, data, checks=["cosine>=0.99999"])
    assert not strict.passed
    with pytest.raises(UsageError, match="unknown metric"):
        compare(ref, cand, data, checks=["accuracy>=1"])
    with pytest.raises(UsageError, match="needs labels"):
        compare(ref, cand, data, checks=["top1_drop<=1"])


def test_reference_from_saved_outputs(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "ref.npz", y=raw_run(MODELS["conv"](), x))
    cand = Model.from_proto(perturbed("conv", 0.05))
    from_npz = compare(tmp_path / "ref.npz", cand, Dataset.from_arrays({"x": x}))
    from_model = compare(Model.from_proto(MODELS["conv"]()), cand, Dataset.from_arrays({"x": x}))
    assert from_npz.outputs[0].metrics == from_model.outputs[0].metrics
    np.savez(tmp_path / "short.npz", y=raw_run(MODELS["conv"](), x[:3]))
    with pytest.raises(DataError, match="has 3 rows"):
        compare(tmp_path / "short.npz", cand, Dataset.from_arrays({"x": x}))
    np.savez(tmp_path / "wrong.npz", z=raw_run(MODELS["conv"](), x))
    with pytest.raises(DataError, match="no array for output 'y'"):
        compare(tmp_path / "wrong.npz", cand, Dataset.from_arrays({"x": x}))


def test_interface_mismatch_is_named():
    with pytest.raises(DataError, match="different inputs"):
        compare(Model.from_proto(MODELS["two_inputs"]()), Model.from_proto(MODELS["conv"]()),
                Dataset.from_arrays({"x": np.zeros((1, 3, 16, 16), np.float32)}))
    with pytest.raises(DataError, match="no output named y"):
        compare(Model.from_proto(MODELS["gemm"]()), Model.from_proto(MODELS["conv"]()),
                Dataset.from_arrays({"x": np.zeros((1, 3, 16, 16), np.float32)}))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e3, 1e3, width=32)))
def test_cosine_of_a_vector_with_itself_is_one(v):
    assert cosine(v, v) == pytest.approx(1.0, abs=1e-9)
    acc = ErrorAccumulator()
    acc.add(v, v)
    m = acc.metrics()
    assert m["max_abs"] == 0 and m["allclose_frac"] == 1.0
