"""``infertune bench`` (latency, throughput, sweeps), ``profile`` and ``explain A B``: where the time goes."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from infertune.cli.common import (
    backend_options,
    data_options,
    emit,
    err,
    fix_option,
    fmt,
    json_option,
    load_data,
    out,
    output_option,
    progress_bar,
    provenance,
    specialised,
    table,
)
from infertune.perf.isolated import DEFAULT_ROUNDS, DEFAULT_WINDOW_S


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Exact number of timed runs (default: run for --time seconds).")
@click.option("--time", "time_budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget in seconds (default 3; at least 10 runs); with --isolate, per model and round.")
@click.option("--save-optimized", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the graph the runtime actually executes, after its optimisations.")
@click.option("--preallocate", is_flag=True,
              help="Bind input/output buffers once and reuse them (I/O binding): no allocation per run.")
@click.option("--sweep", "sweep_axes", multiple=True, metavar="AXIS=V1,V2",
              help="Sweep batch, threads, sessions (concurrent) or opt, e.g. --sweep batch=1,2,4,8 "
                   "--sweep threads=1,2; reports throughput, latency and peak memory per point and the knee.")
@click.option("--isolate", is_flag=True,
              help="Time each model in its own fresh process, alternated over --rounds rounds (implied by "
                   "several MODELs): the ratios between them are side by side.")
@click.option("--rounds", type=click.IntRange(min=1), default=DEFAULT_ROUNDS, show_default=True,
              help="With --isolate: rounds; in each, every model's process times --time seconds (default "
                   f"{DEFAULT_WINDOW_S:g}) in turn. The median of rounds is reported.")
@fix_option
@backend_options
@json_option
@output_option
def bench(models: tuple[Path, ...], data, preprocess, dims, samples, seed, batch, warmup, iterations,
          time_budget, save_optimized, preallocate, sweep_axes, isolate, rounds, fix, backend, settings, as_json,
          output) -> None:
    """Latency percentiles and throughput of MODEL (or a sweep over settings); several MODELs (or
    --isolate): each timed in its own process, side by side."""
    from dataclasses import replace

    from infertune.data import parse_dims
    from infertune.errors import UsageError
    from infertune.model import Model
    from infertune.outputs import Guard
    from infertune.perf.latency import bench as run_bench

    guard = Guard.of(*models, data, preprocess)
    output, save_optimized = guard.file(output), guard.file(save_optimized, "--save-optimized")
    if isolate or len(models) > 1:
        bad = [f for f, v in (("--sweep", sweep_axes), ("--save-optimized", save_optimized),
                              ("--iterations", iterations), ("--preallocate", preallocate), ("--fix", fix)) if v]
        if bad:
            raise UsageError(f"{bad[0]} times one model in this process; it does not combine with --isolate or "
                             "several models")
        return run_isolated(models, data, preprocess, dims, samples, seed, batch, rounds, time_budget, backend,
                            settings, as_json, output)
    m = Model.load(models[0])
    ds = None if data in (None, "synthetic") else load_data(m, data, preprocess, dims, samples,
                                                             seed)
    m, fixed = specialised(m, [ds], fix, backend, settings)
    settings = replace(settings, optimized_model_path=str(save_optimized) if save_optimized else None,
                       preallocate=preallocate)
    if sweep_axes:
        run_sweep(m, ds, sweep_axes, backend, settings, time_budget, as_json, output, provenance(fixed, data=ds))
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
        cols = ("min", "p50", "p90", "p99", "mean", "std", "CoV", "throughput")
        t = table(cols, numeric=cols)
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

    emit({**r.to_dict(), **provenance(fixed, data=ds)}, as_json, output, human)


def run_isolated(models, data, preprocess, dims, samples, seed, batch, rounds, seconds, backend, settings,
                 as_json: bool, output) -> None:
    from infertune.data import parse_dims
    from infertune.model import Model
    from infertune.perf.isolated import bench_isolated

    loaded = [Model.load(p) for p in models]
    ds = None if data in (None, "synthetic") else load_data(loaded[0], data, preprocess, dims, samples, seed)
    with progress_bar(f"timing {len(loaded)} model(s), each in its own process, {rounds} round(s)", not as_json):
        r = bench_isolated(loaded, ds, backend=backend, settings=settings, batch_size=batch, dims=parse_dims(dims),
                           rounds=rounds, seconds=seconds or DEFAULT_WINDOW_S)

    def human() -> None:
        out.print(f"on {backend}, inputs {', '.join(f'{k} {v}' for k, v in r.input_shapes.items())}: each model "
                  f"in its own process, {rounds} round(s) of {r.seconds_per_round:g} s, order alternated")
        t = table(("model", "p50 ms (median of rounds)", "rounds ms", "spread", "vs first"),
                  numeric=("p50 ms (median of rounds)", "spread", "vs first"))
        first = r.latencies[0].p50_ms
        for lat in r.latencies:
            t.add_row(escape(lat.key), f"{lat.p50_ms:.3f}", " ".join(f"{v:.3f}" for v in lat.rounds_ms),
                      f"{lat.spread:.1%}", f"{lat.p50_ms / first:.3f}x")
        out.print(t)

    emit(r.to_dict(), as_json, output, human)


def run_sweep(model, ds, specs, backend: str, settings, seconds, as_json: bool, output, extra: dict) -> None:
    from infertune.perf.sweep import parse_sweep, sweep

    axes = parse_sweep(specs)
    with progress_bar("sweeping", not as_json) as update:
        r = sweep(model, ds, axes, settings=settings, seconds=seconds or 1.0, backend=backend, progress=update)

    def human() -> None:
        out.print(f"[bold]{r.model}[/]: {len(r.points)} configurations, {r.seconds_per_point:g} s each")
        cols = ("batch", "threads", "sessions", "opt", "p50 ms", "p99 ms", "throughput/s", "peak RSS MB")
        t = table(cols, numeric=[c for c in cols if c != "opt"])
        best = r.best()
        for p in r.points:
            style = "bold green" if p is best else None
            t.add_row(str(p.batch), str(p.threads or "default"), str(p.sessions), p.opt,
                      f"{p.latency_ms.p50:.3f}", f"{p.latency_ms.p99:.3f}", f"{p.throughput:,.1f}",
                      fmt(p.peak_rss_mb, 1), style=style)
        out.print(t)
        for k in r.knees:
            fixed = ", ".join(f"{a}={v}" for a, v in k.fixed.items())
            out.print(f"knee along {k.axis} ({fixed}): [bold]{k.at}[/] "
                      f"(beyond it throughput grows < 10 % per step)")

    emit({**r.to_dict(), **extra}, as_json, output, human)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Profiled runs (after --warmup runs that are discarded).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the Chrome trace (open in Perfetto or chrome://tracing).")
@click.option("--save-optimized", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the optimised graph the node names refer to.")
@click.option("--roofline", "with_roofline", is_flag=True,
              help="Measure (once, cached) the machine's GEMM ceilings and report achieved GFLOP/s against them.")
@click.option("--top", type=int, default=15, show_default=True, help="Show the N slowest nodes.")
@backend_options
@json_option
@output_option
def profile(model: Path, data, preprocess, dims, samples, seed, batch, runs, warmup, trace, save_optimized,
            with_roofline, top, backend, settings, as_json, output) -> None:
    """Per-node and per-op-type time of MODEL on the graph ONNX Runtime executes."""
    from infertune.data import parse_dims
    from infertune.model import Model
    from infertune.outputs import Guard
    from infertune.perf.profile import profile as run_profile

    guard = Guard.of(model, data, preprocess)
    output, trace = guard.file(output), guard.file(trace, "--trace")
    save_optimized = guard.file(save_optimized, "--save-optimized")
    m = Model.load(model)
    ds = None if data in (None, "synthetic") else load_data(m, data, preprocess, dims, samples, seed)
    with progress_bar("profiling", not as_json) as update:
        r = run_profile(m, ds, settings=settings, batch_size=batch, runs=runs, warmup=warmup, trace=trace,
                        optimized_model=save_optimized, progress=update, backend=backend, dims=parse_dims(dims))
    doc = r.to_dict()
    roof = None
    if with_roofline:
        from infertune.perf.roofline import ceilings, roofline

        with progress_bar("measuring ceilings", not as_json):
            roof = roofline(m, r, ceilings(settings.intra_op_threads))
        doc["roofline"] = roof.to_dict()

    def human() -> None:
        out.print(f"[bold]{r.model}[/] batch {r.batch_size}: {r.run_us / 1000:.3f} ms per run under the profiler "
                  f"({r.runs} runs); kernels account for {r.coverage:.0%} of it")
        t = table(("op type", "nodes", "µs / run", "share"), numeric=("nodes", "µs / run", "share"),
                  title="per op type")
        for o in r.op_types:
            t.add_row(o.op_type, str(o.nodes), f"{o.mean_us:.1f}", f"{o.share:.1%}")
        out.print(t)
        t = table(("node", "op type", "µs / run", "share", "output shape"), numeric=("µs / run", "share"),
                  title=f"slowest {top} nodes (optimised graph)")
        for n in r.nodes[:top]:
            shape = " ".join(str(s) for _, s in n.output_shapes[:1])
            t.add_row(escape(n.node), n.op_type, f"{n.mean_us:.1f}", f"{n.share:.1%}", shape)
        out.print(t)
        if roof is not None:
            c = roof.ceilings
            out.print(f"ceilings ({c.threads} threads): FP32 {c.fp32_gflops:.1f} GFLOP/s, INT8 {c.int8_gops:.1f} "
                      f"GOP/s, memory {c.bandwidth_gbs:.1f} GB/s")
            out.print(f"whole model: {roof.model_gflops:.2f} GFLOP/s = {roof.model_gflops / roof.peak:.1%} of the "
                      f"{'INT8' if roof.int8 else 'FP32'} peak")
            for o in roof.op_classes:
                out.print(f"  {o.op_class}: {o.gflops:.2f} GFLOP/s ({o.fraction_of_peak:.1%} of peak), "
                          f"{o.us:.1f} µs per run")
        if trace:
            err.print(f"Chrome trace written to {trace}")

    emit(doc, as_json, output, human)


@click.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True)
@backend_options
@json_option
@output_option
def explain(a: Path, b: Path, data, preprocess, dims, samples, seed, batch, runs, backend, settings, as_json,
            output) -> None:
    """Why B (e.g. INT8) is slower or faster than A (e.g. FP32): per op type, unfused Q/DQ, suggestions."""
    from infertune.data import parse_dims
    from infertune.model import Model
    from infertune.outputs import Guard
    from infertune.perf.explain import explain as run_explain

    output = Guard.of(a, b, data, preprocess).file(output)
    ma = Model.load(a)
    mb = Model.load(b)
    ds = None if data in (None, "synthetic") else load_data(ma, data, preprocess, dims, samples, seed)
    with progress_bar("profiling both", not as_json):
        r = run_explain(ma, mb, ds, settings=settings, batch_size=batch, runs=runs, backend=backend,
                        dims=parse_dims(dims))

    def human() -> None:
        fa, fb = r.a, r.b
        verdict = "slower" if r.ratio > 1 else "faster"
        out.print(f"[bold]{fb.model}[/] {fb.run_us / 1000:.3f} ms vs [bold]{fa.model}[/] {fa.run_us / 1000:.3f} ms "
                  f"per run: B is {max(r.ratio, 1 / r.ratio):.2f}x {verdict}")
        t = table(("op type", "A", "B", "B - A"), numeric=("A", "B", "B - A"), title="time per op type (µs per run)")
        types = sorted(set(fa.op_types) | set(fb.op_types),
                       key=lambda k: -max(fa.op_types.get(k, 0.0), fb.op_types.get(k, 0.0)))
        for k in types:
            va, vb = fa.op_types.get(k, 0.0), fb.op_types.get(k, 0.0)
            t.add_row(k, f"{va:.1f}", f"{vb:.1f}", f"{vb - va:+.1f}")
        out.print(t)
        t = table(("", "A", "B"), numeric=("A", "B"), title="what each runs")
        for label, attr in (("int8 kernels", "int8_kernels"), ("float compute ops", "float_compute"),
                            ("unfused QuantizeLinear", "unfused_q"), ("unfused DequantizeLinear", "unfused_dq"),
                            ("  of which weight DQ", "weight_dq"), ("reorders / transposes", "reorders")):
            t.add_row(label, str(getattr(fa, attr)), str(getattr(fb, attr)))
        t.add_row("Q/DQ time µs", f"{fa.qdq_us:.1f}", f"{fb.qdq_us:.1f}")
        t.add_row("reorder time µs", f"{fa.reorder_us:.1f}", f"{fb.reorder_us:.1f}")
        out.print(t)
        if fb.sandwiches:
            out.print(f"{len(fb.sandwiches)} float ops sandwiched between DQ and Q in B, costliest: "
                      + ", ".join(f"{escape(s.node)} ({s.op_type}, Q/DQ {s.qdq_us:.1f} µs)"
                                  for s in fb.sandwiches[:5]))
        for line in r.isa:
            out.print(f"[dim]ISA: {line}[/]")
        for s in r.suggestions:
            out.print(f"[bold]suggestion:[/] {escape(s.text)}")
        excl = [n for s in r.suggestions for n in s.exclude]
        if excl:
            out.print("apply: infertune quantize ... " + " ".join(f"--exclude {escape(n)}" for n in excl[:10]))

    emit(r.to_dict(), as_json, output, human)


COMMANDS = (bench, profile, explain)
