"""What a person sees while a federation runs: the coordinator's rounds, who replied and the end;
a partner's messages answered, its epsilon after each and "run finished"; a SuperNode that
stops once the federation is over, or says why it waits."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message

from fedpersona.config.files import dump_toml
from fedpersona.config.settings import FederationSettings
from fedpersona.deploy import coordinator
from fedpersona.deploy.partner_site import supervise_supernode
from fedpersona.federation.client_app import build_client_app
from fedpersona.federation.run_log import FEDERATION_LOG, LogFollower, attach_log_file, note
from fedpersona.federation.server_app import ServerSettings, run_federation
from tests.fake_grid import MODEL, TRAINING, FakeGrid, ScriptedPartner

# --------------------------------------------------------------------------- coordinator


def _three() -> FakeGrid:
    return FakeGrid(
        {
            11: ScriptedPartner("shop-1", "ecommerce", 120),
            12: ScriptedPartner("shop-2", "ecommerce", 80),
            13: ScriptedPartner("bank-1", "finance", 100),
        },
        lose=[("train", 12)],  # shop-2's training replies never arrive
    )


def test_the_coordinator_log_shows_each_round_who_replied_and_the_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = FederationSettings(rounds=2, min_partners=2, personas=0)
    settings = ServerSettings(federation=fed, model=MODEL, training=TRAINING, run_dir=str(tmp_path), wait_timeout=1.0)
    with caplog.at_level(logging.INFO, logger="fedpersona"):
        run_federation(_three(), settings)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpersona.federation.server_app"]
    assert "round 1 of 2: training with 3 partner(s): shop-1, shop-2, bank-1" in lines
    assert (
        "round 1 of 2 aggregated: 2 of 3 partner(s) replied: shop-1 (epsilon 0.25), bank-1 (epsilon 0.25); "
        "no reply: shop-2"
    ) in lines
    assert any(line.startswith("round 2 of 2 aggregated: 2 of 3 partner(s) replied") for line in lines)
    assert f"run finished: 2 of 2 round(s) aggregated; model {tmp_path / 'model'}" in lines


def test_the_log_file_holds_plain_lines_and_a_follower_reads_only_new_complete_ones(tmp_path: Path) -> None:
    path = tmp_path / "run" / FEDERATION_LOG
    log = logging.getLogger("fedpersona")
    saved = (list(log.handlers), log.level)
    try:
        attach_log_file(path)
        attach_log_file(path)  # idempotent: each line once
        follower = LogFollower(path)
        logging.getLogger("fedpersona.federation.server_app").info("round 1 of 2 aggregated: 3 of 3 replied")
        logging.getLogger("fedpersona.federation.server_app").debug("a debug line")
        lines = follower.new_lines()
        assert len(lines) == 1 and lines[0].endswith("INFO round 1 of 2 aggregated: 3 of 3 replied")
        assert "\x1b" not in path.read_text()
        assert follower.new_lines() == []
        with path.open("a") as handle:
            handle.write("half a li")
        assert follower.new_lines() == []
        with path.open("a") as handle:
            handle.write("ne\n")
        assert follower.new_lines() == ["half a line"]
    finally:
        for handler in log.handlers[len(saved[0]) :]:
            handler.close()
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])


class _Superlink:
    pid = 0
    returncode = None

    def poll(self) -> None:
        return None


def test_server_start_prints_the_rounds_as_the_serverapp_logs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / FEDERATION_LOG
    path.parent.mkdir(parents=True)
    path.write_text("an old run's line\n")
    progress = LogFollower(path)
    statuses = iter(["running", "running", "finished:completed"])
    writes = iter(["round 1 of 2 aggregated: 3 of 3 partner(s) replied\n", "run finished: 2 of 2 round(s)\n"])

    def status(run_id: str, home: Path) -> str:
        with path.open("a") as handle:
            handle.write(next(writes, ""))
        return next(statuses)

    monkeypatch.setattr(coordinator, "_run_status", status)
    monkeypatch.setattr(coordinator, "_save_serverapp_log", lambda *a, **k: None)
    monkeypatch.setattr(coordinator, "descendants", lambda pid: [])

    class Signals:
        def sleep(self, seconds: float) -> None:
            pass

    printed: list[str] = []
    code = coordinator._watch_run(
        "7", home=tmp_path, superlink=_Superlink(), signals=Signals(), report=printed.append,  # type: ignore[arg-type]
        run_dir=tmp_path, progress=progress,
    )  # fmt: skip
    assert code == 1  # no signed model in this run folder
    assert printed[:2] == ["round 1 of 2 aggregated: 3 of 3 partner(s) replied", "run finished: 2 of 2 round(s)"]
    assert "an old run's line" not in printed
    assert printed[-1] == "run 7 finished:completed"


# --------------------------------------------------------------------------- partner


def _message(kind: str, config: dict[str, object]) -> Message:
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind,
    )  # fmt: skip
    content = RecordDict({"config": ConfigRecord(config)}) if config else RecordDict()
    if kind == "query.final_model":
        content["artifact"] = ConfigRecord({"weights.npz": b"", "card.json": b"", "signature.json": b""})
    return make_message(metadata, content)


def test_a_partner_logs_each_message_answered_its_epsilon_and_the_end_of_the_run(tmp_path: Path) -> None:
    dump_toml(
        tmp_path / "client.toml",
        {
            "partner": {"name": "clinic-x", "kind": "health", "state_dir": "state"},
            "data": {"synthetic_rows": 100, "synthetic_seed": 3},
            "privacy": {"target_epsilon": 2.0, "delta": 1e-5},
        },
    )
    ctx = Context(
        run_id=1, node_id=7, node_config={"client-config": str(tmp_path / "client.toml")}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    app = build_client_app()
    assert not app(_message("query.status", {"round": 3}), ctx).has_error()
    assert app(_message("query.final_model", {}), ctx).has_error()  # no model-signing key configured
    lines = (tmp_path / "state" / "logs" / "activity.log").read_text().splitlines()
    assert lines[0].endswith("clinic-x: answered query.status (round 3); epsilon 0.0000 of 2 spent")
    assert "clinic-x: run finished: the final model failed (config: " in lines[1]


def _supernode(
    tmp_path: Path,
    *,
    finish_at: float | None,
    exits: bool = False,
    max_restarts: int = 3,
    stop_after_run: bool = True,
    script: str | None = None,
) -> tuple[int, list[str], list[float]]:
    activity = tmp_path / "state" / "logs" / "activity.log"
    activity.parent.mkdir(parents=True)
    clock = [0.0]
    delays: list[float] = []

    def wait(seconds: float) -> None:
        clock[0] += seconds
        if seconds > 1.0:
            delays.append(seconds)
        if finish_at is not None and clock[0] == 3.0:
            note(activity, "clinic-x: answered train (round 1); epsilon 0.5000 of 2 spent")
        if finish_at is not None and clock[0] == finish_at:
            note(activity, "clinic-x: run finished: installed the federation's final model; epsilon 0.9 of 2 spent")

    def reachable(address: str) -> bool:
        return finish_at is not None and clock[0] < finish_at

    script = script or ("import sys; sys.exit(3)" if exits else "import time; time.sleep(600)")
    printed: list[str] = []
    code = supervise_supernode(
        [sys.executable, "-c", script], log=tmp_path / "supernode.log", activity=activity, superlink="127.0.0.1:9",
        name="clinic-x", max_restarts=max_restarts, stop_after_run=stop_after_run, linger=30.0,
        report=printed.append, wait=wait,
        reachable=reachable,
    )  # fmt: skip
    return code, printed, delays


def test_partner_start_stops_the_supernode_once_the_run_finished_and_the_superlink_is_gone(tmp_path: Path) -> None:
    code, printed, _ = _supernode(tmp_path, finish_at=5.0)
    assert code == 0
    assert any(line.endswith("answered train (round 1); epsilon 0.5000 of 2 spent") for line in printed)
    assert any("run finished: installed the federation's final model" in line for line in printed)
    assert printed[-1].startswith(
        "partner clinic-x: the run finished and the SuperLink at 127.0.0.1:9 has been unreachable for 30s"
    )
    assert "flower-supernode stopped" in printed[-1]


def test_partner_start_says_why_it_waits_and_restarts_with_backoff(tmp_path: Path) -> None:
    code, printed, delays = _supernode(tmp_path, finish_at=None, exits=True, max_restarts=2)
    assert code == 1
    restarts = [line for line in printed if "restarting in" in line]
    assert len(restarts) == 2 and delays == [5.0, 10.0]
    assert "flower-supernode exited with code 3" in restarts[0]
    assert "the SuperLink at 127.0.0.1:9 is unreachable (the coordinator is not running yet" in restarts[0]
    assert "start 2 of 3" in restarts[0] and "start 3 of 3" in restarts[1]
    assert printed[-1] == f"partner clinic-x: giving up after 3 start(s); see {tmp_path / 'supernode.log'}"


def test_keep_running_keeps_the_supernode_after_the_run(tmp_path: Path) -> None:
    code, printed, _ = _supernode(
        tmp_path, finish_at=5.0, max_restarts=0, stop_after_run=False, script="import time; time.sleep(0.5)"
    )
    assert any("run finished: installed the federation's final model" in line for line in printed)
    assert not any("flower-supernode stopped" in line for line in printed)
    assert code == 1 and printed[-1].startswith("partner clinic-x: giving up after 1 start(s)")
