"""The float fallback of tune's INT8 search, once the accuracy algorithms have done what they can:
``rank`` the nodes by sensitivity on one runtime, ``bisect`` over how many of the most sensitive stay
float, ``prune`` the float set the bisection kept (nodes interact: the budget may need fewer).

``FloatFallback`` is a part of ``Tuner`` (search.tuner), kept apart so that each file reads as one
step of the search; it uses the tuner's ``runner``, ``evaluator``, ``budget``, ``trials``, ``ask``,
``stopped``, ``decisions``, ``rankings`` and run directory ``root``.
"""

from __future__ import annotations

import json
from dataclasses import replace

from infertune import backends
from infertune._io import write_json
from infertune.analysis.model_stats import macs_by_node
from infertune.analysis.sensitivity import sensitivity
from infertune.errors import InfertuneError
from infertune.model import Model
from infertune.search.mixed_precision import fewest_in_float
from infertune.search.trials import Trial, TrialSpec

# rank on this many evaluation feeds (a ranking needs each group's output NSR, not a verdict): rec's
# exact ranking on OpenVINO, one pass over 200 lines per group, took most of a 10-minute tune
RANK_FEEDS = 32
# float nodes the bisection kept that go back to 8-bit one at a time, at most. YOLOv8n on OpenVINO with bias
# correction: the bisection kept 17, and 15 of them could each go back alone with box F1 still >= 0.97 on the
# evaluation set (a scratch leave-one-out, no bootstrap); in the tune benchmark (0a26442, SmoothQuant + learned
# rounding + bias correction) 1 of 16 went back, the others falling under the bootstrap's 90%
PRUNE_TRIES = 8


class FloatFallback:
    def rank(self, runtime: str, best: Trial) -> list[str]:
        """The exact sensitivity ranking on ``runtime`` (on the first ``RANK_FEEDS`` evaluation feeds),
        recorded in the run directory for a resumed run."""
        algos = "".join(f"-{a}" for a in best.spec.algorithms)
        prepared = "-prepared" if best.spec.prepared else ""
        path = self.root / f"sensitivity-{best.spec.method}{algos}-{runtime}{prepared}.json"
        ranking = None
        if path.exists():
            try:
                ranking = json.loads(path.read_text())
            except ValueError:
                ranking = None
        if ranking is None:
            space = self.runner.space(best.spec.method, best.spec.target, best.spec.algorithms, best.spec.prepared)
            short = self.evaluator.subset(RANK_FEEDS)
            ranking = [g.to_dict() for g in sensitivity(space, short, mode="exact", backend=runtime).groups]
            write_json(path, ranking)
        self.rankings[runtime] = ranking
        return [r["node"] for r in ranking]

    def bisect(self, best: Trial, order: list[str]) -> list[Trial]:
        """The fewest of ``order``'s first groups kept in float for which ``best``'s variant meets the budget.

        Beyond ``most_in_float`` groups in float nothing is left to quantize (the rest are element-wise
        ops that do not run in 8-bit after float producers): such a variant is the float model, so it
        counts as "too many excluded" and is never run as a trial."""
        on = backends.runtime(best.spec.backend).on()
        space = self.runner.space(best.spec.method, best.spec.target, best.spec.algorithms, best.spec.prepared)
        limit = space.most_in_float(order)

        def spec(k: int) -> TrialSpec:
            return replace(best.spec, exclude=tuple(order[:k]))

        def meets(k: int) -> bool | None:
            if self.stopped:
                return None
            (t,) = self.ask([spec(k)]) or (None,)
            return None if t is None else t.met

        hi = fewest_in_float(meets, 0, limit + 1)  # k = 0 misses; k = limit + 1: nothing left in 8-bit
        if hi <= limit and spec(hi).key in self.trials and self.trials[spec(hi).key].met:
            self.decisions.append(f"kept the {hi} most sensitive node(s) in float{on} to meet {self.budget}: "
                                  f"{', '.join(order[:hi][:8])}{' ...' if hi > 8 else ''}")
            met = self.trials[spec(hi).key]
            pruned = self.prune(met, space.float_model)
            return [pruned, met] if pruned is not met else [met]
        self.decisions.append(f"no INT8 variant{on} with up to {limit} of its {len(order)} ranked nodes in float "
                              f"(beyond that nothing is left in 8-bit) met {self.budget}")
        return []

    def prune(self, met: Trial, float_model: Model) -> Trial:
        """The bisection keeps a prefix of a ranking measured one node at a time in float; nodes interact, so the
        budget may need fewer. Up to ``PRUNE_TRIES`` of them go back to 8-bit, one at a time, the costliest first
        (multiply-adds on the first evaluation feed): each stays 8-bit when the variant still meets the budget."""
        kept = list(met.spec.exclude)
        if len(kept) < 2:
            return met
        first = "the most multiply-adds first"
        try:
            macs = macs_by_node(float_model, self.evaluator.feeds[0])
        except InfertuneError:  # shapes it cannot infer or measure: the ranking's order, least sensitive first
            macs, first = {n: k for k, n in enumerate(kept)}, "the least sensitive first"
        best, back, tried = met, [], 0
        for node in sorted(kept, key=lambda n: -macs.get(n, 0))[:PRUNE_TRIES]:
            if self.stopped:
                break
            spec = replace(met.spec, exclude=tuple(n for n in best.spec.exclude if n != node))
            t = self.trials.get(spec.key) or next(iter(self.ask([spec])), None)  # the bisection may have run it
            tried += 1
            if t is not None and t.met:
                best = t
                back.append(node)
        on = backends.runtime(met.spec.backend).on()
        self.decisions.append(
            f"tried {tried} of the {len(kept)} float node(s){on} in 8-bit again, {first}: "
            + (f"{len(back)} stay 8-bit and {self.budget} is still met ({', '.join(back[:8])}"
               f"{' ...' if len(back) > 8 else ''}), {len(best.spec.exclude)} left in float" if back
               else "each one is needed in float"))
        return best
