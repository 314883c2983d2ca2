"""Which weights need 7 bits: the int16 pair sums of u8 x s8 kernels, measured per layer.

Without VNNI, x86 int8 kernels (ONNX Runtime's MLAS, OpenVINO's oneDNN) multiply u8 activations by s8
weights with vpmaddubsw, which adds the products of two consecutive input channels in a saturating int16:
with 8-bit weights such a pair can reach 2 x 255 x 127 = 64770 > 32767. 7-bit weights ([-63, 63]) cannot
overflow, but double every weight's rounding step, on every layer. Measured on real models
(benchmarks/saturation.py), one layer decides most of it: the first convolution, which reads the image with
its zero point near 128 (every u8 value large) through few, large weights, overflows on 4-9% of its pair
sums; later layers on less than 0.001% mostly.

So the choice is per layer, on calibration data: for each Conv/MatMul/Gemm whose weights are quantized,
the pair sums its kernel would form are computed exactly in integers (activations as the layer's u8 values,
weights as their 8-bit values) at sampled output positions of the first feeds, and the layer gets 7 bits
when the error the overflow adds (what the clipped sums lose, squared, per output) exceeds the error 7-bit
rounding would add (the rounding variance of a twice wider step times the activations' energy). Depthwise
convolutions are left alone: they have no input-channel pairs (both runtimes widen to 16 bits and add
in 32). A layer with an odd channel count per group is paired as the kernels lay it out (channels
innermost, taps outermost): a convolution of one input channel pairs its taps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from infertune import backends
from infertune.data import Dataset, FeedValidator
from infertune.model import Model
from infertune.quant.placement import QuantPlan, WeightUse
from infertune.quant.qparams import QParams, quantize_weight_per_channel

INT16_MAX = 32767
SAMPLES = 4  # feeds looked at
POSITIONS = 64  # output positions (tokens for MatMul) sampled per feed and layer, at most
PAIR_SUMS = 1 << 21  # pair sums per feed and layer, about: fewer positions for wide layers, at least 8
CHUNK = 1 << 22  # pair sums held at once, per layer
# rounding variance added by 7-bit weights, in units of the 8-bit step: ((127/63)^2 - 1) / 12
SEVEN_BIT_NOISE = ((127 / 63) ** 2 - 1) / 12


@dataclass
class LayerOverflow:
    """One layer's pair sums over the sampled positions (or why they were not computed: then 7 bits)."""

    node: str
    weight: str
    pairs: int = 0  # pair sums computed
    overflows: int = 0  # of which beyond int16
    overflow_error: float = 0.0  # sum of squared output error from clipping (scaled by weight scales)
    seven_bit_error: float = 0.0  # the rounding error 7-bit weights would add instead (same scaling)
    unmeasured: str = ""  # a layout this module does not pair: 7 bits, as every weight had before

    @property
    def seven_bit(self) -> bool:
        return bool(self.unmeasured) or self.overflow_error > self.seven_bit_error

    def to_dict(self) -> dict:
        return {"node": self.node, "weight": self.weight, "pair_sums": self.pairs, "overflows": self.overflows,
                "overflow_error": self.overflow_error, "seven_bit_error": self.seven_bit_error,
                "seven_bit": self.seven_bit, **({"unmeasured": self.unmeasured} if self.unmeasured else {})}


