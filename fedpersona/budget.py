"""What a partner's budget looks like before and after a run: the two privacy views.

``fedpersona privacy plan`` shows :func:`plan_table`: the noise, the sample rate and the
epsilon after each round (and after the persona-clustering reserve) of the plan the one
planner (:func:`fedpersona.privacy.planner.make_plan`) makes, or has fixed, for a scenario's
silos or a partner. ``fedpersona privacy ledger`` shows :func:`ledger_table`: every entry of a
partner's ledger, what it has spent, and what is left of the budget of its fixed plan.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedpersona.config.files import load_partner_config, load_plan, load_scenario, read_toml
from fedpersona.config.settings import FederationSettings, PrivacyPlan, PrivacySettings, SiloGroup, TrainingSettings
from fedpersona.errors import ConfigError
from fedpersona.privacy.accounting import compute_epsilon
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.planner import epsilon_schedule, make_plan, sgd_clip

__all__ = ["ledger_table", "plan_table"]

Lines = list[list[str]]


def _block(title: str, plan: PrivacyPlan) -> tuple[str, Lines]:
    eps = epsilon_schedule(plan)
    sigma = plan.noise_multiplier
    head = (
        f"{title}: {plan.public_rows} training rows (declared), delta {plan.delta:g}, target epsilon "
        f"{plan.target_epsilon:g}, accountant {plan.accountant}, noise multiplier "
        + (f"{sigma:.4f}" if sigma is not None else "none (NOT PRIVATE)")
        + f", sample rate {plan.sample_rate:.5f}, {plan.steps_per_round} steps/round"
        + (f", clip {sgd_clip(plan):.3g} (max_grad_norm {plan.max_grad_norm:g})" if plan.private else "")
    )
    if plan.private and plan.delta >= 1.0 / plan.public_rows:
        head += f"  WARNING: delta >= 1/n ({1.0 / plan.public_rows:.2g}): the guarantee is weak"
    lines: Lines = [["round", "epsilon this round", "cumulative epsilon"]]
    prev = 0.0
    for r, e in enumerate(eps, start=1):
        clustering = plan.persona_releases and r == len(eps)
        label = f"personas ({plan.persona_releases} releases)" if clustering else str(r)
        finite = math.isfinite(e)
        lines.append([label, f"{e - prev:.4f}" if finite else "inf", f"{e:.4f}" if finite else "inf"])
        prev = e
    if plan.persona_releases and plan.private and len(eps) >= 2 and math.isfinite(eps[-1]):
        head += (
            f"; personas: {100 * plan.persona_share:.0f}% of the budget (one Gram release at noise "
            f"{plan.gram_noise:.3f}, {plan.persona_releases - 1} EM steps at noise {plan.em_noise:.3f}; "
            f"{100 * (eps[-1] - eps[-2]) / eps[-1]:.0f}% of the final epsilon is spent after the last round)"
        )
    return head, lines


def plan_table(
    path: str | Path,
    *,
    rounds: int | None,
    rows: int | None,
    persona_releases: int | None = None,
    persona_share: float | None = None,
    training: TrainingSettings | None = None,
) -> list[tuple[str, Lines]]:
    """One table per silo group (scenario) or for the partner (client.toml).

    A scenario's ``[federation]`` says whether there are personas (and their share of the
    budget); for a partner's client.toml the federation announces it (default: fedpersona's
    federation defaults), so the caller passes it here,
    with the federation's ``training`` settings (default: fedpersona's defaults). A partner
    whose plan is already fixed (``state/plan.json``) is shown that plan.
    """
    doc = read_toml(path)
    if "silos" in doc:
        scenario = load_scenario(path, rounds=rounds)
        out = []
        for group in scenario.silos:
            n = rows or _group_rows(group, scenario.simulation.test_fraction)
            plan = make_plan(
                privacy=scenario.privacy.replace(**(group.privacy or {})), training=scenario.training, public_rows=n,
                rounds=scenario.federation.rounds, persona_releases=scenario.federation.persona_releases,
                persona_share=scenario.federation.persona_share,
            )  # fmt: skip
            out.append(_block(f"silo {group.name} (per partner, about)", plan))
        return out
    if "partner" in doc:
        cfg = load_partner_config(path)
        fixed = load_plan(cfg.state_dir)
        if fixed is not None:
            return [_block(f"partner {cfg.name} (plan fixed in {Path(cfg.state_dir) / 'plan.json'})", fixed)]
        declared = rows or cfg.declared_rows()
        if declared is None:
            from fedpersona.federation.partner import load_partner_data, public_rows_of

            declared = public_rows_of(cfg, load_partner_data(cfg))
        if rounds is None and cfg.privacy.planned_rounds is None:
            raise ConfigError(f"{path}: give --rounds, the number of rounds the federation plans")
        fed = FederationSettings()
        plan = make_plan(
            privacy=cfg.privacy, training=training or TrainingSettings(), public_rows=declared, rounds=rounds or 1,
            persona_releases=fed.persona_releases if persona_releases is None else persona_releases,
            persona_share=fed.persona_share if persona_share is None else persona_share,
        )  # fmt: skip
        return [_block(f"partner {cfg.name}", plan)]
    raise ConfigError(f"{path}: neither a scenario ([[silos]]) nor a partner config ([partner])")


def _group_rows(group: object, test_fraction: float) -> int:
    """A silo group's rows per partner, about (the declared count the simulation gives them)."""

    assert isinstance(group, SiloGroup)
    if group.source == "synthetic":
        return max(2, round((group.rows or 0) // group.partners * (1 - test_fraction)))
    from fedpersona.data.schema_reader import load_schema
    from fedpersona.data.tables import load_table

    if group.schema_path is None:
        raise ConfigError(f"silo '{group.name}': a file source needs a schema")
    total = len(load_table(load_schema(group.schema_path), group.source))
    return max(2, round(total * (1 - test_fraction) / group.partners))


def ledger_table(state_dir: str | Path) -> tuple[str, Lines]:
    """Every ledger entry with its cumulative epsilon, and the budget left (the budget of the
    partner's fixed plan, its one source of truth)."""
    state_dir = Path(state_dir)
    if not (state_dir / PrivacyLedger.FILE).exists():
        raise ConfigError(f"{state_dir} holds no privacy ledger ({PrivacyLedger.FILE})")
    plan = load_plan(state_dir)
    settings = (
        PrivacySettings(
            target_epsilon=plan.target_epsilon,
            delta=plan.delta,
            max_grad_norm=plan.max_grad_norm,
            accountant=plan.accountant,
        )
        if plan is not None
        else PrivacySettings()
    )
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
