"""The public dense featurization (fedpersona.data.dense).

Values are checked against numbers worked out by hand for a small table (tolerance 1e-6,
float32); the text hashing against a plain per-row implementation of its definition (exact);
row-locality by featurizing rows alone, in other tables, in small blocks and on two threads
(exact, bit for bit); the layout against the views for every shipped and synthetic schema.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpersona.data import dense
from fedpersona.data.dense import (
    DenseLayout,
    DenseViews,
    dense_layout,
    dense_views,
    ngram_hashes,
    persona_view,
    token_hashes,
)
from fedpersona.data.schema import KINDS, CategoricalFeature, NumericFeature, Schema, SequenceFeature, TextFeature
from fedpersona.data.schema_reader import load_schema, parse_schema
from fedpersona.data.synthetic import generate_silo, synthetic_schema
from fedpersona.data.tables import Table, validate_frame

ROOT = Path(__file__).parents[1]
SHIPPED = sorted((ROOT / "clients").glob("*/schema*.toml"))
Z90 = 1.6448536269514722  # the standard normal's 95th percentile: typical = 2 * Z90 spreads
TOL = 1e-6

# --- a small table worked out by hand --------------------------------------------------------

HAND = {
    "table": {"kind": "finance", "min_rows": 1, "id": "ID"},
    "features": {
        "AGE": {"type": "numeric", "bounds": [0, 100], "typical": [20, 60], "edges": [25, 50]},
        "VISITS": {"type": "numeric", "bounds": [0, 1000], "log": True, "edges": [9, 99]},
        "OWNER": {"type": "boolean"},
        "PLAN": {"type": "categorical", "vocabulary": ["basic", "gold"]},
        "CITY": {"type": "categorical", "buckets": 8},
        "NOTE": {"type": "text", "buckets": 64, "ngrams": [1, 1]},
        "BILL": {"type": "sequence", "columns": ["B1", "B2"], "bounds": [0, 1000], "typical": [100, 300]},
        "STATUS": {
            "type": "sequence", "columns": ["S1", "S2", "S3"], "element": "categorical",
            "vocabulary": ["paid", "late"],
        },
    },
    "labels": {"Y": {"positive": ["1"]}},
}  # fmt: skip

HAND_ROWS = {
    "ID": ["a", "b", "c"],
    "AGE": ["40", "", "100"],
    "VISITS": ["99", "0", "1000"],
    "OWNER": ["yes", "", "no"],
    "PLAN": ["gold", "silver", ""],
    "CITY": ["paris", "", "rome"],
    "NOTE": ["Red red SHOES", "", "..."],
    "B1": ["300", "1000", ""],
    "B2": ["", "0", ""],
    "S1": ["paid", "", "late"],
    "S2": ["late", "", ""],
    "S3": ["paid", "", ""],
    "Y": ["1", "0", ""],
}


def hand_table(rows: dict[str, list[str]] | None = None) -> Table:
    frame = pd.DataFrame({k: pd.Series(v, dtype="str") for k, v in (rows or HAND_ROWS).items()})
    return validate_frame(parse_schema(HAND, source="hand"), frame, source="hand.csv")


def word_hash(word: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8, key=key.encode()[:64]).digest(), "little")


def fmix(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def unigram_column(word: str, key: str, buckets: int, width: int) -> int:
    return (fmix(word_hash(word, key) ^ 1) % buckets) % width


def test_layout_names_every_column_and_its_feature() -> None:
    layout = dense_layout(parse_schema(HAND))
    assert layout.persona_columns == (
        "AGE", "VISITS", "OWNER", "PLAN=basic", "PLAN=gold", "PLAN=<other>",
        *(f"NOTE#{k}" for k in range(64)), "B1", "B2", "BILL:mean", "STATUS=paid", "STATUS=late", "STATUS=<other>",
    )  # fmt: skip
    assert layout.label_columns == (
        "AGE:0..25", "AGE:25..50", "AGE:50..100", "AGE:absent",
        "VISITS:0..9", "VISITS:9..99", "VISITS:99..1000", "VISITS:absent",
        "OWNER", "PLAN=basic", "PLAN=gold", "PLAN=<other>", *(f"NOTE#{k}" for k in range(64)),
        "B1", "B1:absent", "B2", "B2:absent", "STATUS=paid", "STATUS=late", "STATUS=<other>",
    )  # fmt: skip
    assert layout.persona_features[:6] == ("AGE", "VISITS", "OWNER", "PLAN", "PLAN", "PLAN")
    assert layout.label_features[:9] == ("AGE",) * 4 + ("VISITS",) * 4 + ("OWNER",)
    assert layout.label_features[-7:] == ("BILL",) * 4 + ("STATUS",) * 3
    assert layout.persona_block("CITY") == layout.label_block("CITY") == slice(0, 0)  # hashed: left out
    assert layout.persona_block("BILL") == slice(70, 73)
    assert layout.label_block("NOTE") == slice(12, 76)
    assert (layout.persona_width, layout.label_width) == (76, 83)


def test_persona_view_by_hand() -> None:
    views = dense_views(hand_table())
    p = views.persona
    layout = views.layout
    col = {name: j for j, name in enumerate(layout.persona_columns)}
    v99 = math.log(100) / math.log(1001)  # VISITS = 99 on its log scale
    bill_spread = 0.2 / (2 * Z90)  # typical [100, 300] of [0, 1000]: width 0.2, centre 0.2
    expected_rows: list[dict[str, float]] = [
        {"AGE": 0.0, "VISITS": (v99 - 0.5) / 0.5, "OWNER": 0.5, "PLAN=gold": 0.5,
         "B1": (0.1 / bill_spread) / math.sqrt(2), "B2": 0.0, "BILL:mean": (0.1 / bill_spread) / 2,
         "STATUS=paid": 1.5 * 2 / math.sqrt(5), "STATUS=late": 1.5 / math.sqrt(5)},
        {"AGE": 0.0, "VISITS": -1.0, "OWNER": 0.0, "PLAN=<other>": 0.5,
         "B1": 6.0 / math.sqrt(2), "B2": (-0.2 / bill_spread) / math.sqrt(2),
         "BILL:mean": (6.0 - 0.2 / bill_spread) / 2},
        {"AGE": 0.6 / (0.4 / (2 * Z90)), "VISITS": 1.0, "OWNER": -0.5, "STATUS=late": 1.5},
    ]  # fmt: skip
    red, shoes = unigram_column("red", "NOTE", 64, 64), unigram_column("shoes", "NOTE", 64, 64)
    assert red != shoes  # (the hand values below assume two different columns)
    expected_rows[0][f"NOTE#{red}"] = 2.0 * 2 / math.sqrt(5)
    expected_rows[0][f"NOTE#{shoes}"] = 2.0 * 1 / math.sqrt(5)
    for i, expected in enumerate(expected_rows):
        want = np.zeros(layout.persona_width)
        for name, value in expected.items():
            want[col[name]] = value
        np.testing.assert_allclose(p[i], want, atol=TOL, err_msg=f"row {i}")
    assert p.dtype == np.float32 and views.label.dtype == np.float32


def test_label_view_by_hand() -> None:
    views = dense_views(hand_table())
    layout = views.layout
    col = {name: j for j, name in enumerate(layout.label_columns)}
    third = math.log(10) / math.log(1001)  # the edges 9 and 99 on VISITS's log scale
    assert (third, 2 * third) == pytest.approx((1 / 3, 2 / 3), abs=1e-4)  # VISITS = 99 ends the 2nd piece
    # PLE pieces and absent flags of the numbers, before centring (every one of their columns - 0.5)
    numbers: list[dict[str, float]] = [
        {"AGE:0..25": 1.0, "AGE:25..50": (40 - 25) / 25, "VISITS:0..9": 1.0, "VISITS:9..99": 1.0,
         "B1": 0.3, "B2:absent": 1.0},
        {"AGE:absent": 1.0, "B1": 1.0},  # VISITS = 0 and B2 = 0: every piece 0, present
        {"AGE:0..25": 1.0, "AGE:25..50": 1.0, "AGE:50..100": 1.0, "VISITS:0..9": 1.0, "VISITS:9..99": 1.0,
         "VISITS:99..1000": 1.0, "B1:absent": 1.0, "B2:absent": 1.0},
    ]  # fmt: skip
    red, shoes = unigram_column("red", "NOTE", 64, 64), unigram_column("shoes", "NOTE", 64, 64)
    # every other feature: its persona encoding (booleans +-0.5, one-hot x 0.5, text x 2, profile x 1.5)
    others: list[dict[str, float]] = [
        {"OWNER": 0.5, "PLAN=gold": 0.5, f"NOTE#{red}": 2.0 * 2 / math.sqrt(5), f"NOTE#{shoes}": 2.0 / math.sqrt(5),
         "STATUS=paid": 1.5 * 2 / math.sqrt(5), "STATUS=late": 1.5 / math.sqrt(5)},
        {"PLAN=<other>": 0.5},
        {"OWNER": -0.5, "STATUS=late": 1.5},
    ]  # fmt: skip
    is_number = np.isin(np.array(layout.label_features), ["AGE", "VISITS", "BILL"])
    assert is_number.sum() == 4 + 4 + 4
    for i in range(3):
        want = np.where(is_number, -0.5, 0.0)
        for name, value in numbers[i].items():
            want[col[name]] += value
        for name, value in others[i].items():
            want[col[name]] = value
        np.testing.assert_allclose(views.label[i], want, atol=TOL, err_msg=f"row {i}")
        for feature in ("OWNER", "PLAN", "NOTE", "STATUS"):  # the same numbers as the persona view, exactly
            assert np.array_equal(
                views.label[i, layout.label_block(feature)], views.persona[i, layout.persona_block(feature)]
            )


def test_labels_never_enter_the_views() -> None:
    rows = dict(HAND_ROWS)
    flipped = hand_table({**rows, "Y": ["0", "1", "1"]})
    base = dense_views(hand_table())
    other = dense_views(flipped)
    assert np.array_equal(base.persona, other.persona) and np.array_equal(base.label, other.label)
    assert "Y" not in base.layout.persona_features + base.layout.label_features


# --- the text hashing equals a plain per-row implementation of its definition ---------------

_CUT = re.compile(r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+")  # runs of non-cutting characters
_ALNUM = re.compile(r"[^\W_]+")


def reference_ngrams(text: str | None, key: str, ngrams: tuple[int, int], max_tokens: int) -> list[int]:
    """The module docstring's definition, one row at a time with Python integers."""
    if text is None:
        return []
    words = [w for piece in _CUT.findall(text) for w in _ALNUM.findall(piece.lower())][:max_tokens]
    hashes = [word_hash(w, key) for w in words]
    out = []
    for n in range(ngrams[0], ngrams[1] + 1):
        for i in range(len(hashes) - n + 1):
            g = hashes[i]
            for t in hashes[i + 1 : i + n]:
                g = (g * 0x9E3779B97F4A7C15 + t) & ((1 << 64) - 1)
            out.append(fmix(g ^ n))
    return sorted(out)


