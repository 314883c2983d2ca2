"""Latency that decisions depend on: each variant in its own fresh process, alternated in rounds."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from infertune import backends
from infertune.cli import main
from infertune.errors import InfertuneError
from infertune.perf.isolated import Variant, bench_isolated, time_isolated
from models import MODELS


@pytest.fixture
def two(tmp_path):
    a, b = tmp_path / "conv.onnx", tmp_path / "cnn.onnx"
    onnx.save(MODELS["conv"](), a)
    onnx.save(MODELS["small_cnn"](), b)
    return a, b


def test_each_variant_and_round_is_its_own_process_with_only_its_runtime(two):
    pytest.importorskip("openvino")
    a, b = two
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    variants = [Variant("a-ort", a, "ort"), Variant("a-ov", a, "openvino")]
    r = time_isolated(variants, feed, rounds=3, seconds=0.05)
    pids = [p["pid"] for lat in r.values() for p in lat.processes]
    assert len(set(pids)) == 6 and os.getpid() not in pids  # 2 variants x 3 rounds, none in this process
    assert all(p["runtimes"] == ["onnxruntime"] for p in r["a-ort"].processes)
    assert all(p["runtimes"] == ["openvino"] for p in r["a-ov"].processes)  # no ORT thread pool spinning beside
    assert [p["slot"] for p in r["a-ort"].processes] == [0, 1, 0]  # the order alternates from round to round
    for lat in r.values():
        assert lat.p50_ms == float(np.median(lat.rounds_ms)) and len(lat.rounds_ms) == 3 and lat.spread >= 0


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
