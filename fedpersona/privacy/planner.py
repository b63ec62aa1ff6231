"""The one privacy planner: the plan a user reads is the plan that runs.

A partner's plan (:class:`~fedpersona.config.settings.PrivacyPlan`, kept in
``state/plan.json``) is a function of public inputs only: its budget (``[privacy]``), its
declared row count (``data.public_rows``), the federation's training settings and rounds, and
the persona-clustering releases the federation announces. :func:`make_plan` computes it;
the partner (:func:`fedpersona.federation.partner.load_plan`), ``fedpersona privacy plan``,
``fedpersona partner check``, the audit and the benchmarks all call it, so a plan printed
before a run is the plan the run fixes (``tests/test_privacy.py`` checks the two are equal).

- ``rounds``: ``privacy.planned_rounds`` when the partner commits to a number of rounds (it
  then refuses any round past them), else the federation's rounds.
- ``sample_rate = 1 / ceil(public_rows / batch_size)``, ``steps_per_round = local_epochs *
  round(1 / sample_rate)``.
- the DP-SGD noise multiplier: the smallest that keeps the composition of all DP-SGD steps
  and the reserved clustering releases within ``target_epsilon`` (:func:`plan_with_reserve`;
  :func:`plan_noise` without clustering). Both re-check their answer with the accountant the
  ledger will use, so a plan never overshoots.

:func:`epsilon_schedule` gives the cumulative epsilon after each round (and after the
clustering reserve); :func:`plan_table` and :func:`ledger_table` are the two CLI views.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from opacus.accountants.utils import get_noise_multiplier

from fedpersona.config.files import load_partner_config, load_plan, load_scenario, read_toml
from fedpersona.config.settings import ACCOUNTANTS, PrivacyPlan, PrivacySettings, TrainingSettings, sample_rate_for
from fedpersona.errors import ConfigError
from fedpersona.privacy.accounting import compute_epsilon, rdp_order_notice_silenced
from fedpersona.privacy.ledger import PrivacyLedger

__all__ = [
    "epsilon_schedule",
    "ledger_table",
    "make_plan",
    "plan_noise",
    "plan_table",
    "plan_with_reserve",
    "reserve_share",
]

logger = logging.getLogger(__name__)

Lines = list[list[str]]


def make_plan(
    *,
    privacy: PrivacySettings,
    training: TrainingSettings,
    public_rows: int,
    rounds: int,
    kmeans_rounds: int = 0,
    kmeans_noise: float | None = None,
) -> PrivacyPlan:
    """The partner's plan from its public inputs (see the module docstring)."""
    rounds = privacy.planned_rounds or rounds
    q = sample_rate_for(public_rows, training.batch_size)
    steps = training.steps_per_round(public_rows)
    sigma: float | None = None
    reserve = kmeans_rounds if kmeans_noise else 0
    if privacy.private and reserve:
        assert kmeans_noise is not None
        sigma = plan_with_reserve(
            target_epsilon=privacy.target_epsilon, delta=privacy.delta, sgd_sample_rate=q, sgd_steps=steps * rounds,
            kmeans_rounds=reserve, kmeans_noise=kmeans_noise, accountant=privacy.accountant,
        )  # fmt: skip
    elif privacy.private:
        sigma = plan_noise(
            target_epsilon=privacy.target_epsilon, delta=privacy.delta, sample_rate=q,
            steps=steps * rounds, accountant=privacy.accountant,
        )  # fmt: skip
    return PrivacyPlan(
        private=privacy.private,
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=steps,
        planned_rounds=rounds,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        accountant=privacy.accountant,
        max_grad_norm=privacy.max_grad_norm,
        kmeans_rounds=reserve,
        kmeans_noise=kmeans_noise if reserve else None,
        public_rows=public_rows,
        noise_seeded=privacy.noise_seed is not None,
        batch_size=training.batch_size,
        local_epochs=training.local_epochs,
    )


def epsilon_schedule(plan: PrivacyPlan) -> list[float]:
    """Cumulative epsilon after each planned round, then (with a clustering reserve) after it."""
    extra = 1 if plan.kmeans_rounds else 0
    if not plan.private or plan.noise_multiplier is None:
        return [math.inf] * (plan.planned_rounds + extra)
    sgd = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    out = [
        compute_epsilon([(sgd[0], sgd[1], sgd[2] * r)], delta=plan.delta, accountant=plan.accountant)
        for r in range(1, plan.planned_rounds + 1)
    ]
    if extra:
        assert plan.kmeans_noise is not None
        history = [(sgd[0], sgd[1], sgd[2] * plan.planned_rounds), (plan.kmeans_noise, 1.0, plan.kmeans_rounds)]
        out.append(compute_epsilon(history, delta=plan.delta, accountant=plan.accountant))
    return out


