"""tune: search, resumable journal, artifact with verified hashes, and the HTML report in a real browser."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infertune import Budget, Evaluator, backends, tune
from infertune.data import Dataset
from infertune.deploy import artifact
from infertune.deploy.manifest import signed
from infertune.errors import UsageError
from infertune.model import Model
from infertune.search.choice import NOISE, choose
from infertune.search.journal import TRIALS
from infertune.search.trials import Trial, TrialSpec
from interrupt import kill_after_trials
from models import MODELS

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _digits(n_eval: int = 120):
    m = Model.load(DIGITS / "digits_cnn.onnx")
    with np.load(DIGITS / "calib.npz") as z:
        calib = Dataset.from_iterable([{"image": z["image"][i:i + 1]} for i in range(64)])
    with np.load(DIGITS / "test.npz") as z:
        feeds = [{"image": z["image"][i:i + 1]} for i in range(n_eval)]
        labels = z["label"][:n_eval]
    return m, calib, Evaluator(m, feeds, labels=labels, settings=backends.Settings(intra_op_threads=1))


def _trial(i, spec, p50, met=True):
    return Trial(i, spec, {"sqnr_db": 30.0}, p50, met, 0.1, None)


def test_choose_prefers_fp32_within_noise_and_int8_when_clearly_faster():
    fp = _trial(0, TrialSpec("fp32", threads=1), 10.0)
    close = _trial(1, TrialSpec("int8", "auto", (), 1), 10.0 * (1 - NOISE / 2))
    far = _trial(2, TrialSpec("int8", "auto", ("a",), 1), 6.0)
    log: list[str] = []
    assert choose([fp], [fp, close], log, "sqnr>=30") is fp and "within measurement noise" in log[-1]
    assert choose([fp], [fp, close, far], log, "sqnr>=30") is far and "faster" in log[-1]
    slow = _trial(3, TrialSpec("int8", "auto", (), 1), 12.0)
    assert choose([fp], [fp, slow], log, "sqnr>=30") is fp and "for quantization to pay" in log[-1]
    assert choose([fp], [fp], log, "cosine>=0.999") is fp and log[-1].endswith("no INT8 variant met cosine>=0.999")


def test_trial_spec_key_is_stable_and_validated():
    a = TrialSpec("int8", "auto", ("x", "y"), 1)
    doc = json.loads(json.dumps(Trial(0, a, {}, 1.0, True, 0, None).to_dict()))
    assert TrialSpec.from_dict(doc["spec"]) == a and doc["key"] == a.key
    assert a.key != TrialSpec("int8", "auto", ("y", "x"), 1).key
    with pytest.raises(UsageError):
        TrialSpec("int4")


def test_tune_digits_meets_budget_and_writes_a_verified_artifact(tmp_path):
    m, calib, ev = _digits()
    r = tune(m, calib, ev, Budget.parse("top1_drop<=0.5"), run_dir=tmp_path / "run", threads=(1,),
             latency_s=0.3, output=tmp_path / "art")
    assert r.chosen.met and r.chosen.metrics["top1_drop"] <= 0.5
    assert r.p50(r.chosen) <= r.p50(r.fp32)  # never slower than FP32, on the numbers the choice used
    int8 = [t for t in r.trials if t.spec.precision == "int8"]
    assert int8 and all(t.model_file and (tmp_path / "run" / t.model_file).exists() for t in int8)
    lines = (tmp_path / "run" / TRIALS).read_text().splitlines()
    assert len(lines) == len(r.trials) == len({json.loads(x)["key"] for x in lines})
    a = artifact.load(tmp_path / "art")
    assert a.manifest["accuracy"]["top1_drop"] == pytest.approx(r.chosen.metrics["top1_drop"])
    assert a.manifest["source_sha256"] == artifact.sha256_file(DIGITS / "digits_cnn.onnx")
    assert set(a.manifest["files"]) == {"model.onnx", "report.html"} | ({"recipe.json"} if int8 and
                                                                        r.chosen.spec.precision == "int8" else set())
    x = ev.feeds[0]
    chosen = Model.load(tmp_path / "run" / r.chosen.model_file) if r.chosen.model_file else m
    np.testing.assert_allclose(next(iter(a.runner().run(x).values())),
                               next(iter(backends.compile(chosen).run(x).values())), rtol=1e-5, atol=1e-6)
    assert a.differences == []  # measured on this machine


def test_tune_falls_back_to_exclusions_when_int8_misses(tmp_path, monkeypatch):
    from infertune.search import float_fallback

    _steady_clock(monkeypatch)  # INT8 faster than FP32, so exclusions are worth searching
    m, calib, ev = _digits(60)
    ranked_on = []
    real = float_fallback.sensitivity

    def counted(space, evaluator, **kw):
        ranked_on.append(len(evaluator.feeds))
        return real(space, evaluator, **kw)

    monkeypatch.setattr(float_fallback, "sensitivity", counted)
    r = tune(m, calib, ev, Budget.parse("sqnr>=45"), run_dir=tmp_path / "run", threads=(1,), latency_s=0.1)
    assert r.sensitivity and {g["node"] for g in r.sensitivity}  # the ranking was needed
    assert ranked_on == [float_fallback.RANK_FEEDS] < [60]  # ranked on the first evaluation feeds only
    excl = [t for t in r.trials if t.spec.exclude]
    assert excl, "bisection tried some exclusion sets"
    assert any("sensitivity" in d for d in r.decisions)
    assert r.chosen.met


def test_no_ranking_when_even_full_int8_is_not_faster_than_fp32(tmp_path, monkeypatch):
    # every DQ node costs time: the fully quantized model is the slowest variant, at either thread count
    _fake_clock(monkeypatch, lambda model, settings: (1.0 + 0.01 * _count(model, "DequantizeLinear"))
                / settings.intra_op_threads)
    m, calib, ev = _digits(60)
    r = tune(m, calib, ev, Budget.parse("sqnr>=45"), run_dir=tmp_path / "run", threads=(1, 2), runtimes=("ort",))
    assert [(t.spec.precision, t.spec.threads) for t in r.trials] == [("fp32", 1), ("fp32", 2), ("int8", 1),
                                                                       ("int8", 2)] and not r.sensitivity
    (why,) = [d for d in r.decisions if "no faster than a variant that does" in d and "not ranking" in d]
    assert "for FP32, 1 thread" in why and "for FP32, 2 threads" in why
    assert r.chosen.spec.precision == "fp32"


# p50 by (quantized, runtime) at one thread: INT8 quicker on OpenVINO than on ORT, both quicker than FP32
_TWO_RUNTIMES = {(False, "ort"): 1.0, (False, "openvino"): 1.0, (True, "ort"): 0.8, (True, "openvino"): 0.6}


def _runtime_clock(monkeypatch, p50s):
    """Replace tune's timing by ``p50s[(quantized, runtime)]`` divided by the thread count."""
    import infertune.search.measure as measure
    from infertune.perf.isolated import IsolatedLatency

    def p50(v):
        return p50s[(_count(Model.load(v.model), "DequantizeLinear") > 0, v.backend)] / v.settings.intra_op_threads

    monkeypatch.setattr(measure, "time_variants", lambda variants, feed, *, rounds, seconds: {
        v.key: IsolatedLatency(v.key, p50(v), [p50(v)] * rounds, [1] * rounds) for v in variants})


