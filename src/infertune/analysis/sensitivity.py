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
- ``fast``: two passes in all (float and quantized, every tensor exposed: ``layerwise``); the score
  is the NSR a group adds locally: at its output, minus the worst NSR at its inputs before their
  own quantization.

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
        self.ref_outputs = self._run(self.reference)

    def _run(self, model: Model) -> list[dict[str, np.ndarray]]:
        runner = backends.compile(model, self.settings)
        self.passes += 1
        return [runner.run(f) for f in self.feeds]

    def evaluate(self, model: Model) -> dict[str, float]:
        outs = self._run(model)
        sig = err = 0.0
        cosines = []
        for r, c in zip(self.ref_outputs, outs, strict=True):
            for k, ref in r.items():
                a, b = ref.astype(np.float64).ravel(), np.asarray(c[k], np.float64).ravel()
                sig += float(a @ a)
                err += float((a - b) @ (a - b))
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                cosines.append(1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
        nsr = err / sig if sig else 0.0
        out = {"nsr": nsr, "sqnr_db": math.inf if nsr == 0 else -10 * math.log10(nsr),
               "cosine": float(np.mean(cosines)), "cosine_min": float(np.min(cosines))}
        if self.labels is not None:
            key = next(iter(self.ref_outputs[0]))
            ref_pred = np.concatenate([r[key].reshape(-1, r[key].shape[-1]).argmax(-1) for r in self.ref_outputs])
            pred = np.concatenate([c[key].reshape(-1, c[key].shape[-1]).argmax(-1) for c in outs])
            labels = self.labels[: len(pred)]
            out["top1"] = 100.0 * float(np.mean(pred == labels))
            out["top1_drop"] = 100.0 * float(np.mean(ref_pred == labels)) - out["top1"]
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
                progress: Progress | None = None) -> SensitivityResult:
    if mode not in ("exact", "fast"):
        raise UsageError(f"sensitivity mode must be exact or fast, got {mode!r}")
    start = time.perf_counter()
    passes_before = evaluator.passes - 1  # the reference pass is part of every mode's cost
    full = space.build()
    ops = {n: space.op_types[n] for n in space.groups}
    scores: dict[str, float] = {}
    if mode == "exact":
        baseline = evaluator.evaluate(full)
        for i, g in enumerate(space.groups):
            scores[g] = evaluator.evaluate(space.build([o for o in space.groups if o != g]))["nsr"]
            if progress:
                progress(i + 1, len(space.groups))
        passes = evaluator.passes - passes_before
    else:
        lw = layerwise(evaluator.reference, full, Dataset.from_iterable(evaluator.feeds),
                       threshold_db=-math.inf, settings=evaluator.settings)
        outputs = {o.name for o in evaluator.reference.outputs}
        sig = sum(r.signal_power for r in lw.tensors if r.tensor in outputs)
        err = sum(r.noise_power for r in lw.tensors if r.tensor in outputs)
        nsr = err / sig if sig else 0.0
        baseline = {"nsr": nsr, "sqnr_db": math.inf if nsr == 0 else -10 * math.log10(nsr)}
        owner = {**{g: g for g in space.groups}, **space.calibrated.plan.absorbed}
        for row in lw.tensors:
            g = owner.get(row.node or "")
            if g is None or g not in ops:
                continue
            added = _nsr(row.sqnr_db) - _nsr(row.upstream_db)
            scores[g] = max(scores.get(g, 0.0), added)
        # layerwise runs float and quantized once each; the evaluator's reference pass is counted too
        passes = evaluator.passes - passes_before + 2
    groups = sorted((GroupScore(g, ops[g], scores.get(g, 0.0)) for g in space.groups), key=lambda s: -s.score)
    return SensitivityResult(mode, baseline, groups, passes, time.perf_counter() - start)


def _nsr(db: float) -> float:
    return 0.0 if math.isinf(db) and db > 0 else 10 ** (-db / 10)


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
            metrics = evaluator.evaluate(built)
            if budget.fn is not None:
                metrics["user"] = float(budget.fn(evaluator.ref_outputs, evaluator._run(built)))
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
