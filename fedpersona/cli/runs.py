"""``fedpersona simulate``, ``report`` and ``audit``: runs on one machine."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table as RichTable

from fedpersona.cli.app import app, console, number_text, parse_epsilon, quiet_engines
from fedpersona.errors import FedPersonaError

__all__ = ["audit", "report", "simulate"]


@app.command()
def simulate(
    scenario: Path | None = typer.Option(None, help="Scenario TOML (default: three synthetic silos)."),
    rounds: int | None = typer.Option(None, min=1, help="Override federation.rounds."),
    epsilon: str | None = typer.Option(None, help="Override every partner's target epsilon ('inf' = NOT PRIVATE)."),
    out: Path | None = typer.Option(None, help="Run folder (default: runs/<timestamp>)."),
    sweep_epsilon: str | None = typer.Option(
        None,
        help="Privacy-utility sweep: comma list of target epsilons (e.g. 0.5,1,2,4,8,inf); one run per "
        "value in OUT/eps-<value>/, then OUT/sweep.json, sweep.csv and report.html.",
    ),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
    ray_address: str | None = typer.Option(
        None,
        envvar="FEDPERSONA_RAY_ADDRESS",
        help="Run on an existing Ray cluster (HOST:PORT of its head, or 'auto') instead of a local Ray; "
        "the run folder must be on storage every node shares.",
    ),
    reproducible_noise: bool = typer.Option(
        False,
        help="Derive every partner's DP noise from the federation seed: a reproducible run that is "
        "NOT private against the coordinator (labelled so everywhere).",
    ),
) -> None:
    """Run a whole federation locally and write the run folder."""
    with quiet_engines(verbose=verbose):
        _simulate(
            scenario=scenario, rounds=rounds, epsilon=epsilon, out=out, sweep_epsilon=sweep_epsilon,
            ray_address=ray_address, reproducible_noise=reproducible_noise,
        )  # fmt: skip


def _simulate(
    *,
    scenario: Path | None,
    rounds: int | None,
    epsilon: str | None,
    out: Path | None,
    sweep_epsilon: str | None,
    ray_address: str | None,
    reproducible_noise: bool,
) -> None:
    from fedpersona.simulation import simulate as run

    eps = parse_epsilon(epsilon)
    if sweep_epsilon is not None:
        if eps is not None:
            raise FedPersonaError("--epsilon and --sweep-epsilon exclude each other; give one of them")
        if ray_address is not None:
            raise FedPersonaError("--ray-address runs one simulation; run the sweep's epsilons one by one with it")
        _sweep(sweep_epsilon, scenario=scenario, rounds=rounds, out=out)
        return

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
            f"{(f'{max(eps):.3f}' if eps else 'NOT PRIVATE')} | mean label AUC {mean('label_auc')}"
            + "".join(
                f" | {label} {mean(key)}"
                for key, label in (("probe_auc", "probe AUC"), ("reconstruction_error", "recon"), ("ari", "ARI"))
                if any(key in r for r in rows)  # the encoder's metrics; the label model has none
            )
        )

    result = run(
        scenario_path=scenario,
        rounds=rounds,
        epsilon=eps,
        out=out,
        on_round=on_round,
        on_start=on_start,
        reproducible_noise=reproducible_noise or None,
        ray_address=ray_address,
        on_phase=lambda text: console.print(text, highlight=False),
    )
    from fedpersona.report import summary_columns, summary_rows

    table = RichTable(title=f"after {max((r['round'] for r in result.rows), default=0)} rounds")
    columns = summary_columns(summary_rows(result.rows))
    for _, label in columns:
        table.add_column(label, justify="right")
    spent = {name: entry.get("epsilon") for name, entry in result.privacy["partners"].items()}
    for row in summary_rows(result.rows):
        row = {**row, "epsilon": spent.get(row["partner"], row.get("epsilon"))}
        cells = [
            number_text(row.get(key)) if key == "epsilon" else number_text(row.get(key, math.nan)) for key, _ in columns
        ]
        table.add_row(
            *[c if c != "NOT PRIVATE" or key == "epsilon" else "-" for c, (key, _) in zip(cells, columns, strict=True)]
        )
    console.print(table)
    from fedpersona.report import BASELINE_COLUMNS, baseline_rows, persona_rows

    baseline = baseline_rows(summary_rows(result.rows), persona_rows(result.rows))
    if baseline:
        alone = RichTable(title="alone (own columns) or with the federation, on held-out rows")
        for _, label in BASELINE_COLUMNS:
            alone.add_column(label, justify="right")
        for row in baseline:
            alone.add_row(*[number_text(row.get(key, math.nan)) for key, _ in BASELINE_COLUMNS])
        console.print(alone)
    if any(p.get("private") is False for p in result.privacy["partners"].values()):
        console.print("[bold red]NOT PRIVATE: this run used no differential privacy.[/bold red]")
    if any(p.get("noise_seeds_known") for p in result.privacy["partners"].values()):
        from fedpersona.privacy.randomness import KNOWN_SEEDS_LABEL

        console.print(f"[bold red]{KNOWN_SEEDS_LABEL.upper()} (--reproducible-noise)[/bold red]")
    found = persona_rows(result.rows)
    if found:

        def avg(key: str) -> str:
            vals = [float(r[key]) for r in found if key in r]
            return f"{sum(vals) / len(vals):.3f}" if vals else "-"

        console.print(
            f"personas: {len(found)} partners assigned their users to their kind's personas "
            f"(mean surrogate fidelity {avg('surrogate_fidelity')}, mean ARI vs ground truth "
            f"{avg('persona_ari')}); cards stay at each partner, shares per kind in personas.json"
        )
    _print_warnings(result.run_dir)
    console.print(f"done in {result.seconds:.0f}s; report: {result.run_dir / 'report.html'}")


def _print_warnings(run_dir: Path) -> None:
    """The degenerate-segmentation warnings of a run, from the shares it released (personas.json)."""
    import json

    from fedpersona.report import federation_warnings

    path = run_dir / "personas.json"
    try:
        personas = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return
    for warning in federation_warnings(personas if isinstance(personas, dict) else {}):
        console.print(f"[bold red]warning[/bold red]: {warning}", highlight=False)


def _sweep(text: str, *, scenario: Path | None, rounds: int | None, out: Path | None) -> None:
    """``simulate --sweep-epsilon``: the runs one after the other, then the sweep report."""

    from fedpersona.sweep import INF_LABEL, parse_epsilons, run_sweep

    epsilons = parse_epsilons(text)
    out = out or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"

    def on_run(value: float, run_dir: Path) -> None:
        shown = "inf (NOT PRIVATE)" if math.isinf(value) else f"{value:g}"
        console.print(f"[bold]sweep[/bold]: epsilon {shown} -> {run_dir}")

    def on_round(rnd: int, rows: list[dict[str, Any]]) -> None:
        eps = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
        console.print(f"  round {rnd}: {len(rows)} partners, max epsilon {f'{max(eps):.3f}' if eps else 'NOT PRIVATE'}")

    result = run_sweep(
        epsilons=epsilons, out=out, scenario_path=scenario, rounds=rounds, on_run=on_run, on_round=on_round
    )
    table = RichTable(title=f"privacy-utility sweep ({len(result.runs)} runs)")
    columns = ("label_auc", "probe_auc", "persona_ari", "surrogate_fidelity", "rec_hit_rate", "max_epsilon_spent")
    for label in ("epsilon", *columns):
        table.add_column(label, justify="right")
    for r in result.runs:
        label = INF_LABEL if r["label"] == "inf" else r["label"]
        table.add_row(label, *("-" if r[c] is None else f"{r[c]:.3f}" for c in columns))
    console.print(table)
    console.print(f"sweep: {result.out / 'sweep.json'}; report: {result.out / 'report.html'}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder, a sweep folder or a partner's state folder."),
) -> None:
    """Rebuild report.html and report.md of a run folder (or of a sweep folder and its runs), or
    write a partner's persona report (report.html, report.md) into its state folder."""
    from fedpersona.partner_report import is_partner_state, write_partner_report
    from fedpersona.report import write_report
    from fedpersona.sweep import sweep_runs, write_sweep

    if not run_dir.is_dir():
        raise FedPersonaError(
            f"{run_dir} does not exist or is not a folder: give a run folder, a sweep folder or a partner's "
            "state folder"
        )
    if not (run_dir / "metrics.jsonl").exists() and sweep_runs(run_dir):
        for _, sub in sweep_runs(run_dir):
            write_report(sub)
        write_sweep(run_dir)
        console.print(f"wrote {run_dir / 'report.html'} and {run_dir / 'sweep.json'} (a sweep)")
        return
    if is_partner_state(run_dir):
        done = write_partner_report(run_dir)
        console.print(f"wrote {done.html} and {done.markdown} (this partner's personas: local, never sent)")
        for warning in done.warnings:
            console.print(f"[bold red]warning[/bold red]: {warning}", highlight=False)
        return
    if not (run_dir / "metrics.jsonl").exists():
        raise FedPersonaError(
            f"{run_dir} is not a run folder (no metrics.jsonl), a sweep folder (no eps-*/) nor a partner's "
            "state folder (no personas.json, plan.json or ledger.jsonl)"
        )
    console.print(f"wrote {write_report(run_dir)}")
    _print_warnings(run_dir)


