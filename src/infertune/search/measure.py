"""One trial, measured: build the variant, judge its accuracy on its runtime, time it in its own
process (``perf.isolated``: a fresh runtime with nothing else loaded).

Variants: FP32 is the source model; INT8 the calibrated space's Q/DQ graph for the runtime's
placement; FP16 the source converted by ``quant.fp16.to_fp16`` (float32 I/O, reductions and
normalisations kept in float32), built once per run, for runtimes whose registry entry runs FP16.
On a GPU runtime every compile gets the run's engine and timing caches (``run_settings``), so
evaluating, timing and the runoff reuse one engine build; the artifact records ``settings``,
without them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path

from infertune import backends
from infertune.analysis.accuracy import Budget, Evaluator
from infertune.data import Dataset
from infertune.errors import InfertuneError, InfertuneWarning
from infertune.model import Model
from infertune.perf.isolated import IsolatedLatency, Variant, time_isolated
from infertune.quant.fp16 import to_fp16
from infertune.quant.space import QuantSpace, calibrated_space
from infertune.search.trials import Trial, TrialSpec

AGREEMENT_DB = 40.0  # FP32 on two runtimes: ~1% relative error at most (they differ by rounding only)


class TrialRunner:
    """What every trial needs: the source, the calibrations (one per method and placement, made
    on first use), the evaluator, the budget; ``run_trial`` is what an executor calls."""

    def __init__(self, source: Model, calib: Dataset, evaluator: Evaluator, budget: Budget, run_dir: Path,
                 latency_s: float, first_index: int = 0) -> None:
        self.source, self.calib, self.evaluator, self.budget = source, calib, evaluator, budget
        self.run_dir, self.latency_s = run_dir, latency_s
        self.spaces: dict[tuple[str, str], QuantSpace] = {}
        self.next_index = first_index
        # every evaluation feed has one size: compile for it, as a deployment feeding that size does
        self.static_shapes = backends.static_shapes(evaluator.feeds)
        self._fp16: Model | None = None

    def space(self, method: str, target: str) -> QuantSpace:
        if (method, target) not in self.spaces:
            self.spaces[method, target] = calibrated_space(self.source, self.calib, method=method, target=target,
                                                           settings=self.evaluator.settings)
            for w in self.spaces[method, target].calibrated.warnings:  # NaN left out, constant ranges: say so
                warnings.warn(f"calibration ({method}, {target}): {w}", InfertuneWarning, stacklevel=2)
        return self.spaces[method, target]

    def build(self, spec: TrialSpec) -> Model:
        if spec.precision == "fp32":
            return self.source
        if spec.precision == "fp16":
            return self.fp16_variant()
        return self.space(spec.method, spec.target).build(spec.exclude)

    def fp16_variant(self) -> Model:
        if self._fp16 is None:
            self._fp16 = to_fp16(self.source).model
        return self._fp16

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
        verdict = self.evaluator.judge(self.evaluator.run(model, spec.backend, self.eval_settings(spec)), self.budget)
        rel, metrics, met, note = None, verdict.metrics, verdict.met, verdict.note
        if spec.precision == "fp32" and spec.backend != backends.DEFAULT:
            met, note = self._agrees(metrics, met, note, spec.backend)
        if model is not self.source:
            rel = f"models/{spec.key}.onnx"
            model.save(self.run_dir / rel)
        elif spec.precision == "int8":
            # what these exclusions leave cannot run in 8-bit on its own: this is the float model,
            # which does not count as an INT8 variant meeting the budget
            note, met = "nothing left to quantize: the float model", False
        lat = self.time([spec], rounds=1)[spec.key]
        return Trial(self._next(), spec, metrics, lat.p50_ms, met, time.perf_counter() - start, rel, note)

    @staticmethod
    def _agrees(metrics: dict[str, float], met: bool, note: str, backend: str) -> tuple[bool, str]:
        """Another runtime's FP32 is judged against ONNX Runtime's FP32 (the reference): one that
        disagrees cannot be trusted with INT8 either (OpenVINO computed garbage with dynamic dims)."""
        sqnr = metrics.get("sqnr_db", float("inf"))
        if sqnr < AGREEMENT_DB:
            return False, (f"disagrees with ONNX Runtime's FP32: output SQNR {sqnr:.1f} dB < {AGREEMENT_DB:g} dB "
                           f"(cosine {metrics.get('cosine', float('nan')):.5f})")
        return met, note

    def model_file(self, spec: TrialSpec) -> Path:
        """The file of ``spec``'s model (what a timing process loads)."""
        if spec.precision != "fp32" and self.build(spec) is not self.source:
            path = self.run_dir / "models" / f"{spec.key}.onnx"
            if not path.is_file():
                self.build(spec).save(path)
            return path
        if self.source.path is not None and Path(self.source.path).is_file():
            return Path(self.source.path)
        path = self.run_dir / "models" / "source.onnx"
        if not path.is_file():
            self.source.save(path)
        return path

    def settings(self, spec: TrialSpec) -> backends.Settings:
        """How ``spec``'s variant is compiled: its threads, level and knobs, for the feeds' static shapes."""
        return replace(settings_of(spec), static_shapes=self.static_shapes)

    def run_settings(self, spec: TrialSpec) -> backends.Settings:
        """``settings`` plus, on a GPU runtime, the run's engine and timing caches."""
        s = self.settings(spec)
        if not backends.runtime(spec.backend).gpu:
            return s
        cache = {"engine_cache": str(self.run_dir / "engines"), "timing_cache": str(self.run_dir / "timing.cache")}
        return replace(s, options={**cache, **s.options})

    def eval_settings(self, spec: TrialSpec) -> backends.Settings:
        """The evaluator's settings (its threads) with ``spec``'s knobs and caches, as its runtime takes them."""
        base = self.evaluator.settings or backends.Settings()
        return backends.fit_settings(spec.backend, replace(base, options={**base.options,
                                                                           **self.run_settings(spec).options}))

    def time(self, specs: list[TrialSpec], rounds: int) -> dict[str, IsolatedLatency]:
        """p50 on the first evaluation feed, each variant in its own process, alternated in rounds."""
        variants = [Variant(s.key, self.model_file(s), s.backend, self.run_settings(s)) for s in specs]
        return time_variants(variants, self.evaluator.feeds[0], rounds=rounds, seconds=self.latency_s)


def time_variants(variants: list[Variant], feed: dict, *, rounds: int, seconds: float) -> dict[str, IsolatedLatency]:
    """The one place tune times anything (tests replace it with a deterministic clock)."""
    return time_isolated(variants, feed, rounds=rounds, seconds=seconds)


def settings_of(spec: TrialSpec) -> backends.Settings:
    return backends.Settings(intra_op_threads=spec.threads, graph_optimization=spec.opt, options=dict(spec.options))