def _misses(monkeypatch, when):
    """Every trial whose spec satisfies ``when`` misses the budget; the others are judged as measured."""
    import infertune.search.measure as measure

    real = measure.TrialRunner.judge

    def judge(self, spec, model):
        v = real(self, spec, model)
        return dataclasses.replace(v, met=False) if when(spec) else v

    monkeypatch.setattr(measure.TrialRunner, "judge", judge)


def _searched_only_full_int8(r, runtime: str) -> bool:
    """``runtime`` got its full INT8 trials and nothing more: no algorithms, no ranking, no exclusions."""
    int8 = [t.spec for t in r.trials if t.spec.precision == "int8" and t.spec.backend == runtime]
    return bool(int8) and all(not s.exclude and not s.algorithms for s in int8)


def test_a_runtime_whose_full_int8_is_slower_than_another_runtimes_passing_int8_is_not_searched(tmp_path, monkeypatch):
    # ORT's full INT8 misses and OpenVINO's meets, faster at both thread counts: keeping nodes in float on ORT
    # only adds work, so tune neither runs accuracy algorithms nor ranks nodes there
    pytest.importorskip("openvino")
    _runtime_clock(monkeypatch, _TWO_RUNTIMES)
    _misses(monkeypatch, lambda s: s.precision == "int8" and s.backend == "ort")
    m, calib, ev = _digits(60)
    r = tune(m, calib, ev, Budget.parse("top1_drop<=5"), run_dir=tmp_path / "run", threads=(1, 2),
             runtimes=("ort", "openvino"))
    assert _searched_only_full_int8(r, "ort") and not r.sensitivity
    (why,) = [d for d in r.decisions if "no faster than a variant that does" in d]
    assert "(0.800 ms vs 0.600 ms for INT8 auto on OpenVINO, 0 in float, 1 thread; 0.400 ms vs 0.300 ms for " \
           "INT8 auto on OpenVINO, 0 in float, 2 threads)" in why
    assert r.chosen.spec.backend == "openvino" and r.chosen.spec.precision == "int8"


