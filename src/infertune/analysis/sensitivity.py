"""Which quantized nodes cost accuracy, and the fewest to keep in float to meet a budget.

A *group* is one quantized node with its input Q/DQ, its weight and the activation it absorbs.
``QuantSpace`` holds one calibration (``quantize(..., observe_all=True)``) from which the model
for any set of excluded groups is built in memory, without data.

Sensitivity ranks groups by their effect on the final outputs, measured as noise-to-signal
power of the outputs against the float model (NSR; SQNR = -10 log10 NSR):

- ``exact``: one group quantized at a time (all others float), one evaluation pass each; the
  score is the output NSR it causes alone. (Leaving one group out of a fully quantized model
  ranks badly where errors saturate: on rapidocr's recognizer a single early 1x1 conv alone
  takes the output to 12 dB, the whole model to 11 dB, so no single exclusion helps.)
- ``fast``: one layerwise run (float and quantized, every tensor exposed) besides the reference
  pass: the noise a group injects (its input Q/DQ and its weights) times how much the graph
  amplifies noise from there to the outputs (``propagated_scores``).

``meet_budget`` excludes the top-ranked groups, bisecting over how many, until a budget on
cosine, SQNR, top-1 drop or a user function is met, and records accuracy and latency per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from infertune import backends
from infertune.analysis.layerwise import layerwise
from infertune.checks import Check
from infertune.data import Dataset
from infertune.errors import CalibrationError, UsageError
from infertune.model import Model
from infertune.quant.placement import TARGETS
from infertune.quant.qdq import ensure_opset
from infertune.quant.quantize import QuantizeResult, rebuild

Feed = dict[str, np.ndarray]
Progress = Callable[[int, int | None], None]
METRICS = ("cosine", "sqnr_db", "top1_drop")


class QuantSpace:
    """A calibrated model and every Q/DQ variant of it that excludes some groups."""

    def __init__(self, source: Model, calibrated: QuantizeResult) -> None:
        self.source = source
        self.calibrated = calibrated
        rules = TARGETS[calibrated.plan.target]
        converted = ensure_opset(source)
        self.op_types = {n.name: n.op_type for n in converted.graph.node}
        self.groups = [n for n in calibrated.plan.quantized_nodes if self.op_types[n] not in rules.passthrough_ops]
        self._cache: dict[frozenset[str], Model] = {}

    def result(self, excluded: Sequence[str] = ()) -> QuantizeResult:
        """The full result (model, recipe, plan) of one exclusion set; some group must remain."""
        recipe = replace(self.calibrated.recipe, exclusions=[*self.calibrated.recipe.exclusions, *excluded])
        return rebuild(self.source, recipe, check_source=False)

    def build(self, excluded: Sequence[str] = ()) -> Model:
        """The Q/DQ model with ``excluded`` groups in float (the float model when none is left)."""
        key = frozenset(excluded)
        if key not in self._cache:
            try:
                self._cache[key] = self.source if set(self.groups) <= key else self.result(sorted(key)).model
            except CalibrationError:  # what is left cannot run in 8-bit on its own (an Add without its convs)
                self._cache[key] = self.source
        return self._cache[key]


@dataclass
class Evaluator:
    """Outputs of the float model on fixed feeds, and how far a candidate is from them."""

    reference: Model
    feeds: list[Feed]
    labels: np.ndarray | None = None
    settings: backends.Settings | None = None
    ref_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    passes: int = 0

    def __post_init__(self) -> None:
        if not self.feeds:
            raise UsageError("the evaluation set is empty")
        self.ref_outputs = self.run(self.reference)

    def run(self, model: Model, backend: str = "ort") -> list[dict[str, np.ndarray]]:
        runner = backends.compile(model, self.settings, backend=backend)
        self.passes += 1
        return [runner.run(f) for f in self.feeds]

    def evaluate(self, model: Model, backend: str = "ort") -> dict[str, float]:
        """Accuracy of ``model`` run on ``backend`` against the reference's outputs."""
        return self.score(self.run(model, backend))

    def score(self, outs: list[dict[str, np.ndarray]], budget: Budget | None = None,
              resamples: int = 0) -> dict[str, float]:
        """Metrics of ``outs`` (one dict per feed) against the reference outputs.

        With a function ``budget``, its value is ``user``. With ``resamples``, and when the budget
        holds, ``confidence`` is the share of bootstrap resamples of the evaluation feeds (seeded:
        the same for every model) on which it still holds: a variant that meets a budget only by
        the luck of which samples were drawn scores low there.
        """
        per = _PerSample(self.ref_outputs, outs, self.labels)
        out = per.metrics(np.arange(len(outs)))
        if budget is not None and budget.fn is not None:
            out["user"] = float(budget.fn(self.ref_outputs, outs))
        if budget is not None and resamples and budget.met(out):
            rng = np.random.default_rng(0)
            held = 0
            for _ in range(resamples):
                idx = rng.integers(0, len(outs), len(outs))
                m = per.metrics(idx)
                if budget.fn is not None:
                    m["user"] = float(budget.fn([self.ref_outputs[i] for i in idx], [outs[i] for i in idx]))
                held += budget.met(m)
            out["confidence"] = held / resamples
        return out


