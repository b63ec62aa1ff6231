"""The coordinator's checkpoint: exact round trip, resume at the next round, clear errors.

run_federation is driven by :class:`tests.fake_grid.FakeGrid` with scripted partners whose
updates are deterministic, so "a crashed and resumed federation" and "one that never crashed"
must end with the same global model bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedpersona.config.settings import FederationSettings
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.federation.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    run_settings,
    save_checkpoint,
    settings_fingerprint,
)
from fedpersona.federation.server_app import ServerSettings, run_federation
from fedpersona.model.artifacts import verify_model
from tests.fake_grid import MODEL, TRAINING, FakeGrid, ScriptedPartner, ServerCrash

REPO = Path(__file__).resolve().parents[1]


def _partners() -> dict[int, ScriptedPartner]:
    return {
        11: ScriptedPartner("shop-1", "ecommerce", 120),
        12: ScriptedPartner("shop-2", "ecommerce", 80),
        13: ScriptedPartner("bank-1", "finance", 100),
    }


def _settings(run_dir: Path, **federation: object) -> ServerSettings:
    fed = FederationSettings(
        **{"rounds": 3, "min_partners": 2, "personas": 0, "server_optimizer": "fedadam", "server_lr": 0.1,
           "seed": 5, **federation}  # type: ignore[arg-type]
    )  # fmt: skip
    return ServerSettings(federation=fed, model=MODEL, training=TRAINING, run_dir=str(run_dir), wait_timeout=1.0)


def _global(run_dir: Path) -> dict[str, np.ndarray]:
    arrays, _ = verify_model(run_dir / "model")
    return arrays


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    agg = ScopedAggregator(optimizer="fedadam", lr=0.1)
    agg.trunk = {"trunk.w": np.ones((2, 3), np.float32)}
    rng = np.random.default_rng(0)
    for _ in range(2):  # two rounds so that FedAdam has moments for trunk and adapter
        agg.aggregate(
            [
                PartnerUpdate(
                    "a", "ecommerce:f", {"trunk.w": rng.normal(size=(2, 3)).astype(np.float32),
                                         "adapter.x": rng.normal(size=(4,)).astype(np.float32)}, 10,
                ),
            ]
        )  # fmt: skip
    runs = {"ecommerce:f": {"position": 2, "candidates": rng.normal(size=(6, 8)).tolist()}}
    saved = Checkpoint(
        fingerprint="abc", stage="personas", round=4, evaluated=True, persona_done=2, arrays=agg.get_state(),
        persona_runs=runs, partners={"a": {"node_id": 7, "epsilon": 1.25}}, extra={"aggregated": ["a"]},
    )  # fmt: skip
    save_checkpoint(tmp_path, saved)
    assert not list((tmp_path / "state").glob("*.tmp"))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert (loaded.stage, loaded.round, loaded.persona_done, loaded.partners, loaded.extra, loaded.persona_runs) == (
        "personas", 4, 2, saved.partners, saved.extra, runs,
    )  # fmt: skip
    assert loaded.arrays.keys() == saved.arrays.keys()
    for name, value in saved.arrays.items():
        assert loaded.arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded.arrays[name], value)

    # A restored aggregator takes the next step exactly as the original one does.
    restored = ScopedAggregator(optimizer="fedadam", lr=0.1)
    restored.set_state(loaded.arrays)
    step = [PartnerUpdate("a", "ecommerce:f", {"trunk.w": np.zeros((2, 3), np.float32),
                                               "adapter.x": np.ones(4, np.float32)}, 10)]  # fmt: skip
    agg.aggregate(step)
    restored.aggregate(step)
    for name, value in agg.get_state().items():
        np.testing.assert_array_equal(restored.get_state()[name], value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: p.write_bytes(b"not a checkpoint"),
        lambda p: p.write_bytes(b""),
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path: Path, damage: object) -> None:
    save_checkpoint(tmp_path, Checkpoint(fingerprint="abc", arrays={"trunk/x": np.ones(3, np.float32)}))
    damage(tmp_path / CHECKPOINT)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=r"is damaged and cannot be resumed.*move it away"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path: Path) -> None:
    first = _settings(tmp_path)
    saved = run_settings(first.federation, first.model, first.training)
    save_checkpoint(tmp_path, Checkpoint(fingerprint=settings_fingerprint(*_three(first)), settings=saved))
    # Operational settings may change ...
    later = replace(first, federation=first.federation.replace(round_timeout=30.0))
    assert load_checkpoint(tmp_path, settings=_three(later))
    # ... settings that define the run may not; the error names each of them.
    other = replace(first, federation=first.federation.replace(rounds=4, seed=9))
    with pytest.raises(CheckpointError, match=r"federation.rounds was 3, now 4; federation.seed was 5, now 9"):
        load_checkpoint(tmp_path, settings=_three(other))
    # A setting that a newer fedpersona added is accepted at its default, refused otherwise.
    del saved["training.fedprox_mu"]
    save_checkpoint(tmp_path, Checkpoint(fingerprint="old", settings=saved))
    assert load_checkpoint(tmp_path, settings=_three(first))
    newer = replace(first, training=first.training.replace(fedprox_mu=0.1))
    with pytest.raises(CheckpointError, match=r"training\.fedprox_mu is 0\.1, but the run used a version without it"):
        load_checkpoint(tmp_path, settings=_three(newer))


def _three(settings: ServerSettings) -> tuple[object, object, object]:
    return settings.federation, settings.model, settings.training


def test_resume_continues_at_the_next_round_and_aggregates_each_round_once(tmp_path: Path) -> None:
    whole = _partners()
    result = run_federation(FakeGrid(whole), _settings(tmp_path / "whole"))  # type: ignore[arg-type]
    assert result.rounds_run == [1, 2, 3]

    partners = _partners()
    grid = FakeGrid(partners)
    grid.crash_at("train", 3)  # the server dies while round 3 is out; rounds 1 and 2 are aggregated
    with pytest.raises(ServerCrash):
        run_federation(grid, _settings(tmp_path / "crashed"))  # type: ignore[arg-type]
    checkpoint = load_checkpoint(tmp_path / "crashed")
    assert checkpoint is not None and (checkpoint.stage, checkpoint.round, checkpoint.evaluated) == ("train", 2, True)
    assert not (tmp_path / "crashed" / "model").exists()

    # Without --resume the run folder is refused; with it the run continues at round 3.
    with pytest.raises(Exception, match="holds the checkpoint of an earlier run"):
        run_federation(FakeGrid(partners), _settings(tmp_path / "crashed"))  # type: ignore[arg-type]
    resumed_grid = FakeGrid(partners)
    resumed = run_federation(
        resumed_grid,  # type: ignore[arg-type]
        replace(_settings(tmp_path / "crashed"), resume=True),
    )
    assert resumed.resumed_after == 2 and resumed.rounds_run == [3]
    assert resumed_grid.rounds_sent("train") == [3]  # completed rounds are never sent again
    assert not resumed_grid.rounds_sent("query")  # the checkpoint's nodes are readmitted by node id
    assert resumed.rounds_completed == 3

    # The same global model as the federation that never crashed, bit for bit.
    expected, got = _global(tmp_path / "whole"), _global(tmp_path / "crashed")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    # Each round's evaluation is in metrics.jsonl once per partner.
    rows = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["partner"]) for r in rows) == sorted(
        (rnd, p.name) for rnd in (1, 2, 3) for p in partners.values()
    )
    # Round 3 was out when the server died: each partner trained it, was charged, and trains it
    # again for the resumed run (a new release, charged again); the server's epsilon is the ledger's.
    for p in partners.values():
        assert p.charged == [1, 2, 3, 3]
    privacy = json.loads((tmp_path / "crashed" / "privacy.json").read_text())["partners"]
    assert privacy["shop-1"]["epsilon"] == pytest.approx(partners[11].epsilon)
    assert [h[0] for h in privacy["shop-1"]["epsilon_history"]] == [1, 2, 3]


def test_a_crash_before_the_evaluation_resumes_with_it_not_with_training(tmp_path: Path) -> None:
    partners = _partners()
    grid = FakeGrid(partners)
    grid.crash_at("evaluate", 1)
    with pytest.raises(ServerCrash):
        run_federation(grid, _settings(tmp_path, rounds=2))  # type: ignore[arg-type]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and (checkpoint.round, checkpoint.evaluated) == (1, False)
    grid = FakeGrid(partners)
    run_federation(grid, replace(_settings(tmp_path, rounds=2), resume=True))  # type: ignore[arg-type]
    assert grid.rounds_sent("evaluate") == [1, 2] and grid.rounds_sent("train") == [2]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in rows}) == [1, 2] and len(rows) == 6


def test_the_personas_resume_mid_way_and_end_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    personas = {"personas": 2, "persona_steps": 4, "rounds": 1}  # 5 releases: rounds 2-6
    run_federation(FakeGrid(_partners()), _settings(tmp_path / "whole", **personas))  # type: ignore[arg-type]

    partners = _partners()
    grid = FakeGrid(partners)
    grid.crash_at("query.persona_release", 1 + 3)  # the third release (rounds are numbered after training)
    with pytest.raises(ServerCrash):
        run_federation(grid, _settings(tmp_path / "crashed", **personas))  # type: ignore[arg-type]
    checkpoint = load_checkpoint(tmp_path / "crashed")
    assert checkpoint is not None and (checkpoint.stage, checkpoint.persona_done) == ("personas", 2)
    grid = FakeGrid(partners)
    run_federation(grid, replace(_settings(tmp_path / "crashed", **personas), resume=True))  # type: ignore[arg-type]
    assert grid.rounds_sent("train") == [] and grid.rounds_sent("query.persona_release") == [4, 5, 6]
    whole, crashed = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "crashed")
    assert whole is not None and crashed is not None and whole.personas is not None
    assert sorted(whole.personas["slots"]) == ["ecommerce:f00d", "finance:f00d"]
    assert crashed.personas == whole.personas


def test_resuming_a_finished_run_only_delivers_the_model_again(tmp_path: Path) -> None:
    partners = _partners()
    settings = replace(_settings(tmp_path, rounds=1), deliver_model=True)
    first = run_federation(FakeGrid(partners), settings)  # type: ignore[arg-type]
    assert first.delivered == ["bank-1", "shop-1", "shop-2"]
    for p in partners.values():
        p.model = None
    grid = FakeGrid(partners)
    again = run_federation(grid, replace(settings, resume=True))  # type: ignore[arg-type]
    assert again.rounds_run == [] and grid.rounds_sent("train") == []
    assert all(p.model is not None for p in partners.values())


def test_server_start_resume_with_a_damaged_checkpoint_exits_2_without_a_traceback(tmp_path: Path) -> None:
    from fedpersona.config.files import dump_toml
    from fedpersona.deploy.certs import init_federation, partner_keys

    creds = init_federation(out=tmp_path / "credentials", hosts=["localhost"])
    key = partner_keys("shop-1", out=tmp_path / "keys")
    federation = tmp_path / "federation.toml"
    dump_toml(
        federation,
        {
            "server": {"host": "127.0.0.1", "port": 9, "run_dir": "run", "credentials": str(creds.ca_cert.parent),
                       "app": str(REPO), "expected_partners": 1},
            "federation": {"rounds": 1, "min_partners": 1},
            "partners": [{"name": "shop-1", "public_key": str(key.public_key)}],
        },
    )  # fmt: skip
    (tmp_path / "run" / "state").mkdir(parents=True)
    (tmp_path / "run" / "superlink.db").write_bytes(b"")
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"PK\x03\x04 torn")
    done = subprocess.run(
        [sys.executable, "-m", "fedpersona.cli", "server", "start", "--config", str(federation), "--resume"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is damaged and cannot be resumed" in done.stderr and "Traceback" not in done.stderr + done.stdout


def test_a_partner_under_a_new_node_id_is_matched_by_name_and_keeps_its_slot(tmp_path: Path) -> None:
    partners = _partners()
    grid = FakeGrid(partners)
    grid.crash_at("train", 2)
    with pytest.raises(ServerCrash):
        run_federation(grid, _settings(tmp_path))  # type: ignore[arg-type]
    # The SuperLink's database was rebuilt: every partner comes back under another node id.
    moved = FakeGrid({node + 100: p for node, p in partners.items()})
    result = run_federation(moved, replace(_settings(tmp_path), resume=True))  # type: ignore[arg-type]
    assert moved.rounds_sent("query") == [0] and result.rounds_run == [2, 3]
    assert sorted(result.partners) == ["bank-1", "shop-1", "shop-2"]
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert {name: p["slot"] for name, p in card["partners"].items()} == {
        "shop-1": "ecommerce:f00d", "shop-2": "ecommerce:f00d", "bank-1": "finance:f00d",
    }  # fmt: skip


def test_after_a_crash_and_resume_the_reports_carry_each_partners_ledger_epsilon(tmp_path: Path) -> None:
    from flwr.app import Error

    from fedpersona.privacy.manifest import ERROR_CODES, error_reason

    partners = _partners()
    grid = FakeGrid(partners)
    grid.crash_at("train", 3)  # every partner trained (and paid for) round 3; the server never heard back
    with pytest.raises(ServerCrash):
        run_federation(grid, _settings(tmp_path, rounds=4))  # type: ignore[arg-type]
    # On resume, shop-1 refuses for its budget. Its refusal, like every reply, carries its
    # ledger's epsilon (round 3 included), which is more than the last figure the server heard.
    shop = partners[11]
    answer = shop.__call__

    def refuse(msg):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == "train":
            return Error(code=ERROR_CODES["privacy-budget"], reason=error_reason("privacy-budget", shop.epsilon))
        return answer(msg)

    grid = FakeGrid(partners)
    grid.nodes[11] = refuse
    gone = partners[13]
    grid.before_send = lambda kind, group: (
        grid.offline.add(13) if kind == "query.status" and group == "status" else None
    )
    run_federation(grid, replace(_settings(tmp_path, rounds=4), resume=True))  # type: ignore[arg-type]
    privacy = json.loads((tmp_path / "privacy.json").read_text())["partners"]
    _, card = verify_model(tmp_path / "model")
    assert shop.charged == [1, 2, 3] and privacy["shop-1"]["epsilon"] == pytest.approx(shop.epsilon)
    assert card["partners"]["shop-1"]["epsilon"] == pytest.approx(shop.epsilon)
    assert (
        "epsilon_is_lower_bound" not in privacy["shop-1"] and not card["partners"]["shop-1"]["epsilon_is_lower_bound"]
    )
    assert privacy["shop-2"]["epsilon"] == pytest.approx(partners[12].epsilon)
    # bank-1 went away before the end-of-run status query: its last figure is labelled a lower bound.
    assert privacy["bank-1"]["epsilon_is_lower_bound"] is True and card["partners"]["bank-1"]["epsilon_is_lower_bound"]
    assert privacy["bank-1"]["epsilon"] <= gone.epsilon


def test_a_run_that_trains_nothing_publishes_nothing_and_says_why(tmp_path: Path) -> None:
    from flwr.app import Error

    from fedpersona.federation.server_app import NothingTrained
    from fedpersona.privacy.manifest import ERROR_CODES, error_reason

    partners = _partners()
    grid = FakeGrid(partners)
    for node, partner in partners.items():
        answer = partner.__call__

        def refuse(msg, answer=answer):  # type: ignore[no-untyped-def]
            if msg.metadata.message_type == "train":  # every budget is spent
                return Error(code=ERROR_CODES["privacy-budget"], reason=error_reason("privacy-budget", 3.0))
            return answer(msg)

        grid.nodes[node] = refuse
    with pytest.raises(NothingTrained, match=r"round 1: no partner replied \(partners out: privacy-budget x3\)"):
        run_federation(grid, _settings(tmp_path))  # type: ignore[arg-type]
    assert not (tmp_path / "model").exists()
    outcome = json.loads((tmp_path / "run.json").read_text())
    assert outcome["status"] == "failed" and outcome["rounds_completed"] == 0
    assert "privacy-budget x3" in outcome["reason"]
    assert all(e["epsilon"] == 3.0 for e in json.loads((tmp_path / "privacy.json").read_text())["partners"].values())
    assert not any(kind == "query.final_model" for kind, _, _ in grid.sent)
