"""A tune run's trials: what each one is (``TrialSpec``), what it measured (``Trial``), how trials
are run (``Executor``), and how they are kept (``Journal``: trials.jsonl in the run directory, one
line per finished trial, synced before the next starts; ``claim_run_dir``: run.json, so that a run
directory is never resumed with another configuration).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from infertune._io import write_json
from infertune.errors import UsageError

TRIALS = "trials.jsonl"
RUN = "run.json"
RUNTIME_NAMES = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}
PLACEMENT = {"ort": "ort-cpu", "openvino": "openvino"}  # runtime -> Q/DQ placement target


@dataclass(frozen=True)
class TrialSpec:
    precision: str  # "fp32" | "int8"
    method: str = ""  # calibration method (int8)
    exclude: tuple[str, ...] = ()  # nodes kept in float (int8)
    threads: int = 0
    opt: str = "all"
    backend: str = "ort"  # the runtime that runs (and is evaluated on) this variant
    target: str = ""  # Q/DQ placement (int8); empty: the backend's own (PLACEMENT)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "int8"):
            raise UsageError(f"precision must be fp32 or int8, got {self.precision!r}")
        if self.precision == "int8" and not self.target:
            if self.backend not in PLACEMENT:
                raise UsageError(f"no INT8 placement known for runtime {self.backend!r}")
            object.__setattr__(self, "target", PLACEMENT[self.backend])

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        t = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "default threads"
        on = "" if self.backend == "ort" else f" on {RUNTIME_NAMES.get(self.backend, self.backend)}"
        if self.precision == "fp32":
            return f"FP32{on}, {t}"
        return f"INT8 {self.method}{on}, {len(self.exclude)} in float, {t}"

    @classmethod
    def from_dict(cls, d: dict) -> TrialSpec:
        # journals from before per-runtime placement built every INT8 variant for ort-cpu
        return cls(d["precision"], d.get("method", ""), tuple(d.get("exclude", ())), d.get("threads", 0),
                   d.get("opt", "all"), d.get("backend", "ort"),
                   d.get("target", "ort-cpu" if d["precision"] == "int8" else ""))


@dataclass
class Trial:
    index: int
    spec: TrialSpec
    metrics: dict[str, float]
    p50_ms: float
    met: bool
    seconds: float
    model_file: str | None  # relative to the run directory; None: the source model
    note: str = ""

    def to_dict(self) -> dict:
        return {"index": self.index, "key": self.spec.key, "spec": asdict(self.spec), "label": self.spec.label(),
                "metrics": self.metrics, "p50_ms": self.p50_ms, "met": self.met, "seconds": round(self.seconds, 3),
                "model_file": self.model_file, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> Trial:
        return cls(d["index"], TrialSpec.from_dict(d["spec"]), d["metrics"], d["p50_ms"], d["met"], d["seconds"],
                   d["model_file"], d.get("note", ""))


class Executor(Protocol):
    """Runs trials; yields each result as it finishes (in any order)."""

    def run(self, fn: Callable[[TrialSpec], Trial], specs: Sequence[TrialSpec]) -> Iterator[Trial]: ...


class LocalExecutor:
    """Trials one after another in this process."""

    def run(self, fn: Callable[[TrialSpec], Trial], specs: Sequence[TrialSpec]) -> Iterator[Trial]:
        for s in specs:
            yield fn(s)


class Journal:
    """trials.jsonl: one line per finished trial, flushed and synced before the next starts."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / TRIALS
        self.done: dict[str, Trial] = {}
        if self.path.exists():
            good = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    t = Trial.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # the line a killed run was writing
                self.done.setdefault(t.spec.key, t)
                good.append(line)
            self.path.write_text("".join(g + "\n" for g in good), encoding="utf-8")

    def add(self, t: Trial) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(t.to_dict()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[t.spec.key] = t


def claim_run_dir(root: Path, config: dict) -> None:
    """Record the run's configuration in ``root``; refuse a directory that holds another one."""
    path = root / RUN
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if saved is not None and saved != config:
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise UsageError(f"run directory {root} holds another tune run (different {', '.join(diff)}); "
                             "give another --run-dir or delete it")
        if saved is not None:
            return
    write_json(path, config)
