"""SmoothQuant (Xiao et al., 2023): move per-channel activation outliers into the weights.

A *group* is an activation X and the MatMul / Gemm layers that multiply it by a constant weight
(a transformer's query, key and value read the same X and form one group), or the ungrouped
convolutions that read X, channels on axis 1, whatever their kernel, stride or padding: a convolution
multiplies input channel j by the weights W[:, j] at every tap, so scaling X's channel j by 1 / s_j
and W[:, j] by s_j leaves it unchanged (zero padding stays zero). With a_j the absmax of X's channel
j over the calibration data and w_j that of the group's weights for input channel j (every output and
tap), s_j = a_j^alpha / w_j^(1 - alpha); X / s has flatter channels for the per-tensor activation
quantizer. Convolutions matter where the activation before them is not positively homogeneous
(SiLU, HardSwish, GELU): equalisation (``cle``) cannot scale through it, the explicit Mul can, and
OpenVINO fuses that Mul (on rapidocr's recognition model its executed graph keeps no layer for any).
YOLO-style convnets read some of their most imbalanced activations (the stem's output, channel
maxima 5 to 50 on YOLOv8n; a neck stage's output that three heads read) with 3x3 convolutions.

The division by s is folded into X's producer when X feeds only the group: a LayerNormalization
(scale and bias), an Add of a constant after a Mul by a constant (a decomposed normalisation),
an Add of a constant after a MatMul / Gemm with a constant weight (its output columns and bias),
or such a MatMul / Gemm itself; elsewhere an explicit Mul by 1 / s goes before the group. FP32
outputs are unchanged.

alpha is chosen per group from ``AlgorithmOptions.smoothquant_alphas`` by the measured output
error of the group quantized as ``quantize`` will (activations per tensor over their range,
weights per output channel in int8) on sampled calibration rows; a group no alpha improves is left
alone, as are the parts of a split activation (``range_split`` runs first): their readers share
one weight, and a layer is a group member only with a weight of its own. A row is X's channel
vector at one position; a k x k convolution's taps count as outputs of their own (each tap's
W[:, :, tap] applied to the row): summed over taps, that is the convolution's squared error where
the errors its taps add up are uncorrelated, and it ranks the alphas without sampling whole
patches. Statistics are streamed: per-channel min/max (exact) and ``sample_rows``
rows per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from infertune.errors import CalibrationError
from infertune.quant.algorithms.base import Context, Step
from infertune.quant.algorithms.graph import GraphEditor, attr
from infertune.quant.algorithms.streaming import RowSampler, fake_quant, matrix_rows, passes, stream
from infertune.quant.placement import TARGETS
from infertune.quant.qparams import dequantize, quantize_weight_per_channel

NAME = "smoothquant"
STAGE = "float"
STAT_FLOOR = 1e-5  # channels (of X or W) smaller than this count as this (no division by zero)


# how a layer holds its weight: [K, N] (MatMul, Gemm), [N, K] (Gemm transB), [N, K, *kernel] (Conv)
Layout = str
KN, NK, CONV = "kn", "nk", "conv"


@dataclass
class Group:
    tensor: str
    layers: list[tuple[str, str, Layout]]  # (node, weight, its layout)

    @property
    def channels_first(self) -> bool:
        """X's channels are on axis 1 (convolutions), not the last axis."""
        return self.layers[0][2] == CONV

    def weights(self, ed: GraphEditor) -> list[np.ndarray]:
        """Each layer's weight as [K, N, taps] (taps 1 but for a convolution's kernel)."""
        return [as_knt(ed.const(w), layout) for _, w, layout in self.layers]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """X as the [rows, K] its layers multiply."""
        return matrix_rows(np.moveaxis(x, 1, -1) if self.channels_first else x)


def as_knt(w: np.ndarray, layout: Layout) -> np.ndarray:
    if layout == CONV:
        return np.moveaxis(w.reshape(w.shape[0], w.shape[1], -1), 1, 0)
    return (w.T if layout == NK else w)[:, :, None]


