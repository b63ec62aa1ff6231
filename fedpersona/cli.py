"""The ``fedpersona`` command line. Exit codes: 0 success, 2 user error, 1 internal failure."""

from __future__ import annotations

import logging
import math
import sys
import time
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
    sweep_epsilon: str | None = typer.Option(
        None,
        help="Privacy-utility sweep: comma list of target epsilons (e.g. 0.5,1,2,4,8,inf); one run per "
        "value in OUT/eps-<value>/, then OUT/sweep.json, sweep.csv and report.html.",
    ),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
    reproducible_noise: bool = typer.Option(
        False,
        help="Derive every partner's DP noise from the federation seed: a reproducible run that is "
        "NOT private against the coordinator (labelled so everywhere).",
    ),
) -> None:
    """Run a whole federation locally and write the run folder."""
    from fedpersona.simulation import simulate as run

    eps = _parse_epsilon(epsilon)
    if not verbose:
        logging.getLogger("flwr").propagate = False
    if sweep_epsilon is not None:
        if eps is not None:
            raise FedPersonaError("--epsilon and --sweep-epsilon exclude each other; give one of them")
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
        reproducible_noise=reproducible_noise or None,
    )
    from fedpersona.report import SUMMARY_COLUMNS, summary_rows

    table = RichTable(title=f"after {max((r['round'] for r in result.rows), default=0)} rounds")
    for _, label in SUMMARY_COLUMNS:
        table.add_column(label, justify="right")
    spent = {name: entry.get("epsilon") for name, entry in result.privacy["partners"].items()}
    for row in summary_rows(result.rows):
        row = {**row, "epsilon": spent.get(row["partner"], row.get("epsilon"))}
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
    if any(p.get("noise_seeds_known") for p in result.privacy["partners"].values()):
        from fedpersona.privacy.randomness import KNOWN_SEEDS_LABEL

        console.print(f"[bold red]{KNOWN_SEEDS_LABEL.upper()} (--reproducible-noise)[/bold red]")
    from fedpersona.report import persona_rows

    found = persona_rows(result.rows)
    if found:

        def avg(key: str) -> str:
            vals = [float(r[key]) for r in found if key in r]
            return f"{sum(vals) / len(vals):.3f}" if vals else "-"

        console.print(
            f"personas: {len(found)} partners assigned their users to the global personas "
            f"(mean surrogate fidelity {avg('surrogate_fidelity')}, mean ARI vs ground truth "
            f"{avg('persona_ari')}); cards stay at each partner, shares per kind in personas.json"
        )
    chosen = k_choice_line(result.run_dir)
    if chosen:
        console.print(chosen)
    console.print(f"done in {result.seconds:.0f}s; report: {result.run_dir / 'report.html'}")


