"""Validator of TensorRT's explicit-quantization rules for a Q/DQ ONNX model.

From TensorRT's documentation of IQuantizeLayer / IDequantizeLayer and "Explicit Quantization":

1. scale and zero point are build-time constants (initializers or Constant nodes);
2. the zero point is int8 and all zeros (TensorRT quantizes symmetrically);
3. scales are positive and finite;
4. activations are quantized per tensor (scalar scale); per-channel (1-D scale) only for
   constant weights, along the output-channel axis of the op that reads them
   (Conv: 0, ConvTranspose: 1, Gemm: 0 with transB else 1, MatMul: last);
5. int8 weights lie in [-127, 127] (the weight range is symmetric; -128 is not allowed);
6. a quantized Conv/ConvTranspose/Gemm/MatMul has all its data inputs dequantized (one left in
   float makes TensorRT run the layer in float, silently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from infertune.model import Model
from infertune.quant.placement import WEIGHT_INPUT, weight_axis


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}: {self.detail}"


def validate_tensorrt(model: Model) -> list[Violation]:
    consts = model.constant_tensors()
    producers = model.producers()
    out: list[Violation] = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            out += _check_qdq(node, consts)
    for node in model.graph.node:
        if node.op_type in WEIGHT_INPUT:
            out += _check_compute(node, consts, producers)
    return out


def _check_qdq(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[Violation]:
    v: list[Violation] = []
    scale_name = node.input[1]
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if scale_name not in consts:
        return [Violation(node.name, "constant scale", f"scale '{scale_name}' is not a constant")]
    scale = consts[scale_name]
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        v.append(Violation(node.name, "positive scale", f"scale '{scale_name}' holds a value <= 0 or non-finite"))
    if zp_name is not None:
        if zp_name not in consts:
            v.append(Violation(node.name, "constant zero point", f"zero point '{zp_name}' is not a constant"))
        else:
            zp = consts[zp_name]
            if zp.dtype != np.int8:
                v.append(Violation(node.name, "int8", f"zero point '{zp_name}' is {zp.dtype}, TensorRT needs int8"))
            if np.any(zp != 0):
                v.append(Violation(node.name, "zero point 0", f"zero point '{zp_name}' is not all zeros"))
    if scale.ndim > 1:
        v.append(Violation(node.name, "scale shape", f"scale '{scale_name}' has rank {scale.ndim} (block "
                                                     "quantization is int4-only)"))
    if scale.size > 1:
        data = node.input[0]
        if node.op_type == "QuantizeLinear" or data not in consts:
            v.append(Violation(node.name, "per-tensor activations",
                               f"activation '{data}' has a per-channel scale ({scale.size} values)"))
        else:
            w = consts[data]
            if w.dtype == np.int8 and w.size and w.min() < -127:
                v.append(Violation(node.name, "weight range", f"int8 weight '{data}' holds -128; "
                                                              "TensorRT weights are in [-127, 127]"))
    return v


def _check_compute(node: onnx.NodeProto, consts: dict[str, np.ndarray],
                   producers: dict[str, onnx.NodeProto]) -> list[Violation]:
    data_inputs = [i for i in node.input[:2] if i]
    dq = {i: producers[i] for i in data_inputs if i in producers and producers[i].op_type == "DequantizeLinear"}
    if not dq:
        return []  # a float layer: allowed
    v = [Violation(node.name, "all inputs quantized", f"input '{i}' is float while another input is dequantized")
         for i in data_inputs if i not in dq]
    w_idx = WEIGHT_INPUT[node.op_type]
    if w_idx < len(node.input) and node.input[w_idx] in dq:
        deq = dq[node.input[w_idx]]
        scale = consts.get(deq.input[1])
        weight = consts.get(deq.input[0])
        if scale is not None and weight is not None and scale.size > 1:
            axis = next((helper.get_attribute_value(a) for a in deq.attribute if a.name == "axis"), 1)
            want = weight_axis(node, weight.ndim)
            if axis % weight.ndim != want:
                v.append(Violation(node.name, "per-channel axis",
                                   f"weight '{deq.input[0]}' is quantized along axis {axis}, its output channels "
                                   f"are axis {want}"))
    return v
