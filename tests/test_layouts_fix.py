"""Feed layouts (one feed per file, scalars, Python iterables) and --fix (control flow specialised to
constant inputs), on stateful_vad: a silero-like model whose MatMul sits inside an If on its sample rate."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest

from infertune import backends
from infertune.analysis.specialization import specialise
from infertune.cli import main
from infertune.data import Dataset, load_dataset
from infertune.errors import DataError, ModelError
from infertune.model import Model
from infertune.quant.quantize import quantize
from infertune.quant.specialize import decides_control_flow, fix_inputs
from models import MODELS


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def chained_feeds(n: int, sr: int = 16000, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Chunks fed in order, each with the state the model returned for the previous one."""
    sess = backends.compile(Model.from_proto(MODELS["stateful_vad"]()))
    rng = np.random.default_rng(seed)
    state, feeds = np.zeros((2, 1, 16), np.float32), []
    for _ in range(n):
        f = {"input": rng.standard_normal((1, 16)).astype(np.float32), "state": state, "sr": np.array(sr, np.int64)}
        feeds.append(f)
        state = sess.run(f)["stateN"]
    return feeds


@pytest.fixture
def vad(tmp_path):
    path = tmp_path / "vad.onnx"
    onnx.save(MODELS["stateful_vad"](), str(path))
    d = tmp_path / "chunks"
    d.mkdir()
    feeds = chained_feeds(12)
    for i, f in enumerate(feeds):
        np.savez(d / f"{i:03d}.npz", **f)
    return path, d, feeds


def test_a_directory_of_one_feed_files_is_read_feed_by_feed(vad):
    path, d, feeds = vad
    ds = load_dataset(d, Model.load(path))
    assert ds.layout == "a directory of 12 .npz files, one feed per file"
    got = list(ds)
    assert len(got) == 12 and all(g["sr"].shape == () for g in got)
    for g, f in zip(got, feeds, strict=True):
        assert {k: v.shape for k, v in g.items()} == {k: v.shape for k, v in f.items()}
        assert all(np.array_equal(g[k], f[k]) for k in f)
    stacked = Dataset.from_npz(d / "000.npz")  # a single file that cannot be a stack: one feed
    assert stacked.layout == "one feed" and len(list(stacked)) == 1


def test_stacked_files_keep_their_meaning(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3, 16, 16), np.float32), label=np.arange(5))
    ds = Dataset.from_npz(tmp_path / "d.npz")
    assert ds.layout == "5 samples stacked along axis 0" and [f["x"].shape for f in ds] == [(1, 3, 16, 16)] * 5


def test_python_iterables_and_data_functions_are_taken_where_data_is(capsys, tmp_path):
    proto = MODELS["conv"]()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    q = quantize(Model.from_proto(proto), iter(feeds), stability_halves=0)  # a one-shot iterator, read twice
    assert q.summary()["quantized_nodes"] == 1
    src = tmp_path / "feeds.py"
    src.write_text(textwrap.dedent('''
        import numpy as np

        def make():
            rng = np.random.default_rng(0)
            for _ in range(6):
                yield {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    '''))
    onnx.save(proto, str(tmp_path / "conv.onnx"))
    code, out, err = run(capsys, "run", tmp_path / "conv.onnx", "--data", f"{src}:make", "-o", tmp_path / "o.npz",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["runs"] == 6 and doc["data"]["data"]["layout"] == "a Python iterable of feeds from make()"
    assert "a Python iterable of feeds from make()" in err
    ref = backends.compile(Model.from_proto(proto))
    with np.load(tmp_path / "o.npz") as z:
        np.testing.assert_array_equal(z["y"], np.concatenate([ref.run(f)["y"] for f in feeds]))


def test_fix_inlines_the_branch_taken_and_folds_the_where(vad):
    path, _, feeds = vad
    m = Model.load(path)
    assert decides_control_flow(m, "sr") and not decides_control_flow(m, "input")
    fixed, changed = fix_inputs(m, {"sr": np.array(16000, np.int64)})
    ops = [n.op_type for n in fixed.graph.node]
    assert "If" not in ops and "Where" not in ops and "MatMul" in ops and changed["If"] == -1
    assert [i.name for i in fixed.inputs] == ["input", "state"]
    a, b = backends.compile(m), backends.compile(fixed)
    for f in feeds:  # the original is the oracle
        want, got = a.run(f), b.run({"input": f["input"], "state": f["state"]})
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other, _ = fix_inputs(m, {"sr": np.array(8000, np.int64)})  # the else branch: another weight
    assert not np.array_equal(backends.compile(other).run({"input": feeds[0]["input"], "state": feeds[0]["state"]})
                              ["output"], a.run(feeds[0])["output"])


def test_specialise_detects_a_constant_input_that_decides_control_flow_and_checks_the_result(vad, monkeypatch):
    path, d, feeds = vad
    m = Model.load(path)
    s = specialise(m, [load_dataset(d, m)])
    assert s.detected == ["sr"] and s.fixed == {"sr": 16000} and s.feeds_checked == 12 and s.max_abs_diff == 0
    assert "input 'sr' holds 16000 in every feed and decides control flow" in s.notes[0]
    mixed = [*feeds[:3], {**feeds[3], "sr": np.array(8000, np.int64)}]
    assert specialise(m, [mixed]) is None  # not the same in every feed: nothing fixed unasked
    with pytest.raises(DataError, match="feed 3 of iterable has sr=8000, but the model is specialised to sr=16000"):
        specialise(m, [mixed], {"sr": np.array(16000, np.int64)})
    import infertune.analysis.specialization as mod

    def wrong(model, values):  # a transform that changed what the model computes
        fixed, changed = fix_inputs(model, values)
        w = next(t for t in fixed.proto.graph.initializer if t.name == "head_w")
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 1.01, "head_w"))
        return Model.from_proto(fixed.proto), changed

    monkeypatch.setattr(mod, "fix_inputs", wrong)
    with pytest.raises(ModelError, match="does not compute what the original does: output 'output' differs"):
        specialise(m, [feeds])


