"""``infertune compare`` (outputs, or every tensor with --layerwise) and ``infertune diagnose-preprocess``."""

from __future__ import annotations

import math
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
    load_metric,
    metric_option,
    out,
    output_option,
    progress_bar,
    provenance,
    specialised,
    table,
)
from infertune.errors import CheckFailed


@click.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@data_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per run (along the dynamic batch dim).")
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--check", "checks", multiple=True, metavar="EXPR",
              help="Pass/fail check, e.g. 'cosine>=0.999', 'sqnr>=30', 'top1_drop<=0.5'. "
                   "Default: every element allclose at --atol/--rtol. With --metric: 'metric>=X'.")
@metric_option
@fix_option
@click.option("--layerwise", is_flag=True,
              help="Compare every intermediate tensor too and name where divergence starts.")
@click.option("--threshold-db", type=float, default=20.0, show_default=True,
              help="With --layerwise: the SQNR below which a tensor has diverged.")
@backend_options
@json_option
@output_option
def compare(reference: Path, candidate: Path, data, preprocess, dims, samples, seed, batch,
            atol, rtol, checks, metric, fix, layerwise, threshold_db, backend, settings, as_json, output) -> None:
    """Compare CANDIDATE's outputs with REFERENCE (an ONNX model or saved outputs .npz)."""
    from infertune.analysis.compare import compare as run_compare
    from infertune.data import batched
    from infertune.model import Model
    from infertune.outputs import Guard

    output = Guard.of(reference, candidate, data, preprocess).file(output)
    user_metric = load_metric(metric)
    if user_metric is not None and layerwise:
        from infertune.errors import UsageError

        raise UsageError("--metric compares final outputs; it does not apply to --layerwise")
    cand = Model.load(candidate)
    raw = load_data(cand, data, preprocess, dims, samples, seed)
    cand, fixed = specialised(cand, [raw], fix, backend, settings)
    ref = reference
    if fixed and reference.suffix != ".npz":  # the reference gets the same inputs fixed, checked the same way
        from infertune.analysis.specialization import specialise

        ref = specialise(Model.load(reference), [raw], fixed.values, detect=False, backend=backend,
                         settings=settings).model
    ds = batched(raw, batch)
    if layerwise:
        return run_layerwise(ref, cand, ds, threshold_db, backend, settings, as_json, output)
    with progress_bar("comparing", not as_json) as update:
        result = run_compare(str(reference) if reference.suffix == ".npz" else ref, cand,
                             ds, atol=atol, rtol=rtol, checks=list(checks), backend=backend,
                             settings=settings, progress=update, metric=user_metric)

    def human() -> None:
        out.print(f"[bold]{result.candidate}[/] vs [bold]{result.reference}[/]: "
                  f"{result.samples} sample runs" +
                  (f", {result.skipped} skipped" if result.skipped else ""))
        cols = ("output", "max abs", "mean abs", "max rel", "cosine", "cos min", "SQNR dB",
                "allclose", "top-1 agree")
        t = table(cols, numeric=cols[1:])
        for o in result.outputs:
            m = o.metrics
            t.add_row(escape(o.name), fmt(m["max_abs"]), fmt(m["mean_abs"]), fmt(m["max_rel"]),
                      fmt(m["cosine"], 6), fmt(m["cosine_min"], 6), fmt(m["sqnr_db"], 1),
                      fmt(m["allclose_frac"]), fmt(m["top1_agreement"]))
        out.print(t)
        if result.accuracy:
            a = result.accuracy
            out.print(f"top-1 on {a['labelled']} labels: reference {a['reference_top1']:.2f}%, "
                      f"candidate {a['candidate_top1']:.2f}% (drop {a['top1_drop']:+.2f} points)")
        if result.metric:
            out.print(f"{result.metric['name']}: {fmt(result.metric['value'], 6)}")
        for c in result.checks:
            mark = "[green]pass[/]" if c.passed else "[red]FAIL[/]"
            out.print(f"{mark}  {c.check} on {c.target}: {fmt(c.value, 6)}")
        for w in result.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)

    emit({**result.to_dict(), **provenance(fixed, data=raw)}, as_json, output, human)
    if not result.passed:
        failed = [c for c in result.checks if not c.passed]
        raise CheckFailed(f"{len(failed)} check(s) failed: " +
                          ", ".join(f"{c.check} on {c.target}" for c in failed[:3]))


