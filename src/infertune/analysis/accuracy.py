"""How far a candidate's outputs are from the float model's, and whether that meets a budget.

``Budget``: 'cosine>=0.999', 'sqnr_db>=30', 'top1_drop<=0.5', or a user function. ``Evaluator``:
the float model's outputs on fixed evaluation feeds (computed once, or adopted from a pass that
already ran the float model), the metrics of a candidate against them, and ``judge``: met on the
evaluation feeds *and* on at least ``CONFIDENCE`` of ``RESAMPLES`` bootstrap resamples of them,
so that a variant which passes only by the luck of which samples were drawn is not taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from infertune import backends
from infertune.analysis.labels import check_labels
from infertune.checks import Check
from infertune.errors import DataError, UsageError
from infertune.model import Model

Feed = dict[str, np.ndarray]
METRICS = ("cosine", "sqnr_db", "top1_drop")
FP32_METRICS = {"cosine": 1.0, "sqnr_db": math.inf, "top1_drop": 0.0}  # the float model against itself
CONFIDENCE = 0.9  # share of bootstrap resamples of the evaluation set on which a variant must meet the budget
RESAMPLES = 200


@dataclass(frozen=True)
class Budget:
    """'cosine>=0.999', 'sqnr_db>=30', 'top1_drop<=0.5', or a function(ref_outputs, outputs) -> bool."""

    check: Check | None = None
    fn: Callable[[list[dict], list[dict]], float] | None = None
    fn_min: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        """The budget of ``text``; one that FP32 itself cannot meet (cosine>=1.5, top1_drop>=0.5:
        a bound in the wrong direction or out of the metric's range) is refused."""
        c = Check.parse(text, metrics=(*METRICS, "sqnr"))
        budget = cls(Check("sqnr_db", c.op, c.threshold) if c.metric == "sqnr" else c)
        exact = FP32_METRICS[budget.check.metric]  # type: ignore[union-attr]
        if not budget.check.passes(exact):  # type: ignore[union-attr]
            raise UsageError(f"budget {text!r} cannot be met even by the FP32 model itself ({c.metric} {exact:g} "
                             "against itself): give a bound FP32 meets and INT8 may, e.g. 'cosine>=0.999', "
                             "'sqnr>=30' or 'top1_drop<=0.5'")
        return budget

    def met(self, metrics: dict[str, float]) -> bool:
        if self.check is None:
            return metrics["user"] >= (self.fn_min or 0.0)
        if self.check.metric not in metrics:
            raise UsageError(f"budget on {self.check.metric} needs labels in the evaluation data")
        return self.check.passes(metrics[self.check.metric])

    def __str__(self) -> str:
        return str(self.check) if self.check else f"user function >= {self.fn_min}"


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
    label_source: str = "labels"  # where the labels came from, for messages
    _ref_outputs: list[dict[str, np.ndarray]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.feeds:
            raise UsageError("the evaluation set is empty")
        if self.labels is not None:
            scores = self.reference.outputs[0]
            rows = None  # one label per sample when the scores are [N, classes]
            firsts = [next(iter(f.values()), None) for f in self.feeds]
            if scores.shape is not None and len(scores.shape) == 2 and all(a is not None and a.ndim for a in firsts):
                rows = sum(int(a.shape[0]) for a in firsts)
            self.labels = check_labels(self.labels, where=self.label_source, rows=rows, classes=self.classes,
                                       output=scores.name)

    @property
    def classes(self) -> int | None:
        """The class count of the first output (the one top-1 reads), when its shape says it."""
        shape = self.reference.outputs[0].shape
        return shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None

    def check_labels(self) -> None:
        """Labels against the class count of the reference outputs (run now when the model's
        shape does not say it), so a bad label is a DataError before any search starts."""
        if self.labels is None or self.classes is not None:
            return
        first = self.ref_outputs[0][self.reference.outputs[0].name]
        check_labels(self.labels, where=self.label_source, classes=int(first.shape[-1]),
                     output=self.reference.outputs[0].name)

    @classmethod
    def from_dataset(cls, reference: Model, data: Iterable[Feed], samples: int,
                     settings: backends.Settings | None = None) -> Evaluator:
        """The first ``samples`` valid feeds of ``data`` (and their labels, when every one has them)."""
        from infertune.data import FeedValidator

        validator = FeedValidator(reference)
        name = getattr(data, "name", "the evaluation data")
        feeds, labels = [], []
        for raw in data:
            clean = validator(raw)
            if clean is None:
                continue
            feeds.append(clean)
            if "label" in raw:
                labels.append(np.asarray(raw["label"]).reshape(-1))
            if len(feeds) >= samples:
                break
        validator.finish(name)
        if validator.all_constant():
            raise DataError(f"evaluation data {name}: every input is constant ({validator.constant_text()}): "
                            "accuracy measured on it says nothing; give representative samples")
        lab = np.concatenate(labels) if labels and len(labels) == len(feeds) else None
        evaluator = cls(reference, feeds, labels=lab, settings=settings, label_source=f"'label' in {name}")
        evaluator.check_labels()
        return evaluator

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

    def run(self, model: Model, backend: str = "ort",
            settings: backends.Settings | None = None) -> list[dict[str, np.ndarray]]:
        """``model``'s outputs on every feed on ``backend`` (with ``settings``, default the evaluator's);
        compiled for the feeds' shapes when they all share them."""
        settings = settings or self.settings or backends.Settings()
        if not settings.static_shapes:
            settings = replace(settings, static_shapes=backends.static_shapes(self.feeds))
        runner = backends.compile(model, settings, backend=backend)
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


