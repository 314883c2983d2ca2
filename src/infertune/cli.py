"""``infertune <verb>``: parses arguments, calls the public API, prints rich tables or --json.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input, 3 backend unavailable.
User errors print one line without a traceback; anything else is a bug and keeps its trace.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infertune import backends
from infertune._io import json_default, write_json, write_npz
from infertune.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    CheckFailed,
    InfertuneError,
    UsageError,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


# ---- shared option groups -----------------------------------------------------------------------
def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one machine-readable JSON document on stdout.")(f)


def output_option(f: Callable) -> Callable:
    return click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                        help="Also write the result as JSON to this file.")(f)


def data_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--data", "data", metavar="D",
                     help="A .npz / .npy file, a directory of them, a directory of images "
                          "(with --preprocess), or 'synthetic' (default)."),
        click.option("--preprocess", type=click.Path(dir_okay=False, path_type=Path),
                     help="JSON preprocessing spec for a directory of images."),
        click.option("--dims", multiple=True, metavar="NAME=SIZE",
                     help="Sizes of symbolic dims, e.g. --dims batch=1,sequence=128."),
        click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Number of synthetic samples."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of synthetic data."),
    ]):
        f = opt(f)
    return f


def backend_options(f: Callable) -> Callable:
    """--backend plus the runtime settings, handed to the command as one ``settings`` argument."""

    @functools.wraps(f)
    def with_settings(*args, threads: int, inter_threads: int, opt_level: str, execution_mode: str,
                      backend_option: tuple[str, ...], **kwargs):
        kwargs["settings"] = backends.Settings(intra_op_threads=threads, inter_op_threads=inter_threads,
                                               graph_optimization=opt_level, execution_mode=execution_mode,
                                               options=_parse_options(backend_option))
        return f(*args, **kwargs)

    for opt in reversed([
        click.option("--backend", default="ort", show_default=True,
                     help=f"Runtime backend ({', '.join(backends.names())})."),
        click.option("--threads", type=click.IntRange(min=0), default=0,
                     help="Intra-op threads (0 = runtime default)."),
        click.option("--inter-threads", type=click.IntRange(min=0), default=0,
                     help="Inter-op threads (0 = runtime default)."),
        click.option("--opt-level", type=click.Choice(backends.GRAPH_OPTIMIZATION_LEVELS),
                     default="all", show_default=True, help="Graph optimisation level."),
        click.option("--execution-mode", type=click.Choice(backends.EXECUTION_MODES),
                     default="sequential", show_default=True),
        click.option("--option", "backend_option", multiple=True, metavar="KEY=VALUE",
                     help="Backend option (repeatable): session.* for ONNX Runtime, UPPER_CASE OpenVINO "
                          "properties, GPU options (fp16, engine_cache, timing_cache, cuda_graph, "
                          "builder_optimization_level, profile_shapes, streams, ...)."),
    ]):
        with_settings = opt(with_settings)
    return with_settings


def _parse_options(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _dataset(model, data, preprocess, dims, samples, seed):
    from infertune.data import load_dataset, parse_dims

    return load_dataset(data, model, dims=parse_dims(dims), samples=samples, seed=seed,
                        preprocess=preprocess)


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable]:
    """A transient rich progress bar on stderr; yields ``update(done, total)``."""
    if not enabled or not err.is_terminal:
        yield lambda done, total: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            prog.update(task, completed=done, total=total)

        yield update


def _emit(result, as_json: bool, output: Path | None, human: Callable[[], None]) -> None:
    _emit_doc(result.to_dict(), as_json, output, human)


def _emit_doc(doc: dict, as_json: bool, output: Path | None, human: Callable[[], None]) -> None:
    if output is not None:
        write_json(output, doc)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=json_default))
    else:
        human()
        if output is not None:
            err.print(f"wrote {output}")


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.{digits}f}"
    return str(v)


def _si(n: float, unit: str = "") -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".strip()


# ---- the group ------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="infertune")
def cli() -> None:
    """infertune: the fastest deployable variant of an ONNX model within an accuracy budget."""


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--dims", multiple=True, metavar="NAME=SIZE",
              help="Sizes of symbolic dims for FLOPs (a leading batch dim defaults to 1).")
@click.option("--nodes", "show_nodes", type=int, default=10, show_default=True,
              help="Show the N nodes with most FLOPs.")
@json_option
@output_option
def inspect(model: Path, dims: tuple[str, ...], show_nodes: int, as_json: bool,
            output: Path | None) -> None:
    """Inputs, outputs, op histogram, parameters and FLOPs of MODEL."""
    from infertune.data import parse_dims
    from infertune.model import Model
    from infertune.model_stats import inspect_model

    stats = inspect_model(Model.load(model), dims=parse_dims(dims))

    def human() -> None:
        out.print(f"[bold]{stats.name}[/]  opset {stats.opset}, IR {stats.ir_version}"
                  f"{', ' + stats.producer if stats.producer else ''}")
        io = Table(title="inputs and outputs", title_justify="left")
        for col in ("", "name", "dtype", "shape"):
            io.add_column(col)
        for kind, infos in (("in", stats.inputs), ("out", stats.outputs)):
            for i in infos:
                io.add_row(kind, escape(i.name), i.dtype, escape(i.shape_str()))
        out.print(io)
        counted = len(stats.nodes)
        flops = (f"at least {_si(stats.flops, 'FLOP')} ({len(stats.uncounted)} of {counted + len(stats.uncounted)} "
                 "nodes unknown)" if stats.uncounted else _si(stats.flops, 'FLOP'))
        out.print(f"parameters: {stats.parameter_count:,} ({_si(stats.parameter_bytes, 'B')})   "
                  f"nodes: {stats.node_count}   FLOPs: {flops} "
                  f"(dims {escape(', '.join(f'{k}={v}' for k, v in stats.dims.items())) or 'fixed'})")
        ops = Table(title="op types", title_justify="left")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        ops.add_column("FLOPs", justify="right")
        for op, count in stats.op_histogram.items():
            f = stats.flops_by_op_type.get(op)
            ops.add_row(op, str(count), _si(f) if f else "")
        out.print(ops)
        if show_nodes and stats.nodes:
            top = Table(title=f"top {show_nodes} nodes by FLOPs", title_justify="left")
            for col in ("node", "op", "FLOPs", "share"):
                top.add_column(col, justify="right" if col in ("FLOPs", "share") else "left")
            for nf in sorted(stats.nodes, key=lambda n: -n.macs)[:show_nodes]:
                top.add_row(escape(nf.node), nf.op_type, _si(nf.flops),
                            f"{nf.flops / stats.flops:.1%}" if stats.flops else "")
            out.print(top)
        if stats.uncounted:
            where: dict[str, str] = {}  # the first input axis each unresolved dim names
            for i in stats.inputs:
                for axis, d in enumerate(i.shape or ()):
                    if isinstance(d, str):
                        where.setdefault(d, f"{i.name} axis {axis}")
            hint = "; give " + " ".join(f"--dims '{d}=N' ({where.get(d, 'an input')})" for d in stats.unresolved_dims)
            err.print(f"[yellow]warning:[/] FLOPs of {len(stats.uncounted)} node(s) unknown "
                      f"(shapes not inferable): {escape(', '.join(stats.uncounted[:5]))}"
                      + (escape(hint) if stats.unresolved_dims else ""))
        if stats.renamed_nodes:
            err.print(f"note: {len(stats.renamed_nodes)} node(s) had empty or duplicate names and "
                      f"were given unique ones (e.g. {next(iter(stats.renamed_nodes))})")
        if stats.has_subgraphs:
            err.print("note: the model has If/Loop/Scan subgraphs: their nodes are counted in the "
                      "op histogram but not in FLOPs")

    _emit(stats, as_json, output, human)


@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per run (along the dynamic batch dim).")
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--check", "checks", multiple=True, metavar="EXPR",
              help="Pass/fail check, e.g. 'cosine>=0.999', 'sqnr>=30', 'top1_drop<=0.5'. "
                   "Default: every element allclose at --atol/--rtol.")
@click.option("--layerwise", is_flag=True,
              help="Compare every intermediate tensor too and name where divergence starts.")
@click.option("--threshold-db", type=float, default=20.0, show_default=True,
              help="With --layerwise: the SQNR below which a tensor has diverged.")
@backend_options
@json_option
@output_option
def compare(reference: Path, candidate: Path, data, preprocess, dims, samples, seed, batch,
            atol, rtol, checks, layerwise, threshold_db, backend, settings, as_json, output) -> None:
    """Compare CANDIDATE's outputs with REFERENCE (an ONNX model or saved outputs .npz)."""
    from infertune.analysis.compare import compare as run_compare
    from infertune.data import batched
    from infertune.model import Model

    cand = Model.load(candidate)
    ds = batched(_dataset(cand, data, preprocess, dims, samples, seed), batch)
    if layerwise:
        from infertune.cli_analysis import run_layerwise

        return run_layerwise(reference, cand, ds, threshold_db, settings, as_json, output)
    with progress_bar("comparing", not as_json) as update:
        result = run_compare(str(reference) if reference.suffix == ".npz" else reference, cand,
                             ds, atol=atol, rtol=rtol, checks=list(checks), backend=backend,
                             settings=settings, progress=update)

    def human() -> None:
        out.print(f"[bold]{result.candidate}[/] vs [bold]{result.reference}[/]: "
                  f"{result.samples} sample runs" +
                  (f", {result.skipped} skipped" if result.skipped else ""))
        t = Table()
        cols = ("output", "max abs", "mean abs", "max rel", "cosine", "cos min", "SQNR dB",
                "allclose", "top-1 agree")
        for c in cols:
            t.add_column(c, justify="left" if c == "output" else "right")
        for o in result.outputs:
            m = o.metrics
            t.add_row(o.name, _fmt(m["max_abs"]), _fmt(m["mean_abs"]), _fmt(m["max_rel"]),
                      _fmt(m["cosine"], 6), _fmt(m["cosine_min"], 6), _fmt(m["sqnr_db"], 1),
                      _fmt(m["allclose_frac"]), _fmt(m["top1_agreement"]))
        out.print(t)
        if result.accuracy:
            a = result.accuracy
            out.print(f"top-1 on {a['labelled']} labels: reference {a['reference_top1']:.2f}%, "
                      f"candidate {a['candidate_top1']:.2f}% (drop {a['top1_drop']:+.2f} points)")
        for c in result.checks:
            mark = "[green]pass[/]" if c.passed else "[red]FAIL[/]"
            out.print(f"{mark}  {c.check} on {c.target}: {_fmt(c.value, 6)}")
        for w in result.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)

    _emit(result, as_json, output, human)
    if not result.passed:
        failed = [c for c in result.checks if not c.passed]
        raise CheckFailed(f"{len(failed)} check(s) failed: " +
                          ", ".join(f"{c.check} on {c.target}" for c in failed[:3]))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Exact number of timed runs (default: run for --time seconds).")
