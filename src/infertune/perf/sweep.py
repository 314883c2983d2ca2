"""Sweeps: latency, throughput and peak memory over batch size, intra-op threads, concurrent
sessions (the CPU analogue of streams) and graph optimisation level, with knee detection.

Every configuration is measured for a fixed time on the same first batch of the data. With
``sessions`` > 1, that many independent sessions run the same feed from as many Python threads
at once (ONNX Runtime releases the GIL); throughput counts the samples all of them finish.
Peak memory: the process's high-water mark (VmHWM), reset before each configuration through
/proc/self/clear_refs (Linux); ``None`` where that is not possible.

The knee of a series is the first point after which doubling (or any step up) adds less than
``KNEE_GAIN`` (10 %) throughput: past it, more batch or threads buys latency, not throughput.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from infertune import backends
from infertune.data import Dataset, as_dataset, batched
from infertune.errors import UsageError
from infertune.fingerprint import environment
from infertune.limits import check_threads
from infertune.model import Model
from infertune.perf.latency import LatencyStats, first_feed, refuse_batch

SCHEMA_VERSION = 1
AXES = ("batch", "threads", "sessions", "opt")
KNEE_GAIN = 0.10
Progress = Callable[[int, int | None], None]


def parse_sweep(specs: Sequence[str]) -> dict[str, list]:
    """['batch=1,2,4', 'threads=1,2'] -> {'batch': [1, 2, 4], 'threads': [1, 2]}."""
    axes: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or name not in AXES or not values.strip():
            raise UsageError(f"sweep axis must be one of {', '.join(a + '=v1,v2' for a in AXES)}; got {spec!r}")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if name == "opt":
            bad = [v for v in items if v not in backends.GRAPH_OPTIMIZATION_LEVELS]
            if bad:
                raise UsageError(f"sweep opt: unknown level {bad[0]!r} "
                                 f"(known: {', '.join(backends.GRAPH_OPTIMIZATION_LEVELS)})")
            axes[name] = items
        else:
            try:
                nums = [int(v) for v in items]
            except ValueError:
                raise UsageError(f"sweep {name}: values must be integers, got {values!r}") from None
            if any(v < (0 if name == "threads" else 1) for v in nums):
                raise UsageError(f"sweep {name}: values must be >= {0 if name == 'threads' else 1}, got {values!r}")
            if name in ("threads", "sessions"):  # each concurrent session runs at least one thread
                for v in nums:
                    check_threads(v, f"sweep {name}")
            axes[name] = nums
    return axes


@dataclass(frozen=True)
class SweepPoint:
    batch: int
    threads: int
    sessions: int
    opt: str
    latency_ms: LatencyStats
    throughput: float  # samples per second, all sessions together
    calls: int
    peak_rss_mb: float | None

    def to_dict(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, "sessions": self.sessions, "opt": self.opt,
                "latency_ms": self.latency_ms.to_dict(), "throughput_per_s": self.throughput, "calls": self.calls,
                "peak_rss_mb": self.peak_rss_mb}


@dataclass(frozen=True)
class Knee:
    axis: str
    fixed: dict  # the other axes' values along this series
    at: int | str  # the last value worth taking
    values: list
    throughput: list[float]

    def to_dict(self) -> dict:
        return {"axis": self.axis, "fixed": self.fixed, "at": self.at, "values": self.values,
                "throughput_per_s": self.throughput}


@dataclass
class SweepResult:
    model: str
    axes: dict[str, list]
    points: list[SweepPoint]
    knees: list[Knee]
    seconds_per_point: float
    backend: str = "ort"
    environment: dict = field(default_factory=environment)

    def best(self) -> SweepPoint:
        return max(self.points, key=lambda p: p.throughput)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "sweep", "model": self.model, "backend": self.backend,
                "axes": self.axes,
                "seconds_per_point": self.seconds_per_point, "points": [p.to_dict() for p in self.points],
                "knees": [k.to_dict() for k in self.knees], "environment": self.environment}


def sweep(model: Model | str | os.PathLike[str], data: Dataset | None = None, axes: dict[str, list] | None = None, *,
          settings: backends.Settings | None = None, seconds: float = 1.0, warmup: int = 3,
          progress: Progress | None = None, backend: str = "ort") -> SweepResult:
    """Measure every combination of ``axes`` (missing axes take ``settings``' value / 1)."""
    if seconds <= 0:
        raise UsageError(f"seconds per point must be > 0, got {seconds}")
    m = model if isinstance(model, Model) else Model.load(model)
    base = settings or backends.Settings()
    axes = dict(axes or {})
    grid = {"batch": axes.get("batch", [1]), "threads": axes.get("threads", [base.intra_op_threads]),
            "sessions": axes.get("sessions", [1]), "opt": axes.get("opt", [base.graph_optimization])}
    refuse_batch(m, grid["batch"], "a batch sweep up to")
    if data is None:
        data = Dataset.synthetic(m, samples=max(grid["batch"]), dims={"batch": 1})
    data = as_dataset(data)
    feeds = {b: first_feed(m, batched(data, b), data.name, b) for b in grid["batch"]}
    combos = list(itertools.product(grid["batch"], grid["threads"], grid["sessions"], grid["opt"]))
    points = []
    for i, (b, t, s, opt) in enumerate(combos):
        cfg = replace(base, intra_op_threads=t, graph_optimization=opt)
        points.append(_measure(m, cfg, feeds[b], b, s, seconds, warmup, backend))
        if progress:
            progress(i + 1, len(combos))
    return SweepResult(m.name, grid, points, knees(points, grid), seconds, backend)


def _measure(model: Model, cfg: backends.Settings, feed: dict, batch: int, sessions: int, seconds: float,
             warmup: int, backend: str = "ort") -> SweepPoint:
    reset = _reset_peak_rss()
    runners = [backends.compile(model, cfg, backend=backend) for _ in range(sessions)]
    for r in runners:
        for _ in range(warmup):
            r.run(feed)
    samples: list[list[int]] = [[] for _ in runners]
    deadline = time.perf_counter_ns() + int(seconds * 1e9)

    def loop(runner: backends.Runner, out: list[int]) -> None:
        clock = time.perf_counter_ns
        while True:
            t0 = clock()
            runner.run(feed)
            t1 = clock()
            out.append(t1 - t0)
            if t1 >= deadline and len(out) >= 3:
                return

    start = time.perf_counter_ns()
    if sessions == 1:
        loop(runners[0], samples[0])
    else:
        threads = [threading.Thread(target=loop, args=(r, s)) for r, s in zip(runners, samples, strict=True)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    wall = (time.perf_counter_ns() - start) / 1e9
    calls = sum(len(s) for s in samples)
    stats = LatencyStats.from_ns(np.concatenate([np.asarray(s, np.int64) for s in samples]))
    return SweepPoint(batch, cfg.intra_op_threads, sessions, cfg.graph_optimization, stats,
                      calls * batch / wall, calls, _peak_rss_mb() if reset else None)


def knees(points: list[SweepPoint], grid: dict[str, list]) -> list[Knee]:
    """For each numeric axis with 2+ values, the knee of every series along it."""
    out = []
    for axis in ("batch", "threads", "sessions"):
        if len(grid[axis]) < 2:
            continue
        others = [a for a in AXES if a != axis]
        series: dict[tuple, list[SweepPoint]] = {}
        for p in points:
            series.setdefault(tuple(getattr(p, a) for a in others), []).append(p)
        for key, ps in series.items():
            ps.sort(key=lambda p: getattr(p, axis))
            values = [getattr(p, axis) for p in ps]
            tput = [p.throughput for p in ps]
            out.append(Knee(axis, dict(zip(others, key, strict=True)), knee_of(values, tput), values, tput))
    return out


def knee_of(values: Sequence, throughput: Sequence[float], gain: float = KNEE_GAIN) -> int | str:
    """The first value after which no later step adds more than ``gain`` throughput over the best so far."""
    for i in range(len(values)):
        if all(throughput[j] < throughput[i] * (1 + gain) for j in range(i + 1, len(values))):
            return values[i]
    return values[-1]


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None
