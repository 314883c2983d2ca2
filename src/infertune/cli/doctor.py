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
@click.option("--probe", "probe_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.json",
              help="Judge the machine recorded in FILE.json (doctor --json output, or the short form "
                   "{\"packages\": {...}, \"cuda_runtime\": \"13.0\", \"driver\": \"580.65\", \"gpus\": [...]}) "
                   "instead of this one.")
@json_option
@output_option
def doctor(probe_file, as_json, output) -> None:
    """Will it run here (or on the machine in --probe), and run well? Exit 1 when a problem is found
    (each with its fix)."""
    from infertune.deploy.doctor import doctor as run_doctor
    from infertune.outputs import Guard

    output = Guard.of().file(output)
    r = run_doctor(probe_file)
    p = r.probe

    def human() -> None:
        t = table(("", " "), title=r.source, show_header=False)
        if "python" in p:
            t.add_row("python", f"{p['python']} ({p.get('platform', '?')})")
        c = p.get("cpu")
        if c:
            t.add_row("cpu", f"{c['model']}, {c['logical_cores']} cores, {' '.join(c['isa']) or 'no SIMD flags read'}")
        for dist, v in p.get("packages", {}).items():
            if v:
                t.add_row(dist, v)
        if "ort_providers" in p:
            t.add_row("ORT providers", ", ".join(p["ort_providers"]))
        cu = p.get("cuda", {})
        t.add_row("CUDA driver", f"{cu.get('driver_version') or '—'} (supports CUDA {cu.get('driver_cuda') or '—'})")
        runtimes = ", ".join(cu.get("runtimes") or []) or cu.get("runtime") or "—"
        t.add_row("CUDA runtime / cuDNN", f"{runtimes} / {cu.get('cudnn') or '—'}")
        for g in p.get("gpus", []):
            t.add_row("GPU", f"{g['name']}, compute capability {g['compute_capability']}, "
                             f"{g.get('sm_count') or '?'} SMs, {g.get('memory_mib') or '?'} MiB")
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