def k_choice_line(run_dir: Path) -> str | None:
    """The console line saying which K the run chose among its candidates, or None."""
    import json

    path = run_dir / "personas.json"
    try:
        choice = json.loads(path.read_text()).get("k_choice") if path.exists() else None
    except (OSError, ValueError):
        return None
    if not isinstance(choice, dict) or not isinstance(choice.get("scores"), dict):
        return None
    among = ", ".join(str(k) for k in sorted(choice["scores"], key=int))
    return (
        f"personas: K = {choice.get('k')} chosen among {among} from the noisy k-means statistics "
        "(scores in personas.json)"
    )


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
def infer(
    model: str = typer.Option(..., help="A model folder, or the URL of a fedpersona registry."),
    config: Path = typer.Option(..., help="The partner's client.toml (schema, state folder)."),
    data: Path = typer.Option(..., help="Users to assign: CSV (also .gz) or Parquet."),
    out: Path = typer.Option(..., help="Output .csv or .parquet (user id, persona, probabilities)."),
    public_key: Path | None = typer.Option(
        None,
        help="The federation's model-signing public key (PEM); default: credentials/model-signing.pub "
        "beside client.toml. Without one, infer refuses.",
    ),
    no_verify: bool = typer.Option(
        False,
        "--no-verify",
        help="Do not check who signed the model (only for a model folder you made yourself; loudly reported).",
    ),
    token_file: Path | None = typer.Option(None, help="Bearer token for the registry."),
    ca: Path | None = typer.Option(
        None,
        help="CA that certifies an https registry (default: credentials/ca.pem next to client.toml, "
        "when present; otherwise the system's CAs).",
    ),
    chunk_rows: int = typer.Option(100_000, min=1, help="Rows read and written per chunk."),
    embedding: bool = typer.Option(False, help="Also write each user's embedding."),
) -> None:
    """Assign personas to a partner's users, entirely at the partner."""
    import numpy as np
    import torch
    from rich.progress import Progress

    from fedpersona.config.files import load_partner_config
    from fedpersona.federation.partner import partner_schema
    from fedpersona.model.artifacts import verify_model
    from fedpersona.model.inference import infer_file

    cfg = load_partner_config(config)
    key_bytes = None
    if public_key is None and not no_verify:
        default = config.resolve().parent / "credentials" / "model-signing.pub"
        if not default.is_file():
            raise FedPersonaError(
                f"cannot check who made the model: no --public-key was given and there is no {default}. Pass the "
                "federation's model-signing.pub with --public-key (or put it in credentials/ beside client.toml); "
                "use --no-verify only for a model folder you made yourself"
            )
        public_key = default
    if no_verify:
        if public_key is not None:
            raise FedPersonaError("--no-verify and --public-key exclude each other; give one of them")
        if model.startswith(("http://", "https://")):
            raise FedPersonaError("--no-verify is refused for a model downloaded from a registry: verify it")
        err_console.print(
            "[bold red]WARNING: --no-verify: the model's signature is checked only against the key stored in "
            "the model itself, which proves it is intact, not who made it. Use this only for a model folder "
            "you made yourself.[/bold red]"
        )
    if public_key is not None:
        from cryptography.hazmat.primitives import serialization

        try:
            loaded = serialization.load_pem_public_key(public_key.read_bytes())
        except (OSError, ValueError) as exc:
            raise FedPersonaError(f"{public_key}: not a PEM public key ({exc})") from None
        key_bytes = loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if model.startswith(("http://", "https://")):
        from fedpersona.deploy.registry import fetch_model

        if public_key is None:  # not reached: a registry model is always verified (above)
            raise FedPersonaError("--public-key is required to verify a model downloaded from a registry")
        token = token_file.read_text().strip() if token_file else None
        if ca is None and (config.parent / "credentials" / "ca.pem").is_file():
            ca = config.parent / "credentials" / "ca.pem"  # the federation's CA signs its registry too
        if ca is not None and not ca.is_file():
            raise FedPersonaError(f"--ca {ca}: no such file (the federation's CA certificate, PEM)")
        folder = fetch_model(
            model, public_key=public_key, cache_dir=Path(cfg.state_dir) / "models", token=token, ca=ca
        ).path
    else:
        folder = Path(model)
    arrays, card = verify_model(folder, public_key=key_bytes)
    if not card.get("prototypes"):
        raise FedPersonaError(f"{folder}: the model carries no persona prototypes (the run clustered no personas)")
    schema = partner_schema(cfg)
    local_adapter = None
    slot = f"{cfg.kind}:{schema.fingerprint()}"
    if not any(name.startswith(slot + "/") for name in arrays):
        local_path = Path(cfg.state_dir) / "local.pt"
        if local_path.exists():
            state = torch.load(local_path, map_location="cpu", weights_only=True)
            local_adapter = {k: v.numpy() for k, v in state.items() if k.startswith("adapter.")}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("assigning personas", total=None)
        summary = infer_file(
            arrays=arrays,
            card=card,
            schema=schema,
            prototypes=np.asarray(card["prototypes"], dtype=np.float64),
            data_path=data,
            out_path=out,
            chunk_rows=chunk_rows,
            include_embedding=embedding,
            local_adapter=local_adapter,
            progress=lambda rows: progress.update(task, completed=rows),
        )
    console.print(f"wrote {summary.rows} users in {summary.chunks} chunk(s) to {summary.path}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Rebuild report.html and report.md of a run folder (or of a sweep folder and its runs)."""
    from fedpersona.report import write_report
    from fedpersona.sweep import sweep_runs, write_sweep

    if not (run_dir / "metrics.jsonl").exists() and run_dir.is_dir() and sweep_runs(run_dir):
        for _, sub in sweep_runs(run_dir):
            write_report(sub)
        write_sweep(run_dir)
        console.print(f"wrote {run_dir / 'report.html'} and {run_dir / 'sweep.json'} (a sweep)")
        return
    if not (run_dir / "metrics.jsonl").exists():
        raise FedPersonaError(f"{run_dir} is not a run folder (no metrics.jsonl) nor a sweep folder (no eps-*/)")
    console.print(f"wrote {write_report(run_dir)}")


@app.command()
def audit(
    scenario: Path | None = typer.Option(
        None, help="Scenario TOML; its federation, training and privacy sections apply (default: the packaged one)."
    ),
    epsilon: str | None = typer.Option(None, help="The claimed epsilon to check (default: the scenario's target)."),
    canaries: str = typer.Option("1000", help="Canary users, each put into the audited table with probability 1/2."),
    noise_scale: str = typer.Option("1", help="Test knob: planned noise x this (1 = correct pipeline, 0 = no DP)."),
    out: Path | None = typer.Option(None, help="Folder for audit.json (required)."),
) -> None:
    """Check a partner's claimed epsilon with a one-run canary audit (Steinke et al. 2023)."""
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
    settings = AuditSettings(
        canaries=number(canaries, "--canaries", int), noise_scale=number(noise_scale, "--noise-scale", float)
    )
    check_out_dir(out)
    sc = load_scenario(scenario or default_scenario_path(), epsilon=_parse_epsilon(epsilon))
    if not sc.privacy.private:
        raise FedPersonaError("an audit checks a finite claimed epsilon; 'inf' (NOT PRIVATE) has nothing to check")
    console.print(
        f"[bold]fedpersona audit[/bold]: claimed epsilon {sc.privacy.target_epsilon:g}, {settings.canaries} "
        f"canaries, {sc.federation.rounds} rounds, noise x {settings.noise_scale:g}, seed {sc.federation.seed}"
    )
    result = run_audit(scenario=sc, settings=settings, rng=np.random.default_rng(sc.federation.seed))
    path = write_audit(result, out)
    verdict = (
        "[bold red]REFUTED: the lower bound exceeds the claim[/bold red]"
        if result.claim_refuted
        else "consistent with the claim"
    )
    console.print(
        f"epsilon lower bound {result.epsilon_lower_bound:.3f} at {result.confidence:.0%} confidence "
        f"({result.correct}/{result.guesses} guesses right; from the releases alone "
        f"{result.epsilon_lower_bound_releases:.3f}) vs claimed {result.epsilon_claimed:g}: {verdict}"
        f"\nwrote {path} in {result.seconds:.0f}s"
    )


@schema_app.command("check")
def schema_check(
    schema: Path = typer.Option(..., help="Schema TOML."),
    data: Path = typer.Option(..., help="CSV (also .gz) or Parquet file."),
) -> None:
    """Validate a data file against a schema; lists every problem at once."""
    from fedpersona.data.schema import load_schema
    from fedpersona.data.tables import load_table

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
    from fedpersona.data.drafting import infer_schema

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
    kmeans_rounds: int = typer.Option(6, min=0, help="Persona-clustering rounds the federation announces (0: none)."),
    kmeans_noise: float = typer.Option(10.0, min=0.01, help="Noise multiplier of each clustering release."),
) -> None:
    """Noise multiplier and epsilon per round, and the clustering reserve, before anything runs."""
    from fedpersona.privacy.planner import plan_table

    for title, lines in plan_table(
        config, rounds=rounds, rows=rows, kmeans_rounds=kmeans_rounds, kmeans_noise=kmeans_noise
    ):
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
    from fedpersona.privacy.planner import ledger_table

    title, lines = ledger_table(state_dir)
    console.print(title)
    table = RichTable()
    for col in lines[0]:
        table.add_column(col, justify="right")
    for line in lines[1:]:
        table.add_row(*line)
    console.print(table)


