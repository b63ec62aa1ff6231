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
clustering reserve); :mod:`fedpersona.budget` shows plans and ledgers.
"""

from __future__ import annotations

import logging
import math

from opacus.accountants.utils import get_noise_multiplier

from fedpersona.config.settings import ACCOUNTANTS, PrivacyPlan, PrivacySettings, TrainingSettings, sample_rate_for
from fedpersona.errors import ConfigError
from fedpersona.privacy.accounting import compute_epsilon, rdp_order_notice_silenced

__all__ = [
    "epsilon_schedule",
    "make_plan",
    "plan_noise",
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
