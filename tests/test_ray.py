"""The Ray executor on a real cluster of two nodes on loopback (a head and a worker, each a `ray start`
with one CPU and the resource of this machine's kind), torn down by process group even on failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from infertune import Budget, Evaluator, backends, tune
from infertune.analysis.accuracy import PerSample, judge_samples, score_samples
from infertune.data import Dataset
from infertune.errors import UsageError
from infertune.model import Model
from infertune.search.journal import TRIALS
from infertune.search.ray_executor import RayExecutor, kind_resource
from infertune.usercode import UserFunction
from interrupt import kill_after_trials

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RAY = Path(sys.executable).with_name("ray")


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    sessions: list[int]  # sessions of the `ray start`s: every Ray process of this cluster is in one

    def processes(self, title: str) -> list[int]:
        """Processes of this cluster whose title starts with ``title`` (Ray names a busy worker ray::TASK)."""
        found = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getsid(int(d.name)) in self.sessions and \
                            (d / "cmdline").read_bytes().startswith(title.encode()):
                        found.append(int(d.name))
                except (OSError, ProcessLookupError):
                    continue
        return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port, groups = _free_port(), []  # each `ray start` leads a new session
    flags = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--resources", json.dumps({kind_resource(): 1}),
             "--temp-dir", temp, "--disable-usage-stats"]

    def start(*args: str) -> None:
        with open(Path(temp) / "start.log", "a") as log:
            p = subprocess.Popen([str(RAY), "start", *args, *flags], env=env, start_new_session=True, stdout=log,
                                 stderr=subprocess.STDOUT)
            groups.append(p.pid)
            if p.wait(timeout=120):
                raise RuntimeError("ray start failed: " + (Path(temp) / "start.log").read_text()[-2000:])

    cluster = Cluster(f"127.0.0.1:{port}", env, groups)
    try:
        start("--head", "--port", str(port), "--include-dashboard=false", "--ray-client-server-port",
              str(_free_port()))
        start("--address", f"127.0.0.1:{port}")
        yield cluster
    finally:
        for pid in cluster.processes(""):  # workers have process groups of their own, not sessions
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def driver_env(cluster, monkeypatch):
    """This process as a driver of the test cluster."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    return cluster


def _digits(n_eval: int):
    m = Model.load(DIGITS / "digits_cnn.onnx")
    with np.load(DIGITS / "calib.npz") as z:
        calib = Dataset.from_iterable([{"image": z["image"][i:i + 1]} for i in range(64)])
    with np.load(DIGITS / "test.npz") as z:
        feeds = [{"image": z["image"][i:i + 1]} for i in range(n_eval)]
        labels = z["label"][:n_eval]
    return m, calib, Evaluator(m, feeds, labels=labels, settings=backends.Settings(intra_op_threads=1))


def _steady_runoff(monkeypatch):
    """Latency in this driver (the runoff; and the local run's trials) as a fixed function of the model: the
    choice among the finalists both executors find is made on the same numbers. (On digits every calibration
    method gives the same model, so a search over several would choose among ties.)"""
    import infertune.search.measure
    from infertune.perf.isolated import IsolatedLatency

    def time_variants(variants, feed, *, rounds, seconds):
        def p50(v):
            dq = sum(n.op_type == "DequantizeLinear" for n in Model.load(v.model).graph.node)
            return 1.0 - 0.01 * dq
        return {v.key: IsolatedLatency(v.key, p50(v), [1.0] * rounds, [1] * rounds) for v in variants}

    monkeypatch.setattr(infertune.search.measure, "time_variants", time_variants)


def _journal_keys(run_dir: Path) -> list[str]:
    return [json.loads(x)["key"] for x in (run_dir / TRIALS).read_text().splitlines()]