# --- deployment: credentials, coordinator, partners, model registry (fedpersona.deploy.certs/deploy/registry)

certs_app = typer.Typer(no_args_is_help=True, help="Federation CA, SuperLink certificate, signing and node keys.")
server_app_cli = typer.Typer(no_args_is_help=True, help="Run the coordinator (Flower SuperLink + the fedpersona run).")
partner_app = typer.Typer(no_args_is_help=True, help="Check and run a partner site (Flower SuperNode).")
app.add_typer(certs_app, name="certs")
app.add_typer(server_app_cli, name="server")
app.add_typer(partner_app, name="partner")


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., help="Folder for ca.pem/ca.key, server.pem/server.key, model-signing.key/.pub."),
    host: list[str] = typer.Option(..., help="DNS name or IP partners use to reach the SuperLink (repeatable)."),
    days: int = typer.Option(825, help="Certificate lifetime in days."),
) -> None:
    """Create the federation CA, the SuperLink's TLS certificate and the model-signing key."""
    from fedpersona.deploy.certs import init_federation

    creds = init_federation(out=out, hosts=host, days=days)
    console.print(
        f"wrote {creds.ca_cert}, {creds.server_cert}, {creds.signing_public_key} (give ca.pem and "
        f"model-signing.pub to every partner) and private keys {creds.ca_key}, {creds.server_key}, "
        f"{creds.signing_key} (mode 0600; never share them)"
    )


