"""The model registry: signed global models over HTTP(S), and the partner side that fetches them.

Server (``fedpersona serve --artifacts DIR``): a read-only Starlette app over every artifact in
``DIR`` (``DIR`` itself, or its immediate sub-folders, holding ``weights.npz``, ``card.json`` and
``signature.json`` as :func:`fedpersona.model.artifacts.save_model` writes them)::

    GET /healthz                       {"ok": true}
    GET /v1/models                     {"versions": [{"version", "created", "rounds", "weights_sha256"}, ...]}
    GET /v1/models/latest              the newest entry (by the card's ``created``)
    GET /v1/models/{version}/card      card.json, byte for byte
    GET /v1/models/{version}/archive   a .tar.gz of the three files, byte for byte

A version is ``<created, whole seconds>-<first 12 hex of the weights' SHA-256>``. With a token
file every ``/v1`` request needs ``Authorization: Bearer <token>``. The server does not vouch
for anything: the client checks every byte against the federation's public key.

Client (:func:`fetch_model`): downloads the latest (or a named) version, checks hashes and the
Ed25519 signature against the federation's key (:func:`fedpersona.model.artifacts.verify_model`),
refuses unsigned, modified or older-than-cached versions, and keeps verified copies in a cache.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import os
import re
import shutil
import ssl
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.errors import ConfigError, FedPersonaError
from fedpersona.model.artifacts import ArtifactError, verify_model

__all__ = [
    "FetchedModel",
    "RegistryError",
    "build_registry_app",
    "fetch_model",
    "make_token_file",
    "read_token_file",
    "serve_registry",
]

logger = logging.getLogger(__name__)

FILES = ("weights.npz", "card.json", "signature.json")
_VERSION = re.compile(r"^[0-9]{1,12}-[0-9a-f]{12}$")
MAX_ARCHIVE_BYTES = 2 * 1024**3


class RegistryError(FedPersonaError):
    """A registry cannot be reached, refuses the request, or offers an unacceptable version."""

    category = "registry"


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _Entry:
    version: str
    created: float
    rounds: int | None
    weights_sha256: str
    folder: Path

    def public(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": self.created,
            "rounds": self.rounds,
            "weights_sha256": self.weights_sha256,
        }


def _entry(folder: Path, root: Path) -> _Entry | None:
    if not all((folder / name).is_file() for name in FILES):
        return None
    if not all((folder / name).resolve().is_relative_to(root) for name in FILES):
        # A symbolic link (the folder or a file) pointing outside the artifacts folder: never served.
        logger.warning("%s: links outside %s; not listed", folder, root)
        return None
    try:
        card = json.loads((folder / "card.json").read_bytes())
        created = float(card["created"])
        digest = str(card["weights_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s: unreadable card.json; not listed", folder)
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", digest) or not math.isfinite(created) or created < 0:
        return None  # (JSON allows NaN and 1e999: a version name needs a finite time)
    rounds = card.get("rounds")
    return _Entry(f"{int(created)}-{digest[:12]}", created, rounds if isinstance(rounds, int) else None, digest, folder)


def _index(root: Path) -> list[_Entry]:
    root = root.resolve()
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    entries = {e.version: e for e in (_entry(c, root) for c in candidates) if e is not None}
    return sorted(entries.values(), key=lambda e: (e.created, e.version))


def _archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name in FILES:
            payload = (folder / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def build_registry_app(artifacts: str | Path, *, token: str | None = None) -> Any:
    """The Starlette application serving ``artifacts`` (read-only)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    root = Path(artifacts)
    if not root.is_dir():
        raise ConfigError(f"--artifacts {root} is not a folder")
    if token is not None and len(token) < 16:
        raise ConfigError("the bearer token must be at least 16 characters")

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def denied() -> Response:
        return JSONResponse({"error": "a valid bearer token is required"}, 401, {"WWW-Authenticate": "Bearer"})

    def find(request: Request) -> _Entry | Response:
        version = request.path_params["version"]
        entries = _index(root)
        if version == "latest" and entries:
            return entries[-1]
        for e in entries:
            if e.version == version:
                return e
        return JSONResponse({"error": f"no model version {version!r}"}, 404)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def versions(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return JSONResponse({"versions": [e.public() for e in _index(root)]})

    async def latest(request: Request) -> Response:
        if not authorized(request):
            return denied()
        entries = _index(root)
        if not entries:
            return JSONResponse({"error": "no model published yet"}, 404)
        return JSONResponse(entries[-1].public())

    async def card(request: Request) -> Response:
        if not authorized(request):
            return denied()
        found = find(request)
        if isinstance(found, Response):
            return found
        try:
            return Response((found.folder / "card.json").read_bytes(), media_type="application/json")
        except OSError:  # removed since it was listed
            return JSONResponse({"error": f"model version {found.version} is no longer available"}, 404)

    async def archive(request: Request) -> Response:
        if not authorized(request):
            return denied()
        found = find(request)
        if isinstance(found, Response):
            return found
        try:
            payload = _archive(found.folder)
        except OSError:  # removed since it was listed
            return JSONResponse({"error": f"model version {found.version} is no longer available"}, 404)
        return Response(
            payload,
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="fedpersona-model-{found.version}.tar.gz"'},
        )

    return Starlette(
        routes=[
            Route("/healthz", health),
            Route("/v1/models", versions),
            Route("/v1/models/latest", latest),
            Route("/v1/models/{version}/card", card),
            Route("/v1/models/{version}/archive", archive),
        ]
    )


def _make_one(path: Path) -> str:
    return f"make one with `fedpersona certs token --out {path}` (a random token, mode 0600)"


def make_token_file(path: str | Path) -> Path:
    """Write a new random bearer token (256 bits, URL-safe) to ``path``, readable by its owner
    only; an existing file is never overwritten."""
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; it is kept (remove it first to make a new token)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path


def read_token_file(path: str | Path) -> str:
    """A bearer token from a file (one line); the file must be readable by its owner only."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: the token file does not exist; {_make_one(path)}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the token file ({exc})") from None
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: a token file must be readable by its owner only (chmod 600 {path})")
    if not text or "\n" in text:
        raise ConfigError(f"{path}: the token file must hold exactly one non-empty line; {_make_one(path)}")
    if len(text) < 16:
        raise ConfigError(f"{path}: the token must be at least 16 characters; {_make_one(path)}")
    return text


def serve_registry(
    artifacts: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    token_file: str | Path | None = None,
) -> None:
    """Serve ``artifacts`` until interrupted (HTTPS when a certificate and key are given)."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    token = read_token_file(token_file) if token_file is not None else None
    app = build_registry_app(artifacts, token=token)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level="info",
        ws="none",  # plain HTTP(S) only: no websocket stack
    )


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class FetchedModel:
    """A verified model in the cache: pass ``path`` to :func:`fedpersona.model.artifacts.verify_model`."""

    version: str
    path: Path
    card: dict[str, Any]
    downloaded: bool


