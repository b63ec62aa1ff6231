"""`fedpersona server start` on loopback: Ctrl-C stops the SuperLink and everything below it,
and the run folder it leaves can be resumed only with ``--resume``. The helpers here are shared
with the deployment test.

The full deployment (flower-superlink with TLS and node authentication, ten partners, rogue
nodes refused, a partner and the SuperLink killed mid-run and the run resumed, the signed
model served by `fedpersona serve` and fetched by `fedpersona infer` over TLS, a tampered
artifact refused, SIGTERM to `partner start`) is one federation in
``tests/reliability/test_deploy_faults.py``, to keep the suite short. Here: a second federation
in which every partner's budget is spent trains nothing, publishes nothing, ends non-zero with
the reason, and leaves each partner's installed model as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedpersona.config.files import dump_toml
from fedpersona.config.settings import PrivacySettings
from fedpersona.deploy.certs import init_federation, partner_keys
from fedpersona.deploy.processes import alive, descendants

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
MISSING = [t for t in TOOLS if shutil.which(t, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"Flower executables not installed: {', '.join(MISSING)}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        # The ServerApp's progress reaches the console (through RUN_DIR/logs/federation.log).
        while "0 of 1 partners connected, waiting up to" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1.0)
        assert "0 of 1 partners connected, waiting up to" in log.read_text(), log.read_text()
        assert "0 of 1 partners connected" in (tmp_path / "run" / "logs" / "federation.log").read_text()
        assert "\x1b" not in (tmp_path / "run" / "logs" / "superlink.log").read_text()
        assert not (tmp_path / "run" / "keys" / "model-signing.key").exists()
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


def _wait(predicate: Callable[[], bool], *, quiet: float, watch: list[Path], what: str) -> None:
    """Wait for ``predicate`` while the processes make progress: ``quiet`` seconds in which no
    file under ``watch`` grows or changes fails (a loaded machine is slow, not stuck), and one
    hour fails in all."""

    def activity() -> int:
        total = 0
        for folder in watch:
            for path in folder.rglob("*") if folder.exists() else ():
                with contextlib.suppress(OSError):
                    total += path.stat().st_size if path.is_file() else 0
        return total

    began = time.monotonic()
    deadline, seen, checked = began + quiet, activity(), began
    while not predicate():
        now = time.monotonic()
        if now - checked > 5.0:
            checked, current = now, activity()
            if current != seen:
                seen, deadline = current, now + quiet
        if now > deadline or now - began > 3600.0:
            raise AssertionError(f"no progress for {quiet:.0f}s while waiting for {what}")
        time.sleep(0.1)


def test_a_second_federation_with_spent_budgets_publishes_nothing_and_keeps_the_installed_models(
    tmp_path: Path,
) -> None:
    """Two partners whose plan holds one DP-SGD round (``privacy.planned_rounds = 1``) train
    one federation and install its signed model (run 1 runs the partners' real ClientApp in
    this process, signed with the federation's key: it only makes their state). A second
    federation over loopback (``server start``, each partner's ``partner start``) finds every
    budget spent: each partner refuses before any gradient step, ``server start`` exits
    non-zero and says why, run 2 publishes no model, and each partner's installed model is
    byte for byte the one of run 1."""
    from flwr.app import Context, RecordDict

    from fedpersona.config.settings import FederationSettings, ModelSettings, TrainingSettings
    from fedpersona.federation.server_app import ServerSettings, run_federation
    from fedpersona.model.artifacts import FILES, load_signing_public_key, verify_model
    from fedpersona.privacy.ledger import PrivacyLedger
    from tests.fake_grid import FakeGrid, client_app_nodes

    creds = init_federation(out=tmp_path / "server" / "credentials", hosts=["localhost"])
    names = ("shop-1", "shop-2")
    keys = {name: partner_keys(name, out=tmp_path / "keys") for name in names}
    privacy = {"target_epsilon": 3.0, "delta": 1e-3, "accountant": "rdp", "planned_rounds": 1}
    configs: dict[str, Path] = {}
    for i, name in enumerate(names):
        configs[name] = tmp_path / "clients" / name / "client.toml"
        configs[name].parent.mkdir(parents=True)
        dump_toml(configs[name], {
            "partner": {"name": name, "kind": "ecommerce", "state_dir": "state"},
            "data": {"synthetic_rows": 120, "synthetic_seed": i}, "privacy": privacy,
        })  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cli = [sys.executable, "-m", "fedpersona.cli"]
    logs = tmp_path / "logs"
    logs.mkdir()
    watch = [logs, tmp_path / "clients", tmp_path / "server"]
    procs: list[subprocess.Popen[bytes]] = []

    def launch(label: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with (logs / f"{label}.log").open("ab") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
        return procs[-1]

    def federation(run: str) -> subprocess.Popen[bytes]:
        """One federation: `server start`, then each partner's `partner start`; the server's process."""
        port, path = _free_port(), tmp_path / "server" / f"{run}.toml"
        dump_toml(path, {
            "server": {"host": "127.0.0.1", "port": port, "run_dir": run, "credentials": "credentials",
                       "app": str(REPO), "expected_partners": len(names), "wait_timeout": 600.0},
            "federation": {"rounds": 1, "min_partners": len(names), "personas": 0, "seed": 3},
            "model": {"token_dim": 8, "embed_dim": 8, "hidden": 8, "blocks": 1},
            "training": {"local_epochs": 1, "batch_size": 32},
            "partners": [{"name": n, "public_key": str(keys[n].public_key)} for n in names],
        })  # fmt: skip
        server = launch(run, [*cli, "server", "start", "--config", str(path)])
        console = logs / f"{run}.log"
        # A SuperNode whose key is not registered yet gives up: start the partners once all are.
        registered = f"registered partner {names[-1]} "
        _wait(
            lambda: registered in console.read_text() or server.poll() is not None, quiet=120, watch=watch,
            what=f"{run}'s partners to be registered",
        )  # fmt: skip
        assert registered in console.read_text(), console.read_text()
        for name in names:
            launch(f"{run}-{name}", [
                *cli, "partner", "start", "--config", str(configs[name]), "--superlink", f"127.0.0.1:{port}",
                "--ca", str(creds.ca_cert), "--key", str(keys[name].private_key), "--runtime-port",
                str(_free_port()), "--max-wait-time", "180", "--max-restarts", "2",
                "--model-key", str(creds.signing_public_key),
            ])  # fmt: skip
        _wait(lambda: server.poll() is not None, quiet=300, watch=watch, what=f"{run} to end")
        return server

    def installed(name: str) -> dict[str, bytes]:
        model = configs[name].parent / "state" / "model"
        return {file: (model / file).read_bytes() for file in FILES}

    def dp_rounds(name: str) -> list[int]:
        ledger = PrivacyLedger(configs[name].parent / "state", settings=PrivacySettings(**privacy))
        return [e.round for e in ledger.entries if e.mechanism == "dp-sgd"]

    try:
        contexts = {
            node: Context(
                run_id=1, node_id=node, state=RecordDict(), run_config={},
                node_config={"client-config": str(configs[name]), "model-public-key": str(creds.signing_public_key)},
            )
            for node, name in enumerate(names, start=1)
        }  # fmt: skip
        settings = ServerSettings(
            federation=FederationSettings(rounds=1, min_partners=len(names), personas=0, seed=3),
            model=ModelSettings(token_dim=8, embed_dim=8, hidden=8, blocks=1),
            training=TrainingSettings(local_epochs=1, batch_size=32), run_dir=str(tmp_path / "server" / "run1"),
            wait_timeout=1.0, deliver_model=True, signing_key=str(creds.signing_key),
        )  # fmt: skip
        first = run_federation(FakeGrid(client_app_nodes(contexts)), settings)
        assert first.rounds_completed == 1 and sorted(first.delivered) == sorted(names)
        public = load_signing_public_key(creds.signing_public_key)
        for name in names:
            _, card = verify_model(configs[name].parent / "state" / "model", public_key=public)
            assert card["rounds"] == 1 and dp_rounds(name) == [1]
        before = {name: installed(name) for name in names}

        second = federation("run2")
        console = (logs / "run2.log").read_text()
        assert second.returncode == 1, console
        # The console says why: nobody trained, each partner out for its budget, nothing published.
        assert "round 1: no partner replied (partners out: privacy-budget x2); stopping" in console
        assert "no round completed" in console and "nothing is published" in console
        assert "finished:failed" in console
        run2 = tmp_path / "server" / "run2"
        assert not (run2 / "model").exists()
        outcome = json.loads((run2 / "run.json").read_text())
        assert outcome["status"] == "failed" and "privacy-budget" in outcome["reason"]
        for name in names:
            # Refused before any gradient step: the ledger holds run 1's round only ...
            assert dp_rounds(name) == [1]
            activity = (configs[name].parent / "state" / "logs" / "activity.log").read_text()
            assert "train (round 1): refused (privacy-budget)" in activity
            # ... and it was told the run is over (so `partner start` stops instead of waiting for a model).
            assert "run finished: nothing was trained, no model is published" in activity
            # ... and the model of run 1 is still the installed one, byte for byte, and nothing was replaced.
            assert installed(name) == before[name]
            assert not (configs[name].parent / "state" / "model-history").exists()
    finally:
        for proc in reversed(procs):
            _stop(proc)
