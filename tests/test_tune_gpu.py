"""tune on GPU runtimes, without a GPU: a fake runtime registered as a GPU runtime that runs FP16.

``fake_runtimes.RecordingGpuBackend`` runs ONNX Runtime on the CPU underneath and records every
compile: which graph (fp32 / fp16 / int8 by its types and Q/DQ) with which options, checked by
``GpuOptions`` as the real GPU backends check them. Latency comes from a fake clock (tune's timing
processes would not know the fake runtime), as a function of the variant and its knobs.

What tune asks of a GPU runtime: FP32 once (threads do not matter there), the FP16 variant
(``quant.fp16``), INT8 placed for TensorRT, CUDA graphs on the fastest variant that meets the
budget, engine and timing caches in the run directory on every compile; the journal, the report
and resuming work as on the CPU runtimes.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fake_runtimes import RecordingGpuBackend
from infertune import Budget, Evaluator, backends, tune
from infertune.backends import cuda
from infertune.backends.gpu import graph_precision
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.model import Model
from infertune.search.journal import TRIALS
from infertune.search.runtimes import auto_runtimes
from infertune.search.trials import Trial, TrialSpec
from test_tune import DIGITS

FAKE = backends.Runtime("fake-gpu", "Fake GPU", "fake_runtimes", "RecordingGpuBackend", "onnxruntime", None,
                        "tensorrt", gpu=True, fp16=True, options=frozenset({"gpu"}))


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, FAKE.name, FAKE)
    RecordingGpuBackend.compiles = []
    return RecordingGpuBackend.compiles


def _clock(monkeypatch, timed: list | None = None):
    """Latency as a function of the variant: the fake GPU beats the CPU, FP16 and INT8 beat FP32 there,
    a CUDA graph saves a little; the same numbers in every run (resume compares runs). ``timed``
    collects what tune asked to time (runtime, settings)."""
    import infertune.search.measure
    from infertune.perf.isolated import IsolatedLatency

    def p50(variant) -> float:
        if variant.backend != FAKE.name:
            return 2.0 + 0.001 * variant.settings.intra_op_threads
        base = {"fp32": 1.0, "fp16": 0.6, "int8": 0.5}[graph_precision(Model.load(variant.model))]
        return base - (0.05 if variant.settings.options.get("cuda_graph") == "1" else 0.0)

    def time_variants(variants, feed, *, rounds, seconds):
        if timed is not None:
            timed.extend((v.backend, v.settings) for v in variants)
        return {v.key: IsolatedLatency(v.key, p50(v), [p50(v)] * rounds, [1] * rounds) for v in variants}

    monkeypatch.setattr(infertune.search.measure, "time_variants", time_variants)


def _digits(n_eval: int = 30):
    m = Model.load(DIGITS / "digits_cnn.onnx")
    with np.load(DIGITS / "calib.npz") as z:
        calib = Dataset.from_iterable([{"image": z["image"][i:i + 1]} for i in range(32)])
    with np.load(DIGITS / "test.npz") as z:
        feeds = [{"image": z["image"][i:i + 1]} for i in range(n_eval)]
    return m, calib, Evaluator(m, feeds, settings=backends.Settings(intra_op_threads=1))


def test_tune_searches_fp16_int8_and_cuda_graphs_on_a_gpu_runtime(tmp_path, monkeypatch, fake_gpu):
    timed: list = []
    _clock(monkeypatch, timed)
    m, calib, ev = _digits()
    run = tmp_path / "run"
    r = tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=run, threads=(1, 2), runtimes=("ort", "fake-gpu"),
             output=tmp_path / "art")
    gpu = [t for t in r.trials if t.spec.backend == FAKE.name]
    assert sorted((t.spec.precision, t.spec.threads) for t in gpu if not t.spec.options) == [
        ("fp16", 1), ("fp32", 1), ("int8", 1)]  # FP32 once: threads do not matter on a GPU
    assert {t.spec.threads for t in r.trials if t.spec.backend == "ort" and t.spec.precision == "fp32"} == {1, 2}
    (int8,) = [t for t in gpu if t.spec.precision == "int8" and not t.spec.options]
    assert int8.spec.target == "tensorrt" and int8.met  # Q/DQ placed for TensorRT
    (knob,) = [t for t in gpu if t.spec.options]
    assert knob.spec == dataclasses.replace(int8.spec, options=(("cuda_graph", "1"),))  # on the fastest that met
    assert knob.spec.label().endswith("CUDA graph") and r.chosen.spec == knob.spec
    # what the runtime was asked to compile: the FP16 and Q/DQ graphs, with the run's caches
    assert {c["precision"] for c in fake_gpu} == {"fp32", "fp16", "int8"}
    assert all(c["options"]["engine_cache"] == str(run / "engines") and c["options"]["timing_cache"] ==
               str(run / "timing.cache") for c in fake_gpu)
    assert any(c["options"].get("cuda_graph") == "1" and c["precision"] == "int8" for c in fake_gpu)
    gpu_timed = [s for b, s in timed if b == FAKE.name]  # timed with the same caches (one engine build)
    assert gpu_timed and all(s.options["engine_cache"] == str(run / "engines") for s in gpu_timed)
    # journal and report as on the CPU: one line per trial, keys unique, knobs only where given
    lines = [json.loads(x) for x in (run / TRIALS).read_text().splitlines()]
    assert len(lines) == len(r.trials) == len({x["key"] for x in lines})
    assert [x["spec"].get("options") for x in lines if x["spec"].get("options")] == [{"cuda_graph": "1"}]
    fp16 = next(t for t in gpu if t.spec.precision == "fp16")
    assert fp16.model_file and (run / fp16.model_file).exists() and fp16.metrics["cosine"] > 0.999
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["chosen"]["spec"]["options"] == {"cuda_graph": "1"} and "FP16 on Fake GPU" in json.dumps(doc)
    assert (tmp_path / "art" / "report.html").is_file()
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["backend"] == FAKE.name and "engine_cache" not in json.dumps(manifest["settings"])
    assert manifest["settings"]["options"] == {"cuda_graph": "1"}

    # resume: the same run reuses every trial and compiles nothing
    fake_gpu.clear()
    seen = []
    again = tune(m, calib, ev, Budget.parse("cosine>=0.99"), run_dir=run, threads=(1, 2),
                 runtimes=("ort", "fake-gpu"), on_trial=lambda t, reused: seen.append(reused))
    assert seen and all(seen) and fake_gpu == []
    assert [t.spec for t in again.trials] == [t.spec for t in r.trials] and again.chosen.spec == r.chosen.spec


def test_auto_runtimes_add_gpu_runtimes_only_with_a_usable_gpu(monkeypatch, fake_gpu):
    import onnxruntime as ort

    monkeypatch.setattr(cuda, "usable_gpus", lambda api=None: cuda.GpuState(0, None, "no NVIDIA driver"))
    assert FAKE.name not in auto_runtimes() and "ort" in auto_runtimes()
    monkeypatch.setattr(cuda, "usable_gpus", lambda api=None: cuda.GpuState(1, "13.0"))
    found = auto_runtimes()
    assert found[0] == "ort" and FAKE.name in found
    listed = "CUDAExecutionProvider" in ort.get_available_providers()
    assert ("ort-cuda" in found) == listed  # a CPU onnxruntime: its GPU runtimes do not load
    assert auto_runtimes(cuda.GpuState(0, None, "none")) == [r for r in found if not backends.runtime(r).gpu]


def test_cli_tune_auto_runtimes_with_a_gpu(tmp_path, monkeypatch, fake_gpu, capsys):
    from infertune.cli import main

    _clock(monkeypatch)
    monkeypatch.setattr(cuda, "usable_gpus", lambda api=None: cuda.GpuState(1, "13.0"))
    code = main(["tune", str(DIGITS / "digits_cnn.onnx"), "--calib", str(DIGITS / "calib.npz"), "--eval-samples", "8",
                 "--budget", "cosine>=0.99", "--threads", "1", "--max-trials", "4", "-o", str(tmp_path / "art"),
                 "--json"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "art.run" / "run.json").read_text())
    assert FAKE.name in run["runtimes"]
    assert any(c["precision"] == "fp32" for c in fake_gpu)


def test_trial_spec_precisions_and_knobs():
    legacy = TrialSpec("int8", "auto", ("a",), 1)  # journals written before knobs keep their keys (from main)
    assert (legacy.key, TrialSpec("fp32", threads=2, backend="openvino").key) == ("cf5de403b99458ae",
                                                                                  "0989e44d3e7718e0")
    assert "options" not in legacy.to_dict()
    a = TrialSpec("fp16", threads=1, backend="ort-tensorrt", options={"cuda_graph": "1", "b": "2"})
    b = TrialSpec("fp16", threads=1, backend="ort-tensorrt", options=(("b", "2"), ("cuda_graph", "1")))
    assert a == b and a.key == b.key and a.key != TrialSpec("fp16", threads=1, backend="ort-tensorrt").key
    assert TrialSpec.from_dict(Trial(0, a, {}, 1.0, True, 0, None).to_dict()["spec"]) == a
    assert a.label() == "FP16 on ONNX Runtime TensorRT, 1 thread, b=2, CUDA graph"
    with pytest.raises(UsageError, match="an FP16 variant cannot run on ort"):
        TrialSpec("fp16", backend="ort")
    with pytest.raises(UsageError, match="INT8 cannot run on ort-cuda"):
        TrialSpec("int8", "auto", backend="ort-cuda")
