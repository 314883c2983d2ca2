"""Where the time goes: profile, explain, sweeps and knees, roofline, the preallocated runner."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infertune import backends
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.model import Model
from infertune.perf import roofline as rl
from infertune.perf.explain import explain, isa_facts
from infertune.perf.latency import allocation_per_call, side_by_side
from infertune.perf.profile import kernel_overhead_us, profile, summarize
from infertune.perf.sweep import knee_of, parse_sweep, sweep
from models import MODELS

ONE_THREAD = backends.Settings(intra_op_threads=1)


def _event(cat: str, name: str, ts: int, dur: int, op: str = "Conv") -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"op_name": op, "provider": "CPU"}}


def test_summarize_drops_warmup_and_subtracts_overhead():
    events = []
    for t0, conv_us, relu_us in [(0, 900, 900), (1000, 30, 5), (2000, 50, 7)]:
        events.append(_event("Session", "model_run", t0, 100))
        events.append(_event("Node", "c_kernel_time", t0 + 1, conv_us))
        events.append(_event("Node", "c_fence_before", t0 + 1, 1))  # not a kernel event
        events.append(_event("Node", "r_kernel_time", t0 + 60, relu_us, "Relu"))
    run_us, nodes, ops = summarize(events, warmup=1, overhead_us=6.0)
    by = {n.node: n for n in nodes}
    assert run_us == 100
    assert by["c"].raw_us == 40 and by["c"].mean_us == pytest.approx((24 + 44) / 2)
    assert by["r"].raw_us == 6 and by["r"].mean_us == pytest.approx(0.5)  # max(5-6, 0), 7-6
    assert [n.node for n in nodes] == ["c", "r"]
    assert {o.op_type: o.nodes for o in ops} == {"Conv": 1, "Relu": 1}
    assert sum(o.share for o in ops) == pytest.approx(1.0)


def test_summarize_without_runs_is_a_usage_error():
    with pytest.raises(UsageError, match="no measured run"):
        summarize([_event("Session", "model_run", 0, 10)], warmup=1)


def test_profile_names_the_nodes_of_the_optimised_graph(tmp_path):
    m = Model.from_proto(MODELS["small_cnn"]())
    trace, opt = tmp_path / "trace.json", tmp_path / "opt.onnx"
    r = profile(m, settings=ONE_THREAD, runs=20, warmup=2, trace=trace, optimized_model=opt)
    executed = {n.name: n.op_type for n in onnx.load(str(opt)).graph.node}
    assert r.nodes and all(executed[n.node] == n.op_type for n in r.nodes)
    assert {n.node for n in r.nodes} == set(executed)  # every executed node timed once
    assert r.plain_us > 0 and r.run_us > 0 and r.overhead_us >= 0
    assert all(n.mean_us <= n.raw_us for n in r.nodes)
    doc = json.loads(trace.read_text())
    kernels = [e for e in doc["traceEvents"] if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert len(kernels) == 22 * len(r.nodes)  # warm-up runs stay in the raw trace
    assert r.to_dict()["coverage"] == pytest.approx(r.node_sum_us / r.plain_us, abs=1e-4)


def test_kernel_overhead_is_measured_once_per_settings():
    a = kernel_overhead_us(ONE_THREAD)
    assert 0 <= a < 1000
    assert kernel_overhead_us(backends.Settings(intra_op_threads=1, graph_optimization="basic")) == a


def test_profile_rejects_bad_counts():
    m = Model.from_proto(MODELS["conv"]())
    with pytest.raises(UsageError, match="runs"):
        profile(m, runs=0)


# ---- sweeps ---------------------------------------------------------------------------------------
def test_parse_sweep():
    assert parse_sweep(["batch=1,2, 4", "threads=1", "opt=basic,all"]) == {
        "batch": [1, 2, 4], "threads": [1], "opt": ["basic", "all"]}


@pytest.mark.parametrize("spec, message", [("speed=1", "must be one of"), ("batch=", "must be one of"),
                                           ("batch=a", "integers"), ("batch=0,1", ">= 1"),
                                           ("opt=fastest", "unknown level")])
def test_parse_sweep_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_sweep([spec])


def test_knee_of():
    assert knee_of([1, 2, 4, 8], [100, 190, 200, 205]) == 2  # 4 and 8 add < 10 %
    assert knee_of([1, 2, 4, 8], [100, 200, 400, 800]) == 8  # still scaling
    assert knee_of([1, 2, 4], [100, 95, 90]) == 1  # never pays
    assert knee_of([1, 2, 4], [100, 105, 130]) == 4  # a late gain counts


def test_sweep_measures_every_point_and_marks_knees():
    m = Model.from_proto(MODELS["conv"]())
    r = sweep(m, axes={"batch": [1, 4], "threads": [1]}, seconds=0.1)
    assert [(p.batch, p.threads) for p in r.points] == [(1, 1), (4, 1)]
    assert all(p.throughput > 0 and p.calls >= 3 and p.latency_ms.p50 > 0 for p in r.points)
    assert all(p.peak_rss_mb is None or p.peak_rss_mb > 1 for p in r.points)
    (knee,) = r.knees
    assert knee.axis == "batch" and knee.values == [1, 4] and knee.at in (1, 4)
    assert knee.at == knee_of(knee.values, knee.throughput)


def test_sweep_runs_concurrent_sessions():
    m = Model.from_proto(MODELS["conv"]())
    r = sweep(m, axes={"sessions": [1, 2]}, settings=ONE_THREAD, seconds=0.1)
    assert [p.sessions for p in r.points] == [1, 2] and r.points[1].calls >= 6


# ---- preallocated runner --------------------------------------------------------------------------
def _wide() -> Model:
    """x[N,256] -> MatMul -> y[N,4096]: outputs big enough that an allocation per call shows."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "wide",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4096])], [w])
    return Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_preallocated_runner_matches_plain_and_allocates_less():
    m = _wide()
    plain = backends.compile(m, ONE_THREAD)
    bound = backends.compile(m, backends.Settings(intra_op_threads=1, preallocate=True))
    rng = np.random.default_rng(1)
    for n in (2, 2, 5, 2):  # a batch-size change rebinds
        x = rng.standard_normal((n, 256)).astype(np.float32)
        got = bound.run({"x": x})["y"]
        np.testing.assert_array_equal(got, plain.run({"x": x})["y"])
    feed = {"x": rng.standard_normal((8, 256)).astype(np.float32)}
    a_plain, a_bound = allocation_per_call(plain, feed, 10), allocation_per_call(bound, feed, 10)
    assert a_plain.output_buffers == 1.0 and a_plain.output_bytes == 8 * 4096 * 4  # a fresh array every call
    assert a_bound.output_buffers == 0.0 and a_bound.output_bytes == 0.0
    assert a_bound.python_bytes <= a_plain.python_bytes