def layout_of(ed: GraphEditor, node: onnx.NodeProto) -> Layout | None:
    """How ``node`` holds a constant weight only it reads, or None where it is no group member."""
    if len(node.input) < 2 or ed.float_const(node.input[1]) is None or ed.is_const(node.input[0]) or \
            ed.readers(node.input[1]) != 1:
        return None
    w = ed.const(node.input[1])
    if node.op_type == "Conv":
        return CONV if w.ndim >= 3 and attr(node, "group", 1) == 1 else None
    if w.ndim != 2 or node.op_type == "Gemm" and attr(node, "transA", 0):
        return None
    return NK if node.op_type == "Gemm" and attr(node, "transB", 0) else KN


def find_groups(ed: GraphEditor, excluded, target: str) -> list[Group]:
    compute = TARGETS[target].compute_ops
    groups: dict[str, Group] = {}
    for node in ed.g.node:
        if node.op_type not in compute or node.op_type not in ("MatMul", "Gemm", "Conv") or excluded(node):
            continue
        layout = layout_of(ed, node)
        if layout is not None:
            groups.setdefault(node.input[0], Group(node.input[0], [])).layers.append(
                (node.name, node.input[1], layout))
    # a tensor read by convolutions and by MatMuls has no one channel axis: left alone
    return [g for g in groups.values() if len({layout == CONV for _, _, layout in g.layers}) == 1]


class _Stats:
    def __init__(self, k: int, capacity: int, seed: int) -> None:
        self.lo = np.full(k, np.inf)
        self.hi = np.full(k, -np.inf)
        self.sampler = RowSampler(capacity, seed)

    def add(self, rows: np.ndarray) -> None:
        finite = np.isfinite(rows).all(axis=1)
        if finite.any():
            ok = rows[finite]
            self.lo = np.minimum(self.lo, ok.min(0))
            self.hi = np.maximum(self.hi, ok.max(0))
        self.sampler.offer(rows.shape[0], lambda idx: rows[idx])


def apply(ctx: Context) -> Step:
    if ctx.data is None:
        raise CalibrationError("SmoothQuant needs calibration data")
    ed = GraphEditor(ctx.model)
    groups = find_groups(ed, ctx.exclusions.reason, ctx.target)
    stats = _collect(ctx, ed, groups)
    entries, skipped = [], {}
    for g in groups:
        chosen = choose_alpha(g.weights(ed), stats[g.tensor], ctx)
        if chosen is None:
            skipped[g.tensor] = "no activation values seen"
            continue
        alpha, scales, errors = chosen
        if alpha is None:
            skipped[g.tensor] = "no alpha lowers the measured error"
            continue
        entries.append({"tensor": g.tensor, "layers": [n for n, _, _ in g.layers], "alpha": alpha,
                        "scales": [float(v) for v in scales], "errors": errors})
    record = {"name": NAME, "alphas": list(ctx.options.smoothquant_alphas), "groups": entries, "skipped": skipped}
    return replay(ctx, record)


def _collect(ctx: Context, ed: GraphEditor, groups: list[Group]) -> dict[str, _Stats]:
    """Per-channel min/max and sampled rows of every group's activation, in passes that fit memory."""
    rows = ctx.options.sample_rows
    dims = {g.tensor: g.weights(ed)[0].shape[0] for g in groups}
    by_tensor = {g.tensor: g for g in groups}
    sizes = {t: rows * k * 4 for t, k in dims.items()}  # rows kept, float32
    out: dict[str, _Stats] = {}
    for tensors in passes(sizes, ctx.options.sample_memory_mb * 2**20):
        stats = {t: _Stats(dims[t], rows, ctx.options.seed) for t in tensors}
        for batch in stream(ctx.model, tensors, ctx.data, batch_size=ctx.batch_size, settings=ctx.settings):
            for t in tensors:
                stats[t].add(by_tensor[t].rows(batch[t]))
        out.update(stats)
        ctx.progress(NAME, len(out), len(groups))
    return out


