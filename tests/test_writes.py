"""What infertune writes and refuses beyond the one-command corpus (issue 17): a tune run's lock
and journal, exports of look-alike names, the Python API, permissions, and the messages' hints.

The fixtures come from ``corpus.build``; the one tune search these tests need runs once per module
(``tune_run``) and is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from corpus import build, fill, run_cli, snapshot
from infertune import backends
from infertune.data import Dataset
from infertune.deploy import artifact
from infertune.model import Model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("corpus"))


# ---- one tune run, reused: non-finite calibration data, the run directory's lock and journal -------
TUNE_RUN = ["tune", "{M}", "--calib", "{NAN}", "--eval", "{T}", "--eval-samples", "40", "--budget", "cosine>=0.9",
            "--runtimes", "ort", "--threads", "1", "--max-trials", "2", "--latency-seconds", "0.05"]


@pytest.fixture(scope="module")
def tune_run(corpus, tmp_path_factory):
    """The same tune as a user would run it, once: NaN/Inf in the calibration data, umask 022."""
    out = tmp_path_factory.mktemp("tune") / "art"
    old = os.umask(0o022)
    try:
        code, stdout, err = run_cli([*fill(TUNE_RUN, corpus, out.parent), "-o", out, "--json"])
    finally:
        os.umask(old)
    assert code == 0, err
    return out, json.loads(stdout), err


def test_nan_in_calibration_data_is_left_out_and_int8_is_tried(tune_run):
    """Not 'nothing to quantize', not a silent FP32 fallback: the samples are left out, INT8 is measured."""
    _, doc, err = tune_run
    int8 = [t for t in doc["trials"] if t["spec"]["precision"] == "int8"]
    assert int8 and int8[0]["metrics"] and not int8[0]["note"].startswith("failed")
    assert "3 sample(s) holding them left out of calibration" in err


def test_artifact_files_follow_the_umask(tune_run):
    out, _, _ = tune_run
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        n: 0o644 for n in ("manifest.json", "model.onnx", "recipe.json", "report.html") if (out / n).exists()}
    assert out.with_name("art.run").stat().st_mode & 0o777 == 0o755


def test_a_second_run_onto_the_artifact_needs_force(corpus, tune_run):
    out, _, _ = tune_run
    before = snapshot(out)
    code, _, err = run_cli([*fill(TUNE_RUN, corpus, out.parent), "-o", out])
    assert code == 2 and "--force" in err and err.strip().count("\n") == 0
    assert snapshot(out) == before


def _copy_run(tune_run, tmp_path) -> Path:
    out, _, _ = tune_run
    run = tmp_path / "run"
    shutil.copytree(out.with_name("art.run"), run)
    return run


def test_a_damaged_journal_line_is_kept_aside_and_a_stale_lock_taken_over(corpus, tune_run, tmp_path):
    run = _copy_run(tune_run, tmp_path)
    journal = run / "trials.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], '{"index": 7, "spec": "garbage"', *lines[1:]]) + "\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    code, stdout, err = run_cli([*fill(TUNE_RUN, corpus, tmp_path), "--run-dir", run, "-o", tmp_path / "a",
                                 "--json"])
    assert code == 0, err
    assert "damaged line(s) before the last kept aside" in err and "took over the lock" in err
    assert (run / "trials.jsonl.bad").read_text() == '{"index": 7, "spec": "garbage"\n'
    assert [json.loads(x)["key"] for x in journal.read_text().splitlines()] == \
        [json.loads(x)["key"] for x in lines]  # the good lines kept, in order; nothing redone twice
    assert (run / "lock").read_text() == ""  # released


def test_a_torn_last_line_is_dropped_without_a_word(corpus, tune_run, tmp_path):
    run = _copy_run(tune_run, tmp_path)
    journal = run / "trials.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    code, _, err = run_cli([*fill(TUNE_RUN, corpus, tmp_path), "--run-dir", run, "-o", tmp_path / "a"])
    assert code == 0, err
    assert "damaged" not in err and not (run / "trials.jsonl.bad").exists()
    assert len(journal.read_text().splitlines()) == len(lines)  # the torn trial ran again


def test_a_run_directory_in_use_is_refused(corpus, tune_run, tmp_path):
    from infertune.search.journal import RunLock

    run = _copy_run(tune_run, tmp_path)
    before = snapshot(run)
    with RunLock(run):
        code, _, err = run_cli([*fill(TUNE_RUN, corpus, tmp_path), "--run-dir", run, "-o", tmp_path / "a"])
        assert code == 2 and f"pid {os.getpid()}" in err and "in use" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "a").exists()
    assert {k: v for k, v in snapshot(run).items() if k != "lock"} == {k: v for k, v in before.items() if k != "lock"}


# ---- exports, the Python API, and what the messages tell the user to do ------------------------------
def test_export_names_that_sanitise_alike_are_refused(corpus, tmp_path):
    repo = tmp_path / "repo"
    first = corpus["IN"] / "twins" / "my model"
    second = corpus["IN"] / "twins" / "my_model"
    assert run_cli(["export", "triton", first, "--repo", repo])[0] == 0
    exported = snapshot(repo)
    code, _, err = run_cli(["export", "triton", second, "--repo", repo, "--force"])
    assert code == 2 and "another artifact" in err and "--name" in err
    assert snapshot(repo) == exported
    code, _, err = run_cli(["export", "triton", second, "--repo", repo, "--name", "my_model"])
    assert code == 2 and "--force" in err
    assert run_cli(["export", "triton", second, "--repo", repo, "--name", "my_model", "--force"])[0] == 0
    record = json.loads((repo / "my_model" / "infertune-export.json").read_text())
    assert record["source"] == str(second.resolve())
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "my_model", "my_model/1", "my_model/1/model.onnx", "my_model/config.pbtxt", "my_model/infertune-export.json"]


def test_python_api_refuses_the_same(corpus, tmp_path):
    import infertune
    from infertune.deploy.triton import export_triton
    from infertune.errors import OutputError

    before = snapshot(corpus["BASE"])
    with pytest.raises(artifact.ArtifactError, match="edited after saving"):
        infertune.load(corpus["EDITED"])
    with pytest.raises(artifact.ArtifactError, match="not part of the artifact"):
        infertune.load(corpus["EXTRA"])
    m = Model.load(corpus["M"])
    with pytest.raises(OutputError, match="is an input"):
        m.save(corpus["M"])
    with pytest.raises(OutputError, match="is an input"):
        m.save(corpus["HARD"])
    with pytest.raises(OutputError, match="not an infertune artifact"):
        artifact.save_artifact(corpus["FOREIGN"], m, source_sha256="0" * 64, settings=backends.Settings(), force=True)
    with pytest.raises(OutputError, match="--force"):
        artifact.save_artifact(corpus["ART"], m, source_sha256="0" * 64, settings=backends.Settings())
    with pytest.raises(OutputError, match="is or holds the input"):
        export_triton(corpus["ART"], corpus["ART"].parent)
    assert snapshot(corpus["BASE"]) == before


def test_inspect_hint_for_an_unnamed_dim_can_be_followed(corpus):
    code, out, err = run_cli(["inspect", corpus["UNNAMED"]])
    assert code == 0 and "--dims 'x:2=N' (x axis 2)" in " ".join(err.split())
    code, out, err = run_cli(["inspect", corpus["UNNAMED"], "--dims", "x:2=16", "--dims", "x:3=16", "--json"])
    assert code == 0 and "warning" not in err
    assert json.loads(out)["flops"] == 2 * (8 * 16 * 16) * 27  # as conv with its named 16 x 16 input


def test_profile_and_explain_honour_dims(corpus):
    code, out, err = run_cli(["profile", corpus["HW"], "--dims", "H=8,W=4", "--runs", "2", "--json"])
    assert code == 0, err
    assert json.loads(out)["input_shapes"] == {"x": [1, 3, 8, 4]}
    code, out, err = run_cli(["explain", corpus["HW"], corpus["HW"], "--dims", "H=8,W=4", "--runs", "2", "--json"])
    assert code == 0, err
    nodes = json.loads(out)["a"]
    assert nodes["model"] == "hw.onnx"


def test_the_console_script_turns_an_empty_file_into_one_line_not_aborted(corpus):
    """np.load on an empty file raises EOFError, which click turns into 'aborted' (exit 130)."""
    proc = subprocess.run([sys.executable, "-m", "infertune", "diagnose-preprocess", str(corpus["M"]),
                           str(corpus["IMAGES"]), "--spec", str(corpus["GOOD"]), "--reference-outputs",
                           str(corpus["EMPTY"])], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "aborted" not in proc.stderr
    assert "empty.npz" in proc.stderr


def test_constant_and_near_zero_calibration_ranges_are_named():
    """x varies; c is one value throughout, d is noise below 1e-6: both are named, the model still quantized."""
    from infertune.quant.quantize import quantize
    from models import _model, _w

    ins = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 8]) for n in "xcd"]
    outs = [helper.make_tensor_value_info(f"y{n}", onnx.TensorProto.FLOAT, ["N", 4]) for n in "xcd"]
    nodes = [helper.make_node("MatMul", [n, f"W{n}"], [f"y{n}"], name=f"mm_{n}") for n in "xcd"]
    m = Model.from_proto(_model(nodes, ins, outs, [_w(f"W{n}", (8, 4), i) for i, n in enumerate("xcd")], "three"))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32), "c": np.full((1, 8), 0.5, np.float32),
              "d": (rng.standard_normal((1, 8)) * 1e-8).astype(np.float32)} for _ in range(8)]
    r = quantize(m, Dataset.from_iterable(feeds), stability_halves=0)
    (w,) = [w for w in r.warnings if "single value or almost nothing" in w]
    assert w.startswith("2 tensor(s)") and "'c' (0.5)" in w and "'d' (|x| < 1e-06)" in w and "'x'" not in w
    assert r.summary()["quantized_nodes"] == 3


def test_the_net_under_main_tells_a_users_failure_from_a_bug(tmp_path):
    """One line for what a user's file or path causes wherever it surfaces; None (a traceback) for the rest."""
    from infertune.cli.failures import expected_failure

    missing = tmp_path / "nope.npz"
    with pytest.raises(OSError) as e:
        open(missing)
    assert expected_failure(e.value) == f"{missing}: No such file or directory"
    np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object))  # loading it would unpickle
    with pytest.raises(ValueError) as e:
        np.load(tmp_path / "p.npy", allow_pickle=False)
    assert "allow_pickle" in expected_failure(e.value)
    with pytest.raises(RecursionError) as e:
        json.loads("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in expected_failure(e.value)
    with pytest.raises(ValueError) as e:
        int("not a number")  # a bug of ours: its traceback is kept
    assert expected_failure(e.value) is None
    assert expected_failure(KeyError("x")) is None and expected_failure(OSError("no errno, no file")) is None
