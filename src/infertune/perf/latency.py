"""bench(model, data): warm-up, then N iterations or a time budget, on one fixed feed.

Each iteration times one ``Runner.run`` call with ``time.perf_counter_ns``; the feed is
validated once beforehand, so nothing but the backend call is inside the timed region.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from infertune import backends
from infertune.data import Dataset, FeedValidator, as_dataset, batched
from infertune.errors import DataError, UsageError
from infertune.fingerprint import environment
from infertune.model import Model, batch_problem

SCHEMA_VERSION = 1
COV_WARN = 0.05
DEFAULT_TIME_BUDGET_S = 3.0
MIN_ITERATIONS = 10
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class LatencyStats:
    """Latency statistics in milliseconds; ``cov`` = std / mean (coefficient of variation)."""

    min: float
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    max: float
    cov: float

    @classmethod
    def from_ns(cls, samples_ns: np.ndarray) -> LatencyStats:
        if samples_ns.size == 0:
            raise UsageError("no latency samples were taken")
        ms = samples_ns.astype(np.float64) / 1e6
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if ms.size > 1 else 0.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(min=float(ms.min()), p50=p50, p90=p90, p99=p99, mean=mean, std=std,
                   max=float(ms.max()), cov=std / mean if mean > 0 else 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchResult:
    model: str
    backend: str
    settings: dict
    batch_size: int
    input_shapes: dict[str, list[int]]
    warmup: int
    iterations: int
    wall_s: float
    latency_ms: LatencyStats
    throughput: float  # samples per second
    warnings: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=environment)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "kind": "bench",
            "model": self.model,
            "backend": self.backend,
            "settings": self.settings,
            "batch_size": self.batch_size,
            "input_shapes": self.input_shapes,
            "warmup": self.warmup,
            "iterations": self.iterations,
            "wall_s": self.wall_s,
            "latency_ms": self.latency_ms.to_dict(),
            "throughput_per_s": self.throughput,
            "warnings": self.warnings,
            "environment": self.environment,
        }


def refuse_batch(model: Model, sizes: list[int], what: str) -> None:
    """A batch larger than 1 needs a batch axis on every input (``layouts.batch_problem``)."""
    big = [b for b in sizes if b > 1]
    problem = batch_problem(model) if big else None
    if problem:
        raise UsageError(f"cannot run {model.name} on {what} {big[0]}: its batch axis cannot be inferred ({problem}); "
                         "its feeds are run one at a time")


def bench(
    model: Model | str | os.PathLike[str],
    data: Dataset | None = None,
    *,
    backend: str = "ort",
    settings: backends.Settings | None = None,
    batch_size: int = 1,
    warmup: int = 10,
    iterations: int | None = None,
    time_budget_s: float | None = None,
    dims: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Latency and throughput of ``model`` on the first sample of ``data`` (or synthetic).

    Without ``iterations`` the run lasts ``time_budget_s`` (default 3 s) and at least 10
    iterations; with it, exactly that many.
    """
    if warmup < 0:
        raise UsageError(f"warmup must be >= 0, got {warmup}")
    if iterations is not None and iterations < 1:
        raise UsageError(f"iterations must be >= 1, got {iterations}")
    if time_budget_s is not None and time_budget_s <= 0:
        raise UsageError(f"time budget must be > 0 s, got {time_budget_s}")
    m = model if isinstance(model, Model) else Model.load(model)
    settings = settings or backends.Settings()
    data = None if data is None else as_dataset(data)
    refuse_batch(m, [batch_size], "a batch of")
    if data is None:
        data = Dataset.synthetic(m, samples=batch_size, dims={**(dims or {}), "batch": 1})
    feed = first_feed(m, batched(data, batch_size), data.name, batch_size)
    runner = backends.compile(m, settings, backend=backend)
    for _ in range(warmup):
        runner.run(feed)
    start = time.perf_counter_ns()
    samples = time_calls(runner, feed, iterations=iterations,
                         time_budget_s=time_budget_s or DEFAULT_TIME_BUDGET_S, progress=progress)
    wall = (time.perf_counter_ns() - start) / 1e9
    stats = LatencyStats.from_ns(samples)
    warnings = []
    if stats.cov > COV_WARN:
        warnings.append(
            f"latency varies: coefficient of variation {stats.cov:.1%} > {COV_WARN:.0%} (busy "
            f"machine or too short a run; try more --iterations or fewer threads)"
        )
    total_s = int(samples.sum()) / 1e9
    return BenchResult(
        model=m.name, backend=backend, settings=settings.to_dict(), batch_size=batch_size,
        input_shapes={k: list(v.shape) for k, v in feed.items()}, warmup=warmup,
        iterations=len(samples), wall_s=wall, latency_ms=stats,
        throughput=batch_size * len(samples) / total_s if total_s > 0 else math.inf,
        warnings=warnings,
    )