def choose_alpha(weights: list[np.ndarray], st: _Stats, ctx: Context):
    """(the alpha with the least error, or None when none beats no smoothing; its scales; the error
    of every candidate), or None without data."""
    x = st.sampler.sample(weights[0].shape[0])
    if not x.shape[0] or not np.isfinite(st.lo).all():
        return None
    a = np.maximum(np.maximum(np.abs(st.lo), np.abs(st.hi)), STAT_FLOOR)
    w = np.maximum(np.max([np.abs(wk).max(axis=(1, 2)) for wk in weights], axis=0), STAT_FLOOR)
    # float32: the error ranks the alphas, its last digits do not matter
    reference = [x @ wk.reshape(wk.shape[0], -1) for wk in weights]
    errors = {"none": group_error(x, weights, np.ones_like(a), st.lo, st.hi, reference, ctx)}
    scales = {}
    for alpha in ctx.options.smoothquant_alphas:
        scales[alpha] = smoothing_scales(a, w, alpha)
        errors[f"{alpha:g}"] = group_error(x, weights, scales[alpha], st.lo, st.hi, reference, ctx)
    best = min(scales, key=lambda al: errors[f"{al:g}"])
    if errors[f"{best:g}"] >= errors["none"]:
        return None, None, errors
    return best, scales[best], errors


