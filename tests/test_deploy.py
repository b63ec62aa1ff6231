"""Deployment plumbing that needs no running Flower: config files, checks, command lines."""

from __future__ import annotations

import math
import os
import signal
import time
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpersona.config.files import dump_toml, load_federation_config
from fedpersona.deploy.certs import init_federation, load_node_public_key, partner_keys
from fedpersona.deploy.coordinator import stage_app, start_server, superlink_command
from fedpersona.deploy.partner_site import check_partner, supernode_command
from fedpersona.errors import ConfigError, SchemaError

REPO = Path(__file__).resolve().parents[1]


def _federation(tmp_path: Path, **server: object) -> Path:
    creds = tmp_path / "credentials"
    if not creds.exists():
        init_federation(out=creds, hosts=["localhost"])
    keys = partner_keys("shop-1", out=tmp_path / "partners")
    path = tmp_path / "federation.toml"
    dump_toml(
        path,
        {
            "server": {"port": 9555, "run_dir": "run", "app": str(REPO), "expected_partners": 1, **server},
            "federation": {"rounds": 2, "min_partners": 1},
            "model": {"token_dim": 8},
            "partners": [{"name": "shop-1", "kind": "ecommerce", "public_key": str(keys.public_key)}],
        },
    )
    return path


def test_example_federation_file_parses() -> None:
    cfg = load_federation_config(REPO / "server" / "federation.toml")
    assert [p.name for p in cfg.partners] == ["shop-1", "bank-1", "clinic-1"]
    assert cfg.run_dir == (REPO / "runs" / "federation").resolve()
    assert cfg.server.expected_partners == 3


def test_federation_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_federation_config(_federation(tmp_path))
    assert cfg.run_dir == tmp_path / "run"
    assert cfg.credentials == tmp_path / "credentials"
    assert cfg.model.token_dim == 8 and cfg.federation.rounds == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"server": {"prot": 1}}, r"unknown key server\.prot: did you mean port\?"),
        ({"servers": {}}, r"unknown key servers: did you mean server\?"),
        ({"server": {"port": 70000}}, r"server\.port: must be <= 65535, got 70000"),
        ({"server": {"expected_partners": 2}}, "only 1 \\[\\[partners\\]\\]"),
        ({"partners": [{"name": "a", "public_key": "a.pub", "colour": "red"}]}, r"unknown key partners #1\.colour"),
        ({"server": {"run_dir": 7}}, "server.run_dir: must be a string, got 7"),
        ({"server": {"credentials": ["a"]}}, "server.credentials: must be a string"),
        ({"partners": [{"name": "a", "public_key": 3}]}, "partners #1.public_key: must be a string, got 3"),
    ],
)
def test_bad_federation_files_are_config_errors(tmp_path: Path, edit: dict, message: str) -> None:
    path = _federation(tmp_path)
    doc = tomllib.loads(path.read_text())
    for section, value in edit.items():
        if isinstance(value, dict) and isinstance(doc.get(section), dict):
            doc[section].update(value)
        else:
            doc[section] = value
    dump_toml(path, doc)
    with pytest.raises(ConfigError, match=message):
        load_federation_config(path)


