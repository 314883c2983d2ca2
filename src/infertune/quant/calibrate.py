"""Stream calibration data through the model and gather per-tensor statistics.

The tensors to observe become the only outputs of a copy of the model, so ONNX Runtime computes
just what is needed and one batch's activations are alive at a time: memory does not grow with
the number of samples. Pass 1 records ranges; pass 2 (for histogram methods) counts values into
fixed bins derived from pass 1. Graph inputs are read straight from the feeds, constants from
the model.

``halves`` > 0 also keeps statistics for that many seeded random halves of the feeds, for the
stability report (``infertune.quant.stability``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from infertune import backends
from infertune.data import Dataset, FeedValidator, batched
from infertune.errors import CalibrationError
from infertune.model import Model
from infertune.quant.observers import DEFAULT_BINS, TensorStats

Progress = Callable[[int, int | None], None]


@dataclass
class CalibrationResult:
    stats: dict[str, TensorStats]
    half_stats: list[dict[str, TensorStats]]  # one dict per bootstrap half
    samples: int  # feeds used (after batching: batches x batch size, roughly)
    feeds: int
    batch_size: int
    bins: int
    passes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"feeds": self.feeds, "batch_size": self.batch_size, "bins": self.bins,
                "passes": self.passes, "seconds": round(self.seconds, 3), "halves": len(self.half_stats),
                "warnings": self.warnings}


NEAR_ZERO = 1e-6  # a range narrower than this (in absolute value) holds no signal worth 256 levels


def degenerate_ranges(stats: dict[str, TensorStats]) -> list[str]:
    """One warning naming the tensors whose calibrated range is a single value or near zero."""
    flat = {t: s for t, s in stats.items() if s.count and (s.lo == s.hi or s.absmax < NEAR_ZERO)}
    if not flat:
        return []
    shown = ", ".join(f"'{t}' ({s.lo:g})" if s.lo == s.hi else f"'{t}' (|x| < {NEAR_ZERO:g})"
                      for t, s in list(flat.items())[:5])
    more = f" and {len(flat) - 5} more" if len(flat) > 5 else ""
    return [f"{len(flat)} tensor(s) held a single value or almost nothing over all calibration samples: {shown}"
            f"{more}; their scales are arbitrary: calibrate on representative data"]


def calibrate(
    model: Model,
    tensors: Sequence[str],
    data: Dataset,
    *,
    histogram: bool = True,
    bins: int = DEFAULT_BINS,
    batch_size: int = 1,
    halves: int = 0,
    seed: int = 0,
    settings: backends.Settings | None = None,
    backend: str = "ort",
    progress: Progress | None = None,
) -> CalibrationResult:
    """Ranges (pass 1) and, with ``histogram``, fixed-edge histograms (pass 2) of ``tensors`` over
    ``data``, for the whole set and for ``halves`` random halves of it (the stability check)."""
    if not tensors:
        raise CalibrationError("nothing to calibrate: no tensor needs a range")
    start = time.perf_counter()
    c = _Calibrator(model, tensors, batched(data, batch_size), data.name, halves, seed, settings, backend, progress,
                    passes=2 if histogram else 1)
    first = c.stream(0)
    stray = first.stray_feeds()
    if stray:  # NaN, or +-inf in some samples only: bad data, not a mask; calibrate on the rest
        c.reset(seed)
        c.warnings += [f"{w.split(';')[0]}; {len(stray)} sample(s) holding them left out of calibration"
                       for w in first.warnings()]
        first = c.stream(0, stray)
    else:
        c.warnings += first.warnings()
    if first.all_constant():
        raise CalibrationError(f"calibration data {data.name}: every input is constant ({first.constant_text()}): "
                               "ranges calibrated on it mean nothing; give representative samples")
    count = first.feeds_seen - first.feeds_skipped
    c.add_constants(0)
    if histogram:
        for t in tensors:
            c.stats[t].start_histogram(bins)
            for hs in c.half_stats:
                hs[t].start_histogram(bins)
                hs[t].limit = c.stats[t].limit  # same edges as the full set
        c.stream(1, stray)
        c.add_constants(1)
    for t, st in c.stats.items():
        if st.nonfinite:
            c.warnings.append(f"tensor '{t}': {st.nonfinite} non-finite values excluded from its range")
        if not st.count:
            c.warnings.append(f"tensor '{t}': no finite value seen")
    c.warnings += degenerate_ranges({t: st for t, st in c.stats.items() if t not in c.from_const})
    return CalibrationResult(stats=c.stats, half_stats=c.half_stats, samples=count * batch_size,
                             feeds=count, batch_size=batch_size, bins=bins, passes=c.passes,
                             seconds=time.perf_counter() - start, warnings=c.warnings)


class _Calibrator:
    """The observers of one calibration, and one streaming pass over the data."""

    def __init__(self, model: Model, tensors: Sequence[str], feeds: Dataset, name: str, halves: int, seed: int,
                 settings: backends.Settings | None, backend: str, progress: Progress | None, passes: int) -> None:
        self.model, self.feeds, self.name, self.halves, self.progress, self.passes = \
            model, feeds, name, halves, progress, passes
        input_names = {i.name for i in model.inputs}
        self.constants = model.constant_tensors()
        self.from_feed = [t for t in tensors if t in input_names]
        self.from_const = [t for t in tensors if t in self.constants and t not in input_names]
        self.from_run = [t for t in tensors if t not in input_names and t not in self.constants]
        self.runner = None
        if self.from_run:
            self.runner = backends.compile(model.with_outputs(self.from_run, keep_original=False), settings,
                                           backend=backend)
        self.stats = {t: TensorStats(t) for t in tensors}
        self.half_stats = [{t: TensorStats(t) for t in tensors} for _ in range(halves)]
        self.membership: list[np.ndarray] = []  # per feed index: which halves it belongs to
        self.rng = np.random.default_rng(seed)
        self.warnings: list[str] = []

    def reset(self, seed: int) -> None:
        """Every observer as new (a pass 0 to be made again on other feeds)."""
        self.stats = {t: TensorStats(t) for t in self.stats}
        self.half_stats = [{t: TensorStats(t) for t in self.stats} for _ in range(self.halves)]
        self.membership.clear()
        self.rng = np.random.default_rng(seed)

    def stream(self, pass_index: int, skip: frozenset[int] = frozenset()) -> FeedValidator:
        """One pass over the feeds (``skip``: indices left out); returns the pass's validator."""
        validator = FeedValidator(self.model, nonfinite="keep", skip_feeds=skip)  # masks of -inf are data
        total = self.feeds.size
        n = 0
        for feed in self.feeds:
            clean = validator(feed)
            if clean is None:
                continue
            outputs = dict(self.runner.run(clean)) if self.runner is not None else {}
            outputs.update({t: clean[t] for t in self.from_feed})
            if pass_index == 0 and self.halves:
                self.membership.append(self.rng.random(self.halves) < 0.5)
            in_half = self.membership[n] if self.halves else ()
            for t in (*self.from_run, *self.from_feed):
                self._observe(t, outputs[t], pass_index, in_half)
            n += 1
            if self.progress:
                self.progress(pass_index * (total or 0) + n, None if total is None else self.passes * total)
        validator.finish(self.name)
        return validator

    def _observe(self, t: str, arr: np.ndarray, pass_index: int, in_half) -> None:
        for st in (self.stats, *(h for h, member in zip(self.half_stats, in_half, strict=True) if member)):
            (st[t].update_range if pass_index == 0 else st[t].update_histogram)(arr)

    def add_constants(self, pass_index: int) -> None:
        """Constant operands of 8-bit ops (QLinearAdd's '+ 3'): their exact range and histogram."""
        for t in self.from_const:
            for st in (self.stats, *self.half_stats):
                (st[t].update_range if pass_index == 0 else st[t].update_histogram)(self.constants[t])
