"""Bias correction: each quantized layer's bias minus the mean output shift quantization causes.

For a layer y = W x + b whose weights quantize to W_q (round-to-nearest or learned rounding), the
shift per output channel is E[W_q x] - E[W x] = (W_q - W) E[x] over the calibration data (Nagel et
al., 2019); the corrected bias is b - shift. The layer is linear, so the mean needs only sums of
the input: for MatMul / Gemm the sum of its rows, for Conv the sum of the padded input at every
kernel tap (``ConvGeometry.offset_sums``): O(channels x kernel) numbers per layer, added up batch
by batch in float64, so memory does not grow with the data and the result does not depend on the
batch size. One pass over the data for all layers, on the float model.

The shift of the input's own Q/DQ (clipping, rounding) is left out on purpose: counting it too
(E[W_q fq(x)] - E[W x], as NNCF's fast bias correction does) removed each layer's mean shift in
isolation but made rapidocr's recognition model worse as a whole, where correcting the weights'
shift alone made it better.

A layer without a bias gets one (Conv's third input, Gemm's C, an Add after a MatMul whose output
stays float). Only layers the plan quantizes are corrected; ``replay`` applies the recorded
shifts, skipping layers an exclusion set keeps in float.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from infertune.errors import CalibrationError
from infertune.quant.algorithms.base import Context, Step
from infertune.quant.algorithms.graph import GraphEditor, attr
from infertune.quant.algorithms.streaming import ConvGeometry, matrix_rows, stream
from infertune.quant.placement import WeightUse
from infertune.quant.qparams import dequantize, quantize_weight_per_channel

NAME = "bias_correction"
STAGE = "bias"


class _Sums:
    """Running sums of one layer's input: its rows (MatMul / Gemm) or its padded input per kernel tap (Conv)."""

    def __init__(self, node: onnx.NodeProto, use: WeightUse, weight_shape: tuple[int, ...]) -> None:
        self.node, self.use = node, use
        self.conv = ConvGeometry.of(node, weight_shape) if node.op_type == "Conv" else None
        self.transposed = node.op_type == "Gemm" and bool(attr(node, "transA", 0))
        self.sums: np.ndarray | None = None
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        if self.conv is not None:
            xp, out = self.conv.padded(x)
            sums, n = self.conv.offset_sums(xp, out), self.conv.positions(x.shape[0], out)
        else:
            rows = matrix_rows(x, self.transposed)
            sums, n = rows.sum(0, dtype=np.float64), rows.shape[0]
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += n

    def shift(self, w: np.ndarray, wq: np.ndarray) -> np.ndarray:
        """E[W_q x] - E[W x] per output channel (float64)."""
        dw = wq.astype(np.float64) - w.astype(np.float64)
        if self.conv is not None:
            g = self.conv.group
            m, cg = w.shape[0] // g, w.shape[1]
            total = np.einsum("gmck,gck->gm", dw.reshape(g, m, cg, -1), self.sums.reshape(g, cg, -1))
            return total.reshape(-1) / max(self.count, 1)
        shift = self.sums @ _as_k_by_n(self.node, dw) / max(self.count, 1)
        if self.node.op_type == "Gemm":
            shift *= float(attr(self.node, "alpha", 1.0))
        return shift


