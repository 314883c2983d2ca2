"""INT8 on the bundled real example: top-1 against true labels, fusion, batch-size independence."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DIGITS
from infertune.analysis.compare import compare
from infertune.data import Dataset, batched
from infertune.quant.fusion import fusion_report
from infertune.quant.quantize import quantize

MODEL = DIGITS / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def calib() -> Dataset:
    with np.load(DIGITS / "calib.npz") as z:
        return Dataset.from_arrays({"image": z["image"][:64]})


@pytest.mark.parametrize("method", ["auto", "minmax", "entropy", "percentile", "mse"])
def test_int8_top1_drop_within_half_a_point(calib, method):
    r = quantize(MODEL, calib, method=method, stability_halves=0)
    result = compare(MODEL, r.model, batched(Dataset.from_npz(DIGITS / "test.npz"), 60))
    assert result.accuracy["labelled"] == 360
    assert result.accuracy["top1_drop"] <= 0.5, result.accuracy
    assert result.outputs[0].metrics["cosine"] > 0.999


def test_every_conv_and_gemm_runs_in_int8(calib):
    rep = fusion_report(quantize(MODEL, calib, stability_halves=0).model)
    assert rep.float_compute == 0 and rep.ops["QLinearConv"] == 3 and rep.ops["QGemm"] == 2, rep.ops
    assert rep.unfused_quantize + rep.unfused_dequantize == rep.boundary == 2


def test_scales_identical_for_calibration_batch_sizes_1_8_32(calib):
    recipes = [quantize(MODEL, calib, method="auto", batch_size=b, stability_halves=0).recipe.tensors
               for b in (1, 8, 32)]
    scales = [{t: (e["scale"], e["zero_point"]) for t, e in r.items()} for r in recipes]
    assert scales[0] == scales[1] == scales[2]
