"""The schema key ``edges``: public cut points of a number, checked when the schema is read.

Error messages are asserted by their text (file, feature, key and what is wrong); the shipped
and packaged schemas are read from disk and must declare ``typical`` and ``edges`` for every
number, inside the bounds.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedpersona.data.drafting import infer_schema
from fedpersona.data.schema import KINDS, NumericFeature, Schema, SequenceFeature
from fedpersona.data.schema_reader import load_schema, parse_schema
from fedpersona.data.synthetic import synthetic_schema
from fedpersona.errors import SchemaError

ROOT = Path(__file__).parents[1]
MAIN_SCHEMAS = [ROOT / "clients" / kind / "schema.toml" for kind in KINDS]
EXPECTED = "Expected a non-empty list of finite numbers, strictly increasing and strictly between the bounds 0 and 1000"


def document(number: dict[str, Any]) -> dict[str, Any]:
    return {
        "table": {"kind": "finance", "min_rows": 1},
        "features": {
            "income": {"type": "numeric", "bounds": [0, 1000], **number},
            "bills": {"type": "sequence", "columns": ["b1", "b2"], "bounds": [0, 1000], **number},
        },
    }


def problems_of(number: dict[str, Any]) -> str:
    with pytest.raises(SchemaError) as caught:
        parse_schema(document(number), source="bank/schema.toml")
    return str(caught.value)


def test_edges_are_read_as_floats_for_numbers_and_numeric_sequences() -> None:
    schema = parse_schema(document({"edges": [1, 10, 100.5]}), source="bank/schema.toml")
    income, bills = schema.features
    assert isinstance(income, NumericFeature) and income.edges == (1.0, 10.0, 100.5)
    assert isinstance(bills, SequenceFeature) and bills.edges == (1.0, 10.0, 100.5)
    plain = parse_schema(document({}), source="bank/schema.toml")
    assert plain.features[0].edges is None  # type: ignore[union-attr]


def test_unsorted_edges_are_refused_naming_file_feature_and_pair() -> None:
    message = problems_of({"edges": [10, 50, 20]})
    assert message.startswith("bank/schema.toml: 2 problem(s): ")
    assert "features.income.edges: it is not strictly increasing (50 then 20). " + EXPECTED in message
    assert "features.bills.edges: it is not strictly increasing (50 then 20)." in message
    assert "got [10, 50, 20]" in message


def test_repeated_edges_are_refused() -> None:
    assert "features.income.edges: it is not strictly increasing (5 then 5)." in problems_of({"edges": [1, 5, 5]})


def test_nan_and_infinite_edges_are_refused() -> None:
    assert "features.income.edges: it holds nan. " + EXPECTED in problems_of({"edges": [1.0, float("nan")]})
    assert "features.income.edges: it holds inf." in problems_of({"edges": [1.0, float("inf")]})


def test_edges_on_or_outside_the_bounds_are_refused() -> None:
    message = problems_of({"edges": [-5, 10, 1000, 2000]})
    assert "features.income.edges: -5, 1000, 2000 are on or outside the bounds. " + EXPECTED in message
    assert "features.income.edges: 0 is on or outside the bounds." in problems_of({"edges": [0, 10]})


@pytest.mark.parametrize(
    ("edges", "what"),
    [([], "it is empty"), ("10", "it is not a list"), ([1, "2"], "not every entry is a number"), ([True], "not every")],
)
def test_edges_that_are_not_a_list_of_numbers_are_refused(edges: object, what: str) -> None:
    assert f"features.income.edges: {what}" in problems_of({"edges": edges})


def test_a_categorical_sequence_has_no_edges() -> None:
    doc = {
        "table": {"kind": "finance", "min_rows": 1},
        "features": {
            "status": {"type": "sequence", "columns": ["s1", "s2"], "element": "categorical", "vocabulary": ["a"]}
        },
    }
    doc["features"]["status"]["edges"] = [1]
    with pytest.raises(SchemaError, match=r"features\.status\.edges are for numbers; a categorical sequence has no"):
        parse_schema(doc, source="s.toml")


def test_edges_on_other_feature_types_are_unknown_keys() -> None:
    doc = {"table": {"kind": "finance", "min_rows": 1}, "features": {"ok": {"type": "boolean", "edges": [1]}}}
    with pytest.raises(SchemaError, match=r"features\.ok.*edges"):
        parse_schema(doc, source="s.toml")


def test_a_bad_edges_line_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "schema.toml"
    path.write_text(
        '[table]\nkind = "health"\n\n[features.bmi]\ntype = "numeric"\nbounds = [10, 100]\nedges = [25, nan]\n',
        encoding="utf-8",
    )
    with pytest.raises(SchemaError) as caught:
        load_schema(path)
    assert str(caught.value).startswith(f"{path}: 1 problem(s): features.bmi.edges: it holds nan.")


def test_edges_enter_the_fingerprint() -> None:
    plain = parse_schema(document({}), source="a")
    cut = parse_schema(document({"edges": [1, 10]}), source="a")
    other = parse_schema(document({"edges": [1, 20]}), source="a")
    assert len({plain.fingerprint(), cut.fingerprint(), other.fingerprint()}) == 3
    assert parse_schema(document({"edges": [1, 10]}), source="b").fingerprint() == cut.fingerprint()


def numbers_of(schema: Schema) -> list[NumericFeature | SequenceFeature]:
    return [
        f
        for f in schema.features
        if isinstance(f, NumericFeature) or (isinstance(f, SequenceFeature) and f.element == "numeric")
    ]


NO_TYPICAL = {"pay_amount"}  # declared without a typical range, on purpose (see clients/finance/schema.toml)
WITH_EDGES = [
    *MAIN_SCHEMAS,
    ROOT / "clients/health/schema_framingham.toml",
    ROOT / "clients/finance/schema_bank_marketing.toml",
]


@pytest.mark.parametrize(
    "schema",
    [load_schema(p) for p in WITH_EDGES] + [synthetic_schema(kind) for kind in KINDS],
    ids=lambda s: f"{s.kind}:{s.name}",
)
def test_every_number_of_the_partner_and_synthetic_schemas_declares_edges(schema: Schema) -> None:
    numbers = numbers_of(schema)
    assert numbers
    for feat in numbers:
        if schema.source in {str(p) for p in MAIN_SCHEMAS} and feat.name not in NO_TYPICAL:
            assert feat.typical is not None, feat.name  # the three partner schemas declare typical too
        assert feat.edges is not None and len(feat.edges) >= 2, feat.name
        assert feat.lo < feat.edges[0] and feat.edges[-1] < feat.hi, feat.name  # (also checked by the reader)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "clients").glob("*/schema*.toml")), ids=lambda p: p.parent.name + "/" + p.name
)
def test_every_shipped_schema_loads(path: Path) -> None:
    schema = load_schema(path)
    assert schema.kind == path.parent.name


# --- drafting: edges only as a commented-out suggestion --------------------------------------


def test_a_drafted_schema_declares_no_edges_until_the_steward_uncomments_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "spend": np.round(rng.lognormal(3, 1.5, size=n), 2),
            "age": rng.integers(21, 88, size=n),
            "score": rng.choice([1, 2, 3, 4, 5], size=n),
        }
    )
    path = tmp_path / "customers.csv"
    frame.to_csv(path, index=False)
    text = infer_schema(path, kind="ecommerce")
    assert "remove the `#` only once you declare them public" in text
    assert not re.search(r"^edges", text, re.MULTILINE)  # no active edges line
    suggested = re.findall(r"^# edges = (\[[^\]]*\])  # DRAFTED FROM THIS FILE", text, re.MULTILINE)
    assert len(suggested) == 3
    drafted = parse_schema(tomllib.loads(text), source="draft.toml")
    assert all(f.edges is None for f in numbers_of(drafted))
    accepted = parse_schema(tomllib.loads(re.sub(r"^# (edges = )", r"\1", text, flags=re.MULTILINE)), source="a")
    by_name = {f.name: f for f in numbers_of(accepted)}
    assert by_name["score"].edges == (1.5, 2.5, 3.5, 4.5)  # midway between the codes seen
    for feat in by_name.values():
        assert feat.edges is not None and feat.lo < feat.edges[0] and feat.edges[-1] < feat.hi
    for edge in by_name["spend"].edges or ():
        mantissa = edge / 10 ** math.floor(math.log10(edge))
        assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-9, edge  # a round number, 1, 2 or 5 x 10^k