class _PerSample:
    """Per evaluation feed: signal and error power, cosine per output, top-1 hits; metrics of any subset."""

    def __init__(self, refs: list[dict[str, np.ndarray]], outs: list[dict[str, np.ndarray]],
                 labels: np.ndarray | None) -> None:
        n = len(refs)
        self.sig, self.err = np.zeros(n), np.zeros(n)
        self.cos: list[list[float]] = []
        for j, (r, c) in enumerate(zip(refs, outs, strict=True)):
            cos = []
            for k, ref in r.items():
                a, b = ref.astype(np.float64).ravel(), np.asarray(c[k], np.float64).ravel()
                self.sig[j] += float(a @ a)
                self.err[j] += float((a - b) @ (a - b))
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                cos.append(1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
            self.cos.append(cos)
        self.hits: np.ndarray | None = None
        if labels is not None:
            key = next(iter(refs[0]))
            rows = [r[key].reshape(-1, r[key].shape[-1]).shape[0] for r in refs]
            ref_pred = np.concatenate([r[key].reshape(-1, r[key].shape[-1]).argmax(-1) for r in refs])
            pred = np.concatenate([c[key].reshape(-1, c[key].shape[-1]).argmax(-1) for c in outs])
            lab = labels[: len(pred)]
            ends = np.cumsum(rows)[:-1]
            self.hits = np.array([[a.sum(), b.sum(), len(a)] for a, b in
                                  zip(np.split(pred == lab, ends), np.split(ref_pred == lab, ends), strict=True)])

    def metrics(self, idx: np.ndarray) -> dict[str, float]:
        sig, err = float(self.sig[idx].sum()), float(self.err[idx].sum())
        nsr = err / sig if sig else 0.0
        cos = [c for i in idx for c in self.cos[i]]
        out = {"nsr": nsr, "sqnr_db": math.inf if nsr == 0 else -10 * math.log10(nsr),
               "cosine": float(np.mean(cos)), "cosine_min": float(np.min(cos))}
        if self.hits is not None:
            hit, ref_hit, rows = self.hits[idx].sum(axis=0)
            out["top1"] = 100.0 * hit / rows
            out["top1_drop"] = 100.0 * ref_hit / rows - out["top1"]
        return out


@dataclass(frozen=True)
class GroupScore:
    node: str
    op_type: str
    score: float  # exact: output NSR when it alone is quantized; fast: NSR it adds locally

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "score": self.score}


@dataclass
class SensitivityResult:
    mode: str
    baseline: dict[str, float]  # the fully quantized model
    groups: list[GroupScore]  # most sensitive first
    forward_passes: int  # over the evaluation set, the float reference's included
    seconds: float

    @property
    def ranking(self) -> list[str]:
        return [g.node for g in self.groups]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "baseline": self.baseline, "forward_passes": self.forward_passes,
                "seconds": round(self.seconds, 2), "groups": [g.to_dict() for g in self.groups]}


