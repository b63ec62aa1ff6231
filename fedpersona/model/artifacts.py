"""Global model artifacts: weights, a model card and an Ed25519 signature.

An artifact folder holds ``weights.npz`` (the shared parameters: trunk and shared adapters),
``card.json`` (version, rounds, model config, slots with schema fingerprints, epsilon per
partner, and the SHA-256 of the weights) and ``signature.json`` (Ed25519 over the canonical
JSON of version + hashes). :func:`verify_model` checks both hashes and the signature before
anything is loaded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpersona.errors import ConfigError, FedPersonaError

__all__ = [
    "ArtifactError",
    "artifact_files",
    "generate_signing_key",
    "install_model",
    "load_signing_public_key",
    "model_versions",
    "rollback_model",
    "save_model",
    "verify_model",
]

FILES = ("weights.npz", "card.json", "signature.json")


class ArtifactError(FedPersonaError):
    """A model artifact is missing, modified, or not signed by the expected key."""

    category = "model"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def generate_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """A new Ed25519 key, written as PEM with mode 0600 (refuses to overwrite)."""
    path = Path(path)
    if path.exists():
        raise FedPersonaError(f"{path} already exists; refusing to overwrite a private key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key


def save_model(
    folder: str | Path,
    *,
    arrays: dict[str, np.ndarray],
    card: dict[str, Any],
    key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """Write weights, card and signature into ``folder``; returns the card as written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in sorted(arrays.items())})  # type: ignore[arg-type]
    weights = buffer.getvalue()
    card = {**card, "weights_sha256": _sha256(weights)}
    card_bytes = json.dumps(card, indent=2, sort_keys=True).encode()
    signed = {
        "version": card.get("version", 1),
        "weights_sha256": card["weights_sha256"],
        "card_sha256": _sha256(card_bytes),
    }
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = {
        "algorithm": "ed25519",
        "public_key": base64.b64encode(public).decode(),
        "signed": signed,
        "signature": base64.b64encode(key.sign(_canonical(signed))).decode(),
    }
    for name, payload in (
        ("weights.npz", weights),
        ("card.json", card_bytes),
        ("signature.json", json.dumps(signature, indent=2).encode()),
    ):
        tmp = folder / (name + ".tmp")
        tmp.write_bytes(payload)
        tmp.replace(folder / name)
    return card


