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
- ``fast``: three passes (the float model with every tensor exposed, which also gives the
  reference outputs; a noise probe of it; the fully quantized model, for the baseline): the
  noise a group injects (its input Q/DQ and its weights) times how much the graph amplifies
  noise from there to the outputs (``noise_propagation``).

``meet_budget`` excludes the top-ranked groups, bisecting over how many, until a budget on
cosine, SQNR, top-1 drop or a user function is met (on the evaluation set and on 90% of its
bootstrap resamples, as tune judges), and records accuracy and latency per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from infertune import backends
from infertune.analysis.layerwise import layerwise
from infertune.analysis.noise_propagation import ActivationNoise, noise_probe, propagated_scores
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
CONFIDENCE = 0.9  # share of bootstrap resamples of the evaluation set on which a variant must meet the budget
RESAMPLES = 200


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
    """Outputs of the float model on fixed feeds, and how far a candidate is from them.

    The reference outputs are computed on first use, or adopted from a run that already went
    over the same feeds with the float model (fast sensitivity's layerwise pass).
    """

    reference: Model
    feeds: list[Feed]
    labels: np.ndarray | None = None
    settings: backends.Settings | None = None
    passes: int = 0
    _ref_outputs: list[dict[str, np.ndarray]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.feeds:
            raise UsageError("the evaluation set is empty")

    @property
    def ref_outputs(self) -> list[dict[str, np.ndarray]]:
        if self._ref_outputs is None:
            self._ref_outputs = self.run(self.reference)
        return self._ref_outputs

    @property
    def has_reference(self) -> bool:
        return self._ref_outputs is not None

    def adopt_reference(self, outputs: list[dict[str, np.ndarray]]) -> None:
        """Use ``outputs`` (the float model's, one dict per feed, in order) as the reference."""
        names = {o.name for o in self.reference.outputs}
        if len(outputs) != len(self.feeds) or any(set(o) != names for o in outputs):
            raise ValueError("reference outputs must cover every feed and every model output")
        self._ref_outputs = outputs

    def run(self, model: Model, backend: str = "ort") -> list[dict[str, np.ndarray]]:
        runner = backends.compile(model, self.settings, backend=backend)
        self.passes += 1
        return [runner.run(f) for f in self.feeds]

    def evaluate(self, model: Model, backend: str = "ort") -> dict[str, float]:
        """Accuracy of ``model`` run on ``backend`` against the reference's outputs."""
        return self.score(self.run(model, backend))

    def judge(self, outs: list[dict[str, np.ndarray]], budget: Budget) -> Verdict:
        """Does ``outs`` meet ``budget``: on the evaluation feeds, and on at least ``CONFIDENCE`` of
        ``RESAMPLES`` bootstrap resamples of them (one that passes only by the luck of which
        samples were drawn does not)."""
        metrics = self.score(outs, budget, RESAMPLES)
        point = budget.met(metrics)
        if point and metrics["confidence"] < CONFIDENCE:
            return Verdict(metrics, False, f"meets {budget} on the evaluation set, but on only "
                                           f"{metrics['confidence']:.0%} of its bootstrap resamples "
                                           f"(< {CONFIDENCE:.0%}): too close to call")
        return Verdict(metrics, point)

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


@dataclass(frozen=True)
class Verdict:
    metrics: dict[str, float]
    met: bool
    note: str = ""


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
    score: float  # exact: output NSR when it alone is quantized; fast: injected noise x gain (ranks only)

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
    passes_before, had_reference = evaluator.passes, evaluator.has_reference
    full = space.build()
    ops = {n: space.op_types[n] for n in space.groups}
    scores: dict[str, float] = {}
    if mode == "exact":
        baseline = evaluator.evaluate(full, backend)
        for i, g in enumerate(space.groups):
            scores[g] = evaluator.evaluate(space.build([o for o in space.groups if o != g]), backend)["nsr"]
            if progress:
                progress(i + 1, len(space.groups))
        passes = evaluator.passes - passes_before + had_reference  # the reference pass is part of its cost
    else:
        act_noise = ActivationNoise(full)
        outputs = [o.name for o in evaluator.reference.outputs]
        float_outputs: list[dict[str, np.ndarray]] = []

        def on_reference(tensors: dict[str, np.ndarray]) -> None:
            act_noise.add(tensors)
            if not had_reference and all(o in tensors for o in outputs):
                float_outputs.append({o: tensors[o] for o in outputs})

        lw = layerwise(evaluator.reference, noise_probe(evaluator.reference, full),
                       Dataset.from_iterable(evaluator.feeds), threshold_db=-math.inf, settings=evaluator.settings,
                       on_reference=on_reference)
        if float_outputs and len(float_outputs) == len(evaluator.feeds):
            evaluator.adopt_reference(float_outputs)  # layerwise's float pass is the reference pass
        baseline = evaluator.evaluate(full)
        scores = propagated_scores(space.groups, space.calibrated.plan.absorbed, space.source, full, lw.tensors,
                                   act_noise.nsr())
        passes = 2 + evaluator.passes - passes_before  # layerwise runs the float model and the probe once each
    groups = sorted((GroupScore(g, ops[g], scores.get(g, 0.0)) for g in space.groups), key=lambda s: -s.score)
    return SensitivityResult(mode, baseline, groups, passes, time.perf_counter() - start)


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
    note: str = ""

    def to_dict(self) -> dict:
        return {"excluded": list(self.excluded), "metrics": self.metrics, "p50_ms": self.p50_ms, "met": self.met,
                "note": self.note}


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
            v = evaluator.judge(evaluator.run(built), budget)  # one pass, the function budget's included
            steps[k] = Step(excluded, v.metrics, latency_p50(built, evaluator) if latency else None, v.met, v.note)
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
