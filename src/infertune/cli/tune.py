"""``infertune tune``: the fastest variant within a budget, as an artifact with an HTML report."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from infertune import backends
from infertune.cli.common import (
    emit,
    err,
    fix_option,
    fmt,
    force_option,
    json_option,
    load_data,
    load_metric,
    metric_option,
    out,
    provenance,
    specialised,
    table,
)
from infertune.quant.methods import METHODS
from infertune.search.executors import EXECUTORS


def _ints(text: str, what: str) -> list[int]:
    from infertune.errors import UsageError
    from infertune.limits import check_threads

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{what} must be integers >= 0, got {text!r}")
    for v in values:
        check_threads(v, what)
    return values


def _searchable(name: str) -> bool:
    entry = backends.runtime(name)
    return bool(entry.placement or entry.fp16)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", "calib_data", required=True, metavar="D", help="Calibration data.")
@click.option("--eval", "eval_data", metavar="D", help="Evaluation data (default: the calibration data).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--preprocess", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dims", multiple=True, metavar="NAME=SIZE")
@fix_option
@click.option("--budget", required=True, metavar="EXPR",
              help="Accuracy budget against FP32: 'top1_drop<=0.5' (needs labels), 'cosine>=0.999', 'sqnr>=30', "
                   "or with --metric 'metric>=X' / 'metric<=X'.")
@metric_option
@click.option("--threads", "threads_text", default="0", show_default=True, metavar="T1,T2",
              help="Intra-op thread counts to try (0 = runtime default).")
@click.option("--methods", "methods_text", default="auto", show_default=True, metavar="M1,M2",
              help=f"Calibration methods to try ({', '.join(METHODS)}).")
@click.option("--runtimes", "runtimes_text", default="auto", show_default=True, metavar="R1,R2",
              help="Runtimes to try (those with an INT8 placement or FP16: "
                   f"{', '.join(n for n in backends.names() if _searchable(n))}); "
                   "'auto' = ort, plus openvino when it is installed, plus the GPU runtimes when a GPU is usable. "
                   "INT8 is placed, ranked and bisected on each runtime separately; GPU runtimes also try FP16 "
                   "and CUDA graphs.")
@click.option("--algorithms/--no-algorithms", default=True, show_default=True,
              help="When full INT8 misses the budget, try the accuracy algorithms (equalisation + bias "
                   "correction for convnets, SmoothQuant for transformers, then learned rounding) before "
                   "keeping nodes in float.")
@click.option("--max-trials", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True),
              help="Stop starting trials after S seconds.")
@click.option("--latency-seconds", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Time spent measuring each trial's latency.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="Where trials run: here, in order, or as Ray tasks (pip install 'infertune[ray]') on nodes of "
                   "this machine's kind (see `infertune ray-resources`).")
@click.option("--ray-address", metavar="HOST:PORT", help="The Ray cluster to use (default: start one here).")
@click.option("--ray-shard-samples", type=click.IntRange(min=1), metavar="N",
              help="With --executor ray: evaluation feeds per task (default 256): a large evaluation set is "
                   "scored on several workers at once.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where trials are recorded (default: OUT.run); the same command resumes from it.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The artifact directory (model, manifest.json, report.html): a new one, or with --force one "
                   "infertune wrote before.")
@force_option("an artifact")
@json_option
def tune(model: Path, calib_data, eval_data, eval_samples, preprocess, dims, fix, budget, metric, threads_text,
         methods_text, runtimes_text, algorithms, max_trials, time_budget, latency_seconds, executor, ray_address,
         ray_shard_samples, run_dir, output, force, as_json) -> None:
    """The fastest variant of MODEL that meets --budget, written as a verified artifact with a report."""
    from infertune.analysis.accuracy import Budget, Evaluator
    from infertune.data import refuse_constant
    from infertune.deploy.artifact import OWNED
    from infertune.errors import UsageError
    from infertune.model import Model
    from infertune.outputs import Guard
    from infertune.search.executors import make_executor
    from infertune.search.journal import RUN_DIR
    from infertune.search.tuner import tune as run_tune

    guard = Guard.of(model, calib_data, eval_data, preprocess)
    output = guard.directory(output, OWNED, force=force)
    run_dir = guard.directory(run_dir or output.with_name(output.name + ".run"), RUN_DIR, what="--run-dir")

    threads = _ints(threads_text, "--threads")
    methods = [m.strip() for m in methods_text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"--methods: unknown method {bad[0] if bad else methods_text!r} (known: {', '.join(METHODS)})")
    if runtimes_text == "auto":
        from infertune.search.runtimes import auto_runtimes

        runtimes = auto_runtimes()
    else:
        runtimes = [r.strip() for r in runtimes_text.split(",") if r.strip()]
    b = Budget.parse(budget, load_metric(metric))
    m = Model.load(model)
    calib = load_data(m, calib_data, preprocess, dims, 8, 0, "calib")
    ev = calib if eval_data is None else load_data(m, eval_data, preprocess, dims, 8, 0, "eval")
    # accuracy does not depend on the thread count a variant is timed at (each timing has a process of its
    # own): calibration and evaluation use every core the runtime takes by default
    m, fixed = specialised(m, [calib] if ev is calib else [calib, ev], fix, settings=backends.Settings())
    refuse_constant(m, calib, "calibration data")  # before the search, not as a failed INT8 trial
    evaluator = Evaluator.from_dataset(m, ev, eval_samples, backends.Settings())
    if b.check is not None and b.check.metric == "top1_drop" and evaluator.labels is None:
        raise UsageError("--budget top1_drop needs labels: an array named 'label' in the evaluation data")

    def shown(t, reused: bool) -> None:
        if as_json:
            return
        tag = "[dim]recorded[/]" if reused else f"{t.seconds:.1f} s"
        met = "[green]meets[/]" if t.met else "[red]misses[/]"
        note = f" [dim]{escape(t.note)}[/]" if t.note else ""
        err.print(f"trial {t.index:>2} {escape(t.spec.label()):<40} p50 {t.p50_ms:8.3f} ms  "
                  f"SQNR {fmt(t.metrics.get('sqnr_db'), 1):>6} dB  {met} the budget  ({tag}){note}")

    ex = make_executor(executor, address=ray_address, shard_samples=ray_shard_samples)
    try:
        r = run_tune(m, calib, evaluator, b, run_dir=run_dir, threads=threads, methods=methods, runtimes=runtimes,
                     max_trials=max_trials, time_budget_s=time_budget, latency_s=latency_seconds, on_trial=shown,
                     output=output, force=force, executor=ex, notes=fixed.notes if fixed else (),
                     algorithms=algorithms)
    finally:
        ex.close()

    def human() -> None:
        c = r.chosen
        out.print(f"[bold green]chosen:[/] {escape(c.spec.label())}: p50 {c.p50_ms:.3f} ms "
                  f"(FP32 {r.p50(r.fp32):.3f} ms), budget {escape(r.budget)}")
        for d in r.decisions:
            out.print(f"  - {escape(d)}")
        t = table(("#", "variant", "p50 ms", "SQNR dB", "cosine", "met", ""),
                  numeric=("#", "p50 ms", "SQNR dB", "cosine"), title=f"{len(r.trials)} trials (Pareto front marked *)")
        front = {p.index for p in r.pareto()}
        for tr in r.trials:
            t.add_row(str(tr.index), escape(tr.spec.label()), f"{tr.p50_ms:.3f}", fmt(tr.metrics.get("sqnr_db"), 1),
                      fmt(tr.metrics.get("cosine"), 5), "yes" if tr.met else "no",
                      ("*" if tr.index in front else "") + (" chosen" if tr.index == c.index else ""))
        out.print(t)
        out.print(f"artifact: {r.artifact} (report: {Path(r.artifact) / 'report.html'}); trials in {r.run_dir}")

    emit({**r.to_dict(), **provenance(fixed, calib=calib, eval=ev)}, as_json, None, human)


@click.command("ray-resources")
@json_option
def ray_resources(as_json: bool) -> None:
    """The Ray resource that marks a node of this machine's kind, for `ray start --resources`."""
    import json

    from infertune.fingerprint import kind_label, machine_kind

    res = {f"infertune-{kind_label()}": 1}
    kind = machine_kind()
    if as_json:
        emit({"kind": "ray-resources", "resources": res, "machine": kind}, True, None, lambda: None)
        return
    click.echo(json.dumps(res))
    err.print(f"start every Ray node of this kind ({escape(kind['cpu'])}, {' '.join(kind['isa'])}) with: "
              f"ray start --address HEAD:PORT --resources '{json.dumps(res)}'")


COMMANDS = (tune, ray_resources)
