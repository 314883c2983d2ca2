"""The artifact of a tune run: the chosen model with its manifest, and the report.

What the report shows beyond the trials is measured here, once the choice is made, and handed
to the report as data: per-op-type time of FP32 and of the chosen variant (on a runtime with a
per-node profiler), and throughput over batch and threads for the chosen variant.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from infertune import backends
from infertune.data import Dataset
from infertune.deploy.artifact import save_artifact
from infertune.model import Model, batch_problem
from infertune.perf.profile import profile
from infertune.perf.sweep import sweep
from infertune.report import write_report
from infertune.search.measure import TrialRunner
from infertune.search.result import TuneResult

SWEEP_BATCHES = (1, 4, 16)


def write_artifact(result: TuneResult, runner: TrialRunner, source_sha: str, output: Path,
                   force: bool = False) -> Path:
    chosen = result.chosen
    model = runner.build(chosen.spec)
    recipe = None
    if chosen.spec.precision == "int8":
        space = runner.space(chosen.spec.method, chosen.spec.target, chosen.spec.algorithms, chosen.spec.prepared)
        recipe = space.result(chosen.spec.exclude).recipe.to_dict()
    settings = runner.settings(chosen.spec)  # what the artifact records (a GPU run's engine cache is not)
    result.measurements = measure_for_report(result, runner.source, model, runner.evaluator.feeds[0],
                                             runner.run_settings(chosen.spec), chosen.spec.backend)
    if result.measurements.get("sweep_note"):
        result.decisions.append(f"throughput sweep over threads only: {result.measurements['sweep_note']}")
    report = write_report(result.to_dict(), runner.run_dir / "report.html")
    return save_artifact(output, model, source_sha256=source_sha, settings=settings, recipe=recipe,
                         backend=chosen.spec.backend,
                         accuracy={**{k: v for k, v in chosen.metrics.items() if np.isfinite(v)},
                                   "budget": result.budget},
                         latency={"p50_ms": result.p50(chosen), "fp32_p50_ms": result.p50(result.fp32)},
                         decision=" ".join(result.decisions), extra_files={"report.html": report}, force=force)


def measure_for_report(result: TuneResult, source: Model, chosen: Model, feed: dict[str, np.ndarray],
                       settings: backends.Settings, backend: str, profile_runs: int = 30,
                       sweep_seconds: float = 0.3) -> dict:
    """Per-op-type time (FP32, and the chosen variant when its runtime has a per-node profiler) and
    throughput over batch x threads of the chosen variant on its runtime."""
    one = Dataset.from_iterable([feed])
    ops: dict[str, dict[str, float]] = {"chosen": {}}
    for label, m in (("fp32", source), ("chosen", chosen)):
        runtime = backends.DEFAULT if label == "fp32" else backend
        if not backends.runtime(runtime).profiles:
            continue
        p = profile(m, one, settings=backends.fit_settings(runtime, settings), runs=profile_runs, backend=runtime)
        ops[label] = {o.op_type: o.mean_us for o in p.op_types}
    problem = batch_problem(chosen)
    batches = [1] if problem else list(SWEEP_BATCHES)
    threads = sorted({t.spec.threads for t in result.trials if t.spec.backend == backend}) or [
        settings.intra_op_threads]
    # the sweep asks what other batch sizes would give: the model keeps its dynamic dims there
    sw = sweep(chosen, Dataset.from_iterable([feed] * max(batches)), {"batch": batches, "threads": threads},
               settings=replace(settings, static_shapes={}), seconds=sweep_seconds, backend=backend)
    return {"op_types": ops, "sweep": sw.to_dict(), "profiled_on": backends.DEFAULT, "backend": backend,
            "sweep_note": f"no batch axis in the sweep: it cannot be inferred ({problem})" if problem else None}