def verify_model(
    folder: str | Path, *, public_key: bytes | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Check hashes and signature, then return ``(arrays, card)``.

    ``public_key`` (raw 32 bytes) is the federation's key; without it the key recorded in
    the artifact is used, which proves integrity but not origin.
    """
    folder = Path(folder)
    try:
        weights = (folder / "weights.npz").read_bytes()
        card_bytes = (folder / "card.json").read_bytes()
        signature = json.loads((folder / "signature.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder}: not a complete signed model artifact ({exc})") from None
    signed = signature.get("signed", {})
    if signed.get("weights_sha256") != _sha256(weights):
        raise ArtifactError(f"{folder}/weights.npz does not match its signed hash")
    if signed.get("card_sha256") != _sha256(card_bytes):
        raise ArtifactError(f"{folder}/card.json does not match its signed hash")
    key_bytes = public_key or base64.b64decode(signature.get("public_key", ""))
    try:
        Ed25519PublicKey.from_public_bytes(key_bytes).verify(
            base64.b64decode(signature.get("signature", "")), _canonical(signed)
        )
    except (InvalidSignature, ValueError):
        raise ArtifactError(f"{folder}: the signature does not verify") from None
    with np.load(io.BytesIO(weights)) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return arrays, json.loads(card_bytes)


def artifact_files(folder: str | Path) -> dict[str, bytes]:
    """The three files of an artifact folder, by name (what the server sends each partner)."""
    folder = Path(folder)
    try:
        return {name: (folder / name).read_bytes() for name in FILES}
    except OSError as exc:
        raise ArtifactError(f"{folder}: not a complete signed model artifact ({exc})") from None


HISTORY = "model-history"  # beside the installed model folder: the models it replaced


def install_model(folder: str | Path, *, files: dict[str, bytes], public_key: bytes) -> dict[str, Any]:
    """Verify a received artifact against the federation's key, then make it ``folder``.

    The files are written to a temporary sibling folder and verified there; only a model
    signed by ``public_key`` replaces ``folder`` (by renames, so a reader sees the old model
    or the new one). Returns the card. Raises :class:`ArtifactError` and leaves ``folder``
    untouched otherwise, and also when the received model is no improvement on the installed
    one: a model that trained no round, an older model, one with fewer rounds, or one without
    personas where the installed model has them. A replaced model is kept in
    ``<folder>-history/`` (see :func:`model_versions`, :func:`rollback_model`).
    """
    folder = Path(folder)
    missing = [name for name in FILES if not isinstance(files.get(name), bytes)]
    if missing:
        raise ArtifactError(f"the received model lacks {', '.join(missing)}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(folder.name + ".incoming")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for name in FILES:
        with open(staging / name, "wb") as handle:
            handle.write(files[name])
            handle.flush()
            os.fsync(handle.fileno())
    try:
        _, card = verify_model(staging, public_key=public_key)
    except ArtifactError:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(
            "the received model does not verify against the federation's model-signing key; it was not installed"
        ) from None
    problem = _no_improvement(card, _installed_card(folder), folder)
    if problem:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(f"{problem}; it was not installed and {folder} is unchanged")
    _swap_in(folder, staging)
    return card


def _installed_card(folder: Path) -> dict[str, Any] | None:
    if not (folder / "card.json").exists():
        return None
    try:
        card = json.loads((folder / "card.json").read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def _no_improvement(card: dict[str, Any], installed: dict[str, Any] | None, folder: Path) -> str:
    """Why ``card`` must not replace the installed model (``""``: it may)."""
    rounds = int(card.get("rounds") or 0)
    if rounds < 1:
        return "the received model trained no round"
    if installed is None:
        return ""
    if float(installed.get("created", 0)) > float(card.get("created", 0)):
        return f"the received model is older than the one in {folder}"
    if rounds < int(installed.get("rounds") or 0):
        return (
            f"the received model has {rounds} round(s), fewer than the {installed.get('rounds')} of the one in {folder}"
        )
    if _persona_count(installed) and not _persona_count(card):
        return f"the received model carries no personas and the one in {folder} does"
    return ""


def _persona_count(card: dict[str, Any]) -> int:
    """Personas a model card carries, over all its slots (0 without)."""
    slots = (card.get("personas") or {}).get("slots") or {}
    return sum(len(slot.get("shares") or []) for slot in slots.values() if isinstance(slot, dict))


def _swap_in(folder: Path, staging: Path) -> None:
    """Make ``staging`` the installed model; the replaced one goes to the history folder."""
    history = folder.with_name(folder.name + "-history")
    if folder.exists():
        history.mkdir(exist_ok=True)
        taken = [p.name for p in history.iterdir() if p.is_dir()]
        number = 1 + max((int(n.split("-", 1)[0][1:]) for n in taken if n.startswith("v")), default=0)
        created = _installed_card(folder) or {}
        folder.rename(history / f"v{number:03d}-{int(float(created.get('created', 0)))}")
    staging.rename(folder)


def model_versions(folder: str | Path) -> list[dict[str, Any]]:
    """The installed model and the ones it replaced, newest first: ``version``, ``path``,
    ``rounds``, ``created``, ``personas`` (the number of personas over all kinds, 0 without), ``installed``."""
    folder = Path(folder)
    history = folder.with_name(folder.name + "-history")
    entries = [("installed", folder)] if folder.exists() else []
    if history.exists():
        entries += [(p.name, p) for p in sorted(history.iterdir(), reverse=True) if p.is_dir()]
    out = []
    for version, path in entries:
        card = _installed_card(path) or {}
        out.append(
            {
                "version": version,
                "path": str(path),
                "rounds": card.get("rounds"),
                "created": card.get("created"),
                "personas": _persona_count(card),
                "installed": version == "installed",
            }
        )
    return out


def rollback_model(folder: str | Path, *, version: str | None = None, public_key: bytes) -> str:
    """Reinstall a model the installed one replaced (default: the most recent); the current
    one goes to the history in its turn. The chosen model is verified against ``public_key``
    first. Returns the version reinstalled."""
    folder = Path(folder)
    history = folder.with_name(folder.name + "-history")
    versions = sorted((p.name for p in history.iterdir() if p.is_dir()), reverse=True) if history.exists() else []
    if not versions:
        raise ArtifactError(f"{folder} has replaced no earlier model: there is nothing to roll back to")
    chosen = version or versions[0]
    if chosen not in versions:
        raise ArtifactError(f"no model version {chosen!r} in {history} (versions: {', '.join(versions)})")
    verify_model(history / chosen, public_key=public_key)
    staging = folder.with_name(folder.name + ".incoming")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(history / chosen, staging)
    _swap_in(folder, staging)
    shutil.rmtree(history / chosen)
    return chosen


def load_signing_public_key(path: str | Path) -> bytes:
    """The federation's model-signing public key (PEM file) as the raw 32 bytes Ed25519 uses."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: the model-signing public key does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: the model-signing key must be Ed25519, got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