def run_layerwise(reference, cand, ds, threshold_db: float, backend: str, settings, as_json: bool,
                  output) -> None:
    from infertune.analysis.layerwise import layerwise
    from infertune.errors import UsageError

    if isinstance(reference, Path) and reference.suffix == ".npz":
        raise UsageError("--layerwise needs the reference model, not saved outputs")
    with progress_bar("layerwise", not as_json) as update:
        r = layerwise(reference, cand, ds, threshold_db=threshold_db, settings=settings, backend=backend,
                      progress=update)

    def human() -> None:
        out.print(f"[bold]{r.candidate}[/] vs [bold]{r.reference}[/]: {len(r.tensors)} tensors over {r.samples} runs")
        out.print(("[red]" if r.first_divergence else "[green]") + escape(r.message()) + "[/]")
        t = table(("tensor", "node", "op", "upstream dB", "here dB", "drop dB", "cosine"),
                  numeric=("upstream dB", "here dB", "drop dB", "cosine"),
                  title="largest SQNR drops (the node's own contribution)")
        for row in r.largest_drops(10):
            t.add_row(escape(row.tensor), escape(row.node or "(input)"), row.op_type or "",
                      _db(row.upstream_db), _db(row.sqnr_db), fmt(row.drop_db, 1), fmt(row.cosine, 5))
        out.print(t)

    emit(r.to_dict(), as_json, output, human)


def _db(v: float) -> str:
    return "exact" if math.isinf(v) and v > 0 else fmt(v, 1)


@click.command("diagnose-preprocess")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--spec", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The preprocessing spec in use (JSON).")
@click.option("--reference-spec", type=click.Path(dir_okay=False, path_type=Path),
              help="The preprocessing the model expects (JSON).")
@click.option("--reference-outputs", type=click.Path(dir_okay=False, path_type=Path),
              help="What the outputs should be: .npz, one array per output, one row per image (sorted by name).")
@click.option("--input", "input_name", help="The image input, when the model has several.")
@backend_options
@json_option
@output_option
def diagnose_preprocess(model: Path, images: Path, spec: Path, reference_spec, reference_outputs, input_name,
                        backend, settings, as_json, output) -> None:
    """Find the single preprocessing transform that explains a mismatch, before blaming the model."""
    from infertune._io import load_arrays
    from infertune.analysis.preprocess_diagnosis import diagnose
    from infertune.data import IMAGE_SUFFIXES
    from infertune.errors import DataError, UsageError
    from infertune.model import Model
    from infertune.outputs import Guard
    from infertune.preprocess import PreprocessSpec, load_image

    if (reference_spec is None) == (reference_outputs is None):
        raise UsageError("give exactly one of --reference-spec and --reference-outputs")
    output = Guard.of(model, images, spec, reference_spec, reference_outputs).file(output)
    m = Model.load(model)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images.is_dir() else []
    if not files:
        raise DataError(f"no images found in {images}")
    arrays = load_arrays(reference_outputs, "reference outputs") if reference_outputs is not None else None
    imgs = [load_image(p) for p in files]
    ref_out = None
    if arrays is not None:
        if any(a.ndim == 0 or len(a) != len(imgs) for a in arrays.values()):
            raise DataError(f"reference outputs {reference_outputs}: every array needs one row per image "
                            f"({len(imgs)} images in {images})")
        ref_out = [{k: a[i:i + 1] for k, a in arrays.items()} for i in range(len(imgs))]
    with progress_bar("trying preprocessing variants", not as_json) as update:
        d = diagnose(m, imgs, PreprocessSpec.load(spec), reference_outputs=ref_out,
                     reference_spec=PreprocessSpec.load(reference_spec) if reference_spec else None,
                     input_name=input_name, progress=update, backend=backend, settings=settings)

    def human() -> None:
        out.print(("[green]" if d.explained_by or d.finding.startswith("no preprocessing mismatch") else "[yellow]")
                  + escape(d.finding) + "[/]")
        if d.trials:
            t = table(("transform", "change", "SQNR dB vs reference", "cosine"),
                      numeric=("SQNR dB vs reference", "cosine"), title="variants tried (closest first)")
            for tr in d.trials[:10]:
                t.add_row(tr.variant.transform, escape(tr.variant.description),
                          _db(tr.sqnr_db) if tr.sqnr_db is not None else "rejected", fmt(tr.cosine, 5))
            out.print(t)

    emit(d.to_dict(), as_json, output, human)


COMMANDS = (compare, diagnose_preprocess)
