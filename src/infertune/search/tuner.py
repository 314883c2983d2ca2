"""tune: the fastest variant of a model that meets an accuracy budget, found by measurement.

The search (``Tuner``), cheapest first:

1. ``measure_fp32``: FP32 on every runtime at every thread count asked for (the reference: it
   always meets the budget; a GPU runtime once, ``runtimes.thread_counts``), and the prepared FP32
   graph (``quant.prepare``: BatchNormalization folded, decomposed activations fused; it reproduces
   FP32's outputs) when preparation changes it;
2. ``search_fp16``: per runtime that runs FP16 (the GPU ones), the FP16 variant (``quant.fp16``);
   ``search_bf16``: per runtime whose CPU computes bf16 in hardware (OpenVINO on AVX512_BF16 / AMX), the
   FP32 graph computed in bf16 (``runtimes.bf16_options``), at every thread count;
   ``search_int8``: per runtime, INT8 placed for that runtime (its registry entry's placement:
   what its graph optimiser fuses or accepts; one calibration per method asked for; in the prepared
   graph where the placement prepares one) with nothing excluded, evaluated on it;
3. if no INT8 variant meets the budget there (runtimes in the order of their full INT8's latency,
   quickest first: what meets the budget on one bounds the search on the slower ones): ``recover``,
   accuracy algorithms with every node still in 8-bit, cheapest first (bias correction, then with
   SmoothQuant, then with equalisation, for a convnet; SmoothQuant, then with bias correction, for a
   transformer: told apart by the op types that dominate the graph), learned rounding on top of the
   best of them only if the budget is still missed; then (``float_fallback``) ``rank`` (the exact
   sensitivity ranking of the best method's groups with the best algorithm set, measured on that runtime: kernels differ
   (their int8 convolutions round and saturate differently); on the first ``RANK_FEEDS`` evaluation
   feeds: a ranking needs each group's output NSR, not a verdict), then ``bisect`` over how many of
   the most sensitive groups stay float, and ``prune``: the float groups that cost most go back to 8-bit
   one at a time where the budget is still met;
4. ``try_leaner``: on OpenVINO, the fastest passing INT8 variant again with int8 without a zero point for
   the ranges padded convolutions read (``placement.LEANER``: faster on some models, less accurate on others),
   kept when it meets the budget; ``other_threads``: the passing INT8 variant at the other thread counts;
   ``try_knobs``: on a GPU runtime, its fastest variant that meets the budget with CUDA graphs
   (``runtimes.knob_options``); ``int8_in_bf16``: where bf16 is native, the fastest passing INT8 variant
   with what it leaves in float computed in bf16;
5. ``decide``: the finalists measured again and the choice (``choice``).

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
``RESAMPLES`` bootstrap resamples of them (``Evaluator.judge``): a variant that passes only by the
luck of which samples were drawn is not chosen.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from infertune import backends
from infertune.analysis.accuracy import Budget, Evaluator
from infertune.data import Dataset, as_dataset
from infertune.deploy.artifact import OWNED, sha256_file
from infertune.errors import UsageError
from infertune.model import Model
from infertune.outputs import Guard
from infertune.quant.algorithms import MEETS_ONLY, check_algorithms, describe, model_family
from infertune.quant.algorithms import ladder as algorithm_ladder
from infertune.quant.placement import LEANER, TARGETS, padded_zero_points
from infertune.search.choice import NOISE, choose, runoff
from infertune.search.executors import Executor, LocalExecutor
from infertune.search.float_fallback import RANK_FEEDS, FloatFallback
from infertune.search.journal import RUN_DIR, Journal, RunLock, claim_run_dir
from infertune.search.measure import Measured, TrialRunner
from infertune.search.result import TuneResult
from infertune.search.runtimes import bf16_options, knob_options, searchable, thread_counts
from infertune.search.trials import Trial, TrialSpec

OnTrial = Callable[[Trial, bool], None]
class Tuner(FloatFallback):
    """One search over one run directory; ``run()`` takes the steps named in the module docstring."""

    def __init__(self, source: Model, calib: Dataset, evaluator: Evaluator, budget: Budget, *, run_dir: Path,
                 threads: Sequence[int], methods: Sequence[str], runtimes: Sequence[str], max_trials: int,
                 time_budget_s: float | None, latency_s: float, executor: Executor | None,
                 on_trial: OnTrial | None, notes: Sequence[str] = (), algorithms: bool = True,
                 prepare: bool = True) -> None:
        self.source, self.evaluator, self.budget = source, evaluator, budget
        self.root = run_dir
        self.threads, self.methods, self.runtimes = list(threads), list(methods), list(runtimes)
        self.max_trials, self.on_trial, self.algorithms = max_trials, on_trial, algorithms
        self.deadline = time.monotonic() + time_budget_s if time_budget_s else None
        self.time_budget_s = time_budget_s
        self.executor = executor or LocalExecutor()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "models").mkdir(exist_ok=True)
        self.source_sha = source_sha(source)
        self.prepare = prepare
        claim_run_dir(self.root, {"source_sha256": self.source_sha, "budget": str(budget),
                                  "threads": self.threads, "methods": self.methods, "runtimes": self.runtimes,
                                  "eval_sha256": feeds_sha(evaluator.feeds),
                                  **({} if algorithms else {"algorithms": False}),
                                  **({} if prepare else {"prepare": False})})
        self.journal = Journal(self.root)
        self.next_index = max((t.index for t in self.journal.done.values()), default=-1) + 1
        self.runner = TrialRunner(source, calib, evaluator, budget, self.root, latency_s)
        self.trials: dict[str, Trial] = {}
        self.decisions: list[str] = list(notes)
        self.stopped = ""
        self.rankings: dict[str, list[dict]] = {}
        self.fp32: list[Trial] = []

    # ---- the steps --------------------------------------------------------------------------------
    def run(self) -> TuneResult:
        self.measure_fp32()
        # every runtime's full INT8 first (the fastest each can be): a runtime's accuracy search then only runs
        # where its full INT8 beats every variant already known to meet the budget, on any runtime
        full = {}
        for runtime in self.runtimes:
            if self.stopped:
                break
            full[runtime] = self.full_int8(runtime)
            self.other_threads([t for t in full[runtime] if t.met])
        for runtime in self.quickest_first(full):
            if self.stopped:
                break
            passing = self.search_fp16(runtime) + self.search_bf16(runtime) + self.search_int8(runtime,
                                                                                          full.get(runtime, []))
            passing += self.try_leaner(passing)
            self.other_threads(passing)
            self.try_knobs(runtime, passing)
            self.int8_in_bf16(runtime, passing)
        return self.decide()

    def quickest_first(self, full: dict[str, list[Trial]]) -> list[str]:
        """The runtimes in the order their accuracy search runs: the one whose full INT8 is quickest first, so
        that what meets the budget there bounds the search on the slower ones (``slower_than_met``): searched
        the other way round, the slower runtime's algorithms and bisection are spent on variants the quicker
        runtime's INT8 may beat anyway."""
        quickest = {r: min((t for t in full.get(r, []) if t.metrics), key=lambda t: t.p50_ms, default=None)
                    for r in self.runtimes}
        # stable: runtimes without an INT8 trial that ran keep the order asked for, after the others
        order = sorted(self.runtimes, key=lambda r: quickest[r].p50_ms if quickest[r] else math.inf)
        if order != self.runtimes:
            timed = [f"{quickest[r].spec.label()} {quickest[r].p50_ms:.3f} ms" for r in order if quickest[r]]
            self.decisions.append(f"searching {backends.runtime(order[0]).display} first, its full INT8 being the "
                                  f"quickest: {'; '.join(timed)}")
        return order

    def measure_fp32(self) -> None:
        specs = [TrialSpec("fp32", threads=t, backend=r) for r in self.runtimes for t in thread_counts(r, self.threads)]
        if self.prepare:
            prep = self.runner.preparation()
            if prep.prepared:
                own = [r for r in self.runtimes if backends.runtime(r).prepares_float]
                specs += [replace(s, prepared=True) for s in specs if s.backend not in own]
                not_on = (f" (not on {', '.join(backends.runtime(r).display for r in own)}, whose compiler folds "
                          "and fuses the same itself)") if own else ""
                self.decisions.append(f"{prep.summary()} (outputs within {prep.max_rel_error or 0:.1e} of FP32's, "
                                      f"relative); the prepared FP32 graph is a candidate{not_on}, INT8 is placed "
                                      "in it")
            elif prep.refused:
                self.decisions.append(prep.summary())
        self.fp32 = self.ask(specs)

    def prepared(self, target: str) -> bool:
        """INT8 for ``target`` is placed in the prepared graph (tune's ``prepare`` and the placement's default)."""
        return self.prepare and TARGETS[target].prepare and self.runner.preparation().prepared

    def search_fp16(self, runtime: str) -> list[Trial]:
        """The FP16 variant on a runtime that runs FP16 (and whose FP32 agrees with ONNX Runtime's)."""
        fp32 = [t for t in self.fp32 if t.spec.backend == runtime]
        if not backends.runtime(runtime).fp16 or self.stopped or (fp32 and not any(t.met for t in fp32)):
            return []
        spec = TrialSpec("fp16", threads=thread_counts(runtime, self.threads)[0], backend=runtime)
        return [t for t in self.ask([spec]) if t.met]

    def search_bf16(self, runtime: str) -> list[Trial]:
        """The FP32 graph computed in bf16, at every thread count, on a runtime whose CPU computes bf16 in hardware
        (``runtimes.bf16_options``; and whose FP32 agrees with ONNX Runtime's). Searched before INT8: where it
        meets the budget, an INT8 variant must beat it (``slower_than_met``)."""
        fp32 = [t for t in self.fp32 if t.spec.backend == runtime]
        if self.stopped or not bf16_options(runtime) or (fp32 and not any(t.met for t in fp32)):
            return []
        trials = self.ask(TrialSpec("bf16", threads=t, backend=runtime) for t in thread_counts(runtime, self.threads))
        if trials:
            best = min(trials, key=lambda t: t.p50_ms)
            self.decisions.append(f"the CPU computes bf16 in hardware: {best.spec.label()} {best.p50_ms:.3f} ms, "
                                  f"{metric_text(best, self.budget)}, {'meets' if best.met else 'misses'} "
                                  f"{self.budget}")
        return [t for t in trials if t.met]

    def int8_in_bf16(self, runtime: str, passing: list[Trial]) -> None:
        """The fastest passing INT8 variant on ``runtime`` with what it leaves in float computed in bf16 (as
        TensorRT builds INT8 with FP16 allowed), where the CPU computes bf16 in hardware."""
        options = bf16_options(runtime)
        int8 = [t for t in passing if t.spec.precision == "int8" and t.spec.backend == runtime]
        if options and int8 and not self.stopped:
            s = min(int8, key=lambda t: t.p50_ms).spec
            self.ask([replace(s, options={**dict(s.options), **options})])

    def try_knobs(self, runtime: str, passing: list[Trial]) -> None:
        """The fastest variant on ``runtime`` that met the budget, with each of its knobs set."""
        options = knob_options(runtime)
        met = passing + [t for t in self.fp32 if t.spec.backend == runtime and t.met]
        if options and met and not self.stopped:
            s = min(met, key=lambda t: t.p50_ms).spec
            self.ask(replace(s, options={**dict(s.options), **o}) for o in options)

    def full_int8(self, runtime: str) -> list[Trial]:
        """INT8 on ``runtime`` with every node quantized, one trial per method ([] where it has no INT8
        placement, or its FP32 disagrees with ONNX Runtime's)."""
        if not backends.runtime(runtime).placement:
            return []
        fp32 = [t for t in self.fp32 if t.spec.backend == runtime]
        if fp32 and not any(t.met for t in fp32):
            self.decisions.append(f"{backends.runtime(runtime).display}'s FP32 outputs do not meet {self.budget} "
                                  f"against ONNX Runtime's ({fp32[0].note or metric_text(fp32[0], self.budget)}): "
                                  "its INT8 numbers cannot be trusted, not tried")
            return []
        threads = thread_counts(runtime, self.threads)[0]
        target = backends.runtime(runtime).placement
        int8 = self.ask(TrialSpec("int8", method=m, threads=threads, backend=runtime,
                                  prepared=self.prepared(target)) for m in self.methods)
        self.say_weight_bits(runtime, target)
        if int8 and not any(t.metrics for t in int8):  # a failed trial has no metrics
            self.decisions.append(f"no INT8 variant{backends.runtime(runtime).on()} could be built or run: "
                                  f"{int8[0].note}")
        return int8

    def search_int8(self, runtime: str, int8: list[Trial]) -> list[Trial]:
        """INT8 on ``runtime`` from its full-INT8 trials ``int8``: those that meet the budget; else, where the
        fastest of them beats every variant known to meet it, accuracy algorithms, then bisection over its
        ranking."""
        on = backends.runtime(runtime).on()
        passing = [t for t in int8 if t.met]
        ran = [t for t in int8 if t.metrics]
        if passing or not ran or self.stopped:
            return passing
        best = max(ran, key=lambda t: t.metrics.get("sqnr_db", -math.inf))
        slower = self.slower_than_met(min(ran, key=lambda t: t.p50_ms))
        if slower:  # nodes kept in float only add work: nothing here can beat what already meets the budget
            self.decisions.append(f"no INT8 variant{on} met {self.budget} with every node quantized, and even that "
                                  f"one is no faster than a variant that does ({'; '.join(slower)}): not ranking "
                                  "its nodes")
            return []
        best = self.recover(runtime, best)
        if best.met or self.stopped:
            return [best] if best.met else []
        self.decisions.append(f"no INT8 variant{on} met {self.budget} with every node quantized (best: "
                              f"{best.spec.label()}, {metric_text(best, self.budget)}); ranking "
                              f"its nodes by sensitivity{on} (exact, on the first {RANK_FEEDS} evaluation inputs)")
        return self.bisect(best, self.rank(runtime, best))

    def say_weight_bits(self, runtime: str, target: str) -> None:
        """Which weights quantize gave 7 bits on this runtime, when it chose per layer (a CPU without VNNI)."""
        prepared = self.prepared(target)
        spaces = [self.runner.spaces.get((m, target, (), prepared)) for m in self.methods]
        space = next((s for s in spaces if s is not None), None)  # a Ray run calibrates on its workers
        if space is not None and isinstance(space.calibrated.recipe.weight_reduce_range, frozenset):
            self.decisions.append(f"INT8{backends.runtime(runtime).on()} weights: {space.calibrated.weight_bits()} "
                                  "(no VNNI: the int8 kernels add u8 x s8 pairs in 16 bits)")

    def slower_than_met(self, quickest: Trial) -> list[str]:
        """Why ``quickest`` (every node in 8-bit: the fastest its method can be) cannot beat the fastest variant
        that meets the budget (FP32, or INT8 on another runtime), one line per thread count tune searches, or []
        when it is faster at one of them. Timed at the other thread counts only when it is no faster at its own
        (8-bit kernels may scale differently)."""
        why = []
        for n in thread_counts(quickest.spec.backend, self.threads):
            met = [t for t in self.trials.values() if t.met and t.spec.threads == n]
            floor = min(met, key=lambda t: t.p50_ms, default=None)
            at = quickest if n == quickest.spec.threads else \
                next(iter(self.ask([replace(quickest.spec, threads=n)])), None)
            if at is None or not at.metrics or floor is None:
                continue  # not run (trial budget) or failed, or nothing at n meets it: no evidence either way
            if at.p50_ms < floor.p50_ms:
                return []
            why.append(f"{at.p50_ms:.3f} ms vs {floor.p50_ms:.3f} ms for {floor.spec.label()}")
        return why

    def recover(self, runtime: str, best: Trial) -> Trial:
        """Accuracy algorithms on ``best`` with every node still in 8-bit, cheapest first; each step's
        alternatives on top of the best so far, the best of them kept (those with an algorithm of
        ``MEETS_ONLY`` only when they meet the budget). Returns the best INT8 trial."""
        if not self.algorithms:
            return best
        family = model_family(self.source)
        for step in algorithm_ladder(family):
            base = best
            for algos in step:
                spec = replace(base.spec, algorithms=check_algorithms([*base.spec.algorithms, *algos]))
                (t,) = self.ask([spec]) or (None,)
                if t is None:
                    return best
                self.decisions.append(self.algorithm_text(family, base, t))
                if t.met:
                    return t
                held = MEETS_ONLY & set(algos)
                if held:
                    self.decisions[-1] += f"; {describe(sorted(held))} is kept only where it meets"
                elif t.metrics and score(t, self.budget) > score(best, self.budget):
                    best = t
        return best

    def algorithm_text(self, family: str, before: Trial, after: Trial) -> str:
        """Which algorithms bought how much of the budget's metric, at what cost."""
        added = [a for a in after.spec.algorithms if a not in before.spec.algorithms]
        on = backends.runtime(after.spec.backend).on()
        lat = f"; p50 {before.p50_ms:.3f} -> {after.p50_ms:.3f} ms" if \
            abs(after.p50_ms - before.p50_ms) > NOISE * before.p50_ms else ""
        space = self.runner.spaces.get((after.spec.method, after.spec.target, after.spec.algorithms))
        steps = ", ".join(f"{r['name']} {r.get('seconds', 0):.1f} s" for r in space.calibrated.recipe.algorithms
                          if r["name"] in added) if space else ""
        verdict = "meets" if after.met else "misses" if after.metrics else f"failed ({after.note})"
        value = metric_text(after, self.budget).split()[-1] if after.metrics else "n/a"
        return (f"{describe(added)} ({family}; on top of {describe(before.spec.algorithms)}){on}: "
                f"{metric_text(before, self.budget)} -> {value}, {verdict} {self.budget}; cost "
                f"{after.seconds:.1f} s for the trial{f' ({steps})' if steps else ''}{lat}")

    def try_leaner(self, passing: list[Trial]) -> list[Trial]:
        """The fastest passing INT8 variant again, placed with fewer zero points (``placement.LEANER``: int8
        without a zero point for the ranges padded convolutions read), where its model reads any through a zero
        point: [that trial] when it meets the budget. A per-model trade (benchmarks/results/zero_point.md:
        YOLOv8n 16% faster for 0.8 points of box F1, rapidocr's recognizer 5% faster for 15 points of text)."""
        int8 = [t for t in passing if t.spec.precision == "int8" and t.spec.target in LEANER]
        if not int8 or self.stopped:
            return []
        best = min(int8, key=lambda t: t.p50_ms)
        space = self.runner.space(best.spec.method, best.spec.target, best.spec.algorithms, best.spec.prepared)
        n = padded_zero_points(space.build(best.spec.exclude))
        if not n:
            return []
        (t,) = self.ask([replace(best.spec, target=LEANER[best.spec.target])]) or (None,)
        if t is None:
            return []
        after = metric_text(t, self.budget) if t.metrics else t.note
        self.decisions.append(f"fewer zero points{backends.runtime(best.spec.backend).on()}: {best.spec.label()} "
                              f"again with its {n} padded convolution(s) reading int8 without a zero point "
                              f"({LEANER[best.spec.target]}): {metric_text(best, self.budget)} -> {after}, "
                              f"{'meets' if t.met else 'misses'} {self.budget}; p50 {best.p50_ms:.3f} -> "
                              f"{t.p50_ms:.3f} ms")
        return [t] if t.met else []

    def other_threads(self, passing: list[Trial]) -> None:
        """The fastest passing INT8 variant at every other thread count (a BF16 variant is measured at each already,
        and must not stand in for the INT8 one: rec's BF16 at 1 thread was faster than its INT8, which then went
        untimed at 2 threads)."""
        int8 = [t for t in passing if t.spec.precision == "int8"]
        if int8 and len(thread_counts(int8[0].spec.backend, self.threads)) > 1 and not self.stopped:
            s = min(int8, key=lambda t: t.p50_ms).spec
            self.ask(replace(s, threads=t) for t in self.threads if t != self.threads[0])

    def decide(self) -> TuneResult:
        met = [t for t in self.trials.values() if t.met]
        runoff_latency = runoff(self.runner, self.root, met, self.fp32)
        measured = {k: v["p50_ms"] for k, v in runoff_latency.items()}
        if measured:
            self.decisions.append(
                "finalists measured again, each in its own process, alternated, median of rounds (spread): " +
                "; ".join(f"{self.trials[k].spec.label()} {v:.3f} ms ({runoff_latency[k]['spread']:.0%})"
                          for k, v in sorted(measured.items(), key=lambda kv: kv[1])))
            final = {k: replace(self.trials[k], p50_ms=v) for k, v in measured.items()}
            # the chosen trial carries its runoff p50: the number the choice was made on
            chosen = choose([final[t.spec.key] for t in self.fp32 if t.spec.key in final], list(final.values()),
                            self.decisions, str(self.budget))
        else:
            chosen = choose(self.fp32, met, self.decisions, str(self.budget))
        if not self.stopped:
            self.stopped = {"int8": "budget met; more float nodes would only add work",
                            "fp16": "budget met by the FP16 variant",
                            "bf16": "budget met by the FP32 graph computed in bf16, faster than any INT8 variant "
                                    "that meets it"}.get(
                chosen.spec.precision, "FP32 is the fastest variant that meets the budget")
        ranking = self.rankings.get(chosen.spec.backend) or next(iter(self.rankings.values()), [])
        return TuneResult(str(self.budget), sorted(self.trials.values(), key=lambda t: t.index), chosen,
                          self.decisions, ranking, str(self.root), stopped=self.stopped, runoff=measured,
                          runoff_rounds={k: v["rounds_ms"] for k, v in runoff_latency.items()})

    # ---- trials -----------------------------------------------------------------------------------
    def ask(self, specs: Iterable[TrialSpec]) -> list[Trial]:
        """The trials of ``specs``: recorded ones reused, the others run (within the trial and time budgets)."""
        specs = list(dict.fromkeys(specs))
        todo = []
        for s in specs:
            if s.key in self.journal.done:
                self.trials[s.key] = self.journal.done[s.key]
                if self.on_trial:
                    self.on_trial(self.trials[s.key], True)
            else:
                todo.append(s)
        room = self.max_trials - len(self.trials)
        if len(todo) > room:
            self.stopped = self.stopped or f"max trials ({self.max_trials}) reached"
            todo = todo[:max(room, 0)]
        if self.deadline is not None and time.monotonic() > self.deadline and todo:
            self.stopped = self.stopped or f"time budget ({self.time_budget_s:g} s) spent"
            todo = []
        for measured in self.executor.run(self.runner, todo):
            self.record(measured)
        return [self.trials[s.key] for s in specs if s.key in self.trials]

    def record(self, measured: Measured) -> None:
        """A finished trial: its model saved, then its line in the journal (here, in the driver only)."""
        t = replace(measured.trial, index=self.next_index)
        self.next_index += 1
        if measured.model is not None and t.model_file:
            measured.model.save(self.root / t.model_file)
        self.journal.add(t)
        self.trials[t.spec.key] = t
        if self.on_trial:
            self.on_trial(t, False)


