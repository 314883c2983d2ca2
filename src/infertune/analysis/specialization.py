"""A model specialised to constant inputs, checked against the original on the user's feeds.

``specialise(model, datasets, fix)`` fixes the inputs given (``--fix sr=16000``) and, with
``detect``, every input that holds the same value in every feed of the data *and* decides an If or
a Where (an input that only scales a computation is never fixed unasked); folds the graph
(``infertune.specialize``); then runs the original and the specialised FP32 model on the first
``check_feeds`` feeds of each dataset and refuses the result unless every output agrees within
``atol + rtol * max|output|``. A feed whose value of a fixed input differs is refused too: the
specialised model would compute something else for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infertune import backends
from infertune.data import Dataset, Feed, as_dataset
from infertune.errors import DataError, ModelError
from infertune.model import Model
from infertune.quant.specialize import decides_control_flow, fix_inputs

ATOL, RTOL = 1e-5, 1e-4
SHOWN = ("If", "Where", "Loop", "Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN")  # in the note


@dataclass
class Specialisation:
    model: Model
    fixed: dict[str, Any]  # input -> value (lists for arrays)
    detected: list[str]  # the inputs fixed because the data held one value for them
    ops_changed: dict[str, int]  # main-graph op count changes, e.g. {'If': -1, 'Conv': 6}
    max_abs_diff: float = 0.0
    feeds_checked: int = 0
    notes: list[str] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the arrays themselves

    def to_dict(self) -> dict:
        return {"fixed": self.fixed, "detected": self.detected, "ops_changed": self.ops_changed,
                "max_abs_diff": self.max_abs_diff, "feeds_checked": self.feeds_checked, "notes": self.notes}


def specialise(model: Model, datasets: Sequence[Dataset | Iterable[Feed]], fix: dict[str, np.ndarray] | None = None,
               *, detect: bool = True, check_feeds: int = 16, backend: str = "ort",
               settings: backends.Settings | None = None) -> Specialisation | None:
    """``model`` with ``fix`` (and, with ``detect``, constant inputs that decide control flow) fixed and
    checked on the data; None when there is nothing to fix."""
    fix = dict(fix or {})
    sets = [as_dataset(d) for d in datasets]
    detected = _constant_control_inputs(model, sets, set(fix)) if detect else {}
    values = {**fix, **detected}
    if not values:
        return None
    fixed, changed = fix_inputs(model, values)
    spec = Specialisation(fixed, {k: np.asarray(v).tolist() for k, v in values.items()}, sorted(detected), changed,
                          values=values)
    desc = ", ".join(f"{k}={short(v)}" for k, v in values.items())
    for name in sorted(detected):
        spec.notes.append(f"input '{name}' holds {short(detected[name])} in every feed and decides "
                          f"control flow: the model is specialised to it (as --fix {name}=...; --fix none keeps it)")
    folded = ", ".join(f"{op} {n:+d}" for op, n in changed.items() if op in SHOWN) or "no control flow folded"
    runner_a = backends.compile(model, settings, backend=backend)
    runner_b = backends.compile(fixed, settings, backend=backend)
    for ds in sets:
        for i, feed in enumerate(ds):
            if i >= check_feeds:
                break
            _check_feed(feed, values, i, ds.name)
            full = {**{k: v for k, v in feed.items() if k in {t.name for t in model.inputs}}, **values}
            a, b = runner_a.run(full), runner_b.run({k: full[k] for k in runner_b.input_names})
            for name in runner_b.output_names:
                diff = float(np.max(np.abs(a[name].astype(np.float64) - b[name]))) if a[name].size else 0.0
                spec.max_abs_diff = max(spec.max_abs_diff, diff)
                if diff > ATOL + RTOL * float(np.max(np.abs(a[name]), initial=0.0)):
                    raise ModelError(f"{model.name} specialised to {desc} does not compute what the original does: "
                                     f"output '{name}' differs by {diff:.3g} on feed {i} of {ds.name}; not using it")
            spec.feeds_checked += 1
    spec.notes.append(f"{model.name} specialised to {desc} ({folded} in the main graph); takes "
                      f"{', '.join(i.name for i in fixed.inputs)}; the same outputs as the original on "
                      f"{spec.feeds_checked} feeds (max abs diff {spec.max_abs_diff:.3g})")
    return spec


def short(value: object) -> str:
    """A value for a message: a number as itself, an array by its shape and range."""
    a = np.asarray(value)
    if a.size <= 4:
        return str(a.tolist())
    return f"<{a.dtype.name} array {list(a.shape)} in [{a.min():g}, {a.max():g}]>"


def _check_feed(feed: Feed, values: dict[str, np.ndarray], index: int, where: str) -> None:
    for name, value in values.items():
        if name in feed and not np.array_equal(np.asarray(feed[name]), value):
            raise DataError(f"feed {index} of {where} has {name}={short(feed[name])}, but the model is "
                            f"specialised to {name}={short(value)}: give data with that value only, "
                            "or another --fix")


def _constant_control_inputs(model: Model, sets: list[Dataset], skip: set[str]) -> dict[str, np.ndarray]:
    """Inputs that decide control flow and hold one value in every feed (of at least two)."""
    names = [i.name for i in model.inputs if i.name not in skip and decides_control_flow(model, i.name)]
    if not names:
        return {}
    first: dict[str, np.ndarray] = {}
    same = set(names)
    seen = 0
    for ds in sets:
        for feed in ds:
            seen += 1
            for n in list(same):
                if n not in feed:
                    same.discard(n)
                elif n not in first:
                    first[n] = np.asarray(feed[n])
                elif not np.array_equal(first[n], feed[n]):
                    same.discard(n)
            if not same:
                return {}
    return {n: first[n] for n in same} if seen >= 2 else {}