def test_the_runtime_with_the_quickest_full_int8_is_searched_first(tmp_path, monkeypatch):
    # both runtimes' full INT8 miss. OpenVINO's is the quicker, so its accuracy search runs first although ORT
    # is asked for first, and the variant that meets the budget there (bias correction, all in 8-bit) bounds
    # ORT's search: ORT's full INT8 cannot beat it, so ORT gets no algorithms, ranking or bisection. Searched
    # in the order asked for, ORT's full INT8 (faster than FP32) would have been searched first, for nothing.
    pytest.importorskip("openvino")
    _runtime_clock(monkeypatch, _TWO_RUNTIMES)
    _misses(monkeypatch, lambda s: s.precision == "int8" and (s.backend == "ort" or not s.algorithms))
    m, calib, ev = _digits(60)
    r = tune(m, calib, ev, Budget.parse("top1_drop<=5"), run_dir=tmp_path / "run", threads=(1, 2),
             runtimes=("ort", "openvino"))
    (first,) = [d for d in r.decisions if d.startswith("searching OpenVINO first")]
    assert "INT8 auto on OpenVINO, 0 in float, 1 thread 0.600 ms; INT8 auto, 0 in float, 1 thread 0.800 ms" in first
    assert _searched_only_full_int8(r, "ort") and not r.sensitivity
    assert r.chosen.spec.backend == "openvino" and r.chosen.spec.algorithms and r.chosen.met


def test_int8_slower_at_one_thread_but_faster_at_two_is_still_searched(tmp_path, monkeypatch):
    # 8-bit kernels that scale better with threads than FP32's: judged at one thread count alone, the
    # search would stop before trying anything that could win at the other
    def clock(model, settings):
        dq = _count(model, "DequantizeLinear")
        return 1.0 + 0.01 * dq if settings.intra_op_threads == 1 else 0.6 - 0.001 * dq

    _fake_clock(monkeypatch, clock)
    m, calib, ev = _digits(60)
    r = tune(m, calib, ev, Budget.parse("sqnr>=45"), run_dir=tmp_path / "run", threads=(1, 2), runtimes=("ort",))
    assert not any("not ranking" in d for d in r.decisions)
    assert any(t.spec.precision == "int8" and t.spec.threads == 2 and not t.spec.exclude for t in r.trials)
    assert len(r.trials) > 4  # went on: algorithms, then the ranking and exclusions


def test_a_budget_met_only_by_the_luck_of_the_draw_is_not_met(tmp_path):
    m, calib, ev = _digits(120)
    q = tune_module_quantize(m, calib)
    outs = ev.run(q)
    point = ev.score(outs)
    assert "confidence" not in point and point == ev.evaluate(q)  # one way to compute the metrics
    edge = Budget.parse(f"sqnr>={point['sqnr_db'] - 0.01:.4f}")  # met, but only just
    easy = Budget.parse(f"sqnr>={point['sqnr_db'] - 10:.4f}")
    assert 0.2 < ev.score(outs, edge, resamples=200)["confidence"] < 0.8
    assert ev.score(outs, easy, resamples=200)["confidence"] == 1.0
    assert ev.judge(outs, easy).met and not ev.judge(outs, edge).met  # what tune and quantize --budget use
    assert "too close to call" in ev.judge(outs, edge).note
    fn = Budget(fn=lambda ref, got: float(np.mean([r["logits"].argmax() == g["logits"].argmax()
                                                   for r, g in zip(ref, got, strict=True)])), fn_min=0.0)
    s = ev.score(outs, fn, resamples=50)
    assert 0.9 < s["user"] <= 1.0 and s["confidence"] == 1.0  # the function is called on each resample


def tune_module_quantize(m, calib):
    from infertune.quant.quantize import quantize

    return quantize(m, calib, stability_halves=0).model


def test_run_dir_of_another_configuration_is_refused(tmp_path):
    m, calib, ev = _digits(30)
    tune(m, calib, ev, Budget.parse("cosine>=0.9"), run_dir=tmp_path / "run", threads=(1,), latency_s=0.05)
    with pytest.raises(UsageError, match="another tune run.*budget"):
        tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=tmp_path / "run", threads=(1,), latency_s=0.05)