def sensitivity(space: QuantSpace, evaluator: Evaluator, mode: str = "exact",
                progress: Progress | None = None, backend: str = "ort") -> SensitivityResult:
    """Rank ``space``'s groups, most sensitive first; ``exact`` evaluates each variant on ``backend``."""
    if mode not in ("exact", "fast"):
        raise UsageError(f"sensitivity mode must be exact or fast, got {mode!r}")
    if mode == "fast" and backend != "ort":
        raise UsageError("fast sensitivity propagates noise through ONNX Runtime's activations; "
                         f"use exact mode to rank on {backend}")
    start = time.perf_counter()
    passes_before = evaluator.passes - 1  # the reference pass is part of every mode's cost
    full = space.build()
    ops = {n: space.op_types[n] for n in space.groups}
    scores: dict[str, float] = {}
    if mode == "exact":
        baseline = evaluator.evaluate(full, backend)
        for i, g in enumerate(space.groups):
            scores[g] = evaluator.evaluate(space.build([o for o in space.groups if o != g]), backend)["nsr"]
            if progress:
                progress(i + 1, len(space.groups))
        passes = evaluator.passes - passes_before
    else:
        act_noise = ActivationNoise(full)
        lw = layerwise(evaluator.reference, full, Dataset.from_iterable(evaluator.feeds),
                       threshold_db=-math.inf, settings=evaluator.settings, on_reference=act_noise.add)
        outputs = {o.name for o in evaluator.reference.outputs}
        sig = sum(r.signal_power for r in lw.tensors if r.tensor in outputs)
        err = sum(r.noise_power for r in lw.tensors if r.tensor in outputs)
        nsr = err / sig if sig else 0.0
        baseline = {"nsr": nsr, "sqnr_db": math.inf if nsr == 0 else -10 * math.log10(nsr)}
        scores = propagated_scores(space, full, lw.tensors, act_noise.nsr())
        # layerwise runs float and quantized once each; the evaluator's reference pass is counted too
        passes = evaluator.passes - passes_before + 2
    groups = sorted((GroupScore(g, ops[g], scores.get(g, 0.0)) for g in space.groups), key=lambda s: -s.score)
    return SensitivityResult(mode, baseline, groups, passes, time.perf_counter() - start)


def _nsr(db: float | None) -> float:
    return 0.0 if db is None or (math.isinf(db) and db > 0) else 10 ** (-db / 10)


MAX_GAIN = 10.0  # a larger cap lets one badly measured gain dominate (Spearman vs exact: rec 0.87, MiniLM 0.75)
ADDITIVE = frozenset({"Add", "Sub", "Sum", "Concat"})


class ActivationNoise:
    """Noise-to-signal power of each activation's own Q/DQ, applied to the float values.

    Measured on float activations rather than as the NSR difference across the Q/DQ in the
    quantized run: deep in a quantized model the upstream noise dwarfs one Q/DQ's own.
    """

    def __init__(self, qdq: Model) -> None:
        from onnx import numpy_helper

        consts = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
        self.params: dict[str, tuple[float, float, int, int]] = {}
        for n in qdq.graph.node:
            if n.op_type != "QuantizeLinear" or n.input[0] in consts or n.input[1] not in consts:
                continue
            scale = consts[n.input[1]]
            zp = consts.get(n.input[2]) if len(n.input) > 2 else None
            if scale.size != 1:
                continue
            info = np.iinfo(zp.dtype if zp is not None else np.uint8)
            self.params[n.input[0]] = (float(scale.ravel()[0]), float(zp.ravel()[0]) if zp is not None else 0.0,
                                       info.min, info.max)
        self.noise: dict[str, float] = dict.fromkeys(self.params, 0.0)
        self.signal: dict[str, float] = dict.fromkeys(self.params, 0.0)

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        for t, (scale, zp, lo, hi) in self.params.items():
            x = tensors.get(t)
            if x is None or x.dtype.kind != "f":
                continue
            x = np.asarray(x, np.float32).ravel()
            if not np.isfinite(x).all():
                x = np.where(np.isfinite(x), x, np.float32(0))
            deq = np.rint(x / np.float32(scale))
            deq += np.float32(zp)
            np.clip(deq, lo, hi, out=deq)
            deq -= np.float32(zp)
            deq *= np.float32(scale)
            deq -= x  # now the error
            self.noise[t] += float(np.dot(deq, deq))
            self.signal[t] += float(np.dot(x, x))

    def nsr(self) -> dict[str, float]:
        return {t: self.noise[t] / self.signal[t] for t in self.params if self.signal[t] > 0}