def test_preallocated_outputs_are_reused():
    m = _wide()
    bound = backends.compile(m, backends.Settings(preallocate=True))
    x = np.ones((1, 256), np.float32)
    assert bound.run({"x": x})["y"] is bound.run({"x": 2 * x})["y"]


def test_side_by_side_alternates_and_measures_the_difference():
    m = _wide()
    plain = backends.compile(m, ONE_THREAD)
    calls: list[str] = []

    class Slower:  # the same runner plus a 2 ms sleep per call
        backend, input_names, output_names = plain.backend, plain.input_names, plain.output_names

        def run(self, feeds):
            calls.append("slow")
            time.sleep(0.002)
            return plain.run(feeds)

    class Logged:
        backend, input_names, output_names = plain.backend, plain.input_names, plain.output_names

        def run(self, feeds):
            calls.append("fast")
            return plain.run(feeds)

    feed = {"x": np.ones((1, 256), np.float32)}
    r = side_by_side({"fast": Logged(), "slow": Slower()}, feed, warmup=1, time_budget_s=0.05)
    assert r.rounds >= 10 and r.latency_ms["fast"].p50 < r.latency_ms["slow"].p50
    assert r.ratio_p50["fast"] == 1.0 and r.ratio_p50["slow"] > 1.5
    timed = calls[2:]  # after one warm-up call each
    assert timed[:4] == ["fast", "slow", "slow", "fast"]  # the order flips every round
    with pytest.raises(UsageError, match="two runners"):
        side_by_side({"fast": Logged()}, feed)