def _as_k_by_n(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    return w.T if node.op_type == "Gemm" and attr(node, "transB", 0) else w


def apply(ctx: Context) -> Step:
    if ctx.data is None or ctx.plan is None:
        raise CalibrationError("bias correction needs calibration data and a placement plan")
    start = ctx.options.clock()
    ed = GraphEditor(ctx.model)
    layers, skipped = _layers(ctx, ed)
    total = ctx.data.size
    for k, batch in enumerate(stream(ctx.model, sorted({s.node.input[0] for s in layers.values()}), ctx.data,
                                     batch_size=ctx.batch_size, settings=ctx.settings)):
        for s in layers.values():
            s.add(batch[s.node.input[0]])
        ctx.progress(NAME, (k + 1) * ctx.batch_size, total)
    corrections = {}
    for name, s in layers.items():
        w = ed.const(s.use.tensor)
        q = ctx.weights.get(s.use.tensor)
        if q is None:
            q, scales, _ = quantize_weight_per_channel(w, s.use.axis, reduce_range=ctx.reduced(s.use.tensor))
        else:
            scales = quantize_weight_per_channel(w, s.use.axis, reduce_range=ctx.reduced(s.use.tensor))[1]
        shape = [1] * w.ndim
        shape[s.use.axis] = -1
        shift = s.shift(w, dequantize(q, scales.reshape(shape), 0))
        if not np.isfinite(shift).all():
            skipped[name] = "its input held non-finite values"
            continue
        corrections[name] = [float(v) for v in shift.astype(np.float32)]
    record = {"name": NAME, "corrections": corrections, "skipped": skipped,
              "max_abs_shift": max((max(map(abs, v)) for v in corrections.values()), default=0.0),
              "samples_seconds": round(ctx.options.clock() - start, 3)}
    return replay(ctx, record)


def _layers(ctx: Context, ed: GraphEditor) -> tuple[dict[str, _Sums], dict[str, str]]:
    """The quantized weighted layers (one per node; a weight shared by two nodes is corrected in each)."""
    layers, skipped = {}, {}
    quantized = set(ctx.plan.quantized_nodes)
    for use in ctx.plan.weights:
        node = ed.node(use.node)
        if use.node not in quantized or use.input_index != 1:
            continue
        why = _why_not(ctx, node, ed)
        if why:
            skipped[use.node] = why
            continue
        layers[use.node] = _Sums(node, use, ed.const(use.tensor).shape)
    return layers, skipped


def _why_not(ctx: Context, node: onnx.NodeProto, ed: GraphEditor) -> str:
    if node.op_type == "MatMul" and ed.const(node.input[1]).ndim != 2:
        return "batched MatMul weight"
    if node.op_type == "Gemm" and float(attr(node, "beta", 1.0)) == 0.0 and len(node.input) > 2:
        return "Gemm with beta = 0"
    if node.op_type == "MatMul" and _bias_add(ed, node) is None and node.output[0] in ctx.plan.replaced:
        return "no bias Add, and its output is quantized (an Add would break the fused kernel)"
    return ""


def _bias_add(ed: GraphEditor, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Add right after a MatMul that adds a constant vector along the output channels."""
    nxt = ed.sole_reader(node.output[0])
    if nxt is None or nxt.op_type != "Add":
        return None
    other = nxt.input[1] if nxt.input[0] == node.output[0] else nxt.input[0]
    c = ed.float_const(other)
    n = ed.const(node.input[1]).shape[-1]
    return nxt if c is not None and c.size == n and c.shape[-1] == n else None


def replay(ctx: Context, record: dict) -> Step:
    ed = GraphEditor(ctx.model)
    quantized = set(ctx.plan.quantized_nodes) if ctx.plan is not None else set()
    renamed = False
    for name, shift in record["corrections"].items():
        if name in quantized:
            renamed |= subtract(ed, ed.node(name), np.asarray(shift, np.float32))
    return Step(ed.model(renamed_tensors=renamed), record)


def subtract(ed: GraphEditor, node: onnx.NodeProto, shift: np.ndarray) -> bool:
    """bias -= shift (Gemm: C -= shift / beta), creating the bias where there is none.
    Returns whether a tensor was renamed (a MatMul given an Add)."""
    op = node.op_type
    if op in ("Conv", "Gemm"):
        beta = np.float32(attr(node, "beta", 1.0)) if op == "Gemm" else np.float32(1.0)
        if len(node.input) > 2 and node.input[2]:
            b = ed.const(node.input[2]).astype(np.float32)
            new = b - shift / beta  # broadcast on the last axis: [N], [1, N], [M, N] and scalars alike
        else:
            new = -shift / beta
        ed.own_const(node, 2, np.asarray(new, np.float32), "bias_corrected")
        return False
    add = _bias_add(ed, node)
    if add is not None:
        index = 1 if add.input[0] == node.output[0] else 0
        c = ed.const(add.input[index]).astype(np.float32)
        ed.own_const(add, index, (c - shift.reshape(c.shape)).astype(np.float32), "bias_corrected")
        return False
    out = node.output[0]
    raw = ed.unique(f"{out}_before_bias")
    node.output[0] = raw
    bias = ed.add_const(f"{node.name}_bias_corrected", (-shift).astype(np.float32))
    ed.insert_after(node.name, helper.make_node("Add", [raw, bias], [out], name=ed.unique(f"{node.name}_bias")))
    return True
