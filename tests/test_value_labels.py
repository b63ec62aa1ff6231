"""The schema key ``value_labels``: public words for a category's codes, checked when the schema
is read and used wherever a persona is named or described (cards, rules, the profile)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedpersona.data.schema import CategoricalFeature, SequenceFeature
from fedpersona.data.schema_reader import load_schema, parse_schema
from fedpersona.data.synthetic import synthetic_schema
from fedpersona.data.tables import Table, validate_frame
from fedpersona.errors import SchemaError
from fedpersona.personas.cards import feature_profile, persona_cards

ROOT = Path(__file__).parents[1]


def document(sex: dict[str, Any], pay: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "table": {"kind": "finance", "id": "id", "min_rows": 1},
        "features": {
            "spend": {"type": "numeric", "bounds": [0, 100]},
            "SEX": {"type": "categorical", "vocabulary": [1, 2], **sex},
            "pay": {
                "type": "sequence", "columns": ["p1", "p2"], "element": "categorical",
                "vocabulary": [-1, 0, 1], **(pay or {}),
            },
        },
    }  # fmt: skip


def problems_of(sex: dict[str, Any], pay: dict[str, Any] | None = None) -> str:
    with pytest.raises(SchemaError) as caught:
        parse_schema(document(sex, pay), source="bank/schema.toml")
    return str(caught.value)


def test_labels_are_read_for_categories_and_categorical_sequences() -> None:
    schema = parse_schema(
        document({"value_labels": {"1": "male", "2.0": " female "}}, {"value_labels": {"-1": "paid duly"}}),
        source="s.toml",
    )
    _, sex, pay = schema.features
    assert isinstance(sex, CategoricalFeature) and sex.value_labels == (("1", "male"), ("2", "female"))
    assert (sex.label_of("1"), sex.label_of("2"), sex.label_of("2.0"), sex.label_of("0")) == (
        "male",
        "female",
        "female",
        "0",  # a code without a label (here an unseen one) is shown as it is
    )
    assert isinstance(pay, SequenceFeature) and pay.label_of("-1") == "paid duly" and pay.label_of("0") == "0"
    assert parse_schema(document({}), source="s.toml").features[1].value_labels == ()  # type: ignore[union-attr]


def test_labels_do_not_change_the_fingerprint() -> None:
    plain = parse_schema(document({}), source="a").fingerprint()
    labelled = parse_schema(document({"value_labels": {"1": "male"}}), source="a").fingerprint()
    assert plain == labelled


def test_a_label_for_an_unknown_code_names_file_feature_and_code() -> None:
    message = problems_of({"value_labels": {"1": "male", "3": "other"}}, {"value_labels": {"7": "late"}})
    assert message.startswith("bank/schema.toml: 2 problem(s): ")
    assert (
        "features.SEX.value_labels: code '3' is not in the vocabulary (1, 2); a label can only name a declared code"
        in message
    )
    assert "features.pay.value_labels: code '7' is not in the vocabulary (-1, 0, 1)" in message


def test_bad_labels_are_all_reported_at_once() -> None:
    message = problems_of({"value_labels": {"1": "", "2": 5}}, {"value_labels": {"0": "late", "1": "late"}})
    assert "features.SEX.value_labels: the label of code '1' must be a non-empty string, got ''" in message
    assert "features.SEX.value_labels: the label of code '2' must be a non-empty string, got 5" in message
    assert "features.pay.value_labels: codes '0' and '1' share the label 'late'; each code needs its own" in message
    assert "'1' and '1.0' are the same code, labelled twice" in problems_of(
        {"value_labels": {"1": "male", "1.0": "man"}}
    )


def test_labels_need_a_vocabulary_and_a_table() -> None:
    hashed = problems_of({"vocabulary": None, "buckets": 8, "value_labels": {"1": "male"}})
    assert "features.SEX.value_labels need a vocabulary: hashed buckets have no codes to name" in hashed
    assert "features.SEX.value_labels must be a table of code = label" in problems_of({"value_labels": ["male"]})
    doc = document({})
    doc["features"]["bills"] = {
        "type": "sequence", "columns": ["b1", "b2"], "bounds": [0, 10], "value_labels": {"1": "x"},
    }  # fmt: skip
    with pytest.raises(SchemaError, match=r"features\.bills\.value_labels name the codes of a category"):
        parse_schema(doc, source="s.toml")
    doc = document({})
    doc["features"]["spend"]["value_labels"] = {"1": "x"}
    with pytest.raises(SchemaError, match=r"unknown key 'features\.spend\.value_labels' for a numeric feature"):
        parse_schema(doc, source="s.toml")


def test_a_bad_label_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "schema.toml"
    path.write_text(
        '[table]\nkind = "finance"\n\n[features.SEX]\ntype = "categorical"\nvocabulary = [1, 2]\n'
        'value_labels = { "1" = "male", "9" = "unknown" }\n',
        encoding="utf-8",
    )
    with pytest.raises(SchemaError) as caught:
        load_schema(path)
    assert str(caught.value).startswith(f"{path}: 1 problem(s): features.SEX.value_labels: code '9' is not in")


def test_the_shipped_schemas_label_the_documented_codes() -> None:
    finance = {f.name: f for f in load_schema(ROOT / "clients/finance/schema.toml").features}
    sex, education, marriage, pay = (finance[n] for n in ("SEX", "EDUCATION", "MARRIAGE", "pay_status"))
    assert isinstance(sex, CategoricalFeature) and dict(sex.value_labels) == {"1": "male", "2": "female"}
    assert isinstance(education, CategoricalFeature) and education.label_of("1") == "graduate school"
    assert isinstance(marriage, CategoricalFeature) and marriage.label_of("3") == "others"
    assert isinstance(pay, SequenceFeature) and (pay.label_of("-1"), pay.label_of("2")) == (
        "paid duly",
        "2 months late",
    )
    health = {f.name: f for f in synthetic_schema("health").features}["general_health"]
    assert isinstance(health, CategoricalFeature) and health.label_of("5") == "poor"


# --- cards -------------------------------------------------------------------------------------


def labelled_table() -> tuple[Table, np.ndarray]:
    """40 users: persona 0 (rows 0-19) is SEX 2 and mostly pays duly; persona 1 is SEX 1, mostly late."""
    schema = parse_schema(
        document(
            {"value_labels": {"1": "male", "2": "female"}},
            {"value_labels": {"-1": "paid duly", "0": "revolving credit", "1": "1 month late"}},
        ),
        source="s.toml",
    )
    sex = ["2"] * 20 + ["1"] * 20
    p1 = ["-1"] * 16 + ["0"] * 4 + ["1"] * 14 + ["0"] * 6
    frame = pd.DataFrame(
        {"id": [f"u{i}" for i in range(40)], "spend": [str(i % 5) for i in range(40)], "SEX": sex, "p1": p1, "p2": p1}
    )
    return validate_frame(schema, frame, source="t"), np.repeat([0, 1], 20)


def test_cards_name_and_describe_personas_by_their_labels() -> None:
    table, personas = labelled_table()
    zero, one = persona_cards(table, personas, k=2, rng=np.random.default_rng(0), min_users=2, top_features=5)
    assert zero.name == "SEX: female, pay: paid duly"
    assert one.name == "SEX: male, pay: 1 month late"
    sex = next(e for e in zero.features if e.feature == "SEX")
    assert (sex.value, sex.label) == ("2", "female")  # the code stays; the label is added
    assert sex.text == "2.0× more likely to have SEX = female (100% vs 50% in the silo)"
    pay = next(e for e in zero.features if e.feature == "pay")
    assert "pay including paid duly" in pay.text and pay.label == "paid duly"
    # The surrogate splits on SEX alone (it separates the personas exactly) and says it in labels.
    assert [r.text for r in zero.rules] == ["SEX ≠ male"] and [r.text for r in one.rules] == ["SEX = male"]
    assert zero.to_dict()["features"][0] == {**zero.to_dict()["features"][0], "value": "2", "label": "female"}
    rows = feature_profile(table, personas, k=2, min_users=2).rows
    assert "SEX = female" in rows and "SEX = 2" not in rows


def test_unlabelled_codes_are_shown_as_they_are() -> None:
    table, personas = labelled_table()
    plain = parse_schema(document({}), source="s.toml")
    frame = pd.DataFrame(
        {"id": table.ids, "spend": ["1"] * 40, "SEX": table.columns["SEX"], "p1": ["0"] * 40, "p2": ["0"] * 40}
    )
    cards = persona_cards(
        validate_frame(plain, frame, source="t"), personas, k=2, rng=np.random.default_rng(0), min_users=2
    )
    assert cards[0].name == "SEX: 2" and cards[1].name == "SEX: 1"
    assert next(e for e in cards[0].features if e.feature == "SEX").label is None


def test_a_group_of_codes_and_a_single_step_are_labelled_too() -> None:
    from fedpersona.personas.cards import _labeller
    from fedpersona.personas.columns import Column

    table, _ = labelled_table()
    named = _labeller(table)
    values = np.zeros(len(table))
    group = named(Column("pay", "category", values, value="-1, 1", group=True))
    step = named(Column("p2", "category", values, value="0"))
    other = named(Column("spend", "numeric", values))
    assert (group.value, step.value, other.value) == ("paid duly, 1 month late", "revolving credit", None)
    assert named(Column("SEX", "category", values, value="9")).value == "9"  # no label: as it is
