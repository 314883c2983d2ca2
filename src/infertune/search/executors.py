"""How trials are run: one ``Executor`` interface, so that a cluster executor can run independent
trials elsewhere without touching the search. ``LocalExecutor`` runs them here, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from infertune.search.trials import Trial, TrialSpec


class Executor(Protocol):
    """Runs trials; yields each result as it finishes (in any order)."""

    def run(self, fn: Callable[[TrialSpec], Trial], specs: Sequence[TrialSpec]) -> Iterator[Trial]: ...


class LocalExecutor:
    """Trials one after another in this process."""

    def run(self, fn: Callable[[TrialSpec], Trial], specs: Sequence[TrialSpec]) -> Iterator[Trial]:
        for s in specs:
            yield fn(s)
