"""The fast accountant against Opacus' own, the cached noise search, and the budget split.

Oracles and tolerances:

- :func:`compute_epsilon` runs Opacus' PRV and RDP algorithms with Opacus' parameters,
  vectorised: it must equal ``opacus.accountants.PRVAccountant`` / ``RDPAccountant`` on the
  same history to 1e-6 relative (measured: ~1e-10).
- The Gaussian part of :func:`plan_split` is checked with Google's dp-accounting PLD
  accountant (pessimistic, on a mesh of 1e-3 in the privacy loss): one Gaussian of noise
  ``s_total`` is (target, delta)-DP, and the Gram release composed with the EM releases has the
  privacy curve of ONE Gaussian of noise ``s_p`` (the rho-composition the split relies on),
  both to ``PLD_TOLERANCE``.
- Every planned noise is re-checked with Opacus' PRV accountant on the whole history: at most
  the target (1e-6 relative slack for the last digits).
"""

from __future__ import annotations

import itertools
import math

import pytest
from dp_accounting import dp_event, pld
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpersona.errors import ConfigError
from fedpersona.privacy.accounting import (
    analytic_gaussian_delta,
    analytic_gaussian_noise,
    compute_epsilon,
    rdp_order_notice_silenced,
)
from fedpersona.privacy.noise_search import TIGHTNESS, clear_memory_cache
from fedpersona.privacy.planner import BudgetSplit, plan_noise, plan_split

DELTA = 1e-5
# dp-accounting's PLD on a mesh of 1e-3 (its default 1e-4 takes ~10 s per Gaussian at epsilon 8):
# pessimistic by at most about one mesh step per composed mechanism (11 here), so 0.015.
PLD_MESH, PLD_TOLERANCE = 1e-3, 0.015
HISTORIES = [
    [(1.1, 0.01, 300)],
    [(0.8, 256 / 60000, 2000)],
    [(2.0, 0.05, 60), (4.0, 1.0, 1), (9.0, 1.0, 20)],  # DP-SGD plus the persona releases
]


def opacus_epsilon(history: list[tuple[float, float, int]], accountant: str, delta: float = DELTA) -> float:
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(history)
    with rdp_order_notice_silenced():
        return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("history", HISTORIES, ids=["sgd", "small q", "sgd+gaussians"])
def test_compute_epsilon_equals_opacus_accountants(history: list[tuple[float, float, int]], accountant: str) -> None:
    ours = compute_epsilon(history, delta=DELTA, accountant=accountant)
    theirs = opacus_epsilon(history, accountant)
    assert ours == pytest.approx(theirs, rel=1e-6), (ours, theirs)


def test_plan_noise_is_tight_never_overshoots_and_is_remembered() -> None:
    clear_memory_cache()
    args = dict(target_epsilon=3.0, delta=DELTA, sample_rate=0.02, steps=500, accountant="prv")
    sigma = plan_noise(**args)  # type: ignore[arg-type]
    reached = compute_epsilon([(sigma, 0.02, 500)], delta=DELTA, accountant="prv")
    assert 3.0 * (1 - TIGHTNESS) <= reached <= 3.0
    assert opacus_epsilon([(sigma, 0.02, 500)], "prv") <= 3.0 * (1 + 1e-6)
    assert plan_noise(**args) == sigma  # type: ignore[arg-type]
    other = plan_noise(**{**args, "target_epsilon": 2.0})  # type: ignore[arg-type]
    assert other > sigma  # a smaller budget needs more noise


def test_analytic_gaussian_noise_is_the_one_gaussian_at_the_target() -> None:
    for epsilon in (0.5, 2.0, 8.0):
        s = analytic_gaussian_noise(epsilon=epsilon, delta=DELTA)
        assert analytic_gaussian_delta(noise=s, epsilon=epsilon) <= DELTA
        assert analytic_gaussian_delta(noise=s * (1 - 1e-6), epsilon=epsilon) > DELTA  # the smallest
        accountant = pld.PLDAccountant(value_discretization_interval=PLD_MESH)
        accountant.compose(dp_event.GaussianDpEvent(s))
        assert accountant.get_epsilon(DELTA) == pytest.approx(epsilon, abs=PLD_TOLERANCE)


def persona_split(persona_share: float = 0.3, **extra: object) -> BudgetSplit:
    args: dict[str, object] = dict(
        target_epsilon=4.0, delta=DELTA, accountant="prv", persona_share=persona_share, em_releases=10,
        gram_share=0.3, sgd_sample_rate=0.02, sgd_steps=400,
    )  # fmt: skip
    return plan_split(**{**args, **extra})  # type: ignore[arg-type]


def test_plan_split_spends_the_target_and_no_more() -> None:
    split = persona_split(0.3)
    assert split.history == (
        (split.gram_noise, 1.0, 1),
        (split.em_noise, 1.0, 10),
        (split.sgd_noise, 0.02, 400),
    )
    assert 4.0 * (1 - TIGHTNESS) <= split.epsilon <= 4.0  # tight
    assert split.epsilon == compute_epsilon(list(split.history), delta=DELTA, accountant="prv")
    assert opacus_epsilon(list(split.history), "prv") <= 4.0 * (1 + 1e-6)
    with pytest.raises(AttributeError):
        split.sgd_noise = 1.0  # type: ignore[misc]