def propagated_scores(space: QuantSpace, full: Model, rows: Sequence,
                      act_nsr: dict[str, float]) -> dict[str, float]:
    """Fast sensitivity: the noise each group injects, times how much the graph amplifies it.

    From one layerwise run of the fully quantized model: a quantized activation's own Q/DQ adds
    the NSR ``act_nsr`` measures on the float values (``ActivationNoise``); a group's weights add
    their quantization NSR (computed from the Q/DQ constants, no data). Each node's noise gain is
    what its output carries beyond its own weights' noise, over the worst NSR at its inputs (for
    Add, Sub, Sum and Concat, per input: its signal power over the output's, since their noise
    simply adds); a reverse pass over the graph turns these into the gain from every tensor to
    the model outputs (1 at an output, the largest over a tensor's readers elsewhere). A group's
    score: the noise of its input Q/DQ times their gain, plus its weight noise times the gain of
    its output.
    """
    src = space.source
    after = {r.tensor: _nsr(r.sqnr_db) for r in rows}
    before = {r.tensor: _nsr(r.raw_sqnr_db) if r.raw_sqnr_db is not None else after[r.tensor] for r in rows}
    w_nsr = _weight_nsr(src, full)
    nodes = {n.name: n for n in src.graph.node}
    readers: dict[str, list] = {}
    for n in src.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    power = {r.tensor: r.signal_power for r in rows}
    gain_of: dict[str, float] = {}
    for n in src.graph.node:
        ins = [after[i] for i in n.input if i in after]
        outs = [before[o] for o in n.output if o in before]
        worst_in = max(ins, default=0.0)
        if not outs or worst_in <= 0.0:
            gain_of[n.name] = 1.0
        else:
            gain_of[n.name] = min(max(max(outs) - w_nsr.get(n.name, 0.0), 0.0) / worst_in, MAX_GAIN)

    def gain(n, i: str) -> float:
        """How much of input ``i``'s NSR reaches ``n``'s output."""
        if n.op_type in ADDITIVE and i in power and n.output[0] in power and power[n.output[0]] > 0:
            return min(power[i] / power[n.output[0]], MAX_GAIN)  # noise adds; the signal it is measured against grows
        return gain_of[n.name]

    to_output: dict[str, float] = {o.name: 1.0 for o in src.outputs}
    for n in reversed(src.graph.node):  # topological order, reversed
        g_out = max((to_output.get(o, 0.0) for o in n.output), default=0.0)
        for i in n.input:
            to_output[i] = max(to_output.get(i, 0.0), gain(n, i) * g_out)
    scores = {}
    last = {g: g for g in space.groups}
    for absorbed, producer in space.calibrated.plan.absorbed.items():
        if producer in last:
            last[producer] = absorbed
    for g in space.groups:
        node = nodes.get(g)
        if node is None:
            continue
        out_gain = max((to_output.get(o, 0.0) for o in nodes[last[g]].output), default=0.0)
        injected = sum(act_nsr.get(i, 0.0) * to_output.get(i, 0.0) for i in node.input)
        scores[g] = injected + w_nsr.get(g, 0.0) * out_gain
    return scores


