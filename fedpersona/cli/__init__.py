"""The ``fedpersona`` command line (:mod:`fedpersona.cli.app` assembles it; the commands live in
:mod:`~fedpersona.cli.runs`, :mod:`~fedpersona.cli.data` and :mod:`~fedpersona.cli.deployment`).

Exit codes: 0 success, 2 user error (one paragraph, no traceback), 1 internal failure. Each
command imports what it needs when it runs, so ``fedpersona --help`` imports no PyTorch.
"""

from __future__ import annotations

import logging
import sys

import typer

from fedpersona.cli import data, deployment, runs
from fedpersona.cli.app import app, err_console
from fedpersona.errors import FedPersonaError

__all__ = ["app", "data", "deployment", "main", "runs"]


def main() -> None:
    """Entry point: user errors exit 2 with one paragraph, internal failures exit 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except FedPersonaError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except typer.Abort:
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and internal failures
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        err_console.print_exception()
        sys.exit(1)