def measure(model: Model, plan: QuantPlan, qparams: dict[str, QParams], data: Dataset, *,
            settings: backends.Settings | None = None, samples: int = SAMPLES, positions: int = POSITIONS,
            seed: int = 0) -> list[LayerOverflow]:
    """Pair-sum overflow of every layer whose int8 weights meet an 8-bit activation, on ``samples`` feeds."""
    nodes = {n.name: n for n in model.graph.node}
    consts = model.constant_tensors()
    layers, stats = [], {}
    for u in plan.weights:
        node = nodes[u.node]
        act = _eight_bit_operand(node, u, plan, qparams)
        why = _unmeasurable(node, u, consts[u.tensor])
        if act is None or why == "depthwise":  # no u8 x s8 kernel, or no pairs in it
            continue
        stats[u.node] = LayerOverflow(u.node, u.tensor, unmeasured=why)
        if not why:
            layers.append((u, node, act))
    if not layers:
        return list(stats.values())
    inputs = {i.name for i in model.inputs}
    wanted = list(dict.fromkeys(nodes[u.node].input[0] for u, _, _ in layers))
    computed = [t for t in wanted if t not in inputs]
    runner = backends.compile(model.with_outputs(computed, keep_original=False), settings) if computed else None
    rng = np.random.default_rng(seed)
    weights = {u.node: quantize_weight_per_channel(consts[u.tensor], u.axis, dtype="int8") for u, _, _ in layers}
    validator = FeedValidator(model, nonfinite="keep")  # the feeds calibration took, as it took them
    seen = 0
    for raw in data:
        feed = validator(raw)
        if feed is None:
            continue
        if seen == samples:
            break
        seen += 1
        values = {**(runner.run(feed) if runner else {}), **{t: feed[t] for t in wanted if t in inputs}}
        for u, node, act in layers:
            q, scales, _ = weights[u.node]
            qp = qparams[act]
            zp = qp.zero_point + (128 if qp.dtype == "int8" else 0)  # s8 sources run shifted to u8 (+128)
            x = np.nan_to_num(values[node.input[0]] / np.float32(qp.scale), nan=0.0, posinf=255.0, neginf=-255.0)
            a = np.clip(np.rint(x) + zp, 0, 255).astype(np.int32)
            _add(stats[u.node], node, a, q.astype(np.int32), scales.astype(np.float64), zp, rng, positions)
    return list(stats.values())


def _eight_bit_operand(node: onnx.NodeProto, use: WeightUse, plan: QuantPlan,
                       qparams: dict[str, QParams]) -> str | None:
    """The activation the weight multiplies, when it is 8-bit: uint8, or int8, which the kernels shift to uint8
    by adding 128 and subtract 128 x the weights' sum after (oneDNN's s8s8 compensation) on CPUs without VNNI."""
    if use.input_index not in (0, 1) or len(node.input) < 2:
        return None
    operand = node.input[1 - use.input_index]
    t = plan.shared.get(operand, operand)
    qp = qparams.get(t)
    return t if qp is not None and qp.dtype in ("uint8", "int8") else None


def _unmeasurable(node: onnx.NodeProto, use: WeightUse, w: np.ndarray) -> str:
    """'' when this module pairs the layer's sums as the kernels do; 'depthwise' (no pairs: safe in 8 bits);
    else what it does not model (that layer gets 7 bits)."""
    if node.op_type == "Conv":
        if use.input_index == 1 and w.ndim in (3, 4):
            # several groups of one channel: a depthwise kernel; one group of one channel pairs its taps
            return "depthwise" if w.shape[1] == 1 and _attr(node, "group", 1) > 1 else ""
        return "a convolution of rank other than 1 or 2"
    if node.op_type in ("MatMul", "Gemm") and use.input_index == 1 and w.ndim == 2 and not (
            node.op_type == "Gemm" and _attr(node, "transA", 0)):
        return ""
    return f"{node.op_type} with this weight layout"


def _conv_pads(node: onnx.NodeProto, size: tuple[int, ...], kernel: tuple[int, int], strides: list[int],
               dil: list[int]) -> list[int]:
    """[top, left, bottom, right] of a 2-D (or, height 1, 1-D) Conv: its pads, or what auto_pad makes of them."""
    auto = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(size, kernel, strides, dil, strict=True):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)  # output ceil(n / s), as ONNX defines
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return [begin[0], begin[1], end[0], end[1]]
    if auto == "VALID":
        return [0, 0, 0, 0]
    pads = _attr(node, "pads", None)
    if pads is None:
        return [0, 0, 0, 0]
    return [0, pads[0], 0, pads[1]] if len(pads) == 2 else pads


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return default


