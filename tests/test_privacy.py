"""Planning, ledger and accounting: numbers against independent references."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, pld

from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings
from fedpersona.errors import ConfigError, PrivacyBudgetExceeded, PrivacyLedgerError
from fedpersona.federation.partner import build_model, load_partner_data, load_plan
from fedpersona.model.training import train_locally
from fedpersona.privacy.accounting import compute_epsilon
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.planner import plan_noise
from fedpersona.privacy.randomness import SecretRandomness

from .conftest import partner_config


def pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = pld.PLDAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 1000), (0.8, 256 / 60000, 3000), (2.0, 0.01, 100)])
def test_prv_epsilon_matches_google_pld(sigma: float, q: float, steps: int) -> None:
    ours = compute_epsilon([(sigma, q, steps)], delta=1e-5, accountant="prv")
    ref = pld_epsilon(sigma, q, steps, 1e-5)
    assert ours >= ref * (1 - 1e-3)
    # Opacus' PRV accountant has an absolute epsilon error of 0.01 (its eps_error default),
    # which dominates the relative error at very small epsilon.
    assert ours <= ref * 1.05 + 0.01


def test_rdp_is_an_upper_bound_of_pld() -> None:
    ours = compute_epsilon([(1.1, 0.01, 1000)], delta=1e-5, accountant="rdp")
    assert ours >= pld_epsilon(1.1, 0.01, 1000, 1e-5)


def test_planned_noise_never_overshoots_and_is_tight() -> None:
    for target in (0.5, 3.0, 8.0):
        sigma = plan_noise(target_epsilon=target, delta=1e-5, sample_rate=0.02, steps=500, accountant="prv")
        reached = compute_epsilon([(sigma, 0.02, 500)], delta=1e-5, accountant="prv")
        assert reached <= target
        assert reached >= 0.97 * target


def test_history_of_rounds_equals_one_accountant_over_all_steps() -> None:
    rounds = [(1.0, 0.05, 40)] * 5
    assert compute_epsilon(rounds, delta=1e-5, accountant="prv") == pytest.approx(
        pld_epsilon(1.0, 0.05, 200, 1e-5), rel=0.05
    )
    assert compute_epsilon(rounds, delta=1e-5, accountant="prv") == pytest.approx(
        compute_epsilon([(1.0, 0.05, 200)], delta=1e-5, accountant="prv"), rel=1e-9
    )


def test_gdp_accountant_is_refused() -> None:
    with pytest.raises(ConfigError, match="gdp"):
        PrivacySettings.checked(accountant="gdp")
    with pytest.raises(ConfigError, match=re.escape("privacy.target_epsilon: must be > 0, got -1")):
        PrivacySettings.checked(target_epsilon=-1)


def test_ledger_refuses_before_writing_and_detects_tampering(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, settings=PrivacySettings(target_epsilon=1.0))
    ledger.charge(round=1, mechanism="dp-sgd", noise_multiplier=2.0, sample_rate=0.01, steps=100)
    before = ledger.path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match="above the target 1"):
        ledger.charge(round=2, mechanism="dp-sgd", noise_multiplier=0.5, sample_rate=0.5, steps=100)
    assert ledger.path.read_bytes() == before
    reread = PrivacyLedger(tmp_path, settings=PrivacySettings(target_epsilon=1.0))
    assert reread.epsilon() == pytest.approx(ledger.epsilon())
    lines = before.decode().splitlines()
    entry = json.loads(lines[0])
    entry["steps"] = 1  # an attempt to under-report
    ledger.path.write_text(json.dumps(entry) + "\n")
    with pytest.raises(PrivacyLedgerError, match="hash chain"):
        PrivacyLedger(tmp_path, settings=PrivacySettings(target_epsilon=1.0))


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, settings=PrivacySettings())
    ledger.charge(round=1, mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=0.01, steps=10)
    with ledger.path.open("ab") as handle:
        handle.write(b'{"seq": 2, "time"')
    assert len(PrivacyLedger(tmp_path, settings=PrivacySettings()).entries) == 1


def test_cumulative_epsilon_over_rounds_equals_one_accountant(tmp_path: Path) -> None:
    """Three real DP-SGD rounds: the reported epsilon is cumulative, and equals the plan."""
    cfg = partner_config(tmp_path, "health", rows=300, epsilon=2.0)
    data = load_partner_data(cfg)
    training = TrainingSettings(batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)
    plan = load_plan(cfg, data, training, rounds=3)
    model = build_model(
        data,
        ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1),
        seed=0,
        device=torch.device("cpu"),
    )
    ledger = PrivacyLedger(cfg.state_dir, settings=cfg.privacy)
    gen = SecretRandomness.from_seed(0)
    reported = []
    for rnd in (1, 2, 3):
        result = train_locally(
            model=model,
            data=data.train,
            settings=training,
            privacy=cfg.privacy,
            noise_multiplier=plan.noise_multiplier,
            ledger=ledger,
            round=rnd,
            randomness=gen,
            public_rows=plan.public_rows,
        )
        reported.append(result.epsilon)
    assert reported[0] < reported[1] < reported[2]
    total_steps = 3 * plan.steps_per_round
    one = compute_epsilon([(plan.noise_multiplier, plan.sample_rate, total_steps)], delta=1e-5, accountant="prv")
    assert reported[2] == pytest.approx(one, rel=1e-9)
    assert reported[2] <= 2.0
    assert reported[2] == pytest.approx(
        pld_epsilon(plan.noise_multiplier, plan.sample_rate, total_steps, 1e-5), rel=0.05
    )
    with pytest.raises(PrivacyBudgetExceeded):
        train_locally(
            model=model,
            data=data.train,
            settings=training,
            privacy=cfg.privacy,
            noise_multiplier=plan.noise_multiplier,
            ledger=ledger,
            round=4,
            randomness=gen,
            public_rows=plan.public_rows,
        )
    assert len(PrivacyLedger(cfg.state_dir, settings=cfg.privacy).entries) == 3
    assert math.isfinite(reported[2])


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_an_empty_poisson_batch_still_takes_its_noisy_step(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipping an empty batch would release something other than the accounted mechanism."""
    real_sample = SecretRandomness.poisson_sample
    draws = {"n": 0}

    def sample(self: SecretRandomness, n: int, q: float) -> np.ndarray:
        out = real_sample(self, n, q)
        draws["n"] += 1
        return out[:0] if draws["n"] == 2 else out  # nobody sampled in the second step

    cfg = partner_config(tmp_path, "health", rows=300, epsilon=2.0)
    data = load_partner_data(cfg)
    training_settings = TrainingSettings(
        batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01, grad_sample_mode=mode
    )
    plan = load_plan(cfg, data, training_settings, rounds=2)
    model = build_model(
        data,
        ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1),
        seed=0,
        device=torch.device("cpu"),
    )
    ledger = PrivacyLedger(cfg.state_dir, settings=cfg.privacy)
    monkeypatch.setattr(SecretRandomness, "poisson_sample", sample)
    result = train_locally(
        model=model, data=data.train, settings=training_settings, privacy=cfg.privacy,
        noise_multiplier=plan.noise_multiplier, ledger=ledger, round=1, randomness=SecretRandomness.from_seed(0),
        public_rows=plan.public_rows,
    )  # fmt: skip
    assert draws["n"] == plan.steps_per_round
    expected = compute_epsilon(
        [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], delta=1e-5, accountant="prv"
    )
    assert result.epsilon == pytest.approx(expected, rel=1e-9)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_round_accounting_compares_histories_and_reads_the_ledgers_epsilon(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fedpersona.model.training import check_accounting

    ledger = PrivacyLedger(tmp_path / "state", settings=PrivacySettings(target_epsilon=3.0))
    entry = ledger.charge(round=1, mechanism="dp-sgd", noise_multiplier=1.5, sample_rate=0.1, steps=20)
    engine = SimpleNamespace(accountant=SimpleNamespace(history=[(1.5, 0.1, 12), (1.5, 0.1, 8)]))
    assert check_accounting(engine, ledger, 1e-5) == entry.epsilon_after  # type: ignore[arg-type]
    engine.accountant.history.append((1.5, 0.1, 1))  # one step nobody paid for
    with pytest.raises(RuntimeError, match="did not charge"):
        check_accounting(engine, ledger, 1e-5)  # type: ignore[arg-type]


def _adam_gradients(steps: list[dict[str, torch.Tensor]], names: dict[int, str]) -> Callable[..., None]:
    """An optimizer pre-step hook that records the gradients each Adam step is about to apply."""

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if isinstance(optimizer, torch.optim.Adam):
            steps.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})

    return record


