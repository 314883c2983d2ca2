"""Latency with each variant timed in its own process, variants alternated in rounds.

ONNX Runtime and OpenVINO both keep spinning thread pools: timing two variants interleaved in one
process, with both runtimes loaded, distorted a detector's figures by 29% and 80% against the same
variants timed one per process, and flipped a choice. Here every measurement is a fresh
``python -m infertune.perf.isolated SPEC`` process that loads the one runtime it times, compiles
the model from its file, warms up and times ``bench`` for the given seconds. ``time_isolated``
runs ``rounds`` rounds over the variants, alternating their order from round to round (so a
drift in machine speed does not always favour the same one), and reports each variant's median
of its rounds' p50 with the spread of the rounds ((max - min) / median).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infertune import backends
from infertune.data import Dataset, batched
from infertune.errors import EXIT_BAD_INPUT, InfertuneError, UsageError
from infertune.fingerprint import environment
from infertune.model import Model
from infertune.perf.latency import first_feed

WORKER_TIMEOUT_S = 600


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
    processes: list[dict] = field(default_factory=list)  # per round: {"pid", "runtimes" loaded in it, "slot"}

    @property
    def spread(self) -> float:
        """(max - min) / median of the round p50s: how far apart the rounds were."""
        return (max(self.rounds_ms) - min(self.rounds_ms)) / self.p50_ms if self.p50_ms else 0.0

    def to_dict(self) -> dict:
        return {"key": self.key, "p50_ms": self.p50_ms, "rounds_ms": self.rounds_ms, "spread": round(self.spread, 4),
                "iterations": self.iterations, "processes": self.processes}


def time_isolated(variants: Sequence[Variant], feed: dict[str, np.ndarray], *, rounds: int = 3,
                  seconds: float = 1.0, warmup: int = 5) -> dict[str, IsolatedLatency]:
    """Each variant timed in a fresh process per round, alternating order (see the module docstring)."""
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
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for slot, v in enumerate(order):
                samples[v.key].append({**_time_once(v, feed_path, Path(d), seconds, warmup), "slot": slot})
    out = {}
    for v in variants:
        runs = samples[v.key]
        p50s = [r["p50_ms"] for r in runs]
        out[v.key] = IsolatedLatency(v.key, float(np.median(p50s)), p50s, [r["iterations"] for r in runs],
                                     [{k: r[k] for k in ("pid", "runtimes", "slot")} for r in runs])
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
                   dims: dict[str, int] | None = None, rounds: int = 3, seconds: float = 1.0) -> IsolatedBench:
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


def _time_once(v: Variant, feed_path: Path, workdir: Path, seconds: float, warmup: int) -> dict:
    spec = workdir / f"spec-{os.getpid()}.json"
    spec.write_text(json.dumps({"model": str(v.model), "backend": v.backend, "settings": v.settings.to_dict(),
                                "feed": str(feed_path), "seconds": seconds, "warmup": warmup}))
    try:
        p = subprocess.run([sys.executable, "-m", "infertune.perf.isolated", str(spec)], capture_output=True,
                           text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InfertuneError(f"timing {v.model.name} on {v.backend} took over {WORKER_TIMEOUT_S} s") from None
    lines = p.stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        raise InfertuneError(f"the timing process for {v.model.name} on {v.backend} died (exit {p.returncode}): "
                             f"{tail}") from None
    if "error" in doc:
        err = InfertuneError(doc["error"])
        err.exit_code = doc.get("exit_code", EXIT_BAD_INPUT)
        raise err
    return doc


def _worker(spec_path: str) -> dict:
    """In the fresh process: compile, warm up, time; the result as a dict (errors too)."""
    from infertune.perf.latency import bench

    spec = json.loads(Path(spec_path).read_text())
    try:
        with np.load(spec["feed"], allow_pickle=False) as z:
            feed = {k: z[k] for k in z.files}
        settings = backends.Settings(**spec["settings"])
        r = bench(Model.load(spec["model"]), Dataset.from_iterable([feed]), backend=spec["backend"],
                  settings=settings, warmup=spec["warmup"], time_budget_s=spec["seconds"])
    except InfertuneError as e:
        return {"error": str(e), "exit_code": e.exit_code}
    runtimes = sorted(m for m in ("onnxruntime", "openvino", "tensorrt") if m in sys.modules)
    return {"p50_ms": r.latency_ms.p50, "iterations": r.iterations, "pid": os.getpid(), "runtimes": runtimes}


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
