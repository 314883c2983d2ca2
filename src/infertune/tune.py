"""tune: the fastest variant of a model that meets an accuracy budget, found by measurement.

The search, cheapest first:

1. FP32 on every runtime at every thread count asked for (the reference: it always meets the
   budget);
2. per runtime, INT8 placed for that runtime (``PLACEMENT``: what its graph optimiser fuses or
   accepts; one calibration per method asked for) with nothing excluded, evaluated on it;
3. if no INT8 variant meets the budget there: the exact sensitivity ranking of the best method's
   groups measured on that runtime (kernels differ: OpenVINO's int8 convolutions on a CPU
   without VNNI lose more than ONNX Runtime's), then bisection over how many of the most
   sensitive groups stay float;
4. the passing INT8 variant at the other thread counts.

It stops when the budget is met by the fewest exclusions (more exclusions only add float work),
or at ``max_trials`` / ``time_budget_s``. Every trial measures accuracy on the evaluation feeds
and latency (p50 of one feed) and is appended to ``run_dir/trials.jsonl`` as soon as it is done;
its model goes to ``run_dir/models``. Running the same tune again on the same run directory
reuses every recorded trial, so a run killed mid-way redoes at most the trial in flight. A run
directory holding another configuration (model, data, budget, search space) is refused.

Trials go through one ``Executor`` interface (``LocalExecutor`` runs them in this process, in
order), so that a cluster executor can run independent trials elsewhere without touching the
search.

A variant meets the budget when it does on the evaluation feeds and on at least ``CONFIDENCE`` of
``RESAMPLES`` bootstrap resamples of them (``Evaluator.judge``): a variant that passes only by the luck of which samples
were drawn (rec: 99% of 200 lines identical, 96% on 200 others) is not chosen.

The choice: the finalists (the fastest FP32 trial and the fastest others that meet the budget)
are measured again side by side, interleaved; the fastest wins, but a quantized one must beat
FP32 by more than ``NOISE`` to be preferred, since latencies on a shared machine differ by a few
percent from run to run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from infertune import backends
from infertune._io import write_json
from infertune.analysis.sensitivity import Budget, Evaluator, QuantSpace, sensitivity
from infertune.artifact import save_artifact, sha256_file
from infertune.bench.latency import bench
from infertune.data import Dataset
from infertune.errors import InfertuneError, UsageError
from infertune.fingerprint import environment
from infertune.model import Model
from infertune.quant.quantize import quantize
from infertune.trials import (
    PLACEMENT,
    RUNTIME_NAMES,
    Executor,
    Journal,
    LocalExecutor,
    Trial,
    TrialSpec,
    claim_run_dir,
)

SCHEMA_VERSION = 1
NOISE = 0.03
RUNOFF_ROUNDS = 3
RUNOFF_FINALISTS = 3


@dataclass
class TuneResult:
    budget: str
    trials: list[Trial]
    chosen: Trial
    decisions: list[str]
    sensitivity: list[dict] = field(default_factory=list)  # [{node, op_type, score}] most sensitive first
    run_dir: str = ""
    artifact: str | None = None
    stopped: str = ""  # why the search ended
    runoff: dict[str, float] = field(default_factory=dict)  # trial key -> p50 ms re-measured, interleaved
    environment: dict = field(default_factory=environment)

    def p50(self, t: Trial) -> float:
        """The trial's latency as the choice saw it: re-measured in the runoff when it took part."""
        return self.runoff.get(t.spec.key, t.p50_ms)

    @property
    def fp32(self) -> Trial:
        return min((t for t in self.trials if t.spec.precision == "fp32"), key=self.p50)

    def pareto(self) -> list[Trial]:
        """Trials no other trial beats on both latency and accuracy (output SQNR)."""
        ran = [t for t in self.trials if "sqnr_db" in t.metrics]
        front = []
        for t in ran:
            if not any(o.p50_ms <= t.p50_ms and o.metrics["sqnr_db"] >= t.metrics["sqnr_db"]
                       and (o.p50_ms < t.p50_ms or o.metrics["sqnr_db"] > t.metrics["sqnr_db"]) for o in ran):
                front.append(t)
        return sorted(front, key=lambda t: t.p50_ms)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "tune", "budget": self.budget,
                "chosen": self.chosen.to_dict(), "decisions": self.decisions, "stopped": self.stopped,
                "trials": [t.to_dict() for t in self.trials], "pareto": [t.index for t in self.pareto()],
                "sensitivity": self.sensitivity, "runoff_p50_ms": self.runoff, "run_dir": self.run_dir,
                "artifact": self.artifact,
                "environment": self.environment}


