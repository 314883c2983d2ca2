"""The CLI: --json documents, exit codes 0/1/2/3, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from infertune import backends
from infertune.cli import main
from models import MODELS


@pytest.fixture
def conv(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(MODELS["conv"](), str(path))
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    return path, tmp_path / "data.npz"


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_inspect_json(capsys, conv):
    code, out, _ = run(capsys, "inspect", conv[0], "--json", "--dims", "N=2")
    doc = json.loads(out)
    assert code == 0 and doc["flops"] == 2 * 2 * (8 * 16 * 16) * 27
    assert doc["inputs"][0]["shape"] == ["N", 3, 16, 16]


def test_inspect_human(capsys, conv):
    code, out, _ = run(capsys, "inspect", conv[0])
    assert code == 0 and "Conv" in out and "FLOPs" in out


def test_inspect_human_shows_lowercase_dims_and_how_to_resolve_them(capsys, tmp_path):
    """Shapes like [batch, 2, seq, 8] are text, not console markup; unknown FLOPs are not a total."""
    proto = MODELS["attention"]()
    for vi in [*proto.graph.input, *proto.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = {"B": "batch", "S": "seq"}[d.dim_param]
    path = tmp_path / "attention.onnx"
    onnx.save(proto, str(path))
    code, out, err = run(capsys, "inspect", path)
    flat = " ".join((out + err).split())
    assert code == 0 and "[batch, 2, seq, 8]" in flat
    assert "FLOPs: at least 0 FLOP (2 of 2 nodes unknown)" in flat
    assert "give --dims 'seq=N' (q axis 2)" in flat
    code, out, err = run(capsys, "inspect", path, "--dims", "seq=16")
    assert code == 0 and "at least" not in out and "warning" not in err


def test_compare_pass_and_fail_exit_codes(capsys, conv, tmp_path):
    model, data = conv
    code, out, _ = run(capsys, "compare", model, model, "--data", data, "--json")
    assert code == 0 and json.loads(out)["passed"] is True
    other = tmp_path / "other.onnx"
    proto = MODELS["conv"]()
    proto.graph.initializer[1].float_data[:] = []  # keep raw_data; bias changed below
    b = onnx.numpy_helper.to_array(proto.graph.initializer[1]) + 0.5
    proto.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(b.astype(np.float32), "b"))
    onnx.save(proto, str(other))
    code, out, err = run(capsys, "compare", model, other, "--data", data, "-o", tmp_path / "r.json")
    assert code == 1 and "check failed" in err and "allclose_frac>=1" in err
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    code, _, _ = run(capsys, "compare", model, other, "--data", data, "--check", "cosine>=0.5")
    assert code == 0


def test_run_then_compare_against_saved_outputs(capsys, conv, tmp_path):
    model, data = conv
    code, _, err = run(capsys, "run", model, "--data", data, "-o", tmp_path / "ref.npz")
    assert code == 0 and "4 runs" in err
    with np.load(tmp_path / "ref.npz") as z:
        assert z["y"].shape == (4, 8, 16, 16)
    code, out, _ = run(capsys, "compare", tmp_path / "ref.npz", model, "--data", data, "--json")
    assert code == 0 and json.loads(out)["outputs"][0]["metrics"]["max_abs"] == 0.0


def test_bench_json(capsys, conv):
    code, out, _ = run(capsys, "bench", conv[0], "--iterations", "12", "--warmup", "1", "--json",
                       "--threads", "1")
    doc = json.loads(out)
    assert code == 0 and doc["iterations"] == 12 and doc["settings"]["intra_op_threads"] == 1
    assert doc["latency_ms"]["p50"] > 0


def test_bench_saves_the_optimised_graph(capsys, conv, tmp_path):
    code, _, _ = run(capsys, "bench", conv[0], "--iterations", "1", "--save-optimized",
                     tmp_path / "opt.onnx")
    assert code == 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops != {"Conv", "Relu"}  # ORT fused Conv+Relu (FusedConv) in what it runs


def _bad_inputs(tmp_path, model_path):
    good = model_path.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(2000))
    x = np.zeros((2, 3, 16, 16), np.float32)
    np.savez(tmp_path / "missing.npz", label=np.zeros(2))
    np.savez(tmp_path / "misnamed.npz", image=x)
    np.savez(tmp_path / "dtype.npz", x=x.astype(np.float64))
    np.savez(tmp_path / "rank.npz", x=x[:, 0])
    np.savez(tmp_path / "empty.npz", x=x[:0])
    m, d = str(model_path), "--data"
    return {
        "truncated model": ([str(tmp_path / "trunc.onnx")], "not a valid ONNX model"),
        "random bytes": ([str(tmp_path / "random.onnx")], "not a valid ONNX model"),
        "nonexistent model": ([str(tmp_path / "nope.onnx")], "model file not found"),
        "input missing": ([m, d, str(tmp_path / "missing.npz")], "input 'x' is missing"),
        "misnamed input": ([m, d, str(tmp_path / "misnamed.npz")], "(the data has: image"),
        "wrong dtype": ([m, d, str(tmp_path / "dtype.npz")], "expected dtype float32, got float64"),
        "wrong rank": ([m, d, str(tmp_path / "rank.npz")], "expected rank 4"),
        "empty dataset": ([m, d, str(tmp_path / "empty.npz")], "empty"),
        "nonexistent data": ([m, d, str(tmp_path / "nope.npz")], "data path not found"),
    }


@pytest.mark.parametrize("verb", ["compare", "bench"])
@pytest.mark.parametrize("case", ["truncated model", "random bytes", "nonexistent model",
                                  "input missing", "misnamed input", "wrong dtype", "wrong rank",
                                  "empty dataset", "nonexistent data"])
def test_bad_input_is_one_line_exit_2_no_output(capsys, conv, tmp_path, verb, case):
    args, fragment = _bad_inputs(tmp_path, conv[0])[case]
    if verb == "compare":
        args = [args[0], *args]  # the same model as reference and candidate
    out_file = tmp_path / "result.json"
    code, out, err = run(capsys, verb, *args, "-o", out_file)
    assert code == 2, err
    assert fragment in err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert not out_file.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".result.json")]


def test_nan_in_data_is_warned_and_counted(capsys, conv, tmp_path):
    model, _ = conv
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    x[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    code, out, err = run(capsys, "compare", model, model, "--data", tmp_path / "nan.npz",
                         "--json")
    doc = json.loads(out)
    assert code == 0 and doc["skipped"] == 1 and doc["samples"] == 3
    assert "1 NaN/Inf values (first in sample 2)" in doc["warnings"][0]


def test_backend_unavailable_exit_3(capsys, conv, monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "fake",
                        backends.Runtime("fake", "Fake", "x", "X", "no_such_module_xyz", "fake", None))
    code, _, err = run(capsys, "bench", conv[0], "--backend", "fake")
    assert code == 3 and "pip install 'infertune[fake]'" in err
    code, _, err = run(capsys, "bench", conv[0], "--backend", "nope")
    assert code == 2 and "unknown backend" in err


def test_bad_usage_exit_2(capsys, conv):
    code, _, err = run(capsys, "bench", conv[0], "--iterations", "0")
    assert code == 2
    code, _, err = run(capsys, "compare", conv[0], conv[0], "--data", conv[1], "--check", "cos")
    assert code == 2 and "bad check" in err


def test_console_script_entry_point(conv):
    proc = subprocess.run([sys.executable, "-m", "infertune", "inspect", str(conv[0]), "--json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["name"] == "conv.onnx"
    proc = subprocess.run([sys.executable, "-m", "infertune", "inspect", "/nonexistent.onnx"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
