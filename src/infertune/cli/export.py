"""``infertune export triton ARTIFACT --repo DIR``: serve a tuned artifact with Triton."""

from __future__ import annotations

from pathlib import Path

import click

from infertune.cli.common import emit, force_option, json_option, out


@click.group()
def export() -> None:
    """Export a tuned artifact for a serving system."""


@export.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The Triton model repository (created if missing).")
@click.option("--name", help="Model name in the repository (default: the artifact directory's name).")
@click.option("--max-batch", type=click.IntRange(min=0), default=8, show_default=True,
              help="max_batch_size when the model has a dynamic batch dim (0: no batching by Triton).")
@click.option("--instances", type=click.IntRange(min=1), help="Model instances (default: cores / tuned threads).")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True,
              help="Dynamic batching: how long a request may wait for others.")
@force_option("a Triton model directory")
@json_option
def triton(artifact: Path, repo: Path, name, max_batch, instances, queue_delay_us, force, as_json) -> None:
    """Write ARTIFACT as REPO/NAME/{config.pbtxt,1/model.onnx} for Triton Inference Server."""
    from infertune.deploy.triton import export_triton

    dest = export_triton(artifact, repo, name=name, max_batch_size=max_batch, instances=instances,
                         queue_delay_us=queue_delay_us, force=force)
    doc = {"kind": "export-triton", "model_dir": str(dest), "config": (dest / "config.pbtxt").read_text()}

    def human() -> None:
        out.print(f"wrote {dest}/config.pbtxt and {dest}/1/model.onnx")
        out.print(f"serve with: tritonserver --model-repository {repo}")

    emit(doc, as_json, None, human)


COMMANDS = (export,)
