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
    if not tensors:
        raise CalibrationError("nothing to calibrate: no tensor needs a range")
    start = time.perf_counter()
    input_names = {i.name for i in model.inputs}
    constants = model.constant_tensors()
    from_feed = [t for t in tensors if t in input_names]
    from_const = [t for t in tensors if t in constants and t not in input_names]
    from_run = [t for t in tensors if t not in input_names and t not in constants]
    runner = None
    if from_run:
        runner = backends.compile(model.with_outputs(from_run, keep_original=False), settings, backend=backend)
    stats = {t: TensorStats(t) for t in tensors}
    feeds = batched(data, batch_size)
    total = feeds.size
    passes = 2 if histogram else 1
    membership: list[np.ndarray] = []  # per feed index: which halves it belongs to
    half_stats = [{t: TensorStats(t) for t in tensors} for _ in range(halves)]
    rng = np.random.default_rng(seed)

    def stream(pass_index: int) -> int:
        validator = FeedValidator(model, nonfinite="keep")  # masks of -inf are data; stats skip them
        n = 0
        for feed in feeds:
            clean = validator(feed)
            if clean is None:
                continue
            outputs = dict(runner.run(clean)) if runner is not None else {}
            outputs.update({t: clean[t] for t in from_feed})
            if pass_index == 0 and halves:
                membership.append(rng.random(halves) < 0.5)
            in_half = membership[n] if halves else ()
            for t in (*from_run, *from_feed):
                arr = outputs[t]
                if pass_index == 0:
                    stats[t].update_range(arr)
                else:
                    stats[t].update_histogram(arr)
                for h, member in enumerate(in_half):
                    if member:
                        (half_stats[h][t].update_range if pass_index == 0
                         else half_stats[h][t].update_histogram)(arr)
            n += 1
            if progress:
                progress(pass_index * (total or 0) + n, None if total is None else passes * total)
        validator.finish(data.name)
        if pass_index == 0:
            warnings.extend(validator.warnings())
        return n

    warnings: list[str] = []
    count = stream(0)
    for t in from_const:  # constant operands of 8-bit ops (QLinearAdd's '+ 3'): their exact range
        for st in (stats, *half_stats):
            st[t].update_range(constants[t])
    if histogram:
        for t in tensors:
            stats[t].start_histogram(bins)
            for hs in half_stats:
                hs[t].start_histogram(bins)
                hs[t].limit = stats[t].limit  # same edges as the full set
        stream(1)
        for t in from_const:
            for st in (stats, *half_stats):
                st[t].update_histogram(constants[t])
    for t, s in stats.items():
        if s.nonfinite:
            warnings.append(f"tensor '{t}': {s.nonfinite} non-finite values excluded from its range")
        if not s.count:
            warnings.append(f"tensor '{t}': no finite value seen")
    return CalibrationResult(stats=stats, half_stats=half_stats, samples=count * batch_size,
                             feeds=count, batch_size=batch_size, bins=bins, passes=passes,
                             seconds=time.perf_counter() - start, warnings=warnings)
