"""compare(reference, candidate, data): per-output error metrics and pass/fail checks.

The reference is an ONNX model (run on the same backend as the candidate) or saved outputs
in an ``.npz`` (one array per output name, rows aligned with the data's samples along
axis 0). Metrics are streamed (see ``metrics.ErrorAccumulator``); labels found in the data
(an extra array named ``label`` by default) add top-1 accuracy of both models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infertune import backends
from infertune._io import load_arrays
from infertune.analysis.accuracy import metric_name, user_value
from infertune.analysis.labels import check_labels
from infertune.analysis.metrics import ErrorAccumulator
from infertune.checks import Check
from infertune.data import Dataset, Feed, FeedValidator, as_dataset
from infertune.errors import DataError, UsageError
from infertune.fingerprint import environment
from infertune.model import Model

SCHEMA_VERSION = 1
OUTPUT_METRICS = ("max_abs", "mean_abs", "max_rel", "cosine", "cosine_min", "sqnr_db",
                  "allclose_frac", "top1_agreement")
ACCURACY_METRICS = ("top1_drop",)  # in percentage points, candidate vs reference, on labels
DEFAULT_CHECK = "allclose_frac>=1"
Progress = Callable[[int, int | None], None]


@dataclass
class CheckOutcome:
    check: str
    target: str  # output name or 'accuracy'
    value: float | None
    passed: bool

    def to_dict(self) -> dict:
        return {"check": self.check, "target": self.target, "value": self.value,
                "passed": self.passed}


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    metrics: dict[str, float | int | None]

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "metrics": self.metrics}


@dataclass
class CompareResult:
    reference: str
    candidate: str
    samples: int
    skipped: int
    outputs: list[OutputComparison]
    checks: list[CheckOutcome]
    accuracy: dict[str, float] | None = None
    metric: dict | None = None  # {"name": the user function's name, "value": its value}
    tolerances: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    backend: str = "ort"
    environment: dict = field(default_factory=environment)
    schema_version: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "kind": "compare",
            "reference": self.reference,
            "candidate": self.candidate,
            "backend": self.backend,
            "passed": self.passed,
            "samples": self.samples,
            "skipped": self.skipped,
            "tolerances": self.tolerances,
            "outputs": [o.to_dict() for o in self.outputs],
            "accuracy": self.accuracy,
            "metric": self.metric,
            "checks": [c.to_dict() for c in self.checks],
            "warnings": self.warnings,
            "environment": self.environment,
        }


class _SavedOutputs:
    """Reference outputs read from an .npz, handed out run by run in sample order."""

    def __init__(self, path: Path) -> None:
        self.arrays = load_arrays(path, "reference outputs")
        self.path = path
        self.offset = 0

    def take(self, rows: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            if name not in self.arrays:
                raise DataError(
                    f"reference {self.path} has no array for output '{name}' "
                    f"(it has: {', '.join(self.arrays)})"
                )
            arr = self.arrays[name]
            if self.offset + rows > arr.shape[0]:
                raise DataError(
                    f"reference {self.path}: output '{name}' has {arr.shape[0]} rows, the data "
                    f"has more samples"
                )
            out[name] = arr[self.offset : self.offset + rows]
        self.offset += rows
        return out


def _as_model(m: Model | str | os.PathLike[str]) -> Model:
    return m if isinstance(m, Model) else Model.load(m)


def compare(
    reference: Model | str | os.PathLike[str],
    candidate: Model | str | os.PathLike[str],
    data: Dataset,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    checks: Sequence[str | Check] = (),
    backend: str = "ort",
    settings: backends.Settings | None = None,
    labels_key: str = "label",
    progress: Progress | None = None,
    metric: Callable[[list[dict], list[dict]], float] | None = None,
) -> CompareResult:
    """Run ``candidate`` (and ``reference``, unless it is an .npz of outputs) on ``data``.

    With ``metric`` (``fn(reference_outputs, candidate_outputs) -> float``, lists of one dict per
    run), its value is computed over every run and checks can name it ('metric>=0.9')."""
    parsed = _parse_checks(checks, ("metric", metric_name(metric)) if metric is not None else ())
    if atol < 0 or rtol < 0:
        raise UsageError(f"tolerances must be >= 0 (atol={atol}, rtol={rtol})")
    cand_model = _as_model(candidate)
    data = as_dataset(data)
    saved: _SavedOutputs | None = None
    ref_runner = None
    if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".npz":
        saved = _SavedOutputs(Path(reference))
        ref_name = str(reference)
    else:
        ref_model = _as_model(reference)
        ref_name = ref_model.name
        _check_same_interface(ref_model, cand_model)
        ref_runner = backends.compile(ref_model, settings, backend=backend)
    cand_runner = backends.compile(cand_model, settings, backend=backend)
    names = list(cand_runner.output_names)
    acc = {n: ErrorAccumulator(atol=atol, rtol=rtol) for n in names}
    validator = FeedValidator(cand_model)
    top1 = _Top1(names)
    kept: tuple[list, list, list] = ([], [], [])  # every run's outputs and feeds, for the user metric
    for i, raw in enumerate(data):
        feed = validator(raw)
        rows = _rows(raw, cand_model)
        if feed is None:
            if saved is not None:
                saved.take(rows, names)
            continue
        cand_out = cand_runner.run(feed)
        ref_out = saved.take(rows, names) if saved is not None else ref_runner.run(feed)
        for n in names:
            acc[n].add(ref_out[n], cand_out[n], name=n)
        if metric is not None:
            kept[0].append({n: ref_out[n] for n in names})
            kept[1].append(cand_out)
            kept[2].append(feed)
        label = raw.get(labels_key) if isinstance(raw, dict) else None
        if label is not None:
            top1.add(ref_out, cand_out, label, where=f"'{labels_key}' in {data.name} (sample {i})")
        if progress:
            progress(i + 1, data.size)
    validator.finish(data.name)
    outputs = [OutputComparison(n, list(acc[n].shape or ()), acc[n].metrics()) for n in names]
    accuracy = top1.accuracy()
    user = None
    if metric is not None:
        user = {"name": metric_name(metric), "value": user_value(metric, *kept)}
    outcomes = _evaluate(parsed, outputs, accuracy, user)
    warnings = validator.warnings()
    if validator.all_constant():
        warnings.append(f"every input is constant ({validator.constant_text()}): outputs compared on such data "
                        "say little about real inputs")
    for o in outputs:
        if o.metrics["nonfinite_candidate"]:
            warnings.append(f"output '{o.name}': candidate produced "
                            f"{o.metrics['nonfinite_candidate']} NaN/Inf values")
            outcomes.append(CheckOutcome("nonfinite_candidate==0", o.name,
                                         float(o.metrics["nonfinite_candidate"]), False))
    return CompareResult(
        reference=ref_name, candidate=cand_model.name,
        samples=validator.feeds_seen - validator.feeds_skipped, skipped=validator.feeds_skipped,
        outputs=outputs, checks=outcomes, accuracy=accuracy, metric=user,
        tolerances={"atol": atol, "rtol": rtol}, warnings=warnings, backend=backend,
    )


def _parse_checks(checks: Sequence[str | Check], user: tuple[str, ...] = ()) -> list[Check]:
    parsed = [c if isinstance(c, Check) else Check.parse(
        c, metrics=OUTPUT_METRICS + ACCURACY_METRICS + ("sqnr",) + user) for c in checks]
    parsed = [Check("sqnr_db", c.op, c.threshold) if c.metric == "sqnr" else c for c in parsed]
    return parsed or [Check.parse(DEFAULT_CHECK)]


class _Top1:
    """Top-1 hits of the reference and the candidate against labels, over the labelled samples."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.correct = {"reference": 0, "candidate": 0}
        self.labelled = 0

    def add(self, ref_out: dict[str, np.ndarray], cand_out: dict[str, np.ndarray], label, where: str) -> None:
        scores = _class_scores(cand_out, self.names)
        if scores is None:
            return
        lab = check_labels(label, where=where, classes=scores[0].shape[-1], rows=scores[0].shape[0],
                           output=scores[1])
        self.correct["candidate"] += int(np.count_nonzero(scores[0].argmax(-1) == lab))
        self.correct["reference"] += int(np.count_nonzero(ref_out[scores[1]].argmax(-1) == lab))
        self.labelled += lab.size

    def accuracy(self) -> dict[str, float] | None:
        if not self.labelled:
            return None
        ref_top1 = 100.0 * self.correct["reference"] / self.labelled
        cand_top1 = 100.0 * self.correct["candidate"] / self.labelled
        return {"labelled": self.labelled, "reference_top1": ref_top1, "candidate_top1": cand_top1,
                "top1_drop": ref_top1 - cand_top1}


