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
- with personas (:mod:`fedpersona.personas.protocol`): one Gram release and ``n_em`` EM-type
  releases (plain Gaussian mechanisms) get ``persona_share`` of the budget and DP-SGD the
  smallest noise that keeps the whole composition within ``target_epsilon``
  (:func:`plan_split`); without personas DP-SGD takes it all (:func:`plan_noise`).

:func:`epsilon_schedule` gives the
cumulative epsilon after each round (and after the persona releases); :mod:`fedpersona.budget`
shows plans and ledgers.

Every noise comes from :func:`~fedpersona.privacy.noise_search.smallest_noise`: checked with
the accountant the ledger charges with (it never overshoots), tight, and cached.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fedpersona.config.settings import ACCOUNTANTS, PrivacyPlan, PrivacySettings, TrainingSettings, sample_rate_for
from fedpersona.errors import ConfigError
from fedpersona.privacy.accounting import analytic_gaussian_noise, compute_epsilon
from fedpersona.privacy.noise_search import TIGHTNESS, NoiseSearch, smallest_noise

__all__ = [
    "BudgetSplit",
    "epsilon_schedule",
    "make_plan",
    "persona_history",
    "plan_noise",
    "plan_split",
    "sgd_clip",
]

logger = logging.getLogger(__name__)

Lines = list[list[str]]


def make_plan(
    *,
    privacy: PrivacySettings,
    training: TrainingSettings,
    public_rows: int,
    rounds: int,
    persona_releases: int = 0,
    persona_share: float = 0.0,
) -> PrivacyPlan:
    """The partner's plan from its public inputs (see the module docstring).

    ``persona_releases`` (the Gram release and the EM-type steps the federation announces; 0
    for none) get ``persona_share`` of the budget (:func:`plan_split`); DP-SGD the rest.
    """
    rounds = privacy.planned_rounds or rounds
    q = sample_rate_for(public_rows, training.batch_for(public_rows))
    steps = training.steps_per_round(public_rows)
    sigma: float | None = None
    gram: float | None = None
    em: float | None = None
    if privacy.private and persona_releases:
        split = plan_split(
            target_epsilon=privacy.target_epsilon, delta=privacy.delta, accountant=privacy.accountant,
            persona_share=persona_share, em_releases=persona_releases - 1, sgd_sample_rate=q,
            sgd_steps=steps * rounds,
        )  # fmt: skip
        sigma, gram, em = split.sgd_noise, split.gram_noise, split.em_noise
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
        persona_releases=persona_releases,
        persona_share=persona_share if persona_releases else 0.0,
        gram_noise=gram,
        em_noise=em,
        public_rows=public_rows,
        noise_seeded=privacy.noise_seed is not None,
        batch_size=training.batch_for(public_rows),
        local_epochs=training.local_epochs,
    )


CLIP_NOISE = 0.02
"""The most noise :func:`sgd_clip` lets a raised clip put on each coordinate of a mean step."""


def sgd_clip(plan: PrivacyPlan) -> float:
    """The clip DP-SGD uses under ``plan``: ``privacy.max_grad_norm`` (``C_max``, 2 by default),
    lowered for a noisy plan, never below ``min(1, C_max)``:

        ``C = min(C_max, max(min(1, C_max), CLIP_NOISE * E[B] / sigma))``

    with ``sigma`` the plan's noise multiplier and ``E[B] = q * public_rows`` the expected
    batch. A step adds noise of standard deviation ``C sigma / E[B]`` to each coordinate of
    the mean clipped gradient, so a larger clip trades less clipping bias for more noise. On
    the label model's validation splits (``python -m benchmarks.label_recipe``: the three
    primaries and two other public tables, epsilon 1 and 3) clip 2 beat clip 1 wherever ``2
    sigma / E[B]`` stayed below about 0.013 and lost wherever it was above about 0.035 (0.028
    AUC on a 5,110-row table at epsilon 1); this rule raises the clip above 1 only as far as that
    noise stays within ``CLIP_NOISE``.

    Privacy: the clip changes no epsilon (the noise is ``sigma C`` for sensitivity ``C``), and
    it is a function of public numbers only (the configured cap, the planned noise, the sample
    rate and the public row count), so it reveals nothing about the rows. Non-private: no
    clipping applies, ``C_max`` is returned.
    """
    cap = plan.max_grad_norm
    if not plan.private or plan.noise_multiplier is None:
        return cap
    expected = max(1, int(plan.sample_rate * plan.public_rows))
    return min(cap, max(min(1.0, cap), CLIP_NOISE * expected / plan.noise_multiplier))