ALPHABET = list("abcXYZ019 ,.;:'!?-_/\t\n\réÉüÜßçñΣσςΑβЖжя中文字İıǅ\u00a0\u2014\u2019\u201c\u0301\u0307😀")


def random_texts(rng: np.random.Generator, n: int) -> np.ndarray:
    out: list[str | None] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.05:
            out.append(None)
        elif kind < 0.1:
            out.append("")
        else:
            length = int(rng.integers(1, 60))
            out.append("".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), length)))
    return np.array(out, dtype=object)


@pytest.mark.parametrize(("ngrams", "max_tokens"), [((1, 2), 32), ((1, 3), 5), ((2, 2), 4), ((1, 1), 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_text_hashing_equals_the_per_row_definition(
    ngrams: tuple[int, int], max_tokens: int, seed: int
) -> None:
    texts = random_texts(np.random.default_rng(seed), 400)
    rows, hashes = ngram_hashes(texts, key="search query", ngrams=ngrams, max_tokens=max_tokens)
    assert rows.dtype == np.int64 and hashes.dtype == np.uint64
    got: list[list[int]] = [[] for _ in texts]
    for r, h in zip(rows.tolist(), hashes.tolist(), strict=True):
        got[r].append(h)
    for i, text in enumerate(texts):
        assert sorted(got[i]) == reference_ngrams(text, "search query", ngrams, max_tokens), repr(text)
    assert sum(len(g) > 0 for g in got) > 300  # the random texts do make words


def test_text_words_follow_the_definition() -> None:
    texts = np.array(["Hello, WORLD_wide  café—Bar", "naïve 42x", None], dtype=object)
    rows, hashes = ngram_hashes(texts, key="k", ngrams=(1, 1), max_tokens=32)
    words = [["hello", "world", "wide", "café", "bar"], ["naïve", "42x"], []]
    for i, expected in enumerate(words):
        assert sorted(hashes[rows == i].tolist()) == sorted(fmix(word_hash(w, "k") ^ 1) for w in expected)


def test_token_hashes_are_keyed_blake2b() -> None:
    assert token_hashes(["red", "Red"], key="NOTE").tolist() == [word_hash("red", "NOTE"), word_hash("Red", "NOTE")]
    assert token_hashes(["red"], key="NOTE")[0] != token_hashes(["red"], key="TITLE")[0]
    assert token_hashes([], key="NOTE").shape == (0,)


# --- row-locality: a row featurizes the same alone as in any table ----------------------------


def random_table(schema: Schema, n: int, rng: np.random.Generator) -> Table:
    """A table of ``n`` random rows for any schema: values inside and at the bounds, unseen
    categories, empty texts and missing cells."""
    columns: dict[str, np.ndarray] = {}
    for feat in schema.features:
        for column in feat.columns:
            gone = rng.random(n) < 0.15
            if feat.type == "boolean":
                values: np.ndarray = rng.integers(0, 2, n).astype(np.float64)
            elif feat.type in ("numeric", "sequence") and getattr(feat, "element", "numeric") == "numeric":
                lo, hi = feat.lo, feat.hi  # type: ignore[union-attr]
                values = np.where(rng.random(n) < 0.1, rng.choice([lo, hi], n), lo + (hi - lo) * rng.random(n) ** 3)
            elif isinstance(feat, TextFeature):
                values = random_texts(rng, n)
            else:
                assert isinstance(feat, CategoricalFeature | SequenceFeature)
                words = [*(feat.vocabulary or ()), "unseen", "x1", "x2", "x3"]
                values = np.array([words[i] for i in rng.integers(0, len(words), n)], dtype=object)
            if values.dtype == object:
                values[gone] = None
            else:
                values[gone] = np.nan
            columns[column] = values
    ids = np.array([f"u{i}" for i in range(n)], dtype=object)
    return Table(schema=schema, source="random", ids=ids, columns=columns, labels={})


def all_schemas() -> list[Schema]:
    return [load_schema(path) for path in SHIPPED] + [synthetic_schema(kind) for kind in KINDS]


@pytest.mark.parametrize("schema", all_schemas(), ids=lambda s: f"{s.kind}:{s.name}")
def test_layout_matches_the_views_for_every_shipped_schema(schema: Schema) -> None:
    layout = dense_layout(schema)
    views = dense_views(random_table(schema, 50, np.random.default_rng(3)))
    assert views.persona.shape == (50, layout.persona_width)
    assert views.label.shape == (50, layout.label_width)
    assert views.layout == layout
    names = {f.name for f in schema.features}
    for columns, features in (
        (layout.persona_columns, layout.persona_features),
        (layout.label_columns, layout.label_features),
    ):
        assert len(set(columns)) == len(columns), "column names are unique"
        assert set(features) <= names
    numbers = {
        f.name for f in schema.features
        if isinstance(f, NumericFeature) or (isinstance(f, SequenceFeature) and f.element == "numeric")
    }  # fmt: skip
    hashed = {
        f.name for f in schema.features
        if isinstance(f, CategoricalFeature | SequenceFeature) and f.name not in numbers and f.vocabulary is None
    }  # fmt: skip
    assert set(layout.persona_features) == set(layout.label_features) == names - hashed
    assert np.isfinite(views.persona).all() and np.isfinite(views.label).all()
    assert np.abs(views.persona).max() <= 6.0 + TOL
    is_number = np.isin(np.array(layout.label_features), sorted(numbers))
    assert np.abs(views.label[:, is_number]).max() <= 0.5 + TOL  # PLE pieces and flags, centred
    for feature in names - hashed - numbers:  # everything else: the persona encoding, bit for bit
        assert np.array_equal(
            views.label[:, layout.label_block(feature)], views.persona[:, layout.persona_block(feature)]
        )


@pytest.mark.parametrize("schema", all_schemas(), ids=lambda s: f"{s.kind}:{s.name}")
def test_a_row_featurizes_the_same_alone_as_in_any_table(schema: Schema, monkeypatch: pytest.MonkeyPatch) -> None:
    table = random_table(schema, 60, np.random.default_rng(5))
    whole = dense_views(table)
    for i in (0, 17, 59):
        alone = dense_views(table.take(np.array([i])))
        assert np.array_equal(alone.persona[0], whole.persona[i]) and np.array_equal(alone.label[0], whole.label[i])
    order = np.random.default_rng(6).permutation(60)[:45]
    subset = dense_views(table.take(order))
    assert np.array_equal(subset.persona, whole.persona[order]) and np.array_equal(subset.label, whole.label[order])
    monkeypatch.setattr(dense, "_CHUNK_ROWS", 7)  # small blocks, on two threads
    blocked = dense_views(table, threads=2)
    assert np.array_equal(blocked.persona, whole.persona) and np.array_equal(blocked.label, whole.label)


def test_synthetic_views_are_row_local_across_kinds() -> None:
    for kind in KINDS:
        table = generate_silo(kind, 300, seed=2).table
        whole = dense_views(table)
        again = dense_views(table.take(np.arange(299, -1, -1)))
        assert np.array_equal(again.persona, whole.persona[::-1]) and np.array_equal(again.label, whole.label[::-1])


# --- the front door checks its input ---------------------------------------------------------


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        dense_views(hand_table(), threads=0)
    with pytest.raises(ValueError, match="one entry per column"):
        DenseLayout(persona_columns=("a",), persona_features=(), label_columns=(), label_features=())
    layout = dense_layout(parse_schema(HAND))
    with pytest.raises(ValueError, match="do not match the layout"):
        DenseViews(layout=layout, persona=np.zeros((2, 3), np.float32), label=np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("kind", ["ecommerce", "finance", "health"])
def test_the_persona_view_alone_equals_the_one_of_both_views(kind: str) -> None:
    table = generate_silo(kind, 500, seed=3).table
    np.testing.assert_array_equal(persona_view(table), dense_views(table).persona)
    np.testing.assert_array_equal(persona_view(table, threads=2), dense_views(table).persona)
