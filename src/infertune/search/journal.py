"""How a tune run's trials are kept in its run directory.

- ``Journal``: trials.jsonl, one line per finished trial, synced before the next starts. A torn
  last line (the one a run killed with -9 was writing) is dropped without a word: that is how a
  killed run resumes. A damaged line anywhere else is not silently lost: it is kept aside in
  trials.jsonl.bad, with a warning, and its trial runs again.
- ``claim_run_dir``: run.json, so that a run directory is never resumed with another configuration.
- ``RunLock``: one tune at a time per run directory. The lock file holds the holder's pid and host
  and is locked (flock) while it runs; a second tune on the same directory is refused; a lock left
  by a process that is gone (kill -9, a crash) on this host is taken over with a warning.
- ``RUN_DIR``: how ``infertune.outputs`` recognises a run directory (resumed, never replaced).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import warnings
from pathlib import Path

from infertune._io import default_mode, write_json, write_text
from infertune.errors import InfertuneWarning, UsageError
from infertune.outputs import Owned
from infertune.search.trials import Trial

try:
    import fcntl
except ImportError:  # not POSIX: the pid check alone
    fcntl = None  # type: ignore[assignment]

TRIALS = "trials.jsonl"
BAD = TRIALS + ".bad"
RUN = "run.json"
LOCK = "lock"
DAMAGED = (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError)


class Journal:
    """trials.jsonl: one line per finished trial, flushed and synced before the next starts."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / TRIALS
        self.done: dict[str, Trial] = {}
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        good, bad = [], []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                t = Trial.from_dict(json.loads(line))
            except DAMAGED:
                if i < len(lines) - 1:
                    bad.append(line)
                continue  # the last line: the one a killed run was writing
            self.done.setdefault(t.spec.key, t)
            good.append(line)
        if bad:
            with open(run_dir / BAD, "a", encoding="utf-8") as f:
                f.write("".join(b + "\n" for b in bad))
            warnings.warn(f"{self.path}: {len(bad)} damaged line(s) before the last kept aside in {run_dir / BAD}; "
                          "their trials run again", InfertuneWarning, stacklevel=2)
        if len(good) != len([x for x in lines if x.strip()]):
            write_text(self.path, "".join(g + "\n" for g in good))

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
        except (ValueError, RecursionError):
            saved = None
        if not isinstance(saved, dict):
            saved = None  # damaged: written again below
        if saved is not None and saved != config:
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise UsageError(f"run directory {root} holds another tune run (different {', '.join(diff)}); "
                             "give another --run-dir or delete it")
        if saved is not None:
            return
    write_json(path, config)


def _run_names(root: Path) -> set[str] | None:
    """A run directory is infertune's when it holds run.json or trials.jsonl (it is resumed, not replaced)."""
    return {RUN, TRIALS} if (root / RUN).is_file() or (root / TRIALS).is_file() else None


RUN_DIR = Owned("an infertune run directory", _run_names, replace=False)


class RunLock:
    """Holds ``root/lock`` for one tune (a context manager); see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = _holder(fd)
            if holder:
                self._take_over(holder)
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"run directory {self.root} is in use by {_describe(_read(self.path))}: wait for that "
                             "tune to finish, or give another --run-dir") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _take_over(self, holder: dict) -> None:
        """The lock file names a holder although the lock is free: refuse when it may still run."""
        pid, host = holder.get("pid"), holder.get("host")
        if host != socket.gethostname():
            raise UsageError(f"run directory {self.root} is locked by {_describe(holder)}, which cannot be checked "
                             f"from here: if that run is over, delete {self.path}")
        alive = isinstance(pid, int) and _alive(pid)
        if alive and fcntl is None:
            raise BlockingIOError
        gone = "which no longer holds it" if alive else "which is no longer running"
        warnings.warn(f"{self.path}: took over the lock left by {_describe(holder)}, {gone}", InfertuneWarning,
                      stacklevel=3)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> dict:
    data = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(data) if data.strip() else {}
    except ValueError:
        return {"pid": None, "host": socket.gethostname()}  # written half-way by a process that died
    return holder if isinstance(holder, dict) else {}


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')}" + (f" (since {holder['since']})" if holder.get("since")
                                                                  else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
