"""``quantize(model, data)``: graph preparation, placement, streaming calibration, ranges, Q/DQ,
recipe, stability.

``rebuild(model, recipe)`` makes the same model again from a recipe without any data (preparing
the graph again when the recipe says it was prepared: the rewrite is deterministic).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from infertune import backends
from infertune.data import Dataset, as_dataset
from infertune.errors import CalibrationError, ModelError, UsageError
from infertune.fingerprint import cpu, versions
from infertune.model import Model
from infertune.quant import pair_overflow
from infertune.quant.algorithms import AlgorithmOptions, Context, check_algorithms, summarize
from infertune.quant.algorithms import replay as replay_algorithms
from infertune.quant.algorithms import run as run_algorithms
from infertune.quant.algorithms.base import STAGES
from infertune.quant.calibrate import CalibrationResult, Progress, calibrate
from infertune.quant.methods import (
    DEFAULT_PERCENTILE,
    METHODS,
    NEEDS_HISTOGRAM,
    MethodOverrides,
    RangeChoice,
    choose_range,
)
from infertune.quant.observers import DEFAULT_BINS
from infertune.quant.placement import TARGETS, Exclusions, QuantPlan, candidate_tensors, padded_conv_inputs, plan
from infertune.quant.prepare import PrepareResult
from infertune.quant.prepare import prepare as prepare_graph
from infertune.quant.qdq import ensure_opset, write_qdq
from infertune.quant.qparams import QParams
from infertune.quant.recipe import Recipe, model_sha256
from infertune.quant.stability import DEFAULT_THRESHOLD, StabilityReport, stability

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass
class QuantizeResult:
    model: Model
    recipe: Recipe
    plan: QuantPlan
    calibration: CalibrationResult | None = None
    stability: StabilityReport | None = None
    warnings: list[str] = field(default_factory=list)
    preparation: PrepareResult | None = None

    @property
    def float_model(self) -> Model | None:
        """The prepared float graph the Q/DQ were placed in (None: the source as it was)."""
        return self.preparation.model if self.preparation and self.preparation.prepared else None

    def used_tensors(self) -> dict[str, dict]:
        """Recipe entries of the tensors this model quantizes (the recipe also keeps the others)."""
        return _used(self.recipe)

    def weight_bits(self) -> str:
        """'8-bit', '7-bit', or how many weights got 7 bits because their int16 pair sums overflow."""
        r = self.recipe.weight_reduce_range
        if isinstance(r, bool):
            return "7-bit" if r else "8-bit"
        weights = {w.tensor for w in self.plan.weights}
        n = len(r & weights)
        return (f"7-bit for {n} of {len(weights)} weights (their int16 pair sums overflow), 8-bit for the rest" if n
                else "8-bit: no int16 pair sum overflows")

    def summary(self) -> dict:
        used = self.used_tensors()
        methods = Counter(e["method"] for e in used.values())
        return {
            "target": self.plan.target,
            "quantized_nodes": len(self.plan.quantized_nodes),
            "activation_tensors": len(used),
            "weights": len(self.plan.weights),
            "methods": dict(methods),
            "float_nodes": self.plan.float_nodes,
            "weight_reduce_range": self.recipe.to_dict()["weight_reduce_range"],
            "weight_bits": self.weight_bits(),
            "algorithms": [summarize(r) for r in self.recipe.algorithms],
            "preparation": self.preparation.to_dict() if self.preparation else None,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "unstable_tensors": [t.tensor for t in self.stability.unstable] if self.stability else [],
            "warnings": self.warnings,
        }


def _used(recipe: Recipe) -> dict[str, dict]:
    return {t: e for t, e in recipe.tensors.items() if e.get("used", True)}


def int16_pair_sums(target: str) -> bool:
    """Whether the target's int8 kernels add u8 x s8 products in pairs in int16 on this CPU (no VNNI): then
    weights get 7 bits where those sums overflow (``quant.pair_overflow``)."""
    return TARGETS[target].int16_pairs and not any(f in cpu()["isa"] for f in VNNI_FLAGS)


def quantize(
    model: Model | str | os.PathLike[str],
    data: Dataset,
    *,
    method: str = "auto",
    target: str = "ort-cpu",
    exclude: Iterable[str] = (),
    overrides: Iterable[str] = (),
    percentile: float = DEFAULT_PERCENTILE,
    bins: int = DEFAULT_BINS,
    batch_size: int = 1,
    weight_reduce_range: bool | frozenset[str] | None = None,
    stability_halves: int = 4,
    stability_threshold: float = DEFAULT_THRESHOLD,
    observe_all: bool = False,
    prepare: bool | None = None,
    preparation: PrepareResult | None = None,
    settings: backends.Settings | None = None,
    progress: Progress | None = None,
    algorithms: Iterable[str] = (),
    algorithm_options: AlgorithmOptions | None = None,
    calibration: CalibrationResult | None = None,
) -> QuantizeResult:
    """INT8 Q/DQ model of ``model`` calibrated on ``data`` for ``target``.

    ``prepare`` (default: the target's ``TargetRules.prepare``, on for ort-cpu and openvino) places
    the Q/DQ in the prepared float graph (``quant.prepare``: BatchNormalization folded, decomposed
    HardSwish fused, constants folded), checked on the first calibration feeds to reproduce the
    source's outputs; refused preparation falls back to the source, with the reason in the warnings.
    ``preparation``: that step already made for this model (tune prepares once for every variant).
    ``observe_all`` also calibrates every tensor another exclusion set could quantize, so the
    recipe can rebuild any of them without data (sensitivity and accuracy budgets need this).
    ``algorithms`` (``infertune.quant.algorithms``: 'cle', 'smoothquant', 'adaround',
    'bias_correction') run as steps of it: the float rewrites before calibration, learned rounding
    and bias correction once ranges are chosen; each is recorded in the recipe.
    ``calibration``: statistics already gathered on this same float graph and data (tune's plain INT8
    variant); used instead of calibrating again when no float rewrite runs and it covers every tensor
    observed now, with histograms where the methods need them.
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r} (known: {', '.join(METHODS)})")
    names = check_algorithms(algorithms)
    source = model if isinstance(model, Model) else Model.load(model)
    data = as_dataset(data)
    parsed_overrides = MethodOverrides.parse(overrides)
    exclude = list(exclude)
    rules = _rules(target)
    prep = _prepared(source, data, rules.prepare if prepare is None else prepare, preparation, exclude)
    per_layer = weight_reduce_range is None and int16_pair_sums(target)
    ctx, records = run_algorithms(Context(
        model=ensure_opset(prep.model if prep else source), target=target, data=data,
        reduce_range=False if weight_reduce_range is None else weight_reduce_range,  # per layer: chosen below
        settings=settings, exclusions=Exclusions.parse(exclude), options=algorithm_options or AlgorithmOptions(),
        batch_size=batch_size), names, "float")
    m = ctx.model
    p = _plan_or_fail(m, target, Exclusions.parse(exclude))
    needs_hist = method in NEEDS_HISTOGRAM or any(r[2] in NEEDS_HISTOGRAM for r in parsed_overrides.rules)
    observed = list(dict.fromkeys([*p.activations, *(candidate_tensors(m, target) if observe_all else [])]))
    if _reusable(calibration, names, observed, needs_hist, bins, stability_halves):
        cal = calibration
    else:
        cal = calibrate(m, observed, data, histogram=needs_hist, bins=bins, batch_size=batch_size,
                        halves=stability_halves, settings=settings, progress=progress)
    p, auto = _exclude_unusable(m, p, cal, target, exclude)
    producers = _producer_ops(m)
    choices = _choose(m, observed, cal, parsed_overrides, method, producers, rules, percentile)
    kinds = _kinds(m, rules, choices)
    if any(STAGES[n] == "ranges" for n in names):
        ctx.plan, ctx.qparams = p, _activation_qparams(choices, rules, kinds, p.activations)
        ctx, refined = run_algorithms(ctx, names, "ranges")
        choices, records = {**choices, **_rescaled(choices, refined)}, records + refined
    overflow = pair_overflow.measure(m, p, _activation_qparams(choices, rules, kinds, p.activations), data,
                                     settings=settings) if per_layer else None
    if overflow is not None:
        ctx = replace(ctx, reduce_range=frozenset(layer.weight for layer in overflow if layer.seven_bit))
    qmodel, qparams, records = _write(ctx, p, {t: choices[t] for t in p.activations}, records, names, kinds)
    report = stability(cal.half_stats, qparams, {t: c.method for t, c in choices.items()}, producers,
                       symmetric=rules.activation_symmetric, dtype=rules.activation_dtype,
                       percentile=percentile, threshold=stability_threshold) if stability_halves else None
    recorded = _activation_qparams(choices, rules, kinds, observed)
    tensors = {t: {**choices[t].to_dict(), **recorded[t].to_dict(), **cal.stats[t].to_dict(),
                   "producer_op": producers.get(t), "used": t in qparams} for t in observed}
    recipe = Recipe(
        source_sha256=model_sha256(source), target=target, method=method, exclusions=exclude,
        auto_exclusions=auto, weight_reduce_range=ctx.reduce_range, tensors=tensors, percentile=percentile,
        overrides=parsed_overrides.to_list(), calibration=cal.to_dict(),
        stability=report.to_dict() if report else None, versions=versions(), algorithms=records,
        prepared=bool(prep and prep.prepared), preparation=prep.to_dict() if prep else None,
        pair_overflow=[layer.to_dict() for layer in overflow if layer.overflows or layer.seven_bit]
        if overflow is not None else None,
    )
    warnings = list(cal.warnings)
    if prep and prep.refused:
        warnings.append(prep.summary())
    if report and report.message():
        warnings.append(report.message())
    return QuantizeResult(qmodel, recipe, p, cal, report, warnings, prep)