def _count(model, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def _fake_clock(monkeypatch, p50_of):
    """Replace tune's one timing function (each variant in its own process) by ``p50_of(model, settings)``."""
    import infertune.search.measure
    from infertune.model import Model
    from infertune.perf.isolated import IsolatedLatency

    def time_variants(variants, feed, *, rounds, seconds):
        return {v.key: IsolatedLatency(v.key, p50_of(Model.load(v.model), v.settings), [1.0] * rounds, [1] * rounds)
                for v in variants}

    monkeypatch.setattr(infertune.search.measure, "time_variants", time_variants)


def _steady_clock(monkeypatch):
    """Latency as a fixed function of the model (fewer float ops, faster): the same measurements
    in every run, so a resumed search can be compared with an uninterrupted one."""
    _fake_clock(monkeypatch, lambda model, settings: 1.0 - 0.01 * _count(model, "DequantizeLinear")
                + 0.001 * settings.intra_op_threads)


def test_resume_reuses_recorded_trials_and_skips_a_torn_line(tmp_path, monkeypatch):
    _steady_clock(monkeypatch)
    m, calib, ev = _digits(30)
    kw = dict(run_dir=tmp_path / "run", threads=(1,), latency_s=0.05)
    first = tune(m, calib, ev, Budget.parse("sqnr>=45"), **kw)
    journal = tmp_path / "run" / TRIALS
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    seen = []
    second = tune(m, calib, ev, Budget.parse("sqnr>=45"), on_trial=lambda t, reused: seen.append(reused), **kw)
    assert seen.count(False) == 1 and seen.count(True) == len(lines) - 1  # only the torn trial is redone
    assert [t.spec for t in second.trials] == [t.spec for t in first.trials]
    assert second.chosen.spec == first.chosen.spec
    keys = [json.loads(x)["key"] for x in journal.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(first.trials)


def test_kill_9_mid_run_then_resume_with_the_same_command(tmp_path):
    """The CLI killed with SIGKILL after its first trials; the same command finishes the run.

    The budget is out of INT8's reach, so the choice (FP32 on ONNX Runtime) does not depend on a
    latency measured twice; the path can (whether INT8 is fast enough to be worth ranking), so an
    uninterrupted run is compared on its choice, and a third run of the same command (with --force, the
    artifact being there now) must reuse every recorded trial and add none."""
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "infertune", "tune", str(DIGITS / "digits_cnn.onnx"), "--calib",
           str(DIGITS / "calib.npz"), "--eval", str(DIGITS / "test.npz"), "--eval-samples", "60", "--budget",
           "sqnr>=200", "--threads", "1", "--latency-seconds", "0.3", "-o", str(out), "--json"]
    journal = tmp_path / "art.run" / TRIALS
    before = kill_after_trials(cmd, journal, 2)
    assert not out.exists()  # no half-written artifact
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-800:]
    doc = json.loads(done.stdout)
    keys = [json.loads(x)["key"] for x in journal.read_text().splitlines()]
    assert keys[: len(before)] == before and len(keys) == len(set(keys)) == len(doc["trials"])
    ref = subprocess.run([*cmd[:-3], "-o", str(tmp_path / "ref"), "--json"], capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-800:]
    assert json.loads(ref.stdout)["chosen"]["spec"] == doc["chosen"]["spec"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the artifact exists now
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr[-800:]
    again = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-800:]
    third = json.loads(again.stdout)
    assert [t["key"] for t in third["trials"]] == [t["key"] for t in doc["trials"]]  # all reused, none added
    assert [json.loads(x)["key"] for x in journal.read_text().splitlines()] == keys
    assert third["chosen"]["spec"] == doc["chosen"]["spec"]
    assert artifact.load(out).manifest["kind"] == "infertune-artifact"


# ---- artifact -------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    m = Model.from_proto(MODELS["conv"]())
    path = artifact.save_artifact(tmp_path / "a", m, source_sha256="0" * 64,
                                  settings=backends.Settings(intra_op_threads=1), recipe={"x": 1},
                                  accuracy={"cosine": 1.0}, latency={"p50_ms": 1.0})
    return path


def test_artifact_round_trip(saved):
    a = artifact.load(saved)
    assert a.settings.intra_op_threads == 1 and a.manifest["recipe"] == "recipe.json"
    x = np.ones((1, 3, 16, 16), np.float32)
    np.testing.assert_array_equal(a.runner().run({"x": x})["y"],
                                  backends.compile(Model.from_proto(MODELS["conv"]())).run({"x": x})["y"])


def test_artifact_with_one_changed_byte_is_refused(saved):
    p = saved / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="model.onnx was changed after saving"):
        artifact.load(saved)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "recipe.json").unlink(), "recipe.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{"), "not valid JSON"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: _edit(d, schema_version=99), "schema_version 99"),
    (lambda d: _edit(d, backend="tensorrt-native"), "needs backend"),
])
def test_artifact_damage_is_named(saved, damage, message):
    damage(saved)
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(saved)


def _edit(d: Path, **changes) -> None:
    """Change the manifest as a writer would have made it (its digest recomputed)."""
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(signed(m)))


def test_artifact_from_another_machine_loads_with_differences_or_is_refused_when_strict(saved):
    m = json.loads((saved / "manifest.json").read_text())
    # an ISA flag and a CPU name no real machine running this test has
    m["target"].update(cpu="Imaginary CPU 9000", isa=[*m["target"]["isa"], "avx1024_imaginary"])
    (saved / "manifest.json").write_text(json.dumps(signed(m)))
    a = artifact.load(saved)
    assert any("avx1024_imaginary" in d for d in a.differences) and any("Imaginary" in d for d in a.differences)
    with pytest.raises(artifact.ArtifactError, match="tuned for another target"):
        artifact.load(saved, strict=True)


def test_save_artifact_leaves_nothing_on_failure(tmp_path):
    m = Model.from_proto(MODELS["conv"]())
    with pytest.raises(FileNotFoundError):
        artifact.save_artifact(tmp_path / "a", m, source_sha256="0", settings=backends.Settings(),
                               extra_files={"report.html": tmp_path / "missing.html"})
    assert list(tmp_path.iterdir()) == []


