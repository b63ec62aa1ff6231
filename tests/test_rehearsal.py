"""Budget honesty: a rehearsal never reads the real rows or touches the real ledger; `partner check`
and `privacy ledger` say what is left of the real lifetime budget and whether the next round fits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpersona.cli import app as cli
from fedpersona.config.files import dump_toml, load_partner_config
from fedpersona.config.settings import TrainingSettings
from fedpersona.data.schema_reader import load_schema
from fedpersona.data.tables import load_table
from fedpersona.deploy.certs import init_federation, partner_keys
from fedpersona.deploy.lifetime import lifetime_budget
from fedpersona.deploy.rehearsal import prepare_rehearsal, synthetic_rows_from_schema
from fedpersona.errors import ConfigError
from fedpersona.privacy.ledger import PrivacyLedger

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = sorted((REPO / "clients").glob("*/schema*.toml"))


def _site(tmp_path: Path, data: dict[str, object]) -> tuple[Path, list[str]]:
    """A partner folder with credentials and a client.toml; the CLI's credential options."""
    creds = init_federation(out=tmp_path / "credentials", hosts=["localhost"])
    keys = partner_keys("bank-1", out=tmp_path / "credentials")
    path = tmp_path / "client.toml"
    dump_toml(
        path,
        {
            "partner": {"name": "bank-1", "kind": "finance", "state_dir": "state"},
            "data": data,
            "privacy": {"target_epsilon": 2.0, "delta": 1e-4},
        },
    )
    return path, ["--ca", str(creds.ca_cert), "--key", str(keys.private_key)]


def _run(args: list[str]) -> str:
    done = CliRunner().invoke(cli, args, terminal_width=400)
    assert done.exit_code == 0, done.output
    return " ".join(done.output.split())  # rich may wrap a long line


