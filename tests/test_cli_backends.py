"""--backend reaches every command that runs a model: it runs there (and its JSON says so) or the
command refuses with exit 2 and one line naming what it supports. Tables never cut names."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from infertune.cli import main
from models import MODELS


@pytest.fixture
def cnn(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(MODELS["small_cnn"](), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((12, 3, 12, 12)).astype(np.float32))
    return model, data, tmp_path


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _openvino():
    pytest.importorskip("openvino")


def test_sensitivity_runs_on_openvino(capsys, cnn):
    _openvino()
    model, data, _ = cnn
    code, out, _ = run(capsys, "sensitivity", model, "--data", data, "--method", "minmax", "--backend", "openvino",
                       "--json")
    doc = json.loads(out)
    assert code == 0 and doc["backend"] == "openvino" and doc["mode"] == "exact" and doc["groups"]


def test_quantize_budget_runs_on_openvino_with_its_placement(capsys, cnn):
    _openvino()
    model, data, tmp = cnn
    code, out, _ = run(capsys, "quantize", model, "--data", data, "--method", "minmax", "--budget", "cosine>=0.99",
                       "--backend", "openvino", "-o", tmp / "q.onnx", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["backend"] == "openvino" and doc["budget"]["backend"] == "openvino"
    assert doc["target"] == "openvino"  # the runtime's own Q/DQ placement, not ORT's


def test_layerwise_runs_on_openvino(capsys, cnn):
    _openvino()
    model, data, tmp = cnn
    assert run(capsys, "quantize", model, "--data", data, "--target", "openvino", "-o", tmp / "q.onnx")[0] == 0
    code, out, _ = run(capsys, "compare", model, tmp / "q.onnx", "--data", data, "--layerwise", "--backend",
                       "openvino", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["kind"] == "layerwise" and doc["backend"] == "openvino" and doc["tensors"]


def test_sweep_runs_on_openvino(capsys, cnn):
    _openvino()
    model, data, _ = cnn
    code, out, _ = run(capsys, "bench", model, "--sweep", "batch=1,2", "--backend", "openvino", "--time", "0.05",
                       "--json")
    doc = json.loads(out)
    assert code == 0 and doc["kind"] == "sweep" and doc["backend"] == "openvino" and len(doc["points"]) == 2


@pytest.mark.parametrize("command", [["profile", "{m}"], ["explain", "{m}", "{m}"],
                                     ["sensitivity", "{m}", "--data", "{d}", "--mode", "fast"]])
def test_commands_that_cannot_run_on_openvino_refuse_in_one_line(capsys, cnn, command):
    model, data, _ = cnn
    args = [a.format(m=model, d=data) for a in command]
    code, out, err = run(capsys, *args, "--backend", "openvino")
    assert code == 2 and not out
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "openvino" in lines[0] and re.search(r"\bort\b|ONNX Runtime", lines[0])


@pytest.mark.parametrize("flags, named", [(["--opt-level", "basic"], "--opt-level"),
                                          (["--option", "session.intra_op.allow_spinning=0"], "session"),
                                          (["--preallocate"], "--preallocate")])
def test_a_setting_the_runtime_would_ignore_is_refused(capsys, cnn, flags, named):
    _openvino()
    model, _, _ = cnn
    code, _, err = run(capsys, "bench", model, "--backend", "openvino", "--time", "0.05", *flags)
    assert code == 2 and named in err and "openvino" in err


def test_an_openvino_property_is_refused_by_onnx_runtime(capsys, cnn):
    code, _, err = run(capsys, "bench", cnn[0], "--time", "0.05", "--option", "PERFORMANCE_HINT=THROUGHPUT")
    assert code == 2 and "PERFORMANCE_HINT" in err and "session" in err


def test_every_json_of_a_command_that_runs_a_model_names_its_runtime(capsys, cnn):
    model, data, tmp = cnn
    docs = {
        "run": ["run", model, "--data", data, "-o", tmp / "out.npz", "--json"],
        "compare": ["compare", model, model, "--data", data, "--json"],
        "bench": ["bench", model, "--time", "0.05", "--json"],
        "profile": ["profile", model, "--runs", "3", "--json"],
        "explain": ["explain", model, model, "--runs", "3", "--json"],
        "quantize": ["quantize", model, "--data", data, "-o", tmp / "q.onnx", "--json"],
        "sensitivity": ["sensitivity", model, "--data", data, "--mode", "fast", "--json"],
        "fp16": ["fp16", model, "--data", data, "-o", tmp / "h.onnx", "--json"],
    }
    for verb, args in docs.items():
        code, out, err = run(capsys, *args)
        assert code == 0, (verb, err)
        assert json.loads(out)["backend"] == "ort", verb


# ---- tables at 80 columns -----------------------------------------------------------------------
LONG = "p2o.DynamicDimension.very_long_node_name_that_a_paddle_export_would_give_0"


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    for i, n in enumerate(model.graph.node):
        n.name = f"{LONG}_{n.op_type}_{i}"
    return model


def _columns(text: str) -> list[str]:
    """Each table column's cells read top to bottom and joined: a name folded over lines reads back whole."""
    cols: dict[int, str] = {}
    for line in text.splitlines():
        if "│" not in line:
            continue
        for i, cell in enumerate(line.split("│")):
            cols[i] = cols.get(i, "") + cell.strip()
    return list(cols.values())


def test_tables_wrap_names_and_keep_numbers_at_80_columns(capsys, cnn, monkeypatch):
    from infertune.cli import common

    model, data, tmp = cnn
    onnx.save(_renamed(onnx.load(model)), tmp / "long.onnx")
    assert run(capsys, "quantize", tmp / "long.onnx", "--data", data, "-o", tmp / "q.onnx")[0] == 0
    monkeypatch.setattr(common.out, "_width", 80)
    code, out, _ = run(capsys, "compare", tmp / "long.onnx", tmp / "q.onnx", "--data", data, "--layerwise")
    assert code == 0 and "…" not in out
    assert any(f"{LONG}_Conv_0" in column for column in _columns(out))
    code, out, _ = run(capsys, "compare", tmp / "long.onnx", tmp / "q.onnx", "--data", data)
    assert "…" not in out
    doc = json.loads(run(capsys, "compare", tmp / "long.onnx", tmp / "q.onnx", "--data", data, "--json")[1])
    cosine = f"{doc['outputs'][0]['metrics']['cosine']:.6f}"
    assert cosine in out  # a number keeps all its digits on one line