def test_cli_tune_bad_input(capsys, tmp_path):
    from infertune.cli import main

    with np.load(DIGITS / "calib.npz") as z:
        np.savez(tmp_path / "images.npz", image=z["image"][:16])  # no labels
    code = main(["tune", str(DIGITS / "digits_cnn.onnx"), "--calib", str(tmp_path / "images.npz"), "--budget",
                 "top1_drop<=0.5", "-o", str(tmp_path / "o")])
    assert code == 2 and "needs labels" in capsys.readouterr().err
    code = main(["tune", str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "--budget",
                 "cosine>=0.9", "--methods", "magic", "-o", str(tmp_path / "o")])
    assert code == 2 and "unknown method" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- the report in a real browser ------------------------------------------------------------------
def _chromium() -> str | None:
    return next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


def test_report_renders_in_headless_chromium(tmp_path, monkeypatch):
    browser = _chromium()
    if browser is None:
        if os.environ.get("INFERTUNE_REQUIRE_BROWSER"):
            pytest.fail("INFERTUNE_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium here (.ci/run installs Debian's chromium and sets INFERTUNE_REQUIRE_BROWSER)")
    _steady_clock(monkeypatch)  # INT8 faster than FP32: the search ranks nodes, so every chart has data
    m, calib, ev = _digits(60)
    r = tune(m, calib, ev, Budget.parse("sqnr>=45"), run_dir=tmp_path / "run", threads=(1,), latency_s=0.1,
             output=tmp_path / "art")
    page = tmp_path / "art" / "report.html"
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # offline
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--allow-file-access-from-files"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-rendered="4"' in dom, dom[-2000:]
    assert 'data-errors=""' in dom
    assert dom.count('class="trial"') == len([t for t in r.trials if not t.note.startswith("failed")])
    assert dom.count('class="chosen-mark"') == 1
    assert 'class="bar"' in dom and 'class="series"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert img.size == (1200, 2400) and colors is not None and len(colors) > 50  # not a blank page


def test_tune_tries_openvino_and_evaluates_on_it(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    _steady_clock(monkeypatch)  # fewer DQ nodes and fewer threads look faster; OpenVINO trials alike
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=tmp_path / "run", threads=(1,),
             runtimes=("ort", "openvino"), output=tmp_path / "art")
    ov = [t for t in r.trials if t.spec.backend == "openvino"]
    assert {t.spec.precision for t in ov} == {"fp32", "int8"}
    assert {t.spec.target for t in r.trials if t.spec.precision == "int8"} == {"ort-cpu", "openvino"}
    assert all(t.spec.target == "openvino" for t in ov if t.spec.precision == "int8")  # placed for OpenVINO
    fp32_ov = next(t for t in ov if t.spec.precision == "fp32")
    assert 60 < fp32_ov.metrics["sqnr_db"] < float("inf")  # measured on OpenVINO, not copied from ORT
    a = artifact.load(tmp_path / "art")
    assert a.manifest["backend"] == r.chosen.spec.backend and a.runner().backend == r.chosen.spec.backend


def test_tune_runtime_errors(tmp_path, monkeypatch):
    m, calib, ev = _digits(10)
    toy = dataclasses.replace(backends.runtime("ort"), name="toy", placement=None)  # runs, but no INT8 placement
    monkeypatch.setitem(backends._REGISTRY, "toy", toy)
    with pytest.raises(UsageError, match="tune cannot search toy .*neither an INT8 placement nor FP16"):
        tune(m, calib, ev, Budget.parse("cosine>=0.9"), run_dir=tmp_path / "a", runtimes=("ort", "toy"))
    with pytest.raises(UsageError, match="unknown backend"):
        tune(m, calib, ev, Budget.parse("cosine>=0.9"), run_dir=tmp_path / "b", runtimes=("ort", "tvm"))


def test_a_variant_that_cannot_run_on_a_runtime_is_a_failed_trial_not_a_crash(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from infertune.backends import openvino as ov_backend
    from infertune.errors import ModelError

    real = ov_backend.OpenVinoRunner.__init__

    def picky(self, model, settings):
        if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            raise ModelError("OpenVINO cannot compile it (simulated)")
        real(self, model, settings)

    monkeypatch.setattr(ov_backend.OpenVinoRunner, "__init__", picky)
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=tmp_path / "run", threads=(1,),
             runtimes=("ort", "openvino"), latency_s=0.05)
    (failed,) = [t for t in r.trials if t.note.startswith("failed")]
    assert failed.spec.backend == "openvino" and failed.spec.precision == "int8" and not failed.met
    assert "simulated" in failed.note and failed not in r.pareto() and r.chosen.met


