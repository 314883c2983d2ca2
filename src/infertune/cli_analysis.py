"""``compare --layerwise`` and ``infertune sensitivity``: where accuracy is lost, and which nodes to keep float."""

from __future__ import annotations

import math
from pathlib import Path

import click
import numpy as np
from rich.markup import escape
from rich.table import Table

from infertune.cli import (
    _dataset,
    _emit_doc,
    _fmt,
    backend_options,
    cli,
    data_options,
    json_option,
    out,
    output_option,
    progress_bar,
)
from infertune.quant.methods import METHODS
from infertune.quant.placement import TARGETS


def run_layerwise(reference: Path, cand, ds, threshold_db: float, settings, as_json: bool, output) -> None:
    from infertune.analysis.layerwise import layerwise
    from infertune.errors import UsageError

    if reference.suffix == ".npz":
        raise UsageError("--layerwise needs the reference model, not saved outputs")
    with progress_bar("layerwise", not as_json) as update:
        r = layerwise(reference, cand, ds, threshold_db=threshold_db, settings=settings, progress=update)

    def human() -> None:
        out.print(f"[bold]{r.candidate}[/] vs [bold]{r.reference}[/]: {len(r.tensors)} tensors over {r.samples} runs")
        out.print(("[red]" if r.first_divergence else "[green]") + escape(r.message()) + "[/]")
        t = Table(title="largest SQNR drops (the node's own contribution)", title_justify="left")
        for c in ("tensor", "node", "op", "upstream dB", "here dB", "drop dB", "cosine"):
            t.add_column(c, justify="right" if "dB" in c or c == "cosine" else "left")
        for row in r.largest_drops(10):
            t.add_row(escape(row.tensor), escape(row.node or "(input)"), row.op_type or "",
                      _db(row.upstream_db), _db(row.sqnr_db), _fmt(row.drop_db, 1), _fmt(row.cosine, 5))
        out.print(t)

    _emit_doc(r.to_dict(), as_json, output, human)


def _db(v: float) -> str:
    return "exact" if math.isinf(v) and v > 0 else _fmt(v, 1)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@data_options
@click.option("--eval", "eval_data", metavar="D", help="Evaluation data (default: the calibration data).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--mode", type=click.Choice(["exact", "fast"]), default="exact", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True)
@click.option("--target", type=click.Choice(list(TARGETS)), default="ort-cpu", show_default=True)
@click.option("--exclude", multiple=True, metavar="NODE|op:TYPE|re:REGEX")
@click.option("--top", type=int, default=20, show_default=True, help="Show the N most sensitive nodes.")
@backend_options
@json_option
@output_option
def sensitivity(model: Path, data, preprocess, dims, samples, seed, eval_data, eval_samples, mode, method, target,
                exclude, top, backend, settings, as_json, output) -> None:
    """Rank MODEL's quantized nodes by their effect on the outputs (exact or fast)."""
    from infertune.analysis.sensitivity import sensitivity as run_sensitivity
    from infertune.model import Model

    m = Model.load(model)
    space, evaluator = build_space(m, data, preprocess, dims, samples, seed, eval_data, eval_samples, method,
                                   target, exclude, settings, as_json)
    with progress_bar(f"sensitivity ({mode})", not as_json) as update:
        r = run_sensitivity(space, evaluator, mode=mode, progress=update)

    def human() -> None:
        b = r.baseline
        out.print(f"[bold]{m.name}[/] all {len(space.groups)} groups in INT8: output SQNR {_fmt(b['sqnr_db'], 1)} dB, "
                  f"cosine {_fmt(b['cosine'], 5)}; {mode} mode: {r.forward_passes} passes over "
                  f"{len(evaluator.feeds)} samples, {r.seconds:.1f} s")
        meaning = "output NSR when quantized alone" if mode == "exact" else "injected noise x gain: a ranking"
        t = Table(title=f"most sensitive first ({meaning})", title_justify="left")
        for c in ("rank", "node", "op", "score"):
            t.add_column(c, justify="right" if c in ("rank", "score") else "left")
        for i, g in enumerate(r.groups[:top], 1):
            t.add_row(str(i), escape(g.node), g.op_type, f"{g.score:.3e}")
        out.print(t)
        out.print(f"keep the top ones in float with: infertune quantize {model} --exclude NODE ... "
                  f"or let --budget choose them")

    _emit_doc(r.to_dict(), as_json, output, human)


