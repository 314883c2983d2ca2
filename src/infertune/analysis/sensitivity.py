"""Which quantized groups cost accuracy: a ranking, most sensitive first.

Sensitivity ranks the groups of a ``QuantSpace`` by their effect on the final outputs, measured
as noise-to-signal power of the outputs against the float model (NSR; SQNR = -10 log10 NSR):

- ``exact``: one group quantized at a time (all others float), one evaluation pass each; the
  score is the output NSR it causes alone. (Leaving one group out of a fully quantized model
  ranks badly where errors saturate: on rapidocr's recognizer a single early 1x1 conv alone
  takes the output to 12 dB, the whole model to 11 dB, so no single exclusion helps.)
- ``fast``: three passes (the float model with every tensor exposed, which also gives the
  reference outputs; a noise probe of it; the fully quantized model, for the baseline): the
  noise a group injects (its input Q/DQ and its weights) times how much the graph amplifies
  noise from there to the outputs (``noise_propagation``). The scores rank; they are not NSRs.

With a user ``metric`` (``fn(reference, candidate) -> float``), exact mode ranks by the metric's
loss when the group alone is quantized: how far it moves the metric from the float model's own
value (``fn(reference, reference)``) in the bad direction; ties (a single group often changes a
coarse metric such as word accuracy not at all) are ordered by output NSR. Fast mode never runs a
variant per group, so it cannot evaluate a metric: it refuses one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from infertune import backends
from infertune.analysis.accuracy import Evaluator, metric_name, user_value
from infertune.analysis.layerwise import layerwise
from infertune.analysis.noise_propagation import ActivationNoise, noise_probe, propagated_scores
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.quant.space import QuantSpace

Progress = Callable[[int, int | None], None]
SensitivityMode = Literal["exact", "fast"]
MODES: tuple[SensitivityMode, ...] = ("exact", "fast")


@dataclass(frozen=True)
class GroupScore:
    node: str
    op_type: str
    score: float  # exact: output NSR (or the metric's loss) when it alone is quantized; fast: noise x gain
    nsr: float | None = None  # exact with a metric: the output NSR that breaks ties

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "score": self.score,
                **({"nsr": self.nsr} if self.nsr is not None else {})}


@dataclass
class SensitivityResult:
    mode: SensitivityMode
    baseline: dict[str, float]  # the fully quantized model
    groups: list[GroupScore]  # most sensitive first
    forward_passes: int  # over the evaluation set, the float reference's included
    seconds: float
    backend: str = "ort"
    metric: str | None = None  # the user metric the scores are losses of

    @property
    def ranking(self) -> list[str]:
        return [g.node for g in self.groups]

    def to_dict(self) -> dict:
        return {"kind": "sensitivity", "mode": self.mode, "backend": self.backend, "metric": self.metric,
                "baseline": self.baseline,
                "forward_passes": self.forward_passes,
                "seconds": round(self.seconds, 2), "groups": [g.to_dict() for g in self.groups]}


def check_mode(mode: str, backend: str, metric: bool = False) -> None:
    """Refuse a mode the runtime (or a user metric) cannot rank with, before anything is calibrated."""
    if mode == "fast" and metric:
        raise UsageError("fast sensitivity ranks by noise propagated to the outputs and never runs one variant per "
                         "node, so it cannot evaluate a user metric: give --mode exact")
    if mode not in MODES:
        raise UsageError(f"sensitivity mode must be {' or '.join(MODES)}, got {mode!r}")
    backends.runtime(backend)  # an unknown name is refused before any pass
    if mode == "fast" and backend != backends.DEFAULT:
        raise UsageError(f"fast sensitivity measures noise gains on ONNX Runtime's activations; rank on {backend} "
                         "with --mode exact")


def sensitivity(space: QuantSpace, evaluator: Evaluator, mode: SensitivityMode = "exact",
                progress: Progress | None = None, backend: str = "ort", metric: Callable | None = None,
                higher_is_better: bool = True) -> SensitivityResult:
    """Rank ``space``'s groups, most sensitive first; ``exact`` evaluates each variant on ``backend``
    (by output NSR, or by the loss of ``metric`` when given)."""
    check_mode(mode, backend, metric is not None)
    start = time.perf_counter()
    passes_before, had_reference = evaluator.passes, evaluator.has_reference
    full = space.build()
    ops = {n: space.op_types[n] for n in space.groups}
    scores: dict[str, float] = {}
    nsr: dict[str, float] = {}
    if mode == "exact":
        score = MetricLoss(evaluator, metric, higher_is_better, backend)
        baseline = score(full)
        for i, g in enumerate(space.groups):
            alone = space.build([o for o in space.groups if o != g])
            # a group that cannot run in 8-bit alone (an Add after float convs) adds no noise alone: no pass
            m = score(alone) if alone is not space.source else {"nsr": 0.0, "loss": 0.0}
            scores[g], nsr[g] = m.get("loss", m["nsr"]), m["nsr"]
            if progress:
                progress(i + 1, len(space.groups))
        passes = evaluator.passes - passes_before + had_reference  # the reference pass is part of its cost
    else:
        act_noise = ActivationNoise(full)
        outputs = [o.name for o in evaluator.reference.outputs]
        float_outputs: list[dict[str, np.ndarray]] = []
        graph = space.float_model  # the float graph the Q/DQ sit in (prepared, or the reference itself)
        adopt = not had_reference and graph is evaluator.reference

        def on_reference(tensors: dict[str, np.ndarray]) -> None:
            act_noise.add(tensors)
            if adopt and all(o in tensors for o in outputs):
                float_outputs.append({o: tensors[o] for o in outputs})

        lw = layerwise(graph, noise_probe(graph, full),
                       Dataset.from_iterable(evaluator.feeds), threshold_db=-math.inf, settings=evaluator.settings,
                       on_reference=on_reference)
        if float_outputs and len(float_outputs) == len(evaluator.feeds):
            evaluator.adopt_reference(float_outputs)  # layerwise's float pass is the reference pass
        baseline = evaluator.evaluate(full)
        scores = propagated_scores(space.groups, space.calibrated.plan.absorbed, graph, full, lw.tensors,
                                   act_noise.nsr())
        passes = 2 + evaluator.passes - passes_before  # layerwise runs the float model and the probe once each
    with_nsr = metric is not None
    groups = sorted((GroupScore(g, ops[g], scores.get(g, 0.0), nsr.get(g) if with_nsr else None)
                     for g in space.groups), key=lambda s: (-s.score, -(s.nsr or 0.0)))
    return SensitivityResult(mode, baseline, groups, passes, time.perf_counter() - start, backend,
                             metric_name(metric) if with_nsr else None)


class MetricLoss:
    """A variant's metrics on the evaluation set; with a user metric also its value (``user``) and its
    ``loss``: how far it is from the float model's own value, in the bad direction."""

    def __init__(self, evaluator: Evaluator, metric: Callable | None, higher_is_better: bool, backend: str) -> None:
        self.evaluator, self.metric, self.sign, self.backend = evaluator, metric, 1.0 if higher_is_better else -1.0, \
            backend
        self.own = None if metric is None else user_value(metric, evaluator.ref_outputs, evaluator.ref_outputs,
                                                          evaluator.feeds)

    def __call__(self, model) -> dict[str, float]:
        outs = self.evaluator.run(model, self.backend)
        m = self.evaluator.score(outs)
        if self.metric is not None:
            m["user"] = user_value(self.metric, self.evaluator.ref_outputs, outs, self.evaluator.feeds)
            m["loss"] = self.sign * (self.own - m["user"])
        return m