class _Context:
    """What every trial needs: the source, the calibrations, the evaluator."""

    def __init__(self, source: Model, calib: Dataset, evaluator: Evaluator, budget: Budget, run_dir: Path,
                 latency_s: float) -> None:
        self.source, self.calib, self.evaluator, self.budget = source, calib, evaluator, budget
        self.run_dir, self.latency_s = run_dir, latency_s
        self.spaces: dict[tuple[str, str], QuantSpace] = {}
        self.next_index = 0

    def space(self, method: str, target: str) -> QuantSpace:
        if (method, target) not in self.spaces:
            q = quantize(self.source, self.calib, method=method, target=target, observe_all=True,
                         stability_halves=0, settings=self.evaluator.settings)
            self.spaces[method, target] = QuantSpace(self.source, q)
        return self.spaces[method, target]

    def build(self, spec: TrialSpec) -> Model:
        if spec.precision == "fp32":
            return self.source
        return self.space(spec.method, spec.target).build(spec.exclude)

    def run_trial(self, spec: TrialSpec) -> Trial:
        start = time.perf_counter()
        try:
            return self._measure(spec, start)
        except InfertuneError as e:  # this variant cannot run on this runtime: a result, not a crash
            return Trial(self._next(), spec, {}, float("inf"), False, time.perf_counter() - start, None,
                         f"failed: {str(e)[:300]}")

    def _next(self) -> int:
        self.next_index += 1
        return self.next_index - 1

    def _measure(self, spec: TrialSpec, start: float) -> Trial:
        model = self.build(spec)
        verdict = self.evaluator.judge(self.evaluator.run(model, spec.backend), self.budget)
        settings = backends.Settings(intra_op_threads=spec.threads, graph_optimization=spec.opt)
        lat = bench(model, Dataset.from_iterable(self.evaluator.feeds[:1]), backend=spec.backend, settings=settings,
                    warmup=5, time_budget_s=self.latency_s)
        rel, metrics, met, note = None, verdict.metrics, verdict.met, verdict.note
        if model is not self.source:
            rel = f"models/{spec.key}.onnx"
            model.save(self.run_dir / rel)
        elif spec.precision == "int8":
            # what these exclusions leave cannot run in 8-bit on its own: this is the float model,
            # which does not count as an INT8 variant meeting the budget
            note, met = "nothing left to quantize: the float model", False
        return Trial(self._next(), spec, metrics, lat.latency_ms.p50, met, time.perf_counter() - start, rel, note)