def time_calls(runner: backends.Runner, feed: dict[str, np.ndarray], *, iterations: int | None = None,
               time_budget_s: float = DEFAULT_TIME_BUDGET_S, progress: Progress | None = None) -> np.ndarray:
    """The nanoseconds of each timed ``runner.run(feed)``: exactly ``iterations`` of them, or as
    many as ``time_budget_s`` holds (at least ``MIN_ITERATIONS``)."""
    run = runner.run
    budget_ns = int(time_budget_s * 1e9)
    samples: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    while True:
        t0 = clock()
        run(feed)
        t1 = clock()
        samples.append(t1 - t0)
        n = len(samples)
        if iterations is not None:
            if n >= iterations:
                break
        elif n >= MIN_ITERATIONS and t1 - start >= budget_ns:
            break
        if progress and (n & 15) == 0:
            progress(n, iterations)
    return np.asarray(samples, dtype=np.int64)


def first_feed(model: Model, data: Dataset, name: str, batch_size: int) -> dict[str, np.ndarray]:
    """The first valid feed of ``data`` (already batched), which must hold ``batch_size`` rows."""
    validator = FeedValidator(model)
    for raw in data:
        feed = validator(raw)
        if feed is not None:
            rows = next(iter(feed.values())).shape[0] if feed else 1
            if rows != batch_size:
                raise DataError(f"the data holds {rows} sample(s), fewer than batch size {batch_size}")
            return feed
    validator.finish(name)
    raise DataError(f"dataset {name} is empty")  # finish() raised already; for type checkers


@dataclass(frozen=True)
class SideBySide:
    """Runners timed call by call in alternation on one feed (the order flips every round).

    Separate runs of two runners differ by more than their real difference on a busy or
    frequency-scaling machine; alternating calls share the same conditions. ``ratio_p50``:
    median over rounds of each runner's call time divided by the first runner's.
    """

    rounds: int
    latency_ms: dict[str, LatencyStats]
    ratio_p50: dict[str, float]

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "ratio_p50": self.ratio_p50,
                "latency_ms": {k: v.to_dict() for k, v in self.latency_ms.items()}}


def side_by_side(runners: dict[str, backends.Runner], feed: dict[str, np.ndarray], *, warmup: int = 5,
                 time_budget_s: float = DEFAULT_TIME_BUDGET_S) -> SideBySide:
    """Time ``runners`` alternately on ``feed`` for ``time_budget_s`` (at least 10 rounds)."""
    if len(runners) < 2:
        raise UsageError("side_by_side needs at least two runners")
    labels = list(runners)
    for r in runners.values():
        for _ in range(warmup):
            r.run(feed)
    samples: dict[str, list[int]] = {k: [] for k in labels}
    clock = time.perf_counter_ns
    start, rounds = clock(), 0
    while rounds < MIN_ITERATIONS or clock() - start < time_budget_s * 1e9:
        for k in (labels if rounds % 2 == 0 else labels[::-1]):
            t0 = clock()
            runners[k].run(feed)
            samples[k].append(clock() - t0)
        rounds += 1
    ns = {k: np.asarray(v, dtype=np.int64) for k, v in samples.items()}
    base = ns[labels[0]].astype(np.float64)
    return SideBySide(rounds, {k: LatencyStats.from_ns(v) for k, v in ns.items()},
                      {k: float(np.median(v / base)) for k, v in ns.items()})


@dataclass(frozen=True)
class Allocation:
    """What one steady-state ``run`` call allocates, measured over ``calls`` calls.

    ``output_buffers`` counts distinct output data buffers per call while every result is
    kept alive (1.0: a fresh buffer per output and call; ~0: the same buffers every time);
    ``output_bytes`` is the size of those fresh buffers per call; ``python_bytes`` is the
    Python-heap growth per call that tracemalloc sees (feeds, dicts, array objects).
    """

    calls: int
    output_buffers: float
    output_bytes: float
    python_bytes: float

    def to_dict(self) -> dict:
        return asdict(self)


def allocation_per_call(runner: backends.Runner, feed: dict[str, np.ndarray], calls: int = 20) -> Allocation:
    import tracemalloc

    runner.run(feed)
    kept, seen, fresh_bytes = [], set(), 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(calls):
            out = runner.run(feed)
            kept.append(out)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    first = True
    for out in kept:
        for a in out.values():
            ptr = a.__array_interface__["data"][0]
            if ptr not in seen:
                seen.add(ptr)
                if not first:
                    fresh_bytes += a.nbytes
        first = False
    n_out = max(len(kept[0]), 1)
    return Allocation(calls, (len(seen) - n_out) / (calls - 1) / n_out if calls > 1 else 0.0,
                      fresh_bytes / max(calls - 1, 1), grown / calls)