def tune(model: Model | str | os.PathLike[str], calib: Dataset | Iterable[dict], evaluator: Evaluator,
         budget: Budget, *,
         run_dir: str | os.PathLike[str], threads: Sequence[int] = (0,), methods: Sequence[str] = ("auto",),
         runtimes: Sequence[str] = ("ort",),
         max_trials: int = 40, time_budget_s: float | None = None, latency_s: float = 1.0,
         executor: Executor | None = None, on_trial: OnTrial | None = None,
         output: str | os.PathLike[str] | None = None, force: bool = False,
         notes: Sequence[str] = (), algorithms: bool = True, prepare: bool = True) -> TuneResult:
    """Search (see the module docstring); with ``output``, write the artifact there (replacing a
    previous artifact only with ``force``). One tune at a time holds ``run_dir`` (``RunLock``). ``notes``
    open the decision log (what was done to the model or data before the search, e.g. inputs fixed).
    ``algorithms``: try the accuracy algorithms before keeping nodes in float. ``prepare=False``: no
    prepared graph (neither the FP32 candidate nor INT8 placed in it)."""
    if not threads or not methods or not runtimes:
        raise UsageError("tune needs at least one thread count, calibration method and runtime")
    for r in runtimes:
        searchable(r)
        backends.get_backend(r)  # not installed: a clear error before any trial
    if max_trials < 1:
        raise UsageError(f"max_trials must be >= 1, got {max_trials}")
    source = model if isinstance(model, Model) else Model.load(model)
    guard = Guard.of(source.path)  # refused outputs fail now, not after the search
    output = None if output is None else guard.directory(output, OWNED, force=force)
    with RunLock(guard.directory(run_dir, RUN_DIR, what="run directory")):
        tuner = Tuner(source, as_dataset(calib), evaluator, budget, run_dir=Path(run_dir), threads=threads,
                      methods=methods, runtimes=runtimes, max_trials=max_trials, time_budget_s=time_budget_s,
                      latency_s=latency_s, executor=executor, on_trial=on_trial, notes=notes,
                      algorithms=algorithms, prepare=prepare)
        result = tuner.run()
        if output is not None:
            from infertune.search.output import write_artifact

            result.artifact = str(write_artifact(result, tuner.runner, tuner.source_sha, output, force=force))
    return result


def metric_text(t: Trial, budget: Budget) -> str:
    if budget.check is None:
        return f"{budget.name} {t.metrics.get('user', float('nan')):.4f}"
    v = t.metrics.get(budget.check.metric)
    return f"{budget.check.metric} {v:.4f}" if v is not None else "n/a"


def score(t: Trial, budget: Budget) -> float:
    """The budget's metric of ``t``, higher is better (a drop is negated)."""
    if budget.check is None:
        v = t.metrics.get("user", math.nan)
        return -math.inf if not math.isfinite(v) else (-v if budget.fn_max is not None else v)
    v = t.metrics.get(budget.check.metric, math.nan)
    return -math.inf if not math.isfinite(v) else (-v if budget.check.op.startswith("<") else v)


def source_sha(model: Model) -> str:
    if model.path is not None and Path(model.path).is_file():
        return sha256_file(model.path)
    return hashlib.sha256(model.proto.SerializeToString()).hexdigest()


def feeds_sha(feeds: list[dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for f in feeds:
        for k in sorted(f):
            h.update(k.encode())
            h.update(np.ascontiguousarray(f[k]).tobytes())
    return h.hexdigest()