def tune(model: Model | str | os.PathLike[str], calib: Dataset, evaluator: Evaluator, budget: Budget, *,
         run_dir: str | os.PathLike[str], threads: Sequence[int] = (0,), methods: Sequence[str] = ("auto",),
         runtimes: Sequence[str] = ("ort",),
         max_trials: int = 40, time_budget_s: float | None = None, latency_s: float = 1.0,
         executor: Executor | None = None, on_trial: Callable[[Trial, bool], None] | None = None,
         output: str | os.PathLike[str] | None = None) -> TuneResult:
    """Search (see the module docstring); with ``output``, write the artifact there."""
    if not threads or not methods or not runtimes:
        raise UsageError("tune needs at least one thread count, calibration method and runtime")
    for r in runtimes:
        backends.get_backend(r)  # unknown or not installed: a clear error before any trial
        if r not in PLACEMENT:
            raise UsageError(f"tune has no INT8 placement for runtime {r!r} (known: {', '.join(PLACEMENT)})")
    if max_trials < 1:
        raise UsageError(f"max_trials must be >= 1, got {max_trials}")
    source = model if isinstance(model, Model) else Model.load(model)
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    source_sha = _source_sha(source)
    claim_run_dir(root, {"source_sha256": source_sha, "budget": str(budget), "threads": list(threads),
                  "methods": list(methods), "runtimes": list(runtimes), "eval_sha256": _feeds_sha(evaluator.feeds)})
    journal = Journal(root)
    ctx = _Context(source, calib, evaluator, budget, root, latency_s)
    ctx.next_index = max((t.index for t in journal.done.values()), default=-1) + 1
    ex = executor or LocalExecutor()
    deadline = time.monotonic() + time_budget_s if time_budget_s else None
    trials: dict[str, Trial] = {}
    decisions: list[str] = []
    stopped = ""

    def ask(specs: Iterable[TrialSpec]) -> list[Trial]:
        nonlocal stopped
        specs = [s for s in dict.fromkeys(specs)]
        todo = []
        for s in specs:
            if s.key in journal.done:
                trials[s.key] = journal.done[s.key]
                if on_trial:
                    on_trial(trials[s.key], True)
            else:
                todo.append(s)
        room = max_trials - len(trials)
        if len(todo) > room:
            stopped = stopped or f"max trials ({max_trials}) reached"
            todo = todo[:max(room, 0)]
        if deadline is not None and time.monotonic() > deadline and todo:
            stopped = stopped or f"time budget ({time_budget_s:g} s) spent"
            todo = []
        for t in ex.run(ctx.run_trial, todo):
            journal.add(t)
            trials[t.spec.key] = t
            if on_trial:
                on_trial(t, False)
        return [trials[s.key] for s in specs if s.key in trials]

    def search_int8(runtime: str) -> list[Trial]:
        """INT8 on ``runtime``: every method; if none meets the budget, bisection over its ranking."""
        on = "" if runtime == "ort" else f" on {RUNTIME_NAMES.get(runtime, runtime)}"
        int8 = ask(TrialSpec("int8", method=m, threads=first, backend=runtime) for m in methods)
        passing = [t for t in int8 if t.met]
        ran = [t for t in int8 if t.metrics]  # a failed trial has no metrics
        if passing or not ran or stopped:
            return passing
        best = max(ran, key=lambda t: t.metrics.get("sqnr_db", -math.inf))
        quickest = min(ran, key=lambda t: t.p50_ms)
        floor = min(t.p50_ms for t in fp32 if t.spec.threads == first)
        if quickest.p50_ms >= floor:  # nodes kept in float only add work: nothing here can beat FP32
            decisions.append(f"no INT8 variant{on} met {budget} with every node quantized, and even that one takes "
                             f"{quickest.p50_ms:.3f} ms, no faster than FP32's {floor:.3f} ms: not ranking its nodes")
            return []
        decisions.append(f"no INT8 variant{on} met {budget} with every node quantized (best: {best.spec.method}, "
                         f"{_metric_text(best, budget)}); ranking {best.spec.method}'s nodes by sensitivity{on}")
        space = ctx.space(best.spec.method, best.spec.target)
        rankings[runtime] = _ranking(root, space, evaluator, best.spec.method, runtime)
        order = [r["node"] for r in rankings[runtime]]

        def spec(k: int) -> TrialSpec:
            return replace(best.spec, exclude=tuple(order[:k]))

        lo, hi = 0, len(order)  # k = lo fails; k = hi: the float model, which meets
        while hi - lo > 1 and not stopped:
            mid = (lo + hi) // 2
            (t,) = ask([spec(mid)]) or (None,)
            if t is None:
                break
            if t.met:
                hi = mid
            else:
                lo = mid
        if hi < len(order):
            decisions.append(f"kept the {hi} most sensitive node(s) in float{on} to meet {budget}: "
                             f"{', '.join(order[:hi][:8])}{' ...' if hi > 8 else ''}")
            return [trials[spec(hi).key]]
        decisions.append(f"no INT8 variant{on} with fewer than all {len(order)} nodes in float met {budget}")
        return []

    fp32 = ask(TrialSpec("fp32", threads=t, backend=r) for r in runtimes for t in threads)
    first = threads[0]
    rankings: dict[str, list[dict]] = {}
    for runtime in runtimes:
        if stopped:
            break
        passing = search_int8(runtime)
        if passing and len(threads) > 1 and not stopped:
            s = min(passing, key=lambda t: t.p50_ms).spec  # the fastest passing INT8 variant, every thread count
            ask(replace(s, threads=t) for t in threads if t != first)
    met = [t for t in trials.values() if t.met]
    runoff = _runoff(ctx, root, met, fp32)
    if runoff:
        decisions.append("finalists measured again, interleaved, best p50 of "
                         f"{RUNOFF_ROUNDS} rounds: " + "; ".join(
                             f"{trials[k].spec.label()} {v:.3f} ms" for k, v in sorted(runoff.items(),
                                                                                    key=lambda kv: kv[1])))
        final = {k: replace(trials[k], p50_ms=v) for k, v in runoff.items()}
        # the chosen trial carries its runoff p50: the number the choice was made on
        chosen = _choose([final[t.spec.key] for t in fp32 if t.spec.key in final], list(final.values()), decisions)
    else:
        chosen = _choose(fp32, met, decisions)
    if not stopped:
        stopped = "budget met; more float nodes would only add work" if chosen.spec.precision == "int8" else \
            "FP32 is the fastest variant that meets the budget"
    ranking = rankings.get(chosen.spec.backend) or next(iter(rankings.values()), [])
    result = TuneResult(str(budget), sorted(trials.values(), key=lambda t: t.index), chosen, decisions, ranking,
                        str(root), stopped=stopped, runoff=runoff)
    if output is not None:
        result.artifact = str(write_artifact(result, ctx, source_sha, Path(output)))
    return result


