"""``infertune inspect`` (what a model is) and ``infertune run`` (its outputs on data, saved)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from infertune import backends
from infertune._io import write_npz
from infertune.cli.common import (
    backend_options,
    data_options,
    emit,
    err,
    fix_option,
    json_option,
    load_data,
    out,
    output_option,
    progress_bar,
    provenance,
    si,
    specialised,
    table,
)


@click.command()
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
    from infertune.analysis.model_stats import inspect_model
    from infertune.data import parse_dims
    from infertune.model import Model, dim_key
    from infertune.outputs import Guard

    output = Guard.of(model).file(output)
    stats = inspect_model(Model.load(model), dims=parse_dims(dims))

    def human() -> None:
        out.print(f"[bold]{stats.name}[/]  opset {stats.opset}, IR {stats.ir_version}"
                  f"{', ' + stats.producer if stats.producer else ''}")
        io = table(("", "name", "dtype", "shape"), title="inputs and outputs")
        for kind, infos in (("in", stats.inputs), ("out", stats.outputs)):
            for i in infos:
                io.add_row(kind, escape(i.name), i.dtype, escape(i.shape_str()))
        out.print(io)
        counted = len(stats.nodes)
        flops = (f"at least {si(stats.flops, 'FLOP')} ({len(stats.uncounted)} of {counted + len(stats.uncounted)} "
                 "nodes unknown)" if stats.uncounted else si(stats.flops, 'FLOP'))
        out.print(f"parameters: {stats.parameter_count:,} ({si(stats.parameter_bytes, 'B')})   "
                  f"nodes: {stats.node_count}   FLOPs: {flops} "
                  f"(dims {escape(', '.join(f'{k}={v}' for k, v in stats.dims.items())) or 'fixed'})")
        ops = table(("op", "count", "FLOPs"), numeric=("count", "FLOPs"), title="op types")
        for op, count in stats.op_histogram.items():
            f = stats.flops_by_op_type.get(op)
            ops.add_row(op, str(count), si(f) if f else "")
        out.print(ops)
        if show_nodes and stats.nodes:
            top = table(("node", "op", "FLOPs", "share"), numeric=("FLOPs", "share"),
                        title=f"top {show_nodes} nodes by FLOPs")
            for nf in sorted(stats.nodes, key=lambda n: -n.macs)[:show_nodes]:
                top.add_row(escape(nf.node), nf.op_type, si(nf.flops),
                            f"{nf.flops / stats.flops:.1%}" if stats.flops else "")
            out.print(top)
        if stats.uncounted:
            where: dict[str, str] = {}  # the first input axis each unresolved dim names
            for i in stats.inputs:
                for axis, d in enumerate(i.shape or ()):
                    if not isinstance(d, int):
                        where.setdefault(dim_key(i.name, axis, d), f"{i.name} axis {axis}")
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

    emit(stats.to_dict(), as_json, output, human)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the outputs (.npz, one array per output, rows = samples).")
@fix_option
@backend_options
@json_option
def run(model: Path, data, preprocess, dims, samples, seed, batch, output, fix, backend, settings, as_json) -> None:
    """Run MODEL on data and save its outputs (a reference for `compare`)."""
    import numpy as np

    from infertune.data import FeedValidator, batched
    from infertune.model import Model
    from infertune.outputs import Guard

    output = Guard.of(model, data, preprocess).file(output)
    m = Model.load(model)
    loaded = load_data(m, data, preprocess, dims, samples, seed)
    m, fixed = specialised(m, [loaded], fix, backend, settings)
    ds = batched(loaded, batch)
    runner = backends.compile(m, settings, backend=backend)
    validator = FeedValidator(m, nonfinite="keep")
    collected: dict[str, list] = {n: [] for n in runner.output_names}
    with progress_bar("running", not as_json) as update:
        for i, raw in enumerate(ds):
            outs = runner.run(validator(raw))
            for n in collected:
                collected[n].append(outs[n])
            update(i + 1, ds.size)
    validator.finish(ds.name)
    write_npz(output, {n: np.concatenate(v, axis=0) for n, v in collected.items()})
    warnings = validator.warnings()
    if validator.all_constant():
        warnings.append(f"every input is constant ({validator.constant_text()})")
    doc = {"kind": "run", "model": str(model), "backend": backend, "runs": validator.feeds_seen,
           "outputs": list(collected), "written": str(output), "warnings": warnings, **provenance(fixed, data=loaded)}

    def human() -> None:
        err.print(f"wrote {validator.feeds_seen} runs of {len(collected)} output(s) on {backend} to {output}")
        for w in warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)

    emit(doc, as_json, None, human)


COMMANDS = (inspect, run)