@click.option("--time", "time_budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget in seconds (default 3; at least 10 runs).")
@click.option("--save-optimized", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the graph the runtime actually executes, after its optimisations.")
@click.option("--preallocate", is_flag=True,
              help="Bind input/output buffers once and reuse them (I/O binding): no allocation per run.")
@click.option("--sweep", "sweep_axes", multiple=True, metavar="AXIS=V1,V2",
              help="Sweep batch, threads, sessions (concurrent) or opt, e.g. --sweep batch=1,2,4,8 "
                   "--sweep threads=1,2; reports throughput, latency and peak memory per point and the knee.")
@backend_options
@json_option
@output_option
def bench(model: Path, data, preprocess, dims, samples, seed, batch, warmup, iterations,
          time_budget, save_optimized, preallocate, sweep_axes, backend, settings, as_json, output) -> None:
    """Latency percentiles and throughput of MODEL (or a sweep over settings)."""
    from dataclasses import replace

    from infertune.bench.latency import bench as run_bench
    from infertune.data import parse_dims
    from infertune.model import Model

    m = Model.load(model)
    ds = None if data in (None, "synthetic") else _dataset(m, data, preprocess, dims, samples,
                                                             seed)
    settings = replace(settings, optimized_model_path=str(save_optimized) if save_optimized else None,
                       preallocate=preallocate)
    if sweep_axes:
        from infertune.cli_perf import run_sweep

        run_sweep(m, ds, sweep_axes, settings, time_budget, as_json, output)
        return
    with progress_bar("benchmarking", not as_json) as update:
        r = run_bench(m, ds, backend=backend, settings=settings, batch_size=batch, warmup=warmup,
                      iterations=iterations, time_budget_s=time_budget, dims=parse_dims(dims),
                      progress=update)

    def human() -> None:
        lat = r.latency_ms
        shapes = ", ".join(f"{k} {v}" for k, v in r.input_shapes.items())
        out.print(f"[bold]{r.model}[/] on {r.backend} ({shapes}; threads {settings.intra_op_threads or 'default'}, "
                  f"opt {settings.graph_optimization}): {r.iterations} runs in "
                  f"{r.wall_s:.2f} s after {r.warmup} warm-up")
        t = Table()
        for c in ("min", "p50", "p90", "p99", "mean", "std", "CoV", "throughput"):
            t.add_column(c, justify="right")
        t.add_row(*(f"{v:.3f} ms" for v in (lat.min, lat.p50, lat.p90, lat.p99, lat.mean,
                                             lat.std)),
                  f"{lat.cov:.1%}", f"{r.throughput:,.1f}/s")
        out.print(t)
        cpu = r.environment["machine"]["cpu"]
        out.print(f"[dim]{cpu['model']}, {cpu['logical_cores']} cores, "
                  f"{' '.join(cpu['isa'])}; {', '.join(f'{k} {v}' for k, v in r.environment['versions'].items())}[/]")
        if save_optimized:
            err.print(f"optimised graph saved to {save_optimized}")
        for w in r.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)

    _emit(r, as_json, output, human)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the outputs (.npz, one array per output, rows = samples).")
