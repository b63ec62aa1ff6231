"""``fedpersona infer``, ``schema ...`` and ``privacy ...``: a partner's own data and budget."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table as RichTable

from fedpersona.cli.app import app, console, err_console, privacy_app, schema_app
from fedpersona.errors import FedPersonaError

__all__ = ["infer", "privacy_ledger", "privacy_plan", "schema_check", "schema_infer"]


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
    from rich.progress import Progress

    from fedpersona.config.files import load_partner_config
    from fedpersona.federation.partner_personas import infer_users
    from fedpersona.model.artifacts import load_signing_public_key

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
        key_bytes = load_signing_public_key(public_key)
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
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("assigning personas", total=None)
        summary = infer_users(
            cfg, model=folder, public_key=key_bytes, data_path=data, out_path=out, chunk_rows=chunk_rows,
            include_embedding=embedding, progress=lambda rows: progress.update(task, completed=rows),
        )  # fmt: skip
    console.print(f"wrote {summary.rows} users in {summary.chunks} chunk(s) to {summary.path}")


@schema_app.command("check")
def schema_check(
    schema: Path = typer.Option(..., help="Schema TOML."),
    data: Path = typer.Option(..., help="CSV (also .gz) or Parquet file."),
) -> None:
    """Validate a data file against a schema; lists every problem at once."""
    from fedpersona.data.schema_reader import load_schema
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
    persona_releases: int | None = typer.Option(
        None, min=0, help="Persona releases the federation announces for a partner (default: 7; 0: none)."
    ),
    persona_share: float | None = typer.Option(
        None, min=0.01, max=0.99, help="The personas' share of a partner's budget (default: 0.6)."
    ),
) -> None:
    """Noise multipliers and epsilon per round, and the personas' share, before anything runs."""
    from fedpersona.budget import plan_table

    for title, lines in plan_table(
        config, rounds=rounds, rows=rows, persona_releases=persona_releases, persona_share=persona_share
    ):
        _print_table(title, lines)


@privacy_app.command("ledger")
def privacy_ledger(state_dir: Path = typer.Argument(..., help="A partner's state folder.")) -> None:
    """What a partner has spent, entry by entry, and what is left of its lifetime budget."""
    from fedpersona.budget import ledger_table
    from fedpersona.deploy.lifetime import lifetime_budget

    _print_table(*ledger_table(state_dir))
    budget = lifetime_budget(state_dir)
    line = budget.text()
    console.print(line if budget.next_round_fits is not False else f"[bold red]{line}[/bold red]", highlight=False)


def _print_table(title: str, lines: list[list[str]]) -> None:
    """A title, then a right-aligned table whose first line is the header."""
    console.print(title)
    table = RichTable()
    for col in lines[0]:
        table.add_column(col, justify="right")
    for line in lines[1:]:
        table.add_row(*line)
    console.print(table)
