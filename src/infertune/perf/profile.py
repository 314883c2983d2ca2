"""profile(model, data): where the time goes, per node and per op type, on the graph ONNX Runtime runs.

ONNX Runtime's own profiler times every kernel of the *optimised* graph (fused Conv+Relu,
QLinearConv, MatMulInteger, NCHWc reorders), which is what the user pays for; node names are
those of that graph (saved beside the profile when asked). Warm-up runs are discarded; every
measured run is one ``model_run`` window, and a node's time is its mean over those runs.

The profiler is not free: each kernel event also times ONNX Runtime's own bookkeeping (input
and output shapes formatted into strings, thread-pool statistics), a few microseconds per node,
which swamps small kernels. ``kernel_overhead_us`` measures that cost on this machine with the
same settings (a chain of trivial ops, profiled and unprofiled) and it is subtracted from every
node (``raw_us`` keeps the uncorrected time). The end-to-end latency is measured without the
profiler on the same feed, and ``coverage`` = sum of corrected node times / that latency: how
much of what the user waits for the per-op view accounts for (the rest is the executor's work
between kernels). The raw profile is a Chrome trace (opens in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from infertune import backends
from infertune._io import write_text
from infertune.data import Dataset, batched
from infertune.errors import UsageError
from infertune.fingerprint import environment
from infertune.model import Model

SCHEMA_VERSION = 1
Progress = Callable[[int, int | None], None]
_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class NodeTime:
    node: str  # name in the optimised graph
    op_type: str
    provider: str
    mean_us: float  # per run, profiler overhead subtracted
    share: float  # of the sum over nodes
    input_shapes: list
    output_shapes: list
    raw_us: float  # per run, as the profiler reports it

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "provider": self.provider,
                "mean_us": round(self.mean_us, 3), "raw_us": round(self.raw_us, 3), "share": round(self.share, 5),
                "input_shapes": self.input_shapes, "output_shapes": self.output_shapes}


@dataclass(frozen=True)
class OpTypeTime:
    op_type: str
    nodes: int
    mean_us: float
    share: float

    def to_dict(self) -> dict:
        return {"op_type": self.op_type, "nodes": self.nodes, "mean_us": round(self.mean_us, 3),
                "share": round(self.share, 5)}


@dataclass
class ProfileResult:
    model: str
    settings: dict
    batch_size: int
    runs: int
    run_us: float  # mean model_run time under the profiler
    nodes: list[NodeTime]  # most expensive first
    op_types: list[OpTypeTime]  # most expensive first
    plain_us: float  # median latency of the same feed without the profiler
    overhead_us: float  # profiler cost per kernel event, subtracted from every node
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # of the profiled feed
    optimized_model: str | None = None
    trace: str | None = None
    backend: str = "ort"
    environment: dict = field(default_factory=environment)

    @property
    def node_sum_us(self) -> float:
        return sum(n.mean_us for n in self.nodes)

    @property
    def coverage(self) -> float:
        """Sum of per-node times over the end-to-end latency measured without the profiler."""
        return self.node_sum_us / self.plain_us if self.plain_us else 0.0

    def time_of(self, node: str) -> float:
        return next((n.mean_us for n in self.nodes if n.node == node), 0.0)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "profile", "model": self.model, "backend": self.backend,
                "settings": self.settings, "batch_size": self.batch_size, "input_shapes": self.input_shapes,
                "runs": self.runs,
                "run_us": round(self.run_us, 3), "plain_us": round(self.plain_us, 3),
                "overhead_us_per_kernel": round(self.overhead_us, 3), "node_sum_us": round(self.node_sum_us, 3),
                "coverage": round(self.coverage, 4), "optimized_model": self.optimized_model,
                "trace": self.trace, "op_types": [o.to_dict() for o in self.op_types],
                "nodes": [n.to_dict() for n in self.nodes], "environment": self.environment}


def profile(model: Model | str | os.PathLike[str], data: Dataset | None = None, *,
            settings: backends.Settings | None = None, batch_size: int = 1, runs: int = 50,
            warmup: int = 5, trace: str | os.PathLike[str] | None = None,
            optimized_model: str | os.PathLike[str] | None = None,
            progress: Progress | None = None, backend: str = "ort",
            dims: dict[str, int] | None = None) -> ProfileResult:
    """Per-node and per-op-type time of ``model`` over ``runs`` runs after ``warmup`` runs
    (on ONNX Runtime: the runtimes whose registry entry says ``profiles``); without ``data``, on a
    synthetic feed with the symbolic ``dims`` given."""
    backends.require(backend, "profiles", "profile")
    if runs < 1:
        raise UsageError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise UsageError(f"warmup must be >= 0, got {warmup}")
    from infertune.perf.latency import first_feed

    m = model if isinstance(model, Model) else Model.load(model)
    settings = replace(settings or backends.Settings(), profile_prefix=None, preallocate=False)
    if data is None:
        data = Dataset.synthetic(m, samples=batch_size, dims={**(dims or {}), "batch": 1})
    feed = first_feed(m, batched(data, batch_size), data.name, batch_size)
    opt_path = str(optimized_model) if optimized_model else None
    overhead = kernel_overhead_us(settings)
    plain = backends.compile(m, settings)
    # plain runs bracket the profiled ones, so that a drift in machine speed hits both alike
    # (interleaving single runs would let two sessions' spinning thread pools slow each other)
    plain_ns = _timed_runs(plain, feed, warmup, runs // 2)
    workdir = Path(tempfile.mkdtemp(prefix="infertune-profile-"))
    try:
        runner = backends.compile(m, replace(settings, optimized_model_path=opt_path,
                                             profile_prefix=str(workdir / "ort")))
        for i in range(warmup + runs):
            runner.run(feed)
            if progress and i >= warmup:
                progress(i - warmup + 1, runs)
        events = json.loads(Path(runner.session.end_profiling()).read_text())
        if trace:
            _write_trace(events, Path(trace))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plain_us = float(np.median(plain_ns + _timed_runs(plain, feed, warmup, runs - runs // 2))) / 1e3
    run_us, nodes, ops = summarize(events, warmup=warmup, overhead_us=overhead)
    return ProfileResult(m.name, settings.to_dict(), batch_size, runs, run_us, nodes, ops, plain_us, overhead,
                         {k: list(v.shape) for k, v in feed.items()}, optimized_model=opt_path,
                         trace=str(trace) if trace else None, backend=backend)


def _timed_runs(runner: backends.Runner, feed: dict, warmup: int, runs: int) -> list[int]:
    for _ in range(warmup):
        runner.run(feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        runner.run(feed)
        times.append(time.perf_counter_ns() - t0)
    return times


_CHAIN = 64


def kernel_overhead_us(settings: backends.Settings) -> float:
    """What the profiler adds to each kernel event with these settings, measured on this machine.

    A chain of ``_CHAIN`` Relu on 8 floats does almost no work: its unprofiled run time over the
    node count bounds the true per-kernel time from above, and the profiled kernel events' median
    minus that bound is the profiler's own cost per event.
    """
    return _overhead_us(settings.intra_op_threads, settings.inter_op_threads, settings.execution_mode)


@functools.lru_cache(maxsize=8)
def _overhead_us(intra: int, inter: int, mode: str) -> float:
    nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"], name=f"relu{i}") for i in range(_CHAIN)]
    graph = helper.make_graph(nodes, "profiler_overhead",
                              [helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(f"x{_CHAIN}", onnx.TensorProto.FLOAT, [1, 8])])
    chain = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    cfg = backends.Settings(intra_op_threads=intra, inter_op_threads=inter, execution_mode=mode,
                            graph_optimization="disable")
    feed = {"x0": np.ones((1, 8), np.float32)}
    per_node = float(np.median(_timed_runs(backends.compile(chain, cfg), feed, 20, 200))) / 1e3 / _CHAIN
    with tempfile.TemporaryDirectory(prefix="infertune-overhead-") as d:
        runner = backends.compile(chain, replace(cfg, profile_prefix=str(Path(d) / "ort")))
        for _ in range(50):
            runner.run(feed)
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    durs = [e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith(_KERNEL_SUFFIX)]
    return max(float(np.median(durs)) - per_node, 0.0) if durs else 0.0


def summarize(events: list[dict], warmup: int = 0,
              overhead_us: float = 0.0) -> tuple[float, list[NodeTime], list[OpTypeTime]]:
    """Mean time per run of each node and op type from ONNX Runtime profile ``events``.

    ``overhead_us`` is subtracted from every kernel event (floored at 0) before averaging.
    """
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[warmup:]
    if not windows:
        raise UsageError("the profile holds no measured run")
    starts = np.array([w[0] for w in windows])
    ends = np.array([w[1] for w in windows])
    raw: dict[str, float] = defaultdict(float)
    net: dict[str, float] = defaultdict(float)
    info: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith(_KERNEL_SUFFIX):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > ends[i]:
            continue  # a warm-up run
        name = e["name"][: -len(_KERNEL_SUFFIX)]
        raw[name] += e["dur"]
        net[name] += max(e["dur"] - overhead_us, 0.0)
        info.setdefault(name, e.get("args", {}))
    n_runs = len(windows)
    node_sum = sum(net.values()) / n_runs or 1.0
    nodes = sorted(
        (NodeTime(name, info[name].get("op_name", "?"), info[name].get("provider", "?"), us / n_runs,
                  us / n_runs / node_sum, _shapes(info[name].get("input_type_shape")),
                  _shapes(info[name].get("output_type_shape")), raw[name] / n_runs)
         for name, us in net.items()),
        key=lambda n: -n.mean_us)
    by_type: dict[str, list[float]] = defaultdict(list)
    for n in nodes:
        by_type[n.op_type].append(n.mean_us)
    ops = sorted((OpTypeTime(t, len(v), sum(v), sum(v) / node_sum) for t, v in by_type.items()),
                 key=lambda o: -o.mean_us)
    run_us = float(np.mean(ends - starts))
    return run_us, nodes, ops


def _shapes(entries: list | None) -> list:
    """[{'float': [1, 16, 8, 8]}, ...] -> [['float', [1, 16, 8, 8]], ...]"""
    return [[t, s] for d in entries or [] for t, s in d.items()]


def _write_trace(events: list[dict], path: Path) -> None:
    write_text(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
