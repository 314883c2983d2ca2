"""How trials are run: one ``Executor`` interface, so that a cluster executor can run independent
trials elsewhere without touching the search. ``LocalExecutor`` runs them here, in order;
``RayExecutor`` (``search.ray_executor``, ``pip install 'infertune[ray]'``) on a Ray cluster.

An executor yields each finished trial (in any order) with the variant's model; the search, in
the driver process, records it: the journal is written by nobody else.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from typing import Protocol

from infertune.errors import BackendUnavailable, UsageError
from infertune.search.measure import Measured, TrialRunner
from infertune.search.trials import TrialSpec

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs trials; yields each result as it finishes (in any order)."""

    def run(self, runner: TrialRunner, specs: Sequence[TrialSpec]) -> Iterator[Measured]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Trials one after another in this process."""

    def run(self, runner: TrialRunner, specs: Sequence[TrialSpec]) -> Iterator[Measured]:
        for s in specs:
            yield runner.run_trial(s)

    def close(self) -> None:
        pass


def make_executor(name: str = "local", *, address: str | None = None, shard_samples: int | None = None) -> Executor:
    """``local``, or ``ray`` (connected to ``address``, HOST:PORT; none: a Ray started on this machine)."""
    if name not in EXECUTORS:
        raise UsageError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    if name == "local":
        if address is not None or shard_samples is not None:
            raise UsageError("--ray-address and --ray-shard-samples need --executor ray")
        return LocalExecutor()
    if importlib.util.find_spec("ray") is None:
        raise BackendUnavailable("the ray executor needs the ray package: pip install 'infertune[ray]'")
    from infertune.search.ray_executor import RayExecutor

    return RayExecutor(address=address, shard_samples=shard_samples)
