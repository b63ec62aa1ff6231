"""End to end: `fedpersona simulate` on Flower's simulation engine writes the run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpersona.model.artifacts import ArtifactError, verify_model
from fedpersona.privacy.accounting import compute_epsilon

SCENARIO = """
[federation]
rounds = 2
min_partners = 2
personas = 4
persona_steps = 3
[model]
token_dim = 16
embed_dim = 16
hidden = 32
blocks = 1
[training]
batch_size = 32
local_epochs = 1
[privacy]
target_epsilon = 2.0
delta = 1e-5
[[silos]]
kind = "ecommerce"
name = "shop"
partners = 2
rows = 600
[[silos]]
kind = "finance"
name = "bank"
partners = 1
rows = 300
[[silos]]
kind = "health"
name = "clinic"
partners = 1
rows = 300
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpersona.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_two_round_simulation_writes_the_run_folder(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "run"
    done = _cli("simulate", "--scenario", str(scenario), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2:" in done.stdout and "shop-1" in done.stdout and "label AUC" in done.stdout
    # each phase is shown as it happens, in order
    phases = [
        "coordinator up; 4 partners starting",
        "admission: 4 partners load their data and fix their privacy plans...",
        "admission: 4 partners load their data and fix their privacy plans: 4 answered in",
        "round 1: 4 partners train...",
        "round 1: 4 partners evaluate: 4 answered in",
        "round 2: 4 partners train...",
        "personas: release 1 at 4 partners...",
        "personas: release 4 at 4 partners: 4 answered in",
        "personas: 4 partners assign their users and write their persona cards...",
    ]
    where = [done.stdout.find(text) for text in phases]
    assert all(i >= 0 for i in where) and where == sorted(where), list(zip(phases, where, strict=True))

    all_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in all_rows if "phase" not in r]
    persona_rows = [r for r in all_rows if r.get("phase") == "personas"]
    assert sorted(r["partner"] for r in persona_rows) == ["bank-1", "clinic-1", "shop-1", "shop-2"]
    assert all(0.0 <= r["surrogate_fidelity"] <= 1.0 and r["personas_found"] >= 1 for r in persona_rows)
    assert sorted({(r["round"], r["partner"]) for r in rows}) == [
        (rnd, p) for rnd in (1, 2) for p in ("bank-1", "clinic-1", "shop-1", "shop-2")
    ]
    for row in rows:
        # The default label model: an AUC only where its score shows a signal on the partner's
        # own rows (label_signal 1); the encoder's probe, reconstruction and ARI are not computed.
        assert {"round", "partner", "kind", "rows", "epsilon", "label_signal"} <= set(row)
        assert not {"probe_auc", "reconstruction_error", "ari"} & set(row)
        assert ("label_auc" in row) == (row["label_signal"] == 1.0)
        assert 0.0 <= row.get("label_auc", 0.5) <= 1.0
        assert 0 < row["epsilon"] <= 2.0
    by_partner = {r["partner"]: r for r in rows if r["round"] == 2}
    first = {r["partner"]: r for r in rows if r["round"] == 1}
    assert all(by_partner[p]["epsilon"] > first[p]["epsilon"] for p in by_partner)
    # The honest baseline: at the last evaluation only, every partner's own model beside its
    # local model with the federation, on its held-out rows.
    assert not any("alone_auc" in r for r in first.values())
    for row in by_partner.values():
        assert 0.0 <= row["alone_auc"] <= 1.0 and 0.0 <= row["local_auc"] <= 1.0
        assert -1.0 <= row["alone_ari"] <= 1.0
    # The bank's labels follow its columns: its own model is far above chance (a 240-row shop's
    # may sit at chance on its 60 held-out rows). Its held-out rows come from the partner's
    # secret split key, so they differ from run to run: over 75 random 240/60 splits of 300-row
    # synthetic banks its own model scored 0.84 on average, 0.76 at the 5th percentile and 0.69
    # at the lowest, where chance on 60 rows rarely passes 0.62.
    assert by_partner["bank-1"]["alone_auc"] > 0.62
    assert "alone (own columns) or with the federation" in done.stdout
    assert "## Alone or with the federation" in (out / "report.md").read_text()

    privacy = json.loads((out / "privacy.json").read_text())["partners"]
    assert set(privacy) == {"bank-1", "clinic-1", "shop-1", "shop-2"}
    for name, entry in privacy.items():
        assert entry["epsilon"] <= entry["target_epsilon"] == 2.0
        assert entry["accountant"] == "prv" and entry["noise_multiplier"] > 0
        assert entry["epsilon"] > by_partner[name]["epsilon"]  # the persona releases spent their share
        ledger = out / "partners" / name / "state" / "ledger.jsonl"
        assert entry["epsilon"] == pytest.approx(json.loads(ledger.read_text().splitlines()[-1])["epsilon_after"])
        mechanisms = [json.loads(x)["mechanism"] for x in ledger.read_text().splitlines()]
        assert mechanisms == ["dp-sgd", "dp-sgd", "dp-gram", "dp-em", "dp-em", "dp-em"]
        cards = json.loads((out / "partners" / name / "state" / "personas.json").read_text())
        assert cards["k"] == 4 and len(cards["cards"]) == 4
        # the ledger follows the plan fixed before round 1, and privacy plan predicted it
        plan = json.loads((out / "partners" / name / "state" / "plan.json").read_text())
        entries = [json.loads(x) for x in ledger.read_text().splitlines() if '"dp-sgd"' in x]
        assert {(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries} == {
            (plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"])
        }
        predicted = compute_epsilon(
            [(plan["noise_multiplier"], plan["sample_rate"], 2 * plan["steps_per_round"])], delta=1e-5, accountant="prv"
        )
        assert entries[-1]["epsilon_after"] == pytest.approx(predicted, rel=1e-9)
        assert entry["noise_multiplier"] == plan["noise_multiplier"]
    shown = _cli("privacy", "ledger", str(out / "partners" / "shop-1" / "state"), cwd=tmp_path)
    assert shown.returncode == 0 and "dp-sgd alone" in " ".join(shown.stdout.split())
    assert "dp-gram alone" in " ".join(shown.stdout.split()) and "dp-em alone" in " ".join(shown.stdout.split())
    personas = json.loads((out / "personas.json").read_text())
    assert personas["k"] == 4 and set(personas["shares_by_kind"]) == {"ecommerce", "finance", "health"}
    for shares in personas["shares_by_kind"].values():
        assert sum(shares) == pytest.approx(1.0)
    config = (out / "config.toml").read_text()
    assert "rounds = 2" in config and "target_epsilon = 2.0" in config

    arrays, card = verify_model(out / "model")
    assert card["rounds"] == 2 and set(card["partners"]) == set(privacy)
    assert card["personas"]["k"] == 4 and len(card["personas"]["slots"]) == 3
    for released in card["personas"]["slots"].values():
        assert len(released["shares"]) == 4 and released["kind"] in {"ecommerce", "finance", "health"}
    assert not any(k.startswith("trunk.") or "head" in k for k in arrays)  # the label model has neither
    for kind in ("ecommerce", "finance", "health"):  # each kind's label model, averaged within its slot
        assert any(k.startswith(f"{kind}:") and k.endswith("/label_model.half0.weight") for k in arrays), kind
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "shop-2" in html
    # local inference from the saved model reproduces the run's persona assignments exactly
    from fedpersona.config.files import load_partner_config
    from fedpersona.data.synthetic import generate_silo

    shop = load_partner_config(out / "partners" / "shop-1" / "client.toml")
    silo = generate_silo("ecommerce", shop.synthetic_rows or 0, seed=shop.synthetic_seed,
                         mix=np.asarray(shop.synthetic_mix))  # fmt: skip
    silo.frame.to_csv(tmp_path / "users.csv", index=False)
    done = _cli("infer", "--model", str(out / "model"), "--config", str(out / "partners" / "shop-1" / "client.toml"),
                "--data", str(tmp_path / "users.csv"), "--out", str(tmp_path / "personas.csv"), "--chunk-rows", "100",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    import csv

    with (tmp_path / "personas.csv").open(newline="") as f:
        inferred = [row[:2] for row in csv.reader(f)][1:]  # ids are quoted (the documented format)
    with (out / "partners" / "shop-1" / "state" / "assignments.csv").open(newline="") as f:
        saved = list(csv.reader(f))[1:]
    assert inferred == saved and len(saved) > 100
    weights = out / "model" / "weights.npz"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"weights\.npz"):
        verify_model(out / "model")
    again = _cli("simulate", "--scenario", str(scenario), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_user_errors_exit_2_with_one_clear_message(tmp_path: Path) -> None:
    schema = tmp_path / "schema.toml"
    schema.write_text(
        '[table]\nkind = "health"\nid = "id"\n'
        '[features.age]\ntype = "numeric"\nbounds = [0, 120]\nmissing = "reject"\n'
        '[features.smoker]\ntype = "boolean"\n'
    )
    data = tmp_path / "patients.csv"
    rows = ["id,age,smoker"] + [f"{i},{30 + i % 40},yes" for i in range(40)]
    rows[3] = "3,abc,yes"
    rows[8] = "8,,no"
    data.write_text("\n".join(rows) + "\n")
    done = _cli("schema", "check", "--schema", str(schema), "--data", str(data), cwd=tmp_path)
    assert done.returncode == 2
    text = " ".join(done.stderr.split())
    assert "patients.csv" in text and "'age'" in text and "abc" in text and "Traceback" not in text

    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nrounds = 0\n[[silos]]\nkind='health'\nname='c'\nrows=100\n")
    done = _cli("simulate", "--scenario", str(bad), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert done.returncode == 2 and "federation.rounds: must be >= 1, got 0" in " ".join(done.stderr.split())
    assert not (tmp_path / "r").exists()

    done = _cli("simulate", "--epsilon", "-3", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert done.returncode == 2 and "--epsilon" in done.stderr


@pytest.mark.slow
def test_budget_veto_drops_a_partner_and_the_run_goes_on(tmp_path: Path) -> None:
    """A partner that committed to one round refuses the second; the server carries on."""
    scenario = tmp_path / "veto.toml"
    scenario.write_text(SCENARIO.replace('name = "bank"', 'name = "bank"\nprivacy = { planned_rounds = 1 }'))
    out = tmp_path / "run"
    done = _cli("simulate", "--scenario", str(scenario), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    privacy = json.loads((out / "privacy.json").read_text())["partners"]
    # The server learns why in one word; the partner's own log says what the round would have cost.
    assert privacy["bank-1"]["dropped"] == "privacy-budget (round 2)"
    assert privacy["bank-1"]["epsilon"] <= 2.0 and privacy["bank-1"]["steps"] > 0
    ledger = out / "partners" / "bank-1" / "state" / "ledger.jsonl"
    assert len(ledger.read_text().splitlines()) == 1  # the refused round was never charged
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["partner"] for r in rows if r["round"] == 2} == {"clinic-1", "shop-1", "shop-2"}
    for name in ("clinic-1", "shop-1", "shop-2"):
        assert "dropped" not in privacy[name] and privacy[name]["epsilon"] <= 2.0


def test_ray_address_attaches_to_a_cluster_instead_of_starting_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.simulation

    from fedpersona.errors import ConfigError
    from fedpersona.simulation import ray_init_args, simulate

    local = ray_init_args(None)
    assert local["num_cpus"] >= 1 and "_temp_dir" in local and "address" not in local
    cluster = ray_init_args(" 10.0.0.5:6379 ")
    assert cluster["address"] == "10.0.0.5:6379" and "num_cpus" not in cluster and "_temp_dir" not in cluster
    with pytest.raises(ConfigError, match="--ray-address is empty"):
        ray_init_args("  ")
    seen: dict[str, object] = {}

    def fake_run_simulation(**kwargs: object) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO)
    with pytest.raises(RuntimeError, match="did not finish"):  # the fake runs nothing
        simulate(scenario_path=scenario, out=tmp_path / "run", ray_address="auto")
    backend = seen["backend_config"]
    assert isinstance(backend, dict) and backend["init_args"]["address"] == "auto"
    assert seen["num_supernodes"] == 4
