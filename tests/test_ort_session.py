"""The ONNX Runtime session infertune creates runs a Q/DQ MatMul in its 8-bit kernel at static shapes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from infertune import backends
from infertune.backends.ort import disabled_optimizers
from infertune.data import Dataset
from infertune.model import Model
from infertune.quant.quantize import quantize
from models import linear_bias


def _optimized_ops(session_maker, tmp_path, name) -> tuple[Counter, np.ndarray]:
    path = tmp_path / f"{name}.onnx"
    out = session_maker(path)
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node), out


def test_qdq_matmul_with_bias_stays_8_bit_at_static_shapes(tmp_path):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(8)]
    q = quantize(Model.from_proto(linear_bias()), Dataset.from_iterable(feeds), method="minmax",
                 target="ort-cpu", weight_reduce_range=True, stability_halves=0).model
    static = q.with_input_shapes({"x": (1, 8, 16)})
    assert disabled_optimizers(static) == ["MatMulAddFusion"]
    assert disabled_optimizers(Model.from_proto(linear_bias((1, 8, 16)))) == []  # FP32 keeps every rewrite

    def ours(path):
        runner = backends.compile(static, backends.Settings(optimized_model_path=str(path)))
        return runner.run(feeds[0])["y"]

    def plain(path):  # what ORT does by default with the same file
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(path)
        return ort.InferenceSession(static.to_bytes(), so, providers=["CPUExecutionProvider"]).run(["y"], feeds[0])[0]

    kept, y_ours = _optimized_ops(ours, tmp_path, "ours")
    fused, y_plain = _optimized_ops(plain, tmp_path, "plain")
    # ORT's own default turns the MatMul + Add into a float Gemm fed by DequantizeLinear (the slow path) ...
    assert fused["Gemm"] == 1 and fused["DequantizeLinear"] >= 1 and fused["MatMulIntegerToFloat"] == 0
    # ... infertune's session runs it in the 8-bit kernel, with no DequantizeLinear left
    assert kept["MatMulIntegerToFloat"] == 1 and kept["Gemm"] == 0 and kept["DequantizeLinear"] == 0
    # both compute the same quantized product (the integer kernel is exact up to float rounding)
    np.testing.assert_allclose(y_ours, y_plain, rtol=1e-4, atol=1e-4)
    fp32 = backends.compile(Model.from_proto(linear_bias((1, 8, 16)))).run(feeds[0])["y"]
    assert np.abs(y_ours - fp32).max() < 0.05 * np.abs(fp32).max()  # and it is the model's product
