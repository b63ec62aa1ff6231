"""Setting up a deployment: what the commands make for the operator (the partner-key folder,
the registry token), what a run folder holds (the public signing key only), loopback by
default, and plain-text logs of Flower's processes."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpersona.cli import app
from fedpersona.config.files import dump_toml, load_federation_config
from fedpersona.config.settings import FederationConfig, FederationSettings
from fedpersona.deploy import coordinator
from fedpersona.deploy.certs import init_federation
from fedpersona.deploy.processes import ProcessSupervisor, strip_ansi
from fedpersona.deploy.registry import read_token_file
from fedpersona.errors import ConfigError
from fedpersona.federation.server_app import ServerSettings, run_federation
from fedpersona.model.artifacts import load_signing_public_key, verify_model
from tests.fake_grid import MODEL, TRAINING, FakeGrid, ScriptedPartner

REPO = Path(__file__).resolve().parents[1]


def _federation(tmp_path: Path) -> Path:
    server = tmp_path / "server"
    init_federation(out=server / "credentials", hosts=["localhost"])
    dump_toml(
        server / "federation.toml",
        {
            "server": {"run_dir": "../runs/federation", "app": str(REPO), "expected_partners": 1},
            "federation": {"min_partners": 1},
            "partners": [{"name": "bank-1", "kind": "finance", "public_key": "partners/bank-1.pub"}],
        },
    )
    return server / "federation.toml"


def test_server_start_makes_the_partner_key_folder_and_says_what_to_copy_there(tmp_path: Path) -> None:
    cfg = load_federation_config(_federation(tmp_path))
    with pytest.raises(ConfigError) as err:
        coordinator._check_server_files(cfg)
    folder = tmp_path / "server" / "partners"
    assert folder.is_dir()
    assert (
        f"partner bank-1: {folder / 'bank-1.pub'} does not exist; copy the bank-1.pub the partner made with "
        f"`fedpersona certs partner bank-1` into {folder}"
    ) in str(err.value)


def test_a_run_folder_gets_the_public_signing_key_only(tmp_path: Path) -> None:
    cfg = load_federation_config(_federation(tmp_path))
    run_dir = tmp_path / "run"
    written = coordinator._install_public_key(cfg.credentials, run_dir)
    assert sorted(p.name for p in (run_dir / "keys").iterdir()) == ["model-signing.pub"]
    assert written.read_bytes() == (cfg.credentials / "model-signing.pub").read_bytes()
    other = tmp_path / "other"
    init_federation(out=other, hosts=["localhost"])
    with pytest.raises(ConfigError, match="is not the public half of the federation's signing key"):
        coordinator._install_public_key(other, run_dir)


def test_the_serverapp_signs_with_the_credentials_key_and_copies_it_nowhere(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    init_federation(out=creds, hosts=["localhost"])
    grid = FakeGrid({11: ScriptedPartner("shop-1", "ecommerce", 100), 12: ScriptedPartner("bank-1", "finance", 90)})
    settings = ServerSettings(
        federation=FederationSettings(rounds=1, min_partners=2, personas=0), model=MODEL, training=TRAINING,
        run_dir=str(tmp_path / "run"), wait_timeout=1.0, signing_key=str(creds / "model-signing.key"),
    )  # fmt: skip
    run_federation(grid, settings)
    verify_model(tmp_path / "run" / "model", public_key=load_signing_public_key(creds / "model-signing.pub"))
    assert not list((tmp_path / "run").rglob("*.key"))


def test_a_missing_signing_key_is_refused_before_any_round(tmp_path: Path) -> None:
    grid = FakeGrid({11: ScriptedPartner("shop-1", "ecommerce", 100)})
    settings = ServerSettings(
        federation=FederationSettings(rounds=1, min_partners=1, personas=0), model=MODEL, training=TRAINING,
        run_dir=str(tmp_path / "run"), wait_timeout=1.0, signing_key=str(tmp_path / "nowhere" / "model-signing.key"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="the federation's model-signing key does not exist"):
        run_federation(grid, settings)
    assert grid.sent == []


def test_certs_token_makes_a_private_token_the_registry_accepts(tmp_path: Path) -> None:
    path = tmp_path / "server" / "registry.token"
    first = CliRunner().invoke(app, ["certs", "token", "--out", str(path)])
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = read_token_file(path)
    assert len(token) >= 32
    again = CliRunner().invoke(app, ["certs", "token", "--out", str(path)])
    assert isinstance(again.exception, ConfigError)  # main() turns it into exit code 2
    assert "already exists; it is kept" in str(again.exception)
    assert read_token_file(path) == token  # kept


def test_a_missing_token_file_says_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "registry.token"
    with pytest.raises(ConfigError, match=r"does not exist; make one with `fedpersona certs token --out .*registry"):
        read_token_file(path)


def test_the_superlink_command_listens_on_loopback_by_default() -> None:
    cmd = coordinator.superlink_command(FederationConfig())
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_flower_process_logs_are_written_without_colour_codes(tmp_path: Path) -> None:
    assert (
        strip_ansi(b"\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n")
        == b"INFO :      Starting Flower SuperNode\n"
    )
    log = tmp_path / "logs" / "supernode.log"
    script = "import sys; sys.stdout.write('\\x1b[93mWARNING \\x1b[0m:   Connection attempt failed\\n')"
    supervisor = ProcessSupervisor(grace=5.0)
    proc = supervisor.start([sys.executable, "-c", script], log=log)
    proc.wait(timeout=60)
    supervisor.stop_all()
    text = log.read_text()
    assert "WARNING :   Connection attempt failed" in text
    assert "\x1b" not in text
