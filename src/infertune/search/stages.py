"""A trial cut into stages that a cluster executor runs on its workers, as plain functions of plain
data: model bytes, feeds, a recipe (the calibration as JSON-able data), a ``Budget`` whose user
metric travels as a file path (``usercode.UserFunction``), never as pickled code.

``build`` (the variant, from the source and its calibration's recipe), ``reference`` and
``evaluate`` (the float model's and the variant's outputs on one shard of the evaluation set, and
the per-sample sums of that shard), ``judge`` (the shards' sums joined in order: the verdict the
whole set gives, bootstrap included; a user metric is imported by path and called here), ``time_variant``
(p50 of one feed). A stage that hits an error of the variant returns ``Failed`` instead of raising,
so that the cluster does not retry it; ``Failed.stop`` marks one that must end the run (the user's
code is broken, or a worker runs another infertune).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from infertune import backends
from infertune.analysis.accuracy import Budget, PerSample, Verdict, judge_samples
from infertune.errors import InfertuneError, UsageError, UserCodeError
from infertune.model import Model
from infertune.perf.isolated import Variant
from infertune.search.measure import build_from_recipe, time_variants
from infertune.search.trials import TrialSpec

Feed = dict[str, np.ndarray]


@dataclass
class Failed:
    error: InfertuneError
    stop: bool = False


@dataclass
class Shard:
    """One shard's per-sample sums, and its outputs when a user metric needs them."""

    per: PerSample
    outputs: list[dict[str, np.ndarray]] | None


def model_from(data: bytes) -> Model:
    return Model.from_proto(onnx.load_model_from_string(data), check=False)


def guarded(fn):
    def run(*args):
        for a in args:
            if isinstance(a, Failed):
                return a  # an earlier stage of this trial failed: pass it on
        try:
            return fn(*args)
        except UserCodeError as e:
            return Failed(e, stop=True)
        except InfertuneError as e:
            return Failed(e)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


@guarded
def build(source: bytes, recipe: dict | None, spec: dict, version: str) -> bytes | None:
    """The variant's model bytes; None when it is the source model itself."""
    from infertune.fingerprint import versions

    here = versions().get("infertune", "?")
    if here != version:
        return Failed(UsageError(f"a Ray worker runs infertune {here}, the driver {version}: install the same "
                                 "version on every node"), stop=True)
    src = model_from(source)
    model = build_from_recipe(src, recipe, TrialSpec.from_dict(spec))
    return None if model is src else model.to_bytes()


@guarded
def reference(source: bytes, feeds: list[Feed], settings: backends.Settings) -> list[dict[str, np.ndarray]]:
    runner = backends.compile(model_from(source), settings)
    return [runner.run(f) for f in feeds]


@guarded
def evaluate(source: bytes, variant: bytes | None, feeds: list[Feed], refs: list[dict[str, np.ndarray]],
             spec: dict, settings: backends.Settings, keep: bool) -> Shard:
    runner = backends.compile(model_from(variant if variant is not None else source), settings,
                              backend=TrialSpec.from_dict(spec).backend)
    outs = [runner.run(f) for f in feeds]
    return Shard(PerSample.measure(refs, outs), outs if keep else None)


@guarded
def judge(budget: Budget, labels: np.ndarray | None, count: int, *parts) -> Verdict:
    """``parts``: ``count`` shards, then (with a function budget) as many reference shards and as many
    feed shards."""
    shards, refs, feeds = parts[:count], parts[count:2 * count], parts[2 * count:]
    per = PerSample.concat([s.per for s in shards])
    if budget.fn is None:
        return judge_samples(per, labels, budget)
    outs = [o for s in shards for o in s.outputs]
    return judge_samples(per, labels, budget, [r for part in refs for r in part], outs,
                         [f for part in feeds for f in part])


@guarded
def time_variant(source: bytes, variant: bytes | None, feed: Feed, spec: dict, seconds: float,
                 settings: backends.Settings) -> float:
    """p50 of one feed, the variant in a process of its own (as tune times locally), with ``settings``
    (the trial's ``TrialRunner.run_settings``)."""
    s = TrialSpec.from_dict(spec)
    with tempfile.TemporaryDirectory(prefix="infertune-time-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(variant if variant is not None else source)
        return time_variants([Variant(s.key, path, s.backend, settings)], feed, rounds=1, seconds=seconds)[s.key].p50_ms
