"""Latency with each variant timed in its own process, variants alternated in rounds.

ONNX Runtime and OpenVINO both keep spinning thread pools: timing two variants interleaved in one
process, with both runtimes loaded, distorted a detector's figures by 29% and 80% against the same
variants timed one per process, and flipped a choice. Here every variant gets its own fresh
``python -m infertune.perf.isolated SPEC`` process that loads the one runtime it times, compiles
the model from its file and warms up; then ``time_isolated`` runs ``rounds`` rounds over the
variants, alternating their order from round to round, and in each round asks each process in
turn to time ``run`` for the given seconds (after a few untimed calls) while the others wait on
their pipe. It reports each variant's median of its rounds' p50 with the spread of the rounds
(interquartile range / median), and for every round the CPU time the waiting processes used meanwhile
(their thread pools must be asleep, not spinning beside the one being timed).

Why one process per variant kept over the rounds rather than a fresh one per round: the speed of
this kind of shared machine changes in phases of one to several seconds (benchmarks/timing_method.md:
one ORT process's windows of 0.25 s in a row read 20.6-21.7 ms for eight windows, then 37.6 and
43.2, then 29-37 ms for 17 of the next 18),
so many short windows alternated across the variants share the conditions better than a few long
ones, and a process start (interpreter, runtime, model compile) no longer limits how many rounds
there can be. Measured there, 8 repeats each: the spread of the reported p50 over repeats was lower
on all three variants than with 3 fresh processes of 1 s (the same 3 s of timing), at 21% less wall
time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infertune import backends
from infertune.data import Dataset, batched
from infertune.errors import EXIT_BAD_INPUT, InfertuneError, UsageError
from infertune.fingerprint import environment
from infertune.model import Model
from infertune.perf.latency import first_feed, time_calls

WORKER_TIMEOUT_S = 600
DEFAULT_ROUNDS = 10
DEFAULT_WINDOW_S = 0.3  # per variant and round
BLIND_SETTLE_S = 0.2  # the wait after a window where a process's CPU time cannot be read


@dataclass(frozen=True)
class Variant:
    """One thing to time: a model file on a runtime with its settings."""

    key: str
    model: Path
    backend: str = "ort"
    settings: backends.Settings = field(default_factory=backends.Settings)


@dataclass
class IsolatedLatency:
    key: str
    p50_ms: float  # median over the rounds of each round's p50
    rounds_ms: list[float]  # each round's p50, in round order
    iterations: list[int]  # timed runs per round
    # per round: {"pid", "runtimes" loaded in it, "slot", "others_cpu_ms": CPU the waiting processes used
    # meanwhile (None where the system cannot say)}
    processes: list[dict] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """Interquartile range / median of the round p50s: how far apart the rounds were (with many
        short rounds, max - min would only measure the one window a neighbour slowed down)."""
        q1, q3 = np.percentile(self.rounds_ms, [25, 75])
        return float(q3 - q1) / self.p50_ms if self.p50_ms else 0.0

    def to_dict(self) -> dict:
        return {"key": self.key, "p50_ms": self.p50_ms, "rounds_ms": self.rounds_ms, "spread": round(self.spread, 4),
                "iterations": self.iterations, "processes": self.processes}


def time_isolated(variants: Sequence[Variant], feed: dict[str, np.ndarray], *, rounds: int = DEFAULT_ROUNDS,
                  seconds: float = DEFAULT_WINDOW_S, warmup: int = 5) -> dict[str, IsolatedLatency]:
    """Each variant timed in its own process, alternated in rounds (see the module docstring)."""
    if rounds < 1 or seconds <= 0:
        raise UsageError(f"rounds must be >= 1 and seconds > 0, got {rounds} and {seconds}")
    keys = [v.key for v in variants]
    if len(set(keys)) != len(keys):
        raise UsageError("variants to time need distinct keys")
    for v in variants:
        backends.check_settings(v.backend, v.settings)
    samples: dict[str, list[dict]] = {v.key: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="infertune-isolated-") as d:
        feed_path = Path(d) / "feed.npz"
        np.savez(feed_path, **feed)
        workers = {}
        try:
            for i, v in enumerate(variants):  # all compile at once: nothing is timed until every one is ready
                workers[v.key] = _Worker(v, feed_path, Path(d) / str(i), warmup)
            ready = {k: w.reply() for k, w in workers.items()}
            for r in range(rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for slot, v in enumerate(order):
                    idle = [w for k, w in workers.items() if k != v.key]
                    before = _cpu_total(idle)
                    got = workers[v.key].window(seconds)
                    workers[v.key].settle()
                    after = _cpu_total(idle)
                    others_ms = None if before is None or after is None else round((after - before) * 1e3, 1)
                    samples[v.key].append({**got, **ready[v.key], "slot": slot, "others_cpu_ms": others_ms})
        finally:
            for w in workers.values():
                w.end_requests()  # all at once: they exit side by side
            for w in workers.values():
                w.close()
    out = {}
    for v in variants:
        runs = samples[v.key]
        p50s = [r["p50_ms"] for r in runs]
        out[v.key] = IsolatedLatency(v.key, float(np.median(p50s)), p50s, [r["iterations"] for r in runs],
                                     [{k: r[k] for k in ("pid", "runtimes", "slot", "others_cpu_ms")} for r in runs])
    return out


@dataclass
class IsolatedBench:
    """``bench --isolate``: several models timed side by side, each in its own process per round."""

    backend: str
    settings: dict
    input_shapes: dict[str, list[int]]
    seconds_per_round: float
    latencies: list[IsolatedLatency]  # in the order given; keys are the model names
    environment: dict = field(default_factory=environment)

    def to_dict(self) -> dict:
        first = self.latencies[0].p50_ms
        return {"schema_version": 1, "kind": "bench-isolated", "backend": self.backend, "settings": self.settings,
                "input_shapes": self.input_shapes, "seconds_per_round": self.seconds_per_round,
                "models": [{**lat.to_dict(), "model": lat.key, "ratio_to_first": lat.p50_ms / first if first else None}
                           for lat in self.latencies],
                "environment": self.environment}


def bench_isolated(models: Sequence[Model | str | os.PathLike[str]], data: Dataset | None = None, *,
                   backend: str = "ort", settings: backends.Settings | None = None, batch_size: int = 1,
                   dims: dict[str, int] | None = None, rounds: int = DEFAULT_ROUNDS,
                   seconds: float = DEFAULT_WINDOW_S) -> IsolatedBench:
    """p50 of each model on the first sample of ``data`` (or synthetic), each in its own process,
    alternated over ``rounds`` rounds: ratios between them are side by side and truthful."""
    loaded = [m if isinstance(m, Model) else Model.load(m) for m in models]
    if not loaded:
        raise UsageError("bench needs at least one model")
    names = [m.name for m in loaded]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    settings = settings or backends.Settings()
    first = loaded[0]
    if data is None:
        data = Dataset.synthetic(first, samples=batch_size, dims={**(dims or {}), "batch": 1})
    feed = first_feed(first, batched(data, batch_size), data.name, batch_size)
    with tempfile.TemporaryDirectory(prefix="infertune-bench-") as d:
        variants = [Variant(name, _file_of(m, Path(d) / f"{i}.onnx"), backend, settings)
                    for i, (name, m) in enumerate(zip(names, loaded, strict=True))]
        timed = time_isolated(variants, feed, rounds=rounds, seconds=seconds)
    return IsolatedBench(backend, settings.to_dict(), {k: list(v.shape) for k, v in feed.items()}, seconds,
                         [timed[n] for n in names])


def _file_of(model: Model, fallback: Path) -> Path:
    if model.path is not None and Path(model.path).is_file():
        return Path(model.path)
    return model.save(fallback)


class _Worker:
    """One variant's timing process: started at once, then one JSON line per request and reply."""

    WINDOW_WARMUP = 2  # untimed calls before each window: the caches are the previous process's

    def __init__(self, v: Variant, feed_path: Path, workdir: Path, warmup: int) -> None:
        self.variant = v
        workdir.mkdir()
        spec = workdir / "spec.json"
        spec.write_text(json.dumps({"model": str(v.model), "backend": v.backend, "settings": v.settings.to_dict(),
                                    "feed": str(feed_path), "warmup": warmup}))
        self.stderr_path = workdir / "stderr.txt"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "infertune.perf.isolated", str(spec)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def window(self, seconds: float) -> dict:
        """p50 and iterations of ``run`` timed for ``seconds`` in the worker."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"seconds": seconds, "warmup": self.WINDOW_WARMUP}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; reply() says how
        return self.reply()

    def reply(self) -> dict:
        v = self.variant
        assert self.proc.stdout is not None
        got: list[str] = []  # a reading thread, not select(): pipes cannot be selected on Windows
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(WORKER_TIMEOUT_S)
        if not got:
            raise InfertuneError(f"timing {v.model.name} on {v.backend} took over {WORKER_TIMEOUT_S} s")
        line = got[0]
        try:
            doc = json.loads(line)
        except ValueError:
            self.proc.wait(timeout=WORKER_TIMEOUT_S)
            tail = " | ".join(self.stderr_path.read_text().strip().splitlines()[-3:])
            raise InfertuneError(f"the timing process for {v.model.name} on {v.backend} died "
                                 f"(exit {self.proc.returncode}): {tail}") from None
        if "error" in doc:
            err = InfertuneError(doc["error"])
            err.exit_code = doc.get("exit_code", EXIT_BAD_INPUT)
            raise err
        return doc

    def settle(self, quiet_s: float = 0.03, limit_s: float = 1.0) -> None:
        """Wait until the process's threads stop spinning (ORT's pool keeps spinning after a run):
        no CPU used for ``quiet_s``, or ``limit_s`` at most, so the next window runs beside no one.
        Where the CPU time cannot be read (no /proc), a fixed ``BLIND_SETTLE_S``."""
        last, quiet_since = self.cpu_s(), time.monotonic()
        if last is None:
            time.sleep(BLIND_SETTLE_S)
            return
        end = quiet_since + limit_s
        while time.monotonic() < end:
            time.sleep(0.01)
            now = self.cpu_s()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return

    def cpu_s(self) -> float | None:
        """CPU seconds the process has used (all its threads), from /proc; None where there is none."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def end_requests(self) -> None:
        """Close its stdin: the worker exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def close(self) -> None:
        self.end_requests()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _cpu_total(workers: list[_Worker]) -> float | None:
    """CPU seconds these processes have used, or None when any cannot say."""
    used = [w.cpu_s() for w in workers]
    known = [u for u in used if u is not None]
    return sum(known) if len(known) == len(used) else None


def _serve(spec_path: str) -> None:
    """In the fresh process: compile, warm up, say so; then time one window per request line."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        with np.load(spec["feed"], allow_pickle=False) as z:
            feed = {k: z[k] for k in z.files}
        model = Model.load(spec["model"], check=False)  # a corrupt file still fails to parse, one clear error
        first = next(iter(feed.values()), None)
        rows = first.shape[0] if first is not None and first.ndim else 1
        feed = first_feed(model, Dataset.from_iterable([feed]), "the feed to time", rows)
        runner = backends.compile(model, backends.Settings(**spec["settings"]), backend=spec["backend"])
        for _ in range(spec["warmup"]):
            runner.run(feed)
    except InfertuneError as e:
        _say({"error": str(e), "exit_code": e.exit_code})
        return
    loaded = sorted(m for m in ("onnxruntime", "openvino", "tensorrt") if m in sys.modules)
    _say({"pid": os.getpid(), "runtimes": loaded})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            for _ in range(request["warmup"]):
                runner.run(feed)
            ns = time_calls(runner, feed, time_budget_s=request["seconds"])
        except InfertuneError as e:
            _say({"error": str(e), "exit_code": e.exit_code})
            return
        _say({"p50_ms": float(np.percentile(ns, 50)) / 1e6, "iterations": int(ns.size)})


def _say(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
