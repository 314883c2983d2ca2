"""The choice among the trials that met the budget.

The finalists (the fastest FP32 trial and the fastest others that meet the budget) are measured
again (``runoff``): each in its own process, alternated over ``RUNOFF_ROUNDS`` short rounds, median
of the rounds, with their spread recorded. The fastest wins, but a quantized one must beat FP32 by
more than ``NOISE`` to be preferred, since latencies on a shared machine differ by a few percent
from run to run.
"""

from __future__ import annotations

import json
from pathlib import Path

from infertune._io import write_json
from infertune.search.measure import TrialRunner
from infertune.search.trials import Trial

NOISE = 0.03
# 24 windows of 0.25 s each (at latency_s 1 s): the machine changes speed in phases of seconds (on a 2-vCPU
# Zen 5, rounds of one runoff read 4.8-5.0 ms and then 7.5-8.6 ms for the same file), so the median is
# taken over as many phases as a few seconds more allow (3 finalists: about 18 s of timing instead of 9)
RUNOFF_ROUNDS = 24
RUNOFF_TIMING = 6  # each finalist is timed for this many times a trial's latency_s, split over the rounds
RUNOFF_FINALISTS = 3
RUNOFF = "runoff.json"


def runoff(runner: TrialRunner, root: Path, met: list[Trial], fp32: list[Trial]) -> dict[str, dict]:
    """The fastest FP32 trial and the fastest passing others, measured again side by side:
    {trial key: {"p50_ms", "rounds_ms", "spread", ...}}.

    A trial's p50 comes from one short measurement; on a shared machine two of them taken
    minutes apart differ by more than the gaps being decided. The finalists are measured again,
    each in its own process, alternated in ``RUNOFF_ROUNDS`` rounds, median of the rounds;
    recorded in the run directory so that a resumed run decides on the same numbers. Empty when
    there is nothing to decide.
    """
    best_fp32 = min(fp32, key=lambda t: t.p50_ms)
    others = sorted((t for t in met if t is not best_fp32), key=lambda t: t.p50_ms)[:RUNOFF_FINALISTS - 1]
    finalists = [best_fp32, *others]
    if len(finalists) < 2:
        return {}
    keys = sorted(t.spec.key for t in finalists)
    path = root / RUNOFF
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("keys") == keys and all(isinstance(v, dict) for v in saved["latency"].values()):
                return saved["latency"]
        except (ValueError, KeyError, AttributeError):
            pass
    timed = runner.time([t.spec for t in finalists], rounds=RUNOFF_ROUNDS, seconds=RUNOFF_TIMING * runner.latency_s)
    measured = {k: v.to_dict() for k, v in timed.items()}
    write_json(path, {"keys": keys, "latency": measured})
    return measured


def choose(fp32: list[Trial], met: list[Trial], decisions: list[str], budget: str) -> Trial:
    """The fastest trial that met ``budget``, unless a simpler one is within NOISE of it."""
    simplest = min(fp32, key=lambda t: t.p50_ms)
    fastest = min(met, key=lambda t: t.p50_ms)
    if fastest is simplest:
        reduced = [t for t in met if t.spec.precision != "fp32"]
        if reduced:
            best8 = min(reduced, key=lambda t: t.p50_ms)
            kind = best8.spec.precision.upper()
            decisions.append(f"chose {simplest.spec.label()}: {simplest.p50_ms:.3f} ms; the fastest {kind} variant "
                             f"that meets the budget takes {best8.p50_ms:.3f} ms "
                             f"({best8.p50_ms / simplest.p50_ms:.2f}x): too small a model, or too little "
                             f"{'8-bit' if kind == 'INT8' else 'reduced-precision'} work, for quantization to pay here")
        else:
            decisions.append(f"chose {simplest.spec.label()}: no INT8 variant met {budget}")
        return simplest
    if fastest.p50_ms > simplest.p50_ms * (1 - NOISE):
        decisions.append(f"chose {simplest.spec.label()}: {fastest.spec.label()} is only "
                         f"{(1 - fastest.p50_ms / simplest.p50_ms):.1%} faster, within measurement noise "
                         f"({NOISE:.0%})")
        return simplest
    decisions.append(f"chose {fastest.spec.label()}: {fastest.p50_ms:.3f} ms vs FP32 {simplest.p50_ms:.3f} ms "
                     f"({simplest.p50_ms / fastest.p50_ms:.2f}x faster) within the budget")
    return fastest
