"""Deployment faults: partners that die mid-round, come back with the same key, or never answer;
and a federation of ten SuperNodes.

Two levels:

- **Aggregation and bookkeeping** (fast): :func:`fedpersona.federation.server_app.run_federation` driven by
  :class:`tests.fake_grid.FakeGrid` with scripted partners whose replies are recorded, so the
  aggregate of a round with a dead partner is checked against ``np.average`` over exactly the
  survivors' replies (the end-to-end test cannot see the replies, which never leave the server).
  A dead node answers as the SuperLink does for a node without heartbeats (an error reply from
  the SuperLink's node id); a killed partner that was already charged sends no reply at all.
- **Real processes** (slow): the deployment of ``server/README.md`` and ``clients/README.md``
  on loopback: flower-superlink with TLS and node authentication, ten partners (three started
  with ``fedpersona partner start``, seven as bare flower-supernodes) plus two rogue nodes (a
  registered key that trusts another CA, and a key nobody registered) that never join. One
  partner's SuperNode and everything below it is killed with SIGKILL while it trains round 1
  (after its ledger charged the round); round 1 completes with the nine survivors. The
  SuperLink is then killed, the partner restarted with the same key and the run resumed from
  the server's checkpoint; round 2 includes all ten, and the victim's ledger holds exactly the
  rounds it started: round 1 (paid, never aggregated) and round 2. Afterwards the signed model
  is served by ``fedpersona serve`` (HTTPS, bearer token), fetched by ``fedpersona infer
  --model https://...`` trusting the federation's CA, a modified artifact is refused, and
  SIGTERM to ``partner start`` stops its SuperNode and every process below it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedpersona.config.settings import FederationSettings
from fedpersona.federation.server_app import ServerSettings, run_federation
from fedpersona.model.artifacts import verify_model
from tests.fake_grid import MODEL, TRAINING, FakeGrid, ScriptedPartner


def _settings(run_dir: Path, **federation: object) -> ServerSettings:
    fed = FederationSettings(
        **{"rounds": 1, "min_partners": 2, "personas": 0, "server_optimizer": "fedavg", "server_lr": 1.0,
           "global_weighting": "examples", "seed": 1, **federation}  # type: ignore[arg-type]
    )  # fmt: skip
    return ServerSettings(federation=fed, model=MODEL, training=TRAINING, run_dir=str(run_dir), wait_timeout=1.0)


def _partners() -> dict[int, ScriptedPartner]:
    return {
        21: ScriptedPartner("shop-1", "ecommerce", 150),
        22: ScriptedPartner("shop-2", "ecommerce", 50),
        23: ScriptedPartner("shop-3", "ecommerce", 90),
        24: ScriptedPartner("shop-4", "ecommerce", 70),
    }


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_round_with_a_dead_partner_aggregates_exactly_the_survivors(tmp_path: Path) -> None:
    partners = _partners()
    grid = FakeGrid(partners)
    lost = partners[24]

    def die(kind: str, group: str) -> None:
        if (kind, group) == ("train", "1"):
            grid.offline.add(23)  # shop-3's node stops: the SuperLink answers for it

    grid.before_send = die
    original = lost.__call__

    def killed_after_charging(msg):  # type: ignore[no-untyped-def]
        reply = original(msg)
        return None if msg.metadata.message_type == "train" else reply  # charged, then killed

    grid.nodes[24] = killed_after_charging
    result = run_federation(grid, _settings(tmp_path))  # type: ignore[arg-type]
    assert result.rounds_completed == 1

    survivors = [partners[21], partners[22]]
    model, _ = verify_model(tmp_path / "model")
    slot = "ecommerce:f00d"
    for name in partners[21].received[1]:  # the trunk
        replies = [p.update(p.received[1], 1)[name] for p in survivors]
        expected = np.average(np.stack(replies).astype(np.float64), axis=0, weights=[p.train_rows for p in survivors])
        # float32 storage: equal to the float64 oracle up to float32 rounding
        np.testing.assert_allclose(model[name], expected, rtol=1e-6, atol=1e-7)
    adapter = "adapter.ecommerce.weight"
    replies = [p.update(p.received[1], 1)[adapter] for p in survivors]
    expected = np.average(np.stack(replies).astype(np.float64), axis=0, weights=[p.train_rows for p in survivors])
    np.testing.assert_allclose(model[f"{slot}/{adapter}"], expected, rtol=1e-6, atol=1e-7)

    rows = {r["partner"]: r for r in _rows(tmp_path)}
    assert rows["shop-1"]["aggregated"] and rows["shop-2"]["aggregated"]
    assert not rows["shop-4"]["aggregated"] and "shop-3" not in rows  # shop-3 is gone; shop-4 lost its reply
    privacy = json.loads((tmp_path / "privacy.json").read_text())["partners"]
    assert privacy["shop-3"]["dropped"] == "unreachable (round 1)"
    # shop-4 paid for round 1 although the server never used its update: its epsilon says so.
    assert lost.charged == [1] and privacy["shop-4"]["epsilon"] == pytest.approx(lost.epsilon)


def test_a_partner_that_comes_back_rejoins_with_the_current_model(tmp_path: Path) -> None:
    partners = _partners()
    grid = FakeGrid(partners)
    back = partners[23]

    def weather(kind: str, group: str) -> None:
        if (kind, group) == ("train", "1"):
            grid.offline.add(23)  # crashes before round 1 reaches it
        if (kind, group) == ("evaluate", "1"):
            grid.offline.discard(23)  # restarted with the same key (same node id) meanwhile

    grid.before_send = weather
    result = run_federation(grid, _settings(tmp_path, rounds=3))  # type: ignore[arg-type]
    assert result.rounds_run == [1, 2, 3]
    assert ("query", "2", 23) in grid.sent  # asked who it is again, then admitted
    assert back.charged == [2, 3]  # round 1 never reached it
    for name, value in partners[21].received[2].items():  # the same current global model as everyone
        np.testing.assert_array_equal(back.received[2][name], value)
    aggregated = {(r["round"], r["partner"]) for r in _rows(tmp_path) if r["aggregated"]}
    assert (1, "shop-3") not in aggregated and {(2, "shop-3"), (3, "shop-3")} <= aggregated
    privacy = json.loads((tmp_path / "privacy.json").read_text())["partners"]["shop-3"]
    assert "dropped" not in privacy and privacy["epsilon"] == pytest.approx(back.epsilon)
    assert [h[0] for h in privacy["epsilon_history"]] == [2, 3]


def test_evaluate_every_asks_for_evaluations_only_on_its_rounds_and_the_last(tmp_path: Path) -> None:
    grid = FakeGrid(_partners())
    result = run_federation(grid, _settings(tmp_path, rounds=5, evaluate_every=2))  # type: ignore[arg-type]
    assert result.rounds_run == [1, 2, 3, 4, 5]
    assert sorted({group for kind, group, _ in grid.sent if kind == "evaluate"}) == ["2", "4", "5"]
    assert sorted({r["round"] for r in _rows(tmp_path)}) == [2, 4, 5]


def test_a_partner_that_refused_for_its_budget_stays_out(tmp_path: Path) -> None:
    from flwr.app import Error

    from fedpersona.privacy.manifest import ERROR_CODES, error_reason

    partners = _partners()
    grid = FakeGrid(partners)
    spent = partners[22]
    answer = spent.__call__

    def refuse(msg):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == "train" and msg.metadata.group_id == "1":
            return Error(code=ERROR_CODES["privacy-budget"], reason=error_reason("privacy-budget", 0.5))
        return answer(msg)

    grid.nodes[22] = refuse
    run_federation(grid, _settings(tmp_path, rounds=2))  # type: ignore[arg-type]
    assert ("query", "2", 22) not in grid.sent and ("train", "2", 22) not in grid.sent


# ----------------------------------------------------------------------------- real processes


REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PARTNERS = 10
VICTIM = "shop-3"  # a health partner (kinds rotate)
PARTNER_START = ("shop-1", "shop-2", "shop-6")  # one per kind, started as the runbook says
STOPS_AFTER_RUN = "shop-6"  # the others keep their SuperNode (--keep-running) for the SIGTERM check
ROGUES = {"rogue-wrong-ca": "finance", "rogue-unlisted": "health"}
# About four minutes on an idle two-core machine; the bounds leave room for a loaded one.
LIMIT = 1200.0


def _tools_missing() -> list[str]:
    import shutil

    tools = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return [t for t in tools if shutil.which(t, path=path) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(_tools_missing()), reason="Flower executables not installed")
def test_deployment_of_ten_supernodes_survives_a_killed_partner_and_a_killed_superlink(tmp_path: Path) -> None:
    """Ten SuperNodes, two rounds. One partner's SuperNode (and everything below it) is killed
    with SIGKILL while it trains round 1, after its ledger charged the round; round 1 completes
    with the nine survivors once the SuperLink reports the node unavailable. Then the SuperLink
    itself is killed with SIGKILL after round 1's checkpoint; the partner is restarted with the
    same key, ``server start --resume`` continues at round 2 with all ten, and every partner
    ends with the signed final model. Two rogue nodes never join. The model is then served,
    fetched by the partner's ``fedpersona infer`` over TLS, and a tampered copy refused.
    Every wait is bounded; every process is stopped."""
    import socket

    from fedpersona.config.files import dump_toml
    from fedpersona.config.settings import PrivacySettings
    from fedpersona.data.synthetic import generate_frame
    from fedpersona.deploy.certs import init_federation, partner_keys
    from fedpersona.deploy.partner_site import supernode_command
    from fedpersona.deploy.processes import alive, descendants
    from fedpersona.deploy.registry import RegistryError, fetch_model
    from fedpersona.federation.checkpoint import load_checkpoint
    from fedpersona.model.artifacts import ArtifactError, load_signing_public_key
    from fedpersona.privacy.ledger import PrivacyLedger
    from tests.test_deployment import _free_port, _stop

    start = time.monotonic()
    creds = init_federation(out=tmp_path / "server" / "credentials", hosts=["localhost"])
    kinds = ["ecommerce", "finance", "health"]
    names = [f"shop-{i}" for i in range(1, PARTNERS + 1)]
    keys = {name: partner_keys(name, out=tmp_path / "keys") for name in names}
    configs, ports = {}, {}
    privacy = {"target_epsilon": 5.0, "delta": 1e-3, "accountant": "rdp"}
    for i, name in enumerate(names):
        path = tmp_path / "clients" / name / "client.toml"
        path.parent.mkdir(parents=True)
        # The victim trains longer (more rows), so that the kill lands inside its round.
        data = {"synthetic_rows": 1500 if name == VICTIM else 120, "synthetic_seed": i}
        partner = {"name": name, "kind": kinds[i % 3], "state_dir": "state"}
        dump_toml(path, {"partner": partner, "data": data, "privacy": privacy, "release": {"audit_log": True}})
        configs[name], ports[name] = path, _free_port()
    # rogue-wrong-ca is registered (its key is listed) but trusts another CA; rogue-unlisted
    # presents a key the SuperLink has never seen. Neither may ever receive work.
    other_ca = init_federation(out=tmp_path / "elsewhere", hosts=["localhost"])
    for name, kind in ROGUES.items():
        keys[name] = partner_keys(name, out=tmp_path / "keys")
        path = tmp_path / "clients" / name / "client.toml"
        path.parent.mkdir(parents=True)
        dump_toml(path, {"partner": {"name": name, "kind": kind, "state_dir": "state"},
                         "data": {"synthetic_rows": 120, "synthetic_seed": 99}, "privacy": privacy})  # fmt: skip
        configs[name], ports[name] = path, _free_port()
    port = _free_port()
    run_dir = tmp_path / "run"
    federation = tmp_path / "server" / "federation.toml"
    dump_toml(
        federation,
        {
            "server": {"host": "127.0.0.1", "port": port, "run_dir": str(run_dir), "credentials": "credentials",
                       "app": str(REPO), "expected_partners": PARTNERS, "wait_timeout": 150.0},
            # The SuperLink reports a dead node within 60 s (two missed heartbeats); round_timeout is the backstop.
            # Evaluated after round 2 only: round 1's aggregated partners are read from the checkpoint.
            "federation": {"rounds": 2, "min_partners": 8, "round_timeout": 300.0, "seed": 2, "personas": 0,
                           "evaluate_every": 2},
            "model": {"token_dim": 8, "embed_dim": 8, "hidden": 8, "blocks": 1},
            "training": {"local_epochs": 1, "batch_size": 32},
            "partners": [{"name": n, "public_key": str(keys[n].public_key)} for n in [*names, "rogue-wrong-ca"]],
        },
    )  # fmt: skip
    # Ten partner sites share this machine's cores: one thread per process (as each site's own
    # torch would use its own cores), and no Flower telemetry (nothing here reaches the internet).
    env = {
        **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
    }  # fmt: skip
    cli = [sys.executable, "-m", "fedpersona.cli"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def launch(label: str, cmd: list[str], *, home: Path | None = None) -> subprocess.Popen[bytes]:
        extra = {} if home is None else {"FLWR_HOME": str(home)}  # a site's own Flower folder, as `partner start` sets
        with (logs / f"{label}.log").open("ab") as out:
            procs[label] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, **extra})
        return procs[label]

    def flwr_home(name: str) -> Path:
        return configs[name].parent / "state" / "flwr-home"

    def supernode(name: str) -> list[str]:
        return supernode_command(
            config=configs[name], superlink=f"127.0.0.1:{port}", ca=creds.ca_cert, key=keys[name].private_key,
            runtime_port=ports[name], max_wait_time=180, model_key=creds.signing_public_key,
        )  # fmt: skip

    def partner_start(name: str) -> list[str]:  # the partner's runbook command
        return [
            *cli, "partner", "start", "--config", str(configs[name]), "--superlink", f"127.0.0.1:{port}",
            "--ca", str(creds.ca_cert), "--key", str(keys[name].private_key), "--runtime-port", str(ports[name]),
            "--max-wait-time", "180", "--max-restarts", "3", "--model-key", str(creds.signing_public_key),
            *([] if name == STOPS_AFTER_RUN else ["--keep-running"]),
        ]  # fmt: skip

    def supernode_pids(name: str) -> list[int]:
        return [pid for pid in [procs[name].pid, *descendants(procs[name].pid)] if "flower-supernode" in _cmdline(pid)]

    def activity() -> int:
        """Bytes written so far by every process of the test (logs and partners' state)."""
        total = 0
        for folder in (logs, tmp_path / "clients", run_dir):
            for path in folder.rglob("*") if folder.exists() else ():
                with contextlib.suppress(OSError):
                    total += path.stat().st_size if path.is_file() else 0
        return total

    def wait(predicate: object, timeout: float, what: str) -> None:
        """Wait while the federation makes progress: ``timeout`` seconds without any process
        writing anything fails (a loaded machine is slow, not stuck), one hour in all."""
        began = time.monotonic()
        deadline, seen, checked = began + timeout, activity(), began
        while not predicate():  # type: ignore[operator]
            now = time.monotonic()
            if now - checked > 5.0:
                checked, current = now, activity()
                if current != seen:
                    seen, deadline = current, now + timeout
            if now > deadline or now - began > 3600.0:
                tails = {p.name: p.read_text()[-1500:] for p in logs.glob("server*.log")}
                raise AssertionError(f"no progress for {timeout:.0f}s while waiting for {what}; {tails}")
            time.sleep(0.05)

    settings = PrivacySettings(**privacy)  # type: ignore[arg-type]

    def ledger(name: str) -> list[int]:
        try:
            return [e.round for e in PrivacyLedger(configs[name].parent / "state", settings=settings).entries]
        except Exception:  # caught in the middle of a write: read again
            return []

    def checkpoint_round() -> int:
        try:
            checkpoint = load_checkpoint(run_dir)
        except Exception:
            return 0
        return checkpoint.round if checkpoint is not None else 0

    def kill_family(pid: int) -> None:
        for member in [pid, *descendants(pid)]:
            try:
                os.kill(member, signal.SIGKILL)
            except ProcessLookupError:
                pass

    marks: dict[str, float] = {}
    try:
        server = launch("server", [*cli, "server", "start", "--config", str(federation)])
        # A bare SuperNode whose key is not registered yet gives up: start them once all are
        # (SuperNodes wait for the run themselves; `flwr run` need not have finished).
        registered = [f"registered partner {n} as node" for n in [*names, "rogue-wrong-ca"]]

        def all_registered() -> bool:
            text = (logs / "server.log").read_text()
            return all(line in text for line in registered) or server.poll() is not None

        wait(all_registered, 120, "the partners' registration")
        for name in names:
            if name in PARTNER_START:
                launch(name, partner_start(name))
            else:
                launch(name, supernode(name), home=flwr_home(name))
        for rogue, ca in (("rogue-wrong-ca", other_ca.ca_cert), ("rogue-unlisted", creds.ca_cert)):
            launch(rogue, supernode_command(
                config=configs[rogue], superlink=f"127.0.0.1:{port}", ca=ca, key=keys[rogue].private_key,
                runtime_port=ports[rogue], max_wait_time=60), home=flwr_home(rogue))  # fmt: skip
        wait(lambda: ledger(VICTIM) == [1], 600, f"{VICTIM} to start round 1")
        kill_family(procs[VICTIM].pid)  # mid-round, as a power cut would
        marks["partner killed"] = time.monotonic() - start
        wait(lambda: checkpoint_round() >= 1, 300, "round 1 to be aggregated")
        first_round = load_checkpoint(run_dir)
        assert first_round is not None and first_round.round == 1
        round_one = set(first_round.extra["aggregated"])
        superlink = [pid for pid in descendants(server.pid) if "flower-superlink" in _cmdline(pid)]
        assert len(superlink) == 1, "no flower-superlink below `server start`"
        started_supernodes = {name: supernode_pids(name) for name in PARTNER_START}
        assert all(len(pids) == 1 for pids in started_supernodes.values()), started_supernodes
        os.kill(superlink[0], signal.SIGKILL)
        marks["SuperLink killed"] = time.monotonic() - start
        assert server.wait(timeout=120) == 1
        assert "restart with --resume" in (logs / "server.log").read_text()

        launch(VICTIM + "-restarted", supernode(VICTIM), home=flwr_home(VICTIM))  # the same key: the same node
        resumed = launch("server-resumed", [*cli, "server", "start", "--config", str(federation), "--resume"])
        wait(lambda: resumed.poll() is not None, LIMIT - (time.monotonic() - start), "the resumed run to finish")
        marks["run finished"] = time.monotonic() - start
        resumed_log = (logs / "server-resumed.log").read_text()
        assert resumed.returncode == 0, resumed_log
        assert "continuing at round 2" in resumed_log
        # fedpersona's INFO lines from the ServerApp (shown by `flwr log`) are kept in the run folder.
        serverapp_log = (run_dir / "logs" / "serverapp.log").read_text()
        assert "INFO fedpersona.federation.publishing: final model installed at 10 of 10 partner(s)" in serverapp_log
        assert "ServerApp log: " in resumed_log
        superlink_log = (run_dir / "logs" / "superlink.log").read_text()

        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        keys_seen = [(r["round"], r["partner"]) for r in rows]
        assert len(keys_seen) == len(set(keys_seen)), "a round was evaluated twice"
        used = {(r["round"], r["partner"]) for r in rows if r["aggregated"]}
        # Round 1: the nine survivors; round 2 (after the resume): all ten, the restarted partner included.
        assert round_one == set(names) - {VICTIM}
        assert {rnd for rnd, _ in keys_seen} == {2}  # evaluate_every = 2: only the last round
        assert {p for rnd, p in used if rnd == 2} == set(names)
        # The victim's ledger: round 1 once (paid, never aggregated), then round 2; it continued.
        assert ledger(VICTIM) == [1, 2]
        for name in set(names) - {VICTIM}:  # round 1 was never sent again after the resume
            assert ledger(name).count(1) == 1 and 1 <= ledger(name).count(2) <= 2, (name, ledger(name))
        entries = PrivacyLedger(configs[VICTIM].parent / "state", settings=settings).entries
        spent = json.loads((run_dir / "privacy.json").read_text())["partners"]
        assert set(spent) == set(names) and all(0 < p["epsilon"] <= 5.0 for p in spent.values())
        reported = spent[VICTIM]
        for name in names:  # each partner's ledger and audit log are on its own disk
            assert (configs[name].parent / "state" / "audit.jsonl").exists()
        assert reported["epsilon"] == pytest.approx(entries[-1].epsilon_after)
        assert entries[-1].epsilon_after > entries[0].epsilon_after
        # Every partner, the restarted one included, holds the signed final model of round 2.
        public = load_signing_public_key(creds.signing_public_key)
        for name in names:
            _, card = verify_model(configs[name].parent / "state" / "model", public_key=public)
            assert card["rounds"] == 2
        # The nine other SuperNodes rode through the SuperLink's death by themselves: nobody
        # restarted them, and the resumed run found them again.
        for name in set(names) - {VICTIM, STOPS_AFTER_RUN}:
            assert procs[name].poll() is None, f"{name}'s flower-supernode exited"
        for name, pids in started_supernodes.items():  # `partner start` did not need to restart them
            if name != STOPS_AFTER_RUN:
                assert supernode_pids(name) == pids, f"{name}: its flower-supernode was restarted"
        # Without --keep-running, `partner start` ends once the run finished and the SuperLink is gone.
        wait(lambda: procs[STOPS_AFTER_RUN].poll() is not None, 300, f"{STOPS_AFTER_RUN}'s partner start to end")
        stopped_log = (logs / f"{STOPS_AFTER_RUN}.log").read_text()
        assert procs[STOPS_AFTER_RUN].returncode == 0, stopped_log
        assert "run finished: installed the federation's final model" in stopped_log
        assert "has been unreachable for 30s (the coordinator stopped); flower-supernode stopped" in stopped_log

        # The rogues never received work; each was refused for its own reason.
        for rogue in ROGUES:
            assert not (configs[rogue].parent / "state" / "ledger.jsonl").exists()
        assert "CERTIFICATE_VERIFY_FAILED" in (logs / "rogue-wrong-ca.log").read_text()
        assert "No SuperNode found with the given public key" in superlink_log
        assert "Failed to activate SuperNode" in (logs / "rogue-unlisted.log").read_text()
        # The bundles Flower installs stay in the run folder and the partners' state folders.
        assert list((run_dir / "flwr-home" / "apps").iterdir())
        assert all(list((configs[n].parent / "state" / "flwr-home" / "apps").iterdir()) for n in PARTNER_START)

        # The model is served over HTTPS with a token (server runbook step 7) ...
        token = tmp_path / "token"
        token.write_text("s3cret-registry-token-0123456789\n")
        token.chmod(0o600)
        reg_port = _free_port()
        launch("registry", [
            *cli, "serve", "--artifacts", str(run_dir / "model"), "--port", str(reg_port),
            "--tls-cert", str(creds.server_cert), "--tls-key", str(creds.server_key), "--token-file", str(token),
        ])  # fmt: skip
        url = f"https://127.0.0.1:{reg_port}"

        def registry_up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", reg_port), timeout=1):
                    return True
            except OSError:
                return procs["registry"].poll() is not None

        wait(registry_up, 30, "the registry")
        assert procs["registry"].poll() is None, (logs / "registry.log").read_text()
        with pytest.raises(RegistryError, match="bearer token"):
            fetch_model(url, public_key=creds.signing_public_key, cache_dir=tmp_path / "c0", ca=creds.ca_cert)
        # ... and fetched by the partner's own command, trusting the federation's CA.
        clinic = next(n for n in PARTNER_START if kinds[names.index(n) % 3] == "health")
        users = tmp_path / "users.csv"
        generate_frame("health", 50, rng=np.random.default_rng(5))[0].to_csv(users, index=False)
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
        assert "the model carries no personas" in done.stderr
        cached = [p for p in (configs[clinic].parent / "state" / "models").iterdir() if p.is_dir()]
        assert len(cached) == 1 and verify_model(cached[0], public_key=public)[1]["rounds"] == 2
        assert not out.exists()  # nothing half-written
        # A modified artifact on the server is refused by a partner that has not cached it yet.
        weights = run_dir / "model" / "weights.npz"
        blob = bytearray(weights.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        weights.write_bytes(bytes(blob))
        with pytest.raises(ArtifactError, match="does not match its signed hash"):
            fetch_model(
                url, public_key=creds.signing_public_key, cache_dir=tmp_path / "fresh",
                token=token.read_text().strip(), ca=creds.ca_cert,
            )  # fmt: skip

        # SIGTERM to `partner start` stops its SuperNode and everything below it, and exits 130.
        for name in set(PARTNER_START) - {STOPS_AFTER_RUN}:
            family = descendants(procs[name].pid)
            assert family, f"{name}: no flower-supernode running"
            procs[name].send_signal(signal.SIGTERM)
            assert procs[name].wait(timeout=30) == 130
            assert not [pid for pid in family if alive(pid)], f"{name}: processes left behind"
        print({k: round(v) for k, v in marks.items()})
    finally:
        for proc in reversed(list(procs.values())):
            _stop(proc)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