def _evaluate(checks: list[Check], outputs: list[OutputComparison],
              accuracy: dict[str, float] | None, user: dict | None = None) -> list[CheckOutcome]:
    outcomes = []
    for c in checks:
        if user is not None and c.metric in ("metric", user["name"]):
            named = Check(user["name"], c.op, c.threshold)
            outcomes.append(CheckOutcome(str(named), "metric", user["value"], named.passes(user["value"])))
            continue
        if c.metric in ACCURACY_METRICS:
            if accuracy is None:
                raise UsageError(
                    f"check {c} needs labels: the data has no 'label' array (or the model no "
                    f"[N, classes] output)")
            value = accuracy[c.metric]
            outcomes.append(CheckOutcome(str(c), "accuracy", value, c.passes(value)))
            continue
        for o in outputs:
            value = o.metrics.get(c.metric)
            if value is None and c.metric == "top1_agreement":
                continue  # not a class-score output
            outcomes.append(CheckOutcome(str(c), o.name, value, c.passes(value)))
    return outcomes


def _check_same_interface(ref: Model, cand: Model) -> None:
    ref_in = {i.name for i in ref.inputs}
    cand_in = {i.name for i in cand.inputs}
    if ref_in != cand_in:
        raise DataError(
            f"reference and candidate take different inputs: {sorted(ref_in)} vs {sorted(cand_in)}"
        )
    missing = [o.name for o in cand.outputs if o.name not in {r.name for r in ref.outputs}]
    if missing:
        raise DataError(f"reference model has no output named {', '.join(missing)}")


def _rows(feed: Feed, model: Model) -> int:
    first = model.inputs[0].name
    arr = feed.get(first) if isinstance(feed, dict) else None
    return int(arr.shape[0]) if isinstance(arr, np.ndarray) and arr.ndim else 1


def _class_scores(outputs: dict[str, np.ndarray], names: list[str]) -> tuple[np.ndarray, str] | None:
    """The first [N, C] float output (class scores), with its name."""
    for n in names:
        arr = outputs[n]
        if arr.ndim == 2 and arr.shape[1] >= 2 and arr.dtype.kind == "f":
            return arr, n
    return None