def test_node_keys_must_be_nist_ec(tmp_path: Path) -> None:
    ed = Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "ed.pub"
    path.write_bytes(ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ConfigError, match="NIST curve"):
        load_node_public_key(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_node_public_key(tmp_path / "missing.pub")


def test_command_lines_carry_tls_auth_and_state(tmp_path: Path) -> None:
    cfg = load_federation_config(_federation(tmp_path))
    link = superlink_command(cfg)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in link
    assert link[link.index("--database") + 1] == str(tmp_path / "run" / "superlink.db")
    assert link[link.index("--ssl-ca-certfile") + 1] == str(tmp_path / "credentials" / "ca.pem")
    assert link[link.index("--port") + 1] == "9555"
    node = supernode_command(
        config=tmp_path / "client.toml", superlink="coord:9555", ca="ca.pem", key="k.key", runtime_port=9200
    )
    assert node[node.index("--node-config") + 1] == f'client-config="{tmp_path / "client.toml"}"'
    assert node[node.index("--root-certificates") + 1] == str(Path("ca.pem").resolve())
    assert "--insecure" not in node and "--insecure" not in link
    with pytest.raises(ConfigError, match="quotes"):
        supernode_command(config=tmp_path / 'a"b.toml', superlink="x:1", ca="c", key="k")


def test_server_refuses_an_existing_run_without_resume(tmp_path: Path) -> None:
    path = _federation(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "superlink.db").write_bytes(b"")
    with pytest.raises(ConfigError, match="--resume"):
        start_server(path)
    (tmp_path / "run" / "superlink.db").unlink()
    with pytest.raises(ConfigError, match="no federation to resume"):
        start_server(path, resume=True)


def test_server_refuses_missing_credentials(tmp_path: Path) -> None:
    path = _federation(tmp_path)
    (tmp_path / "credentials" / "server.key").unlink()
    with pytest.raises(ConfigError, match=r"server\.key is missing"):
        start_server(path)
    assert not (tmp_path / "run").exists()


def test_staged_app_has_no_legacy_federations_and_source_is_untouched(tmp_path: Path) -> None:
    before = (REPO / "pyproject.toml").read_bytes()
    staged = stage_app(REPO, tmp_path / "app")
    doc = tomllib.loads((staged / "pyproject.toml").read_text())
    assert "federations" not in doc["tool"]["flwr"]
    assert doc["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedpersona.federation.server_app:app"
    assert "federation-config" in doc["tool"]["flwr"]["app"]["config"]
    assert (staged / "fedpersona" / "federation" / "server_app.py").exists()
    assert not list(staged.rglob("__pycache__"))
    assert (REPO / "pyproject.toml").read_bytes() == before


def _partner(tmp_path: Path, kind: str = "ecommerce", **data: object) -> tuple[Path, Path, Path]:
    creds = init_federation(out=tmp_path / "credentials", hosts=["localhost"])
    keys = partner_keys("shop-1", out=tmp_path / "credentials")
    path = tmp_path / "client.toml"
    dump_toml(
        path,
        {
            "partner": {"name": "shop-1", "kind": kind, "state_dir": "state"},
            "data": data or {"synthetic_rows": 200},
            "privacy": {"target_epsilon": 2.0, "delta": 1e-3},
        },
    )
    return path, creds.ca_cert, keys.private_key


def test_partner_check_validates_data_and_plans_noise(tmp_path: Path) -> None:
    path, ca, key = _partner(tmp_path)
    result = check_partner(path, ca=ca, key=key, rounds=4, persona_releases=0)
    assert result.rows == 200 and 130 <= result.train_rows <= 190 and result.public_rows == 160
    assert result.noise_multiplier is not None and result.noise_multiplier > 0
    assert len(result.epsilon_per_round) == 4
    assert result.epsilon_per_round[-1] <= 2.0 + 1e-6
    assert list(result.epsilon_per_round) == sorted(result.epsilon_per_round)
    # With personas a share of the budget is kept for them: more noise in DP-SGD, one more epsilon (after them).
    clustered = check_partner(path, ca=ca, key=key, rounds=4)
    assert len(clustered.epsilon_per_round) == 5
    assert clustered.noise_multiplier is not None and clustered.noise_multiplier > result.noise_multiplier
    assert clustered.epsilon_per_round[3] < clustered.epsilon_per_round[4] <= 2.0 + 1e-6
    assert not (tmp_path / "state" / "plan.json").exists()  # a check commits to nothing


def test_partner_check_reports_credential_problems_together(tmp_path: Path) -> None:
    path, _, key = _partner(tmp_path)
    key.chmod(0o644)
    (tmp_path / "not-a-ca.pem").write_text("hello")
    with pytest.raises(ConfigError) as err:
        check_partner(path, ca=tmp_path / "not-a-ca.pem", key=key)
    assert "chmod 600" in str(err.value) and "not the federation's CA" in str(err.value)


def test_partner_check_rejects_data_that_breaks_the_schema(tmp_path: Path) -> None:
    schema = REPO / "clients" / "finance" / "schema.toml"
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,LIMIT_BAL\n1,abc\n")
    path, ca, key = _partner(tmp_path, kind="finance", path=str(bad), schema=str(schema))
    with pytest.raises(SchemaError):
        check_partner(path, ca=ca, key=key)


def test_supervisor_stops_a_child_and_its_children(tmp_path: Path) -> None:
    from fedpersona.deploy.processes import ProcessSupervisor, alive, descendants

    supervisor = ProcessSupervisor(grace=2.0)
    # A parent that ignores SIGTERM (so the SIGKILL path runs) with a grandchild that would outlive it.
    proc = supervisor.start(["bash", "-c", "trap '' TERM; sleep 300 & wait"], log=tmp_path / "child.log")
    try:
        deadline = time.monotonic() + 10
        while not descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        family = descendants(proc.pid)
        assert family, "the grandchild did not start"
        supervisor.stop_all()
        assert proc.poll() is not None
        assert not [pid for pid in family if alive(pid)]
        assert (tmp_path / "child.log").read_text().startswith("\n# ")
    finally:
        for pid in descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_partner_check_says_what_is_spent_and_whether_another_round_fits(tmp_path: Path) -> None:
    from fedpersona.config.files import load_partner_config
    from fedpersona.config.settings import TrainingSettings
    from fedpersona.federation.partner import load_partner_data, load_plan
    from fedpersona.privacy.ledger import PrivacyLedger
    from fedpersona.privacy.planner import epsilon_schedule

    path, ca, key = _partner(tmp_path)
    assert check_partner(path, ca=ca, key=key, rounds=2).budget_text() is None  # nothing spent yet
    cfg = load_partner_config(path)
    plan = load_plan(cfg, load_partner_data(cfg), TrainingSettings(), 2)  # fixed as at a first round
    assert plan.noise_multiplier is not None
    ledger = PrivacyLedger(cfg.state_dir, settings=cfg.privacy)
    ledger.charge(round=1, mechanism="dp-sgd", noise_multiplier=plan.noise_multiplier,
                  sample_rate=plan.sample_rate, steps=plan.steps_per_round)  # fmt: skip
    one = check_partner(path, ca=ca, key=key)
    schedule = epsilon_schedule(plan)
    assert one.rounds_spent == 1 and one.epsilon_spent == pytest.approx(schedule[0], rel=1e-9)
    assert one.next_round_epsilon == pytest.approx(schedule[1], rel=1e-6)
    text = one.budget_text()
    assert text is not None and f"{schedule[0]:.4f} of 2 spent ({2 - schedule[0]:.4f} left)" in text
    assert "1 training round(s) of 2 planned" in text and "DOES NOT FIT" not in text
    ledger.charge(round=2, mechanism="dp-sgd", noise_multiplier=plan.noise_multiplier,
                  sample_rate=plan.sample_rate, steps=plan.steps_per_round)  # fmt: skip
    spent = check_partner(path, ca=ca, key=key)
    assert spent.rounds_spent == 2 and spent.next_round_epsilon == math.inf
    assert "ANOTHER TRAINING ROUND DOES NOT FIT (all 2 planned round(s) are done)" in (spent.budget_text() or "")
