"""The partner alone: own label models (against scikit-learn), CV fold rules, own personas, input checks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from fedpersona.errors import ConfigError, DataError
from fedpersona.model.alone import (
    CvPlan,
    LinearScorer,
    TreeScorer,
    auc,
    cv_plan,
    cv_splits,
    fit_linear,
    fit_own_models,
    fit_trees,
    own_personas,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threadpool_limits(limits=1):  # gradient boosting's OpenMP threads on a shared machine
        yield


def rows(n: int, *, seed: int, missing: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """x_raw (n, 4) with NaN holes and x_enc: the same columns, holes filled, plus their flags."""
    rng = np.random.default_rng(seed)
    x_raw = rng.normal(size=(n, 4))
    x_raw[rng.random(x_raw.shape) < missing] = np.nan
    x_enc = np.hstack([np.nan_to_num(x_raw), np.isnan(x_raw).astype(float)])
    return x_enc, x_raw


@pytest.mark.parametrize(
    ("n", "minority", "folds", "repeats"),
    [
        (400, 100, 5, 3),
        (1_000, 300, 5, 3),
        (1_001, 300, 5, 1),
        (10_000, 2_000, 5, 1),
        (10_001, 2_000, 3, 1),
        (50_000, 3, 3, 1),
        (800, 4, 4, 3),  # never more folds than rows of the smaller class
        (800, 2, 2, 3),
    ],
)
def test_cv_plan_follows_the_row_count(n: int, minority: int, folds: int, repeats: int) -> None:
    assert cv_plan(rows=n, minority=minority) == CvPlan(folds=folds, repeats=repeats)


def test_cv_plan_needs_two_rows_of_each_class() -> None:
    with pytest.raises(DataError, match="at least 2 rows of each class, got 1"):
        cv_plan(rows=500, minority=1)
    with pytest.raises(ConfigError, match="folds >= 2"):
        CvPlan(folds=1, repeats=1)


def test_cv_splits_are_stratified_partitions_drawn_from_the_generator() -> None:
    y = (np.arange(300) % 5 == 0).astype(int)  # 60 positives
    splits = cv_splits(y=y, plan=CvPlan(folds=5, repeats=3), generator=np.random.default_rng(0))
    assert len(splits) == 3
    for repeat in splits:
        held = np.sort(np.concatenate([b for _, b in repeat]))
        np.testing.assert_array_equal(held, np.arange(300))  # every row held out exactly once
        for fit_rows, held_rows in repeat:
            assert y[held_rows].sum() == 12 and len(np.intersect1d(fit_rows, held_rows)) == 0
    assert not np.array_equal(splits[0][0][1], splits[1][0][1])  # repeats are reshuffled
    again = cv_splits(y=y, plan=CvPlan(folds=5, repeats=3), generator=np.random.default_rng(0))
    other = cv_splits(y=y, plan=CvPlan(folds=5, repeats=3), generator=np.random.default_rng(1))
    np.testing.assert_array_equal(again[2][4][1], splits[2][4][1])
    assert not np.array_equal(other[0][0][1], splits[0][0][1])


def test_auc_equals_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    score = np.round(rng.normal(size=500) + 0.7 * y, 1)  # many ties
    assert auc(y=y, score=score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_linear_scorer_equals_scikit_learn_on_standardised_columns() -> None:
    x_enc, _ = rows(400, seed=1)
    y = (x_enc[:, 0] + np.random.default_rng(2).normal(size=400) > 0).astype(int)
    ours = fit_linear(x_enc, y)
    scaler = StandardScaler().fit(x_enc)
    reference = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x_enc), y)
    fresh, _ = rows(200, seed=9)
    expected = reference.decision_function(scaler.transform(fresh))
    np.testing.assert_allclose(ours.score(fresh), expected, rtol=1e-5, atol=1e-5)


def test_tree_scorer_equals_scikit_learn_on_new_rows_with_missing_values() -> None:
    _, x_raw = rows(500, seed=4, missing=0.2)
    y = ((np.nan_to_num(x_raw[:, 0]) * np.nan_to_num(x_raw[:, 1]) > 0) ^ np.isnan(x_raw[:, 2])).astype(int)
    ours = fit_trees(x_raw, y, seed=7)
    reference = HistGradientBoostingClassifier(random_state=7).fit(x_raw, y)
    _, fresh = rows(300, seed=5, missing=0.3)
    np.testing.assert_allclose(ours.score(fresh), reference.decision_function(fresh), rtol=1e-12, atol=1e-12)


def test_scorers_rebuild_from_their_arrays() -> None:
    x_enc, x_raw = rows(300, seed=6)
    y = (x_enc[:, 1] > 0).astype(int)
    for scorer, x in ((fit_linear(x_enc, y), x_enc), (fit_trees(x_raw, y, seed=0), x_raw)):
        again = type(scorer).from_arrays(scorer.to_arrays())
        np.testing.assert_array_equal(again.score(x), scorer.score(x))
    with pytest.raises(DataError, match="scale > 0"):
        LinearScorer(mean=np.zeros(2), scale=np.array([1.0, 0.0]), coef=np.ones(2), intercept=0.0)
    broken = fit_trees(x_raw, y, seed=0).to_arrays()
    broken["left"] = np.zeros_like(broken["left"])  # every child pointing back to the root
    with pytest.raises(DataError, match="inconsistent"):
        TreeScorer.from_arrays(broken)


def test_own_best_is_the_linear_model_for_a_linear_label() -> None:
    x_enc, x_raw = rows(600, seed=10)
    y = (x_enc[:, 0] + 0.5 * x_enc[:, 1] + np.random.default_rng(11).normal(size=600) > 0).astype(float)
    own = fit_own_models(x_enc=x_enc, x_raw=x_raw, y=y, generator=np.random.default_rng(0))
    assert own.best == "own_lr" and own.cv_auc["own_lr"] > own.cv_auc["own_hgb"]
    assert own.plan == CvPlan(folds=5, repeats=3) and own.rows == 600
    # refitted on all rows: the same model as fitting it directly
    np.testing.assert_allclose(own.predict(x_enc=x_enc), fit_linear(x_enc, y.astype(int)).score(x_enc), atol=1e-12)


def test_own_best_is_gradient_boosting_for_an_interaction() -> None:
    x_enc, x_raw = rows(600, seed=12)
    y = (np.nan_to_num(x_raw[:, 0]) * np.nan_to_num(x_raw[:, 1]) > 0).astype(float)  # XOR: little linear signal
    y[::7] = np.nan  # unlabelled rows are left out
    own = fit_own_models(x_enc=x_enc, x_raw=x_raw, y=y, generator=np.random.default_rng(0))
    assert own.best == "own_hgb" and own.cv_auc["own_hgb"] > 0.8 and own.cv_auc["own_lr"] < 0.7
    assert own.rows == int((~np.isnan(y)).sum())
    with pytest.raises(DataError, match="scores from x_raw; x_raw was not given"):
        own.predict(x_enc=x_enc)
    with pytest.raises(DataError, match="fitted on 4 numeric column"):
        own.predict(x_raw=x_enc)


def test_own_models_are_reproducible_from_the_generator() -> None:
    x_enc, x_raw = rows(300, seed=13)
    y = (x_enc[:, 2] + np.random.default_rng(14).normal(size=300) > 0).astype(float)
    first = fit_own_models(x_enc=x_enc, x_raw=x_raw, y=y, generator=np.random.default_rng(5))
    again = fit_own_models(x_enc=x_enc, x_raw=x_raw, y=y, generator=np.random.default_rng(5))
    other = fit_own_models(x_enc=x_enc, x_raw=x_raw, y=y, generator=np.random.default_rng(6))
    assert dict(first.cv_auc) == dict(again.cv_auc)
    assert dict(first.cv_auc) != dict(other.cv_auc)  # other folds


def test_own_personas_recover_separated_clusters_and_follow_the_generator() -> None:
    rng = np.random.default_rng(20)
    truth = rng.integers(0, 3, 600)
    x = 5.0 * np.eye(3)[truth] @ rng.normal(size=(3, 6)) + rng.normal(size=(600, 6))
    x[:, 5] *= 1000.0  # standardised per column: a column's unit does not decide the clusters
    found = own_personas(x=x, k=3, generator=np.random.default_rng(0))
    assert found.shape == (600,) and set(np.unique(found)) == {0, 1, 2}
    assert adjusted_rand_score(truth, found) > 0.95
    np.testing.assert_array_equal(found, own_personas(x=x, k=3, generator=np.random.default_rng(0)))


def test_own_personas_refuse_bad_input() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ConfigError, match="k must be an integer >= 2, got 1"):
        own_personas(x=x, k=1, generator=np.random.default_rng(0))
    x[3, 1] = np.nan
    with pytest.raises(DataError, match="1 missing or infinite"):
        own_personas(x=x, k=2, generator=np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"numpy\.random\.Generator"):
        own_personas(x=np.ones((5, 2)), k=2, generator=0)  # type: ignore[arg-type]


def test_bad_inputs_are_listed_in_one_error() -> None:
    x_enc, x_raw = rows(50, seed=0)
    y = np.r_[np.zeros(25), np.ones(25)]
    y[7] = 2.0
    x_enc[3, 2] = np.nan
    with pytest.raises(DataError) as caught:
        fit_own_models(x_enc=x_enc, x_raw=x_raw[:40], y=y, generator=np.random.default_rng(0))
    text = str(caught.value)
    assert "y: labels must be 0, 1 or NaN" in text and "the first is row 7 with 2.0" in text
    assert "x_raw: has 40 rows but y has 50" in text
    assert "x_enc: 1 missing value(s) (NaN), the first at (3, 2)" in text
    with pytest.raises(DataError, match=r"single class \(0 positive, 50 negative, 0 unlabelled\)"):
        fit_own_models(x_enc=rows(50, seed=0)[0], x_raw=x_raw, y=np.zeros(50), generator=np.random.default_rng(0))
    with pytest.raises(DataError, match="1-D array"):
        fit_own_models(x_enc=x_enc, x_raw=x_raw, y=np.zeros((50, 1)), generator=np.random.default_rng(0))
