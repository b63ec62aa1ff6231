"""A real deployment on loopback: flower-superlink with TLS and node authentication, three
flower-supernodes (one per silo kind) started by `fedpersona partner start`, two rounds, then
the signed model served by `fedpersona serve` (HTTPS, bearer token) and fetched by fetch_model.

Also: a node whose key is not registered and a node that trusts another CA never join, a
modified artifact is rejected, Ctrl-C stops every process, and a SuperNode reconnects to a
restarted SuperLink. Every process started here is stopped in a finally block.

The SuperLink killed mid-run and the run resumed from the server's checkpoint
(``server start --resume``) is tested with ten SuperNodes, together with a partner killed
mid-round, in ``tests/reliability/test_deploy_faults.py`` (one federation for both, to keep
the suite short).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpersona.artifacts import ArtifactError, verify_model
from fedpersona.certs import init_federation, load_signing_public_key, partner_keys
from fedpersona.config import dump_toml
from fedpersona.deploy import supernode_command
from fedpersona.processes import alive, descendants
from fedpersona.registry import RegistryError, fetch_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
MISSING = [t for t in TOOLS if shutil.which(t, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None]
KINDS = {"shop-1": "ecommerce", "bank-1": "finance", "clinic-1": "health"}
DEADLINE = 330.0  # the whole test, processes included, stays under six minutes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"Flower executables not installed: {', '.join(MISSING)}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client_toml(folder: Path, name: str, kind: str) -> Path:
    path = folder / name / "client.toml"
    path.parent.mkdir(parents=True)
    dump_toml(
        path,
        {
            "partner": {"name": name, "kind": kind, "state_dir": "state"},
            "data": {"synthetic_rows": 300, "synthetic_seed": len(name)},
            "privacy": {"target_epsilon": 3.0, "delta": 1e-3},
            "release": {"audit_log": True},
        },
    )
    return path


def _wait(predicate: object, timeout: float, what: str, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(1.0)
    logs = {name: p.args for name, p in procs.items()}
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; processes: {logs}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    family = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in family + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_deployment_on_loopback(tmp_path: Path) -> None:
    start = time.monotonic()
    creds = init_federation(out=tmp_path / "server" / "credentials", hosts=["localhost"])
    other_ca = init_federation(out=tmp_path / "elsewhere", hosts=["localhost"])
    keys = {name: partner_keys(name, out=tmp_path / "keys") for name in [*KINDS, "rogue-wrong-ca", "rogue-unlisted"]}
    configs = {name: _client_toml(tmp_path / "clients", name, kind) for name, kind in KINDS.items()}
    configs["rogue-wrong-ca"] = _client_toml(tmp_path / "clients", "rogue-wrong-ca", "finance")
    configs["rogue-unlisted"] = _client_toml(tmp_path / "clients", "rogue-unlisted", "health")
    port = _free_port()
    run_dir = tmp_path / "run"
    federation = tmp_path / "server" / "federation.toml"
    dump_toml(
        federation,
        {
            "server": {
                "host": "127.0.0.1", "port": port, "run_dir": str(run_dir), "credentials": "credentials",
                "app": str(REPO), "expected_partners": 3, "wait_timeout": 150.0,
            },
            # personas = 0: no DP k-means phase (each message is a fresh ClientApp process per
            # partner, and six more exchanges would not fit in the five-minute bound).
            "federation": {"rounds": 2, "min_partners": 3, "round_timeout": 150.0, "seed": 3, "personas": 0},
            "model": {"token_dim": 8, "embed_dim": 8, "hidden": 16, "blocks": 1},
            "training": {"local_epochs": 1, "batch_size": 32},
            # rogue-wrong-ca is registered (its key is listed) but trusts another CA;
            # rogue-unlisted presents a key the SuperLink has never seen.
            "partners": [
                {"name": name, "public_key": str(keys[name].public_key)} for name in [*KINDS, "rogue-wrong-ca"]
            ],
        },
    )  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def launch(name: str, cmd: list[str]) -> None:
        with (logs / f"{name}.log").open("wb") as out:
            procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    cli = [sys.executable, "-m", "fedpersona.cli"]
    try:
        # Everything starts at once: a SuperNode retries until the SuperLink is up, and `partner start`
        # restarts one that connected before the coordinator registered its key.
        launch("server", [*cli, "server", "start", "--config", str(federation)])
        for name in KINDS:
            launch(
                name,
                [
                    *cli, "partner", "start", "--config", str(configs[name]), "--superlink", f"127.0.0.1:{port}",
                    "--ca", str(creds.ca_cert), "--key", str(keys[name].private_key),
                    "--runtime-port", str(_free_port()), "--max-wait-time", "60", "--max-restarts", "3",
                    "--model-key", str(creds.signing_public_key),
                ],
            )  # fmt: skip
        launch(
            "rogue-wrong-ca",
            supernode_command(
                config=configs["rogue-wrong-ca"], superlink=f"127.0.0.1:{port}", ca=other_ca.ca_cert,
                key=keys["rogue-wrong-ca"].private_key, runtime_port=_free_port(), max_wait_time=60,
            ),
        )  # fmt: skip
        launch(
            "rogue-unlisted",
            supernode_command(
                config=configs["rogue-unlisted"], superlink=f"127.0.0.1:{port}", ca=creds.ca_cert,
                key=keys["rogue-unlisted"].private_key, runtime_port=_free_port(), max_wait_time=60,
            ),
        )  # fmt: skip
        server = procs["server"]
        _wait(lambda: server.poll() is not None, DEADLINE - (time.monotonic() - start) - 45, "the run", procs)
        server_log = (logs / "server.log").read_text()
        assert server.returncode == 0, server_log + (run_dir / "logs" / "superlink.log").read_text()[-4000:]

        # The federation ran two rounds with exactly the three registered, correctly configured partners.
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {r["round"] for r in rows} == {1, 2}
        assert {r["partner"] for r in rows} == set(KINDS)
        privacy = json.loads((run_dir / "privacy.json").read_text())["partners"]
        assert set(privacy) == set(KINDS)
        assert all(0 < p["epsilon"] <= 3.0 for p in privacy.values())
        for name in KINDS:  # each partner's ledger and audit log are on its own disk
            assert (configs[name].parent / "state" / "ledger.jsonl").exists()
            assert (configs[name].parent / "state" / "audit.jsonl").exists()
        # The bundles Flower installs stay in the run folder and the partners' state folders.
        assert list((run_dir / "flwr-home" / "apps").iterdir())
        assert all(list((configs[n].parent / "state" / "flwr-home" / "apps").iterdir()) for n in KINDS)
        for rogue in ("rogue-wrong-ca", "rogue-unlisted"):  # never received any work
            assert not (configs[rogue].parent / "state" / "ledger.jsonl").exists()
        assert "CERTIFICATE_VERIFY_FAILED" in (logs / "rogue-wrong-ca.log").read_text()
        superlink_log = (run_dir / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in superlink_log  # the unlisted key, refused
        assert "Failed to activate SuperNode" in (logs / "rogue-unlisted.log").read_text()

        # The model is signed with the federation's key; every partner received it and installed it.
        public = load_signing_public_key(creds.signing_public_key)
        served_arrays, _ = verify_model(run_dir / "model", public_key=public)
        for name in KINDS:
            arrays, card = verify_model(configs[name].parent / "state" / "model", public_key=public)
            assert card["rounds"] == 2 and arrays.keys() == served_arrays.keys()
        # It is also served over HTTPS with a token, fetched and verified.
        token = tmp_path / "token"
        token.write_text("s3cret-registry-token-0123456789\n")
        token.chmod(0o600)
        reg_port = _free_port()
        launch(
            "registry",
            [
                *cli, "serve", "--artifacts", str(run_dir / "model"), "--port", str(reg_port),
                "--tls-cert", str(creds.server_cert), "--tls-key", str(creds.server_key), "--token-file", str(token),
            ],
        )  # fmt: skip
        url = f"https://127.0.0.1:{reg_port}"

        def registry_up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", reg_port), timeout=1):
                    return True
            except OSError:
                return False

        _wait(registry_up, 30, "the registry", procs)
        with pytest.raises(RegistryError, match="bearer token"):
            fetch_model(url, public_key=creds.signing_public_key, cache_dir=tmp_path / "c0", ca=creds.ca_cert)
        fetched = fetch_model(
            url, public_key=creds.signing_public_key, cache_dir=tmp_path / "cache", token=token.read_text().strip(),
            ca=creds.ca_cert,
        )  # fmt: skip
        assert fetched.downloaded
        arrays, card = verify_model(fetched.path, public_key=public)
        assert card["rounds"] == 2 and set(card["partners"]) == set(KINDS)
        served, _ = verify_model(run_dir / "model", public_key=public)
        assert arrays.keys() == served.keys()

        # The partner's own command: `fedpersona infer --model https://...`, trusting the federation's CA.
        import numpy as np

        from fedpersona.synthetic import generate_frame

        users = tmp_path / "users.csv"
        generate_frame("health", 50, rng=np.random.default_rng(5))[0].to_csv(users, index=False)
        clinic = next(name for name, kind in KINDS.items() if kind == "health")
        out = tmp_path / "personas-from-registry.csv"
        done = subprocess.run(
            [
                *cli, "infer", "--model", url, "--config", str(configs[clinic]), "--data", str(users),
                "--out", str(out), "--public-key", str(creds.signing_public_key), "--token-file", str(token),
                "--ca", str(creds.ca_cert),
            ],
            capture_output=True, text=True, env=env, timeout=180, check=False,
        )  # fmt: skip
        # It downloaded the model over TLS, verified it and cached it; this run clustered no
        # personas (personas = 0 keeps the test short), which infer then says in one line.
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        assert "the model carries no persona prototypes" in done.stderr
        cached = [p for p in (configs[clinic].parent / "state" / "models").iterdir() if p.is_dir()]
        assert len(cached) == 1 and verify_model(cached[0], public_key=public)[1]["rounds"] == 2
        assert not out.exists()  # nothing half-written

        # A modified artifact on the server is refused by a partner that has not cached it yet.
        weights = run_dir / "model" / "weights.npz"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="does not match its signed hash"):
            fetch_model(
                url, public_key=creds.signing_public_key, cache_dir=tmp_path / "fresh",
                token=token.read_text().strip(), ca=creds.ca_cert,
            )  # fmt: skip

        # SIGTERM to `partner start` stops its SuperNode and everything below it, and exits 130.
        for name in KINDS:
            family = descendants(procs[name].pid)
            assert family, f"{name}: no flower-supernode running"
            procs[name].send_signal(signal.SIGTERM)
            assert procs[name].wait(timeout=30) == 130
            assert not [pid for pid in family if alive(pid)], f"{name}: processes left behind"
    finally:
        for proc in reversed(list(procs.values())):
            _stop(proc)
    for proc in procs.values():
        assert proc.poll() is not None


def test_server_start_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    creds = init_federation(out=tmp_path / "credentials", hosts=["localhost"])
    key = partner_keys("shop-1", out=tmp_path / "keys")
    federation = tmp_path / "federation.toml"
    dump_toml(
        federation,
        {
            "server": {"host": "127.0.0.1", "port": _free_port(), "run_dir": "run",
                       "credentials": str(creds.ca_cert.parent), "app": str(REPO), "expected_partners": 1,
                       "wait_timeout": 600.0},
            "federation": {"rounds": 1, "min_partners": 1},
            "partners": [{"name": "shop-1", "public_key": str(key.public_key)}],
        },
    )  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpersona.cli", "server", "start", "--config", str(federation)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while "started run" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
        assert "started run" in log.read_text(), log.read_text()
        family = descendants(proc.pid)  # flower-superlink, flower-superexec, flwr-serverapp
        assert len(family) >= 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert not [pid for pid in family if alive(pid)]
        assert "stopping the SuperLink" in log.read_text()
        # The run folder can be resumed, and only with --resume.
        again = subprocess.run(
            [sys.executable, "-m", "fedpersona.cli", "server", "start", "--config", str(federation)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert again.returncode == 2 and "--resume" in again.stderr
    finally:
        _stop(proc)
