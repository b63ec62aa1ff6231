"""``fedpersona certs``, ``server``, ``partner`` and ``serve``: a real deployment."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.table import Table as RichTable

from fedpersona.cli.app import app, certs_app, console, number_text, partner_app, server_app_cli

__all__ = [
    "certs_init",
    "certs_partner",
    "certs_token",
    "partner_check",
    "partner_start",
    "serve",
    "server_kit",
    "server_start",
]


# --- deployment: credentials, coordinator, partners, model registry (fedpersona.deploy.certs/deploy/registry)


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


@certs_app.command("token")
def certs_token(
    out: Path = typer.Option(..., help="File for the registry's bearer token (e.g. server/registry.token)."),
) -> None:
    """Create a random bearer token for `fedpersona serve --token-file` (mode 0600, never overwritten)."""
    from fedpersona.deploy.registry import make_token_file

    path = make_token_file(out)
    console.print(
        f"wrote {path} (mode 0600): pass it to `fedpersona serve --token-file {path}` and give a copy to each "
        "partner (their `fedpersona infer --token-file`)"
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


@server_app_cli.command("kit")
def server_kit(
    config: Path = typer.Option(..., help="server/federation.toml (the partner must be listed in it)."),
    partner: str = typer.Option(..., help="The partner's name, as in [[partners]]."),
    out: Path = typer.Option(..., help="Folder for the kit; it is written to OUT/PARTNER/."),
    superlink: str | None = typer.Option(None, help="HOST:PORT partners dial (default: [server] host and port)."),
    kind: str | None = typer.Option(None, help="The partner's kind, when [[partners]] does not say it."),
    schema: Path | None = typer.Option(None, help="The shared schema.toml of the partner's kind, to include."),
    package: str | None = typer.Option(None, help="pip requirement to install (default: fedpersona==<this version>)."),
    wheel: Path | None = typer.Option(None, help="A fedpersona wheel to include and install instead of --package."),
    registry_url: str | None = typer.Option(None, help="The model registry's URL (fedpersona serve), if any."),
    registry_token: Path | None = typer.Option(None, help="The registry's token file (0600), copied 0600."),
) -> None:
    """Make a partner's kit: CA, model key, client.toml, install commands (no private key of yours)."""
    from fedpersona.deploy.kit import make_partner_kit

    kit = make_partner_kit(
        config=config, partner=partner, out=out, superlink=superlink, kind=kind, schema=schema,
        package=package, wheel=wheel, registry_url=registry_url, registry_token=registry_token,
    )  # fmt: skip
    console.print(f"wrote the kit of partner {partner} to {kit.folder}: {', '.join(kit.files)}", highlight=False)
    if not kit.key_registered:
        console.print(
            f"partner {partner}'s node public key is not here yet: it makes the key with `fedpersona certs partner "
            f"{partner}` (INSTALL.md step 2) and sends you the .pub file for [[partners]]",
            highlight=False,
        )


def _report(message: str) -> None:
    console.print(message, soft_wrap=True, highlight=False, markup=False)  # log lines may hold [brackets]


def _partner_paths(config: Path, ca: Path | None, key: Path | None) -> tuple[Path, Path]:
    from fedpersona.config.files import load_partner_config

    cfg = load_partner_config(config)
    folder = config.resolve().parent / "credentials"
    return ca or folder / "ca.pem", key or folder / f"{cfg.name}.key"


_REHEARSAL_HELP = (
    "A trial run: synthetic rows drawn from the schema (never your data), with its own state folder and ledger "
    "(rehearsal/ beside client.toml); the real budget is not touched."
)


def _rehearsal_config(config: Path) -> Path:
    """Write rehearsal/ beside ``config`` and return its client.toml (credentials stay the real ones)."""
    from fedpersona.deploy.rehearsal import prepare_rehearsal

    prepared = prepare_rehearsal(config)
    console.print(f"[bold]{prepared.text()}[/bold]", highlight=False)
    return prepared.config


def _print_real_budget(config: Path, *, rehearsal: bool) -> None:
    """Say whether the real lifetime budget is untouched (always after a rehearsal's check)."""
    from fedpersona.config.files import load_partner_config
    from fedpersona.deploy.lifetime import lifetime_budget

    cfg = load_partner_config(config)
    budget = lifetime_budget(cfg.state_dir, settings=cfg.privacy)
    if rehearsal or budget.untouched:
        fits = budget.next_round_fits is not False
        line = f"REAL {budget.text()}"
        console.print(line if fits else f"[bold red]{line}[/bold red]", highlight=False)