# ---- explain --------------------------------------------------------------------------------------
def _qdq_sandwich() -> tuple[Model, Model]:
    """float: x -> Conv -> Exp -> y; Q/DQ: the same with int8 activations and Exp between DQ and Q."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])
    conv = dict(pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    fp = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **conv),
                            helper.make_node("Exp", ["c"], ["y"], name="exp")], "float", [x], [y],
                           [numpy_helper.from_array(w, "w")])
    s = 0.02
    ws = np.abs(w).reshape(8, -1).max(1) / 127
    inits = [numpy_helper.from_array(np.round(w / ws[:, None, None, None]).astype(np.int8), "w_q"),
             numpy_helper.from_array(ws.astype(np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w_z"),
             numpy_helper.from_array(np.float32(s), "s"), numpy_helper.from_array(np.int8(0), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], name="w_dq", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", **conv),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="c_q"),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="c_dq"),
             helper.make_node("Exp", ["cd"], ["e"], name="exp"),
             helper.make_node("QuantizeLinear", ["e", "s", "z"], ["eq"], name="e_q"),
             helper.make_node("DequantizeLinear", ["eq", "s", "z"], ["y"], name="e_dq")]
    q = helper.make_graph(nodes, "qdq", [x], [y], inits)
    mk = lambda g: Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))  # noqa: E731
    return mk(fp), mk(q)


def test_explain_finds_the_sandwich_and_unfused_qdq():
    fp, q = _qdq_sandwich()
    r = explain(fp, q, settings=ONE_THREAD, runs=10)
    assert r.a.unfused_q == r.a.unfused_dq == 0 and r.a.activation_types == {}
    assert r.b.activation_types == {"int8": 3}
    assert r.b.unfused_q + r.b.unfused_dq > 0
    (sw,) = [s for s in r.b.sandwiches if s.node == "exp"]
    assert sw.op_type == "Exp" and sw.in_source and "c_dq" in sw.qdq_nodes and "e_q" in sw.qdq_nodes
    actions = {s.action for s in r.suggestions}
    assert "activation_type" in actions
    assert any(s.exclude == ("exp",) for s in r.suggestions if s.action == "exclude") or sw.qdq_us < 1.0
    assert r.to_dict()["kind"] == "explain" and r.ratio > 0


def test_explain_suggests_folding_what_graph_preparation_removes_instead_of_excluding_it():
    from infertune.data import Dataset
    from infertune.quant.quantize import quantize
    from models import MODELS

    source = Model.from_proto(MODELS["paddle_block"]())
    rng = np.random.default_rng(0)
    calib = Dataset.from_iterable([{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(4)])
    plain = quantize(source, calib, stability_halves=0, prepare=False).model
    r = explain(source, plain, settings=ONE_THREAD, runs=5)
    # ONNX Runtime runs the BN after each quantized Conv (and the one after the Gemm) and the HardSwish pieces in float
    assert {"b1_bn", "b2_bn", "fc_bn"} <= set(r.b.foldable)
    assert {v["op_type"] for k, v in r.b.foldable.items() if k.startswith("hs")} <= {"Add", "Clip", "Mul", "Div"}
    (fold,) = [s for s in r.suggestions if s.action == "prepare"]
    assert fold.value == "--prepare" and not fold.exclude and "BatchNormalization (folded into" in fold.text
    assert not any(s.action == "exclude" and set(s.exclude) & set(r.b.foldable) for s in r.suggestions)
    prepared = explain(source, quantize(source, calib, stability_halves=0).model, settings=ONE_THREAD, runs=5)
    assert not prepared.b.foldable and not any(s.action == "prepare" for s in prepared.suggestions)


def test_explain_counts_match_the_optimised_graph(tmp_path):
    from infertune.perf.explain import variant_facts

    _, q = _qdq_sandwich()
    opt = tmp_path / "opt.onnx"
    prof = profile(q, settings=ONE_THREAD, runs=5, optimized_model=opt)
    g = onnx.load(str(opt)).graph
    facts = variant_facts(q, onnx.load(str(opt)), prof)
    assert facts.unfused_q == sum(n.op_type == "QuantizeLinear" for n in g.node)
    assert facts.unfused_dq == sum(n.op_type == "DequantizeLinear" for n in g.node)
    assert facts.qdq_us == pytest.approx(sum(prof.time_of(n.name) for n in g.node
                                             if n.op_type in ("QuantizeLinear", "DequantizeLinear")))


def test_isa_facts():
    assert any("no VNNI" in s for s in isa_facts(["avx2", "fma"]))
    assert any("VNNI present" in s for s in isa_facts(["avx2", "avx512f", "avx512_vnni"]))
    assert any("no AVX2" in s for s in isa_facts(["sse4_2"]))


# ---- roofline -------------------------------------------------------------------------------------
@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.UINT8])
def test_gemm_model_computes_a_matmul(elem):
    proto = rl.gemm_model(elem, n=8)
    b = numpy_helper.to_array(proto.graph.initializer[0])
    a = (np.arange(64, dtype=np.float32).reshape(8, 8) if elem == TensorProto.FLOAT
         else np.arange(64, dtype=np.uint8).reshape(8, 8))
    y = backends.compile(Model.from_proto(proto), ONE_THREAD).run({"A": a})["Y"]
    np.testing.assert_allclose(y, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5)


def test_ceilings_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERTUNE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(rl, "_gemm_gflops", lambda elem, settings: calls.append(elem) or 100.0 * len(calls))
    monkeypatch.setattr(rl, "_bandwidth_gbs", lambda: 10.0)
    first = rl.ceilings(1)
    assert (first.fp32_gflops, first.int8_gops, first.bandwidth_gbs) == (100.0, 200.0, 10.0)
    assert rl.ceilings(1) == first and len(calls) == 2  # read back, not measured again
    assert rl.ceilings(1, refresh=True).fp32_gflops == 300.0
    (tmp_path / next(p.name for p in tmp_path.iterdir())).write_text("{broken")
    assert rl.ceilings(1).fp32_gflops == 500.0  # a damaged entry is measured again


def test_roofline_uses_source_flops_and_kernel_time():
    m = Model.from_proto(MODELS["small_cnn"]())
    prof = profile(m, Dataset.synthetic(m, samples=2, dims={"N": 1}), settings=ONE_THREAD, batch_size=2, runs=5)
    ceil = rl.Ceilings(1, 50.0, 100.0, 10.0, "x", "cpu", [])
    r = rl.roofline(m, prof, ceil)
    assert rl.profiled_dims(m, prof.input_shapes) == {"N": 2}
    from infertune.analysis.model_stats import inspect_model

    stats = inspect_model(m, dims={"N": 2})
    assert r.model_flops == stats.flops and not r.int8
    conv = next(o for o in r.op_classes if o.op_class == "conv")
    assert conv.flops == stats.flops_by_op_type["Conv"]
    conv_us = sum(n.mean_us for n in prof.nodes if n.op_type in rl.OP_CLASS["conv"])
    assert conv.us == pytest.approx(conv_us)
    if conv_us:
        assert conv.fraction_of_peak == pytest.approx(conv.flops / conv_us / 1e3 / 50.0)


# ---- CLI ------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    from infertune.cli import main

    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_profile_json_and_trace(capsys, model_file, tmp_path):
    trace = tmp_path / "t.json"
    code, out, _ = _cli(capsys, "profile", model_file("small_cnn"), "--runs", 5, "--threads", 1, "--dims", "N=1",
                        "--trace", trace, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["kind"] == "profile" and doc["nodes"] and "traceEvents" in json.loads(trace.read_text())


def test_cli_profile_human(capsys, model_file):
    code, out, _ = _cli(capsys, "profile", model_file("small_cnn"), "--runs", 5, "--dims", "N=1")
    assert code == 0 and "per op type" in out and "Conv" in out


def test_cli_explain(capsys, tmp_path):
    fp, q = _qdq_sandwich()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(fp.proto, str(a))
    onnx.save(q.proto, str(b))
    code, out, _ = _cli(capsys, "explain", a, b, "--runs", 5, "--threads", 1)
    assert code == 0 and "unfused QuantizeLinear" in out and "suggestion" in out
    code, out, _ = _cli(capsys, "explain", a, b, "--runs", 5, "--json")
    assert code == 0 and json.loads(out)["b"]["activation_types"] == {"int8": 3}


def test_cli_sweep(capsys, model_file):
    code, out, _ = _cli(capsys, "bench", model_file("conv"), "--dims", "N=1", "--sweep", "batch=1,2",
                        "--sweep", "threads=1", "--time", "0.1", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["kind"] == "sweep" and len(doc["points"]) == 2 and doc["knees"][0]["axis"] == "batch"
    code, _, err = _cli(capsys, "bench", model_file("conv"), "--sweep", "streams=2")
    assert code == 2 and "sweep axis" in err and "Traceback" not in err


def test_cli_bench_preallocate(capsys, model_file):
    code, out, _ = _cli(capsys, "bench", model_file("conv"), "--dims", "N=1", "--preallocate", "--iterations", 20,
                        "--json")
    assert code == 0 and json.loads(out)["settings"]["preallocate"] is True