@pytest.mark.parametrize("schema_path", SCHEMAS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_rows_drawn_from_a_schema_pass_that_schema(schema_path: Path, tmp_path: Path) -> None:
    schema = load_schema(schema_path)
    if schema.events is not None:
        with pytest.raises(ConfigError, match=r"a rehearsal cannot draw event logs"):
            synthetic_rows_from_schema(schema, rows=60, generator=np.random.default_rng(0))
        return
    rows = max(60, schema.min_rows)
    text = synthetic_rows_from_schema(schema, rows=rows, generator=np.random.default_rng(0))
    (tmp_path / "rows.csv").write_text(text)
    table = load_table(schema, tmp_path / "rows.csv")  # the schema's own validator is the oracle
    assert len(table) == rows
    again = synthetic_rows_from_schema(schema, rows=rows, generator=np.random.default_rng(0))
    other = synthetic_rows_from_schema(schema, rows=rows, generator=np.random.default_rng(1))
    assert again == text and other != text


def test_a_rehearsal_never_reads_the_real_rows_nor_touches_the_real_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = REPO / "clients" / "finance" / "schema.toml"
    missing = tmp_path / "never-read.csv"  # the real table: a rehearsal does not need it
    path, creds = _site(tmp_path, {"path": str(missing), "schema": str(schema), "public_rows": 1000})
    out = _run(["partner", "check", "--config", str(path), *creds, "--rehearsal", "--rounds", "2"])
    rehearsal = tmp_path / "rehearsal"
    assert f"REHEARSAL: 600 synthetic users drawn from the schema ({rehearsal / 'synthetic.csv'})" in out
    assert f"its own state folder and ledger {rehearsal / 'state'}" in out
    assert f"REAL lifetime budget of {tmp_path / 'state'}: UNTOUCHED (epsilon 0 of 2 spent" in out
    assert "partner bank-1 (finance): data OK, 600 users" in out
    assert not (tmp_path / "state").exists()  # nothing was created, let alone charged, in the real state
    cfg = load_partner_config(rehearsal / "client.toml")
    real = load_partner_config(path)
    assert cfg.state_dir == str(rehearsal / "state") and cfg.data == str(rehearsal / "synthetic.csv")
    assert cfg.schema_path == real.schema_path and cfg.privacy == real.privacy and cfg.name == real.name
    # partner start --rehearsal runs the SuperNode on the rehearsal's client.toml with the real credentials.
    import fedpersona.deploy.partner_site as site

    started: dict[str, object] = {}

    def fake_start(config: Path, **kwargs: object) -> int:
        started.update(kwargs, config=config)
        return 0

    monkeypatch.setattr(site, "start_partner", fake_start)
    out = _run(["partner", "start", "--config", str(path), *creds, "--rehearsal", "--superlink", "127.0.0.1:9093"])
    assert started["config"] == rehearsal / "client.toml"
    assert (started["ca"], started["key"]) == (Path(creds[1]), Path(creds[3]))
    assert "REHEARSAL:" in out and f"REAL lifetime budget of {tmp_path / 'state'}: UNTOUCHED" in out
    # Without --rehearsal the real rows are read (and here they do not exist).
    done = CliRunner().invoke(cli, ["partner", "check", "--config", str(path), *creds])
    assert done.exit_code != 0 and "never-read.csv" in str(done.exception or done.output)


def test_a_rehearsal_state_that_overlaps_the_real_one_is_refused(tmp_path: Path) -> None:
    path, _ = _site(tmp_path, {"synthetic_rows": 200})
    doc = path.read_text().replace('state_dir = "state"', 'state_dir = "rehearsal/state"')
    path.write_text(doc)
    with pytest.raises(ConfigError, match=r"overlaps the rehearsal folder .* must never share the real ledger"):
        prepare_rehearsal(path)


def test_check_and_ledger_say_what_is_left_of_the_real_budget_and_whether_the_next_round_fits(
    tmp_path: Path,
) -> None:
    from fedpersona.federation.partner import load_partner_data, load_plan
    from fedpersona.privacy.planner import epsilon_schedule

    path, creds = _site(tmp_path, {"synthetic_rows": 200})
    out = _run(["partner", "check", "--config", str(path), *creds])  # a real check: nothing spent yet
    assert f"REAL lifetime budget of {tmp_path / 'state'}: UNTOUCHED (epsilon 0 of 2 spent" in out
    cfg = load_partner_config(path)
    plan = load_plan(cfg, load_partner_data(cfg), TrainingSettings(), 2)  # fixed as at a first round
    assert plan.noise_multiplier is not None
    schedule = epsilon_schedule(plan)
    state = Path(cfg.state_dir)
    untouched = lifetime_budget(state, settings=cfg.privacy)
    assert untouched.untouched and untouched.next_round_fits  # a plan fixed, nothing charged yet
    ledger = PrivacyLedger(state, settings=cfg.privacy)
    charge = {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps_per_round}
    ledger.charge(round=1, mechanism="dp-sgd", **charge)
    one = lifetime_budget(state)
    assert one.spent == pytest.approx(schedule[0], rel=1e-9) and one.next_round_fits
    assert one.next_round_epsilon == pytest.approx(schedule[1], rel=1e-6)
    out = _run(["partner", "check", "--config", str(path), *creds, "--rehearsal"])
    left = 2 - schedule[0]
    assert f"REAL lifetime budget of {state}: epsilon {schedule[0]:.4f} of 2 spent, {left:.4f} left" in out
    assert f"the next training round fits (it would bring epsilon to {schedule[1]:.4f})" in out
    assert "REHEARSAL:" in out and "synthetic rows" in out
    ledger.charge(round=2, mechanism="dp-sgd", **charge)
    out = _run(["privacy", "ledger", str(state)])
    assert re.search(
        rf"lifetime budget of {re.escape(str(state))}: epsilon {schedule[1]:.4f} of 2 spent, "
        rf"{2 - schedule[1]:.4f} left, over 2 training round\(s\) of 2 planned; the next training round does NOT "
        r"fit \(the planned rounds are used up\)",
        out,
    )
    # The rehearsal's ledger is its own: charging it leaves the real one as it was.
    _run(["partner", "check", "--config", str(path), *creds, "--rehearsal"])
    rehearsal_state = tmp_path / "rehearsal" / "state"
    PrivacyLedger(rehearsal_state, settings=cfg.privacy).charge(round=1, mechanism="dp-sgd", **charge)
    assert lifetime_budget(state).entries == 2 and lifetime_budget(rehearsal_state).entries == 1


def test_the_runbooks_lead_with_the_rehearsal_and_pin_a_cpu_torch() -> None:
    partner = (REPO / "clients" / "README.md").read_text()
    server = (REPO / "server" / "README.md").read_text()
    for text in (partner, server):
        assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
        assert "pip install torch &&" not in text
    assert partner.index("So rehearse first") < partner.index("## 1. Install")
    assert partner.index("partner start --config client.toml --rehearsal") < partner.index("## 6. Start")
    assert server.index("Rehearse first") < server.index("fedpersona server start --config server/federation.toml\n")
    assert "fedpersona server kit --config server/federation.toml --partner bank-1" in server