@backend_options
def run(model: Path, data, preprocess, dims, samples, seed, batch, output, backend, settings) -> None:
    """Run MODEL on data and save its outputs (a reference for `compare`)."""
    import numpy as np

    from infertune.data import FeedValidator, batched
    from infertune.model import Model

    m = Model.load(model)
    ds = batched(_dataset(m, data, preprocess, dims, samples, seed), batch)
    runner = backends.compile(m, settings,
                              backend=backend)
    validator = FeedValidator(m, nonfinite="keep")
    collected: dict[str, list] = {n: [] for n in runner.output_names}
    with progress_bar("running") as update:
        for i, raw in enumerate(ds):
            outs = runner.run(validator(raw))
            for n in collected:
                collected[n].append(outs[n])
            update(i + 1, ds.size)
    validator.finish(ds.name)
    write_npz(output, {n: np.concatenate(v, axis=0) for n, v in collected.items()})
    err.print(f"wrote {validator.feeds_seen} runs of {len(collected)} output(s) to {output}")
    for w in validator.warnings():
        err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)


from infertune import cli_analysis, cli_doctor, cli_export, cli_perf, cli_quantize, cli_tune  # noqa: E402, F401  (register their commands on the group)


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes; user errors print one line, no traceback."""
    try:
        cli.main(args=argv, prog_name="infertune", standalone_mode=False)
    except CheckFailed as e:
        err.print(f"[red]check failed:[/] {escape(str(e))}", soft_wrap=True)
        return EXIT_CHECK_FAILED
    except InfertuneError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        return e.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return EXIT_BAD_INPUT
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