def persona_history(plan: PrivacyPlan) -> list[tuple[float, float, int]]:
    """The ledger history of the plan's persona releases: ``(gram_noise, 1, 1)`` and
    ``(em_noise, 1, persona_releases - 1)`` (empty without personas or privacy)."""
    if not plan.private or not plan.persona_releases or plan.gram_noise is None:
        return []
    out = [(plan.gram_noise, 1.0, 1)]
    if plan.persona_releases > 1 and plan.em_noise is not None:
        out.append((plan.em_noise, 1.0, plan.persona_releases - 1))
    return out


def epsilon_schedule(plan: PrivacyPlan) -> list[float]:
    """Cumulative epsilon after each planned round, then (with personas) after their releases."""
    extra = 1 if plan.persona_releases else 0
    if not plan.private or plan.noise_multiplier is None:
        return [math.inf] * (plan.planned_rounds + extra)
    sgd = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    out = [
        compute_epsilon([(sgd[0], sgd[1], sgd[2] * r)], delta=plan.delta, accountant=plan.accountant)
        for r in range(1, plan.planned_rounds + 1)
    ]
    if extra:
        history = [(sgd[0], sgd[1], sgd[2] * plan.planned_rounds), *persona_history(plan)]
        out.append(compute_epsilon(history, delta=plan.delta, accountant=plan.accountant))
    return out


def plan_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps stays <= the target
    (within :data:`TIGHTNESS` below it)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"the plan needs at least one step, got {steps}")
    _check_plan_args(target_epsilon, delta, sample_rate, steps, 0, 1.0, accountant)
    return smallest_noise(
        NoiseSearch("sgd", float(target_epsilon), float(delta), accountant, (), float(sample_rate), steps, TIGHTNESS)
    )


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


# --- the budget split of the learning redesign ---------------------------------------------------


