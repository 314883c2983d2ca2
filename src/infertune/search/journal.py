"""How a tune run's trials are kept: ``Journal`` (trials.jsonl in the run directory, one line per
finished trial, synced before the next starts) and ``claim_run_dir`` (run.json, so that a run
directory is never resumed with another configuration)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from infertune._io import write_json
from infertune.errors import UsageError
from infertune.search.trials import Trial

TRIALS = "trials.jsonl"
RUN = "run.json"


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