def test_bookkeeping_round_applies_the_same_gradients_as_opacus_ghost_clipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default per-sample clipping against Opacus' ghost clipping through the whole round:
    same Poisson batches and feature masks (same stream), noise switched off in both, so the
    gradient each mode hands to Adam is the clipped sum over the expected batch size. They
    agree within float32 rounding plus Opacus' clip factor C / (norm + 1e-6) (measured 6e-7
    relative; 1e-5 allowed, 1e-8 absolute for the softmax-invariant score bias, ~1e-10);
    the accountant records the same steps (same epsilon)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fedpersona.model import training

    monkeypatch.setattr(training, "add_secret_noise", lambda grads, *, std, randomness: grads)

    def no_noise(optimizer: torch.optim.Optimizer, randomness: SecretRandomness) -> None:
        def add_noise() -> None:
            for p in optimizer.params:  # type: ignore[attr-defined]
                p.grad = p.summed_grad.view_as(p)

        optimizer.add_noise = add_noise  # type: ignore[attr-defined]

    monkeypatch.setattr(training, "_secret_noise", no_noise)
    seen: dict[str, list[dict[str, torch.Tensor]]] = {}
    epsilons = {}
    cfg = partner_config(tmp_path, "ecommerce", rows=300, epsilon=3.0)
    data = load_partner_data(cfg)
    plan = load_plan(
        cfg, data, TrainingSettings(batch_size=64, local_epochs=1, sample_rate=None), rounds=1
    )  # one plan for both
    for mode in ("bookkeeping", "ghost"):
        settings = TrainingSettings(
            batch_size=64, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01, grad_sample_mode=mode
        )
        model = build_model(data, ModelSettings(architecture="encoder"), seed=0, device=torch.device("cpu"))
        names = {id(p): n for n, p in model.named_parameters()}
        steps = seen[mode] = []

        handle = register_optimizer_step_pre_hook(_adam_gradients(steps, names))
        try:
            result = train_locally(
                model=model, data=data.train, settings=settings, privacy=cfg.privacy,
                noise_multiplier=plan.noise_multiplier, ledger=PrivacyLedger(tmp_path / mode, settings=cfg.privacy),
                round=1, randomness=SecretRandomness.from_seed(0), public_rows=plan.public_rows,
            )  # fmt: skip
        finally:
            handle.remove()
        epsilons[mode] = result.epsilon
        assert len(steps) == plan.steps_per_round
    first, reference = seen["bookkeeping"][0], seen["ghost"][0]
    assert set(first) == set(reference) == {n for n, _ in model.named_parameters()}
    for name, value in reference.items():
        torch.testing.assert_close(first[name], value, rtol=1e-5, atol=1e-8, msg=name)
    assert epsilons["bookkeeping"] == epsilons["ghost"]