def _public_key(key: bytes | str | Path) -> bytes:
    from fedpersona.model.artifacts import load_signing_public_key

    if isinstance(key, bytes):
        if len(key) == 32:
            return key
        if key.lstrip().startswith(b"-----BEGIN"):
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            loaded = serialization.load_pem_public_key(key)
            if not isinstance(loaded, Ed25519PublicKey):
                raise ConfigError("the federation's model-signing key must be Ed25519")
            return loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        raise ConfigError("public_key must be 32 raw Ed25519 bytes, PEM bytes, or a path to a PEM file")
    return load_signing_public_key(key)


def _extract(payload: bytes, dest: Path) -> None:
    """Unpack exactly the three artifact files (regular files, no paths) into ``dest``."""
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            members = tar.getmembers()
            names = sorted(m.name for m in members)
            if names != sorted(FILES) or not all(m.isreg() for m in members):
                raise RegistryError(f"the archive must hold exactly {', '.join(FILES)} as plain files, got {names}")
            for m in members:
                source = tar.extractfile(m)
                if source is None:
                    raise RegistryError(f"cannot read {m.name} from the archive")
                (dest / m.name).write_bytes(source.read())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RegistryError(f"the downloaded archive is not a valid .tar.gz ({exc})") from None


def _newest_cached(cache: Path) -> dict[str, Any] | None:
    state = cache / "latest.json"
    if not state.exists():
        return None
    try:
        return dict(json.loads(state.read_text()))
    except ValueError:
        raise RegistryError(f"{state} is corrupt; remove the cache folder to start over") from None


