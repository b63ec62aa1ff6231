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

from fedpersona.errors import FedPersonaError

__all__ = ["ArtifactError", "artifact_files", "generate_signing_key", "install_model", "save_model", "verify_model"]

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


def install_model(folder: str | Path, *, files: dict[str, bytes], public_key: bytes) -> dict[str, Any]:
    """Verify a received artifact against the federation's key, then make it ``folder``.

    The files are written to a temporary sibling folder and verified there; only a model
    signed by ``public_key`` replaces ``folder`` (by renames, so a reader sees the old model
    or the new one). Returns the card. Raises :class:`ArtifactError` and leaves ``folder``
    untouched otherwise.
    """
    folder = Path(folder)
    missing = [name for name in FILES if not isinstance(files.get(name), bytes)]
    if missing:
        raise ArtifactError(f"the received model lacks {', '.join(missing)}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(folder.name + ".incoming")
    old = folder.with_name(folder.name + ".previous")
    for stale in (staging, old):
        if stale.exists():
            shutil.rmtree(stale)
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
    if (folder / "card.json").exists():
        try:
            installed = json.loads((folder / "card.json").read_text())
        except (OSError, ValueError):
            installed = {}
        if float(installed.get("created", 0)) > float(card.get("created", 0)):
            shutil.rmtree(staging, ignore_errors=True)
            raise ArtifactError(f"the received model is older than the one in {folder}; it was not installed")
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return card
