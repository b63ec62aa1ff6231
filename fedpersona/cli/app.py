"""The ``fedpersona`` command line. Exit codes: 0 success, 2 user error, 1 internal failure."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

from fedpersona.errors import FedPersonaError

__all__ = [
    "ENGINE_WARNINGS",
    "app",
    "certs_app",
    "console",
    "err_console",
    "number_text",
    "parse_epsilon",
    "partner_app",
    "privacy_app",
    "quiet_engines",
    "schema_app",
    "server_app_cli",
    "version_text",
]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
schema_app = typer.Typer(no_args_is_help=True, help="Draft and check silo schemas.")
privacy_app = typer.Typer(no_args_is_help=True, help="Plan and inspect privacy budgets.")
certs_app = typer.Typer(no_args_is_help=True, help="Federation CA, SuperLink certificate, signing and node keys.")
server_app_cli = typer.Typer(no_args_is_help=True, help="Run the coordinator (Flower SuperLink + the fedpersona run).")
partner_app = typer.Typer(no_args_is_help=True, help="Check and run a partner site (Flower SuperNode).")
app.add_typer(schema_app, name="schema")
app.add_typer(privacy_app, name="privacy")
app.add_typer(certs_app, name="certs")
app.add_typer(server_app_cli, name="server")
app.add_typer(partner_app, name="partner")

# Piped into a file or a log collector, rich would assume 80 columns: it would cut partner names
# and kinds in the tables and break long lines mid-phrase. There, tables get 200 columns and a
# line of text is never wrapped (a terminal keeps its own width and wrapping).
_PIPED = not sys.stdout.isatty()
console = Console(width=200 if _PIPED else None, soft_wrap=_PIPED)
err_console = Console(stderr=True, soft_wrap=True)


ENGINE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Opacus's notice about its own generator: fedpersona draws DP noise from the partner's
    # secret source (privacy.randomness) and labels a seeded run itself.
    ("Secure RNG turned off", UserWarning),
    # PyTorch: a full backward hook on a module whose inputs need no gradient; Opacus relies on it.
    ("Full backward hook is firing", UserWarning),
    # Opacus's RDP accountant: the best order is at the end of its alpha grid (the bound is still valid).
    ("Optimal order is the", UserWarning),
)
"""Warnings of the engines a simulation runs that a user cannot act on, hidden without ``--verbose``."""


@contextlib.contextmanager
def quiet_engines(*, verbose: bool) -> Iterator[None]:
    """Without ``--verbose``, keep Flower's, Ray's and Opacus's own chatter off the console
    while the block runs; everything is as before afterwards.

    In this process: Flower's records do not reach the root logger, Ray's and Opacus's loggers
    show errors only, and :data:`ENGINE_WARNINGS` are ignored. Ray's workers (where the
    partners train and Flower prints ``Manually terminating ClientAppActor``) are new processes
    that inherit the environment: ``FLWR_LOG_LEVEL=ERROR`` and ``PYTHONWARNINGS`` carry the same
    choices there. A value the user set already is kept. Errors always show.
    """
    if verbose:
        yield
        return
    env = {name: os.environ.get(name) for name in ("FLWR_LOG_LEVEL", "PYTHONWARNINGS")}
    loggers = {name: logging.getLogger(name) for name in ("flwr", "ray", "opacus")}
    saved = {name: (log.level, log.propagate) for name, log in loggers.items()}
    with warnings.catch_warnings():
        loggers["flwr"].propagate = False
        for name in ("ray", "opacus"):
            loggers[name].setLevel(logging.ERROR)
        for message, category in ENGINE_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
        ours = [f"ignore:{message}:{category.__name__}" for message, category in ENGINE_WARNINGS]
        given = [part for part in os.environ.get("PYTHONWARNINGS", "").split(",") if part]
        os.environ["PYTHONWARNINGS"] = ",".join(given + [part for part in ours if part not in given])
        try:
            yield
        finally:
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            for name, (level, propagate) in saved.items():
                loggers[name].setLevel(level)
                loggers[name].propagate = propagate


def version_text() -> str:
    """``fedpersona X (flwr A, opacus B, torch C, python D)``: read from the installed
    packages' metadata, so nothing heavy is imported."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    parts = ", ".join(f"{name} {installed(name)}" for name in ("flwr", "opacus", "torch"))
    return f"fedpersona {installed('fedpersona')} ({parts}, python {platform.python_version()})"


def _version(value: bool) -> None:
    if value:
        console.print(version_text(), highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the installed versions and exit."
    ),
) -> None:
    """The ``fedpersona`` command line. Exit codes: 0 success, 2 user error, 1 internal failure."""


def number_text(value: Any, digits: int = 3) -> str:
    """A table cell: NOT PRIVATE for no epsilon, - for NaN, inf, or the number rounded."""
    if value is None:
        return "NOT PRIVATE"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def parse_epsilon(text: str | None) -> float | None:
    """``--epsilon``: a number > 0 or ``inf`` (NOT PRIVATE)."""
    if text is None:
        return None
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise FedPersonaError(f"--epsilon must be a number > 0 or 'inf', got {text!r}") from None
    if not value > 0:
        raise FedPersonaError(f"--epsilon must be a number > 0 or 'inf', got {text!r}")
    return value