def _rescaled(choices: Mapping[str, RangeChoice], records: list[dict]) -> dict[str, RangeChoice]:
    """The ranges a ``ranges``-stage step rescaled (factor about zero: the zero point stays)."""
    out = {}
    for record in records:
        for t, f in record.get("factors", {}).items():
            c = out.get(t, choices[t])
            why = f"x{f:g} by the output error ({record['name']})"
            out[t] = replace(c, lo=c.lo * f, hi=c.hi * f, reason=f"{c.reason}; {why}" if c.reason else why)
    return out


def _reusable(cal: CalibrationResult | None, names: Sequence[str], observed: list[str], histogram: bool, bins: int,
              halves: int) -> bool:
    """Can ``cal`` stand for calibrating ``observed`` again: gathered on the same float graph (no float
    rewrite among ``names``), covering every tensor, with as many halves, and histograms when needed."""
    if cal is None or any(STAGES[n] == "float" for n in names) or len(cal.half_stats) != halves:
        return False
    if not set(observed) <= set(cal.stats):
        return False
    return not histogram or (cal.bins == bins and all(cal.stats[t].hist is not None for t in observed))


def _prepared(source: Model, data: Dataset, prepare: bool, preparation: PrepareResult | None,
              exclude: list[str]) -> PrepareResult | None:
    """The graph preparation quantize places Q/DQ in (None: off). An exclusion naming a node that
    preparation removed is refused with what became of it."""
    if not prepare:
        return None
    prep = preparation or prepare_graph(source, data)
    gone = sorted(Exclusions.parse(exclude).names & set(prep.removed)) if prep.prepared else []
    if gone:
        raise UsageError(f"--exclude {gone[0]}: graph preparation removed that node ({prep.removed[gone[0]]}); "
                         "exclude the node it went into, or quantize with --no-prepare")
    return prep