def test_quantize_and_tune_with_fix_from_a_directory_of_one_feed_files(capsys, vad, tmp_path):
    path, d, _ = vad
    code, out, err = run(capsys, "quantize", path, "--data", d, "--fix", "none", "-o", tmp_path / "q0.onnx",
                         "--stability-halves", "0", "--json")
    assert code == 0 and json.loads(out)["quantized_nodes"] == 1  # the head only: the other MatMul is in the If
    code, out, err = run(capsys, "quantize", path, "--data", d, "--fix", "sr=16000", "-o", tmp_path / "q.onnx",
                         "--stability-halves", "0", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["quantized_nodes"] == 2 and doc["specialised"]["fixed"] == {"sr": 16000}
    assert doc["data"]["data"]["layout"] == "a directory of 12 .npz files, one feed per file"
    assert "specialised to sr=16000" in err
    code, out, err = run(capsys, "tune", path, "--calib", d, "--budget", "cosine>=0.9", "--threads", "1",
                         "--runtimes", "ort", "--latency-seconds", "0.05", "-o", tmp_path / "art", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["specialised"]["detected"] == ["sr"] and "input 'sr' holds 16000" in doc["decisions"][0]
    assert any(t["spec"]["precision"] == "int8" and t["metrics"] for t in doc["trials"])
    assert any("sweep over threads only" in x and "axis 0 of input 'input' is fixed at 1" in x
               for x in doc["decisions"])
    code, _, err = run(capsys, "bench", tmp_path / "q.onnx", "--data", d, "--sweep", "batch=1,2", "--time", "0.05")
    assert code == 2 and "batch axis cannot be inferred (axis 0 of input 'input' is fixed at 1)" in err


def test_a_quantized_tensor_read_inside_an_if_is_read_in_float(tmp_path):
    """A Conv+Relu output read both by the main graph and inside an If whose condition depends only on a
    shape (batch == 1): the If reads the float tensor (ONNX Runtime 1.32 aborted on a DequantizeLinear output read there
    once static input shapes made the condition constant, as silero VAD's decoder has it)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    same = helper.make_tensor_value_info("same", TensorProto.FLOAT, ["N", 4, 8, 8])
    neg = helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", 4, 8, 8])
    then_g = helper.make_graph([helper.make_node("Identity", ["r"], ["same"], name="same")], "t", [], [same])
    else_g = helper.make_graph([helper.make_node("Neg", ["r"], ["neg"], name="neg")], "e", [], [neg])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["r"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch"),
             helper.make_node("Equal", ["n", "one"], ["single"], name="single"),
             helper.make_node("If", ["single"], ["branch"], name="by_batch", then_branch=then_g,
                              else_branch=else_g),
             helper.make_node("ReduceMean", ["branch"], ["m"], name="mean", keepdims=0),
             helper.make_node("Add", ["c2", "m"], ["y"], name="out")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3, "w2"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "if_reads_conv", [x], [y], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    m = Model.from_proto(proto)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    q = quantize(m, feeds, stability_halves=0).model
    reads = {i for n in q.graph.node if n.op_type == "If" for a in n.attribute for s in a.g.node for i in s.input}
    dq_outputs = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert "r" in reads and not reads & dq_outputs
    runner = backends.compile(q, backends.Settings(static_shapes={"x": (1, 3, 8, 8)}))  # aborted before
    want = backends.compile(m).run(feeds[0])["y"]
    got = runner.run(feeds[0])["y"]
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.99
