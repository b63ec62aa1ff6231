"""The local model on top of the federation: statistics against oracles, the detector under the null,
selection, the audit's fallback order, persistence and input checks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from fedpersona.errors import ConfigError, DataError
from fedpersona.model.alone import auc, delong, delong_difference, fit_linear, fit_trees, mann_whitney_greater
from fedpersona.model.stacking import (
    CANDIDATES,
    Detection,
    FittedCandidate,
    LocalModel,
    LocalModelReport,
    detect_signal,
    fed_first_choice,
    fit_local_model,
    load_local_model,
    local_model_path,
    save_local_model,
    served_choice,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threadpool_limits(limits=1):  # gradient boosting's OpenMP threads on a shared machine
        yield


def partner(
    n: int, *, fed_signal: float, own_signal: float, seed: int, positives: int | None = None
) -> dict[str, np.ndarray]:
    """A partner's arrays. The label follows a latent (which the federated logit sees, with noise,
    when fed_signal > 0) and own column 0 (own_signal); ``positives`` fixes the positive count."""
    rng = np.random.default_rng(seed)
    x_raw = rng.normal(size=(n, 4))
    x_raw[rng.random(x_raw.shape) < 0.1] = np.nan
    x_enc = np.hstack([np.nan_to_num(x_raw), np.isnan(x_raw).astype(float)])
    latent = rng.normal(size=n)
    logit = 2.0 * fed_signal * latent + own_signal * np.nan_to_num(x_raw[:, 0]) + 0.5 * rng.normal(size=n)
    if positives is None:
        y = (logit > 0).astype(float)
    else:
        y = np.zeros(n)
        y[np.argsort(-logit)[:positives]] = 1.0
    fed = fed_signal * latent + 0.3 * rng.normal(size=n) if fed_signal > 0 else rng.normal(size=n)
    return {"x_enc": x_enc, "x_raw": x_raw, "fed_logit": fed, "y": y}


def fit(data: dict[str, np.ndarray], seed: int = 0, **options: str) -> LocalModel:
    return fit_local_model(**data, generator=np.random.default_rng(seed), **options)


@pytest.fixture(scope="module")
def informative() -> tuple[dict[str, np.ndarray], LocalModel]:
    with threadpool_limits(limits=1):
        data = partner(300, fed_signal=1.0, own_signal=0.2, seed=1)
        return data, fit(data)


@pytest.fixture(scope="module")
def own_wins() -> tuple[dict[str, np.ndarray], LocalModel]:
    with threadpool_limits(limits=1):
        data = partner(300, fed_signal=0.0, own_signal=2.0, seed=2)
        return data, fit(data)


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    ("m", "n", "shift", "rounding"),
    [
        (3, 40, 1.0, None),  # exact distribution
        (8, 8, 0.8, None),
        (6, 600, 1.5, None),
        (5, 9, -0.5, None),
        (30, 50, 0.5, None),  # normal approximation
        (200, 300, 0.1, None),
        (6, 80, 1.0, 1),  # ties: normal approximation with the tie correction
        (40, 60, 0.3, 0),
    ],
)
def test_mann_whitney_p_value_equals_scipy(m: int, n: int, shift: float, rounding: int | None) -> None:
    rng = np.random.default_rng(m * 1000 + n)
    pos, neg = rng.normal(size=m) + shift, rng.normal(size=n)
    if rounding is not None:
        pos, neg = np.round(pos, rounding), np.round(neg, rounding)
    y = np.r_[np.ones(m), np.zeros(n)]
    expected = mannwhitneyu(pos, neg, alternative="greater").pvalue
    assert mann_whitney_greater(y=y, score=np.r_[pos, neg]) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_exact_mann_whitney_tail_equals_enumeration() -> None:
    # 3 positives among 7 rows: all 35 rank sets, U = rank sum - 6, P(U >= u) counted directly.
    us = [sum(c) - 6 for c in itertools.combinations(range(1, 8), 3)]
    for u in range(13):
        positives = next(c for c in itertools.combinations(range(1, 8), 3) if sum(c) - 6 == u)
        y = np.array([1.0 if r in positives else 0.0 for r in range(1, 8)])
        expected = sum(v >= u for v in us) / 35
        assert mann_whitney_greater(y=y, score=np.arange(1.0, 8.0)) == pytest.approx(expected, abs=1e-15)


def test_delong_equals_its_structural_components_by_brute_force() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    a = np.round(rng.normal(size=120) + y, 1)  # with ties
    b = 0.5 * a + rng.normal(size=120)
    pos, neg = y == 1, y == 0

    def psi(s: np.ndarray) -> np.ndarray:  # (positives, negatives): 1 above, 1/2 tied
        d = s[pos][:, None] - s[neg][None, :]
        return (d > 0) + 0.5 * (d == 0)

    v10 = np.array([psi(s).mean(axis=1) for s in (a, b)])
    v01 = np.array([psi(s).mean(axis=0) for s in (a, b)])
    expected = np.cov(v10) / pos.sum() + np.cov(v01) / neg.sum()
    aucs, cov = delong(y=y, scores=[a, b])
    np.testing.assert_allclose(aucs, [psi(a).mean(), psi(b).mean()], atol=1e-12)
    np.testing.assert_allclose(cov, expected, atol=1e-12)


def test_paired_delong_standard_error_agrees_with_a_bootstrap() -> None:
    rng = np.random.default_rng(5)
    n = 400
    y = rng.integers(0, 2, n)
    common = rng.normal(size=n)
    a = y + common + 0.8 * rng.normal(size=n)  # two correlated scores
    b = 0.7 * y + common + 0.8 * rng.normal(size=n)
    gap, se = delong_difference(y=y, score_a=a, score_b=b)
    draws = []
    boot = np.random.default_rng(6)
    while len(draws) < 2000:
        rows = boot.integers(0, n, n)
        if 0 < y[rows].sum() < n:
            draws.append(auc(y=y[rows], score=a[rows]) - auc(y=y[rows], score=b[rows]))
    assert gap == pytest.approx(auc(y=y, score=a) - auc(y=y, score=b), abs=1e-12)
    assert se == pytest.approx(float(np.std(draws, ddof=1)), rel=0.15)  # bootstrap SE's own error: ~2%


# ----------------------------------------------------------------------------- the detector
@pytest.mark.parametrize(("positives", "negatives"), [(60, 140), (6, 300)])
def test_detector_false_signal_rate_is_nominal_under_permuted_labels(positives: int, negatives: int) -> None:
    # 400 seeded null runs (labels permuted against an informative score): at alpha = 2.5% the
    # count of false "signal" is Binomial(400, 0.025), mean 10, sd 3.1; [3, 20] spans about
    # -2.3 to +3.2 sd. The seeds are fixed, so the count is the same on every run.
    score_rng = np.random.default_rng(100)
    y = np.r_[np.ones(positives), np.zeros(negatives)]
    score = y + score_rng.normal(size=len(y))
    false_signals = sum(
        detect_signal(y=np.random.default_rng(seed).permutation(y), score=score).signal for seed in range(400)
    )
    assert 3 <= false_signals <= 20, false_signals
    assert detect_signal(y=y, score=score).signal  # the unpermuted labels do have signal


def test_detector_needs_five_rows_of_each_class_and_leaves_unlabelled_rows_out() -> None:
    y = np.r_[np.ones(4), np.zeros(100), np.full(3, np.nan)]
    score = np.r_[np.full(4, 10.0), np.zeros(100), np.zeros(3)]
    check = detect_signal(y=y, score=score)
    assert not check.signal and check.p_value is None and (check.positives, check.negatives) == (4, 100)
    assert "at least 5 of each" in check.describe()
    top = np.r_[1.0 + np.arange(5), -np.arange(100.0)]  # the 5 positives above every negative
    five = detect_signal(y=np.r_[np.ones(5), np.zeros(100)], score=top)
    assert five.signal and five.p_value == pytest.approx(1 / math.comb(105, 5), rel=1e-9)
    with pytest.raises(DataError, match="score: has 3 rows but y has 107"):
        detect_signal(y=y, score=score[:3])


def test_detector_auc_and_p_value_on_the_labelled_rows_equal_scikit_learn_and_scipy() -> None:
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 300).astype(float)
    score = np.round(0.4 * y + rng.normal(size=300), 1)  # with ties: the normal approximation
    y[rng.random(300) < 0.2] = np.nan  # unlabelled rows are left out of both numbers
    known = ~np.isnan(y)
    check = detect_signal(y=y, score=score)
    assert check.auc == pytest.approx(roc_auc_score(y[known], score[known]), abs=1e-12)
    expected = mannwhitneyu(score[known & (y == 1)], score[known & (y == 0)], alternative="greater").pvalue
    assert check.p_value == pytest.approx(expected, rel=1e-9)
    assert (check.positives, check.negatives) == (int((y == 1).sum()), int((y == 0).sum()))


# ----------------------------------------------------------------------------- selection and audit
def test_fed_first_rule_prefers_the_federated_score_among_ties() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    latent = y + rng.normal(size=300)
    close = {"fed": latent + 0.05 * rng.normal(size=300), "own_lr": latent}  # AUCs within a DeLong SE
    aucs, best, selected = fed_first_choice(y=y, oof=close)
    gap, se = delong_difference(y=y, score_a=close[best], score_b=close["fed"])
    assert gap <= se and selected == "fed"
    clear = {"fed": y + 3.0 * rng.normal(size=300), "own_lr": latent}  # own clearly better
    aucs, best, selected = fed_first_choice(y=y, oof=clear)
    assert best == selected == "own_lr" and aucs["own_lr"] > aucs["fed"] + 0.1


def test_an_informative_federated_logit_is_chosen(informative: tuple[dict[str, np.ndarray], LocalModel]) -> None:
    data, model = informative
    report = model.report
    assert set(report.cv_auc) == set(CANDIDATES)  # every candidate was cross-validated
    assert report.fed_p_value is not None and report.fed_p_value < 1e-10
    assert (report.selected, report.chosen, report.verdict) == ("fed", "fed", "signal")
    assert (report.rows, report.cv_folds, report.cv_repeats, report.audit_rows) == (300, 5, 3, 60)
    np.testing.assert_array_equal(model.predict(fed_logit=data["fed_logit"]), data["fed_logit"])
    assert model.needs == ("fed_logit",)


def test_a_useless_federated_logit_leaves_the_own_model(own_wins: tuple[dict[str, np.ndarray], LocalModel]) -> None:
    data, model = own_wins
    report = model.report
    assert set(report.cv_auc) == {"own_lr", "own_hgb"}  # an unverified federated score is no candidate
    assert report.fed_p_value is not None and report.fed_p_value > 0.025
    assert report.chosen == report.selected == report.own_best and report.verdict == "signal"
    assert report.audit_passed and report.audit_alpha == pytest.approx(0.025 / 2)
    scores = model.predict(x_enc=data["x_enc"], x_raw=data["x_raw"])
    assert auc(y=data["y"], score=scores) > 0.85


def test_permuted_labels_give_no_signal_and_a_constant_score() -> None:
    data = partner(300, fed_signal=1.0, own_signal=1.0, seed=3)
    for seed in (0, 1):
        shuffled = dict(data, y=np.random.default_rng(50 + seed).permutation(data["y"]))
        model = fit(shuffled, seed=seed)
        assert model.report.verdict == "no_signal" and model.report.chosen == "no_signal", model.report
        assert "not significantly above 0.5" in model.report.describe()
        np.testing.assert_array_equal(model.predict(**{k: v for k, v in data.items() if k != "y"}), np.zeros(300))


def _check(signal: bool, tested: bool = True) -> Detection:
    return Detection(signal, (0.001 if signal else 0.4) if tested else None, 0.7 if tested else None, 20, 80, 0.025, 5)


@pytest.mark.parametrize(
    ("audit", "fed", "own", "policy", "served"),
    [
        (_check(True), _check(True), _check(True), "no_signal", ("blend0.5", "signal")),
        (_check(False), _check(True), _check(True), "no_signal", ("fed", "signal")),
        (_check(False), _check(False), _check(True), "no_signal", ("own_hgb", "signal")),
        (_check(False), _check(False), _check(False), "no_signal", ("no_signal", "no_signal")),
        (_check(False), _check(False), _check(False), "unverified_federated", ("no_signal", "no_signal")),
        (None, _check(False, tested=False), None, "no_signal", ("no_signal", "no_signal")),
        (None, _check(False, tested=False), None, "unverified_federated", ("fed", "unverified")),
    ],
)
def test_the_audit_falls_back_in_order(
    audit: Detection | None, fed: Detection, own: Detection | None, policy: str, served: tuple[str, str]
) -> None:
    chosen, verdict, reason = served_choice(
        selected="blend0.5", audit=audit, fed=fed, own_best="own_hgb", own=own, policy=policy
    )
    assert (chosen, verdict) == served and reason


def test_partners_with_few_rows_of_a_class() -> None:
    three = partner(200, fed_signal=1.0, own_signal=0.0, seed=8, positives=3)
    model = fit(three)
    assert model.report.fed_p_value is None and model.report.verdict == "no_signal"
    assert "cannot be tested: 3 positive" in model.report.reason
    unverified = fit(three, when_unverifiable="unverified_federated")
    assert (unverified.report.chosen, unverified.report.verdict) == ("fed", "unverified")
    assert unverified.report.describe().startswith("unverified federated score")
    np.testing.assert_array_equal(unverified.predict(fed_logit=three["fed_logit"]), three["fed_logit"])
    seven = fit(partner(200, fed_signal=1.0, own_signal=0.0, seed=9, positives=7))
    assert seven.report.audit_rows == 0 and seven.report.own_best_p_value is None  # own models not auditable
    assert (seven.report.chosen, seven.report.verdict) == ("fed", "signal")  # the cross-fitted score is testable
    one = fit(partner(200, fed_signal=1.0, own_signal=0.0, seed=9, positives=1))
    assert one.report.cv_auc == {} and one.report.cv_folds == 0 and one.report.verdict == "no_signal"


def test_the_same_generator_seed_gives_the_same_model(informative: tuple[dict[str, np.ndarray], LocalModel]) -> None:
    data, model = informative
    again = fit(data, seed=0)
    assert again.report == model.report
    inputs = {k: v for k, v in data.items() if k != "y"}
    np.testing.assert_array_equal(again.predict(**inputs), model.predict(**inputs))


# ----------------------------------------------------------------------------- persistence
def _report(chosen: str) -> LocalModelReport:
    return LocalModelReport(
        rows=10, positives=4, negatives=6, unlabelled=0, cv_folds=2, cv_repeats=1, cv_auc={chosen: 0.7},
        own_best="own_lr", cv_best=chosen, selected=chosen, fed_p_value=0.01, own_best_p_value=None,
        audit_rows=0, audit_alpha=0.025, audit_p_value=0.01, audit_passed=True, chosen=chosen,
        verdict="signal", policy="no_signal", reason="test",
    )  # fmt: skip


def every_kind(data: dict[str, np.ndarray]) -> list[FittedCandidate]:
    xe, xr, fed, y = data["x_enc"], data["x_raw"], data["fed_logit"], data["y"].astype(int)
    lr, trees = fit_linear(xe, y), fit_trees(xr, y, seed=0)
    return [
        FittedCandidate("fed"),
        FittedCandidate("own_lr", lr),
        FittedCandidate("own_hgb", trees),
        FittedCandidate("blend0.5", trees, fed_center=0.1, fed_spread=1.3, own_center=-0.2, own_spread=2.1),
        FittedCandidate("blend0.25", lr, fed_center=0.3, fed_spread=0.7, own_center=0.4, own_spread=1.5),
        FittedCandidate("stk_lr", fit_linear(np.column_stack([xe, fed]), y, weights=np.r_[np.ones(8), 10.0])),
        FittedCandidate("stk_hgb", fit_trees(np.column_stack([xr, fed]), y, seed=0)),
    ]


def test_save_and_load_give_identical_predictions(
    tmp_path: Path, own_wins: tuple[dict[str, np.ndarray], LocalModel]
) -> None:
    data, fitted = own_wins
    fresh = partner(120, fed_signal=1.0, own_signal=1.0, seed=11)
    inputs = {k: v for k, v in fresh.items() if k != "y"}
    models = [fitted] + [LocalModel(c, _report(c.name)) for c in every_kind(data)]
    for model in models:
        path = save_local_model(state_dir=tmp_path / "state", label="churn", model=model)
        assert path == tmp_path / "state" / "local-model-churn.npz" and sorted(path.parent.iterdir()) == [path]
        loaded = load_local_model(state_dir=tmp_path / "state", label="churn")
        assert loaded.report == model.report and loaded.candidate.name == model.candidate.name
        np.testing.assert_array_equal(loaded.predict(**inputs), model.predict(**inputs))
    assert len({m.candidate.name for m in models}) == 7


def test_loading_refuses_a_missing_damaged_or_foreign_file(
    tmp_path: Path, informative: tuple[dict[str, np.ndarray], LocalModel]
) -> None:
    with pytest.raises(DataError, match="no local model for label 'churn'"):
        load_local_model(state_dir=tmp_path, label="churn")
    path = save_local_model(state_dir=tmp_path, label="churn", model=informative[1])
    path.rename(local_model_path(state_dir=tmp_path, label="fraud"))
    with pytest.raises(DataError, match="not a local model file for label 'fraud'"):
        load_local_model(state_dir=tmp_path, label="fraud")
    local_model_path(state_dir=tmp_path, label="fraud").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="fit the local model again"):
        load_local_model(state_dir=tmp_path, label="fraud")
    with pytest.raises(ConfigError, match="letters, digits"):
        local_model_path(state_dir=tmp_path, label="../escape")


# ----------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_one_clear_error() -> None:
    data = partner(60, fed_signal=1.0, own_signal=0.0, seed=12)
    with pytest.raises(DataError, match="fed_logit: has 59 rows but y has 60"):
        fit(dict(data, fed_logit=data["fed_logit"][:59]))
    with pytest.raises(DataError, match="labels must be 0, 1 or NaN"):
        fit(dict(data, y=np.where(data["y"] == 1, 1.0, -1.0)))
    with pytest.raises(DataError, match="single class"):
        fit(dict(data, y=np.r_[np.ones(30), np.full(30, np.nan)]))
    with pytest.raises(DataError, match="fed_logit: 1 missing value"):
        fit(dict(data, fed_logit=np.r_[np.nan, data["fed_logit"][1:]]))
    with pytest.raises(ConfigError, match="when_unverifiable must be one of no_signal, unverified_federated"):
        fit(data, when_unverifiable="trust")


def test_predict_checks_what_it_reads(own_wins: tuple[dict[str, np.ndarray], LocalModel]) -> None:
    data, model = own_wins
    reads = model.needs[0]
    with pytest.raises(DataError, match=f"scores from {reads}; {reads} given"):
        model.predict(fed_logit=data["fed_logit"])
    with pytest.raises(DataError, match="numeric column"):
        model.predict(**{reads: data[reads][:, :2]})
    with pytest.raises(DataError, match="same number of rows"):
        model.predict(**{reads: data[reads], "fed_logit": data["fed_logit"][:5]})
    with pytest.raises(DataError, match="its report chose"):
        LocalModel(FittedCandidate("fed"), _report("own_lr"))