def _choose(m: Model, observed: list[str], cal: CalibrationResult, overrides: MethodOverrides, method: str,
            producers: dict[str, str | None], rules, percentile: float) -> dict[str, RangeChoice]:
    constants = m.constant_tensors()
    choices = {}
    for t in observed:
        chosen = "minmax" if t in constants else overrides.method_for(t, producers.get(t), method)
        choices[t] = choose_range(cal.stats[t], chosen, symmetric=rules.activation_symmetric,
                                  dtype=rules.activation_dtype, producer_op=producers.get(t), percentile=percentile)
    return choices


def _exclude_unusable(m: Model, p: QuantPlan, cal: CalibrationResult, target: str,
                      exclude: list[str]) -> tuple[QuantPlan, dict[str, str]]:
    """Tensors without a usable range (no finite value, or masks of -inf): their readers stay float.
    Re-planning can make other tensors activations, so repeat until no new node is excluded."""
    auto: dict[str, str] = {}
    while True:
        bad = {t: s for t, s in cal.stats.items() if t in p.activations and (s.nonfinite or not s.count)}
        new = {n: f"reads '{t}', which holds {s.nonfinite} non-finite values" if s.nonfinite
               else f"reads '{t}', which never held a finite value"
               for t, s in bad.items() for n in _nodes_touching(p, m, t) if n not in auto}
        if not new:
            break
        auto.update(new)
        try:
            p = _plan_or_fail(m, target, Exclusions.parse([*exclude, *auto]))
        except CalibrationError:
            raise CalibrationError(_nothing_finite(m, target, auto, cal.warnings)) from None
    for n, why in auto.items():
        p.float_nodes[n] = why
    return p, auto


