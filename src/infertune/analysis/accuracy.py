"""How far a candidate's outputs are from the float model's, and whether that meets a budget.

``Budget``: 'cosine>=0.999', 'sqnr_db>=30', 'top1_drop<=0.5', or a user function (>= or <= a value). ``Evaluator``:
the float model's outputs on fixed evaluation feeds (computed once, or adopted from a pass that
already ran the float model), the metrics of a candidate against them, and ``judge``: met on the
evaluation feeds *and* on at least ``CONFIDENCE`` of ``RESAMPLES`` bootstrap resamples of them,
so that a variant which passes only by the luck of which samples were drawn is not taken.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from infertune import backends
from infertune.analysis.labels import check_labels
from infertune.checks import Check
from infertune.errors import DataError, UsageError, UserCodeError
from infertune.model import Model

Feed = dict[str, np.ndarray]
METRICS = ("cosine", "sqnr_db", "top1_drop")
FP32_METRICS = {"cosine": 1.0, "sqnr_db": math.inf, "top1_drop": 0.0}  # the float model against itself
CONFIDENCE = 0.9  # share of bootstrap resamples of the evaluation set on which a variant must meet the budget
RESAMPLES = 200


@dataclass(frozen=True)
class Budget:
    """'cosine>=0.999', 'sqnr_db>=30', 'top1_drop<=0.5', or a user metric: ``fn(reference, candidate) -> float``
    (the float model's and the candidate's outputs, one ``{output_name: array}`` per feed; written with a
    third parameter, ``fn(reference, candidate, feeds)``, it also gets the feeds those came from; it returns a
    float, or one float per feed, whose mean is the metric) that must stay
    ``>= fn_min`` (higher is better) or ``<= fn_max`` (lower is better)."""

    check: Check | None = None
    fn: Callable[[list[dict], list[dict]], float] | None = None
    fn_min: float | None = None
    fn_max: float | None = None

    def __post_init__(self) -> None:
        if (self.check is None) == (self.fn is None):
            raise UsageError("a budget is either a metric check ('cosine>=0.999') or a function, not both or neither")
        if self.fn is not None and self.fn_min is not None and self.fn_max is not None:
            raise UsageError("a function budget has a minimum (higher is better) or a maximum, not both")

    @classmethod
    def parse(cls, text: str, metric: Callable[[list[dict], list[dict]], float] | None = None) -> Budget:
        """The budget of ``text`` on a built-in metric (one that FP32 itself cannot meet, cosine>=1.5 or
        top1_drop>=0.5: a bound in the wrong direction or out of the metric's range, is refused), or with
        ``metric`` (a user function): 'metric>=X' / 'metric<=X'."""
        if metric is None:
            c = Check.parse(text, metrics=(*METRICS, "sqnr"))
            budget = cls(Check("sqnr_db", c.op, c.threshold) if c.metric == "sqnr" else c)
            exact = FP32_METRICS[budget.check.metric]  # type: ignore[union-attr]
            if not budget.check.passes(exact):  # type: ignore[union-attr]
                raise UsageError(f"budget {text!r} cannot be met even by the FP32 model itself ({c.metric} "
                                 f"{exact:g} against itself): give a bound FP32 meets and INT8 may, e.g. "
                                 "'cosine>=0.999', 'sqnr>=30' or 'top1_drop<=0.5'")
            return budget
        c = Check.parse(text, metrics=tuple(dict.fromkeys(("metric", metric_name(metric)))))
        if c.op not in (">=", "<="):
            raise UsageError(f"a metric budget is 'metric>=X' (higher is better) or 'metric<=X', got {text!r}")
        return cls(fn=metric, fn_min=c.threshold if c.op == ">=" else None,
                   fn_max=c.threshold if c.op == "<=" else None)

    @property
    def fn_check(self) -> Check | None:
        """The function budget as a check on its value, named by the function ('word_accuracy>=0.95')."""
        if self.fn is None:
            return None
        if self.fn_max is not None:
            return Check(metric_name(self.fn), "<=", self.fn_max)
        return Check(metric_name(self.fn), ">=", self.fn_min or 0.0)

    @property
    def name(self) -> str:
        """The metric the budget is on: a built-in one, or the user function's name."""
        return self.check.metric if self.check is not None else metric_name(self.fn)

    def goodness(self, metrics: dict[str, float]) -> float:
        """A function budget's value, signed so that larger is better."""
        return metrics["user"] if self.fn_max is None else -metrics["user"]

    def met(self, metrics: dict[str, float]) -> bool:
        if self.check is None:
            return self.fn_check.passes(metrics["user"])
        if self.check.metric not in metrics:
            raise UsageError(f"budget on {self.check.metric} needs labels in the evaluation data")
        return self.check.passes(metrics[self.check.metric])

    def __str__(self) -> str:
        return str(self.check if self.check is not None else self.fn_check)


def metric_name(fn: object) -> str:
    """What reports call a user metric: its function's name, or its class's for a callable object
    ('user function' for a lambda)."""
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return name if isinstance(name, str) and name.isidentifier() else "user function"


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

    def subset(self, n: int) -> Evaluator:
        """The first ``n`` feeds, with their reference outputs when already computed, and no labels:
        output metrics (NSR, cosine) for a fraction of a pass's work, for a ranking."""
        if n >= len(self.feeds):
            return self
        sub = Evaluator(self.reference, self.feeds[:n], settings=self.settings)
        if self.has_reference:
            sub.adopt_reference(self.ref_outputs[:n])
        return sub

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
        return judge_samples(PerSample.measure(self.ref_outputs, outs), self.labels, budget, self.ref_outputs, outs,
                             self.feeds)

    def score(self, outs: list[dict[str, np.ndarray]], budget: Budget | None = None,
              resamples: int = 0) -> dict[str, float]:
        """Metrics of ``outs`` (one dict per feed) against the reference outputs.

        With a function ``budget``, its value is ``user``. With ``resamples``, and when the budget
        holds, ``confidence`` is the share of bootstrap resamples of the evaluation feeds (seeded:
        the same for every model) on which it still holds: a variant that meets a budget only by
        the luck of which samples were drawn scores low there.
        """
        per = PerSample.measure(self.ref_outputs, outs)
        return score_samples(per, self.labels, budget, resamples, self.ref_outputs, outs, self.feeds)


@dataclass(frozen=True)
class Verdict:
    metrics: dict[str, float]
    met: bool
    note: str = ""


def judge_samples(per: PerSample, labels: np.ndarray | None, budget: Budget,
                  refs: list[dict[str, np.ndarray]] | None = None,
                  outs: list[dict[str, np.ndarray]] | None = None, feeds: list[Feed] | None = None) -> Verdict:
    """``Evaluator.judge`` on per-sample sums (one evaluation set's, or the shards' combined)."""
    metrics = score_samples(per, labels, budget, RESAMPLES, refs, outs, feeds)
    point = budget.met(metrics)
    if point and metrics["confidence"] < CONFIDENCE:
        return Verdict(metrics, False, f"meets {budget} on the evaluation set, but on only "
                                       f"{metrics['confidence']:.0%} of its bootstrap resamples "
                                       f"(< {CONFIDENCE:.0%}): too close to call")
    return Verdict(metrics, point)


def score_samples(per: PerSample, labels: np.ndarray | None, budget: Budget | None = None, resamples: int = 0,
                  refs: list[dict[str, np.ndarray]] | None = None,
                  outs: list[dict[str, np.ndarray]] | None = None, feeds: list[Feed] | None = None) -> dict[str, float]:
    """``Evaluator.score`` from per-sample sums; a function budget also needs ``refs`` and ``outs`` (and
    ``feeds`` when it takes them)."""
    hits = per.hits(labels)
    n = per.count
    out = per.metrics(np.arange(n), hits)
    fn = budget.fn if budget is not None else None
    per_feed = None
    if fn is not None:
        if refs is None or outs is None:
            raise ValueError("a function budget needs the reference and candidate outputs")
        out["user"], per_feed = user_samples(fn, refs, outs, feeds)
    if budget is not None and resamples and budget.met(out):
        rng = np.random.default_rng(0)
        held = 0
        for _ in range(resamples):
            idx = rng.integers(0, n, n)
            m = per.metrics(idx, hits)
            if fn is not None and per_feed is not None:
                m["user"] = float(np.mean(per_feed[idx]))
            elif fn is not None:
                m["user"] = user_value(fn, [refs[i] for i in idx], [outs[i] for i in idx],
                                       None if feeds is None else [feeds[i] for i in idx])
            held += budget.met(m)
        out["confidence"] = held / resamples
    return out


def takes_feeds(fn: Callable) -> bool:
    """A metric written ``FUNC(reference, candidate, feeds)`` also gets the evaluation feeds, resampled with
    the outputs (mean pooling over an attention mask, boxes scaled to each image's size)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def user_value(fn: Callable, refs: list[dict], outs: list[dict], feeds: list[Feed] | None = None) -> float:
    """The user function's value (the mean, when it gives one value per feed)."""
    return user_samples(fn, refs, outs, feeds)[0]


def user_samples(fn: Callable, refs: list[dict], outs: list[dict],
                 feeds: list[Feed] | None = None) -> tuple[float, np.ndarray | None]:
    """The user function's value, and its value per feed when it returns one per feed (a mean over
    feeds, such as word accuracy: then bootstrap resamples are averaged from those, not computed
    again). Anything but a real number, or one per feed, is the user's error, said so."""
    if takes_feeds(fn):
        if feeds is None or len(feeds) != len(refs):
            raise ValueError("a metric that takes the feeds needs one feed per output")
        value = fn(refs, outs, feeds)
    else:
        value = fn(refs, outs)
    try:
        return float(value), None
    except (TypeError, ValueError):
        pass
    try:
        per = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        per = None
    if per is None or per.ndim != 1 or len(per) != len(refs) or not len(per):
        raise UserCodeError(f"your metric {metric_name(fn)} returned {type(value).__name__} {value!r:.80}; "
                            f"it must return a float, or one float per feed ({len(refs)})") from None
    return float(np.mean(per)), per


class PerSample:
    """Per evaluation feed: signal and error power, cosine per output, top-1 predictions; metrics of any subset.

    ``measure`` computes them for some feeds, ``concat`` joins the parts of consecutive shards of an
    evaluation set in order: the result is the one ``measure`` gives on the whole set, exactly (every
    number is per feed; sums over feeds are taken only in ``metrics``)."""

    def __init__(self, sig: np.ndarray, err: np.ndarray, cos: list[list[float]], pred: list[np.ndarray],
                 ref_pred: list[np.ndarray]) -> None:
        self.sig, self.err, self.cos, self.pred, self.ref_pred = sig, err, cos, pred, ref_pred

    @property
    def count(self) -> int:
        return len(self.sig)

    @classmethod
    def measure(cls, refs: list[dict[str, np.ndarray]], outs: list[dict[str, np.ndarray]]) -> PerSample:
        n = len(refs)
        sig, err = np.zeros(n), np.zeros(n)
        cos_all: list[list[float]] = []
        pred, ref_pred = [], []
        for j, (r, c) in enumerate(zip(refs, outs, strict=True)):
            cos = []
            for k, ref in r.items():
                a, b = ref.astype(np.float64).ravel(), np.asarray(c[k], np.float64).ravel()
                sig[j] += float(a @ a)
                err[j] += float((a - b) @ (a - b))
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                cos.append(1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
            cos_all.append(cos)
            key = next(iter(r))
            ref_pred.append(r[key].reshape(-1, r[key].shape[-1]).argmax(-1) if r[key].ndim else np.zeros(1, int))
            pred.append(np.asarray(c[key]).reshape(-1, r[key].shape[-1]).argmax(-1) if r[key].ndim
                        else np.zeros(1, int))
        return cls(sig, err, cos_all, pred, ref_pred)

    @classmethod
    def concat(cls, parts: list[PerSample]) -> PerSample:
        return cls(np.concatenate([p.sig for p in parts]), np.concatenate([p.err for p in parts]),
                   [c for p in parts for c in p.cos], [x for p in parts for x in p.pred],
                   [x for p in parts for x in p.ref_pred])

    def hits(self, labels: np.ndarray | None) -> np.ndarray | None:
        """Per feed: [candidate hits, reference hits, rows] against ``labels`` (None without labels)."""
        if labels is None:
            return None
        rows = [len(p) for p in self.pred]
        pred, ref_pred = np.concatenate(self.pred), np.concatenate(self.ref_pred)
        lab = labels[: len(pred)]
        ends = np.cumsum(rows)[:-1]
        return np.array([[a.sum(), b.sum(), len(a)] for a, b in
                         zip(np.split(pred == lab, ends), np.split(ref_pred == lab, ends), strict=True)])

    def metrics(self, idx: np.ndarray, hits: np.ndarray | None = None) -> dict[str, float]:
        sig, err = float(self.sig[idx].sum()), float(self.err[idx].sum())
        nsr = err / sig if sig else 0.0
        cos = [c for i in idx for c in self.cos[i]]
        out = {"nsr": nsr, "sqnr_db": math.inf if nsr == 0 else -10 * math.log10(nsr),
               "cosine": float(np.mean(cos)), "cosine_min": float(np.min(cos))}
        if hits is not None:
            hit, ref_hit, rows = hits[idx].sum(axis=0)
            out["top1"] = 100.0 * hit / rows
            out["top1_drop"] = 100.0 * ref_hit / rows - out["top1"]
        return out
