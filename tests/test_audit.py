"""The one-run privacy audit: the bound against hand-computed binomial values, the probe's canary
gradient, and whole audits that must pass a correct pipeline and catch a broken one."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.validators import ModuleValidator

from fedpersona.audit import (
    AUDIT_FILE,
    AuditResult,
    AuditSettings,
    CanaryProbe,
    ProbeConfig,
    audit_p_value,
    audit_schema,
    epsilon_lower_bound,
    guesses_from_scores,
    run_audit,
)
from fedpersona.cli import main
from fedpersona.config.files import load_scenario
from fedpersona.data.features import featurize
from fedpersona.data.tables import validate_frame
from fedpersona.errors import ConfigError
from fedpersona.model.encoder import random_keep, token_presence
from fedpersona.simulation import default_scenario_path

CLAIM = 2.0

# --- the bound ---------------------------------------------------------------------------------


def test_p_value_for_pure_dp_is_the_binomial_tail_by_hand() -> None:
    # eps = ln 3: a right guess has probability 3/4. P[Bin(4, 3/4) >= 3] = (4*27 + 81) / 256.
    assert audit_p_value(epsilon=math.log(3), delta=0.0, canaries=10, guesses=4, correct=3) == pytest.approx(
        189 / 256, rel=1e-12
    )
    assert audit_p_value(epsilon=math.log(3), delta=0.0, canaries=10, guesses=4, correct=4) == pytest.approx(
        81 / 256, rel=1e-12
    )
    # eps = 0: a fair coin; ten right out of ten has probability 2^-10.
    assert audit_p_value(epsilon=0.0, delta=0.0, canaries=10, guesses=10, correct=10) == pytest.approx(
        1 / 1024, rel=1e-12
    )
    assert audit_p_value(epsilon=1.0, delta=0.0, canaries=10, guesses=4, correct=0) == 1.0


def test_p_value_delta_term_by_hand() -> None:
    # Bin(4, 3/4) has P[=2] = 54/256, P[=1] = 12/256, P[=0] = 1/256. The term
    # max_i P[3 - i <= Bin < 3] / i is max(54, 66/2, 67/3) / 256 = 54/256, times 2 m delta = 0.2.
    got = audit_p_value(epsilon=math.log(3), delta=0.01, canaries=10, guesses=4, correct=3)
    assert got == pytest.approx((189 + 0.2 * 54) / 256, rel=1e-12)
    assert audit_p_value(epsilon=math.log(3), delta=0.5, canaries=10, guesses=4, correct=3) == 1.0


@pytest.mark.parametrize("guesses", [10, 200])
def test_bound_with_every_guess_right_has_a_closed_form(guesses: int) -> None:
    # Without delta, r right of r rejects eps while (e^eps / (1 + e^eps))^r < 0.05.
    q = 0.05 ** (1 / guesses)
    expected = math.log(q / (1 - q))
    got = epsilon_lower_bound(canaries=1000, guesses=guesses, correct=guesses, delta=0.0)
    assert got == pytest.approx(expected, abs=1e-6)


def test_bound_sits_at_the_edge_of_rejection() -> None:
    kwargs = {"canaries": 1000, "guesses": 200, "correct": 180, "delta": 1e-5}
    bound = epsilon_lower_bound(**kwargs)  # type: ignore[arg-type]
    assert 1.0 < bound < 3.0
    assert audit_p_value(epsilon=bound - 1e-6, **kwargs) < 0.05  # type: ignore[arg-type]
    assert audit_p_value(epsilon=bound + 1e-6, **kwargs) >= 0.05  # type: ignore[arg-type]


def test_no_evidence_gives_a_zero_bound() -> None:
    assert epsilon_lower_bound(canaries=1000, guesses=200, correct=100, delta=1e-5) == 0.0
    assert epsilon_lower_bound(canaries=1000, guesses=200, correct=0, delta=1e-5) == 0.0


def test_bound_grows_with_right_guesses_and_shrinks_with_delta() -> None:
    bounds = [epsilon_lower_bound(canaries=1000, guesses=200, correct=v, delta=1e-5) for v in (130, 150, 170, 190, 200)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    pure = epsilon_lower_bound(canaries=1000, guesses=200, correct=190, delta=0.0)
    approx = epsilon_lower_bound(canaries=1000, guesses=200, correct=190, delta=1e-4)
    many = epsilon_lower_bound(canaries=100_000, guesses=200, correct=190, delta=1e-4)
    assert pure > approx > many


def test_bound_is_valid_for_randomized_response() -> None:
    # Randomized response with eps = 1 is exactly 1-DP: each guess is right with probability
    # e / (1 + e). The chance that the bound exceeds 1 must be at most 5% (computed exactly
    # with math.comb, independently of scipy), and not far below it (the test is not vacuous).
    q = math.e / (1 + math.e)
    r = 100
    level = sum(
        math.comb(r, v) * q**v * (1 - q) ** (r - v)
        for v in range(r + 1)
        if epsilon_lower_bound(canaries=1000, guesses=r, correct=v, delta=0.0) > 1.0
    )
    assert 0.03 < level <= 0.05


def test_bound_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        audit_p_value(epsilon=1.0, delta=0.0, canaries=10, guesses=4, correct=5)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(canaries=10, guesses=4, correct=4, delta=0.0, confidence=1.0)


def test_guesses_take_the_top_and_bottom_scores_and_break_ties_by_index() -> None:
    scores = np.array([0.5, -2.0, 3.0, 0.0, 0.0, 0.0, 1.0])
    assert guesses_from_scores(scores, positive=2, negative=2).tolist() == [0, -1, 1, -1, 0, 0, 1]
    assert guesses_from_scores(scores, positive=0, negative=1).tolist() == [0, -1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="cannot make"):
        guesses_from_scores(scores, positive=4, negative=4)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("canaries", 5, "canaries must be an integer >= 10, got 5"),
        ("canaries", 10.5, "canaries must be an integer"),
        ("noise_scale", -1.0, "noise_scale must be a finite number >= 0"),
        ("noise_scale", math.nan, "noise_scale must be a finite number >= 0"),
        ("guess_fraction", 0.6, r"guess_fraction must be in \(0, 0.5\]"),
        ("confidence", 1.0, r"confidence must be in \(0, 1\)"),
        ("peers", 0, "peers must be an integer >= 1"),
        ("gain", 1.0, "gain must be >= 2"),
    ],
)
def test_settings_name_the_valid_range(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AuditSettings(**{field: value})  # type: ignore[arg-type]


def test_pre_registered_guess_counts() -> None:
    assert AuditSettings().guesses_per_side == 100
    assert AuditSettings(canaries=10).guesses_per_side == 1
    assert AuditSettings().batch_size == 1001


# --- the probe ---------------------------------------------------------------------------------


def test_probe_canary_gradient_lies_on_its_own_weight_at_full_sensitivity() -> None:
    schema = audit_schema(20)
    ordinary = pd.DataFrame({"user_id": [f"u{i}" for i in range(24)], "canary": "", "label": "0"})
    for j, name in enumerate(("x1", "x2", "x3", "x4")):
        ordinary[name] = [str((i * (j + 3)) % 10 / 10) for i in range(24)]
    canary = pd.DataFrame({"user_id": ["c"], "x1": [""], "x2": [""], "x3": [""], "x4": [""]})
    canary["canary"], canary["label"] = "canary-07", "1"
    frame = pd.concat([ordinary, canary], ignore_index=True)
    data = featurize(validate_frame(schema, frame, source="test"))
    probe = CanaryProbe(data.layout, ProbeConfig(gain=4.0))
    ModuleValidator.validate(probe, strict=True)
    batch = data.batch(torch.tensor([24]))
    keep = random_keep(token_presence(data.layout, batch), probe.config.mask_rate, torch.Generator().manual_seed(0))
    probe(batch, keep).sum().backward()
    adapter = probe.adapter.weight.grad
    assert adapter is not None and probe.trunk.weight.grad is not None
    assert float(probe.trunk.weight.grad.abs().sum()) == 0.0
    nonzero = torch.nonzero(adapter[:, 0]).flatten().tolist()
    assert nonzero == [8]  # vocabulary index 7, plus the "other" code 0
    # d/dw BCE(gain * w, 1) at w = 0 is gain * (1/2 - 1): twice a clipping norm of 1.
    assert float(adapter[8, 0]) == pytest.approx(-2.0)


# --- whole audits ------------------------------------------------------------------------------


def _audit(
    noise_scale: float, *, canaries: int = 1000, rounds: int = 3, seed: int = 0, accountant: str = "prv"
) -> AuditResult:
    scenario = load_scenario(default_scenario_path(), epsilon=CLAIM)
    scenario = scenario.model_copy(
        update={
            "federation": scenario.federation.replace(rounds=rounds),
            "privacy": scenario.privacy.replace(accountant=accountant),
        }
    )
    settings = AuditSettings(canaries=canaries, noise_scale=noise_scale)
    return run_audit(scenario=scenario, settings=settings, rng=np.random.default_rng(seed))


@pytest.mark.slow
def test_correct_pipeline_is_not_refuted() -> None:
    result = _audit(1.0)
    assert result.noise_multiplier == result.noise_multiplier_planned
    assert result.epsilon_ledger is not None and result.epsilon_ledger <= CLAIM
    assert result.guesses == 200 and 0 <= result.correct <= 200
    assert result.epsilon_lower_bound <= CLAIM
    assert result.epsilon_lower_bound_releases <= CLAIM
    assert not result.claim_refuted


@pytest.mark.slow
def test_noise_divided_by_five_is_caught() -> None:
    result = _audit(0.2)
    assert result.noise_multiplier == pytest.approx(0.2 * result.noise_multiplier_planned)
    assert result.epsilon_lower_bound > CLAIM
    assert result.claim_refuted
    # Whatever the claim, the bound never exceeds what the ledger really accounted.
    assert result.epsilon_ledger is not None and result.epsilon_lower_bound <= result.epsilon_ledger


@pytest.mark.slow
def test_zero_noise_is_caught_with_every_guess_right() -> None:
    result = _audit(0.0)
    assert result.noise_multiplier is None and result.epsilon_ledger is None
    assert result.correct == result.guesses
    assert result.epsilon_lower_bound > CLAIM and result.claim_refuted


@pytest.mark.slow
def test_same_seed_same_audit_and_another_seed_another() -> None:
    def public(result: AuditResult) -> dict[str, object]:
        return {k: v for k, v in result.to_dict().items() if k != "seconds"}

    # The RDP accountant only to keep this test quick; the random path is the same as with PRV.
    first = _audit(1.0, canaries=60, rounds=1, seed=7, accountant="rdp")
    assert public(first) == public(_audit(1.0, canaries=60, rounds=1, seed=7, accountant="rdp"))
    other = _audit(1.0, canaries=60, rounds=1, seed=8, accountant="rdp")
    assert (other.canaries_included, other.correct, other.correct_releases) != (
        first.canaries_included,
        first.correct,
        first.correct_releases,
    )


# --- the command -------------------------------------------------------------------------------


def _run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["fedpersona", "audit", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _small_scenario(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "audit.toml"
    path.write_text(
        '[federation]\nrounds = 1\nseed = 3\n\n[privacy]\ntarget_epsilon = 2.0\naccountant = "rdp"\n' + extra + "\n"
        '[[silos]]\nkind = "finance"\nname = "bank"\npartners = 1\nrows = 100\n',
        encoding="utf-8",
    )
    return path


def test_cli_writes_audit_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    code = _run_cli(
        monkeypatch, "--scenario", str(_small_scenario(tmp_path)), "--canaries", "40", "--noise-scale", "0",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / AUDIT_FILE).read_text())
    assert doc["epsilon_claimed"] == 2.0 and doc["canaries"] == 40 and doc["confidence"] == 0.95
    assert doc["noise_scale"] == 0.0 and doc["noise_multiplier"] is None
    assert doc["accountant"] == "rdp" and doc["guesses"] == 8
    assert doc["correct"] == doc["correct_positive"] + doc["correct_negative"] <= 8
    assert doc["claim_refuted"] == (doc["epsilon_lower_bound"] > 2.0)
    assert sorted(p.name for p in out.iterdir()) == [AUDIT_FILE]


@pytest.mark.parametrize(
    "args",
    [
        ["--canaries", "3"],
        ["--canaries", "many"],
        ["--noise-scale", "-1"],
        ["--noise-scale", "half"],
        ["--epsilon", "inf"],
        ["--epsilon", "-2"],
        ["--scenario", "missing.toml"],
        ["--scenario", "TYPO"],
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    if args[-1] == "TYPO":
        args = ["--scenario", str(_small_scenario(tmp_path, extra="noise_multiplyer = 2.0\n"))]
    out = tmp_path / "run"
    assert _run_cli(monkeypatch, *args, "--out", str(out)) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_cli_needs_out_and_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_cli(monkeypatch) == 2
    out = tmp_path / "run"
    out.mkdir()
    (out / AUDIT_FILE).write_text("earlier\n")
    assert _run_cli(monkeypatch, "--out", str(out)) == 2
    assert (out / AUDIT_FILE).read_text() == "earlier\n"
    assert _run_cli(monkeypatch, "--out", str(out / AUDIT_FILE)) == 2