def _runoff(ctx: _Context, root: Path, met: list[Trial], fp32: list[Trial]) -> dict[str, float]:
    """The fastest FP32 trial and the fastest passing others, measured again side by side.

    A trial's p50 comes from one short measurement; on a shared machine two of them taken
    minutes apart differ by more than the gaps being decided. The finalists are measured again,
    interleaved, best p50 of ``RUNOFF_ROUNDS`` rounds; recorded in the run directory so that a
    resumed run decides on the same numbers. Empty when there is nothing to decide.
    """
    best_fp32 = min(fp32, key=lambda t: t.p50_ms)
    others = sorted((t for t in met if t is not best_fp32), key=lambda t: t.p50_ms)[:RUNOFF_FINALISTS - 1]
    finalists = [best_fp32, *others]
    if len(finalists) < 2:
        return {}
    keys = sorted(t.spec.key for t in finalists)
    path = root / "runoff.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("keys") == keys:
                return saved["p50_ms"]
        except (ValueError, KeyError, AttributeError):
            pass
    one = Dataset.from_iterable(ctx.evaluator.feeds[:1])
    built = {t.spec.key: (ctx.build(t.spec), backends.Settings(intra_op_threads=t.spec.threads,
                                                               graph_optimization=t.spec.opt), t.spec.backend)
             for t in finalists}
    best: dict[str, float] = {}
    for _ in range(RUNOFF_ROUNDS):
        for key, (model, settings, backend) in built.items():
            p50 = bench(model, one, backend=backend, settings=settings, warmup=5,
                        time_budget_s=ctx.latency_s).latency_ms.p50
            best[key] = min(best.get(key, float("inf")), p50)
    write_json(path, {"keys": keys, "p50_ms": best})
    return best