def test_sharded_sums_joined_equal_the_whole_set_exactly():
    m, _, ev = _digits(50)
    from infertune.quant.quantize import quantize

    q = quantize(m, Dataset.from_iterable(ev.feeds[:16]), stability_halves=0).model
    outs = ev.run(q)
    refs = ev.ref_outputs
    cuts = [0, 7, 8, 30, 50]  # uneven shards, one of a single feed
    parts = [PerSample.measure(refs[a:b], outs[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    joined = PerSample.concat(parts)
    agree = Budget(fn=lambda r, c: float(np.mean([x["logits"].argmax() == y["logits"].argmax()
                                                 for x, y in zip(r, c, strict=True)])), fn_min=0.9)
    for budget in (Budget.parse("top1_drop<=0.5"), Budget.parse("sqnr>=20"), agree):
        whole = ev.judge(outs, budget)
        sharded = judge_samples(joined, ev.labels, budget, refs, outs)
        assert sharded == whole  # every metric and the bootstrap confidence, to the last bit
    assert score_samples(joined, ev.labels) == ev.score(outs)


def test_ray_chooses_what_local_chooses_with_no_trial_lost_or_duplicated(driver_env, tmp_path, monkeypatch):
    _steady_runoff(monkeypatch)
    m, calib, ev = _digits(60)
    kw = dict(threads=(1,), methods=("auto",), runtimes=("ort",), latency_s=0.1)
    # a budget full INT8 meets on any CPU (7-bit weights without VNNI can flip one of 60 digits): a miss
    # would send the search on by trial latencies, which the Ray workers measure for real, unpatched
    budget = Budget.parse("sqnr>=20")
    local = tune(m, calib, ev, budget, run_dir=tmp_path / "local", **kw)
    _, calib2, ev2 = _digits(60)  # nothing computed by the local run is reused
    with RayExecutor(address=driver_env.address, shard_samples=25) as ex:  # 3 shards per trial
        remote = tune(m, calib2, ev2, budget, run_dir=tmp_path / "ray", executor=ex, **kw)
    assert remote.chosen.spec == local.chosen.spec
    assert {t.spec.key: t.metrics for t in remote.trials} == {t.spec.key: t.metrics for t in local.trials}
    assert {t.spec.key: t.met for t in remote.trials} == {t.spec.key: t.met for t in local.trials}
    keys = _journal_keys(tmp_path / "ray")
    assert len(keys) == len(set(keys)) == len(remote.trials) == len(local.trials) == 2
    assert remote.chosen.spec.precision == "int8"  # clearly faster on the runoff's numbers: a choice was made
    for t in remote.trials:  # the models built on workers from the recipe are the driver's, byte for byte
        if t.model_file:
            assert (tmp_path / "ray" / t.model_file).read_bytes() == (tmp_path / "local" / t.model_file).read_bytes()


def test_a_worker_killed_mid_trial_is_retried(driver_env, tmp_path):
    m, calib, ev = _digits(30)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not killed:
            for pid in driver_env.processes("ray::time_variant"):
                os.kill(pid, signal.SIGKILL)  # the worker process running a latency task, mid-task
                killed.append(pid)
                return
            time.sleep(0.02)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    with RayExecutor(address=driver_env.address) as ex:
        r = tune(m, calib, ev, Budget.parse("cosine>=0.9"), run_dir=tmp_path / "run", threads=(1,),
                 runtimes=("ort",), latency_s=1.5, executor=ex)
    th.join()
    assert killed, "no latency task was seen running"
    assert [t.spec.precision for t in r.trials] == ["fp32", "int8"] and all(np.isfinite(t.p50_ms) for t in r.trials)
    keys = _journal_keys(tmp_path / "run")
    assert len(keys) == len(set(keys)) == 2


def test_driver_killed_then_restarted_resumes_from_the_journal(cluster, tmp_path):
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "infertune", "tune", str(DIGITS / "digits_cnn.onnx"), "--calib",
           str(DIGITS / "calib.npz"), "--eval", str(DIGITS / "test.npz"), "--eval-samples", "40", "--budget",
           "sqnr>=200", "--threads", "1", "--runtimes", "ort", "--latency-seconds", "0.3", "--executor", "ray",
           "--ray-address", cluster.address, "-o", str(out), "--json"]
    journal = tmp_path / "art.run" / TRIALS
    before = kill_after_trials(cmd, journal, 1, env=cluster.env)
    assert before and not out.exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cluster.env)
    assert done.returncode == 0, done.stderr[-1500:]
    doc = json.loads(done.stdout)
    keys = _journal_keys(tmp_path / "art.run")
    assert keys[: len(before)] == before and len(keys) == len(set(keys)) == len(doc["trials"])
    assert doc["chosen"]["spec"]["precision"] == "fp32"  # sqnr>=200 is out of INT8's reach
    again = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=300, env=cluster.env)
    assert again.returncode == 0, again.stderr[-1500:]
    assert [t["key"] for t in json.loads(again.stdout)["trials"]] == [t["key"] for t in doc["trials"]]
    assert _journal_keys(tmp_path / "art.run") == keys  # every trial reused, none added


def test_refusals(driver_env, tmp_path):
    ex = RayExecutor(address=driver_env.address)
    ex.resource = "infertune-000000000000"  # a kind no node of the cluster is
    try:
        with pytest.raises(UsageError, match="offers the resource infertune-000000000000.*ray start .*--resources"):
            ex.connect()
    finally:
        ex.close()
    m, calib, ev = _digits(10)
    with RayExecutor(address=driver_env.address) as ex, \
            pytest.raises(UsageError, match="cannot run on Ray workers.*FILE.py:FUNC"):
        tune(m, calib, ev, Budget(fn=lambda r, c: 1.0, fn_min=0.5), run_dir=tmp_path / "run", executor=ex)
    metric = tmp_path / "m.py"
    metric.write_text("def boom(reference, candidate):\n    raise ValueError('bad metric')\n")
    with RayExecutor(address=driver_env.address) as ex, pytest.raises(Exception, match="bad metric") as e:
        tune(m, calib, ev, Budget.parse("metric>=0.5", UserFunction(metric, "boom")), run_dir=tmp_path / "r2",
             executor=ex, runtimes=("ort",), threads=(1,))
    assert "your code raised an error (boom in m.py)" in str(e.value) and "raise ValueError" in str(e.value)
