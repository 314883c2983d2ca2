"""Cross-layer equalisation (Nagel et al., 2019, "Data-Free Quantization"): rescale the channels
between two weighted layers so that their per-channel weight ranges match.

A *pair* is L1 -> [bias Add] -> [BatchNormalization] -> [Relu | LeakyRelu | Clip(0, m)] ->
[MaxPool | AveragePool | global pools + Flatten] -> L2, L1 and L2 Conv (depthwise and grouped
included), Gemm or MatMul with a constant 2-D weight, every tensor on the way read only by the
next node. These ops are positively homogeneous per channel, so dividing L1's output channel i
by s_i > 0 and multiplying L2's input channel i by s_i leaves the FP32 outputs unchanged. With
r1_i the range (absmax) of L1's output channel i (times the BatchNormalization gain when there
is one) and r2_i that of L2's input channel i, s_i = sqrt(r1_i / r2_i) makes both sqrt(r1_i r2_i).
Chains of three or more layers share a layer between pairs: the pairs are equalised in turn
until the scales stop changing. A Clip(0, m) (ReLU6) cannot divide its bound per channel, so it
becomes Clip(0) followed by Min with the per-channel bound m / s_i.

Weights come from initializers or Constant nodes (Paddle). No data is needed; the record holds
each pair's scales, which ``replay`` applies to the float32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from infertune.quant.algorithms.base import Context, Step
from infertune.quant.algorithms.graph import WEIGHTED, GraphEditor, attr

NAME = "cle"
STAGE = "float"
ROUNDS = 50
TOLERANCE = 1e-4  # stop when no scale changes by more than this (relative)
DEAD = 1e-8  # a channel this small against the layer's largest is left alone (its scale would be extreme)
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip"})
POOLS = frozenset({"MaxPool", "AveragePool"})
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})


@dataclass
class Layer:
    node: onnx.NodeProto
    weight: str
    out_axis: int
    in_axis: int
    group: int = 1

    @classmethod
    def of(cls, ed: GraphEditor, node: onnx.NodeProto) -> Layer | None:
        """``node`` as an equalisable layer: a constant float weight only it reads."""
        if node.op_type not in WEIGHTED or len(node.input) < 2:
            return None
        w = ed.float_const(node.input[1])
        if w is None or ed.readers(node.input[1]) != 1:
            return None
        if node.op_type == "Conv" and w.ndim >= 3:
            return cls(node, node.input[1], 0, 1, int(attr(node, "group", 1)))
        if node.op_type == "Gemm" and w.ndim == 2 and not attr(node, "transA", 0):
            return cls(node, node.input[1], 0, 1) if attr(node, "transB", 0) else cls(node, node.input[1], 1, 0)
        if node.op_type == "MatMul" and w.ndim == 2:
            return cls(node, node.input[1], 1, 0)
        return None

    def out_ranges(self, w: np.ndarray) -> np.ndarray:
        other = tuple(i for i in range(w.ndim) if i != self.out_axis)
        return np.abs(w).max(axis=other)

    def in_ranges(self, w: np.ndarray) -> np.ndarray:
        """Range of each input channel (for a grouped conv: channel c of group c // (C/g))."""
        if self.node.op_type != "Conv":
            return np.abs(w).max(axis=self.out_axis)
        g, m, cg = self.group, w.shape[0] // self.group, w.shape[1]
        return np.abs(w.reshape(g, m, cg, -1)).max(axis=(1, 3)).reshape(-1)

    def scale_out(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        shape = [1] * w.ndim
        shape[self.out_axis] = -1
        return w / s.reshape(shape)

    def scale_in(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        if self.node.op_type != "Conv":
            shape = [1] * w.ndim
            shape[self.in_axis] = -1
            return w * s.reshape(shape)
        g, m, cg = self.group, w.shape[0] // self.group, w.shape[1]
        return (w.reshape(g, m, cg, -1) * s.reshape(g, 1, cg, 1)).reshape(w.shape)

    def channels_in(self, w: np.ndarray) -> int:
        return w.shape[1] * self.group if self.node.op_type == "Conv" else w.shape[self.in_axis]


@dataclass
class Pair:
    first: Layer
    second: Layer
    between: list[onnx.NodeProto]  # the nodes from L1's output to L2's input

    def to_dict(self) -> dict:
        return {"first": self.first.node.name, "second": self.second.node.name,
                "between": [n.name for n in self.between]}


def find_pairs(ed: GraphEditor, excluded) -> list[Pair]:
    pairs = []
    for node in ed.g.node:
        first = Layer.of(ed, node)
        if first is None or excluded(node):
            continue
        found = _follow(ed, first)
        if found is None:
            continue
        second, between = found
        if excluded(second.node):
            continue
        if ed.const(first.weight).shape[first.out_axis] != second.channels_in(ed.const(second.weight)):
            continue
        pairs.append(Pair(first, second, between))
    return pairs


def _follow(ed: GraphEditor, first: Layer) -> tuple[Layer, list[onnx.NodeProto]] | None:
    """The layer L1's output reaches through ops that commute with per-channel scaling, if any."""
    conv = first.node.op_type == "Conv"
    between: list[onnx.NodeProto] = []
    allowed = ["bias", "bn", "act", "pool", "flatten"]
    t = first.node.output[0]
    while True:
        nxt = ed.sole_reader(t)
        if nxt is None or nxt.input[0] != t:
            return None
        if nxt.op_type in WEIGHTED:
            second = Layer.of(ed, nxt)
            if second is None or (second.node.op_type == "Conv") != conv and not any(
                    n.op_type == "Flatten" for n in between):
                return None
            return second, between
        kind = _kind(ed, nxt, conv, between)
        if kind is None or kind not in allowed:
            return None
        allowed = allowed[allowed.index(kind) + 1:]
        between.append(nxt)
        t = nxt.output[0]


def _kind(ed: GraphEditor, node: onnx.NodeProto, conv: bool, between: list[onnx.NodeProto]) -> str | None:
    op = node.op_type
    if op == "Add" and not conv and not between and ed.float_const(node.input[1]) is not None:
        return "bias"
    if op == "BatchNormalization" and conv and len(node.output) == 1 and \
            all(ed.float_const(i) is not None for i in node.input[1:5]):
        return "bn"
    if op in ACTIVATIONS and (op != "Clip" or _clip_bounds(ed, node) is not None):
        return "act"
    if op in POOLS and conv:
        return "pool"
    if op in GLOBAL_POOLS and conv:
        return "pool"
    if op == "Flatten" and between and between[-1].op_type in GLOBAL_POOLS and attr(node, "axis", 1) == 1:
        return "flatten"
    return None


def _clip_bounds(ed: GraphEditor, node: onnx.NodeProto) -> tuple[float, float | None] | None:
    """(0, max or None) for a Clip from zero with constant bounds, else None."""
    lo = ed.float_const(node.input[1]) if len(node.input) > 1 else None
    hi = ed.float_const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if lo is None or lo.size != 1 or float(lo) != 0.0 or (hi is not None and hi.size != 1):
        return None
    return 0.0, None if hi is None else float(hi)


def apply(ctx: Context) -> Step:
    ed = GraphEditor(ctx.model)
    pairs = find_pairs(ed, ctx.exclusions.reason)
    scales, rounds = equalise(ed, pairs)
    record = {"name": NAME, "rounds": rounds,
              "pairs": [{**p.to_dict(), "scales": [float(v) for v in s]} for p, s in zip(pairs, scales, strict=True)]}
    return replay(ctx, record)


def equalise(ed: GraphEditor, pairs: list[Pair]) -> tuple[list[np.ndarray], int]:
    """Each pair's cumulative scales (float64), pairs equalised in turn until none changes."""
    weights = {p.first.weight: ed.const(p.first.weight).astype(np.float64) for p in pairs}
    weights.update({p.second.weight: ed.const(p.second.weight).astype(np.float64) for p in pairs})
    gains = [_bn_gain(ed, p) for p in pairs]
    total = [np.ones(ed.const(p.first.weight).shape[p.first.out_axis]) for p in pairs]
    rounds = 0
    for rounds in range(1, ROUNDS + 1):  # noqa: B007 - the count is recorded
        change = 0.0
        for k, p in enumerate(pairs):
            r1 = p.first.out_ranges(weights[p.first.weight]) * gains[k]
            r2 = p.second.in_ranges(weights[p.second.weight])
            s = np.ones_like(r1)
            ok = (r1 > DEAD * r1.max()) & (r2 > DEAD * r2.max())  # a dead channel keeps its scale
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            weights[p.first.weight] = p.first.scale_out(weights[p.first.weight], s)
            weights[p.second.weight] = p.second.scale_in(weights[p.second.weight], s)
            total[k] *= s
            change = max(change, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
        if change < TOLERANCE or len(pairs) < 2:
            break
    return total, rounds


def _bn_gain(ed: GraphEditor, p: Pair) -> np.ndarray:
    bn = next((n for n in p.between if n.op_type == "BatchNormalization"), None)
    if bn is None:
        return np.ones(1)
    gamma, var = ed.const(bn.input[1]).astype(np.float64), ed.const(bn.input[4]).astype(np.float64)
    return np.abs(gamma) / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))


def replay(ctx: Context, record: dict) -> Step:
    ed = GraphEditor(ctx.model)
    for entry in record["pairs"]:
        scale_pair(ed, entry)
    return Step(ed.model(), record)


def scale_pair(ed: GraphEditor, entry: dict) -> None:
    """Divide L1's output channels (and what lies between) by the scales, multiply L2's inputs."""
    s = np.asarray(entry["scales"], np.float64)
    first, second = Layer.of(ed, ed.node(entry["first"])), Layer.of(ed, ed.node(entry["second"]))
    assert first is not None and second is not None, "the recipe's pair does not match this model"
    ed.set_const(first.weight, first.scale_out(ed.const(first.weight).astype(np.float64), s).astype(np.float32))
    ed.set_const(second.weight, second.scale_in(ed.const(second.weight).astype(np.float64), s).astype(np.float32))
    if first.node.op_type in ("Conv", "Gemm") and len(first.node.input) > 2 and first.node.input[2]:
        _divide_last_or_channel(ed, first.node, 2, s, channel_axis=0 if first.node.op_type == "Conv" else -1)
    for node in (ed.node(n) for n in entry["between"]):
        if node.op_type == "Add":
            _divide_last_or_channel(ed, node, 1, s, channel_axis=-1)
        elif node.op_type == "BatchNormalization":
            for index in (2, 3):  # beta and the mean; gamma and the variance stay
                ed.own_const(node, index, (ed.const(node.input[index]) / s).astype(np.float32), "cle")
        elif node.op_type == "Clip":
            spatial = ed.const(first.weight).ndim - 2 if first.node.op_type == "Conv" else 0
            _split_clip(ed, node, s, spatial)


def _divide_last_or_channel(ed: GraphEditor, node: onnx.NodeProto, index: int, s: np.ndarray,
                            channel_axis: int) -> None:
    """A bias divided by the scales: [C] for Conv, broadcast on its last axis for Gemm / Add."""
    b = ed.const(node.input[index]).astype(np.float64)
    if b.ndim == 0 or b.shape[channel_axis] != s.size:
        b = np.broadcast_to(b, (*b.shape[:-1], s.size)) if b.ndim else np.full(s.size, float(b))
    shape = [1] * b.ndim
    shape[channel_axis] = -1
    ed.own_const(node, index, (b / s.reshape(shape)).astype(np.float32), "cle")


def _split_clip(ed: GraphEditor, node: onnx.NodeProto, s: np.ndarray, spatial: int) -> None:
    """Clip(0, m) -> Clip(0) then Min(m / s_i): the bound of each channel scales with it."""
    bounds = _clip_bounds(ed, node)
    if bounds is None or bounds[1] is None:
        return
    out = node.output[0]
    clipped = ed.unique(f"{out}_cle_relu")
    del node.input[2:]
    node.output[0] = clipped
    # [C, 1, ...] broadcasts over a feature map [N, C, *spatial]; [C] over [..., C]
    bound = (bounds[1] / s).astype(np.float32).reshape(-1, *([1] * spatial))
    name = ed.add_const(f"{out}_cle_bound", bound)
    ed.insert_after(node.name, helper.make_node("Min", [clipped, name], [out], name=ed.unique(f"{node.name}_cle_min")))


def scale_summary(record: dict) -> dict:
    """Spread of the scales (for reports): geometric mean of max / min per pair."""
    ratios = [max(e["scales"]) / min(e["scales"]) for e in record["pairs"] if e["scales"] and min(e["scales"]) > 0]
    return {"pairs": len(record["pairs"]),
            "median_scale_ratio": float(np.median(ratios)) if ratios else 1.0,
            "max_scale_ratio": float(max(ratios)) if ratios else 1.0,
            "rounds": record.get("rounds", 0)} if record["pairs"] else {"pairs": 0}