@dataclass(frozen=True)
class BudgetSplit:
    """A partner's releases under one (epsilon, delta) budget, as its ledger will charge them.

    ``gram_noise``: the noise multiplier of the one Gram release (L2 sensitivity normalised to
    1; ledger entry ``(gram_noise, 1.0, 1)``); ``em_noise``: that of each of the
    ``em_releases`` EM releases (each ``(em_noise, 1.0, 1)``); ``sgd_noise``: DP-SGD's, over
    ``sgd_steps`` steps at ``sgd_sample_rate``. ``history`` is the ledger's history merged
    (the per-release and per-round entries the ledger records merge to it) and ``epsilon``
    its epsilon under ``accountant``, at most ``target_epsilon``. ``persona_share`` is the
    share the personas were given (1.0 without DP-SGD: they take the whole budget). Public
    numbers only: functions of the budget and the announced releases.
    """

    target_epsilon: float
    delta: float
    accountant: str
    persona_share: float
    gram_share: float
    em_releases: int
    gram_noise: float | None
    em_noise: float | None
    sgd_noise: float | None
    sgd_sample_rate: float | None
    sgd_steps: int | None
    history: tuple[tuple[float, float, int], ...]
    epsilon: float

    def __post_init__(self) -> None:
        problems = []
        for name in ("gram_noise", "em_noise", "sgd_noise"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0 or None, got {value!r}")
        if (self.gram_noise is None) != (self.persona_share == 0):
            problems.append("gram_noise is set exactly when persona_share > 0")
        if (self.em_noise is None) != (self.persona_share == 0 or self.em_releases == 0):
            problems.append("em_noise is set exactly when there are persona releases and em_releases > 0")
        if (self.sgd_noise is None) != (self.sgd_sample_rate is None) or (self.sgd_noise is None) != (
            self.sgd_steps is None
        ):
            problems.append("sgd_noise, sgd_sample_rate and sgd_steps are set together")
        if not self.history:
            problems.append("history is empty")
        if not self.epsilon <= self.target_epsilon:
            problems.append(f"epsilon {self.epsilon!r} is above the target {self.target_epsilon!r}")
        if problems:
            raise ValueError("invalid budget split: " + "; ".join(problems))


def plan_split(
    *,
    target_epsilon: float,
    delta: float,
    accountant: str,
    persona_share: float,
    em_releases: int,
    gram_share: float = 0.3,
    sgd_sample_rate: float | None = None,
    sgd_steps: int | None = None,
    tightness: float = TIGHTNESS,
) -> BudgetSplit:
    """Share one (epsilon, delta) budget between the persona releases and DP-SGD.

    ``s_total`` is the noise of ONE Gaussian mechanism that is (target_epsilon, delta)-DP (the
    analytic Gaussian mechanism, :func:`~fedpersona.privacy.accounting.analytic_gaussian_noise`).
    The personas get the part ``p = persona_share`` of its precision: ``s_p = s_total /
    sqrt(p)``, ``gram_noise = s_p / sqrt(g)`` and ``em_noise = s_p * sqrt(n_em / (1 - g))``
    with ``g = gram_share``, so that ``1 / s_p^2 = 1 / gram_noise^2 + n_em / em_noise^2``: the
    Gram release and the EM steps compose exactly into one Gaussian mechanism of noise ``s_p``
    (with ``em_releases = 0`` the Gram release is that mechanism). DP-SGD then gets the
    smallest noise that keeps the whole composition, as the accountant computes it, within the
    target (epsilon in ``[target * (1 - tightness), target]``).

    Without DP-SGD (``sgd_sample_rate`` None) the personas take the whole budget (``p`` is
    then 1): the accountant's epsilon of their releases is checked and, when it is above the
    target (PRV adds up to 0.01 to the exact Gaussian epsilon), all their noises are scaled up
    by the smallest common factor that brings it within. ``persona_share = 0`` means no
    persona releases: DP-SGD alone, as :func:`plan_noise`.
    """
    sgd = sgd_sample_rate is not None
    problems = _split_problems(
        target_epsilon, delta, accountant, persona_share, em_releases, gram_share, sgd_sample_rate, sgd_steps, tightness
    )
    if problems:
        raise ConfigError("cannot split the privacy budget: " + "; ".join(problems))
    common = dict(target_epsilon=float(target_epsilon), delta=float(delta), accountant=accountant)
    sgd_fields = dict(sgd_sample_rate=sgd_sample_rate, sgd_steps=sgd_steps)
    if persona_share == 0:
        assert sgd_sample_rate is not None and sgd_steps is not None  # checked above
        alone = smallest_noise(
            NoiseSearch(
                "sgd", float(target_epsilon), float(delta), accountant, (), sgd_sample_rate, sgd_steps, tightness
            )
        )
        only: tuple[tuple[float, float, int], ...] = ((alone, float(sgd_sample_rate), int(sgd_steps)),)
        return BudgetSplit(
            **common, persona_share=0.0, gram_share=float(gram_share), em_releases=int(em_releases),  # type: ignore[arg-type]
            gram_noise=None, em_noise=None, sgd_noise=alone, **sgd_fields,  # type: ignore[arg-type]
            history=only, epsilon=compute_epsilon(list(only), delta=delta, accountant=accountant),
        )  # fmt: skip
    share = float(persona_share) if sgd else 1.0
    s_p = analytic_gaussian_noise(epsilon=target_epsilon, delta=delta) / math.sqrt(share)
    gram = s_p if em_releases == 0 else s_p / math.sqrt(gram_share)
    em = None if em_releases == 0 else s_p * math.sqrt(em_releases / (1 - gram_share))
    persona: tuple[tuple[float, float, int], ...] = ((gram, 1.0, 1),)
    if em is not None:
        persona += ((em, 1.0, int(em_releases)),)
    reached = compute_epsilon(list(persona), delta=delta, accountant=accountant)
    sigma: float | None = None
    if sgd:
        assert sgd_sample_rate is not None and sgd_steps is not None
        if reached >= target_epsilon:
            raise ConfigError(
                f"persona_share {persona_share:g} leaves no budget for DP-SGD: the persona releases alone spend "
                f"epsilon {reached:.4f} of {target_epsilon:g} under the {accountant} accountant; lower persona_share"
            )
        search = NoiseSearch(
            "sgd", float(target_epsilon), float(delta), accountant, persona, float(sgd_sample_rate), int(sgd_steps),
            tightness,
        )  # fmt: skip
        sigma = smallest_noise(search)
        history: tuple[tuple[float, float, int], ...] = (*persona, (sigma, float(sgd_sample_rate), int(sgd_steps)))
    else:
        if reached > target_epsilon:
            scale = NoiseSearch("scale", float(target_epsilon), float(delta), accountant, persona, 1.0, 1, tightness)
            factor = smallest_noise(scale)
            gram, em = gram * factor, (em * factor if em is not None else None)
            persona = tuple((noise * factor, q, n) for noise, q, n in persona)
        history = persona
    return BudgetSplit(
        **common, persona_share=share, gram_share=float(gram_share), em_releases=int(em_releases),  # type: ignore[arg-type]
        gram_noise=gram, em_noise=em, sgd_noise=sigma, **sgd_fields,  # type: ignore[arg-type]
        history=history, epsilon=compute_epsilon(list(history), delta=delta, accountant=accountant),
    )  # fmt: skip


def _split_problems(
    target_epsilon: float,
    delta: float,
    accountant: str,
    persona_share: float,
    em_releases: int,
    gram_share: float,
    sgd_sample_rate: float | None,
    sgd_steps: int | None,
    tightness: float,
) -> list[str]:
    problems = []
    if not (isinstance(target_epsilon, int | float) and math.isfinite(target_epsilon) and target_epsilon > 0):
        problems.append(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        problems.append(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not (isinstance(persona_share, int | float) and 0 <= persona_share <= 1):
        problems.append(f"persona_share must be in [0, 1], got {persona_share!r}")
    if isinstance(em_releases, bool) or not isinstance(em_releases, int) or em_releases < 0:
        problems.append(f"em_releases must be an integer >= 0, got {em_releases!r}")
    if not (isinstance(gram_share, int | float) and 0 < gram_share < 1):
        problems.append(f"gram_share must be in (0, 1), got {gram_share!r}")
    if not (isinstance(tightness, int | float) and 0 < tightness < 0.1):
        problems.append(f"tightness must be in (0, 0.1), got {tightness!r}")
    if (sgd_sample_rate is None) != (sgd_steps is None):
        problems.append("give DP-SGD's sgd_sample_rate and sgd_steps together, or neither")
    if sgd_sample_rate is not None and not (isinstance(sgd_sample_rate, int | float) and 0 < sgd_sample_rate <= 1):
        problems.append(f"sgd_sample_rate must be in (0, 1], got {sgd_sample_rate!r}")
    if sgd_steps is not None and (isinstance(sgd_steps, bool) or not isinstance(sgd_steps, int) or sgd_steps < 1):
        problems.append(f"sgd_steps must be an integer >= 1, got {sgd_steps!r}")
    if persona_share == 0 and sgd_sample_rate is None:
        problems.append("persona_share 0 and no DP-SGD: there is nothing to plan")
    if persona_share == 1 and sgd_sample_rate is not None:
        problems.append("persona_share 1 leaves no budget for DP-SGD: lower it, or plan without DP-SGD")
    return problems
