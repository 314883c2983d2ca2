"""``infertune <verb>``: parses arguments, calls the public API, prints rich tables or --json.

One module per verb family registers its commands here; none imports another verb's module.
Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input, 3 backend unavailable.
User errors print one line without a traceback; anything else is a bug and keeps its trace.
``main`` is the one place that turns an expected failure into that line: infertune's own errors,
and the failures a user's files and paths cause wherever they surface (``cli.failures``).
"""

from __future__ import annotations

import sys
import warnings

import click
from rich.markup import escape

from infertune.cli import compare, doctor, export, inspect_run, perf, quantize, sensitivity, tune
from infertune.cli.common import err
from infertune.cli.failures import expected_failure
from infertune.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, CheckFailed, InfertuneError, InfertuneWarning


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="infertune")
def cli() -> None:
    """infertune: the fastest deployable variant of an ONNX model within an accuracy budget."""


for _module in (inspect_run, compare, quantize, sensitivity, perf, tune, doctor, export):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings from the library as one ``warning:`` line each (no file and line of the source)."""
    if issubclass(category, InfertuneWarning):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes; user errors print one line, no traceback."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", InfertuneWarning)
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="infertune", standalone_mode=False)
    except CheckFailed as e:
        err.print(f"[red]check failed:[/] {escape(str(e))}", soft_wrap=True)
        return EXIT_CHECK_FAILED
    except InfertuneError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        return e.exit_code
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, EOFError):  # click turns any EOFError into Abort: an unexpected end of input
            err.print(f"[red]error:[/] {escape(expected_failure(e.__context__) or 'unexpected end of input')}",
                      soft_wrap=True)
            return EXIT_BAD_INPUT
        err.print("aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return EXIT_BAD_INPUT
    except click.exceptions.Exit as e:
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - the expected ones become one line, the rest keep their traceback
        line = expected_failure(e)
        if line is None:
            raise
        err.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