def smoothing_scales(a: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / w_j^(1-alpha), normalised to geometric mean 1 (only their ratios matter)."""
    s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    return s / np.exp(np.mean(np.log(s)))


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                reference: list[np.ndarray], ctx: Context) -> float:
    """Sum of squared output errors of the group quantized after smoothing by ``s``, on rows ``x``."""
    rules = TARGETS[ctx.target]
    qp = rules.activation_qparams(float(np.min(lo / s)), float(np.max(hi / s)))
    xq = fake_quant((x / s).astype(np.float32), qp)
    total = 0.0
    for wk, ref in zip(weights, reference, strict=True):
        ws = (wk.astype(np.float64) * s[:, None, None]).astype(np.float32)
        # a float rewrite runs before the per-layer 7-bit choice (quant.pair_overflow), which looks at the
        # weights it makes: 8-bit unless every weight is 7-bit
        q, scales, _ = quantize_weight_per_channel(ws, 1, reduce_range=ctx.reduce_range is True)
        wq = dequantize(q, scales[None, :, None], 0).reshape(wk.shape[0], -1)
        total += float(np.sum(np.square(ref - xq @ wq), dtype=np.float64))
    return total


def replay(ctx: Context, record: dict) -> Step:
    ed = GraphEditor(ctx.model)
    for entry in record["groups"]:
        entry["fold"] = smooth(ed, entry["tensor"], entry["layers"], np.asarray(entry["scales"], np.float64))
    return Step(ed.model(), record)


def smooth(ed: GraphEditor, tensor: str, layers: list[str], s: np.ndarray) -> str:
    """Rows of each layer's weight (its input channels) times s; X divided by s in its producer or by
    a new Mul. Returns where the division went."""
    conv, spatial = False, 0
    for name in layers:
        node = ed.node(name)
        w = ed.const(node.input[1]).astype(np.float64)
        layout = layout_of(ed, node)
        conv, spatial = layout == CONV, w.ndim - 2
        scale = s.reshape(1, -1, *[1] * spatial) if conv else s[None, :] if layout == NK else s[:, None]
        ed.set_const(node.input[1], (w * scale).astype(np.float32))
    inv = 1.0 / s
    readers = {n.name for n in ed.consumers(tensor)}
    producer = ed.producer(tensor)
    if not conv and producer is not None and readers == set(layers) and not ed.is_output(tensor) and \
            ed.readers(tensor) == len(layers):
        fold = _fold(ed, producer, inv)
        if fold:
            return fold
    out = ed.unique(f"{tensor}_smoothed")
    if conv:  # per channel on axis 1 of [N, C, *spatial]
        inv = inv.reshape(-1, *[1] * spatial)
    factor = ed.add_const(f"{tensor}_smoothquant_inverse_scale", inv.astype(np.float32))
    ed.insert_after(producer.name if producer is not None else None,
                    helper.make_node("Mul", [tensor, factor], [out], name=ed.unique(f"{tensor}_smoothquant")))
    for name in layers:
        node = ed.node(name)
        node.input[0] = out
    return "Mul"


def _fold(ed: GraphEditor, producer: onnx.NodeProto, inv: np.ndarray) -> str:
    """Divide the producer's output channels by s where its parameters allow; '' if they do not."""
    op, k = producer.op_type, inv.size
    if op == "LayerNormalization" and attr(producer, "axis", -1) == -1 and len(producer.output) == 1:
        params = [i for i in range(1, len(producer.input)) if producer.input[i]]
        if all(_vector(ed, producer.input[i], k) for i in params):
            for i in params:
                ed.own_const(producer, i, _times(ed.const(producer.input[i]), inv, k), "smoothquant")
            return f"LayerNormalization {producer.name}"
    if op == "Add":
        for i in (0, 1):
            c, other = producer.input[1 - i], producer.input[i]
            if not _vector(ed, c, k):
                continue
            inner = ed.producer(other)
            if inner is None or ed.sole_reader(other) is None or not _scalable(ed, inner, k):
                continue
            _scale_output(ed, inner, inv, k)
            ed.own_const(producer, 1 - i, _times(ed.const(c), inv, k), "smoothquant")
            return f"{inner.op_type} {inner.name} + Add {producer.name}"
    if op in ("MatMul", "Gemm") and _scalable(ed, producer, k):
        _scale_output(ed, producer, inv, k)
        return f"{op} {producer.name}"
    return ""


def _vector(ed: GraphEditor, name: str, k: int) -> bool:
    c = ed.float_const(name)
    return c is not None and (c.size == 1 or (c.shape[-1] == k and c.size == k))


def _times(c: np.ndarray, inv: np.ndarray, k: int) -> np.ndarray:
    c = np.broadcast_to(c.astype(np.float64).reshape(-1) if c.size == k else c.astype(np.float64), (k,))
    return (c * inv).astype(np.float32)


def _scalable(ed: GraphEditor, node: onnx.NodeProto, k: int) -> bool:
    """A Mul by a constant vector, or a MatMul / Gemm with a constant weight only it reads, K outputs."""
    if node.op_type == "Mul":
        return any(_vector(ed, i, k) for i in node.input) and not all(ed.is_const(i) for i in node.input)
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or ed.readers(node.input[1]) != 1:
        return False
    w = ed.float_const(node.input[1])
    if w is None or w.ndim != 2:
        return False
    n = w.shape[0] if node.op_type == "Gemm" and attr(node, "transB", 0) else w.shape[1]
    bias_ok = node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2] or _vector(ed, node.input[2], k)
    return n == k and bias_ok


def _scale_output(ed: GraphEditor, node: onnx.NodeProto, inv: np.ndarray, k: int) -> None:
    if node.op_type == "Mul":
        i = next(i for i in (0, 1) if _vector(ed, node.input[i], k))
        ed.own_const(node, i, _times(ed.const(node.input[i]), inv, k), "smoothquant")
        return
    w = ed.const(node.input[1]).astype(np.float64)
    transposed = node.op_type == "Gemm" and attr(node, "transB", 0)
    ed.set_const(node.input[1], (w * (inv[:, None] if transposed else inv[None, :])).astype(np.float32))
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        ed.own_const(node, 2, _times(ed.const(node.input[2]), inv, k), "smoothquant")
