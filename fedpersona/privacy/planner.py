"""Views for ``fedpersona privacy plan`` and ``fedpersona privacy ledger``.

The plan is computed exactly as a partner computes it at its first round
(:func:`fedpersona.federation.partner.load_plan`): the same sample rate, steps and noise planner, so
the plan printed before a run is the plan the run follows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedpersona.config.legacy import load_partner_config, load_scenario, read_toml
from fedpersona.errors import ConfigError
from fedpersona.model.training import TrainingSettings
from fedpersona.personas.clustering import plan_with_reserve
from fedpersona.privacy.accounting import (
    PrivacyLedger,
    PrivacySettings,
    compute_epsilon,
    plan_noise,
    sample_rate_for,
)

__all__ = ["ledger_table", "plan_rows", "plan_table"]

Lines = list[list[str]]


def plan_rows(
    *,
    rows: int,
    privacy: PrivacySettings,
    training: TrainingSettings,
    rounds: int,
    kmeans_rounds: int = 0,
    kmeans_noise: float = 10.0,
) -> tuple[float | None, float, int, list[float]]:
    """``(noise, sample_rate, steps_per_round, cumulative epsilon after each round)``.

    With ``kmeans_rounds`` the list has one more entry: the epsilon after persona clustering,
    whose reserve the DP-SGD noise is planned around (as :func:`fedpersona.federation.partner.load_plan`).
    """
    q = sample_rate_for(rows, training.batch_size)
    steps = training.steps_per_round(rows)
    if not privacy.private:
        return None, q, steps, [math.inf] * (rounds + (1 if kmeans_rounds else 0))
    planned = min(rounds, privacy.planned_rounds or rounds)  # rounds past it are refused
    if kmeans_rounds:
        sigma = plan_with_reserve(
            target_epsilon=privacy.target_epsilon, delta=privacy.delta, sgd_sample_rate=q,
            sgd_steps=steps * planned, kmeans_rounds=kmeans_rounds, kmeans_noise=kmeans_noise,
            accountant=privacy.accountant,
        )  # fmt: skip
    else:
        sigma = plan_noise(
            target_epsilon=privacy.target_epsilon, delta=privacy.delta, sample_rate=q,
            steps=steps * planned, accountant=privacy.accountant,
        )  # fmt: skip
    eps = [
        compute_epsilon([(sigma, q, steps * r)], delta=privacy.delta, accountant=privacy.accountant)
        for r in range(1, planned + 1)
    ]
    if kmeans_rounds:
        history = [(sigma, q, steps * planned), (kmeans_noise, 1.0, kmeans_rounds)]
        eps.append(compute_epsilon(history, delta=privacy.delta, accountant=privacy.accountant))
    return sigma, q, steps, eps


def _block(
    title: str,
    rows: int,
    privacy: PrivacySettings,
    training: TrainingSettings,
    rounds: int,
    kmeans_rounds: int = 0,
    kmeans_noise: float = 10.0,
) -> tuple[str, Lines]:
    sigma, q, steps, eps = plan_rows(
        rows=rows, privacy=privacy, training=training, rounds=rounds,
        kmeans_rounds=kmeans_rounds, kmeans_noise=kmeans_noise,
    )  # fmt: skip
    head = (
        f"{title}: {rows} training rows, delta {privacy.delta:g}, target epsilon "
        f"{privacy.target_epsilon:g}, accountant {privacy.accountant}, noise multiplier "
        + (f"{sigma:.4f}" if sigma is not None else "none (NOT PRIVATE)")
        + f", sample rate {q:.5f}, {steps} steps/round"
    )
    if privacy.private and privacy.delta >= 1.0 / rows:
        head += f"  WARNING: delta >= 1/n ({1.0 / rows:.2g}): the guarantee is weak"
    lines: Lines = [["round", "epsilon this round", "cumulative epsilon"]]
    prev = 0.0
    for r, e in enumerate(eps, start=1):
        label = str(r) if not kmeans_rounds or r < len(eps) else f"personas ({kmeans_rounds} DP k-means rounds)"
        lines.append(
            [
                label,
                f"{e - prev:.4f}" if math.isfinite(e) else "inf",
                f"{e:.4f}" if math.isfinite(e) else "inf",
            ]
        )
        prev = e
    if kmeans_rounds and privacy.private and len(eps) >= 2 and math.isfinite(eps[-1]):
        head += (
            f"; {100 * (eps[-1] - eps[-2]) / eps[-1]:.0f}% of the final epsilon is reserved for persona "
            f"clustering (noise {kmeans_noise:g})"
        )
    return head, lines


def plan_table(
    path: str | Path,
    *,
    rounds: int | None,
    rows: int | None,
    kmeans_rounds: int | None = None,
    kmeans_noise: float | None = None,
) -> list[tuple[str, Lines]]:
    """One table per partner kind (scenario) or for the partner (client.toml).

    A scenario's ``[federation]`` says whether personas are clustered (and with what noise);
    for a partner's client.toml the federation announces it, so the caller passes it here.
    """
    doc = read_toml(path)
    out = []
    if "silos" in doc:
        scenario = load_scenario(path, rounds=rounds)
        for group in scenario.silos:
            if rows is not None:
                n = rows
            elif group.source == "synthetic":
                n = int((group.rows or 0) // group.partners * (1 - scenario.simulation.test_fraction))
            else:
                from fedpersona.data.schema import load_schema
                from fedpersona.data.tables import load_table

                assert group.schema is not None
                total = len(load_table(load_schema(group.schema), group.source))
                n = int(total * (1 - scenario.simulation.test_fraction) / group.partners)
            out.append(
                _block(
                    f"silo {group.name} (per partner, about)",
                    n,
                    scenario.privacy,
                    scenario.training,
                    scenario.federation.rounds,
                    scenario.federation.kmeans_releases,
                    scenario.federation.kmeans_noise,
                )
            )
        return out
    if "partner" in doc:
        cfg = load_partner_config(path)
        if rows is None:
            rows = cfg.declared_rows()
        if rows is None:
            from fedpersona.federation.partner import load_partner_data, public_rows_of

            rows = public_rows_of(cfg, load_partner_data(cfg))
        if rounds is None:
            raise ConfigError(f"{path}: give --rounds, the number of rounds the federation plans")
        out.append(
            _block(
                f"partner {cfg.name}",
                rows,
                cfg.privacy,
                TrainingSettings(),
                rounds,
                kmeans_rounds or 0,
                kmeans_noise or 10.0,
            )
        )
        return out
    raise ConfigError(f"{path}: neither a scenario ([[silos]]) nor a partner config ([partner])")


def ledger_table(state_dir: str | Path) -> tuple[str, Lines]:
    """Every ledger entry with its cumulative epsilon, and the budget left."""
    state_dir = Path(state_dir)
    plan_path = state_dir / "plan.json"
    if not (state_dir / PrivacyLedger.FILE).exists():
        raise ConfigError(f"{state_dir} holds no privacy ledger ({PrivacyLedger.FILE})")
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        settings = PrivacySettings(
            target_epsilon=plan["target_epsilon"], delta=plan["delta"],
            max_grad_norm=plan["max_grad_norm"], accountant=plan["accountant"],
        )  # fmt: skip
    else:
        settings = PrivacySettings()
    ledger = PrivacyLedger(state_dir, settings=settings)
    lines: Lines = [["#", "round", "mechanism", "noise", "sample rate", "steps", "cumulative epsilon"]]
    for e in ledger.entries:
        lines.append(
            [
                str(e.seq),
                str(e.round),
                e.mechanism,
                f"{e.noise_multiplier:.4f}",
                f"{e.sample_rate:.5f}",
                str(e.steps),
                f"{e.epsilon_after:.4f}",
            ]
        )
    spent = ledger.epsilon()
    by_mechanism = {}
    for mechanism in dict.fromkeys(e.mechanism for e in ledger.entries):
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries if e.mechanism == mechanism]
        by_mechanism[mechanism] = compute_epsilon(history, delta=settings.delta, accountant=settings.accountant)
    alone = ", ".join(f"{m} alone {eps:.4f}" for m, eps in by_mechanism.items())
    title = (
        f"{state_dir}: spent epsilon {spent:.4f} of {settings.target_epsilon:g} "
        f"(delta {settings.delta:g}, {settings.accountant}); remaining {max(0.0, settings.target_epsilon - spent):.4f}"
        + (f"; by mechanism (composed, not additive): {alone}" if alone else "")
    )
    return title, lines