@certs_app.command("partner")
def certs_partner(
    name: str = typer.Argument(..., help="The partner's name (as in its client.toml)."),
    out: Path = typer.Option(..., help="Folder for NAME.key (private, 0600) and NAME.pub."),
    curve: str = typer.Option("p384", help="NIST curve: p384 or p256."),
) -> None:
    """Create a partner's SuperNode authentication key pair (run it at the partner's site)."""
    from fedpersona.deploy.certs import partner_keys

    keys = partner_keys(name, out=out, curve=curve)
    console.print(
        f"wrote {keys.private_key} (keep it at the site, mode 0600) and {keys.public_key} "
        "(send it to the coordinator for server/federation.toml)"
    )


@server_app_cli.command("start")
def server_start(
    config: Path = typer.Option(..., help="server/federation.toml."),
    resume: bool = typer.Option(False, help="Continue a federation whose run folder already exists."),
) -> None:
    """Start the SuperLink (TLS + node auth), register partners, run the federation; Ctrl-C stops all."""
    from fedpersona.deploy.coordinator import start_server

    code = start_server(config, resume=resume, report=_report)
    if code:
        sys.exit(code)  # 1: the run failed, 130: stopped by SIGINT/SIGTERM


def _report(message: str) -> None:
    console.print(message, soft_wrap=True, highlight=False)


def _partner_paths(config: Path, ca: Path | None, key: Path | None) -> tuple[Path, Path]:
    from fedpersona.config.files import load_partner_config

    cfg = load_partner_config(config)
    folder = config.resolve().parent / "credentials"
    return ca or folder / "ca.pem", key or folder / f"{cfg.name}.key"


@partner_app.command("check")
def partner_check(
    config: Path = typer.Option(..., help="clients/<kind>/client.toml."),
    ca: Path | None = typer.Option(None, help="Federation CA (default: credentials/ca.pem beside client.toml)."),
    key: Path | None = typer.Option(None, help="Node key (default: credentials/<name>.key beside client.toml)."),
    rounds: int | None = typer.Option(None, min=1, help="Rounds the federation plans (for the privacy plan)."),
    kmeans_rounds: int | None = typer.Option(None, min=0, help="Persona-clustering rounds (default: federation's)."),
) -> None:
    """Validate data, schema, privacy plan and credentials; nothing connects."""
    from fedpersona.deploy.partner_site import check_partner

    ca_path, key_path = _partner_paths(config, ca, key)
    result = check_partner(config, ca=ca_path, key=key_path, rounds=rounds, kmeans_rounds=kmeans_rounds)
    cfg = result.config
    console.print(
        f"partner {cfg.name} ({cfg.kind}): data OK, {result.rows} users ({result.train_rows} for training; "
        f"declared public_rows {result.public_rows}), {result.features} features; credentials OK; "
        f"state folder {cfg.state_dir}"
    )
    if not 0.5 <= result.train_rows / result.public_rows <= 2.0:
        console.print(
            f"[bold yellow]warning:[/bold yellow] data.public_rows = {result.public_rows} is far from the "
            f"{result.train_rows} training rows here: the sample rate and your weight follow the declaration, "
            "so training will see much more or much less of your data than planned"
        )
    if not cfg.privacy.private:
        console.print("[bold red]NOT PRIVATE: privacy.target_epsilon = inf[/bold red]")
    elif result.planned_rounds is None:
        console.print("privacy plan: give --rounds (or set privacy.planned_rounds) to see noise and epsilon per round")
    else:
        eps = ", ".join(f"{e:.3f}" for e in result.epsilon_per_round)
        sigma = _num(result.noise_multiplier, 4)
        console.print(
            f"privacy plan ({result.plan_source}): {result.planned_rounds} rounds, noise multiplier {sigma}, "
            f"target epsilon {cfg.privacy.target_epsilon:g}"
            + (f", cumulative epsilon {eps} (the last after persona clustering, if any)" if eps else "")
        )


