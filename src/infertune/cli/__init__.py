"""``infertune <verb>``: parses arguments, calls the public API, prints rich tables or --json.

One module per verb family registers its commands here; none imports another verb's module.
Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input, 3 backend unavailable.
User errors print one line without a traceback; anything else is a bug and keeps its trace.
"""

from __future__ import annotations

import sys

import click
from rich.markup import escape

from infertune.cli import compare, doctor, export, inspect_run, perf, quantize, sensitivity, tune
from infertune.cli.common import err
from infertune.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, CheckFailed, InfertuneError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="infertune")
def cli() -> None:
    """infertune: the fastest deployable variant of an ONNX model within an accuracy budget."""


for _module in (inspect_run, compare, quantize, sensitivity, perf, tune, doctor, export):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes; user errors print one line, no traceback."""
    try:
        cli.main(args=argv, prog_name="infertune", standalone_mode=False)
    except CheckFailed as e:
        err.print(f"[red]check failed:[/] {escape(str(e))}", soft_wrap=True)
        return EXIT_CHECK_FAILED
    except InfertuneError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        return e.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return EXIT_BAD_INPUT
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
