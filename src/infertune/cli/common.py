"""What every verb shares: option groups, data and backend parsing, printing, JSON emission."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import click
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape as rich_escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from infertune import backends
from infertune._io import json_default, write_json
from infertune.errors import UsageError
from infertune.limits import check_threads

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


def metric_option(f: Callable) -> Callable:
    return click.option("--metric", "metric", metavar="FILE.py:FUNC",
                        help="Your metric: FUNC(reference, candidate) -> float over the FP32 and the candidate "
                             "outputs (lists of {output_name: array}, one per feed); budgets and checks name it "
                             "'metric>=X' (higher is better) or 'metric<=X'.")(f)


def load_metric(text: str | None):
    """The user's metric function (imported from its file by path), or None."""
    if text is None:
        return None
    from infertune.usercode import UserFunction

    return UserFunction.parse(text, "--metric")


def algorithm_options(f: Callable) -> Callable:
    """--algorithm NAME (repeatable) and --adaround-seconds, handed to the command as ``algorithms``
    and ``algorithm_options``."""
    from infertune.quant.algorithms.base import ALGORITHMS, DESCRIPTIONS, AlgorithmOptions

    @functools.wraps(f)
    def with_algorithms(*args, algorithm: tuple[str, ...], adaround_seconds: float, **kwargs):
        kwargs["algorithms"] = tuple(algorithm)
        kwargs["algorithm_options"] = AlgorithmOptions(adaround_seconds=adaround_seconds)
        return f(*args, **kwargs)

    for opt in reversed([
        click.option("--algorithm", multiple=True, type=click.Choice(ALGORITHMS),
                     help="Accuracy algorithm to run while quantizing (repeatable): "
                          + ", ".join(f"{a} ({DESCRIPTIONS[a]})" for a in ALGORITHMS) + "."),
        click.option("--adaround-seconds", type=click.FloatRange(min=0, min_open=True),
                     default=AlgorithmOptions.adaround_seconds, show_default=True,
                     help="Time budget of learned rounding (adaround), its sampling passes included."),
    ]):
        f = opt(f)
    return with_algorithms


def backend_options(f: Callable) -> Callable:
    """--backend plus the runtime settings, handed to the command as one ``settings`` argument."""

    @functools.wraps(f)
    def with_settings(*args, threads: int, inter_threads: int, opt_level: str, execution_mode: str,
                      backend_option: tuple[str, ...], **kwargs):
        check_threads(threads, "--threads")
        check_threads(inter_threads, "--inter-threads")
        kwargs["settings"] = backends.Settings(intra_op_threads=threads, inter_op_threads=inter_threads,
                                               graph_optimization=opt_level, execution_mode=execution_mode,
                                               options=parse_options(backend_option))
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


def force_option(what: str) -> Callable:
    def deco(f: Callable) -> Callable:
        return click.option("--force", is_flag=True, help=f"Replace {what} infertune wrote before "
                            "(never a directory it did not write).")(f)
    return deco


def parse_options(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def load_data(model, data, preprocess, dims, samples, seed, what: str = "data"):
    """The dataset a --data/--calib/--eval argument names (which layout was read: ``provenance``)."""
    from infertune.data import load_dataset, parse_dims

    return load_dataset(data, model, dims=parse_dims(dims), samples=samples, seed=seed, preprocess=preprocess)


def data_doc(**datasets) -> dict:
    """What --json says about the data read: name and layout of each dataset."""
    return {k: {"name": d.name, "layout": d.layout} for k, d in datasets.items() if d is not None}


def provenance(fixed, **datasets) -> dict:
    """For --json: the data read (name, layout) and what was fixed in the model (None: nothing)."""
    return {"data": data_doc(**datasets), "specialised": fixed.to_dict() if fixed else None}


def fix_option(f: Callable) -> Callable:
    return click.option("--fix", "fix", multiple=True, metavar="INPUT=VALUE",
                        help="Specialise the model to a constant input (repeatable): it becomes a constant and "
                             "If/Where on it are folded (the taken branch inlined), checked against the original on "
                             "the data. Inputs that hold one value in every feed and decide an If are fixed without "
                             "asking (said so); --fix none keeps every input.")(f)


def specialised(model, datasets, fix: tuple[str, ...], backend: str = "ort", settings=None):
    """``model`` specialised per --fix (and to constant inputs that decide control flow, found in the data),
    checked on ``datasets``; returns (model, the Specialisation or None) and says what was done on stderr."""
    from rich.markup import escape

    from infertune.analysis.specialization import specialise
    from infertune.quant.specialize import parse_fix

    if "none" in fix:
        if len(fix) > 1:
            raise UsageError("--fix none keeps every input: it cannot be combined with other --fix values")
        return model, None
    from infertune.data import Dataset

    values = parse_fix(fix, model)
    sets = [d for d in datasets if d is not None] or [Dataset.synthetic(model, samples=4)]
    sets = [with_values(d, values) if d.layout.endswith("synthetic feeds") else d for d in sets]
    r = specialise(model, sets, values, backend=backend, settings=settings)
    if r is None:
        return model, None
    for note in r.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    return r.model, r


def with_values(dataset, values: dict):
    """Synthetic feeds with the fixed inputs set to their values (random ones would contradict them)."""
    from infertune.data import Dataset

    return Dataset(lambda: ({**f, **values} for f in dataset), name=dataset.name, size=dataset.size,
                   layout=dataset.layout)


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


def emit(doc: dict, as_json: bool, output: Path | None, human: Callable[[], None]) -> None:
    """Print ``doc`` as one JSON document (--json) or call ``human``; with ``output``, also write it as JSON."""
    if output is not None:
        write_json(output, doc)
    read = doc.get("data") if isinstance(doc.get("data"), dict) else {}
    for what, d in read.items():  # which layout was read (``provenance``), once the command has succeeded
        if isinstance(d, dict) and "layout" in d:
            err.print(f"[dim]{what}: {rich_escape(str(d['name']))}: {rich_escape(d['layout'])}[/]", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=json_default))
    else:
        human()
        if output is not None:
            err.print(f"wrote {output}")


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.{digits}f}"
    return str(v)