def test_a_runtime_whose_fp32_disagrees_with_onnx_runtime_gets_no_int8_trials(tmp_path, monkeypatch):
    _fake_clock(monkeypatch, lambda model, settings: 1.0)
    noisy = backends.Runtime("noisy", "Noisy", "fake_runtimes", "NoisyBackend", "numpy", None, "ort-cpu")
    monkeypatch.setitem(backends._REGISTRY, "noisy", noisy)
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("cosine>=0.9"), run_dir=tmp_path / "run", threads=(1,),
             runtimes=("ort", "noisy"))
    fp32_noisy = next(t for t in r.trials if t.spec.backend == "noisy")
    assert not fp32_noisy.met and "disagrees with ONNX Runtime's FP32" in fp32_noisy.note
    assert fp32_noisy.metrics["sqnr_db"] < 40  # measured against ORT's FP32, which is the reference
    assert not [t for t in r.trials if t.spec.backend == "noisy" and t.spec.precision == "int8"]
    assert any("Noisy's FP32 outputs" in d and "not tried" in d for d in r.decisions)


def test_the_bisection_never_runs_a_variant_with_nothing_left_to_quantize(tmp_path, monkeypatch):
    from infertune.quant.space import calibrated_space

    # INT8 clearly faster than FP32, so that tune ranks and bisects; a budget nothing but FP32 meets
    _fake_clock(monkeypatch, lambda model, settings: 2.0 - 0.5 * (_count(model, "DequantizeLinear") > 0))
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("sqnr>=200"), run_dir=tmp_path / "run", threads=(1,), runtimes=("ort",),
             methods=("minmax",))
    space = calibrated_space(m, calib, method="minmax")
    order = [g["node"] for g in r.sensitivity]
    limit = space.most_in_float(order)
    assert 0 < limit < len(order)  # digits: the last ranked groups do not run in 8-bit alone
    assert not space.quantizes(order[:limit + 1]) and space.quantizes(order[:limit])
    int8 = [t for t in r.trials if t.spec.precision == "int8"]
    assert int8 and all(len(t.spec.exclude) <= limit for t in int8)
    assert not any("nothing left to quantize" in t.note for t in r.trials)
    assert any(f"up to {limit} of its {len(order)} ranked nodes" in d for d in r.decisions)


@pytest.mark.parametrize("isa,said", [(["avx2", "fma"], True), (["avx2", "avx512_vnni"], False)])
def test_the_decisions_say_which_weights_got_7_bits_on_a_cpu_without_vnni(tmp_path, monkeypatch, isa, said):
    import infertune.quant.quantize as qz

    monkeypatch.setattr(qz, "cpu", lambda: {"isa": isa})
    m, calib, ev = _digits(60)
    r = tune(m, calib, ev, Budget.parse("sqnr>=10"), run_dir=tmp_path / "run", threads=(1,), runtimes=("ort",),
             latency_s=0.1)
    lines = [d for d in r.decisions if d.startswith("INT8 weights: ")]
    assert len(lines) == int(said)
    if said:  # what quantize chose for this model, data and target, as tune calibrated it
        from infertune.quant.quantize import quantize

        q = quantize(m, calib, target="ort-cpu", observe_all=True, stability_halves=0)
        assert lines == [f"INT8 weights: {q.weight_bits()} (no VNNI: the int8 kernels add u8 x s8 pairs in 16 bits)"]


def test_trials_reuse_the_reference_outputs_and_another_placements_calibration(tmp_path, monkeypatch):
    from infertune.quant import space as space_module
    from infertune.search.measure import TrialRunner

    m, calib, evaluator = _digits(40)
    runner = TrialRunner(m, calib, evaluator, Budget.parse("top1_drop<=0.5"), tmp_path, latency_s=0.05)
    source = runner.judge(TrialSpec("fp32", threads=1), m)
    assert evaluator.passes == 1 and source.met  # the reference pass only: the source on ORT is the reference
    runner.judge(TrialSpec("fp32", threads=1, backend="ort", options=(("session.intra_op.allow_spinning", "0"),)), m)
    assert evaluator.passes == 2  # with a knob it is another session: run, not assumed

    seen = []
    real = space_module.quantize

    def spy(*args, **kwargs):
        seen.append(kwargs.get("calibration"))
        return real(*args, **kwargs)

    monkeypatch.setattr(space_module, "quantize", spy)
    ort_space = runner.space("minmax", "ort-cpu")
    ov_space = runner.space("minmax", "openvino")
    assert seen == [None, ort_space.calibrated.calibration]  # offered to the second placement, taken ...
    assert ov_space.calibrated.calibration is ort_space.calibrated.calibration
    ov_alone = space_module.calibrated_space(m, calib, method="minmax", target="openvino")
    for t, qp in ov_alone.calibrated.recipe.tensors.items():  # ... and it gives what calibrating again gives
        assert ov_space.calibrated.recipe.tensors[t]["scale"] == qp["scale"], t


