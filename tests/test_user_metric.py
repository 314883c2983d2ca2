"""--metric FILE.py:FUNC: a user's metric in tune, quantize --budget, sensitivity and compare --check."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from infertune import Budget, backends
from infertune.cli import main
from infertune.model import Model
from models import MODELS

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

METRICS = textwrap.dedent('''
    import numpy as np

    def agreement(reference, candidate):
        """Share of feeds whose top class is the FP32's."""
        return float(np.mean([np.argmax(next(iter(r.values()))) == np.argmax(next(iter(c.values())))
                              for r, c in zip(reference, candidate)]))

    def nsr(reference, candidate):
        """Output noise-to-signal power, summed over every output and feed (lower is better)."""
        sig = sum(float(np.sum(np.square(r[k].astype(np.float64)))) for r in reference for k in r)
        err = sum(float(np.sum(np.square(r[k].astype(np.float64) - c[k]))) for r, c in zip(reference, candidate)
                  for k in r)
        return err / sig

    def helper(x):
        return 1 / (len(x) - len(x))

    def broken(reference, candidate):
        return helper(reference)

    def not_a_number(reference, candidate):
        return "high"
''')


@pytest.fixture
def metrics(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(METRICS)
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def outputs(model, feeds):
    runner = backends.compile(Model.load(model) if not isinstance(model, Model) else model)
    return [runner.run(f) for f in feeds]


def digits_feeds(n):
    with np.load(DIGITS / "test.npz") as z:
        return [{"image": z["image"][i:i + 1]} for i in range(n)]


def test_tune_with_a_metric_names_it_and_measures_it(capsys, tmp_path, metrics):
    code, out, err = run(capsys, "tune", DIGITS / "digits_cnn.onnx", "--calib", DIGITS / "calib.npz", "--eval",
                         DIGITS / "test.npz", "--eval-samples", "60", "--threads", "1", "--latency-seconds", "0.05",
                         "--metric", f"{metrics}:agreement", "--budget", "metric>=0.95", "-o", tmp_path / "art",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["budget"] == "agreement>=0.95"
    feeds = digits_feeds(60)
    ref = outputs(DIGITS / "digits_cnn.onnx", feeds)
    for t in doc["trials"]:
        model = tmp_path / "art.run" / t["model_file"] if t["model_file"] else DIGITS / "digits_cnn.onnx"
        got = outputs(model, feeds)
        oracle = np.mean([r["logits"].argmax() == g["logits"].argmax() for r, g in zip(ref, got, strict=True)])
        assert t["metrics"]["user"] == pytest.approx(oracle)
        assert t["met"] == (oracle >= 0.95 and t["metrics"]["confidence"] >= 0.9)
    assert "agreement&gt;=0.95" in (tmp_path / "art" / "report.html").read_text()


def test_tune_decision_log_names_a_metric_that_int8_misses(capsys, tmp_path, metrics):
    code, out, err = run(capsys, "tune", DIGITS / "digits_cnn.onnx", "--calib", DIGITS / "calib.npz", "--eval",
                         DIGITS / "test.npz", "--eval-samples", "30", "--threads", "1", "--latency-seconds", "0.05",
                         "--max-trials", "3", "--metric", f"{metrics}:nsr", "--budget", "metric<=0", "-o",
                         tmp_path / "art", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["budget"] == "nsr<=0" and doc["chosen"]["spec"]["precision"] == "fp32"
    int8 = [t for t in doc["trials"] if t["spec"]["precision"] == "int8"]
    assert int8 and all(t["metrics"]["user"] > 0 and not t["met"] for t in int8)
    assert any("nsr<=0" in d for d in doc["decisions"])


def test_quantize_to_a_lower_is_better_metric(capsys, tmp_path, metrics):
    path = tmp_path / "cnn.onnx"
    onnx.save(MODELS["small_cnn"](), str(path))
    x = np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    full = run(capsys, "quantize", path, "--data", tmp_path / "d.npz", "-o", tmp_path / "full.onnx",
               "--stability-halves", "0", "--json")
    assert full[0] == 0, full[2]
    feeds = [{"x": x[i:i + 1]} for i in range(24)]
    ref = outputs(path, feeds)

    def oracle_nsr(model):
        got = outputs(model, feeds)
        err = sum(float(np.sum((r["logits"].astype(np.float64) - g["logits"]) ** 2))
                  for r, g in zip(ref, got, strict=True))
        return err / sum(float(np.sum(r["logits"].astype(np.float64) ** 2)) for r in ref)

    limit = oracle_nsr(tmp_path / "full.onnx") / 4  # out of reach of full INT8
    code, out, err = run(capsys, "quantize", path, "--data", tmp_path / "d.npz", "-o", tmp_path / "mixed.onnx",
                         "--metric", f"{metrics}:nsr", "--budget", f"metric<={limit:.6g}", "--json")
    if code == 1:  # only FP32 meets it: said so, nothing written
        assert "only met with every node in float" in err and not (tmp_path / "mixed.onnx").exists()
        return
    assert code == 0, err
    doc = json.loads(out)
    assert doc["budget"]["budget"] == f"nsr<={float(f'{limit:.6g}'):g}"
    assert oracle_nsr(tmp_path / "mixed.onnx") == pytest.approx(doc["budget"]["chosen"]["metrics"]["user"], rel=1e-6)
    assert doc["budget"]["chosen"]["metrics"]["user"] <= limit and doc["budget"]["chosen"]["excluded"]


def test_sensitivity_ranks_by_the_metric_loss(capsys, tmp_path, metrics):
    path = tmp_path / "cnn.onnx"
    onnx.save(MODELS["small_cnn"](), str(path))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32))
    common = [path, "--data", tmp_path / "d.npz", "--json"]
    code, out, err = run(capsys, "sensitivity", *common)
    assert code == 0, err
    builtin = json.loads(out)
    code, out, err = run(capsys, "sensitivity", *common, "--metric", f"{metrics}:nsr", "--lower-is-better")
    assert code == 0, err
    user = json.loads(out)
    assert user["metric"] == "nsr"
    # the user's NSR is computed over the whole set as ours is: the same ranking, the same numbers
    assert [g["node"] for g in user["groups"]] == [g["node"] for g in builtin["groups"]]
    for a, b in zip(user["groups"], builtin["groups"], strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-9) and a["nsr"] == pytest.approx(b["score"], rel=1e-12)
    code, _, err = run(capsys, "sensitivity", *common, "--metric", f"{metrics}:nsr", "--mode", "fast")
    assert code == 2 and "cannot evaluate a user metric: give --mode exact" in err


def gemm_and_noisy(tmp_path):
    """The gemm model saved as gemm.onnx, and a copy with noise on its weight (saved as noisy.onnx)."""
    path = tmp_path / "gemm.onnx"
    onnx.save(MODELS["gemm"](), str(path))
    proto = MODELS["gemm"]()
    w = next(t for t in proto.graph.initializer if len(t.dims) == 2)
    arr = onnx.numpy_helper.to_array(w) + np.random.default_rng(2).normal(0, 0.2, tuple(w.dims)).astype(np.float32)
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(proto, str(tmp_path / "noisy.onnx"))
    return path, proto


def test_compare_checks_a_metric(capsys, tmp_path, metrics):
    path, _ = gemm_and_noisy(tmp_path)
    x = np.random.default_rng(3).standard_normal((20, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    feeds = [{"x": x[i:i + 1]} for i in range(20)]
    ref, got = outputs(path, feeds), outputs(tmp_path / "noisy.onnx", feeds)
    key = next(iter(ref[0]))
    oracle = float(np.mean([r[key].argmax() == g[key].argmax() for r, g in zip(ref, got, strict=True)]))
    assert 0 < oracle < 1
    args = ["compare", path, tmp_path / "noisy.onnx", "--data", tmp_path / "d.npz", "--metric", f"{metrics}:agreement"]
    code, out, err = run(capsys, *args, "--check", f"metric>={oracle}", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["metric"] == {"name": "agreement", "value": oracle}
    assert doc["checks"] == [{"check": f"agreement>={oracle:g}", "target": "metric", "value": oracle, "passed": True}]
    code, out, err = run(capsys, *args, "--check", f"agreement>={oracle + 0.01}")
    assert code == 1 and "agreement" in out


def test_an_error_in_the_users_function_shows_their_traceback_only(capsys, tmp_path, metrics):
    path = tmp_path / "gemm.onnx"
    onnx.save(MODELS["gemm"](), str(path))
    np.savez(tmp_path / "d.npz", x=np.ones((3, 32), np.float32))
    code, out, err = run(capsys, "compare", path, path, "--data", tmp_path / "d.npz", "--metric",
                         f"{metrics}:broken", "--check", "metric>=1")
    assert code == 2
    flat = err.replace("\n", " ")
    assert "your code raised an error (broken in my_metrics.py)" in flat and "ZeroDivisionError" in flat
    assert "in broken" in flat and "in helper" in flat and "return 1 / (len(x) - len(x))" in flat
    assert "infertune" not in flat.replace("infertune_user", "")  # none of our frames
    code, _, err = run(capsys, "compare", path, path, "--data", tmp_path / "d.npz", "--metric",
                       f"{metrics}:not_a_number", "--check", "metric>=1")
    assert code == 2 and "returned str 'high'" in err and "must return a float" in err
    code, _, err = run(capsys, "compare", path, path, "--data", tmp_path / "d.npz", "--metric",
                       f"{metrics}:missing", "--check", "metric>=1")
    assert code == 2 and "has no function 'missing'" in err
    code, _, err = run(capsys, "quantize", path, "--data", tmp_path / "d.npz", "-o", tmp_path / "q.onnx",
                       "--metric", f"{metrics}:nsr")
    assert code == 2 and "--metric needs --budget" in err


def test_budget_either_way_and_its_confidence():
    hi = Budget.parse("metric>=0.5", metric=lambda r, c: 0.0)
    assert hi.met({"user": 0.5}) and not hi.met({"user": 0.49}) and str(hi) == "user function>=0.5"

    def err_rate(r, c):
        return 0.0

    lo = Budget.parse("err_rate<=0.1", metric=err_rate)
    assert lo.met({"user": 0.1}) and not lo.met({"user": 0.11}) and str(lo) == "err_rate<=0.1"

    class BoxF1:  # a callable object is named by its class
        def __call__(self, r, c):
            return 1.0

    assert str(Budget(fn=BoxF1(), fn_min=0.97)) == "BoxF1>=0.97"
    with pytest.raises(Exception, match="metric>=X"):
        Budget.parse("metric>0.1", metric=err_rate)


def test_a_metric_that_takes_the_feeds_gets_them_aligned_in_every_resample(tmp_path):
    """FUNC(reference, candidate, feeds): the i-th feed is the one the i-th outputs came from, on the whole
    set and in each bootstrap resample (a metric that zipped with the feeds it closed over would not be)."""
    from infertune import Evaluator
    from infertune.usercode import UserFunction

    path = tmp_path / "gemm.onnx"
    onnx.save(MODELS["gemm"](), str(path))
    feeds = [{"x": np.full((1, 32), float(i), np.float32)} for i in range(12)]  # feed i holds the value i
    ref = outputs(path, feeds)
    (tmp_path / "aligned.py").write_text(textwrap.dedent('''
        import numpy as np

        EXPECTED = {}

        def aligned(reference, candidate, feeds):
            return float(all(np.array_equal(next(iter(r.values())), EXPECTED[int(f["x"][0, 0])])
                             for r, f in zip(reference, feeds)))
    '''))
    fn = UserFunction(tmp_path / "aligned.py", "aligned")
    key = next(iter(ref[0]))
    fn.load().__globals__["EXPECTED"].update({i: r[key] for i, r in enumerate(ref)})
    ev = Evaluator(Model.load(path), feeds)
    scored = ev.score(ref, Budget(fn=fn, fn_min=1.0), resamples=50)
    assert scored["user"] == 1.0 and scored["confidence"] == 1.0
    # the oracle can fail: outputs paired with the wrong feeds score 0
    assert Budget(fn=fn, fn_min=1.0).fn(ref[::-1], ref[::-1], feeds) == 0.0
    two = Budget.parse("metric>=0.5", metric=lambda r, c: 1.0)
    assert ev.judge(ref, two).met  # two-argument metrics are called as before


def test_a_metric_may_return_one_value_per_feed_and_is_called_once(tmp_path):
    """One float per feed: the metric is their mean, and the bootstrap resamples average those values
    (the same confidence as a function returning the mean, which is called again for every resample)."""
    from infertune import Evaluator
    from infertune.errors import UserCodeError

    path, proto = gemm_and_noisy(tmp_path)
    x = np.random.default_rng(3).standard_normal((40, 32)).astype(np.float32)
    feeds = [{"x": x[i:i + 1]} for i in range(40)]
    got = outputs(Model.from_proto(proto), feeds)
    calls = []

    def per_feed(reference, candidate):
        calls.append(len(reference))
        return [float(np.argmax(next(iter(r.values()))) == np.argmax(next(iter(c.values()))))
                for r, c in zip(reference, candidate, strict=True)]

    def mean(reference, candidate):
        return float(np.mean(per_feed(reference, candidate)))

    ev = Evaluator(Model.load(path), feeds)
    point = mean(ev.ref_outputs, got)
    assert 0.3 < point < 1
    calls.clear()
    a = ev.score(got, Budget(fn=per_feed, fn_min=point - 0.05), resamples=100)
    assert calls == [40]  # once, not once per resample
    b = ev.score(got, Budget(fn=mean, fn_min=point - 0.05), resamples=100)
    assert len(calls) == 1 + 1 + 100
    assert a["user"] == b["user"] == point and a["confidence"] == b["confidence"] and 0 < a["confidence"] < 1
    with pytest.raises(UserCodeError, match="one float per feed"):
        ev.score(got, Budget(fn=lambda r, c: [1.0, 0.0], fn_min=0.5))