def fetch_model(
    url: str,
    *,
    public_key: bytes | str | Path,
    cache_dir: str | Path,
    token: str | None = None,
    version: str = "latest",
    ca: str | Path | None = None,
    timeout: float = 60.0,
) -> FetchedModel:
    """Download, verify and cache a model version from a registry at ``url``.

    Refuses (with :class:`~fedpersona.model.artifacts.ArtifactError` or :class:`RegistryError`) a
    version whose hashes or signature do not verify against ``public_key`` (the federation's
    model-signing key: raw bytes, PEM bytes or a PEM file), and a version older than the newest
    one already in ``cache_dir``. ``ca`` is the CA file for an HTTPS registry with a private CA.
    """
    import httpx

    key = _public_key(public_key)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if version != "latest" and not _VERSION.match(version):
        raise ConfigError(f"a model version looks like 1764300000-0123456789ab, got {version!r}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
    base = url.rstrip("/")
    try:
        with httpx.Client(headers=headers, verify=verify, timeout=timeout, follow_redirects=False) as client:
            meta = client.get(f"{base}/v1/models/{version}" if version == "latest" else f"{base}/v1/models")
            _raise_for(meta, url)
            if version == "latest":
                entry = meta.json()
            else:
                matches = [v for v in meta.json().get("versions", []) if v.get("version") == version]
                if not matches:
                    raise RegistryError(f"{url} has no model version {version}")
                entry = matches[0]
            name = str(entry.get("version", ""))
            if not _VERSION.match(name):
                raise RegistryError(f"{url} answered an invalid version name {name!r}")
            cached = cache / name
            newest = _newest_cached(cache)
            if cached.is_dir():
                _, card = verify_model(cached, public_key=key)  # a cached copy is re-checked, never trusted
                _refuse_rollback(url, name, float(card.get("created", -1)), newest)
                return FetchedModel(name, cached, card, downloaded=False)
            with client.stream("GET", f"{base}/v1/models/{name}/archive") as response:
                _raise_for(response, url)
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_ARCHIVE_BYTES:
                        raise RegistryError(f"{url}: the archive is larger than {MAX_ARCHIVE_BYTES} bytes")
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise RegistryError(f"cannot fetch a model from {url}: {exc}") from None
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        folder = Path(tmp)
        _extract(b"".join(chunks), folder)
        _, card = verify_model(folder, public_key=key)
        created = float(card.get("created", -1))
        if f"{int(created)}-{str(card.get('weights_sha256', ''))[:12]}" != name:
            raise ArtifactError(f"{url}: version {name} does not match the signed card it served")
        _refuse_rollback(url, name, created, newest)
        shutil.move(str(folder), str(cached))
        folder.mkdir()  # TemporaryDirectory removes it on exit
    (cache / "latest.json.tmp").write_text(json.dumps({"version": name, "created": created}))
    (cache / "latest.json.tmp").replace(cache / "latest.json")
    return FetchedModel(name, cached, card, downloaded=True)


def _refuse_rollback(url: str, name: str, created: float, newest: dict[str, Any] | None) -> None:
    if newest is not None and created < float(newest["created"]):
        raise RegistryError(
            f"{url} offers version {name}, older than the cached {newest['version']}; refusing a rollback"
        )


def _raise_for(response: Any, url: str) -> None:
    if response.status_code == 401:
        raise RegistryError(f"{url} refused the request: a valid bearer token is required")
    if response.status_code == 404:
        response.read()
        raise RegistryError(f"{url}: {response.json().get('error', 'not found')}")
    if response.status_code != 200:
        raise RegistryError(f"{url} answered HTTP {response.status_code}")
