"""``infertune sensitivity``: which quantized nodes cost accuracy, most sensitive first."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from infertune.analysis.sensitivity import MODES
from infertune.cli.common import (
    algorithm_options,
    backend_options,
    data_options,
    emit,
    fix_option,
    fmt,
    json_option,
    load_metric,
    metric_option,
    out,
    output_option,
    placement_for,
    progress_bar,
    provenance,
    space_and_evaluator,
    table,
)
from infertune.quant.methods import METHODS
from infertune.quant.placement import TARGETS


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--eval", "eval_data", metavar="D", help="Evaluation data (default: the calibration data).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="exact", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True)
@click.option("--target", type=click.Choice(list(TARGETS)),
              help="Q/DQ placement (default: the one for --backend).")
@click.option("--exclude", multiple=True, metavar="NODE|op:TYPE|re:REGEX")
@click.option("--top", type=int, default=20, show_default=True, help="Show the N most sensitive nodes.")
@metric_option
@fix_option
@click.option("--lower-is-better", is_flag=True, help="With --metric: smaller values of it are better.")
@algorithm_options
@backend_options
@json_option
@output_option
def sensitivity(model: Path, data, preprocess, dims, samples, seed, eval_data, eval_samples, mode, method, target,
                exclude, top, metric, fix, lower_is_better, algorithms, algorithm_options, backend, settings, as_json,
                output) -> None:
    """Rank MODEL's quantized nodes by their effect on the outputs (exact or fast), or on --metric (exact)."""
    from infertune.analysis.sensitivity import check_mode
    from infertune.analysis.sensitivity import sensitivity as run_sensitivity
    from infertune.model import Model
    from infertune.outputs import Guard

    output = Guard.of(model, data, eval_data, preprocess).file(output)
    target = placement_for(backend, target)
    user_metric = load_metric(metric)
    if lower_is_better and user_metric is None:
        from infertune.errors import UsageError

        raise UsageError("--lower-is-better is about --metric: give --metric FILE.py:FUNC")
    check_mode(mode, backend, user_metric is not None)
    m = Model.load(model)
    space, evaluator, fixed, read = space_and_evaluator(m, data, preprocess, dims, samples, seed, eval_data,
                                                        eval_samples, method, target, exclude, settings, as_json,
                                                        fix, backend, algorithms, algorithm_options)
    with progress_bar(f"sensitivity ({mode})", not as_json) as update:
        r = run_sensitivity(space, evaluator, mode=mode, progress=update, backend=backend, metric=user_metric,
                            higher_is_better=not lower_is_better)

    def human() -> None:
        b = r.baseline
        out.print(f"[bold]{m.name}[/] all {len(space.groups)} groups in INT8 ({target}) on {backend}: output SQNR "
                  f"{fmt(b['sqnr_db'], 1)} dB, cosine {fmt(b['cosine'], 5)}; {mode} mode: "
                  f"{r.forward_passes} passes over "
                  f"{len(evaluator.feeds)} samples, {r.seconds:.1f} s")
        meaning = "output NSR when quantized alone" if mode == "exact" else "injected noise x gain: a ranking"
        if r.metric:
            meaning = f"loss of {r.metric} when quantized alone, ties by output NSR"
            out.print(f"{r.metric}: {fmt(b['user'], 5)} with every group in INT8")
        t = table(("rank", "node", "op", "score"), numeric=("rank", "score"), title=f"most sensitive first ({meaning})")
        for i, g in enumerate(r.groups[:top], 1):
            t.add_row(str(i), escape(g.node), g.op_type, f"{g.score:.3e}")
        out.print(t)
        out.print(f"keep the top ones in float with: infertune quantize {model} --exclude NODE ... "
                  f"or let --budget choose them")

    emit({**r.to_dict(), **provenance(fixed, **read), "algorithms": list(algorithms)}, as_json, output, human)


COMMANDS = (sensitivity,)