def si(n: float, unit: str = "") -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".strip()


def table(columns: Sequence[str], *, numeric: Collection[str] = (), title: str | None = None,
          show_header: bool = True) -> Table:
    """A table that never cuts what a user acts on: text columns (node, tensor, input names) fold
    over lines instead of ending in an ellipsis, and a ``numeric`` column is never narrower than
    its widest value (its header may fold instead)."""
    t = _WholeNumbers(title=title, title_justify="left", show_header=show_header)
    for c in columns:
        t.add_column(c, justify="right" if c in numeric else "left", overflow="fold")
    t.numeric = {i for i, c in enumerate(columns) if c in numeric}
    return t


class _WholeNumbers(Table):
    """When whole numbers and a few characters of each name do not fit the terminal, the rows are
    printed one after another as field/value pairs instead of cropping the table."""

    numeric: set[int] = set()
    TEXT_MIN = 8  # characters a folded name column keeps

    def add_row(self, *cells, **kwargs) -> None:
        super().add_row(*cells, **kwargs)
        for i in self.numeric:
            if i < len(cells) and isinstance(cells[i], str):
                col = self.columns[i]
                col.min_width = max(col.min_width or 0, cell_len(Text.from_markup(cells[i]).plain))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        need = sum((c.min_width or 1) if i in self.numeric else self.TEXT_MIN for i, c in enumerate(self.columns))
        if need + 3 * len(self.columns) + 1 <= options.max_width:
            yield from super().__rich_console__(console, options)
            return
        if self.title:
            yield Text(str(self.title), style="italic")
        for r in range(self.row_count):
            rows = Table(show_header=False, box=None, padding=(0, 1))
            rows.add_column(overflow="fold", style="bold")
            rows.add_column(overflow="fold")
            for c in self.columns:
                rows.add_row(str(c.header), list(c.cells)[r])
            yield rows
            yield Text("")


def placement_for(backend: str, target: str | None) -> str:
    """The Q/DQ placement target: the one given, or the one of ``backend``'s registry entry."""
    if target is not None:
        return target
    placement = backends.require(backend, "placement", "INT8 quantization").placement
    assert placement is not None
    return placement


def space_and_evaluator(m, data, preprocess, dims, samples, seed, eval_data, eval_samples, method, target, exclude,
                        settings, as_json, fix=(), backend: str = "ort", algorithms=(), algorithm_options=None,
                        prepare=None):
    """One calibration of ``m`` (specialised per ``--fix``; every tensor an exclusion set may need; the
    ``algorithms`` run on the way; ``prepare`` as quantize's) and the evaluation feeds (``--eval``, or the
    calibration data): what ``sensitivity`` and ``quantize --budget`` search over. Returns (space,
    evaluator, the Specialisation or None, the datasets read)."""
    from infertune.analysis.accuracy import Evaluator
    from infertune.quant.space import calibrated_space

    calib = load_data(m, data, preprocess, dims, samples, seed)
    ev_data = calib if eval_data is None else load_data(m, eval_data, preprocess, dims, samples, seed, "eval")
    m, fixed = specialised(m, [calib] if ev_data is calib else [calib, ev_data], fix, backend, settings)
    evaluator = Evaluator.from_dataset(m, ev_data, eval_samples, settings)
    with progress_bar("calibrating" + (" and running " + ", ".join(algorithms) if algorithms else ""),
                      not as_json) as update:
        options = algorithm_progress(algorithm_options, update)
        space = calibrated_space(m, calib, method=method, target=target, exclude=exclude, prepare=prepare,
                                 settings=settings, progress=update, algorithms=algorithms, algorithm_options=options)
    return space, evaluator, fixed, {"data": calib, "eval": ev_data}


def algorithm_progress(options, update: Callable):
    """``options`` (or the defaults) reporting the algorithms' progress to ``update`` as well."""
    import dataclasses

    from infertune.quant.algorithms.base import AlgorithmOptions

    return dataclasses.replace(options or AlgorithmOptions(), progress=lambda _name, done, total: update(done, total))
