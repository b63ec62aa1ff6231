"""Synthetic silos: realistic-looking tables with recoverable ground-truth personas.

One parametrised suite runs on every kind. Tolerances are stated next to each check; row
counts are chosen so that sampling noise stays well inside them (at 20,000 rows the standard
error of a rate near 0.3 is about 0.003).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from fedpersona.data.schema import (
    KINDS,
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    Schema,
    SequenceFeature,
    TextFeature,
)
from fedpersona.data.schema_reader import load_schema
from fedpersona.data.synthetic import (
    ARCHETYPES,
    TARGET_LABEL_RATES,
    TRAITS,
    Archetype,
    generate_frame,
    generate_silo,
    partner_mixes,
    synthetic_schema,
)
from fedpersona.errors import SchemaError

N_LARGE = 20_000
LABEL_TOLERANCE = 0.02  # absolute, around TARGET_LABEL_RATES (uniform mix)
MISSING_RANGE = (0.03, 0.10)  # every numeric column is complete or missing 3-10 %
MIN_ARI = 0.85
MAX_ONE_COLUMN_ARI = 0.6  # no single column recovers the personas on its own


@pytest.fixture(scope="module")
def large() -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    return {k: generate_frame(k, N_LARGE, rng=np.random.default_rng(7)) for k in KINDS}


def _numbers(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series.astype(str).replace("", np.nan)).to_numpy(dtype=np.float64)


def _missing(series: pd.Series) -> np.ndarray:
    return (series.astype(str) == "").to_numpy()


def _numeric_columns(schema: Schema) -> list[tuple[str, NumericFeature | SequenceFeature]]:
    return [
        (col, f)
        for f in schema.features
        if isinstance(f, NumericFeature) or (isinstance(f, SequenceFeature) and f.element == "numeric")
        for col in f.columns
    ]


def _kmeans_features(schema: Schema, frame: pd.DataFrame) -> np.ndarray:
    """Standardised numbers (log1p where the schema says log, median-imputed), one-hot
    vocabulary categories, 0/1 booleans; hashed categories and text are left out."""
    blocks: list[np.ndarray] = []
    for col, feat in _numeric_columns(schema):
        x = _numbers(frame[col])
        if feat.log:
            x = np.log1p(x - feat.lo)
        x = np.where(np.isnan(x), np.nanmedian(x), x)
        blocks.append(((x - x.mean()) / x.std())[:, None])
    for other in schema.features:
        if isinstance(other, CategoricalFeature | SequenceFeature) and other.vocabulary:
            for col in other.columns:
                values = frame[col].astype(str).to_numpy()
                blocks.append((values[:, None] == np.array(other.vocabulary)[None, :]) * 1.0)
        elif isinstance(other, BooleanFeature):
            values = frame[other.column].astype(str).to_numpy()
            blocks.append(np.isin(values, other.true_values)[:, None] * 1.0)
    return np.hstack(blocks)


# --- archetypes --------------------------------------------------------------------------------


def test_archetypes_are_six_frozen_distinct_personas() -> None:
    assert len(ARCHETYPES) == 6
    assert len({a.name for a in ARCHETYPES}) == 6
    assert all(isinstance(a, Archetype) and a.description for a in ARCHETYPES)
    assert all(len(a.traits) == len(TRAITS) for a in ARCHETYPES)
    assert {"age", "income", "digital", "financial_risk", "health_risk"} <= set(TRAITS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCHETYPES[0].age = 0.0  # type: ignore[misc]
    means = np.array([a.traits for a in ARCHETYPES])
    gaps = np.linalg.norm(means[:, None] - means[None, :], axis=2)[np.triu_indices(6, 1)]
    assert gaps.min() > 2.0  # well apart in latent space (within-archetype sd is 0.3)


# --- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_packaged_schema_parses_and_matches_the_frame(kind: str) -> None:
    path = resources.files("fedpersona").joinpath("schemas", f"synthetic_{kind}.toml")
    assert path.is_file()
    schema = synthetic_schema(kind)
    loaded = load_schema(str(path))
    assert (loaded.features, loaded.labels) == (schema.features, schema.labels)
    assert schema.kind == kind
    assert schema.id_column == "user_id"
    assert len(schema.labels) == 1
    types = {f.type for f in schema.features}
    assert {"numeric", "categorical", "boolean"} <= types
    frame, _ = generate_frame(kind, 50, rng=np.random.default_rng(0))
    assert set(frame.columns) == set(schema.input_columns)


def test_ecommerce_schema_has_text_hashed_region_and_category_sequence() -> None:
    schema = synthetic_schema("ecommerce")
    by_name = {f.name: f for f in schema.features}
    assert isinstance(by_name["last_search"], TextFeature)
    region = by_name["region"]
    assert isinstance(region, CategoricalFeature) and region.buckets and not region.vocabulary
    cats = by_name["recent_categories"]
    assert isinstance(cats, SequenceFeature) and cats.element == "categorical"
    assert cats.columns == tuple(f"cat_{i}" for i in range(1, 6))
    assert cats.vocabulary is not None and len(cats.vocabulary) == 12


def test_finance_schema_has_three_monthly_sequences() -> None:
    seqs = {f.name: f for f in synthetic_schema("finance").features if f.type == "sequence"}
    assert set(seqs) == {"repayment_status", "balance", "payment"}
    assert all(len(s.columns) == 6 for s in seqs.values())
    assert seqs["balance"].log and seqs["payment"].log
    assert seqs["repayment_status"].element == "categorical"


def test_unknown_kind_is_rejected_with_the_valid_kinds() -> None:
    with pytest.raises(ValueError, match="ecommerce, finance, health"):
        synthetic_schema("retail")


# --- generated frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_frame_different_seed_different_frame(kind: str) -> None:
    a, pa_ = generate_frame(kind, 300, rng=np.random.default_rng(11))
    b, pb = generate_frame(kind, 300, rng=np.random.default_rng(11))
    c, pc = generate_frame(kind, 300, rng=np.random.default_rng(12))
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_array_equal(pa_, pb)
    assert not a.drop(columns="user_id").equals(c.drop(columns="user_id"))
    assert not np.array_equal(pa_, pc)


@pytest.mark.parametrize("kind", KINDS)
def test_ids_persona_and_row_count(kind: str) -> None:
    frame, persona = generate_frame(kind, 1234, rng=np.random.default_rng(0))
    assert len(frame) == 1234 and persona.shape == (1234,) and persona.dtype == np.int64
    assert set(np.unique(persona)) == set(range(6))
    ids = frame["user_id"].astype(str)
    assert ids.is_unique
    assert ids.str.fullmatch(r"[EFH]\d{6}").all()
    assert ids.str[0].nunique() == 1


@pytest.mark.parametrize("kind", KINDS)
def test_label_rate_near_the_real_dataset(kind: str, large) -> None:
    frame, _ = large[kind]
    label = synthetic_schema(kind).labels[0]
    rate = frame[label.column].astype(str).isin(label.positive).mean()
    assert abs(rate - TARGET_LABEL_RATES[kind]) < LABEL_TOLERANCE, rate


@pytest.mark.parametrize("kind", KINDS)
def test_some_numeric_columns_miss_three_to_ten_percent(kind: str, large) -> None:
    frame, _ = large[kind]
    rates = {col: _missing(frame[col]).mean() for col, _ in _numeric_columns(synthetic_schema(kind))}
    with_gaps = {c: r for c, r in rates.items() if r > 0}
    assert len(with_gaps) >= 2
    lo, hi = MISSING_RANGE
    assert all(lo <= r <= hi for r in with_gaps.values()), with_gaps
    assert len(with_gaps) < len(rates)  # most columns are complete


@pytest.mark.parametrize("kind", KINDS)
def test_values_fit_the_public_schema(kind: str, large) -> None:
    frame, _ = large[kind]
    schema = synthetic_schema(kind)
    for col, feat in _numeric_columns(schema):
        x = _numbers(frame[col])
        x = x[~np.isnan(x)]
        assert x.min() >= feat.lo and x.max() <= feat.hi, col
    for other in schema.features:
        if isinstance(other, CategoricalFeature | SequenceFeature) and other.vocabulary:
            for col in other.columns:
                seen = set(frame[col].astype(str)) - {""}
                assert seen <= set(other.vocabulary), (col, seen - set(other.vocabulary))
                assert len(seen) >= 2, col
        elif isinstance(other, BooleanFeature):
            values = frame[other.column].astype(str)
            assert values.isin(other.true_values + other.false_values).all(), other.name
            assert 0.02 < values.isin(other.true_values).mean() < 0.98, other.name


@pytest.mark.parametrize("kind", KINDS)
def test_amounts_and_durations_are_right_skewed(kind: str, large) -> None:
    frame, _ = large[kind]
    logged = [col for col, f in _numeric_columns(synthetic_schema(kind)) if f.log]
    assert len(logged) >= 3
    for col in logged:
        x = pd.Series(_numbers(frame[col])).dropna()
        assert x.mean() > x.median(), col
        assert x.skew() > 0.5, col


def test_ecommerce_text_and_category_sequence(large) -> None:
    frame, persona = large["ecommerce"]
    words = frame["last_search"].astype(str).str.split(" ")
    n_words = words.str.len()
    assert (frame["last_search"].astype(str).str.len() > 0).all()
    assert set(n_words) == {1, 2, 3, 4}
    assert (frame["last_search"].astype(str) == frame["last_search"].astype(str).str.lower()).all()
    # Queries carry the persona: the archetypes' favourite words differ.
    first = words.str[0]
    top = [first[persona == k].value_counts().index[0] for k in range(6)]
    assert len(set(top)) >= 5
    # cat_1 (most recent) is always there; older purchases are missing more and more often.
    gaps = [_missing(frame[f"cat_{i}"]).mean() for i in range(1, 6)]
    assert gaps[0] == 0.0 and all(a < b for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 0.95  # but the sequence is usually more than one step long
    # A missing step is never followed by a present one.
    present = np.stack([~_missing(frame[f"cat_{i}"]) for i in range(1, 6)], axis=1)
    assert (present[:, 1:] <= present[:, :-1]).all()
    assert frame["region"].nunique() > 100


def test_finance_sequences_vary_month_to_month(large) -> None:
    frame, _ = large["finance"]
    bills = np.stack([_numbers(frame[f"bill_amt_{m}"]) for m in range(1, 7)], axis=1)
    assert not np.isnan(bills).any()
    assert (np.std(bills, axis=1) > 0).mean() > 0.9
    corr = np.corrcoef(np.log1p(bills[:, 0]), np.log1p(bills[:, 1]))[0, 1]
    assert 0.5 < corr < 0.999  # a person's balance persists, with month-to-month noise
    statuses = pd.unique(frame[[f"pay_status_{m}" for m in range(1, 7)]].to_numpy().ravel())
    assert len(statuses) == 6


def test_health_vitals_are_plausible(large) -> None:
    frame, _ = large["health"]
    sys_bp, dia_bp = _numbers(frame["systolic_bp"]), _numbers(frame["diastolic_bp"])
    assert (sys_bp > dia_bp).mean() > 0.99
    assert 110 < np.median(sys_bp) < 140
    bmi = _numbers(frame["bmi"])
    assert 22 < np.nanmedian(bmi) < 32
    assert set(frame["general_health"].astype(str)) == {"1", "2", "3", "4", "5"}


@pytest.mark.parametrize(
    ("kind", "high", "low"),
    [
        ("finance", "stretched_borrower", "affluent_professional"),
        ("health", "traditional_retiree", "wellness_enthusiast"),
        ("ecommerce", "affluent_professional", "traditional_retiree"),
    ],
)
def test_labels_follow_the_personas(kind: str, high: str, low: str, large) -> None:
    frame, persona = large[kind]
    label = synthetic_schema(kind).labels[0]
    positive = frame[label.column].astype(str).isin(label.positive).to_numpy()
    names = [a.name for a in ARCHETYPES]
    assert positive[persona == names.index(high)].mean() > 2 * positive[persona == names.index(low)].mean()


@pytest.mark.parametrize("kind", KINDS)
def test_kmeans_recovers_the_archetypes(kind: str) -> None:
    frame, persona = generate_frame(kind, 3000, rng=np.random.default_rng(2024))
    schema = synthetic_schema(kind)
    x = _kmeans_features(schema, frame)
    labels = KMeans(n_clusters=6, n_init=10, random_state=0).fit_predict(x)
    assert adjusted_rand_score(persona, labels) >= MIN_ARI
    # ...but no single numeric column gives them away.
    for col, feat in _numeric_columns(schema):
        one = _kmeans_features(
            dataclasses.replace(schema, features=(NumericFeature(col, col, feat.lo, feat.hi, feat.log),)),
            frame,
        )
        ari = adjusted_rand_score(persona, KMeans(6, n_init=3, random_state=0).fit_predict(one))
        assert ari < MAX_ONE_COLUMN_ARI, (col, ari)


@pytest.mark.parametrize("kind", KINDS)
def test_mix_sets_the_persona_frequencies(kind: str) -> None:
    mix = np.array([0.5, 0.0, 0.3, 0.0, 0.2, 0.0])
    _, persona = generate_frame(kind, 20_000, rng=np.random.default_rng(3), mix=mix)
    freq = np.bincount(persona, minlength=6) / len(persona)
    np.testing.assert_allclose(freq, mix, atol=0.015)
    _, only = generate_frame(kind, 100, rng=np.random.default_rng(3), mix=np.eye(6)[4])
    assert (only == 4).all()


# --- partner mixes -------------------------------------------------------------------------------


def test_partner_mixes_are_probability_vectors_and_non_iid() -> None:
    mixes = partner_mixes(8, alpha=0.3, rng=np.random.default_rng(0))
    assert mixes.shape == (8, 6)
    assert (mixes >= 0).all()
    np.testing.assert_allclose(mixes.sum(axis=1), 1.0, atol=1e-12)
    # partners differ: each persona's share varies across partners
    assert mixes.std(axis=0).min() > 0.02
    assert len({int(np.argmax(m)) for m in mixes}) >= 3
    # small alpha concentrates each partner on few personas, large alpha nears uniform
    flat = partner_mixes(200, alpha=100.0, rng=np.random.default_rng(1))
    peaked = partner_mixes(200, alpha=0.1, rng=np.random.default_rng(1))
    assert peaked.max(axis=1).mean() > 0.6 > 0.25 > flat.max(axis=1).mean()


def test_partner_mixes_are_deterministic() -> None:
    a = partner_mixes(4, alpha=0.5, rng=np.random.default_rng(9))
    b = partner_mixes(4, alpha=0.5, rng=np.random.default_rng(9))
    c = partner_mixes(4, alpha=0.5, rng=np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# --- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "shop"}, "unknown kind 'shop'; valid kinds: ecommerce, finance, health"),
        ({"rows": 0}, "rows must be >= 1, got 0"),
        ({"rows": 2.5}, "rows must be an integer"),
        ({"rows": True}, "rows must be an integer"),
        ({"rng": 42}, "rng must be a numpy.random.Generator"),
        ({"mix": np.ones(5) / 5}, r"mix must have shape \(6,\)"),
        ({"mix": np.array([1.2, -0.2, 0, 0, 0, 0])}, "mix must hold finite probabilities >= 0"),
        ({"mix": np.full(6, np.nan)}, "mix must hold finite probabilities"),
        ({"mix": np.full(6, 0.5)}, "mix must sum to 1"),
    ],
)
def test_generate_frame_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"kind": "health", "rows": 10, "rng": np.random.default_rng(0)}
    args.update(kwargs)
    kind, rows = args.pop("kind"), args.pop("rows")
    with pytest.raises(ValueError, match=message):
        generate_frame(kind, rows, **args)


@pytest.mark.parametrize(
    ("n", "alpha", "message"),
    [
        (0, 1.0, "n_partners must be >= 1, got 0"),
        (2.0, 1.0, "n_partners must be an integer"),
        (3, 0.0, "alpha must be > 0, got 0.0"),
        (3, -1.0, "alpha must be > 0"),
        (3, float("inf"), "alpha must be a finite number"),
        (3, "1", "alpha must be a finite number"),
    ],
)
def test_partner_mixes_rejects_bad_arguments(n, alpha, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partner_mixes(n, alpha=alpha, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"rng must be a numpy\.random\.Generator"):
        partner_mixes(3, alpha=1.0, rng=None)  # type: ignore[arg-type]


def test_generate_silo_rejects_a_bad_seed() -> None:
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        generate_silo("finance", 100, seed=-1)


# --- validated silos -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_generated_silo_validates(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    mix = partner_mixes(1, alpha=0.5, rng=np.random.default_rng(1))[0]
    with caplog.at_level(logging.INFO, logger="fedpersona"):
        silo = generate_silo(kind, 2000, seed=5, mix=mix)
    assert not [r for r in caplog.records if "clipped" in r.getMessage()]  # bounds cover it
    assert len(silo.table) == 2000 == len(silo.frame) == len(silo.persona)
    assert silo.table.source == f"synthetic:{kind}"
    assert list(silo.table.ids) == list(silo.frame["user_id"])
    (label,) = silo.table.labels.values()
    assert not np.isnan(label).any() and 0 < label.mean() < 1
    again = generate_silo(kind, 2000, seed=5, mix=mix)
    pd.testing.assert_frame_equal(silo.frame, again.frame)
    np.testing.assert_array_equal(silo.persona, again.persona)
    with pytest.raises(dataclasses.FrozenInstanceError):
        silo.frame = silo.frame  # type: ignore[misc]


def test_a_too_small_silo_fails_validation() -> None:
    with pytest.raises(SchemaError, match=r"fewer than table\.min_rows"):
        generate_silo("ecommerce", 5, seed=0)
