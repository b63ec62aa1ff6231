"""The partner kit: its files, their modes, no private key of the coordinator, no half-written kit."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpersona.cli import app as cli
from fedpersona.config.files import load_partner_config
from fedpersona.deploy.certs import init_federation, partner_keys
from fedpersona.deploy.kit import make_partner_kit
from fedpersona.errors import ConfigError

FEDERATION = """\
[server]
host = "{host}"
port = 9093
credentials = "credentials"

[federation]
rounds = 4
min_partners = 1

[[partners]]
name = "bank-1"
kind = "finance"
public_key = "partners/bank-1.pub"

[[partners]]
name = "clinic-1"
kind = "health"
public_key = "partners/clinic-1.pub"
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def server(tmp_path: Path) -> Path:
    """A coordinator's server/ folder: credentials, bank-1's registered key, federation.toml."""
    folder = tmp_path / "server"
    init_federation(out=folder / "credentials", hosts=["coord.example.org"])
    partner_keys("bank-1", out=tmp_path / "bank-site")
    (folder / "partners").mkdir()
    (folder / "partners" / "bank-1.pub").write_bytes((tmp_path / "bank-site" / "bank-1.pub").read_bytes())
    (folder / "federation.toml").write_text(FEDERATION.format(host="coord.example.org"))
    token = folder / "registry.token"
    token.write_text("s3cret-token-0123456789abcdef\n")
    token.chmod(0o600)
    return folder


def test_kit_holds_public_credentials_a_filled_client_toml_and_install_commands(server: Path, tmp_path: Path) -> None:
    kit = make_partner_kit(
        config=server / "federation.toml", partner="bank-1", out=tmp_path / "kits",
        registry_url="https://coord.example.org:8443", registry_token=server / "registry.token",
        package="fedpersona==0.1.0",
    )  # fmt: skip
    folder = tmp_path / "kits" / "bank-1"
    assert kit.folder == folder
    assert kit.key_registered
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert written == [
        "INSTALL.md",
        "client.toml",
        "credentials/ca.pem",
        "credentials/model-signing.pub",
        "credentials/registry.token",
    ]
    assert list(kit.files) == written
    creds = server / "credentials"
    assert (folder / "credentials" / "ca.pem").read_bytes() == (creds / "ca.pem").read_bytes()
    assert (folder / "credentials" / "model-signing.pub").read_bytes() == (creds / "model-signing.pub").read_bytes()
    assert _mode(folder / "credentials" / "registry.token") == 0o600
    assert _mode(folder / "credentials" / "ca.pem") == 0o644
    assert _mode(folder) == 0o700
    # Nothing private of the coordinator: no private key in any file, none of its key files' bytes.
    secrets = [(creds / name).read_bytes() for name in ("ca.key", "server.key", "model-signing.key")]
    for path in folder.rglob("*"):
        if path.is_file():
            payload = path.read_bytes()
            assert b"PRIVATE KEY" not in payload, path
            assert not any(secret in payload for secret in secrets), path
    cfg = load_partner_config(folder / "client.toml")
    assert (cfg.name, cfg.kind, cfg.privacy.planned_rounds) == ("bank-1", "finance", 4)
    assert cfg.state_dir == str((folder / "state").resolve())
    install = (folder / "INSTALL.md").read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\n" in install
    assert "pip install fedpersona==0.1.0\n" in install
    assert install.index("torch==2.13.0") < install.index("pip install fedpersona==0.1.0")
    assert "fedpersona --version" in install
    assert "--superlink coord.example.org:9093" in install
    assert "--rehearsal" in install and install.index("--rehearsal") < install.index("## 6. Start")
    digest = hashlib.sha256((server / "partners" / "bank-1.pub").read_bytes()).hexdigest()
    assert digest in install
    assert "--token-file credentials/registry.token" in install