def rebuild(model: Model | str | os.PathLike[str], recipe: Recipe, *, check_source: bool = True,
            prepared: Model | None = None) -> QuantizeResult:
    """The quantized model a recipe describes, from its (possibly edited) ranges and the recorded
    algorithm steps; no data needed. A recipe made from a prepared graph prepares ``model`` again,
    unless ``prepared`` (that graph, already made: a QuantSpace building many variants) is given."""
    source = model if isinstance(model, Model) else Model.load(model)
    sha = model_sha256(source)
    if check_source and sha != recipe.source_sha256:
        raise ModelError(f"the recipe was made for a model with sha256 {recipe.source_sha256[:12]}..., "
                         f"this one is {sha[:12]}... (pass check_source=False / --force to apply it anyway)")
    prep = None
    if recipe.prepared and prepared is None:
        prep = prepare_graph(source)
        if not prep.prepared:
            raise ModelError(f"the recipe was made from the prepared graph of {source.name}, and preparing it "
                             f"again failed: {prep.refused or 'nothing changed'}")
        prepared = prep.model
    float_graph = prepared if recipe.prepared and prepared is not None else source
    _rules(recipe.target)  # an unknown target fails before any work
    ctx = replay_algorithms(Context(model=ensure_opset(float_graph), target=recipe.target,
                                    reduce_range=recipe.weight_reduce_range), recipe.algorithms, "float")
    m = ctx.model
    p = _plan_or_fail(m, recipe.target, Exclusions.parse([*recipe.exclusions, *recipe.auto_exclusions]))
    for n, why in recipe.auto_exclusions.items():
        p.float_nodes[n] = why
    missing = [t for t in p.activations if t not in recipe.tensors]
    if missing:
        raise ModelError(f"the recipe has no range for tensor(s) {', '.join(missing[:5])} that this model "
                         f"quantizes: it was made for another model or placement")
    choices = {t: RangeChoice(float(recipe.tensors[t]["min"]), float(recipe.tensors[t]["max"]),
                              recipe.tensors[t].get("method", "recipe")) for t in p.activations}
    # the kind of each range as the recipe recorded it (uint8 with a zero point, or int8 without), so that a recipe
    # rebuilds what it was made as after the target's rule for choosing between them changed
    kinds = {t: recipe.tensors[t]["dtype"] for t in p.activations
             if recipe.tensors[t].get("dtype") in ("uint8", "int8")}
    qmodel, qparams, _ = _write(ctx, p, choices, recipe.algorithms, (), kinds)
    for t, entry in recipe.tensors.items():
        entry.update(qparams[t].to_dict() if t in qparams else {})
        entry["used"] = t in qparams
    return QuantizeResult(qmodel, recipe, p, preparation=prep)


