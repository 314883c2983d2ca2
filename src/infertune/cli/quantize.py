"""``infertune quantize``: INT8 Q/DQ model + recipe, with a summary of every decision."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape

from infertune.analysis.sensitivity import MODES
from infertune.cli.common import (
    algorithm_options,
    algorithm_progress,
    backend_options,
    data_options,
    emit,
    err,
    fix_option,
    fmt,
    json_option,
    load_data,
    load_metric,
    metric_option,
    out,
    placement_for,
    progress_bar,
    provenance,
    space_and_evaluator,
    specialised,
    table,
)
from infertune.quant.methods import DEFAULT_PERCENTILE, METHODS
from infertune.quant.observers import DEFAULT_BINS
from infertune.quant.placement import TARGETS
from infertune.quant.stability import DEFAULT_THRESHOLD


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
              help="Range method for every activation (auto: per tensor).")
@click.option("--target", type=click.Choice(list(TARGETS)),
              help="Default: the placement for --backend. "
                   "ort-cpu: uint8 activations placed for ONNX Runtime's CPU fusions; "
                   "tensorrt: int8 symmetric per TensorRT's explicit-quantization rules; "
                   "openvino: uint8 on the inputs of the ops OpenVINO quantizes (no quantized bias Add).")
@click.option("--exclude", multiple=True, metavar="NODE|op:TYPE|re:REGEX",
              help="Keep nodes in float, by name, op type or regex on the name (repeatable).")
@click.option("--override", "overrides", multiple=True, metavar="TENSOR=METHOD",
              help="Per-tensor method: NAME=METHOD, op:PRODUCER_OP=METHOD or re:REGEX=METHOD.")
@click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), default=DEFAULT_PERCENTILE,
              show_default=True)
@click.option("--bins", type=click.IntRange(min=2), default=DEFAULT_BINS, show_default=True,
              help="Histogram bins per tensor (memory per tensor, independent of samples).")
@click.option("--calib-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per calibration run (ranges do not depend on it).")
@click.option("--max-samples", type=click.IntRange(min=1), default=None,
              help="Use at most this many calibration samples.")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="7-bit weights, every one or none (default: for ort-cpu and openvino on a CPU without VNNI, "
                   "7-bit on the layers whose int16 pair sums overflow on the data, more than 7-bit rounding "
                   "would cost; 8-bit elsewhere).")
@click.option("--stability-halves", type=click.IntRange(min=0), default=4, show_default=True,
              help="Random halves of the data to recompute scales on (0: off).")
@click.option("--stability-threshold", type=click.FloatRange(min=0), default=DEFAULT_THRESHOLD,
              show_default=True, help="Relative scale change that flags a tensor as unstable.")
@click.option("--prepare/--no-prepare", default=None,
              help="Fold BatchNormalization, fuse decomposed activations and fold constants before placing Q/DQ "
                   "(checked to reproduce the model's outputs; default: on for ort-cpu and openvino).")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Rebuild from a recipe (its ranges, exclusions and target); no data needed.")
@click.option("--force", is_flag=True, help="Apply --recipe even if it was made for another model file.")
@click.option("--budget", metavar="EXPR",
              help="Keep the fewest most sensitive nodes in float to meet e.g. 'cosine>=0.999', 'sqnr>=30' "
                   "or 'top1_drop<=0.5' (labels from the evaluation data's 'label'); with --metric 'metric>=X'.")
@metric_option
@fix_option
@click.option("--eval", "eval_data", metavar="D", help="Evaluation data for --budget (default: the calibration data).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--rank", type=click.Choice(MODES), default="exact", show_default=True,
              help="How --budget ranks nodes (see `infertune sensitivity`).")
@algorithm_options
@backend_options
@json_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The quantized .onnx; its recipe goes beside it as NAME.recipe.json.")
def quantize(model: Path, recipe_file, force, budget, backend, settings, as_json, output, **opts) -> None:
    """Quantize MODEL to INT8 (Q/DQ) with calibration on --data; write OUT and OUT.recipe.json."""
    from infertune._io import atomic_path, write_json
    from infertune.errors import UsageError
    from infertune.model import Model
    from infertune.outputs import Guard
    from infertune.quant.fusion import fusion_report
    from infertune.quant.quantize import rebuild
    from infertune.quant.recipe import Recipe, recipe_path
    from infertune.quant.trt_rules import validate_tensorrt

    if output.suffix != ".onnx":
        raise UsageError(f"-o must name an .onnx file, got {output}")
    _refuse_ignored(recipe_file is not None)
    guard = Guard.of(model, opts["data"], opts["eval_data"], opts["preprocess"], recipe_file)
    output = guard.file(output)
    guard.file(recipe_path(output), "the recipe beside -o")
    opts["target"] = placement_for(backend, opts["target"])
    if opts["metric"] is not None and budget is None:
        raise UsageError("--metric needs --budget 'metric>=X' (or 'metric<=X')")
    m = Model.load(model)
    budget_result, fixed, read = None, None, {}
    if recipe_file is not None:
        if opts["algorithms"]:
            raise UsageError("--algorithm with --recipe: the recipe's own algorithm steps are replayed; "
                             "drop --algorithm, or calibrate again without --recipe")
        result = rebuild(m, Recipe.load(recipe_file), check_source=not force)
    elif budget is not None:
        result, budget_result, fixed, read = _to_budget(m, budget, backend, settings, as_json, **opts)
    else:
        result, fixed, read = _calibrated(m, settings, as_json, backend, **opts)
    fused = fusion_report(result.model, settings) if result.plan.target == "ort-cpu" else None
    violations = validate_tensorrt(result.model) if result.plan.target == "tensorrt" else []
    rpath = recipe_path(output)
    with atomic_path(output) as tmp_model, atomic_path(rpath) as tmp_recipe:
        result.model.save(tmp_model)
        write_json(tmp_recipe, result.recipe.to_dict())
    doc = {"kind": "quantize", "model": str(output), "recipe": str(rpath), "backend": backend, **result.summary(),
           "fusion": fused.to_dict() if fused else None, "tensorrt_violations": [str(v) for v in violations],
           "budget": budget_result.to_dict() if budget_result else None, **provenance(fixed, **read)}
    emit(doc, as_json, None, lambda: _print_quantized(m.name, output, rpath, result, fused, violations, budget_result))


# what a rebuild from --recipe takes from the recipe instead: given with it, they would be ignored
RECIPE_IGNORES = ("data", "preprocess", "dims", "samples", "seed", "method", "target", "exclude", "overrides",
                  "percentile", "bins", "calib_batch", "max_samples", "reduce_range", "stability_halves",
                  "stability_threshold", "budget", "eval_data", "eval_samples", "rank", "backend", "metric", "fix")


def _refuse_ignored(with_recipe: bool) -> None:
    """Refuse options the command would silently ignore: calibration options with --recipe, --force without."""
    from infertune.errors import UsageError

    ctx = click.get_current_context()
    given = {p.name: p.opts[0] for p in ctx.command.params
             if p.name and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)}
    if with_recipe:
        ignored = [given[n] for n in RECIPE_IGNORES if n in given]
        if ignored:
            raise UsageError(f"--recipe rebuilds from the recipe's ranges, exclusions and target: "
                             f"{', '.join(ignored)} would be ignored; drop them, or quantize without --recipe")
    elif "force" in given:
        raise UsageError("--force applies only with --recipe (to a recipe made for another model file)")


def _calibrated(m, settings, as_json, backend, *, data, preprocess, dims, samples, seed, max_samples, method, target,
                exclude, overrides, percentile, bins, calib_batch, reduce_range, stability_halves, stability_threshold,
                fix, algorithms, algorithm_options, prepare, **_budget_only):
    from infertune.quant.quantize import quantize as run_quantize

    read = load_data(m, data, preprocess, dims, samples, seed)
    m, fixed = specialised(m, [read], fix, backend, settings)
    ds = read.take(max_samples) if max_samples else read
    with progress_bar("calibrating" + (" and running " + ", ".join(algorithms) if algorithms else ""),
                      not as_json) as update:
        result = run_quantize(m, ds, method=method, target=target, exclude=exclude, overrides=overrides,
                              percentile=percentile, bins=bins, batch_size=calib_batch,
                              weight_reduce_range=reduce_range, stability_halves=stability_halves,
                              stability_threshold=stability_threshold, prepare=prepare, settings=settings,
                              progress=update, algorithms=algorithms,
                              algorithm_options=algorithm_progress(algorithm_options, update))
    return result, fixed, {"data": read}


def _print_quantized(name, output, rpath, result, fused, violations, budget_result) -> None:
    s = result.summary()
    out.print(f"[bold]{name}[/] -> {output} ({s['target']}): {s['quantized_nodes']} nodes in INT8, "
              f"{s['activation_tensors']} activation tensors, {s['weights']} weights "
              f"(per-channel int8, {s['weight_bits']})")
    if result.preparation and not result.preparation.refused:  # a refusal is among the warnings
        out.print(escape(result.preparation.summary()))
    if result.calibration:
        c = result.calibration
        out.print(f"calibration: {c.feeds} runs x batch {c.batch_size}, {c.passes} pass(es), "
                  f"{c.seconds:.1f} s; methods: "
                  + ", ".join(f"{k} {v}" for k, v in Counter(
                      e["method"] for e in result.used_tensors().values()).most_common()))
    for a in s["algorithms"]:
        out.print(f"{a['name']} ({a['seconds']:.1f} s): " + ", ".join(
            f"{k} {v}" for k, v in a.items() if k not in ("name", "seconds") and v not in (None, {})))
    t = table(("tensor", "method", "min", "max", "scale", "zp", "why"), numeric=("min", "max", "scale", "zp"),
              title="activation ranges")
    used = result.used_tensors()
    for tensor, e in list(used.items())[:40]:
        t.add_row(escape(tensor), e["method"], fmt(e["min"]), fmt(e["max"]), fmt(e["scale"], 6),
                  str(e["zero_point"]), escape(e.get("reason", "")))
    out.print(t)
    if len(used) > 40:
        out.print(f"... {len(used) - 40} more in {rpath}")
    if result.plan.float_nodes:
        f = table(("node", "why"), title="nodes left in float")
        for n, why in result.plan.float_nodes.items():
            f.add_row(escape(n), escape(why))
        out.print(f)
    if fused:
        out.print(f"ONNX Runtime's optimised graph: {fused.int8_kernels} INT8 kernels, "
                  f"{fused.unfused_quantize} Q / {fused.unfused_dequantize} DQ left unfused "
                  f"({fused.boundary} at graph inputs/outputs), "
                  f"{fused.float_compute} float Conv/MatMul/Gemm")
    if result.plan.target == "tensorrt":
        out.print("TensorRT Q/DQ rules: " + ("[green]all satisfied[/]" if not violations
                                             else f"[red]{len(violations)} violation(s)[/]"))
        for v in violations[:10]:
            err.print(f"[red]violation:[/] {escape(str(v))}")
    if budget_result:
        _print_budget(budget_result)
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    err.print(f"wrote {output} and {rpath}")


def _to_budget(m, budget, backend, settings, as_json, *, data, preprocess, dims, samples, seed, eval_data,
               eval_samples, method, target, exclude, rank, metric, fix, algorithms, algorithm_options,
               prepare, **_calibration_only):
    from infertune.analysis.accuracy import Budget
    from infertune.analysis.sensitivity import check_mode
    from infertune.search.mixed_precision import quantize_to_budget

    parsed = Budget.parse(budget, load_metric(metric))
    check_mode(rank, backend)
    space, evaluator, fixed, read = space_and_evaluator(m, data, preprocess, dims, samples, seed, eval_data,
                                                        eval_samples, method, target, exclude, settings, as_json,
                                                        fix, backend, algorithms, algorithm_options,
                                                        prepare=prepare)
    with progress_bar(f"ranking ({rank}) and meeting the budget on {backend}", not as_json) as update:
        result, br = quantize_to_budget(space, evaluator, parsed, rank=rank, backend=backend, progress=update)
    return result, br, fixed, read


def _print_budget(br) -> None:
    user = any("user" in s.metrics for s in br.steps)
    cols = ("float nodes", "SQNR dB", "cosine", "metric" if user else "top-1 drop", "p50 ms", "met")
    t = table(cols, numeric=cols[:-1], title=f"mixed precision for {br.budget} on {br.backend}")
    for s in br.steps:
        t.add_row(str(len(s.excluded)), fmt(s.metrics["sqnr_db"], 1), fmt(s.metrics["cosine"], 5),
                  fmt(s.metrics.get("user"), 4) if user else fmt(s.metrics.get("top1_drop"), 2), fmt(s.p50_ms, 3),
                  "yes" if s.met else f"no: {s.metrics['confidence']:.0%} of resamples" if s.note else "no")
    out.print(t)
    chosen = br.chosen or br.best
    if chosen.excluded:
        out.print("kept in float: " + ", ".join(escape(n) for n in chosen.excluded[:20])
                  + (f" and {len(chosen.excluded) - 20} more" if len(chosen.excluded) > 20 else ""))


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--keep", "keep_nodes", multiple=True, metavar="NODE", help="Keep this node in float32 (repeatable).")
@click.option("--data", "data", metavar="D", help="Measure fidelity vs FP32 on this data, on --backend.")
@click.option("--preprocess", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dims", multiple=True, metavar="NAME=SIZE")
@backend_options
@json_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def fp16(model: Path, keep_nodes, data, preprocess, dims, backend, settings, as_json, output) -> None:
    """Convert MODEL to FP16 for GPU targets (I/O float32, reductions kept float32 by rule)."""
    from infertune.analysis.compare import compare
    from infertune.errors import UsageError
    from infertune.model import Model
    from infertune.outputs import Guard
    from infertune.quant.fp16 import to_fp16

    if output.suffix != ".onnx":
        raise UsageError(f"-o must name an .onnx file, got {output}")
    output = Guard.of(model, data, preprocess).file(output)
    m = Model.load(model)
    r = to_fp16(m, keep_nodes=keep_nodes)
    fidelity = None
    if data is not None:
        ds = load_data(m, data, preprocess, dims, 8, 0)
        with progress_bar("measuring fidelity", not as_json) as update:
            fidelity = compare(m, r.model, ds, checks=["cosine>=0"], backend=backend, settings=settings,
                               progress=update)
    r.model.save(output)
    doc = {"kind": "fp16", "model": str(output), "backend": backend if fidelity else None, **r.to_dict(),
           "fidelity": {o.name: {k: o.metrics[k] for k in ("cosine", "cosine_min", "sqnr_db", "max_abs")}
                        for o in fidelity.outputs} if fidelity else None}

    def human() -> None:
        out.print(f"[bold]{m.name}[/] -> {output}: {len(r.fp16_nodes)} nodes in FP16, {len(r.fp32_nodes)} kept "
                  f"FP32, {r.casts_inserted} casts")
        reasons = Counter(why for why in r.fp32_nodes.values())
        for why, n in reasons.most_common():
            out.print(f"  {n} x {escape(why)}")
        if fidelity:
            for o in fidelity.outputs:
                out.print(f"fidelity of '{o.name}' vs FP32: cosine {fmt(o.metrics['cosine'], 6)}, "
                          f"SQNR {fmt(o.metrics['sqnr_db'], 1)} dB, max abs {fmt(o.metrics['max_abs'])}")
        for w in r.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}")

    emit(doc, as_json, None, human)


COMMANDS = (quantize, fp16)
