"""Mixed precision to a budget: the fewest most sensitive groups kept in float.

``meet_budget`` keeps the top-k of a ranking in float for the smallest k that meets a budget
(cosine, SQNR, top-1 drop or a user function; met on the evaluation set and on 90% of its
bootstrap resamples, as tune judges), bisecting over k, and records accuracy and latency of every
step. ``fewest_in_float`` is that bisection, shared with tune's search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infertune.analysis.accuracy import Budget, Evaluator
from infertune.analysis.sensitivity import Progress, SensitivityMode, sensitivity
from infertune.data import Dataset
from infertune.errors import CheckFailed
from infertune.model import Model
from infertune.quant.quantize import QuantizeResult
from infertune.quant.space import QuantSpace


def fewest_in_float(meets: Callable[[int], bool | None], lo: int, hi: int) -> int:
    """The smallest k in (lo, hi] for which ``meets(k)``, given that k = lo misses and k = hi meets
    (accuracy assumed to grow with k). ``meets`` returns None to stop early (a trial budget spent):
    the answer is then the smallest k known to meet."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        verdict = meets(mid)
        if verdict is None:
            break
        if verdict:
            hi = mid
        else:
            lo = mid
    return hi


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
    backend: str = "ort"

    @property
    def met(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict:
        return {"budget": self.budget, "backend": self.backend, "met": self.met,
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "best": self.best.to_dict(), "steps": [s.to_dict() for s in self.steps]}


def meet_budget(space: QuantSpace, evaluator: Evaluator, budget: Budget, ranking: Sequence[str], *,
                latency: bool = True, progress: Progress | None = None, backend: str = "ort") -> BudgetResult:
    """Keep the top-k of ``ranking`` in float for the smallest k that meets ``budget`` on ``backend``."""
    steps: dict[int, Step] = {}

    def measure(k: int) -> Step:
        if k not in steps:
            excluded = tuple(ranking[:k])
            built = space.build(excluded)
            v = evaluator.judge(evaluator.run(built, backend), budget)  # one pass, the function budget's included
            p50 = latency_p50(built, evaluator, backend) if latency else None
            steps[k] = Step(excluded, v.metrics, p50, v.met, v.note)
            if progress:
                progress(len(steps), None)
        return steps[k]

    n = len(ranking)
    chosen: Step | None
    if measure(0).met:
        chosen = steps[0]
    elif not measure(n).met:
        chosen = None
    else:
        chosen = steps[fewest_in_float(lambda k: measure(k).met, 0, n)]
    ordered = [steps[k] for k in sorted(steps)]
    best = max(ordered, key=lambda s: s.metrics["sqnr_db"] if budget.fn is None else budget.goodness(s.metrics))
    model = space.build(chosen.excluded if chosen else best.excluded)
    return BudgetResult(str(budget), ordered, chosen, best, model, backend)


def quantize_to_budget(space: QuantSpace, evaluator: Evaluator, budget: Budget, *, rank: SensitivityMode = "exact",
                       backend: str = "ort", progress: Progress | None = None) -> tuple[QuantizeResult, BudgetResult]:
    """Rank ``space``'s groups on ``backend``, then keep the fewest in float to meet ``budget``.

    Raises ``CheckFailed`` (carrying the steps) when only the float model meets it."""
    ranking = sensitivity(space, evaluator, mode=rank, progress=progress, backend=backend).ranking
    br = meet_budget(space, evaluator, budget, ranking, progress=progress, backend=backend)
    if br.chosen is None:
        raise CheckFailed(f"budget {budget} is not met even with every node in float (the FP32 model itself "
                          f"misses it); nothing written", br)
    if len(br.chosen.excluded) == len(space.groups):
        raise CheckFailed(f"budget {budget} is only met with every node in float: INT8 does not fit this budget "
                          f"(all-INT8: SQNR {br.steps[0].metrics['sqnr_db']:.1f} dB); nothing written", br)
    return space.result(br.chosen.excluded), br


def latency_p50(model: Model, evaluator: Evaluator, backend: str = "ort") -> float:
    """p50 latency (ms) of ``model`` on the first evaluation feed, with the evaluator's settings."""
    from infertune.perf.latency import bench

    r = bench(model, Dataset.from_iterable(evaluator.feeds[:1]), settings=evaluator.settings, warmup=3,
              time_budget_s=0.5, backend=backend)
    return r.latency_ms.p50
