"""Federation credentials: the certificate chain, SANs, key formats, file modes, no overwrites."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpersona.deploy.certs import init_federation, load_node_public_key, partner_keys
from fedpersona.errors import ConfigError
from fedpersona.model.artifacts import load_signing_public_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_signed_by_the_ca_with_every_host(tmp_path: Path) -> None:
    creds = init_federation(out=tmp_path, hosts=["coord.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }
    key = serialization.load_pem_private_key(creds.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_a_certificate_from_another_ca_does_not_verify(tmp_path: Path) -> None:
    one = init_federation(out=tmp_path / "one", hosts=["localhost"])
    two = init_federation(out=tmp_path / "two", hosts=["localhost"])
    server = x509.load_pem_x509_certificate(one.server_cert.read_bytes())
    with pytest.raises(InvalidSignature):  # same subject name, different key
        server.verify_directly_issued_by(x509.load_pem_x509_certificate(two.ca_cert.read_bytes()))


def test_private_keys_are_owner_only_and_public_files_readable(tmp_path: Path) -> None:
    creds = init_federation(out=tmp_path / "fed", hosts=["localhost"])
    keys = partner_keys("shop-1", out=tmp_path / "node")
    for private in (creds.ca_key, creds.server_key, creds.signing_key, keys.private_key):
        assert _mode(private) == 0o600, private
    for public in (creds.ca_cert, creds.server_cert, creds.signing_public_key, keys.public_key):
        assert _mode(public) == 0o644, public
    assert not [p for p in (tmp_path / "fed").iterdir() if p.name.endswith(".tmp")]


def test_signing_key_pair_matches(tmp_path: Path) -> None:
    creds = init_federation(out=tmp_path, hosts=["localhost"])
    private = serialization.load_pem_private_key(creds.signing_key.read_bytes(), None)
    assert isinstance(private, Ed25519PrivateKey)
    raw = load_signing_public_key(creds.signing_public_key)
    expected = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == expected


@pytest.mark.parametrize(("curve", "name"), [("p384", "secp384r1"), ("p256", "secp256r1")])
def test_partner_keys_are_what_flower_loads(tmp_path: Path, curve: str, name: str) -> None:
    keys = partner_keys("bank-1", out=tmp_path, curve=curve)
    # flower-supernode --auth-supernode-private-key uses load_ssh_private_key; flwr supernode
    # register uses load_ssh_public_key and requires a NIST curve.
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == name
    assert keys.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    public = load_node_public_key(keys.public_key)
    assert public.public_numbers() == private.public_key().public_numbers()
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    assert uses_nist_ec_curve(public)


def test_refuses_to_overwrite_and_writes_nothing_half(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("precious")
    with pytest.raises(ConfigError, match=r"refusing to overwrite.*server\.key"):
        init_federation(out=tmp_path, hosts=["localhost"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]
    assert (tmp_path / "server.key").read_text() == "precious"
    partner_keys("shop-1", out=tmp_path)
    before = (tmp_path / "shop-1.key").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        partner_keys("shop-1", out=tmp_path)
    assert (tmp_path / "shop-1.key").read_bytes() == before


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda out: partner_keys("../evil", out=out), "partner name"),
        (lambda out: partner_keys("ok", out=out, curve="secp256k1"), "curve must be one of"),
        (lambda out: init_federation(out=out, hosts=["bad host!"]), "DNS name or an IP"),
    ],
)
def test_bad_input_is_a_config_error(tmp_path: Path, call: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call(tmp_path)  # type: ignore[operator]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_exit_codes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fedpersona.cli", "certs", "init", "--out", str(tmp_path), "--host", "localhost"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr
