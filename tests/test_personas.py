"""Persona cards: effect sizes by hand, surrogate fidelity per kind, suppression, recommendations."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from benchmarks.surrogate_fidelity import DATA, PRIMARY, encoder_personas, primary_table
from benchmarks.surrogate_fidelity import fidelity as surrogate_fidelity
from fedpersona.data.schema_reader import parse_schema
from fedpersona.data.synthetic import SyntheticSilo, generate_silo
from fedpersona.data.tables import Table, validate_frame
from fedpersona.personas.cards import Effect, PersonaCard, hit_rate_at_k, persona_cards

TINY_SCHEMA = {
    "table": {"kind": "ecommerce", "id": "id", "min_rows": 1},
    "features": {
        "spend": {"type": "numeric", "bounds": [0, 100]},
        "device": {"type": "categorical", "vocabulary": ["mobile", "desktop", "tablet"]},
        "promo": {"type": "boolean"},
        "cats": {
            "type": "sequence", "columns": ["c1", "c2"], "element": "categorical",
            "vocabulary": ["toys", "books", "garden"],
        },
    },
    "labels": {"bought": {"positive": ["1"]}},
}  # fmt: skip


def tiny_table() -> tuple[Table, np.ndarray]:
    """20 users: persona 0 = rows 1-10, persona 1 = rows 11-20 (all numbers chosen by hand)."""
    spend = [str(v) for v in range(1, 20)] + [""]  # persona 1's last user has no spend
    device = ["mobile"] * 8 + ["desktop"] * 2 + ["mobile"] * 2 + ["desktop"] * 5 + ["tablet"] * 3
    promo = ["1"] * 7 + ["0"] * 3 + ["1"] * 3 + ["0"] * 7
    c1 = ["toys"] * 10 + ["garden"] * 10
    c2 = ["books"] * 5 + [""] * 5 + ["toys"] * 3 + [""] * 7
    bought = ["1"] * 6 + ["0"] * 4 + ["1"] * 2 + ["0"] * 8
    frame = pd.DataFrame(
        {"id": [f"u{i}" for i in range(20)], "spend": spend, "device": device, "promo": promo,
         "c1": c1, "c2": c2, "bought": bought}
    )  # fmt: skip
    table = validate_frame(parse_schema(TINY_SCHEMA), frame, source="tiny")
    return table, np.repeat([0, 1], 10)


def effect(card: PersonaCard, feature: str) -> Effect:
    return next(e for e in card.features if e.feature == feature)


def test_effect_sizes_match_hand_computed_values() -> None:
    table, personas = tiny_table()
    cards = persona_cards(
        table, personas, k=2, rng=np.random.default_rng(0), min_users=2, category_feature="cats", top_features=10
    )
    zero, one = cards
    assert (zero.users, zero.share, one.users, one.share) == (10, 0.5, 10, 0.5)
    # spend, observed values only: the silo is 1..19 (mean 10, sample variance 19*20/12);
    # persona 0 is 1..10 (mean 5.5), persona 1 is 11..19 (mean 15).
    silo_sd = math.sqrt(19 * 20 / 12)
    assert effect(zero, "spend").effect == pytest.approx((5.5 - 10.0) / silo_sd)
    assert effect(one, "spend").effect == pytest.approx((15.0 - 10.0) / silo_sd)
    assert (effect(zero, "spend").persona, effect(zero, "spend").silo) == (5.5, 10.0)
    assert effect(one, "spend").users == 9
    # device: mobile is 8/10 in persona 0 and 10/20 in the silo -> lift 1.6; its standardised
    # difference (0.8 - 0.5) / 0.5 = 0.6 beats desktop's (0.2 - 0.35) / sqrt(0.35 * 0.65).
    device = effect(zero, "device")
    assert (device.value, device.effect, device.strength) == ("mobile", pytest.approx(1.6), pytest.approx(0.6))
    assert device.text.startswith("1.6× more likely to have device = mobile")
    # persona 1: mobile 2/10 -> lift 0.4, strength -0.6 (|-0.6| beats tablet's 0.42).
    assert (effect(one, "device").value, effect(one, "device").effect) == ("mobile", pytest.approx(0.4))
    assert "0.40× as likely" in effect(one, "device").text
    # promo: 7/10 vs 10/20 -> +0.2, standardised 0.2 / 0.5.
    promo = effect(zero, "promo")
    assert (promo.kind, promo.effect, promo.strength) == ("boolean", pytest.approx(0.2), pytest.approx(0.4))
    # Sorted by |standardised difference|: spend (0.80) > cats including toys
    # ((1 - 0.65) / sqrt(0.65 * 0.35) = 0.73) > device (0.6) > promo (0.4).
    assert [e.feature for e in zero.features] == ["spend", "cats", "device", "promo"]
    # Label: bought 6/10 in persona 0, 8/20 in the silo.
    (rate,) = zero.label_rates
    assert (rate.label, rate.rate, rate.silo_rate, rate.users) == ("bought", 0.6, 0.4, 6)
    # Categories (any of the two steps): books 5/10 vs 5/20 -> lift 2; toys 10/10 vs 13/20.
    lifts = {c.category: c.lift for c in zero.categories if not c.suppressed}
    assert lifts == {"books": pytest.approx(2.0), "toys": pytest.approx(20 / 13)}
    assert [c.category for c in zero.categories] == ["books", "toys", "garden"]  # garden: 0 users, hidden
    assert zero.categories[-1].suppressed and zero.categories[-1].lift is None
    assert zero.recommend(3) == ("toys", "books", "garden")  # persona's most frequent, then popular


def test_cells_under_min_users_are_suppressed_and_marked() -> None:
    table, personas = tiny_table()
    zero, one = persona_cards(table, personas, k=2, rng=np.random.default_rng(0), min_users=3, category_feature="cats")
    # persona 1 has 2 positive labels (< 3): hidden; persona 0 has 6: shown.
    assert one.label_rates[0].suppressed and one.label_rates[0].rate is None and one.label_rates[0].users is None
    assert not zero.label_rates[0].suppressed
    # persona 1 has 2 mobile users (< 3): hidden, so its strongest shown device cell is now
    # tablet ((0.3 - 0.15) / sqrt(0.15 * 0.85) = 0.42) rather than mobile (|-0.6|).
    assert effect(one, "device").value == "tablet"
    # persona 1 has 3 toys users (>= 3): shown; 0 books users: hidden.
    by_category = {c.category: c for c in one.categories}
    assert not by_category["toys"].suppressed and by_category["toys"].users == 3
    assert by_category["books"].suppressed and by_category["books"].rate is None
    # garden (10) and toys (3) are shown for persona 1; books comes from the silo's popularity.
    assert one.recommend(3) == ("garden", "toys", "books")


def test_a_persona_with_fewer_than_min_users_is_suppressed_entirely() -> None:
    silo = generate_silo("ecommerce", 1500, seed=2)
    personas = silo.persona.copy()
    personas[:7] = 6  # a seventh persona of 7 users
    cards = persona_cards(
        silo.table, personas, k=7, rng=np.random.default_rng(1), min_users=10, category_feature="recent_categories"
    )
    small = cards[6]
    assert small.suppressed and small.users is None and small.share is None
    assert small.features == () and small.label_rates == () and small.categories == () and small.rules == ()
    assert small.name  # still named, as suppressed
    # Its recommendations are the silo's most popular categories (users having each one).
    steps = silo.frame[[f"cat_{i}" for i in range(1, 6)]]
    users = {c: int((steps == c).any(axis=1).sum()) for c in pd.unique(steps.to_numpy().ravel()) if c}
    popular = tuple(sorted(users, key=lambda c: (-users[c], c))[:3])
    assert small.recommend(3) == popular
    for card in cards:
        for e in card.features:
            assert e.suppressed or (e.users is not None and e.users >= 10)
        for rate in card.label_rates:
            assert rate.suppressed or (rate.users is not None and rate.users >= 10)
        for c in card.categories:
            assert c.suppressed or (c.users is not None and c.users >= 10)
        for rule in card.rules:
            assert rule.suppressed or (rule.users is not None and rule.users >= 10)
    assert sum(c.users or 0 for c in cards) == 1500 - 7


@pytest.fixture(scope="module", params=["ecommerce", "finance", "health"])
def silo(request: pytest.FixtureRequest) -> SyntheticSilo:
    return generate_silo(str(request.param), 3000, seed=7)


def test_surrogate_tree_is_faithful_at_depth_three(silo: SyntheticSilo) -> None:
    cards = persona_cards(silo.table, silo.persona, k=6, rng=np.random.default_rng(0))
    fidelity = cards[0].fidelity
    # Measured with this seed: ecommerce 0.901, finance 0.914, health 0.893 (at 2,000 rows
    # over seeds 0-7 the lowest were 0.852, 0.907, 0.873).
    assert fidelity >= 0.85, fidelity
    assert all(card.fidelity == fidelity for card in cards)
    rules = [rule for card in cards for rule in card.rules]
    assert rules and len(rules) <= 8  # depth 3: at most 8 leaves
    assert all(rule.text and 1 <= len(rule.conditions) <= 3 for rule in rules)
    # Thresholds are in the features' own units: an age rule speaks of adult ages, not [0, 1].
    for rule in rules:
        for condition in rule.conditions:
            if condition.startswith("age") or " age " in f" {condition} ":
                numbers = [float(t) for t in condition.replace(",", "").split() if t.replace(".", "").isdigit()]
                assert all(18 <= x <= 100 for x in numbers), condition


def test_cards_have_names_effects_and_json(silo: SyntheticSilo) -> None:
    category = "recent_categories" if silo.table.schema.kind == "ecommerce" else None
    cards = persona_cards(silo.table, silo.persona, k=6, rng=np.random.default_rng(0), category_feature=category)
    names = [card.name for card in cards]
    assert all(names) and len(set(names)) == len(names)
    for card in cards:
        assert not card.suppressed
        assert 1 <= len(card.features) <= 5
        strengths = [abs(e.strength or 0.0) for e in card.features]
        assert strengths == sorted(strengths, reverse=True)
        assert len({e.feature for e in card.features}) == len(card.features)
        assert [r.label for r in card.label_rates] == [label.name for label in silo.table.schema.labels]
    assert sum(card.share or 0.0 for card in cards) == pytest.approx(1.0)
    text = json.dumps([card.to_dict() for card in cards], allow_nan=False)
    assert json.loads(text)[0]["persona"] == 0


def test_same_seed_same_cards_different_seed_different_split(silo: SyntheticSilo) -> None:
    def cards(seed: int) -> list[dict[str, object]]:
        made = persona_cards(silo.table, silo.persona, k=6, rng=np.random.default_rng(seed))
        return [card.to_dict() for card in made]

    assert cards(3) == cards(3)
    assert cards(3) != cards(4)


def test_persona_recommendations_beat_popularity() -> None:
    silo = generate_silo("ecommerce", 3000, seed=5)
    for k, margin in ((1, 0.2), (3, 0.2)):
        hits = hit_rate_at_k(silo.table, silo.persona, k=6, category_feature="recent_categories", top_k=k)
        # Measured: k = 1: 0.513 vs 0.165; k = 3: 0.854 vs 0.423 (k = 5: 0.936 vs 0.583).
        assert hits.persona >= hits.popularity + margin
        assert hits.users == 3000


def test_hit_rate_uses_only_the_history() -> None:
    # cats = (c1, c2): persona 0 = (toys, books) x 5 and (toys, -) x 5;
    #                  persona 1 = (garden, toys) x 3 and (garden, -) x 7.
    table, personas = tiny_table()
    first = hit_rate_at_k(table, personas, k=2, category_feature="cats", top_k=1, min_users=2)
    # Most recent = c1, hidden for all 20 users; the history is c2 alone: persona 0 -> books
    # (5 users), persona 1 -> toys (3), the silo -> books. Hidden toys / garden: no hit at all.
    assert (first.persona, first.popularity, first.users) == (0.0, 0.0, 20)
    last = hit_rate_at_k(table, personas, k=2, category_feature="cats", top_k=1, min_users=2, most_recent="last")
    # Most recent = the last present step. Hidden: books x 5, toys x 5 | toys x 3, garden x 7.
    # History: persona 0 -> toys (5 users), persona 1 -> garden (3), the silo -> toys (5).
    # Persona hits: 5 (toys) + 7 (garden) = 12 of 20; popularity hits: toys 5 + 3 = 8 of 20.
    assert (last.persona, last.popularity) == (pytest.approx(12 / 20), pytest.approx(8 / 20))


def test_bad_arguments_are_clear_value_errors() -> None:
    table, personas = tiny_table()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"assignments must have shape \(20,\)"):
        persona_cards(table, personas[:5], k=2, rng=rng)
    with pytest.raises(ValueError, match=r"assignments must lie in \[0, 2\)"):
        persona_cards(table, personas + 1, k=2, rng=rng)
    with pytest.raises(ValueError, match="max_depth must be 1, 2 or 3"):
        persona_cards(table, personas, k=2, rng=rng, max_depth=6)
    with pytest.raises(ValueError, match="'spend' is a numeric feature; it must be categorical"):
        persona_cards(table, personas, k=2, rng=rng, category_feature="spend")
    with pytest.raises(ValueError, match="not a feature of the schema"):
        persona_cards(table, personas, k=2, rng=rng, category_feature="nope")
    with pytest.raises(ValueError, match="needs a sequence feature"):
        hit_rate_at_k(table, personas, k=2, category_feature="device")
    card = persona_cards(table, personas, k=2, rng=rng, min_users=2)[0]
    with pytest.raises(ValueError, match="without a category_feature"):
        card.recommend(3)


def test_feature_profile_is_the_heatmap_of_hand_computed_differences() -> None:
    from fedpersona.personas.cards import feature_profile

    table, personas = tiny_table()
    profile = feature_profile(table, personas, k=3, min_users=2, min_category_strength=0.0)
    rows = list(profile.rows)
    assert rows[:2] == ["spend", "promo"]  # numbers and yes/no first, then category values
    sd = math.sqrt(19 * 20 / 12)
    assert profile.strength[0][0] == pytest.approx((5.5 - 10) / sd)
    assert profile.strength[1][0] == pytest.approx((15 - 10) / sd)
    # promo: 7/10 vs 10/20 in the silo -> (0.7 - 0.5) / sqrt(0.25); persona 1: 3/10
    assert profile.strength[0][1] == pytest.approx(0.4)
    assert profile.strength[1][1] == pytest.approx(-0.4)
    mobile = rows.index("device = mobile")  # 8/10 vs 10/20
    assert profile.strength[0][mobile] == pytest.approx(0.6)
    tablet = rows.index("device = tablet")  # persona 0 has no tablet users: a suppressed cell
    assert profile.strength[0][tablet] is None and profile.strength[1][tablet] == pytest.approx(
        (0.3 - 0.15) / math.sqrt(0.15 * 0.85)
    )
    assert profile.strength[2] == (None,) * len(rows)  # persona 2 has no users
    assert json.loads(json.dumps(profile.to_dict()))["rows"] == rows
    strong = feature_profile(table, personas, k=2, min_users=2, max_rows=3)
    assert len(strong.rows) == 3 and strong.rows[:2] == ("spend", "promo")


# --- surrogate fidelity on the primary real datasets -----------------------------------------

# Measured below the 0.85 goal (k = 4, depth 3, 3000 rows, training seed 0): the test records
# the shortfall instead of hiding it and FAILS once a kind reaches the goal, so that this list
# is kept honest. Every kind must still beat the majority-persona baseline widely. Over seeds
# and label weights see ``python -m benchmarks.surrogate_fidelity`` (docs/results.md).
KNOWN_SHORT = {"health": 0.688}  # measured fidelities (ecommerce: 0.907, finance: 0.903)


@pytest.mark.parametrize(("schema_file", "data_file"), PRIMARY)
def test_surrogate_fidelity_on_primary_real_data(schema_file: str, data_file: str) -> None:
    """k-means personas on the embeddings of a short non-private training (the honest, cheap
    stand-in for a federated run): the depth-3 surrogate tree should explain them."""
    from fedpersona.data.features import featurize

    if not (DATA / data_file).exists():
        pytest.skip(f"real dataset {data_file} is not available")
    table = primary_table(schema_file, data_file)
    assignments = encoder_personas(featurize(table), seed=0, label_weight=1.0)
    fidelity = surrogate_fidelity(table, assignments)
    k = 4
    majority = np.bincount(assignments, minlength=k).max() / len(assignments)
    # The tree explains far more than the mode: it makes at most half the mode's errors.
    assert 1.0 - fidelity <= 0.5 * (1.0 - majority), (fidelity, majority)
    kind = table.schema.kind
    print(f"{kind}: fidelity {fidelity:.3f}, majority persona {majority:.3f}")
    if kind in KNOWN_SHORT:
        assert fidelity < 0.85, f"{kind} now reaches {fidelity:.3f}: remove it from KNOWN_SHORT"
        pytest.xfail(f"{kind}: surrogate fidelity {fidelity:.3f} < 0.85 at depth 3 (known shortfall)")
    assert fidelity >= 0.85, fidelity


def test_surrogate_can_split_on_a_group_of_values() -> None:
    """Personas {a, b} vs {c, d} of one feature: no single value separates them at depth 1
    (at best 3 of 4 users), "region is one of a, b" does, and says so in the rule."""
    schema = parse_schema(
        {
            "table": {"kind": "health", "id": "id", "min_rows": 1},
            "features": {"region": {"type": "categorical", "vocabulary": ["a", "b", "c", "d"]}},
        }
    )
    region = ["a", "b", "c", "d"] * 50
    frame = pd.DataFrame({"id": [f"u{i}" for i in range(200)], "region": region})
    table = validate_frame(schema, frame, source="regions")
    personas = np.array([0 if r in ("a", "b") else 1 for r in region])
    cards = persona_cards(table, personas, k=2, rng=np.random.default_rng(0), min_users=5, max_depth=1)
    assert cards[0].fidelity == 1.0
    texts = {r.text for card in cards for r in card.rules}
    assert texts in (
        {"region is one of a, b", "region is none of a, b"},
        {"region is one of c, d", "region is none of c, d"},
    )
