"""``infertune doctor`` (this machine against the compatibility table) and ``infertune preflight``
(an engine or artifact against this machine)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from infertune.cli.common import emit, json_option, out, output_option, table
from infertune.errors import CheckFailed

STYLE = {"error": "red", "warning": "yellow", "info": "dim"}


@click.command()
@json_option
@output_option
def doctor(as_json, output) -> None:
    """Will it run here, and run well? Exit 1 when a problem is found (each with its fix)."""
    from infertune.deploy.doctor import doctor as run_doctor
    from infertune.outputs import Guard

    output = Guard.of().file(output)
    r = run_doctor()
    p = r.probe

    def human() -> None:
        t = table(("", " "), title="this machine", show_header=False)
        c = p["cpu"]
        t.add_row("python", f"{p['python']} ({p['platform']})")
        t.add_row("cpu", f"{c['model']}, {c['logical_cores']} cores, {' '.join(c['isa']) or 'no SIMD flags read'}")
        for dist, v in p["packages"].items():
            if v:
                t.add_row(dist, v)
        t.add_row("ORT providers", ", ".join(p["ort_providers"]))
        cu = p["cuda"]
        t.add_row("CUDA driver", f"{cu['driver_version'] or '—'} (supports CUDA {cu['driver_cuda'] or '—'})")
        t.add_row("CUDA runtime / cuDNN", f"{cu['runtime'] or '—'} / {cu['cudnn'] or '—'}")
        for g in p["gpus"]:
            t.add_row("GPU", f"{g['name']}, compute capability {g['compute_capability']}, "
                             f"{g.get('sm_count') or '?'} SMs, {g['memory_mib']} MiB")
        out.print(t)
        _print_findings(r.findings)

    emit(r.to_dict(), as_json, output, human)
    _fail_on_errors("doctor", r.findings, r.to_dict())


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@json_option
@output_option
def preflight(path: Path, as_json, output) -> None:
    """Will the TensorRT engine or infertune artifact at PATH load and run well here? Read, not tried."""
    from infertune.deploy.preflight import preflight as run_preflight
    from infertune.outputs import Guard

    output = Guard.of(path).file(output)
    findings = run_preflight(path)
    doc = {"schema_version": 1, "kind": "preflight", "path": str(path),
           "ok": not any(f.severity == "error" for f in findings), "findings": [f.to_dict() for f in findings]}
    emit(doc, as_json, output, lambda: _print_findings(findings))
    _fail_on_errors("preflight", findings, doc)


def _print_findings(findings) -> None:
    for f in findings:
        fix = f" [bold]fix:[/] {escape(f.fix)}" if f.fix else ""
        out.print(f"[{STYLE[f.severity]}]{f.severity}[/] {f.topic}: {escape(f.message)}.{fix}")
    errors = [f for f in findings if f.severity == "error"]
    out.print("[green]no problem found[/]" if not errors else f"[red]{len(errors)} problem(s) found[/]")


def _fail_on_errors(what: str, findings, doc: dict) -> None:
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise CheckFailed(f"{what} found {len(errors)} problem(s): " + "; ".join(f.message for f in errors), doc)


COMMANDS = (doctor, preflight)