def _add(st: LayerOverflow, node: onnx.NodeProto, a: np.ndarray, q: np.ndarray, scales: np.ndarray, zp: int,
         rng: np.random.Generator, positions: int) -> None:
    """Pair sums of one feed at sampled positions: patches [P, taps, C] against weights [O, taps, C]."""
    positions = int(np.clip(PAIR_SUMS // max(1, q.size // 2), 8, positions))
    if node.op_type == "Conv":
        patches, w, groups = _conv_patches(node, a, q, zp, rng, positions)
    else:
        rows = a.reshape(-1, a.shape[-1])
        rows = rows[rng.choice(rows.shape[0], min(positions, rows.shape[0]), replace=False)]
        transposed = node.op_type == "Gemm" and _attr(node, "transB", 0)
        patches, w, groups = rows[:, None, :], (q if transposed else q.T)[:, None, :], 1
    cg, og = w.shape[2], w.shape[0] // groups
    for g in range(groups):
        x, wg = patches[:, :, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]
        energy = float(((x - zp).astype(np.float64) ** 2).sum())
        st.seven_bit_error += energy * float((scales[g * og:(g + 1) * og] ** 2).sum()) * SEVEN_BIT_NOISE
        if cg % 2:  # odd channel count: pairs run on across taps, channels innermost
            x, wg = x.reshape(x.shape[0], 1, -1), wg.reshape(og, 1, -1)
        even = x.shape[2] // 2 * 2
        # float32 is exact here: products <= 255 x 127, pair sums <= 64770
        x = x[:, :, :even].reshape(x.shape[0], x.shape[1], even // 2, 2).astype(np.float32)
        wg = wg[:, :, :even].reshape(og, wg.shape[1], even // 2, 2).astype(np.float32)
        pairs = x.shape[0] * og * x.shape[1] * x.shape[2]
        top = x.max(axis=0)  # activations are >= 0: no pair of these positions can exceed this bound
        if (top[None, ..., 0] * np.abs(wg[..., 0]) + top[None, ..., 1] * np.abs(wg[..., 1])).max() <= INT16_MAX:
            st.pairs += pairs
            continue
        step = max(1, CHUNK // max(1, x[..., 0].size))
        for o0 in range(0, og, step):
            wo = wg[o0:o0 + step]
            sums = x[:, None, ..., 0] * wo[None, ..., 0] + x[:, None, ..., 1] * wo[None, ..., 1]  # [P, O, T, K]
            excess = sums - np.clip(sums, -INT16_MAX, INT16_MAX)
            err = excess.sum(axis=(2, 3), dtype=np.float64)  # [P, O]: what each output loses
            st.overflow_error += float((err ** 2 * scales[g * og + o0:g * og + o0 + wo.shape[0]] ** 2).sum())
            st.overflows += int(np.count_nonzero(excess))
        st.pairs += pairs


def _conv_patches(node: onnx.NodeProto, a: np.ndarray, q: np.ndarray, zp: int, rng: np.random.Generator,
                  positions: int) -> tuple[np.ndarray, np.ndarray, int]:
    if q.ndim == 3:  # Conv1d as a 2-D convolution of height 1
        a, q = a[:, :, None, :], q[:, :, None, :]
        one = [1]
        strides, dil = one + _attr(node, "strides", [1]), one + _attr(node, "dilations", [1])
    else:
        strides, dil = _attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1])
    groups = _attr(node, "group", 1)
    o, cg, kh, kw = q.shape
    pads = _conv_pads(node, a.shape[2:], (kh, kw), strides, dil)
    x = np.pad(a, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=zp)
    h = (x.shape[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    w = (x.shape[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    n = x.shape[0] * h * w
    pick = rng.choice(n, min(positions, n), replace=False)
    b, ys, xs = pick // (h * w), (pick % (h * w)) // w, pick % w
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    patches = np.stack([x[b, :, ys * strides[0] + i * dil[0], xs * strides[1] + j * dil[1]] for i, j in taps], 1)
    return patches, q.reshape(o, cg, kh * kw).transpose(0, 2, 1), groups