def _write(ctx: Context, p: QuantPlan, choices: Mapping[str, RangeChoice], records: list[dict], names: Sequence[str],
           kinds: Mapping[str, str] | None = None) -> tuple[Model, dict[str, QParams], list[dict]]:
    """The Q/DQ model: learned rounding and bias correction first (run for ``names``, or replayed
    from ``records`` when ``names`` is empty), then the writer. ``kinds``: the recorded dtype of some ranges,
    where the target's rule would otherwise choose (``TargetRules.activation_qparams``)."""
    rules = _rules(p.target)
    kinds = kinds or {}
    qparams = _activation_qparams(choices, rules, kinds, choices)
    ctx.plan, ctx.qparams = p, qparams
    records = list(records)
    for stage in ("weights", "bias"):
        if names:
            ctx, more = run_algorithms(ctx, names, stage)
            records += more
        else:
            ctx = replay_algorithms(ctx, records, stage)
    qmodel = write_qdq(ctx.model, p, qparams, weight_reduce_range=ctx.reduce_range, weight_values=ctx.weights)
    return qmodel, qparams, records


def _activation_qparams(choices: Mapping[str, RangeChoice], rules, kinds: Mapping[str, str],
                        tensors: Iterable[str]) -> dict[str, QParams]:
    """Scale and zero point of each of ``tensors`` from its chosen range, of the kind ``kinds`` fixes (a
    recipe's record, or the padded-convolution rule) or else the target's rule chooses."""
    return {t: rules.activation_qparams(choices[t].lo, choices[t].hi, kinds.get(t)) for t in tensors}


def _kinds(m: Model, rules, choices: Mapping[str, RangeChoice]) -> dict[str, str]:
    """The ranges whose kind ``TargetRules.symmetric_padded`` fixes: int8 for a signed range a padded
    convolution reads. Decided on the float graph, so every exclusion set of it agrees."""
    if not rules.symmetric_padded:
        return {}
    padded = padded_conv_inputs(m)
    return {t: "int8" for t, c in choices.items() if t in padded and c.lo < 0 < c.hi}


def _rules(target: str):
    if target not in TARGETS:
        raise CalibrationError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    return TARGETS[target]


def _plan_or_fail(m: Model, target: str, exclusions: Exclusions) -> QuantPlan:
    p = plan(m, target, exclusions)
    if not p.quantized_nodes:
        why = "; ".join(f"{n}: {r}" for n, r in list(p.float_nodes.items())[:5]) or \
            f"the main graph has no {'/'.join(sorted(TARGETS[target].compute_ops))} node"
        raise CalibrationError(f"nothing to quantize in {m.name} for {target} ({why})")
    return p


def _nothing_finite(m: Model, target: str, auto: dict[str, str], warnings: list[str]) -> str:
    node, why = next(iter(auto.items()))
    inputs = [w for w in warnings if w.startswith("input '")]
    return (f"nothing to quantize in {m.name} for {target}: every quantizable node reads a tensor without a usable "
            f"range ({len(auto)} node(s), e.g. {node} {why})"
            + (f"; the calibration data holds them: {'; '.join(inputs[:2])}: remove them" if inputs else ""))


def _nodes_touching(p: QuantPlan, m: Model, tensor: str) -> list[str]:
    """Quantized nodes that read ``tensor`` or whose output Q sits on it."""
    nodes = list(p.consumers_q.get(tensor, []))
    producer = m.producers().get(tensor)
    if producer is not None and tensor in p.replaced:
        nodes.append(p.absorbed.get(producer.name, producer.name))
    quantized = set(p.quantized_nodes)
    return [n for n in dict.fromkeys(nodes) if n in quantized]


def _producer_ops(m: Model) -> dict[str, str | None]:
    return {t: n.op_type for t, n in m.producers().items()}