def test_float_nodes_the_budget_does_not_need_go_back_to_8_bit_the_costliest_first(tmp_path, monkeypatch):
    """The budget needs two nodes float, the ranking puts two others between them: the bisection keeps four,
    and the prune sends the two it does not need back to 8-bit, trying the one with most multiply-adds first."""
    from types import SimpleNamespace

    from infertune.analysis.model_stats import macs_by_node
    from infertune.search import float_fallback

    first, last = "/features/features.0/Conv", "/head/head.2/Gemm"
    between = ["/features/features.2/Conv", "/features/features.5/Conv"]
    ranking = [first, *between, last, "/head/head.0/Gemm"]
    monkeypatch.setattr(float_fallback, "sensitivity", lambda *a, **k: SimpleNamespace(
        groups=[SimpleNamespace(to_dict=lambda n=n: {"node": n}) for n in ranking]))
    _misses(monkeypatch, lambda s: s.precision == "int8" and not {first, last} <= set(s.exclude))
    _fake_clock(monkeypatch, lambda model, settings: 2.0 - 0.01 * _count(model, "DequantizeLinear"))
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("sqnr>=10"), run_dir=tmp_path / "run", threads=(1,), runtimes=("ort",),
             methods=("minmax",), algorithms=False)
    assert r.chosen.spec.exclude == (first, last) and r.chosen.met
    int8 = [t.spec.exclude for t in r.trials if t.spec.precision == "int8"]
    assert tuple(ranking[:4]) in int8  # the bisection's answer, then one node back to 8-bit per trial
    macs = macs_by_node(m, ev.feeds[0])
    heaviest = max(ranking[:4], key=lambda n: macs[n])
    (pruned, *_) = [e for e in int8 if e != tuple(ranking[:len(e)])]  # the first set that is no prefix
    assert pruned == tuple(n for n in ranking[:4] if n != heaviest)
    (said,) = [d for d in r.decisions if d.startswith("tried 4 of the 4 float node(s)")]
    assert "2 stay 8-bit" in said and "2 left in float" in said