def _choose(fp32: list[Trial], met: list[Trial], decisions: list[str]) -> Trial:
    """The fastest trial that met the budget, unless a simpler one is within NOISE of it."""
    simplest = min(fp32, key=lambda t: t.p50_ms)
    fastest = min(met, key=lambda t: t.p50_ms)
    if fastest is simplest:
        int8 = [t for t in met if t.spec.precision == "int8"]
        if int8:
            best8 = min(int8, key=lambda t: t.p50_ms)
            decisions.append(f"chose {simplest.spec.label()}: {simplest.p50_ms:.3f} ms; the fastest INT8 variant "
                             f"that meets the budget takes {best8.p50_ms:.3f} ms "
                             f"({best8.p50_ms / simplest.p50_ms:.2f}x): too small a model, or too little "
                             "8-bit work, for quantization to pay here")
        else:
            decisions.append(f"chose {simplest.spec.label()}: no INT8 variant met the budget")
        return simplest
    if fastest.p50_ms > simplest.p50_ms * (1 - NOISE):
        decisions.append(f"chose {simplest.spec.label()}: {fastest.spec.label()} is only "
                         f"{(1 - fastest.p50_ms / simplest.p50_ms):.1%} faster, within measurement noise "
                         f"({NOISE:.0%})")
        return simplest
    decisions.append(f"chose {fastest.spec.label()}: {fastest.p50_ms:.3f} ms vs FP32 {simplest.p50_ms:.3f} ms "
                     f"({simplest.p50_ms / fastest.p50_ms:.2f}x faster) within the budget")
    return fastest


def _ranking(root: Path, space: QuantSpace, evaluator: Evaluator, method: str, runtime: str) -> list[dict]:
    """The exact sensitivity ranking on ``runtime``, recorded in the run directory for a resumed run."""
    path = root / f"sensitivity-{method}-{runtime}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    r = sensitivity(space, evaluator, mode="exact", backend=runtime)
    ranking = [g.to_dict() for g in r.groups]
    write_json(path, ranking)
    return ranking


def _metric_text(t: Trial, budget: Budget) -> str:
    if budget.check is None:
        return f"user metric {t.metrics.get('user', float('nan')):.4f}"
    v = t.metrics.get(budget.check.metric)
    return f"{budget.check.metric} {v:.4f}" if v is not None else "n/a"


def _source_sha(model: Model) -> str:
    if model.path is not None and Path(model.path).is_file():
        return sha256_file(model.path)
    return hashlib.sha256(model.proto.SerializeToString()).hexdigest()


def _feeds_sha(feeds: list[dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for f in feeds:
        for k in sorted(f):
            h.update(k.encode())
            h.update(np.ascontiguousarray(f[k]).tobytes())
    return h.hexdigest()


def write_artifact(result: TuneResult, ctx: _Context, source_sha: str, output: Path) -> Path:
    from infertune.report import write_report

    chosen = result.chosen
    model = ctx.build(chosen.spec)
    recipe = None
    if chosen.spec.precision == "int8":
        recipe = ctx.space(chosen.spec.method, chosen.spec.target).result(chosen.spec.exclude).recipe.to_dict()
    settings = backends.Settings(intra_op_threads=chosen.spec.threads, graph_optimization=chosen.spec.opt)
    report = ctx.run_dir / "report.html"
    write_report(result, report, source=ctx.source, chosen_model=model, feed=ctx.evaluator.feeds[0],
                 settings=settings, backend=chosen.spec.backend)
    fp32 = result.fp32
    return save_artifact(output, model, source_sha256=source_sha, settings=settings, recipe=recipe,
                         backend=chosen.spec.backend,
                         accuracy={**{k: v for k, v in chosen.metrics.items() if np.isfinite(v)},
                                   "budget": result.budget},
                         latency={"p50_ms": result.p50(chosen), "fp32_p50_ms": result.p50(fp32)},
                         decision=" ".join(result.decisions), extra_files={"report.html": report})
