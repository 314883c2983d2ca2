"""One trial, measured: build the variant, judge its accuracy on its runtime, time it in its own
process (``perf.isolated``: a fresh runtime with nothing else loaded).

Variants: FP32 is the source model, or its prepared graph (``quant.prepare``, made once and checked
on the calibration feeds); INT8 the calibrated space's Q/DQ graph for the runtime's placement (in
the prepared graph when the spec says so); FP16 the source converted by ``quant.fp16.to_fp16``
(float32 I/O, reductions and normalisations kept in float32), built once per run, for runtimes
whose registry entry runs FP16.
On a GPU runtime every compile gets the run's engine and timing caches (``run_settings``), so
evaluating, timing and the runoff reuse one engine build; the artifact records ``settings``,
without them.

The stages are plain functions of plain data (``build_from_recipe``, ``time_variants``, ``finish``)
so that a cluster executor runs the same code on its workers; ``TrialRunner`` runs them here.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from infertune import backends
from infertune._io import write_json
from infertune.analysis.accuracy import Budget, Evaluator, Verdict
from infertune.data import Dataset
from infertune.errors import InfertuneError, InfertuneWarning, UserCodeError
from infertune.model import Model
from infertune.perf.isolated import IsolatedLatency, Variant, time_isolated
from infertune.quant.fp16 import to_fp16
from infertune.quant.prepare import PrepareResult, prepare
from infertune.quant.quantize import rebuild
from infertune.quant.recipe import Recipe
from infertune.quant.space import QuantSpace, calibrated_space
from infertune.search.trials import FLOAT_GRAPH, Trial, TrialSpec

AGREEMENT_DB = 40.0  # FP32 on two runtimes: ~1% relative error at most (they differ by rounding only)


@dataclass
class Measured:
    """A finished trial and the variant's model when it still has to be saved (None: the source
    model, or a model already in the run directory)."""

    trial: Trial
    model: Model | None = None


class TrialRunner:
    """What every trial needs: the source, its prepared graph and the calibrations (one per method,
    placement and graph, made on first use), the evaluator, the budget; ``run_trial`` is what the
    local executor calls. A variant's accuracy does not depend on the thread count it is timed at,
    so it is judged once per model and runtime."""

    def __init__(self, source: Model, calib: Dataset, evaluator: Evaluator, budget: Budget, run_dir: Path,
                 latency_s: float) -> None:
        self.source, self.calib, self.evaluator, self.budget = source, calib, evaluator, budget
        self.run_dir, self.latency_s = run_dir, latency_s
        self.spaces: dict[tuple[str, str, tuple[str, ...], bool], QuantSpace] = {}
        self.verdicts: dict[str, Verdict] = {}
        self._preparation: PrepareResult | None = None
        # every evaluation feed has one size: compile for it, as a deployment feeding that size does
        self.static_shapes = backends.static_shapes(evaluator.feeds)
        self._fp16: Model | None = None

    def preparation(self) -> PrepareResult:
        """The source's prepared float graph (``quant.prepare``), checked on the calibration feeds; made once."""
        if self._preparation is None:
            self._preparation = prepare(self.source, self.calib)
        return self._preparation

    def space(self, method: str, target: str, algorithms: tuple[str, ...] = (), prepared: bool = False) -> QuantSpace:
        """One calibration per method, placement, algorithm set and graph (prepared or not). With
        algorithms, its recipe is kept in the run directory: learned rounding within a time budget need
        not give the same rounding twice, so a resumed run rebuilds the variants its journal measured
        from the recipe."""
        key = (method, target, tuple(algorithms), prepared)
        if key not in self.spaces:
            name = f"{method}-{target}-{'+'.join(algorithms)}{'-prepared' if prepared else ''}"
            path = self.run_dir / "recipes" / f"{name}.recipe.json"
            if algorithms and path.exists():
                self.spaces[key] = QuantSpace(self.source, rebuild(self.source, Recipe.load(path), check_source=False))
            else:
                # statistics gathered on the same float graph serve a set that does not rewrite it: the plain
                # variant's for an algorithm set, another placement's for a plain one (quantize checks that they
                # cover every tensor it observes, else calibrates again)
                plain = self.spaces.get((method, target, (), prepared)) if algorithms else next(
                    (s for (m, _, a, p), s in self.spaces.items() if (m, a, p) == (method, (), prepared)), None)
                self.spaces[key] = calibrated_space(
                    self.source, self.calib, method=method, target=target, settings=self.evaluator.settings,
                    algorithms=algorithms, prepare=prepared, preparation=self.preparation() if prepared else None,
                    calibration=plain.calibrated.calibration if plain else None)
                for w in self.spaces[key].calibrated.warnings:  # NaN left out, constant ranges: say so
                    warnings.warn(f"calibration ({method}, {target}): {w}", InfertuneWarning, stacklevel=2)
                if algorithms:
                    path.parent.mkdir(exist_ok=True)
                    write_json(path, self.spaces[key].calibrated.recipe.to_dict())
        return self.spaces[key]

    def recipe(self, spec: TrialSpec) -> dict | None:
        """The calibration an INT8 spec is built from, as plain data (what a worker rebuilds it with)."""
        if spec.precision != "int8":
            return None
        return self.space(spec.method, spec.target, spec.algorithms, spec.prepared).calibrated.recipe.to_dict()

    def build(self, spec: TrialSpec) -> Model:
        if spec.precision in FLOAT_GRAPH:
            return self.preparation().model if spec.prepared else self.source
        if spec.precision == "fp16":
            return self.fp16_variant()
        return self.space(spec.method, spec.target, spec.algorithms, spec.prepared).build(spec.exclude)

    def fp16_variant(self) -> Model:
        if self._fp16 is None:
            self._fp16 = to_fp16(self.source).model
        return self._fp16

    def run_trial(self, spec: TrialSpec) -> Measured:
        start = time.perf_counter()
        try:
            model = self.build(spec)
            verdict = self.judge(spec, model)
            p50 = self.time([spec], rounds=1, seconds=self.latency_s)[spec.key].p50_ms  # saves the model file it times
        except UserCodeError:
            raise  # the user's metric is broken: that stops the run, it is not this variant's result
        except InfertuneError as e:  # this variant cannot run on this runtime: a result, not a crash
            return Measured(failed(spec, e, time.perf_counter() - start))
        return finish(spec, model is self.source, verdict, p50, time.perf_counter() - start, None)

    def judge(self, spec: TrialSpec, model: Model) -> Verdict:
        """``model``'s verdict on ``spec.backend``; the same model and runtime at another thread count reuses it."""
        key = replace(spec, threads=0).key
        if key not in self.verdicts:
            settings = self.eval_settings(spec)
            if (model is self.evaluator.reference and spec.backend == "ort"
                    and settings == (self.evaluator.settings or backends.Settings())):
                outs = self.evaluator.ref_outputs  # the reference itself, run as the reference was: no second pass
            else:
                outs = self.evaluator.run(model, spec.backend, settings)
            self.verdicts[key] = self.evaluator.judge(outs, self.budget)
        return self.verdicts[key]

    def model_file(self, spec: TrialSpec) -> Path:
        """The file of ``spec``'s model (what a timing process loads)."""
        if self.build(spec) is not self.source:
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

    def time(self, specs: list[TrialSpec], rounds: int, seconds: float) -> dict[str, IsolatedLatency]:
        """p50 on the first evaluation feed, each variant in its own process, alternated in rounds;
        each variant timed for ``seconds`` in all, split evenly over the rounds."""
        variants = [Variant(s.key, self.model_file(s), s.backend, self.run_settings(s)) for s in specs]
        return time_variants(variants, self.evaluator.feeds[0], rounds=rounds, seconds=seconds / rounds)


