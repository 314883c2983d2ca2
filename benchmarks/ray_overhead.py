"""What running tune's trials on Ray costs: tune wall time on rapidocr's recognizer with the local executor
and with 1, 2 and 4 Ray worker nodes on this machine's loopback.

    flock /work/timing.lock .venv/bin/python benchmarks/ray_overhead.py [--workers 1,2,4] [--eval-n 64]

Each Ray run gets a fresh cluster: a head that runs nothing (0 CPUs) and N worker nodes (`ray start`, one
CPU and the resource of this machine's kind each), all on 127.0.0.1, stopped afterwards. The search is the
same in every run (same data, budget, seeds); trials are taken from a fresh run directory each time.
This machine has 2 cores, so N workers share them: the figure that carries over to a cluster is the
overhead per trial (Ray wall time minus local wall time, over the trials run), not a speed-up.
Writes benchmarks/results/ray_overhead.{json,md}.

What N machines would give (on paper, from how the search is built): tune's steps are sequential (FP32,
then INT8 per method, then a bisection that needs each verdict before the next trial), so trials run in
parallel only within a step (FP32 on every runtime and thread count, INT8 per method and runtime, the
passing variant at the other thread counts): a few at a time, not N. What scales with N is a trial's
accuracy pass, sharded over ``--ray-shard-samples`` feeds per task: with an evaluation set of S feeds it
takes about S / min(N, S / shard) of one machine's time plus the per-task overhead measured here, so a
50,000-image evaluation gains close to N; a 200-line one gains little. Latency is measured on one node
per trial (a timing task has its node to itself). The sensitivity ranking and the runoff run in the
driver. Tuning a dozen models a night is the case that scales best: one tune per model, each its own
driver, all sharing the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import realmodels  # noqa: E402
from benchmarks.results_io import save_results  # noqa: E402
from infertune import Budget, Dataset, Evaluator, Model, backends, tune  # noqa: E402
from infertune.fingerprint import environment  # noqa: E402
from infertune.search.ray_executor import RayExecutor, kind_resource  # noqa: E402

RAY = Path(sys.executable).with_name("ray")


class LoopbackCluster:
    """A head (0 CPUs) and ``workers`` nodes of one CPU each on 127.0.0.1; stopped by session id."""

    def __init__(self, workers: int) -> None:
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.sessions: list[int] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        try:
            self.start("--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard=false")
            for _ in range(workers):
                self.start("--address", self.address, "--num-cpus", "1", "--resources",
                           json.dumps({kind_resource(): 1}))
        except BaseException:
            self.stop()
            raise

    def start(self, *args: str) -> None:
        p = subprocess.Popen([str(RAY), "start", *args, "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp,
                              "--disable-usage-stats"], env=self.env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sessions.append(p.pid)
        if p.wait(timeout=120):
            raise RuntimeError(f"ray start {' '.join(args)} failed")

    def stop(self) -> None:
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getsid(int(d.name)) in self.sessions:
                        os.kill(int(d.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    continue
        shutil.rmtree(self.temp, ignore_errors=True)


def one_run(args, executor, work: Path) -> dict:
    m = Model.load(realmodels.rapidocr_rec())
    x = realmodels.rec_lines(args.calib_n, seed=0)
    calib = Dataset.from_arrays({realmodels.REC_INPUT: x})
    ev = realmodels.rec_lines(args.eval_n, seed=1)
    evaluator = Evaluator(m, [{realmodels.REC_INPUT: ev[i:i + 1]} for i in range(len(ev))],
                          settings=backends.Settings(intra_op_threads=1))
    t0 = time.perf_counter()
    r = tune(m, calib, evaluator, Budget.parse(args.budget), run_dir=work, threads=(1,), runtimes=("ort",),
             max_trials=args.max_trials, latency_s=args.latency_seconds, executor=executor)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "trials": len(r.trials), "chosen": r.chosen.spec.label(),
            "trial_seconds": sum(t.seconds for t in r.trials), "labels": sorted(t.spec.label() for t in r.trials)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--shard-samples", type=int, default=16)
    # a budget full INT8 meets: the search's path then does not hang on latencies, which the loopback workers
    # (sharing 2 cores) measure differently from the local run, so every run runs the same trials
    ap.add_argument("--budget", default="cosine>=0.9")
    ap.add_argument("--max-trials", type=int, default=8)
    ap.add_argument("--latency-seconds", type=float, default=0.5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        local = one_run(args, None, Path(tmp) / "local")
        rows.append({"executor": "local", "workers": 0, **local, "overhead_per_trial_s": 0.0})
        print(rows[-1], flush=True)
        for n in [int(v) for v in args.workers.split(",")]:
            cluster = LoopbackCluster(n)
            os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
            try:
                with RayExecutor(address=cluster.address, shard_samples=args.shard_samples) as ex:
                    r = one_run(args, ex, Path(tmp) / f"ray{n}")
            finally:
                cluster.stop()
            if r["labels"] != local["labels"]:
                print(f"warning: {n} worker(s) ran other trials than the local run", flush=True)
            rows.append({"executor": "ray", "workers": n, **r, "same_trials_as_local": r["labels"] == local["labels"],
                         "overhead_per_trial_s": r["wall_s"] / max(r["trials"], 1)
                         - local["wall_s"] / max(local["trials"], 1)})
            print(rows[-1], flush=True)
    env = environment()
    cpu = env["machine"]["cpu"]
    md = [f"# Ray executor overhead: tune on rapidocr rec ({args.eval_n} evaluation lines, "
          f"{args.shard_samples} per shard, budget {args.budget})", "",
          f"{cpu['model']}, {cpu['logical_cores']} cores; every Ray node on this machine's loopback "
          "(workers share its cores: read the overhead, not a speed-up).", "",
          "| executor | worker nodes | trials | same trials as local | wall s | overhead per trial s | chosen |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r.get("same_trials_as_local", True) else "no"
        md.append(f"| {r['executor']} | {r['workers']} | {r['trials']} | {same} | {r['wall_s']:.1f} | "
                  f"{r['overhead_per_trial_s']:+.2f} | {r['chosen']} |")
    save_results("ray_overhead", {"settings": vars(args), "rows": rows, "environment": env}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