def test_the_persona_releases_compose_into_one_gaussian_of_the_planned_share() -> None:
    split = persona_split(0.3)
    assert split.gram_noise is not None and split.em_noise is not None
    s_total = analytic_gaussian_noise(epsilon=4.0, delta=DELTA)
    s_p = s_total / math.sqrt(0.3)
    assert split.gram_noise == pytest.approx(s_p / math.sqrt(0.3), rel=1e-12)
    assert split.em_noise == pytest.approx(s_p * math.sqrt(10 / 0.7), rel=1e-12)
    composed = pld.PLDAccountant(value_discretization_interval=PLD_MESH)
    composed.compose(dp_event.GaussianDpEvent(split.gram_noise))
    composed.compose(dp_event.GaussianDpEvent(split.em_noise), count=10)
    one = pld.PLDAccountant(value_discretization_interval=PLD_MESH)
    one.compose(dp_event.GaussianDpEvent(s_p))
    for delta in (1e-3, DELTA, 1e-7):
        assert composed.get_epsilon(delta) == pytest.approx(one.get_epsilon(delta), abs=PLD_TOLERANCE)


def test_personas_alone_take_the_whole_budget() -> None:
    split = plan_split(
        target_epsilon=2.0, delta=DELTA, accountant="prv", persona_share=0.5, em_releases=5, gram_share=0.4
    )
    assert split.persona_share == 1.0 and split.sgd_noise is None and split.sgd_steps is None
    assert split.epsilon <= 2.0
    assert opacus_epsilon(list(split.history), "prv") <= 2.0 * (1 + 1e-6)
    s_total = analytic_gaussian_noise(epsilon=2.0, delta=DELTA)
    assert split.gram_noise is not None and split.gram_noise >= s_total / math.sqrt(0.4)


def test_more_persona_share_means_less_persona_noise_and_more_sgd_noise() -> None:
    splits = [persona_split(p) for p in (0.1, 0.3, 0.5, 0.7)]
    gram = [s.gram_noise for s in splits]
    em = [s.em_noise for s in splits]
    sgd = [s.sgd_noise for s in splits]
    assert all(a > b for a, b in itertools.pairwise(gram))  # type: ignore[operator]
    assert all(a > b for a, b in itertools.pairwise(em))  # type: ignore[operator]
    assert all(a < b for a, b in itertools.pairwise(sgd))  # type: ignore[operator]
    alone = plan_noise(target_epsilon=4.0, delta=DELTA, sample_rate=0.02, steps=400, accountant="prv")
    assert alone < sgd[0]  # sharing the budget always costs DP-SGD noise
    assert persona_split(0.0).sgd_noise == alone


@pytest.mark.parametrize(
    "change,message",
    [
        ({"persona_share": 1.5}, "persona_share must be in [0, 1], got 1.5"),
        ({"persona_share": 1.0}, "persona_share 1 leaves no budget for DP-SGD"),
        ({"gram_share": 0.0}, "gram_share must be in (0, 1), got 0.0"),
        ({"em_releases": -1}, "em_releases must be an integer >= 0, got -1"),
        ({"target_epsilon": math.inf}, "target_epsilon must be a finite number > 0, got inf"),
        ({"delta": 1.0}, "delta must be in (0, 1), got 1.0"),
        ({"accountant": "gdp"}, "accountant must be one of"),
        ({"sgd_steps": None}, "give DP-SGD's sgd_sample_rate and sgd_steps together, or neither"),
        ({"sgd_sample_rate": 0.0}, "sgd_sample_rate must be in (0, 1], got 0.0"),
        ({"persona_share": 0.99, "target_epsilon": 0.5}, "leaves no budget for DP-SGD: the persona releases alone"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot split the privacy budget|leaves no budget") as caught:
        persona_split(**change)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        persona_split(persona_share=-1, gram_share=2, delta=0)
    text = str(caught.value)
    assert "persona_share must be" in text and "gram_share must be" in text and "delta must be" in text


def test_a_remembered_split_is_the_fresh_one_and_every_public_input_is_in_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedpersona.privacy import noise_search

    searches: list[noise_search.NoiseSearch] = []
    search = noise_search._search
    monkeypatch.setattr(noise_search, "_search", lambda s: searches.append(s) or search(s))
    clear_memory_cache()
    first = persona_split(0.3)
    assert len(searches) == 1
    assert persona_split(0.3) == first and len(searches) == 1  # answered from memory, not searched
    clear_memory_cache()
    assert persona_split(0.3) == first and len(searches) == 2  # the same numbers when searched afresh
    changes: list[dict[str, object]] = [
        {"persona_share": 0.4}, {"em_releases": 9}, {"gram_share": 0.4}, {"sgd_steps": 401},
        {"sgd_sample_rate": 0.021}, {"target_epsilon": 3.9}, {"delta": 2e-5}, {"accountant": "rdp"},
    ]  # fmt: skip
    for change in changes:
        other = persona_split(**{"persona_share": 0.3, **change})  # type: ignore[arg-type]
        assert other.sgd_noise != first.sgd_noise, change  # a changed input is searched, not remembered
        assert other.epsilon <= other.target_epsilon
    assert len(searches) == 2 + len(changes)
