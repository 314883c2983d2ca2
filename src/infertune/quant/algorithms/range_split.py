"""Split-range activations: one heavy-tailed activation quantized as two int8 tensors, no float kept.

A per-tensor 8-bit activation whose values sit mostly near zero but reach far out (a SiLU output with
a long tail) gets a step that is coarse for almost every value, or a clipped tail. Every layer that
reads X multiplies it by a constant weight, so it computes the same from two parts (piecewise-linear
quantization, Fang et al. 2020, applied to an activation):

    W x = W min(x, T) + W relu(x - T)

``min(x, T)`` spans [min x, T] and gets a fine step; ``relu(x - T)`` is zero except in the tail and
gets its own range, and zero is exact in both, so values below T carry no tail noise. Each reader is
duplicated (the second copy without bias, same weight) and the two outputs added: every convolution
still runs in int8, and the extra multiply-adds are those of the readers of the split tensors.

On YOLOv8n's second SiLU output (values to 259, std 6) this quantization noise fell 28x, and the box
F1 of full INT8 + bias correction against FP32 rose from 0.936 to 0.965 on OpenVINO and from 0.886 to
0.938 on ONNX Runtime (benchmarks/results/algorithms.md, 1000 held-out mosaics); on 1000 other mosaics
(scratch) from 0.937 to 0.966, and to 0.964-0.967 for hand-set T from 12 to 24. Splitting more tensors
(the next by noise removed) did not measurably add, so ``split_tensors`` defaults to 1.

Choice, on values sampled from the calibration data (streamed, ``sample_rows`` x 32 per tensor):
per candidate X (read only by Conv / MatMul / Gemm layers with a constant weight, from a producer
whose output is not bounded), the noise-to-signal ratio of its best single range (the clip that
minimises the expected squared error over the sample, as ``auto`` calibration chooses) and of its
best split (T and the upper part's clip searched the same way). The ``split_tensors`` candidates with
the largest drop are split where the split divides the noise by ``MIN_GAIN`` at least. FP32 outputs are unchanged up
to float rounding (x is min(x, T) + (x - T) rounded once).

The split's two parts are bounded by construction (``Min`` by T, ``Relu`` from zero) and must not be
rescaled afterwards: range refinement leaves them alone (``is_part``), and the ``Add`` of the two
partial sums is not a residual add for the placement (it reads two convolutions of one weight).
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from infertune.errors import CalibrationError
from infertune.quant.algorithms.base import Context, Step
from infertune.quant.algorithms.graph import GraphEditor
from infertune.quant.algorithms.streaming import RowSampler, fake_quant, passes, stream
from infertune.quant.methods import BOUNDED_OPS
from infertune.quant.placement import TARGETS, TargetRules

NAME = "range_split"
STAGE = "float"
LOW, HIGH = "_range_split_low", "_range_split_high"  # the two parts' tensor suffixes
# a split is kept when it divides the tensor's quantization noise by at least this: two ranges give a flat
# distribution at most 4x (one more bit); a long tail far more (YOLOv8n's SiLU outputs 13-28x)
MIN_GAIN = 8.0
CLIPS = np.linspace(0.05, 1.0, 40)  # a range's upper end, as fractions of the largest value
THRESHOLDS = np.array([0.02, 0.04, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4])  # T, as fractions of the largest value
SAMPLES_PER_ROW = 32


def is_part(tensor: str) -> bool:
    """Whether ``tensor`` is one of the two parts of a split activation."""
    return tensor.endswith((LOW, HIGH))


def candidates(ed: GraphEditor, excluded, target: str) -> dict[str, list[str]]:
    """Activation -> the layers reading it, where every reader multiplies it by a constant weight."""
    compute = TARGETS[target].compute_ops
    inputs = {i.name for i in ed.g.input}
    out: dict[str, list[str]] = {}
    for tensor in dict.fromkeys(n.input[0] for n in ed.g.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input):
        producer = ed.producer(tensor)
        if tensor in inputs or ed.is_const(tensor) or producer is None or producer.op_type in BOUNDED_OPS \
                or ed.is_output(tensor) or is_part(tensor):
            continue
        readers = ed.consumers(tensor)
        if ed.readers(tensor) != len(readers) or \
                not all(_splittable(ed, n, tensor, compute, excluded) for n in readers):
            continue
        out[tensor] = [n.name for n in readers]
    return out


def _splittable(ed: GraphEditor, node, tensor: str, compute, excluded) -> bool:
    return (node.op_type in compute and node.op_type in ("Conv", "MatMul", "Gemm") and not excluded(node)
            and len(node.input) >= 2 and node.input[0] == tensor and list(node.input).count(tensor) == 1
            and ed.float_const(node.input[1]) is not None)


def apply(ctx: Context) -> Step:
    if ctx.data is None:
        raise CalibrationError("range splitting needs calibration data")
    ed = GraphEditor(ctx.model)
    found = candidates(ed, ctx.exclusions.reason, ctx.target)
    values = _sample(ctx, list(found))
    rules = TARGETS[ctx.target]
    scored = {}
    for tensor, v in values.items():
        if v.size and np.isfinite(v).all() and v.max() > 0 and v.var() > 0:
            scored[tensor] = choose(v, rules)
    ranked = sorted(scored, key=lambda t: scored[t]["one"] - scored[t]["split"], reverse=True)
    splits = []
    for tensor in ranked[: ctx.options.split_tensors]:
        s = scored[tensor]
        if s["split"] * MIN_GAIN <= s["one"]:
            splits.append({"tensor": tensor, "layers": found[tensor], **s})
    record = {"name": NAME, "candidates": len(found), "splits": splits}
    return replay(ctx, record)


def _sample(ctx: Context, tensors: list[str]) -> dict[str, np.ndarray]:
    """Values of each tensor drawn uniformly from the calibration data, in passes that fit memory."""
    capacity = ctx.options.sample_rows * SAMPLES_PER_ROW
    out: dict[str, np.ndarray] = {}
    for group in passes({t: capacity * 4 for t in tensors}, ctx.options.sample_memory_mb * 2**20):
        samplers = {t: RowSampler(capacity, ctx.options.seed) for t in group}
        for batch in stream(ctx.model, group, ctx.data, batch_size=ctx.batch_size, settings=ctx.settings):
            for t in group:
                flat = np.asarray(batch[t], np.float32).reshape(-1, 1)
                samplers[t].offer(flat.shape[0], lambda idx, flat=flat: flat[idx])
        out.update({t: samplers[t].sample(1)[:, 0].astype(np.float64) for t in group})
        ctx.progress(NAME, len(out), len(tensors))
    return out


def range_error(v: np.ndarray, lo: float, hi: float, rules: TargetRules) -> float:
    """Mean squared error of ``v`` through the Q/DQ the target gives a range [lo, hi] (outside it clipped)."""
    q = fake_quant(v, rules.activation_qparams(lo, hi))
    return float(np.mean((q.astype(np.float64) - v) ** 2))


def best_range(v: np.ndarray, lo: float, rules: TargetRules) -> float:
    """The least error over upper ends ``CLIPS`` x max(v), the lower end fixed at ``lo``."""
    top = float(v.max())
    return min(range_error(v, lo, c * top, rules) for c in CLIPS if c * top > lo)


def choose(v: np.ndarray, rules: TargetRules) -> dict:
    """The tensor's noise-to-signal ratio with its best single range and with its best split (its T), each
    part quantized as ``rules`` quantizes an activation."""
    lo, top, var = min(float(v.min()), 0.0), float(v.max()), float(v.var())
    split, threshold = np.inf, top
    for t in THRESHOLDS * top:
        e = range_error(np.minimum(v, t), lo, t, rules) + best_range(np.maximum(v - t, 0.0), 0.0, rules)
        if e < split:
            split, threshold = e, float(t)
    return {"threshold": threshold, "one": best_range(v, lo, rules) / var, "split": split / var}


def replay(ctx: Context, record: dict) -> Step:
    ed = GraphEditor(ctx.model)
    for entry in record["splits"]:
        split(ed, entry["tensor"], entry["layers"], entry["threshold"])
    return Step(ed.model(), record)


def split(ed: GraphEditor, tensor: str, layers: list[str], threshold: float) -> None:
    """Each layer reading ``tensor`` as the sum of itself on min(x, T) and a bias-free copy on relu(x - T)."""
    t = ed.add_const(f"{tensor}_range_split_threshold", np.asarray(threshold, np.float32))
    low, shifted, high = ed.unique(tensor + LOW), ed.unique(f"{tensor}_range_split_shifted"), ed.unique(tensor + HIGH)
    producer = ed.producer(tensor)
    anchor = producer.name if producer is not None else None
    for node in reversed([helper.make_node("Min", [tensor, t], [low], name=ed.unique(f"{tensor}_range_split_min")),
                          helper.make_node("Sub", [tensor, t], [shifted], name=ed.unique(f"{tensor}_range_split_sub")),
                          helper.make_node("Relu", [shifted], [high], name=ed.unique(f"{tensor}_range_split_relu"))]):
        ed.insert_after(anchor, node)
    for name in layers:
        node = ed.node(name)
        out = node.output[0]
        part_low, part_high = ed.unique(f"{out}_range_split_part_low"), ed.unique(f"{out}_range_split_part_high")
        copy = helper.make_node(node.op_type, [high, node.input[1]], [part_high],
                                name=ed.unique(f"{name}_range_split_high"))
        copy.attribute.extend(node.attribute)
        node.input[0] = low
        node.output[0] = part_low
        ed.insert_after(name, helper.make_node("Add", [part_low, part_high], [out],
                                               name=ed.unique(f"{name}_range_split_sum")))
        ed.insert_after(name, copy)
