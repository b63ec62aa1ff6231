"""The privacy audit: the bound against hand-computed binomial values, the gradient canary and the
noise check against simulations, and whole audits through the partner's real round that pass the
correct pipeline and catch each of four broken ones (mutation tests), with Opacus' ghost clipping and
with the default book-keeping clipping where the mutation concerns the clipping or the noise."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

from fedpersona.audit import (
    AUDIT_FILE,
    AuditResult,
    AuditSettings,
    CanaryModel,
    audit_p_value,
    epsilon_lower_bound,
    guesses_from_scores,
    noise_ratio,
    run_audit,
)
from fedpersona.cli import main
from fedpersona.config.files import load_scenario
from fedpersona.config.settings import ModelSettings
from fedpersona.errors import ConfigError
from fedpersona.federation.partner import load_partner_data
from fedpersona.model import training
from fedpersona.model.encoder import PersonaEncoder, random_keep, token_presence
from fedpersona.privacy import clipping
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.randomness import SecretRandomness
from fedpersona.simulation import default_scenario_path
from tests.conftest import partner_config

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
        ("rows", 50, "rows must be an integer >= 100"),
        ("guess_fraction", 0.6, r"guess_fraction must be in \(0, 0.5\]"),
        ("confidence", 1.0, r"confidence must be in \(0, 1\)"),
        ("gain", 1.0, "gain must be >= 2"),
        ("kind", "retail", "kind must be one of ecommerce, finance, health"),
    ],
)
def test_settings_name_the_valid_range(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AuditSettings(**{field: value})  # type: ignore[arg-type]


def test_pre_registered_guess_counts() -> None:
    assert AuditSettings().guesses_per_side == 100
    assert AuditSettings(canaries=10).guesses_per_side == 1


# --- the canaries and the noise check ----------------------------------------------------------


def test_canary_gradient_is_a_dirac_on_its_own_coordinate_and_ordinary_rows_keep_theirs(tmp_path: Path) -> None:
    data = load_partner_data(partner_config(tmp_path, "finance", rows=60))
    encoder = PersonaEncoder(data.train.layout, ModelSettings(token_dim=16, embed_dim=8, hidden=16, blocks=1))
    model = CanaryModel(encoder, canaries=5, scale=4.0)
    n = len(data.train)
    codes = torch.zeros(n, dtype=torch.int64)
    codes[3] = 2  # row 3 is canary 2
    data.train.tensors["audit_canary"] = codes
    batch = data.train.batch(torch.tensor([3]))
    keep = random_keep(token_presence(data.train.layout, batch), 0.0, torch.Generator().manual_seed(0))
    model(batch, keep).sum().backward()
    grad = model.canary.weight.grad
    assert grad is not None and torch.nonzero(grad[:, 0]).flatten().tolist() == [2]
    assert float(grad[2, 0]) == pytest.approx(4.0)
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in encoder.parameters())
    # An ordinary row: the encoder's own per-sample loss and gradient, none on the canary table.
    model.zero_grad()
    ordinary = data.train.batch(torch.tensor([0]))
    keep = random_keep(token_presence(data.train.layout, ordinary), 0.0, torch.Generator().manual_seed(0))
    loss = model(ordinary, keep)
    assert float(loss.detach()[0]) == pytest.approx(float(encoder(ordinary, keep).detach()[0]))
    loss.sum().backward()
    assert model.canary.weight.grad is not None and float(model.canary.weight.grad.abs().sum()) == 0.0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in encoder.parameters())


def test_noise_ratio_recovers_the_noise_multiplier_of_a_simulated_transcript() -> None:
    rng = np.random.default_rng(0)
    m, steps, q, sigma = 4000, 30, 1 / 3, 1.7
    included = rng.random(m) < 0.5
    sampled = rng.random((steps, m)) < q
    scores = (sampled * included + rng.normal(0.0, sigma, size=(steps, m))).sum(axis=0) / 250.0  # / batch
    estimate, stderr = noise_ratio(scores, included, steps=steps, sample_rate=q)
    assert abs(estimate - sigma) < 4 * stderr and stderr < 0.1 * sigma
    # Five times less noise, or a canary four times above the clip, shows at once.
    weak, _ = noise_ratio(
        (sampled * included + rng.normal(0.0, sigma / 5, size=(steps, m))).sum(axis=0), included, steps=steps,
        sample_rate=q,
    )  # fmt: skip
    assert weak == pytest.approx(sigma / 5, rel=0.15)
    unclipped, _ = noise_ratio(
        (4 * sampled * included + rng.normal(0.0, sigma, size=(steps, m))).sum(axis=0), included, steps=steps,
        sample_rate=q,
    )  # fmt: skip
    assert unclipped == pytest.approx(sigma / 4, rel=0.15)


# --- whole audits through the partner's real round ---------------------------------------------


def _audit(
    *, canaries: int = 300, rows: int = 800, rounds: int = 2, seed: int = 0, mode: str | None = None
) -> AuditResult:
    scenario = load_scenario(default_scenario_path(), epsilon=CLAIM)
    update: dict[str, object] = {"federation": scenario.federation.replace(rounds=rounds)}
    if mode is not None:  # the scenario's clipping mode otherwise
        update["training"] = scenario.training.replace(grad_sample_mode=mode)
    scenario = scenario.model_copy(update=update)
    settings = AuditSettings(canaries=canaries, rows=rows, kind="finance")
    return run_audit(scenario=scenario, settings=settings, rng=np.random.default_rng(seed))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_correct_pipeline_is_consistent(mode: str) -> None:
    result = _audit(mode=mode)
    assert result.findings == () and result.consistent and not result.claim_refuted
    assert result.epsilon_lower_bound <= CLAIM and result.guesses == 60
    assert result.steps_observed == result.steps_ledger > 0
    assert result.epsilon_ledger == pytest.approx(result.epsilon_observed, rel=1e-6)
    assert result.epsilon_ledger <= CLAIM * (1 + 1e-6)
    assert abs(result.noise_multiplier_measured - result.noise_multiplier_planned) <= max(
        4 * result.noise_multiplier_stderr, 0.1 * result.noise_multiplier_planned
    )
    assert not result.replay_identical and result.grad_sample_mode == mode


def _findings(result: AuditResult, topic: str) -> list[str]:
    return [f for f in result.findings if f.startswith(topic + ":")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_mutation_noise_divided_by_five_is_caught(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def weak_noise(optimizer: torch.optim.Optimizer, randomness: SecretRandomness) -> None:
        def add_noise() -> None:
            std = optimizer.noise_multiplier * optimizer.max_grad_norm / 5  # type: ignore[attr-defined]
            for p in optimizer.params:  # type: ignore[attr-defined]
                p.grad = (p.summed_grad + randomness.normal_like(p.summed_grad, std)).view_as(p)

        optimizer.add_noise = add_noise  # type: ignore[attr-defined]

    def weak_secret_noise(
        grads: dict[str, torch.Tensor], *, std: float, randomness: SecretRandomness
    ) -> dict[str, torch.Tensor]:
        return clipping.add_secret_noise(grads, std=std / 5, randomness=randomness)

    monkeypatch.setattr(training, "_secret_noise", weak_noise)  # Opacus' modes
    monkeypatch.setattr(training, "add_secret_noise", weak_secret_noise)  # book-keeping
    result = _audit(mode=mode)
    assert _findings(result, "noise") and not result.consistent
    assert result.noise_multiplier_measured < 0.5 * result.noise_multiplier_planned


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_mutation_clipping_disabled_is_caught(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def no_clipping(self: GradSampleModuleFastGradientClipping) -> torch.Tensor:
        return torch.ones_like(self.get_norm_sample())

    monkeypatch.setattr(GradSampleModuleFastGradientClipping, "get_clipping_coef", no_clipping)  # Opacus' ghost
    monkeypatch.setattr(clipping, "clip_factors", lambda norms, max_grad_norm: torch.ones_like(norms))  # book-keeping
    result = _audit(mode=mode)
    assert _findings(result, "noise") and not result.consistent
    assert result.noise_multiplier_measured < 0.5 * result.noise_multiplier_planned


@pytest.mark.slow
def test_mutation_skipped_charge_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PrivacyLedger, "charge", lambda self, **kwargs: None)
    monkeypatch.setattr(training, "check_accounting", lambda engine, ledger, delta: 0.0)
    result = _audit()
    assert _findings(result, "accounting") and not result.consistent
    assert result.steps_ledger == 0 and result.epsilon_ledger == 0.0 and result.steps_observed > 0


@pytest.mark.slow
def test_mutation_public_seeding_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def public(cls: type[SecretRandomness], noise_seed: int | None, *labels: object) -> SecretRandomness:
        return cls.from_seed(0, *labels)  # the federation seed and what the message says

    monkeypatch.setattr(SecretRandomness, "for_mechanism", classmethod(public))
    result = _audit()
    assert result.replay_identical and _findings(result, "randomness") and not result.consistent


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
        monkeypatch, "--scenario", str(_small_scenario(tmp_path)), "--canaries", "40", "--rows", "200",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / AUDIT_FILE).read_text())
    assert doc["epsilon_claimed"] == 2.0 and doc["canaries"] == 40 and doc["confidence"] == 0.95
    assert doc["kind"] == "finance" and doc["rounds"] == 1
    assert doc["accountant"] == "rdp" and doc["guesses"] == 8 and 0 <= doc["correct"] <= 8
    assert doc["steps_observed"] == doc["steps_ledger"] > 0 and doc["replay_identical"] is False
    assert doc["claim_refuted"] == (doc["epsilon_lower_bound"] > 2.0)
    assert doc["consistent"] == (not doc["findings"] and not doc["claim_refuted"])
    assert sorted(p.name for p in out.iterdir()) == [AUDIT_FILE]


@pytest.mark.parametrize(
    "args",
    [
        ["--canaries", "3"],
        ["--canaries", "many"],
        ["--rows", "10"],
        ["--rows", "half"],
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
