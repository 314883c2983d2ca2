"""Kill a command with SIGKILL once its tune journal holds some trials (the resume tests share it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def kill_after_trials(cmd: list[str], journal: Path, trials: int, env: dict | None = None,
                      timeout: float = 120) -> list[str]:
    """Start ``cmd``, SIGKILL it once ``journal`` has ``trials`` lines; the keys recorded by then."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= trials:
            break
        time.sleep(0.02)
    if p.poll() is not None:
        pytest.fail(f"tune finished before it could be killed: {p.stderr.read().decode()[-800:]}")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return [json.loads(x)["key"] for x in journal.read_text().splitlines() if x.strip().endswith("}")]
