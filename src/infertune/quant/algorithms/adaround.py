"""Learned weight rounding (AdaRound, Nagel et al., 2020), in numpy.

Each quantized layer's int8 weights are floor(W / s) + h, h in {0, 1} per weight, instead of
round-to-nearest. h is relaxed to a rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) +
gamma, 0, 1), started at the fractional part (the float weights themselves), and V minimises

    E(W_q(V)) / E(W_nearest)  +  lambda mean(1 - |2 h(V) - 1|^beta),
    E(W_q) = ||X (W_q - W)||^2 / rows + damp ||W_q - W||^2

with Adam: X the layer's input rows (activation vectors, convolution patches) sampled from the
calibration data, beta annealed from 20 to 2 after a warm-up, so that h ends at 0 or 1. The
rounding decision is then h >= 1/2. A layer keeps round-to-nearest unless the learned rounding
lowers its reconstruction error on the sampled rows, and a layer reading more inputs per output
than there are sampled rows keeps nearest (its rounding would fit the sample).

The objective reconstructs from the float input on both sides, as the issue defines it. The paper's
asymmetric variant (the quantized model's input on the rounded side) was tried: on rapidocr's
recognition model it flipped a large share of the weights to make up for the inputs' quantization
and the model lost far more accuracy than with nearest rounding.

The rows come from ``RowSampler`` (``AlgorithmOptions.sample_rows`` per layer, in passes over the
data that fit ``sample_memory_mb``), so memory does not grow with the data. With X^T X (k x k)
computed once, an iteration costs k^2 n instead of 2 rows k n when k is small. The whole step
(sampling included) keeps to ``adaround_seconds``: what is left after the sampling passes to come
is spent as the same number of iterations on every layer still to do (from the multiply-add rate
measured on the layers done); when that falls under ``adaround_min_iterations``, the most expensive
layers keep nearest, and the clock is read every ``CHECK_EVERY`` iterations so no layer runs past
the deadline. The
record holds, per layer, which weights round the other way than nearest (bit-packed), so
``replay`` rebuilds the same int8 weights without data.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np
import onnx

from infertune.errors import CalibrationError
from infertune.quant.algorithms.base import Context, Step
from infertune.quant.algorithms.graph import GraphEditor, attr
from infertune.quant.algorithms.streaming import ConvGeometry, RowSampler, matrix_rows, passes, stream
from infertune.quant.placement import WeightUse
from infertune.quant.qparams import qrange, quantize_weight_per_channel

NAME = "adaround"
STAGE = "weights"
ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2  # share of the iterations without the rounding regulariser
BETA = (20.0, 2.0)
CHECK_EVERY = 10  # iterations between looks at the clock
DAMPING = 0.01  # of the mean diagonal of X^T X / rows, added to it


@dataclass
class Layer:
    """One weighted layer seen as groups of [k, n] matrices multiplied by [rows, k] inputs."""

    use: WeightUse
    node: onnx.NodeProto
    w: np.ndarray
    scales: np.ndarray  # per output channel
    nearest: np.ndarray  # int8, round-to-nearest
    conv: ConvGeometry | None

    @property
    def groups(self) -> int:
        return self.conv.group if self.conv else 1

    @property
    def row_dim(self) -> int:
        return self.w.shape[1] * self.groups * int(np.prod(self.w.shape[2:])) if self.conv else \
            self.as_groups(self.w).shape[1]

    def as_groups(self, a: np.ndarray) -> np.ndarray:
        """Weights (or anything shaped like them) as [g, k, n]."""
        if self.conv:
            g = self.groups
            return a.reshape(g, a.shape[0] // g, -1).transpose(0, 2, 1)
        return (a.T if self.use.axis == 0 else a)[None]

    def from_groups(self, a: np.ndarray) -> np.ndarray:
        if self.conv:
            return a.transpose(0, 2, 1).reshape(self.w.shape)
        return a[0].T if self.use.axis == 0 else a[0]

    def split_rows(self, x: np.ndarray) -> np.ndarray:
        """[rows, row_dim] -> [g, rows, k] (a group's input channels are contiguous in a patch)."""
        return x.reshape(x.shape[0], self.groups, -1).transpose(1, 0, 2)

    def offer(self, sampler: RowSampler, x: np.ndarray) -> None:
        if self.conv is not None:
            xp, out = self.conv.padded(x)
            sampler.offer(self.conv.positions(x.shape[0], out), lambda idx: self.conv.patches(xp, out, idx))
        else:
            rows = matrix_rows(x, self.node.op_type == "Gemm" and bool(attr(self.node, "transA", 0)))
            sampler.offer(rows.shape[0], lambda idx: rows[idx])


def layers_of(ctx: Context, ed: GraphEditor) -> tuple[dict[str, Layer], dict[str, str]]:
    layers, skipped = {}, {}
    quantized = set(ctx.plan.quantized_nodes)
    uses: dict[str, list[WeightUse]] = {}
    for use in ctx.plan.weights:
        uses.setdefault(use.tensor, []).append(use)
    for tensor, found in uses.items():
        use = found[0]
        node = ed.node(use.node)
        w = ed.const(tensor)
        if len(found) > 1 or ed.readers(tensor) != 1:
            skipped[tensor] = "weight shared by several nodes"
        elif use.node not in quantized or use.input_index != 1:
            continue
        elif node.op_type == "MatMul" and w.ndim != 2:
            skipped[tensor] = "batched MatMul weight"
        elif _inputs_per_row(node, w) > ctx.options.sample_rows:
            skipped[tensor] = (f"{_inputs_per_row(node, w)} inputs per output, more than the {ctx.options.sample_rows} "
                               "sampled rows: the rounding would fit the sample (and cost the most)")
        else:
            q, scales, _ = quantize_weight_per_channel(w, use.axis, reduce_range=ctx.reduced(tensor))
            conv = ConvGeometry.of(node, w.shape) if node.op_type == "Conv" else None
            layers[tensor] = Layer(use, node, w, scales, q, conv)
    return layers, skipped


def _inputs_per_row(node: onnx.NodeProto, w: np.ndarray) -> int:
    """k: how many inputs one output of the layer reads (per group for a Conv)."""
    if node.op_type == "Conv":
        return int(np.prod(w.shape[1:]))
    return w.shape[1] if node.op_type == "Gemm" and attr(node, "transB", 0) else w.shape[0]


def apply(ctx: Context) -> Step:
    if ctx.data is None or ctx.plan is None:
        raise CalibrationError("learned weight rounding needs calibration data and a placement plan")
    opts = ctx.options
    start = opts.clock()
    ed = GraphEditor(ctx.model)
    layers, skipped = layers_of(ctx, ed)
    sizes = {t: opts.sample_rows * lay.row_dim * 4 for t, lay in layers.items()}  # rows kept, float32
    groups = passes(sizes, opts.sample_memory_mb * 2**20)
    budget = Budget(start + opts.adaround_seconds, {t: cost(lay, opts.sample_rows) for t, lay in layers.items()},
                    len(groups), opts.clock)
    entries: dict[str, dict] = {}
    for tensors in groups:
        if budget.spent():  # no time to sample these layers: they keep round-to-nearest
            entries.update({t: {"node": layers[t].use.node, "axis": layers[t].use.axis,
                                "kept": "nearest: the time budget was spent before sampling its inputs"}
                            for t in tensors})
            continue
        samples = _sample(ctx, {t: layers[t] for t in tensors})
        budget.sampled()
        for t in tensors:
            entries[t] = _round_layer(layers[t], samples.pop(t), budget, opts, *qrange("int8", True, ctx.reduced(t)))
            ctx.progress(NAME, len(entries), len(layers))
    record = {"name": NAME, "budget_seconds": opts.adaround_seconds, "rows": opts.sample_rows,
              "layers": entries, "skipped": skipped}
    return replay(ctx, record)


def _sample(ctx: Context, layers: dict[str, Layer]) -> dict[str, np.ndarray]:
    samplers = {t: RowSampler(ctx.options.sample_rows, ctx.options.seed) for t in layers}
    inputs = sorted({lay.node.input[0] for lay in layers.values()})
    for batch in stream(ctx.model, inputs, ctx.data, batch_size=ctx.batch_size, settings=ctx.settings):
        for t, lay in layers.items():
            lay.offer(samplers[t], batch[lay.node.input[0]])
    return {t: s.sample(layers[t].row_dim) for t, s in samplers.items()}


ELEMENTWISE = 400  # one iteration's element-wise work per weight, in multiply-adds (numpy: ~40 passes)


def cost(layer: Layer, rows: int) -> float:
    """Multiply-add equivalents of one iteration: k^2 n per group through X^T X (or 2 rows k n
    through X), plus the element-wise work on the k n weights."""
    g, k, n = layer.as_groups(layer.w).shape
    return float(g * n * (min(k * k, 2 * rows * k) + ELEMENTWISE * k))


class Budget:
    """The time left after the sampling passes to come, spent as the same number of iterations on
    every layer still to do (what that number is follows from the measured multiply-add rate)."""

    def __init__(self, deadline: float, costs: dict[str, float], n_passes: int, clock) -> None:
        self.deadline, self.costs, self.clock = deadline, dict(costs), clock
        self.passes_left = n_passes
        self.pass_seconds = 0.0
        self.rate = _gemm_rate(clock)  # multiply-adds per second; measured again on every layer
        self.mark = clock()

    def sampled(self) -> None:
        now = self.clock()
        self.pass_seconds = max(self.pass_seconds, now - self.mark)
        self.passes_left -= 1
        self.mark = now

    def spent(self) -> bool:
        return self.clock() >= self.deadline

    def iterations(self, key: str, most: int, least: int) -> tuple[int, float]:
        """Iterations for layer ``key`` and the seconds left. The layers still to do get the same
        number; when that would be under ``least``, the cheapest layers that can have ``least`` get
        the time, and a layer beyond them gets 0."""
        left = max(0.0, self.deadline - self.clock() - self.passes_left * self.pass_seconds)
        affordable, total = set(), 0.0
        for k, c in sorted(self.costs.items(), key=lambda kv: kv[1]):
            if (total + c) * least > left * self.rate:
                break
            affordable.add(k)
            total += c
        if key not in affordable:
            return 0, left
        return min(most, int(left * self.rate / total)), left

    def done(self, key: str, iterations: int, seconds: float) -> None:
        if iterations and seconds > 0:
            self.rate = iterations * self.costs[key] / seconds
        self.costs.pop(key)


def _gemm_rate(clock, size: int = 256) -> float:
    """Multiply-adds per second of a float32 product (the clock's seconds)."""
    a = np.ones((size, size), np.float32)
    a @ a  # noqa: B018 - warm-up
    start = clock()
    for _ in range(4):
        a @ a  # noqa: B018
    return 4 * size**3 / max(clock() - start, 1e-9)


def _round_layer(layer: Layer, x: np.ndarray, budget: Budget, opts, qmin: int, qmax: int) -> dict:
    key = layer.use.tensor
    entry = {"node": layer.use.node, "axis": layer.use.axis, "rows": int(x.shape[0])}
    iterations, left = budget.iterations(key, opts.adaround_iterations, opts.adaround_min_iterations)
    if x.shape[0] == 0 or iterations < opts.adaround_min_iterations:
        budget.done(key, 0, 0.0)
        return {**entry, "kept": "nearest: no activation rows" if x.shape[0] == 0 else
                f"nearest: the time budget left {left:.2f} s, too little for "
                f"{opts.adaround_min_iterations} iterations of this layer besides the cheaper ones"}
    start = budget.clock()
    problem = Reconstruction(layer, x)
    up, done = problem.optimise(iterations, opts, qmin, qmax, deadline=budget.deadline, clock=budget.clock)
    budget.done(key, done, budget.clock() - start)
    learned = np.clip(problem.floor + up, qmin, qmax)
    e_near, e_learned = problem.error(problem.nearest), problem.error(learned)
    entry.update(iterations=done, error_nearest=e_near, error_learned=e_learned)
    if not e_learned < e_near:
        return {**entry, "kept": "nearest: learned rounding did not lower the error"}
    flips = layer.from_groups(learned) != layer.nearest.astype(np.float32)
    entry.update(flipped=int(flips.sum()), flips=pack(flips))
    return entry


class Reconstruction:
    """||X (W_q - W)||^2 of one layer, over groups, and its minimisation over the rounding."""

    def __init__(self, layer: Layer, x: np.ndarray) -> None:
        self.layer = layer
        self.w = layer.as_groups(layer.w).astype(np.float32)
        g, k, n = self.w.shape
        scales = np.asarray(layer.scales, np.float32)
        self.scale = (scales.reshape(g, 1, n) if layer.conv else scales.reshape(1, 1, n))
        self.floor = np.floor(self.w / self.scale)
        self.nearest = layer.as_groups(layer.nearest.astype(np.float32))
        xs = layer.split_rows(x)
        self.rows = x.shape[0]
        self.gram = np.matmul(xs.transpose(0, 2, 1), xs) / self.rows if k * k <= 2 * self.rows * k else None
        self.x = None if self.gram is not None else xs
        # (G + damp I): errors along directions the sampled rows do not span still cost something, so the
        # rounding cannot hide its error there (GPTQ dampens its Hessian the same way)
        self.damp = (DAMPING * np.mean(np.square(xs), axis=(1, 2), dtype=np.float64)).astype(np.float32)[:, None, None]

    def product(self, d: np.ndarray, damped: bool = True) -> np.ndarray:
        """(G + damp I) D per group, G = X^T X / rows: half the gradient of the error."""
        if self.gram is not None:
            gd = np.matmul(self.gram, d)
        else:
            gd = np.matmul(self.x.transpose(0, 2, 1), np.matmul(self.x, d)) / self.rows
        return gd + self.damp * d if damped else gd

    def error(self, q: np.ndarray, damped: bool = False) -> float:
        """||X (W_q - W)||^2 / rows on the sampled rows (with ``damped``: what is minimised)."""
        d = (self.scale * q - self.w).astype(np.float32)
        return float(np.sum(d.astype(np.float64) * self.product(d, damped)))

    def optimise(self, iterations: int, opts, qmin: int, qmax: int, deadline: float, clock) -> tuple[np.ndarray, int]:
        """Round-up decisions (0/1 per weight, [g, k, n]) and the iterations run (fewer at the deadline)."""
        rest = self.w / self.scale - self.floor
        p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
        v = np.log(p / (1 - p)).astype(np.float32)
        m, s = np.zeros_like(v), np.zeros_like(v)
        e_near = max(self.error(self.nearest, damped=True), 1e-30)
        warm = int(WARMUP * iterations)
        lam = opts.adaround_regularization
        it = 0
        for it in range(1, iterations + 1):
            sig = 1.0 / (1.0 + np.exp(-v))
            raw = sig * (ZETA - GAMMA) + GAMMA
            h = np.clip(raw, 0.0, 1.0)
            q = self.floor + h
            inside = (q >= qmin) & (q <= qmax)
            d = (self.scale * np.clip(q, qmin, qmax) - self.w).astype(np.float32)
            grad = 2.0 * self.product(d) * self.scale * inside / e_near
            if it > warm:
                beta = BETA[0] + (BETA[1] - BETA[0]) * (it - warm) / max(1, iterations - warm)
                b = 2.0 * h - 1.0
                grad = grad - lam * 2.0 * beta * np.abs(b) ** (beta - 1.0) * np.sign(b) / h.size
            grad = grad * ((raw > 0) & (raw < 1)) * sig * (1.0 - sig) * (ZETA - GAMMA)
            m = 0.9 * m + 0.1 * grad
            s = 0.999 * s + 0.001 * grad * grad
            v -= (opts.adaround_learning_rate * (m / (1 - 0.9**it)) / (np.sqrt(s / (1 - 0.999**it)) + 1e-8)
                  ).astype(np.float32)
            if it % CHECK_EVERY == 0 and clock() > deadline:
                break
        return (v >= 0).astype(np.float32), it


def pack(flags: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(flags.reshape(-1)).tobytes(), 9)).decode("ascii")