@partner_app.command("start")
def partner_start(
    config: Path = typer.Option(..., help="clients/<kind>/client.toml."),
    superlink: str = typer.Option(..., envvar="FEDPERSONA_SUPERLINK", help="The coordinator's SuperLink as HOST:PORT."),
    ca: Path | None = typer.Option(None, help="Federation CA (default: credentials/ca.pem beside client.toml)."),
    key: Path | None = typer.Option(None, help="Node key (default: credentials/<name>.key beside client.toml)."),
    runtime_port: int = typer.Option(9094, help="Local port of the SuperNode's runtime API (loopback)."),
    max_wait_time: float = typer.Option(600.0, help="Seconds flower-supernode keeps reconnecting before a restart."),
    max_restarts: int = typer.Option(10, min=0, help="Restarts of flower-supernode (backoff 5s..300s)."),
    model_key: Path | None = typer.Option(
        None,
        help="The federation's model-signing.pub, to verify the final model (default: credentials/ beside "
        "client.toml when there).",
    ),
) -> None:
    """Check everything, then run the partner's Flower SuperNode; Ctrl-C stops it."""
    from fedpersona.deploy.partner_site import start_partner

    ca_path, key_path = _partner_paths(config, ca, key)
    if model_key is None:
        default = config.resolve().parent / "credentials" / "model-signing.pub"
        model_key = default if default.exists() else None
    code = start_partner(
        config, superlink=superlink, ca=ca_path, key=key_path, runtime_port=runtime_port,
        max_wait_time=max_wait_time, max_restarts=max_restarts, model_key=model_key, report=_report,
    )  # fmt: skip
    if code:
        sys.exit(code)  # 1: the run failed, 130: stopped by SIGINT/SIGTERM


@partner_app.command("models")
def partner_models(config: Path = typer.Option(..., help="clients/<kind>/client.toml.")) -> None:
    """The federation model installed at this partner, and the ones it replaced."""
    from fedpersona.config.files import load_partner_config
    from fedpersona.model.artifacts import model_versions

    cfg = load_partner_config(config)
    versions = model_versions(Path(cfg.state_dir) / "model")
    if not versions:
        console.print(f"no federation model is installed in {Path(cfg.state_dir) / 'model'}")
        return
    table = RichTable(title=f"models of partner {cfg.name}")
    for col in ("version", "rounds", "personas", "created", "path"):
        table.add_column(col)
    for v in versions:
        created = v["created"]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(created))) if created else "-"
        table.add_row(str(v["version"]), str(v["rounds"]), str(v["personas"]), when, str(v["path"]))
    console.print(table)


@partner_app.command("rollback")
def partner_rollback(
    config: Path = typer.Option(..., help="clients/<kind>/client.toml."),
    version: str | None = typer.Option(None, help="The version to reinstall (default: the most recent one)."),
    model_key: Path | None = typer.Option(
        None, help="The federation's model-signing.pub (default: credentials/ beside client.toml)."
    ),
) -> None:
    """Reinstall a model the installed one replaced (after it is verified again)."""
    from cryptography.hazmat.primitives import serialization

    from fedpersona.config.files import load_partner_config
    from fedpersona.model.artifacts import rollback_model

    cfg = load_partner_config(config)
    key_path = model_key or config.resolve().parent / "credentials" / "model-signing.pub"
    try:
        loaded = serialization.load_pem_public_key(key_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise FedPersonaError(f"{key_path}: not the federation's model-signing public key ({exc})") from None
    raw = loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    chosen = rollback_model(Path(cfg.state_dir) / "model", version=version, public_key=raw)
    console.print(f"reinstalled model {chosen} in {Path(cfg.state_dir) / 'model'}; the replaced one is in the history")


@app.command()
def serve(
    artifacts: Path = typer.Option(..., help="A model folder (RUN_DIR/model) or a folder of them."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8443, help="Port to listen on."),
    tls_cert: Path | None = typer.Option(None, help="TLS certificate (PEM); with --tls-key serves HTTPS."),
    tls_key: Path | None = typer.Option(None, help="TLS private key (PEM)."),
    token_file: Path | None = typer.Option(None, help="File holding a bearer token required on /v1 (mode 0600)."),
) -> None:
    """Serve signed global models read-only over HTTP(S)."""
    from fedpersona.deploy.registry import serve_registry

    serve_registry(artifacts, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file)


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


if __name__ == "__main__":
    main()
