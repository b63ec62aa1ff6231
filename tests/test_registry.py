"""The model registry: what it serves, and what fetch_model accepts and refuses."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpersona.deploy.registry import RegistryError, build_registry_app, fetch_model, read_token_file
from fedpersona.model.artifacts import ArtifactError, save_model, verify_model

TOKEN = "a-long-enough-registry-token"


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _publish(folder: Path, key: Ed25519PrivateKey, *, created: float, value: float = 1.0) -> str:
    card = save_model(folder, arrays={"trunk.w": np.full((3, 2), value)}, card={"version": 1, "created": created,
                      "rounds": 2}, key=key)  # fmt: skip
    return f"{int(created)}-{card['weights_sha256'][:12]}"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


class _Server:
    """A registry on a free loopback port, in a thread; stopped at teardown."""

    def __init__(self, root: Path, token: str | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(build_registry_app(root, token=token), host="127.0.0.1", port=self.port,
                                log_level="warning", ws="none")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the registry did not start within 20s")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)  # type: ignore[arg-type]


class _Client:
    """A registry over ``root`` for one test: ``with _Client(root) as client: client.get(...)``."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root, self.token = root, token

    def __enter__(self) -> _Server:
        self.server = _Server(self.root, self.token)
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, _Server]]:
    root = tmp_path / "artifacts"
    root.mkdir()
    server = _Server(root, TOKEN)
    try:
        yield root, server
    finally:
        server.stop()


def test_lists_versions_oldest_first_and_serves_card_and_archive(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    old = _publish(tmp_path / "a", key, created=1_700_000_000.5)
    new = _publish(tmp_path / "b", key, created=1_700_000_100.0, value=2.0)
    with _Client(tmp_path) as client:
        _check_listing(client, tmp_path, old, new)


def _check_listing(client: _Server, tmp_path: Path, old: str, new: str) -> None:
    listed = client.get("/v1/models").json()["versions"]
    assert [v["version"] for v in listed] == [old, new]
    assert client.get("/v1/models/latest").json()["version"] == new
    assert client.get(f"/v1/models/{old}/card").content == (tmp_path / "a" / "card.json").read_bytes()
    archive = client.get(f"/v1/models/{new}/archive")
    assert archive.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert files == {n: (tmp_path / "b" / n).read_bytes() for n in ("weights.npz", "card.json", "signature.json")}
    assert client.get("/v1/models/1-000000000000/archive").status_code == 404


def test_single_artifact_folder_and_empty_folder(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    version = _publish(tmp_path / "model", key, created=1_700_000_000)
    with _Client(tmp_path / "model") as client:
        assert client.get("/v1/models/latest").json()["version"] == version
    (tmp_path / "empty").mkdir()
    with _Client(tmp_path / "empty") as client:
        assert client.get("/v1/models/latest").status_code == 404


def test_token_is_required_on_every_model_route(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    version = _publish(tmp_path, key, created=1_700_000_000)
    with _Client(tmp_path, TOKEN) as client:
        for path in ("/v1/models", "/v1/models/latest", f"/v1/models/{version}/card", f"/v1/models/{version}/archive"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_token_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        read_token_file(path)
    path.chmod(0o600)
    assert read_token_file(path) == TOKEN


def test_fetch_verifies_caches_and_refuses_rollback(
    tmp_path: Path, key: Ed25519PrivateKey, served: tuple[Path, _Server]
) -> None:
    root, server = served
    cache = tmp_path / "cache"
    first = _publish(root / "v1", key, created=1_700_000_000)
    got = fetch_model(server.url, public_key=_raw(key), cache_dir=cache, token=TOKEN)
    assert got.downloaded and got.version == first
    arrays, _ = verify_model(got.path, public_key=_raw(key))
    assert np.array_equal(arrays["trunk.w"], np.full((3, 2), 1.0))
    again = fetch_model(server.url, public_key=_raw(key), cache_dir=cache, token=TOKEN)
    assert not again.downloaded and again.path == got.path

    second = _publish(root / "v2", key, created=1_700_000_500, value=2.0)
    assert fetch_model(server.url, public_key=_raw(key), cache_dir=cache, token=TOKEN).version == second

    # The registry rolls back to an older model: the partner refuses it, by version or as "latest".
    import shutil

    shutil.rmtree(root / "v2")
    with pytest.raises(RegistryError, match="refusing a rollback"):
        fetch_model(server.url, public_key=_raw(key), cache_dir=cache, token=TOKEN)
    with pytest.raises(RegistryError, match="refusing a rollback"):
        fetch_model(server.url, public_key=_raw(key), cache_dir=cache, token=TOKEN, version=first)
    assert json.loads((cache / "latest.json").read_text())["version"] == second


def test_fetch_refuses_another_key_and_modified_files(
    tmp_path: Path, key: Ed25519PrivateKey, served: tuple[Path, _Server]
) -> None:
    root, server = served
    stranger = Ed25519PrivateKey.generate()
    _publish(root / "m", stranger, created=1_700_000_000)
    with pytest.raises(ArtifactError, match="signature does not verify"):
        fetch_model(server.url, public_key=_raw(key), cache_dir=tmp_path / "c1", token=TOKEN)
    assert not [p for p in (tmp_path / "c1").iterdir() if p.name != "latest.json"]

    for victim in ("weights.npz", "card.json"):
        folder = root / f"tampered-{victim}"
        _publish(folder, key, created=1_700_000_100)
        path = folder / victim
        path.write_bytes(path.read_bytes().replace(b'"rounds": 2', b'"rounds": 9') if victim == "card.json"
                         else path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))  # fmt: skip
        with pytest.raises(ArtifactError, match="does not match its signed hash"):
            fetch_model(server.url, public_key=_raw(key), cache_dir=tmp_path / f"c-{victim}", token=TOKEN)
        import shutil

        shutil.rmtree(folder)


def test_fetch_refuses_an_unsigned_model(tmp_path: Path, key: Ed25519PrivateKey, served: tuple[Path, _Server]) -> None:
    root, server = served
    _publish(root / "m", key, created=1_700_000_000)
    (root / "m" / "signature.json").write_text(json.dumps({"signed": {}, "signature": ""}))
    with pytest.raises(ArtifactError):
        fetch_model(server.url, public_key=_raw(key), cache_dir=tmp_path / "c", token=TOKEN)


def test_fetch_without_token_or_server(tmp_path: Path, key: Ed25519PrivateKey, served: tuple[Path, _Server]) -> None:
    root, server = served
    _publish(root / "m", key, created=1_700_000_000)
    with pytest.raises(RegistryError, match="bearer token"):
        fetch_model(server.url, public_key=_raw(key), cache_dir=tmp_path / "c", token=None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(RegistryError, match="cannot fetch"):
        fetch_model(f"http://127.0.0.1:{closed}", public_key=_raw(key), cache_dir=tmp_path / "c", timeout=5)