def _weight_nsr(source: Model, qdq: Model) -> dict[str, float]:
    """Per node of the Q/DQ model: quantization noise-to-signal power of the weights it reads."""
    from onnx import numpy_helper

    consts = {i.name: i for i in qdq.graph.initializer}
    src_consts = source.constant_tensors()
    dequantized: dict[str, float] = {}
    for n in qdq.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in consts:
            continue
        w_name = n.input[0].removesuffix("_quantized")
        w = src_consts.get(w_name)
        if w is None or len(n.input) < 2 or n.input[1] not in consts:
            continue
        q = numpy_helper.to_array(consts[n.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(consts[n.input[1]]).astype(np.float64)
        zp = (numpy_helper.to_array(consts[n.input[2]]).astype(np.float64)
              if len(n.input) > 2 and n.input[2] in consts else np.zeros_like(scale))
        if scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        w = np.asarray(w, np.float64)
        if w.shape != q.shape:
            continue
        err = float(np.sum((w - (q - zp) * scale) ** 2))
        sig = float(np.sum(w**2))
        dequantized[n.output[0]] = err / sig if sig else 0.0
    out: dict[str, float] = {}
    for n in qdq.graph.node:
        for i in n.input:
            if i in dequantized:
                out[n.name] = out.get(n.name, 0.0) + dequantized[i]
    return out


# ---- mixed precision to a budget ------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """'cosine>=0.999', 'sqnr_db>=30', 'top1_drop<=0.5', or a function(ref_outputs, outputs) -> bool."""

    check: Check | None = None
    fn: Callable[[list[dict], list[dict]], float] | None = None
    fn_min: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        c = Check.parse(text, metrics=(*METRICS, "sqnr"))
        return cls(Check("sqnr_db", c.op, c.threshold) if c.metric == "sqnr" else c)

    def met(self, metrics: dict[str, float]) -> bool:
        if self.check is None:
            return metrics["user"] >= (self.fn_min or 0.0)
        if self.check.metric not in metrics:
            raise UsageError(f"budget on {self.check.metric} needs labels in the evaluation data")
        return self.check.passes(metrics[self.check.metric])

    def __str__(self) -> str:
        return str(self.check) if self.check else f"user function >= {self.fn_min}"


@dataclass(frozen=True)
class Step:
    excluded: tuple[str, ...]
    metrics: dict[str, float]
    p50_ms: float | None
    met: bool

    def to_dict(self) -> dict:
        return {"excluded": list(self.excluded), "metrics": self.metrics, "p50_ms": self.p50_ms, "met": self.met}


@dataclass
class BudgetResult:
    budget: str
    steps: list[Step]  # in the order they were measured
    chosen: Step | None  # the fewest exclusions that met the budget
    best: Step  # the most accurate seen (the best reachable when nothing met it)
    model: Model

    @property
    def met(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict:
        return {"budget": self.budget, "met": self.met, "chosen": self.chosen.to_dict() if self.chosen else None,
                "best": self.best.to_dict(), "steps": [s.to_dict() for s in self.steps]}


def meet_budget(space: QuantSpace, evaluator: Evaluator, budget: Budget, ranking: Sequence[str], *,
                latency: bool = True, progress: Progress | None = None) -> BudgetResult:
    """Keep the top-k of ``ranking`` in float for the smallest k that meets ``budget`` (bisection)."""
    steps: dict[int, Step] = {}

    def measure(k: int) -> Step:
        if k not in steps:
            excluded = tuple(ranking[:k])
            built = space.build(excluded)
            metrics = evaluator.score(evaluator.run(built), budget)  # one pass, the function budget's included
            steps[k] = Step(excluded, metrics, latency_p50(built, evaluator) if latency else None, budget.met(metrics))
            if progress:
                progress(len(steps), None)
        return steps[k]

    n = len(ranking)
    lo, hi = 0, n
    if measure(0).met:
        hi = 0
    elif not measure(n).met:
        lo = hi = None
    else:
        while hi - lo > 1:  # invariant: k=lo fails, k=hi meets
            mid = (lo + hi) // 2
            if measure(mid).met:
                hi = mid
            else:
                lo = mid
    ordered = [steps[k] for k in sorted(steps)]
    chosen = steps[hi] if hi is not None else None
    best = max(ordered, key=lambda s: s.metrics["sqnr_db"])
    model = space.build(chosen.excluded if chosen else best.excluded)
    return BudgetResult(str(budget), ordered, chosen, best, model)


def latency_p50(model: Model, evaluator: Evaluator) -> float:
    """p50 latency (ms) of ``model`` on the first evaluation feed, with the evaluator's settings."""
    from infertune.bench.latency import bench

    r = bench(model, Dataset.from_iterable(evaluator.feeds[:1]), settings=evaluator.settings, warmup=3,
              time_budget_s=0.5)
    return r.latency_ms.p50