def build_space(m, data, preprocess, dims, samples, seed, eval_data, eval_samples, method, target, exclude,
                settings, as_json):
    """Calibrate once (every tensor any exclusion set needs) and fix the evaluation feeds."""
    from infertune.analysis.sensitivity import QuantSpace
    from infertune.quant.quantize import quantize

    calib = _dataset(m, data, preprocess, dims, samples, seed)
    with progress_bar("calibrating", not as_json) as update:
        q = quantize(m, calib, method=method, target=target, exclude=exclude, observe_all=True,
                     stability_halves=0, settings=settings, progress=update)
    ev_ds = calib if eval_data is None else _dataset(m, eval_data, preprocess, dims, samples, seed)
    return QuantSpace(m, q), evaluator_for(m, ev_ds, eval_samples, settings)


def evaluator_for(m, ev_ds, eval_samples: int, settings):
    """The first ``eval_samples`` valid feeds of ``ev_ds`` (and their labels, when every one has them)."""
    from infertune.analysis.sensitivity import Evaluator
    from infertune.data import FeedValidator

    validator = FeedValidator(m)
    feeds, labels = [], []
    for raw in ev_ds:
        clean = validator(raw)
        if clean is None:
            continue
        feeds.append(clean)
        if "label" in raw:
            labels.append(raw["label"].reshape(-1))
        if len(feeds) >= eval_samples:
            break
    validator.finish(ev_ds.name)
    lab = np.concatenate(labels) if labels and len(labels) == len(feeds) else None
    return Evaluator(m, feeds, labels=lab, settings=settings)


@cli.command("diagnose-preprocess")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--spec", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The preprocessing spec in use (JSON).")
@click.option("--reference-spec", type=click.Path(dir_okay=False, path_type=Path),
              help="The preprocessing the model expects (JSON).")
@click.option("--reference-outputs", type=click.Path(dir_okay=False, path_type=Path),
              help="What the outputs should be: .npz, one array per output, one row per image (sorted by name).")
@click.option("--input", "input_name", help="The image input, when the model has several.")
@json_option
@output_option
def diagnose_preprocess(model: Path, images: Path, spec: Path, reference_spec, reference_outputs, input_name,
                        as_json, output) -> None:
    """Find the single preprocessing transform that explains a mismatch, before blaming the model."""
    from infertune.analysis.preprocess_diagnosis import diagnose
    from infertune.data import IMAGE_SUFFIXES
    from infertune.errors import DataError, UsageError
    from infertune.model import Model
    from infertune.preprocess import PreprocessSpec, load_image

    if (reference_spec is None) == (reference_outputs is None):
        raise UsageError("give exactly one of --reference-spec and --reference-outputs")
    m = Model.load(model)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images.is_dir() else []
    if not files:
        raise DataError(f"no images found in {images}")
    imgs = [load_image(p) for p in files]
    ref_out = None
    if reference_outputs is not None:
        with np.load(reference_outputs) as z:
            arrays = {k: z[k] for k in z.files}
        if any(len(a) != len(imgs) for a in arrays.values()):
            raise DataError(f"{reference_outputs}: every array needs one row per image ({len(imgs)})")
        ref_out = [{k: a[i:i + 1] for k, a in arrays.items()} for i in range(len(imgs))]
    with progress_bar("trying preprocessing variants", not as_json) as update:
        d = diagnose(m, imgs, PreprocessSpec.load(spec), reference_outputs=ref_out,
                     reference_spec=PreprocessSpec.load(reference_spec) if reference_spec else None,
                     input_name=input_name, progress=update)

    def human() -> None:
        out.print(("[green]" if d.explained_by or d.finding.startswith("no preprocessing mismatch") else "[yellow]")
                  + escape(d.finding) + "[/]")
        if d.trials:
            t = Table(title="variants tried (closest first)", title_justify="left")
            for c in ("transform", "change", "SQNR dB vs reference", "cosine"):
                t.add_column(c, justify="right" if c.startswith(("SQNR", "cos")) else "left")
            for tr in d.trials[:10]:
                t.add_row(tr.variant.transform, escape(tr.variant.description),
                          _db(tr.sqnr_db) if tr.sqnr_db is not None else "rejected", _fmt(tr.cosine, 5))
            out.print(t)

    _emit_doc(d.to_dict(), as_json, output, human)
