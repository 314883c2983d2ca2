"""Latency that decisions depend on: each variant in its own fresh process, alternated in rounds."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnx
import pytest

from infertune import backends
from infertune.cli import main
from infertune.errors import InfertuneError
from infertune.perf.isolated import Variant, _Worker, bench_isolated, time_isolated
from models import MODELS


@pytest.fixture
def two(tmp_path):
    a, b = tmp_path / "conv.onnx", tmp_path / "cnn.onnx"
    onnx.save(MODELS["conv"](), a)
    onnx.save(MODELS["small_cnn"](), b)
    return a, b


def test_each_variant_is_its_own_process_with_only_its_runtime_and_the_others_wait_idle(two):
    pytest.importorskip("openvino")
    a, b = two
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    variants = [Variant("a-ort", a, "ort", backends.Settings(intra_op_threads=2)), Variant("a-ov", a, "openvino")]
    r = time_isolated(variants, feed, rounds=4, seconds=0.05)
    pids = {lat.key: {p["pid"] for p in lat.processes} for lat in r.values()}
    assert len(pids["a-ort"]) == len(pids["a-ov"]) == 1 and pids["a-ort"] != pids["a-ov"]  # one process per variant
    assert os.getpid() not in pids["a-ort"] | pids["a-ov"]
    assert all(p["runtimes"] == ["onnxruntime"] for p in r["a-ort"].processes)
    assert all(p["runtimes"] == ["openvino"] for p in r["a-ov"].processes)  # no ORT thread pool spinning beside
    assert [p["slot"] for p in r["a-ort"].processes] == [0, 1, 0, 1]  # the order alternates from round to round
    # while one is timed the other uses no CPU (ORT's pool keeps spinning after a run unless waited out);
    # /proc counts in clock ticks, so one tick may fall on the boundary
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    assert all(p["others_cpu_ms"] <= tick_ms for lat in r.values() for p in lat.processes)
    for lat in r.values():
        assert lat.p50_ms == float(np.median(lat.rounds_ms)) and len(lat.rounds_ms) == 4
        q1, q3 = np.percentile(lat.rounds_ms, [25, 75])
        assert lat.spread == pytest.approx((q3 - q1) / lat.p50_ms)


def test_a_worker_is_quiet_once_settled(tmp_path, two):
    feed_path = tmp_path / "feed.npz"
    np.savez(feed_path, x=np.zeros((1, 3, 12, 12), np.float32))
    w = _Worker(Variant("a", two[1], "ort", backends.Settings(intra_op_threads=2)), feed_path, tmp_path / "w", 2)
    try:
        w.reply()
        assert w.window(0.2)["iterations"] >= 10
        w.settle()
        before = w.cpu_s()
        time.sleep(0.2)
        assert w.cpu_s() - before <= 1 / os.sysconf("SC_CLK_TCK")
    finally:
        w.close()
    assert w.proc.returncode == 0  # closing its requests ends it


def test_where_cpu_time_cannot_be_read_it_waits_a_fixed_time_and_says_it_does_not_know(monkeypatch, two):
    """No /proc (macOS, Windows): the wait after a window is a fixed one, and the record of what the waiting
    processes used is None, not a 0 that would claim they were idle."""
    import infertune.perf.isolated as isolated

    monkeypatch.setattr(isolated._Worker, "cpu_s", lambda self: None)
    slept = []
    real_sleep = time.sleep
    monkeypatch.setattr(isolated.time, "sleep", lambda s: (slept.append(s), real_sleep(s)))
    r = time_isolated([Variant("a", two[0]), Variant("b", two[0])], {"x": np.zeros((1, 3, 16, 16), np.float32)},
                      rounds=2, seconds=0.05)
    assert all(p["others_cpu_ms"] is None for lat in r.values() for p in lat.processes)
    assert slept.count(isolated.BLIND_SETTLE_S) == 4  # after each of the 2 x 2 windows


def test_a_batched_feed_is_timed_as_one_call(two):
    r = time_isolated([Variant("a", two[0])], {"x": np.zeros((3, 3, 16, 16), np.float32)}, rounds=1, seconds=0.05)
    assert r["a"].p50_ms > 0 and r["a"].iterations[0] >= 10


def test_a_model_a_runtime_refuses_is_one_clear_error(tmp_path, two):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InfertuneError, match="bad.onnx"):
        time_isolated([Variant("bad", bad)], {"x": np.zeros((1, 3, 16, 16), np.float32)}, rounds=1, seconds=0.05)
    with pytest.raises(InfertuneError, match="no effect on openvino"):
        time_isolated([Variant("a", two[0], "openvino", backends.Settings(graph_optimization="basic"))],
                      {"x": np.zeros((1, 3, 16, 16), np.float32)}, rounds=1, seconds=0.05)


def test_ratios_are_to_the_first_model(two):
    r = bench_isolated([two[0], two[0]], rounds=2, seconds=0.05).to_dict()
    a, b = r["models"]
    assert a["ratio_to_first"] == 1 and b["ratio_to_first"] == pytest.approx(b["p50_ms"] / a["p50_ms"])


def test_bench_with_several_models_times_them_side_by_side(capsys, two):
    a, b = two
    code = main(["bench", str(a), str(a), "--time", "0.05", "--rounds", "2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["kind"] == "bench-isolated" and doc["backend"] == "ort"
    assert [m["model"] for m in doc["models"]] == ["0:conv.onnx", "1:conv.onnx"]
    assert doc["models"][0]["ratio_to_first"] == 1
    code = main(["bench", str(a), str(b), "--sweep", "batch=1,2"])
    assert code == 2 and "--sweep" in capsys.readouterr().err
