"""Federation credentials: a CA, the SuperLink's TLS certificate, signing and node keys.

``init_federation(out=DIR, hosts=[...])`` writes, for the coordinator::

    DIR/ca.pem                 federation CA certificate (give to every partner)
    DIR/ca.key                 its private key (0600; keep offline once the server cert exists)
    DIR/server.pem, server.key the SuperLink's TLS certificate (SANs: hosts + localhost + 127.0.0.1)
    DIR/model-signing.key      Ed25519 key that signs global model artifacts (0600)
    DIR/model-signing.pub      its public half, PEM (give to every partner)

``partner_keys(name, out=DIR)`` writes a partner's SuperNode authentication key pair::

    DIR/<name>.key             EC private key (NIST P-384 or P-256), OpenSSH format, 0600:
                               what ``flower-supernode --auth-supernode-private-key`` loads
    DIR/<name>.pub             the public key, OpenSSH format: what ``flwr supernode register``
                               loads (the coordinator lists it in federation.toml)

Every file is generated in memory first and nothing is written if any target exists; files
are written under temporary names and linked into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpersona.errors import ConfigError

__all__ = [
    "CURVES",
    "NIST_CURVES",
    "FederationCredentials",
    "PartnerKeys",
    "init_federation",
    "load_node_private_key",
    "load_node_public_key",
    "partner_keys",
]

CURVES: dict[str, ec.EllipticCurve] = {"p384": ec.SECP384R1(), "p256": ec.SECP256R1()}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")


@dataclass(frozen=True)
class FederationCredentials:
    """Paths written by :func:`init_federation`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    signing_key: Path
    signing_public_key: Path


@dataclass(frozen=True)
class PartnerKeys:
    """Paths written by :func:`partner_keys`."""

    private_key: Path
    public_key: Path


def _write_all(files: list[tuple[Path, bytes, int]]) -> None:
    """Write every ``(path, payload, mode)`` or none: refuse if any target exists."""
    existing = [str(p) for p, _, _ in files if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError(f"refusing to overwrite existing file(s): {', '.join(existing)}; move them away first")
    placed: list[Path] = []
    temps: list[Path] = []
    try:
        for path, payload, mode in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)  # umask may have narrowed it; never widened beyond `mode`
        for (path, _, _), tmp in zip(files, temps, strict=True):
            os.link(tmp, path)  # fails if the target appeared meanwhile: never overwrites
            placed.append(path)
    except FileExistsError as exc:
        for path in placed:
            path.unlink(missing_ok=True)
        raise ConfigError(f"refusing to overwrite {exc.filename2 or exc.filename}, which appeared meanwhile") from None
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _pem_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, "localhost", "127.0.0.1"]:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _HOST.match(host):
                raise ConfigError(f"--host must be a DNS name or an IP address, got {host!r}") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def init_federation(
    *, out: str | Path, hosts: Iterable[str], federation: str = "fedpersona", days: int = 825
) -> FederationCredentials:
    """Create the federation CA, the SuperLink's TLS certificate and the model-signing key."""
    out = Path(out)
    hosts = [h.strip() for h in hosts if h.strip()]
    if not 1 <= days <= 3650:
        raise ConfigError(f"certificate lifetime must be 1..3650 days, got {days}")
    creds = FederationCredentials(
        ca_cert=out / "ca.pem",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        signing_key=out / "model-signing.key",
        signing_public_key=out / "model-signing.pub",
    )
    san = _san(hosts)
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    signing = Ed25519PrivateKey.generate()
    signing_pub = signing.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_all(
        [
            (creds.ca_key, _pem_key(ca_key), 0o600),
            (creds.server_key, _pem_key(server_key), 0o600),
            (creds.signing_key, _pem_key(signing), 0o600),
            (creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
            (creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
            (creds.signing_public_key, signing_pub, 0o644),
        ]
    )
    return creds


def partner_keys(name: str, *, out: str | Path, curve: str = "p384") -> PartnerKeys:
    """Create a partner's SuperNode authentication key pair (OpenSSH format)."""
    if not _NAME.match(name):
        raise ConfigError(
            f"partner name must be 1-64 characters of letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit), got {name!r}"
        )
    if curve not in CURVES:
        raise ConfigError(f"curve must be one of {', '.join(CURVES)}, got {curve!r}")
    out = Path(out)
    keys = PartnerKeys(private_key=out / f"{name}.key", public_key=out / f"{name}.pub")
    key = ec.generate_private_key(CURVES[curve])
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_all([(keys.private_key, private, 0o600), (keys.public_key, public + f" {name}\n".encode(), 0o644)])
    return keys


NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def load_node_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A partner's node key as ``flwr supernode register`` needs it: OpenSSH, EC, NIST curve."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: the partner's public key file does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise ConfigError(
            f"{path}: node keys must be EC keys on a NIST curve (P-256/P-384/P-521); "
            "make one with `fedpersona certs partner NAME --out DIR`"
        )
    return key


def load_node_private_key(path: Path) -> None:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise ConfigError(f"{path}: the node authentication key does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise ConfigError(f"{path}: the node key must be an EC key on a NIST curve (P-256/P-384/P-521)")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: a private key must be readable by its owner only (chmod 600 {path})")


# --------------------------------------------------------------------------- coordinator