@pytest.mark.parametrize("signed", [True, False])
def test_tune_tries_the_passing_variant_without_the_zero_points_padded_convolutions_read(tmp_path, monkeypatch,
                                                                                          signed):
    """silu_convnet on OpenVINO, a budget full INT8 meets. With a signed input, the padded 3x3 conv reads it through
    a zero point: tune tries the passing variant placed for openvino-padded-int8 (that input int8, zero point 0;
    the 1x1 conv's input keeps its own), and keeps it, faster on this clock. With a non-negative input there is no
    such zero point: no extra trial."""
    pytest.importorskip("openvino")
    from infertune.quant.placement import padded_zero_points

    _fake_clock(monkeypatch, lambda model, settings: 1.0 - 0.01 * _count(model, "DequantizeLinear")
                + 0.1 * padded_zero_points(model))
    m = Model.from_proto(MODELS["silu_convnet"]())
    rng = np.random.default_rng(7)
    lo = -0.3 if signed else 0.0

    def feeds(n):
        return [{"x": rng.uniform(lo, 1.0, (1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]

    ev = Evaluator(m, feeds(16), settings=backends.Settings(intra_op_threads=1))
    r = tune(m, Dataset.from_iterable(feeds(16)), ev, Budget.parse("sqnr>=5"), run_dir=tmp_path / "run",
             threads=(1,), runtimes=("openvino",), latency_s=0.05)
    leaner = [t for t in r.trials if t.spec.target == "openvino-padded-int8"]
    said = [d for d in r.decisions if d.startswith("fewer zero points on OpenVINO")]
    if not signed:
        assert not leaner and not said
        return
    (t,) = leaner
    (plain,) = [p for p in r.trials if p.spec == dataclasses.replace(t.spec, target="openvino")]
    assert plain.met and t.met and not t.spec.exclude
    assert padded_zero_points(Model.load(tmp_path / "run" / plain.model_file)) == 1
    assert padded_zero_points(Model.load(tmp_path / "run" / t.model_file)) == 0
    assert "1 padded convolution(s)" in said[0] and "(openvino-padded-int8)" in said[0]
    assert "(openvino-padded-int8 placement) on OpenVINO" in t.spec.label()
    assert r.chosen.spec == t.spec


def test_a_bf16_variant_is_the_fp32_graph_with_the_runtimes_bf16_options():
    s = TrialSpec("bf16", threads=2, backend="openvino")
    assert dict(s.options) == {"INFERENCE_PRECISION_HINT": "bf16"} and s.label() == "BF16 on OpenVINO, 2 threads"
    assert TrialSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.key != TrialSpec("fp32", threads=2, backend="openvino", options=dict(s.options)).key
    mixed = TrialSpec("int8", "auto", ("a",), 2, backend="openvino", options={"INFERENCE_PRECISION_HINT": "bf16"})
    assert mixed.label().endswith("1 in float, 2 threads, inference precision=bf16")
    with pytest.raises(UsageError, match="a BF16 variant cannot run on ort"):
        TrialSpec("bf16", backend="ort")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_offered_only_where_the_cpu_computes_it(monkeypatch, native):
    pytest.importorskip("openvino")
    import infertune.backends.openvino as ov
    from infertune.search.runtimes import bf16_options

    monkeypatch.setattr(ov, "native_bf16", lambda: native)
    assert bf16_options("openvino") == ({"INFERENCE_PRECISION_HINT": "bf16"} if native else {})
    assert bf16_options("ort") == {}


@pytest.mark.native_bf16
def test_native_bf16_reads_openvinos_capabilities():
    ov = pytest.importorskip("openvino")
    import infertune.backends.openvino as backend

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to tell the CPU's bf16 instructions")
    flags = set(cpuinfo.read_text().split())
    # OpenVINO says BF16 exactly where the CPU has bf16 instructions (AVX512_BF16, AMX, or AVX2's NE_CONVERT)
    assert backend.native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
    assert backend.native_bf16() == ("BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _bf16_clock(monkeypatch, bf16_ms: float):
    """bf16 trials take ``bf16_ms``; the others are steady (fewer DQ nodes and fewer threads look faster)."""
    _fake_clock(monkeypatch, lambda model, settings: bf16_ms if settings.options.get("INFERENCE_PRECISION_HINT") ==
                "bf16" else 1.0 - 0.01 * _count(model, "DequantizeLinear") + 0.001 * settings.intra_op_threads)


def test_a_bf16_variant_that_meets_the_budget_is_a_candidate_int8_must_beat(tmp_path, monkeypatch):
    """Where the CPU computes bf16 (patched on: OpenVINO runs it in f32 where it cannot, so the outputs are real),
    tune measures the FP32 graph in bf16 at every thread count before OpenVINO's INT8 search; faster than that
    INT8 could be, it ends the search there and is chosen, and the artifact records the option."""
    pytest.importorskip("openvino")
    import infertune.backends.openvino as ov

    monkeypatch.setattr(ov, "native_bf16", lambda: True)
    _bf16_clock(monkeypatch, 0.3)
    _misses(monkeypatch, lambda s: s.precision == "int8" and not s.exclude)  # INT8 would need its float fallback
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=tmp_path / "run", threads=(1, 2),
             runtimes=("openvino",), output=tmp_path / "art")
    bf16 = [t for t in r.trials if t.spec.precision == "bf16"]
    assert sorted(t.spec.threads for t in bf16) == [1, 2] and all(t.met for t in bf16)
    assert not any(t.spec.exclude or t.spec.algorithms for t in r.trials)  # INT8 cannot beat 0.3 ms: not searched
    assert r.chosen.spec.precision == "bf16" and r.chosen.model_file is None  # the FP32 file, compiled in bf16
    assert r.stopped.startswith("budget met by the FP32 graph computed in bf16")
    assert any(d.startswith("the CPU computes bf16 in hardware: BF16 on OpenVINO") for d in r.decisions)
    a = artifact.load(tmp_path / "art")
    assert a.manifest["settings"]["options"] == {"INFERENCE_PRECISION_HINT": "bf16"}


def test_where_bf16_alone_misses_the_passing_int8_variant_is_tried_with_its_float_part_in_bf16(tmp_path,
                                                                                             monkeypatch):
    pytest.importorskip("openvino")
    import infertune.backends.openvino as ov

    monkeypatch.setattr(ov, "native_bf16", lambda: True)
    _bf16_clock(monkeypatch, 0.3)
    _misses(monkeypatch, lambda s: s.precision == "bf16")
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=tmp_path / "run", threads=(1,),
             runtimes=("openvino",))
    (mixed,) = [t for t in r.trials if t.spec.precision == "int8" and t.spec.options]
    assert dict(mixed.spec.options) == {"INFERENCE_PRECISION_HINT": "bf16"} and mixed.met
    plain = next(t for t in r.trials if t.spec == dataclasses.replace(mixed.spec, options=()))
    assert plain.met and r.chosen.spec == mixed.spec  # 0.3 ms on this clock


def test_the_passing_int8_variant_is_timed_at_the_other_thread_counts_when_bf16_is_faster_at_its_own(tmp_path,
                                                                                                  monkeypatch):
    """BF16 beats INT8 at 1 thread but not at 2 (rec on the AMX Xeon): the INT8 variant that meets the budget is
    still timed at 2 threads, so that the choice there is between the two."""
    pytest.importorskip("openvino")
    import infertune.backends.openvino as ov

    monkeypatch.setattr(ov, "native_bf16", lambda: True)
    _fake_clock(monkeypatch, lambda model, settings: 0.6 if settings.options.get("INFERENCE_PRECISION_HINT") == "bf16"
                else (1.0 - 0.2 * (_count(model, "DequantizeLinear") > 0)) / settings.intra_op_threads)
    _misses(monkeypatch, lambda s: s.precision == "int8" and not s.algorithms)  # bias correction meets
    m, calib, ev = _digits(30)
    r = tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=tmp_path / "run", threads=(1, 2),
             runtimes=("openvino",))
    passing = [t for t in r.trials if t.spec.precision == "int8" and t.met and not t.spec.options]
    assert {t.spec.threads for t in passing} == {1, 2} and all(t.spec.algorithms for t in passing)
    assert r.chosen.spec.precision == "int8" and r.chosen.spec.threads == 2  # 0.4 ms vs BF16's 0.6 at 2 threads