@partner_app.command("check")
def partner_check(
    config: Path = typer.Option(..., help="clients/<kind>/client.toml."),
    ca: Path | None = typer.Option(None, help="Federation CA (default: credentials/ca.pem beside client.toml)."),
    key: Path | None = typer.Option(None, help="Node key (default: credentials/<name>.key beside client.toml)."),
    rounds: int | None = typer.Option(None, min=1, help="Rounds the federation plans (for the privacy plan)."),
    persona_releases: int | None = typer.Option(
        None, min=0, help="Persona releases the federation announces (default: the federation default; 0: none)."
    ),
    rehearsal: bool = typer.Option(False, "--rehearsal", help=_REHEARSAL_HELP),
) -> None:
    """Validate data, schema, privacy plan and credentials; nothing connects."""
    from fedpersona.deploy.partner_site import check_partner

    ca_path, key_path = _partner_paths(config, ca, key)
    real = config
    if rehearsal:
        config = _rehearsal_config(config)
    result = check_partner(config, ca=ca_path, key=key_path, rounds=rounds, persona_releases=persona_releases)
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
        sigma = number_text(result.noise_multiplier, 4)
        console.print(
            f"privacy plan ({result.plan_source}): {result.planned_rounds} rounds, noise multiplier {sigma}, "
            f"target epsilon {cfg.privacy.target_epsilon:g}"
            + (f", cumulative epsilon {eps} (the last after persona clustering, if any)" if eps else "")
        )
    budget = result.budget_text()
    if budget is not None and rehearsal:
        budget = f"rehearsal (not your real budget) {budget}"
    if budget is not None:
        fits = result.next_round_epsilon is None or result.next_round_epsilon <= cfg.privacy.target_epsilon
        console.print(budget if fits else f"[bold red]{budget}[/bold red]")
    _print_real_budget(real, rehearsal=rehearsal)


@partner_app.command("start")
def partner_start(
    config: Path = typer.Option(..., help="clients/<kind>/client.toml."),
    superlink: str = typer.Option(..., envvar="FEDPERSONA_SUPERLINK", help="The coordinator's SuperLink as HOST:PORT."),
    ca: Path | None = typer.Option(None, help="Federation CA (default: credentials/ca.pem beside client.toml)."),
    key: Path | None = typer.Option(None, help="Node key (default: credentials/<name>.key beside client.toml)."),
    runtime_port: int = typer.Option(9094, help="Local port of the SuperNode's runtime API (loopback)."),
    max_wait_time: float = typer.Option(600.0, help="Seconds flower-supernode keeps reconnecting before a restart."),
    max_restarts: int = typer.Option(10, min=0, help="Restarts of flower-supernode (backoff 5s..300s)."),
    keep_running: bool = typer.Option(
        False,
        help="Keep the SuperNode for later runs; by default it stops once the run has finished and the "
        "coordinator's SuperLink has stopped.",
    ),
    model_key: Path | None = typer.Option(
        None,
        help="The federation's model-signing.pub, to verify the final model (default: credentials/ beside "
        "client.toml when there).",
    ),
    rehearsal: bool = typer.Option(False, "--rehearsal", help=_REHEARSAL_HELP),
) -> None:
    """Check everything, then run the partner's Flower SuperNode; Ctrl-C stops it."""
    from fedpersona.deploy.partner_site import start_partner

    ca_path, key_path = _partner_paths(config, ca, key)
    if model_key is None:
        default = config.resolve().parent / "credentials" / "model-signing.pub"
        model_key = default if default.exists() else None
    if rehearsal:
        real = config
        config = _rehearsal_config(config)
        _print_real_budget(real, rehearsal=True)
    code = start_partner(
        config, superlink=superlink, ca=ca_path, key=key_path, runtime_port=runtime_port,
        max_wait_time=max_wait_time, max_restarts=max_restarts, model_key=model_key, keep_running=keep_running,
        report=_report,
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
    from fedpersona.config.files import load_partner_config
    from fedpersona.model.artifacts import load_signing_public_key, rollback_model

    cfg = load_partner_config(config)
    raw = load_signing_public_key(model_key or config.resolve().parent / "credentials" / "model-signing.pub")
    chosen = rollback_model(Path(cfg.state_dir) / "model", version=version, public_key=raw)
    console.print(f"reinstalled model {chosen} in {Path(cfg.state_dir) / 'model'}; the replaced one is in the history")


@app.command()
def serve(
    artifacts: Path = typer.Option(..., help="A model folder (RUN_DIR/model) or a folder of them."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on: loopback by default; 0.0.0.0 (every interface) to serve partners."
    ),
    port: int = typer.Option(8443, help="Port to listen on."),
    tls_cert: Path | None = typer.Option(None, help="TLS certificate (PEM); with --tls-key serves HTTPS."),
    tls_key: Path | None = typer.Option(None, help="TLS private key (PEM)."),
    token_file: Path | None = typer.Option(None, help="File holding a bearer token required on /v1 (mode 0600)."),
) -> None:
    """Serve signed global models read-only over HTTP(S)."""
    from fedpersona.deploy.registry import serve_registry

    serve_registry(artifacts, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file)