def plan_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps stays <= the target."""
    if steps < 1:
        raise ConfigError(f"the plan needs at least one step, got {steps}")
    with rdp_order_notice_silenced():
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )
    # Independent re-check with the same accountant: the plan must never overshoot.
    reached = compute_epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    while reached > target_epsilon:
        sigma *= 1.001
        reached = compute_epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    return sigma


def plan_with_reserve(
    *,
    target_epsilon: float,
    delta: float,
    sgd_sample_rate: float,
    sgd_steps: int,
    kmeans_rounds: int,
    kmeans_noise: float,
    accountant: str,
    rtol: float = 1e-3,
) -> float:
    """DP-SGD noise multiplier such that DP-SGD plus the clustering stays within the target.

    The composition is ``sgd_steps`` Poisson-subsampled Gaussian steps at ``sgd_sample_rate``
    and ``kmeans_rounds`` Gaussian releases of noise multiplier ``kmeans_noise`` (q = 1),
    accounted with :func:`~fedpersona.privacy.accounting.compute_epsilon`, exactly as the
    ledger will account them. A geometric bisection narrows the noise to within ``rtol``
    (relative) and returns the upper end, whose epsilon was checked to be <= the target (in
    both orders of composition, which the ledger may record either way): the plan never
    overshoots. Raises :class:`~fedpersona.errors.ConfigError` when the clustering alone
    already reaches the target.
    """
    _check_plan_args(target_epsilon, delta, sgd_sample_rate, sgd_steps, kmeans_rounds, kmeans_noise, accountant)
    if not 0 < rtol < 0.1:
        raise ConfigError(f"rtol must be in (0, 0.1), got {rtol!r}")
    clustering = [(float(kmeans_noise), 1.0, int(kmeans_rounds))] if kmeans_rounds else []
    reserved = compute_epsilon(clustering, delta=delta, accountant=accountant)
    if reserved >= target_epsilon:
        raise ConfigError(
            f"{kmeans_rounds} clustering round(s) with noise multiplier {kmeans_noise:g} alone spend epsilon "
            f"{reserved:.4f}, not below the target {target_epsilon:g}: raise privacy.target_epsilon, the "
            "clustering noise, or lower the number of clustering rounds"
        )

    def epsilon(sigma: float) -> float:
        return compute_epsilon(
            [(sigma, float(sgd_sample_rate), int(sgd_steps)), *clustering], delta=delta, accountant=accountant
        )

    lo, hi = 0.0, 1.0
    while epsilon(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e4:
            raise ConfigError(f"no DP-SGD noise multiplier up to 1e4 keeps epsilon within {target_epsilon:g}")
    if lo == 0.0:  # 1.0 was already enough: search downwards for an over-budget lower end
        lo = hi / 2.0
        while lo > 0.05 and epsilon(lo) <= target_epsilon:
            lo, hi = lo / 2.0, lo
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        if epsilon(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    reversed_history = [*clustering, (hi, float(sgd_sample_rate), int(sgd_steps))]
    while max(epsilon(hi), compute_epsilon(reversed_history, delta=delta, accountant=accountant)) > target_epsilon:
        hi *= 1.001  # the two orders of composition differ in the last digits
        reversed_history[-1] = (hi, float(sgd_sample_rate), int(sgd_steps))
    logger.info(
        "planned DP-SGD noise %.4f with %d clustering round(s) at noise %g reserved (epsilon %.4f of %g)",
        hi, kmeans_rounds, kmeans_noise, reserved, target_epsilon,
    )  # fmt: skip
    return hi


def reserve_share(
    *,
    noise_multiplier: float,
    delta: float,
    sgd_sample_rate: float,
    sgd_steps: int,
    kmeans_rounds: int,
    kmeans_noise: float,
    accountant: str,
) -> float:
    """The share of the total epsilon that the clustering accounts for, in [0, 1).

    Epsilons do not add up under composition, so the share is marginal: ``1 - eps(DP-SGD
    alone) / eps(DP-SGD + clustering)``, both at the DP-SGD ``noise_multiplier`` (e.g. the one
    :func:`plan_with_reserve` returned), i.e. the part of the budget dropping the clustering
    would give back.
    """
    _check_plan_args(math.inf, delta, sgd_sample_rate, sgd_steps, kmeans_rounds, kmeans_noise, accountant)
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    sgd = [(float(noise_multiplier), float(sgd_sample_rate), int(sgd_steps))]
    clustering = [(float(kmeans_noise), 1.0, int(kmeans_rounds))] if kmeans_rounds else []
    alone = compute_epsilon(sgd, delta=delta, accountant=accountant)
    total = compute_epsilon(sgd + clustering, delta=delta, accountant=accountant)
    return min(max(1.0 - alone / total, 0.0), 1.0) if total > 0 else 0.0


def _check_plan_args(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kmeans_rounds: int,
    kmeans_noise: float,
    accountant: str,
) -> None:
    problems = []
    if not (isinstance(target_epsilon, int | float) and target_epsilon > 0):
        problems.append(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        problems.append(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        problems.append(f"sgd_sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        problems.append(f"sgd_steps must be an integer >= 1, got {steps!r}")
    if isinstance(kmeans_rounds, bool) or not isinstance(kmeans_rounds, int) or kmeans_rounds < 0:
        problems.append(f"kmeans_rounds must be an integer >= 0, got {kmeans_rounds!r}")
    if not (isinstance(kmeans_noise, int | float) and math.isfinite(kmeans_noise) and kmeans_noise > 0):
        problems.append(f"kmeans_noise must be a finite number > 0, got {kmeans_noise!r}")
    if accountant not in ACCOUNTANTS:
        problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if problems:
        raise ConfigError("cannot plan the privacy budget: " + "; ".join(problems))


# --- the two CLI views --------------------------------------------------------------------------


def _block(title: str, plan: PrivacyPlan) -> tuple[str, Lines]:
    eps = epsilon_schedule(plan)
    sigma = plan.noise_multiplier
    head = (
        f"{title}: {plan.public_rows} training rows (declared), delta {plan.delta:g}, target epsilon "
        f"{plan.target_epsilon:g}, accountant {plan.accountant}, noise multiplier "
        + (f"{sigma:.4f}" if sigma is not None else "none (NOT PRIVATE)")
        + f", sample rate {plan.sample_rate:.5f}, {plan.steps_per_round} steps/round"
    )
    if plan.private and plan.delta >= 1.0 / plan.public_rows:
        head += f"  WARNING: delta >= 1/n ({1.0 / plan.public_rows:.2g}): the guarantee is weak"
    lines: Lines = [["round", "epsilon this round", "cumulative epsilon"]]
    prev = 0.0
    for r, e in enumerate(eps, start=1):
        clustering = plan.kmeans_rounds and r == len(eps)
        label = f"personas ({plan.kmeans_rounds} DP k-means rounds)" if clustering else str(r)
        finite = math.isfinite(e)
        lines.append([label, f"{e - prev:.4f}" if finite else "inf", f"{e:.4f}" if finite else "inf"])
        prev = e
    if plan.kmeans_rounds and plan.private and len(eps) >= 2 and math.isfinite(eps[-1]):
        head += (
            f"; {100 * (eps[-1] - eps[-2]) / eps[-1]:.0f}% of the final epsilon is reserved for persona "
            f"clustering (noise {plan.kmeans_noise:g})"
        )
    return head, lines


def plan_table(
    path: str | Path,
    *,
    rounds: int | None,
    rows: int | None,
    kmeans_rounds: int | None = None,
    kmeans_noise: float | None = None,
    training: TrainingSettings | None = None,
) -> list[tuple[str, Lines]]:
    """One table per silo group (scenario) or for the partner (client.toml).

    A scenario's ``[federation]`` says whether personas are clustered (and with what noise);
    for a partner's client.toml the federation announces it, so the caller passes it here,
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
                rounds=scenario.federation.rounds, kmeans_rounds=scenario.federation.kmeans_releases,
                kmeans_noise=scenario.federation.kmeans_noise,
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
        plan = make_plan(
            privacy=cfg.privacy, training=training or TrainingSettings(), public_rows=declared, rounds=rounds or 1,
            kmeans_rounds=kmeans_rounds or 0, kmeans_noise=kmeans_noise if kmeans_rounds else None,
        )  # fmt: skip
        return [_block(f"partner {cfg.name}", plan)]
    raise ConfigError(f"{path}: neither a scenario ([[silos]]) nor a partner config ([partner])")


def _group_rows(group: object, test_fraction: float) -> int:
    """A silo group's rows per partner, about (the declared count the simulation gives them)."""
    from fedpersona.config.settings import SiloGroup

    assert isinstance(group, SiloGroup)
    if group.source == "synthetic":
        return max(2, round((group.rows or 0) // group.partners * (1 - test_fraction)))
    from fedpersona.data.schema import load_schema
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
