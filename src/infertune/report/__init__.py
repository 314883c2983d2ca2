"""The tune report: one self-contained HTML file (no network at view time).

It renders a tune result as plain data (``TuneResult.to_dict()``) and measures nothing: what it
shows beyond the trials (per-op-type time, the batch x threads sweep) was measured by tune and
comes in the result's ``measurements``. Sections: the choice and the decision log in words;
accuracy vs latency of every trial with the Pareto front and the chosen one marked; the
sensitivity ranking (when the search needed it); per-op-type time of FP32 and of the chosen
variant; throughput over batch and threads for the chosen variant, with the knee. The data is
embedded as JSON and the charts are drawn as SVG by a small inline script; the page records
script errors in ``body[data-errors]`` and the number of charts drawn in ``body[data-rendered]``
(what the headless-browser test reads).
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
from pathlib import Path

from infertune._io import json_default, write_text

_ASSETS = Path(__file__).parent


def render(result: dict) -> str:
    """The HTML page for a tune result given as plain data (``TuneResult.to_dict()``)."""
    r = result
    chosen = r["chosen"]
    measured = r.get("measurements") or {}
    data = {"result": r, "op_types": measured.get("op_types", {}), "sweep": measured.get("sweep")}
    doc = json.dumps(_finite(data), default=json_default, allow_nan=False).replace("</", "<\\/")
    decisions = "".join(f"<li>{html.escape(d)}</li>" for d in r["decisions"])
    again, rounds = r.get("runoff_p50_ms") or {}, r.get("runoff_rounds_ms") or {}
    rows = "".join(
        f"<tr class='{'chosen' if t['index'] == chosen['index'] else ''}'><td>{t['index']}</td>"
        f"<td>{html.escape(t['label'])}</td><td>{t['p50_ms']:.3f}</td>"
        f"<td>{_remeasured(again.get(t['key']), rounds.get(t['key']))}</td><td>{_num(t['metrics'].get('sqnr_db'))}</td>"
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


def write_report(result: dict, path: str | os.PathLike[str]) -> Path:
    """Render ``result`` (a tune result as plain data) to ``path``."""
    write_text(path, render(result))
    return Path(path)


def _remeasured(p50: float | None, rounds: list[float] | None) -> str:
    if p50 is None:
        return "—"
    return f"{p50:.3f}" + (f" <span class='note'>({', '.join(f'{v:.3f}' for v in rounds)})</span>" if rounds else "")


def _num(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "exact"
    return f"{v:.{digits}f}"


def _finite(o):
    """JSON.parse has no Infinity or NaN: they become null (an exact match, or not measured)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, numbers.Real) and not isinstance(o, numbers.Integral) and not math.isfinite(o):
        return None
    return o
