"""The tune report: one self-contained HTML file (no network at view time).

Sections: the choice and the decision log in words; accuracy vs latency of every trial with the
Pareto front and the chosen one marked; the sensitivity ranking (when the search needed it);
per-op-type time of FP32 and of the chosen variant (ONNX Runtime's profiler); throughput over
batch and threads for the chosen variant, with the knee. The data is embedded as JSON and the
charts are drawn as SVG by a small inline script; the page records script errors in
``body[data-errors]`` and the number of charts drawn in ``body[data-rendered]`` (what the
headless-browser test reads).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from infertune import backends
from infertune._io import json_default, write_text
from infertune.data import Dataset

if TYPE_CHECKING:
    from infertune.model import Model
    from infertune.tune import TuneResult

_ASSETS = Path(__file__).parent
SWEEP_BATCHES = (1, 4, 16)


def report_data(result: TuneResult, *, source: Model, chosen_model: Model, feed: dict[str, np.ndarray],
                settings: backends.Settings, backend: str = "ort", profile_runs: int = 30,
                sweep_seconds: float = 0.3) -> dict:
    """Everything the page shows, measured now for the chosen variant and FP32.

    Per-op times come from ONNX Runtime's profiler: for a variant chosen on another runtime
    only the FP32 breakdown on ONNX Runtime is shown."""
    from infertune.bench.profile import profile
    from infertune.bench.sweep import sweep

    one = Dataset.from_iterable([feed])
    ops: dict[str, dict[str, float]] = {"chosen": {}}
    for label, m in (("fp32", source), ("chosen", chosen_model)):
        if label == "chosen" and backend != "ort":
            continue
        p = profile(m, one, settings=settings, runs=profile_runs)
        ops[label] = {o.op_type: o.mean_us for o in p.op_types}
    batches = [b for b in SWEEP_BATCHES if _batchable(chosen_model)] or [1]
    threads = sorted({t.spec.threads for t in result.trials}) or [settings.intra_op_threads]
    sw = sweep(chosen_model, Dataset.from_iterable([feed] * max(batches)), {"batch": batches, "threads": threads},
               settings=settings, seconds=sweep_seconds, backend=backend)
    return {"result": result.to_dict(), "op_types": ops, "sweep": sw.to_dict()}


def _batchable(model: Model) -> bool:
    return all(i.shape and isinstance(i.shape[0], str) for i in model.inputs)


def render(data: dict) -> str:
    """The HTML page for ``data`` (from ``report_data``)."""
    r = data["result"]
    chosen = r["chosen"]
    doc = json.dumps(_finite(data), default=json_default, allow_nan=False).replace("</", "<\\/")
    decisions = "".join(f"<li>{html.escape(d)}</li>" for d in r["decisions"])
    rows = "".join(
        f"<tr class='{'chosen' if t['index'] == chosen['index'] else ''}'><td>{t['index']}</td>"
        f"<td>{html.escape(t['label'])}</td><td>{t['p50_ms']:.3f}</td><td>{_num(t['metrics'].get('sqnr_db'))}</td>"
        f"<td>{_num(t['metrics'].get('cosine'), 5)}</td><td>{_num(t['metrics'].get('top1_drop'), 2)}</td>"
        f"<td>{'yes' if t['met'] else 'no'}</td></tr>" for t in r["trials"])
    page = (_ASSETS / "template.html").read_text(encoding="utf-8")
    return (page.replace("{{TITLE}}", html.escape(f"infertune tune: {chosen['label']}"))
            .replace("{{CHOSEN}}", html.escape(chosen["label"]))
            .replace("{{BUDGET}}", html.escape(r["budget"]))
            .replace("{{P50}}", f"{chosen['p50_ms']:.3f}")
            .replace("{{STOPPED}}", html.escape(r["stopped"]))
            .replace("{{DECISIONS}}", decisions)
            .replace("{{ROWS}}", rows)
            .replace("{{SCRIPT}}", (_ASSETS / "charts.js").read_text(encoding="utf-8"))
            .replace("{{DATA}}", doc))


def write_report(result: TuneResult, path: str | os.PathLike[str], **kwargs) -> Path:
    write_text(path, render(report_data(result, **kwargs)))
    return Path(path)


def _num(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and np.isinf(v):
        return "exact"
    return f"{v:.{digits}f}"


def _finite(o):
    """JSON.parse has no Infinity or NaN: they become null (an exact match, or not measured)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o
