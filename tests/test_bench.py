from __future__ import annotations

import numpy as np
import pytest

from infertune.data import Dataset
from infertune.errors import DataError, UsageError
from infertune.model import Model
from infertune.perf.latency import LatencyStats, bench
from models import MODELS


def test_latency_stats_match_numpy():
    ns = np.random.default_rng(0).integers(1_000_000, 3_000_000, 200)
    s = LatencyStats.from_ns(ns)
    ms = ns / 1e6
    assert s.p50 == pytest.approx(np.median(ms))
    assert s.p99 == pytest.approx(np.percentile(ms, 99))
    assert s.std == pytest.approx(ms.std(ddof=1))
    assert s.cov == pytest.approx(ms.std(ddof=1) / ms.mean())
    assert s.min <= s.p50 <= s.p90 <= s.p99 <= s.max


def test_bench_exact_iterations_with_data_and_batch():
    m = Model.from_proto(MODELS["conv"]())
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    r = bench(m, Dataset.from_arrays({"x": x}), batch_size=4, warmup=2, iterations=25)
    assert r.iterations == 25 and r.input_shapes == {"x": [4, 3, 16, 16]}
    assert r.throughput == pytest.approx(4 / (r.latency_ms.mean / 1e3), rel=1e-6)
    d = r.to_dict()
    assert d["environment"]["versions"]["onnxruntime"]
    assert "isa" in d["environment"]["machine"]["cpu"]


def test_bench_time_budget_runs_at_least_min_iterations():
    r = bench(Model.from_proto(MODELS["gemm"]()), warmup=0, time_budget_s=0.05)
    assert r.iterations >= 10 and r.wall_s >= 0.05


def test_bench_rejects_bad_arguments():
    m = Model.from_proto(MODELS["gemm"]())
    with pytest.raises(UsageError):
        bench(m, iterations=0)
    with pytest.raises(DataError, match="fewer than batch size"):
        bench(m, Dataset.from_arrays({"x": np.zeros((2, 32), np.float32)}), batch_size=4,
              iterations=1)