def unpack(text: str, shape: tuple[int, ...]) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8))
    return bits[:int(np.prod(shape))].reshape(shape).astype(bool)


def replay(ctx: Context, record: dict) -> Step:
    """int8 weights: nearest, but the recorded weights round the other way (floor <-> ceil)."""
    ed = GraphEditor(ctx.model)
    quantized = set(ctx.plan.quantized_nodes) if ctx.plan is not None else set()
    axes = {u.tensor: u.axis for u in ctx.plan.weights} if ctx.plan is not None else {}
    weights = {}
    for tensor, entry in record["layers"].items():
        if "flips" not in entry or entry["node"] not in quantized or axes.get(tensor) != entry["axis"]:
            continue
        w = ed.const(tensor)
        q, scales, _ = quantize_weight_per_channel(w, entry["axis"], reduce_range=ctx.reduced(tensor))
        qmin, qmax = qrange("int8", True, ctx.reduced(tensor))
        shape = [1] * w.ndim
        shape[entry["axis"]] = -1
        floor = np.floor(np.asarray(w, np.float32) / scales.reshape(shape))
        other = np.clip(2 * floor + 1 - q.astype(np.float32), qmin, qmax)
        weights[tensor] = np.where(unpack(entry["flips"], w.shape), other, q).astype(np.int8)
    return Step(ctx.model, record, weights)
