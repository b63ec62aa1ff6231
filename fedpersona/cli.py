"""The ``fedpersona`` command line. Exit codes: 0 success, 2 user error, 1 internal failure."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table as RichTable

from fedpersona.errors import FedPersonaError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
schema_app = typer.Typer(no_args_is_help=True, help="Draft and check silo schemas.")
privacy_app = typer.Typer(no_args_is_help=True, help="Plan and inspect privacy budgets.")
app.add_typer(schema_app, name="schema")
app.add_typer(privacy_app, name="privacy")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "NOT PRIVATE"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def _parse_epsilon(text: str | None) -> float | None:
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


@app.command()
def simulate(
    scenario: Path | None = typer.Option(None, help="Scenario TOML (default: three synthetic silos)."),
    rounds: int | None = typer.Option(None, min=1, help="Override federation.rounds."),
    epsilon: str | None = typer.Option(None, help="Override every partner's target epsilon ('inf' = NOT PRIVATE)."),
    out: Path | None = typer.Option(None, help="Run folder (default: runs/<timestamp>)."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
) -> None:
    """Run a whole federation locally and write the run folder."""
    from fedpersona.simulation import simulate as run

    eps = _parse_epsilon(epsilon)
    if not verbose:
        logging.getLogger("flwr").propagate = False

    def on_start(sc: Any, run_dir: Path, partners: list[str]) -> None:
        private = math.isfinite(sc.privacy.target_epsilon)
        console.print(
            f"[bold]fedpersona simulate[/bold]: {len(partners)} partners, "
            f"{sc.federation.rounds} rounds, "
            + (
                f"target epsilon {sc.privacy.target_epsilon:g} per partner"
                if private
                else "[bold red]NOT PRIVATE (epsilon = inf)[/bold red]"
            )
            + f"\nrun folder: {run_dir}"
        )
        console.print("starting the Flower simulation engine (Ray)...")

    def on_round(rnd: int, rows: list[dict[str, Any]]) -> None:
        def mean(key: str) -> str:
            vals = [
                float(r[key]) for r in rows if isinstance(r.get(key), int | float) and not math.isnan(float(r[key]))
            ]
            return f"{sum(vals) / len(vals):.3f}" if vals else "-"

        eps = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
        console.print(
            f"round {rnd}: {len(rows)} partners | max epsilon "
            f"{(f'{max(eps):.3f}' if eps else 'NOT PRIVATE')} | mean label AUC {mean('label_auc')} | "
            f"probe AUC {mean('probe_auc')} | recon {mean('reconstruction_error')} | ARI {mean('ari')}"
        )

    result = run(
        scenario_path=scenario,
        rounds=rounds,
        epsilon=eps,
        out=out,
        on_round=on_round,
        on_start=on_start,
    )
    from fedpersona.report import SUMMARY_COLUMNS, summary_rows

    table = RichTable(title=f"after {max((r['round'] for r in result.rows), default=0)} rounds")
    for _, label in SUMMARY_COLUMNS:
        table.add_column(label, justify="right")
    for row in summary_rows(result.rows):
        cells = [_num(row.get(key)) if key == "epsilon" else _num(row.get(key, math.nan)) for key, _ in SUMMARY_COLUMNS]
        table.add_row(
            *[
                c if c != "NOT PRIVATE" or key == "epsilon" else "-"
                for c, (key, _) in zip(cells, SUMMARY_COLUMNS, strict=True)
            ]
        )
    console.print(table)
    if any(p.get("private") is False for p in result.privacy["partners"].values()):
        console.print("[bold red]NOT PRIVATE: this run used no differential privacy.[/bold red]")
    console.print(f"done in {result.seconds:.0f}s; report: {result.run_dir / 'report.html'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Rebuild report.html and report.md of a run folder."""
    from fedpersona.report import write_report

    if not (run_dir / "metrics.jsonl").exists():
        raise FedPersonaError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    console.print(f"wrote {write_report(run_dir)}")


@schema_app.command("check")
def schema_check(
    schema: Path = typer.Option(..., help="Schema TOML."),
    data: Path = typer.Option(..., help="CSV (also .gz) or Parquet file."),
) -> None:
    """Validate a data file against a schema; lists every problem at once."""
    from fedpersona.schema import load_schema
    from fedpersona.tables import load_table

    table = load_table(load_schema(schema), data)
    console.print(f"{data}: OK, {len(table)} users, {len(table.schema.features)} features")


@schema_app.command("infer")
def schema_infer(
    data: Path = typer.Argument(..., help="CSV (also .gz) or Parquet file."),
    kind: str = typer.Option(..., help="Silo kind: ecommerce, finance or health."),
    label: str | None = typer.Option(None, help="Label column, if any."),
    out: Path | None = typer.Option(None, help="Write the draft here (default: print it)."),
) -> None:
    """Draft a schema from a local file, for a data steward to review."""
    from fedpersona.tables import infer_schema

    text = infer_schema(data, kind=kind, label=label)
    if out is None:
        sys.stdout.write(text)
    else:
        if out.exists():
            raise FedPersonaError(f"{out} already exists; refusing to overwrite it")
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote draft schema {out}: review every bound and vocabulary before use")


@privacy_app.command("plan")
def privacy_plan(
    config: Path = typer.Option(..., help="A scenario or a partner's client.toml."),
    rounds: int | None = typer.Option(None, min=1, help="Planned rounds."),
    rows: int | None = typer.Option(None, min=2, help="Training rows (default: from the data)."),
) -> None:
    """Noise multiplier and epsilon per round, before anything runs."""
    from fedpersona.planning import plan_table

    for title, lines in plan_table(config, rounds=rounds, rows=rows):
        console.print(title)
        table = RichTable()
        for col in lines[0]:
            table.add_column(col, justify="right")
        for line in lines[1:]:
            table.add_row(*line)
        console.print(table)


@privacy_app.command("ledger")
def privacy_ledger(state_dir: Path = typer.Argument(..., help="A partner's state folder.")) -> None:
    """What a partner has spent, entry by entry, and what is left."""
    from fedpersona.planning import ledger_table

    title, lines = ledger_table(state_dir)
    console.print(title)
    table = RichTable()
    for col in lines[0]:
        table.add_column(col, justify="right")
    for line in lines[1:]:
        table.add_row(*line)
    console.print(table)


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
    except (typer.BadParameter, typer.Exit) as exc:
        if isinstance(exc, typer.Exit):
            sys.exit(exc.exit_code)
        raise
    except Exception as exc:  # click usage errors and internal failures
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        err_console.print_exception()
        sys.exit(1)


if __name__ == "__main__":
    main()