def build_from_recipe(source: Model, recipe: dict | None, spec: TrialSpec) -> Model:
    """The variant of ``spec`` built on a worker (INT8 from its calibration's recipe): the model
    ``TrialRunner.build`` gives."""
    if spec.precision == "fp16":
        return to_fp16(source).model
    if spec.precision in FLOAT_GRAPH and spec.prepared:
        return prepare(source).model  # deterministic: the graph the run checked on its calibration feeds
    if recipe is None or spec.precision in FLOAT_GRAPH:
        return source
    return QuantSpace(source, rebuild(source, Recipe.from_dict(recipe), check_source=False)).build(spec.exclude)


def finish(spec: TrialSpec, is_source: bool, verdict: Verdict, p50: float, seconds: float,
           model: Model | None) -> Measured:
    """The trial record (index set by the search when it records it) and the model to save."""
    metrics, met, note, rel = verdict.metrics, verdict.met, verdict.note, None
    if spec.precision == "fp32" and spec.backend != backends.DEFAULT:
        met, note = agrees(metrics, met, note)
    if not is_source:
        rel = f"models/{spec.key}.onnx"
    elif spec.precision == "int8":
        # what these exclusions leave cannot run in 8-bit on its own: this is the float model,
        # which does not count as an INT8 variant meeting the budget
        note, met = "nothing left to quantize: the float model", False
    return Measured(Trial(-1, spec, metrics, p50, met, seconds, rel, note), None if is_source else model)


def agrees(metrics: dict[str, float], met: bool, note: str) -> tuple[bool, str]:
    """Another runtime's FP32 is judged against ONNX Runtime's FP32 (the reference): one that
    disagrees cannot be trusted with INT8 either (OpenVINO computed garbage with dynamic dims)."""
    sqnr = metrics.get("sqnr_db", float("inf"))
    if sqnr < AGREEMENT_DB:
        return False, (f"disagrees with ONNX Runtime's FP32: output SQNR {sqnr:.1f} dB < {AGREEMENT_DB:g} dB "
                       f"(cosine {metrics.get('cosine', float('nan')):.5f})")
    return met, note


def failed(spec: TrialSpec, e: Exception, seconds: float) -> Trial:
    return Trial(-1, spec, {}, float("inf"), False, seconds, None, f"failed: {str(e)[:300]}")


def time_variants(variants: list[Variant], feed: dict, *, rounds: int, seconds: float) -> dict[str, IsolatedLatency]:
    """The one place tune times anything (tests replace it with a deterministic clock)."""
    return time_isolated(variants, feed, rounds=rounds, seconds=seconds)


def settings_of(spec: TrialSpec) -> backends.Settings:
    return backends.Settings(intra_op_threads=spec.threads, graph_optimization=spec.opt, options=dict(spec.options))