def test_kit_of_a_partner_without_a_key_says_how_to_make_one(server: Path, tmp_path: Path) -> None:
    done = CliRunner().invoke(
        cli,
        ["server", "kit", "--config", str(server / "federation.toml"), "--partner", "clinic-1",
         "--out", str(tmp_path / "kits"), "--package", "fedpersona==0.1.0"],
        terminal_width=200,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "node public key is not here yet" in done.output
    install = (tmp_path / "kits" / "clinic-1" / "INSTALL.md").read_text()
    assert "Make your node key here; send only the `.pub` file" in install
    assert "fedpersona certs partner clinic-1 --out credentials" in install
    assert not (tmp_path / "kits" / "clinic-1" / "credentials" / "registry.token").exists()


def test_an_existing_kit_is_never_overwritten_and_nothing_is_left_half_written(server: Path, tmp_path: Path) -> None:
    out = tmp_path / "kits"
    make_partner_kit(config=server / "federation.toml", partner="bank-1", out=out, package="fedpersona==0.1.0")
    before = (out / "bank-1" / "client.toml").read_bytes()
    with pytest.raises(ConfigError, match=r"bank-1 already exists; move it away first"):
        make_partner_kit(config=server / "federation.toml", partner="bank-1", out=out, package="fedpersona==0.1.0")
    assert (out / "bank-1" / "client.toml").read_bytes() == before
    # A problem found late (a token file others may read) leaves no folder and no temporary one.
    loose = tmp_path / "loose.token"
    loose.write_text("s3cret-token-0123456789abcdef\n")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by its owner only \(chmod 600"):
        make_partner_kit(
            config=server / "federation.toml", partner="clinic-1", out=out, registry_token=loose,
            package="fedpersona==0.1.0",
        )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["bank-1"]


def test_kit_errors_name_what_to_fix(server: Path, tmp_path: Path) -> None:
    config = server / "federation.toml"
    with pytest.raises(ConfigError, match=r"no \[\[partners\]\] entry named 'shop-9' \(listed: bank-1, clinic-1\)"):
        make_partner_kit(config=config, partner="shop-9", out=tmp_path / "kits", package="fedpersona==0.1.0")
    config.write_text(FEDERATION.format(host="0.0.0.0"))
    with pytest.raises(ConfigError, match=r"listens on every address.*pass --superlink HOST:PORT"):
        make_partner_kit(config=config, partner="bank-1", out=tmp_path / "kits", package="fedpersona==0.1.0")
    with pytest.raises(ConfigError, match=r"--superlink must be HOST:PORT"):
        make_partner_kit(
            config=config, partner="bank-1", out=tmp_path / "kits", superlink="coord", package="fedpersona==0.1.0"
        )
    creds = server / "credentials"
    (creds / "model-signing.pub").write_bytes((creds / "model-signing.key").read_bytes())
    with pytest.raises(ConfigError, match=r"model-signing.pub holds a private key; a kit carries only public files"):
        make_partner_kit(
            config=config, partner="bank-1", out=tmp_path / "kits", superlink="10.0.0.1:9093",
            package="fedpersona==0.1.0",
        )  # fmt: skip
    assert not (tmp_path / "kits").exists() or not any((tmp_path / "kits").iterdir())


def test_a_wheel_travels_in_the_kit_and_is_what_install_names(server: Path, tmp_path: Path) -> None:
    wheel = tmp_path / "fedpersona-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 a wheel")
    kit = make_partner_kit(config=server / "federation.toml", partner="bank-1", out=tmp_path / "kits", wheel=wheel)
    assert (kit.folder / wheel.name).read_bytes() == wheel.read_bytes()
    install = (kit.folder / "INSTALL.md").read_text()
    assert "pip install ./fedpersona-0.1.0-py3-none-any.whl\n" in install
    with pytest.raises(ConfigError, match=r"--package and --wheel exclude each other"):
        make_partner_kit(
            config=server / "federation.toml", partner="clinic-1", out=tmp_path / "kits", wheel=wheel,
            package="fedpersona==0.1.0",
        )  # fmt: skip