@app.command()
def audit(
    scenario: Path | None = typer.Option(
        None, help="Scenario TOML; its federation, training and privacy sections apply (default: the packaged one)."
    ),
    epsilon: str | None = typer.Option(None, help="The claimed epsilon to check (default: the scenario's target)."),
    canaries: str = typer.Option("1000", help="Canary users, each put into the audited table with probability 1/2."),
    rows: str = typer.Option("2000", help="Ordinary users of the audited table (generated, of the first silo's kind)."),
    out: Path | None = typer.Option(None, help="Folder for audit.json (required)."),
) -> None:
    """Audit a partner's real DP-SGD rounds: a one-run canary bound (Steinke et al. 2023) and
    direct checks of the noise, the clipping, the ledger and the secrecy of the randomness."""
    import numpy as np

    from fedpersona.audit import AuditSettings, check_out_dir, run_audit, write_audit
    from fedpersona.config.files import load_scenario
    from fedpersona.simulation import default_scenario_path

    # Numbers are parsed here so that a typo exits 2 with one line, like every other user error.
    def number(text: str, option: str, kind: type[int] | type[float]) -> Any:
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise FedPersonaError(f"{option} must be {what}, got {text!r}") from None

    if out is None:
        raise FedPersonaError("--out DIR is required: the folder that receives audit.json")
    settings = AuditSettings(canaries=number(canaries, "--canaries", int), rows=number(rows, "--rows", int))
    check_out_dir(out)
    sc = load_scenario(scenario or default_scenario_path(), epsilon=parse_epsilon(epsilon))
    if not sc.privacy.private:
        raise FedPersonaError("an audit checks a finite claimed epsilon; 'inf' (NOT PRIVATE) has nothing to check")
    console.print(
        f"[bold]fedpersona audit[/bold]: claimed epsilon {sc.privacy.target_epsilon:g}, {settings.canaries} "
        f"canaries, {settings.rows} users, {sc.federation.rounds} rounds, seed {sc.federation.seed}"
    )
    result = run_audit(scenario=sc, settings=settings, rng=np.random.default_rng(sc.federation.seed))
    path = write_audit(result, out)
    if result.claim_refuted:
        verdict = "[bold red]REFUTED: the lower bound exceeds the claim[/bold red]"
    elif result.findings:
        verdict = "[bold red]INCONSISTENT: " + "; ".join(result.findings) + "[/bold red]"
    else:
        verdict = "consistent with the claim"
    console.print(
        f"epsilon lower bound {result.epsilon_lower_bound:.3f} at {result.confidence:.0%} confidence "
        f"({result.correct}/{result.guesses} guesses right) vs claimed {result.epsilon_claimed:g}; noise multiplier "
        f"measured {result.noise_multiplier_measured:.3g} +- {result.noise_multiplier_stderr:.2g} vs planned "
        f"{result.noise_multiplier_planned:.4g}; ledger epsilon {result.epsilon_ledger:.4g} for "
        f"{result.steps_ledger} steps ({result.steps_observed} ran): {verdict}\nwrote {path} in {result.seconds:.0f}s"
    )
