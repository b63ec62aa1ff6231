"""Tests for fedpersona.data.tables: reading, validating, aggregating and drafting schemas."""

from __future__ import annotations

import gzip
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedpersona.data.drafting import infer_schema
from fedpersona.data.schema import Schema
from fedpersona.data.schema_reader import load_schema, parse_schema
from fedpersona.data.tables import Table, _validate_arrow, load_table, read_frame, validate_frame
from fedpersona.errors import ConfigError, DataError, SchemaError

ROOT = Path(__file__).parents[1]
DATA = ROOT / ".." / "shared" / "data"
CLIENTS = ROOT / "clients"


def make_schema(features: dict[str, Any], *, labels: dict[str, Any] | None = None, **table: Any) -> Schema:
    doc: dict[str, Any] = {"table": {"kind": "finance", "min_rows": 1, **table}}
    doc["features"] = features
    if labels is not None:
        doc["labels"] = labels
    return parse_schema(doc, source="test-schema")


def strings(**columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(values, dtype="str") for name, values in columns.items()})


def problems_of(schema: Schema, frame: pd.DataFrame) -> list[str]:
    with pytest.raises(SchemaError) as caught:
        validate_frame(schema, frame, source="people.csv")
    assert str(caught.value).startswith("people.csv: ")
    return caught.value.problems


AGE = {"AGE": {"type": "numeric", "bounds": [18, 100]}}


# --- one class of bad input per test ---------------------------------------------------------


def test_missing_column_is_named_with_the_columns_found() -> None:
    schema = make_schema({**AGE, "INCOME": {"type": "numeric", "bounds": [0, 1e6]}})
    problems = problems_of(schema, strings(AGE=["30"], CITY=["Oslo"]))
    assert problems == ["missing column(s) 'INCOME' (columns found: 'AGE', 'CITY')"]


def test_wrong_type_names_the_rows_and_an_example() -> None:
    ages = ["30", "abc", "40", "41", "42", "43", "x", "44", "", "inf"]
    problems = problems_of(make_schema(AGE), strings(AGE=ages))
    assert problems == ["column 'AGE': 3 value(s) are not numbers, e.g. 'abc' at rows 2, 7, 10"]


def test_numbers_in_scientific_notation_are_numbers() -> None:
    schema = make_schema({"rate": {"type": "numeric", "bounds": [0, 1e6]}})
    table = validate_frame(schema, strings(rate=["7.50E-05", "5e+05", " 12 ", "3"]), source="t")
    np.testing.assert_array_equal(table.columns["rate"], [7.5e-05, 5e05, 12.0, 3.0])


def test_out_of_bounds_rejected_names_the_rows() -> None:
    schema = make_schema(AGE, out_of_bounds="reject")
    problems = problems_of(schema, strings(AGE=["30", "150", "17", "50"]))
    assert problems == ["column 'AGE': 2 value(s) are outside the bounds [18, 100], e.g. '150' at rows 2, 3"]


def test_out_of_bounds_clipped_to_the_bound() -> None:
    schema = make_schema(AGE, out_of_bounds="clip")
    table = validate_frame(schema, strings(AGE=["30", "150", "17", ""]), source="t")
    np.testing.assert_array_equal(table.columns["AGE"], [30.0, 100.0, 18.0, np.nan])


def test_sequence_columns_are_checked_one_by_one() -> None:
    bills = {"type": "sequence", "columns": ["B1", "B2"], "element": "numeric", "bounds": [0, 10]}
    schema = make_schema({"bills": bills})
    table = validate_frame(schema, strings(B1=["1", "20"], B2=["-5", "2"]), source="t")
    np.testing.assert_array_equal(table.columns["B1"], [1.0, 10.0])
    np.testing.assert_array_equal(table.columns["B2"], [0.0, 2.0])


def test_unseen_category_rejected() -> None:
    color = {"type": "categorical", "vocabulary": ["red", "blue"], "unseen": "reject"}
    problems = problems_of(make_schema({"color": color}), strings(color=["red", "green", "blue"]))
    assert problems == [
        "column 'color': 1 value(s) are not in the vocabulary of feature 'color' ('red', 'blue'), "
        "e.g. 'green' at rows 2"
    ]


def test_unseen_category_kept_as_other_and_codes_are_canonical() -> None:
    color = {"type": "categorical", "vocabulary": ["red", "blue"], "unseen": "other"}
    code = {"type": "categorical", "vocabulary": ["1.0", 2]}  # the schema canonicalises both
    schema = make_schema({"color": color, "code": code})
    frame = strings(color=["red", "green", "NA"], code=["1", "2.0", "3.0"])
    table = validate_frame(schema, frame, source="t")
    assert table.columns["color"].tolist() == ["red", "green", None]
    assert table.columns["code"].tolist() == ["1", "2", "3"]
    assert schema.features[1].vocabulary == ("1", "2")


def test_missing_value_rejected_where_the_policy_says_so() -> None:
    schema = make_schema({"AGE": {**AGE["AGE"], "missing": "reject"}, "note": {"type": "text"}})
    frame = strings(AGE=["30", "NA", "", "N/A"], note=["a b", "", "x", "y"])
    problems = problems_of(schema, frame)
    assert problems == [
        "column 'AGE': 3 value(s) are missing but feature 'AGE' has missing = \"reject\", at rows 2, 3, 4"
    ]


def test_missing_values_dropped_by_default() -> None:
    schema = make_schema({**AGE, "note": {"type": "text"}, "flag": {"type": "boolean"}})
    frame = strings(AGE=["NA", "30"], note=["", "hello there"], flag=["yes", "null"])
    table = validate_frame(schema, frame, source="t")
    assert np.isnan(table.columns["AGE"][0])
    assert table.columns["note"].tolist() == [None, "hello there"]
    np.testing.assert_array_equal(table.columns["flag"], [1.0, np.nan])


def test_bad_boolean_is_reported() -> None:
    problems = problems_of(make_schema({"flag": {"type": "boolean"}}), strings(flag=["1.0", "maybe"]))
    assert len(problems) == 1
    assert problems[0].startswith("column 'flag': 1 value(s) are not booleans")
    assert "'maybe' at rows 2" in problems[0]


def test_duplicate_ids_are_named_with_rows() -> None:
    frame = strings(ID=["7", "8", "7", "9", "7", "8"], AGE=["30"] * 6)
    problems = problems_of(make_schema(AGE, id="ID"), frame)
    assert problems == ["id column 'ID': 2 id(s) occur more than once (5 rows), e.g. '7' at rows 1, 3, 5"]


def test_ids_come_from_the_id_column_or_the_row_number() -> None:
    with_id = validate_frame(make_schema(AGE, id="ID"), strings(ID=["u1", "u2"], AGE=["30", "40"]), source="t")
    assert with_id.ids.tolist() == ["u1", "u2"]
    without = validate_frame(make_schema(AGE), strings(AGE=["30", "40"]), source="t")
    assert without.ids.tolist() == ["row-1", "row-2"]


def test_empty_table() -> None:
    assert problems_of(make_schema(AGE), strings(AGE=[])) == ["the table has no data rows"]


def test_too_small_table() -> None:
    problems = problems_of(make_schema(AGE, min_rows=5), strings(AGE=["30", "40"]))
    assert problems == ["the table has 2 row(s), fewer than table.min_rows = 5"]


def test_undeclared_columns_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="fedpersona.data.tables")
    table = validate_frame(make_schema(AGE), strings(AGE=["30"], secret=["x"]), source="t")
    assert list(table.columns) == ["AGE"]
    assert "'secret'" in caplog.text


def test_label_values() -> None:
    labels = {"bought": {"positive": ["TRUE"]}, "bad": {"column": "class", "positive": ["2"]}}
    schema = make_schema(AGE, labels=labels)
    frame = strings(AGE=["30"] * 4, bought=["TRUE", "FALSE", "true", ""], **{"class": ["1", "2", "1", "2.0"]})
    table = validate_frame(schema, frame, source="t")
    np.testing.assert_array_equal(table.labels["bought"], [1.0, 0.0, 1.0, np.nan])
    np.testing.assert_array_equal(table.labels["bad"], [0.0, 1.0, 0.0, 1.0])


def test_unrecognised_label_values_are_reported() -> None:
    schema = make_schema(AGE, labels={"y": {"positive": ["yes"]}})
    problems = problems_of(schema, strings(AGE=["30"] * 4, y=["yes", "no", "maybe", "perhaps"]))
    assert len(problems) == 1
    assert problems[0].startswith("column 'y': 2 value(s) are neither positive ('yes')")
    assert "'maybe' at rows 3, 4" in problems[0]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("absent.csv", None, "does not exist"),
        ("folder", "dir", "not a regular file"),
        ("empty.csv", b"", "empty"),
        ("ragged.csv", b"AGE,X\n30,1\n40,1,2,3\n", "Expected 2 fields in line 3, saw 4"),
        ("latin1.csv", "AGE,X\n30,Zürich\n".encode("latin-1"), "not UTF-8"),
        ("broken.csv.gz", b"\x1f\x8b\x08\x00garbage", ""),
        ("broken.parquet", b"PAR1 not parquet", ""),
    ],
)
def test_unreadable_file_is_a_data_error(tmp_path: Path, name: str, content: bytes | str | None, reason: str) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_table(make_schema(AGE), path)
    assert str(path) in str(caught.value)
    assert reason in str(caught.value)


def test_headerless_file_with_the_wrong_number_of_columns(tmp_path: Path) -> None:
    path = tmp_path / "people.txt"
    path.write_text("30 1\n40 2\n")
    schema = make_schema(AGE, header=False, columns=["AGE", "X", "Y"], delimiter="whitespace")
    with pytest.raises(SchemaError, match=r"the file has 2 columns but table\.columns names 3"):
        load_table(schema, path)


def test_several_problems_are_reported_in_one_error(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("ID,AGE,color\n1,30,red\n2,abc,red\n2,500,purple\n")
    color = {"type": "categorical", "vocabulary": ["red"], "unseen": "reject"}
    schema = make_schema(
        {**AGE, "color": color, "INCOME": {"type": "numeric", "bounds": [0, 1]}},
        id="ID",
        out_of_bounds="reject",
        min_rows=10,
    )
    with pytest.raises(SchemaError) as caught:
        load_table(schema, path)
    text = str(caught.value)
    assert text.startswith(f"{path}: 6 problem(s): ")
    for part in (
        "missing column(s) 'INCOME'",
        "fewer than table.min_rows = 10",
        "id column 'ID': 1 id(s) occur more than once (2 rows), e.g. '2' at rows 2, 3",
        "column 'AGE': 1 value(s) are not numbers, e.g. 'abc' at rows 2",
        "column 'AGE': 1 value(s) are outside the bounds [18, 100], e.g. '500' at rows 3",
        "e.g. 'purple' at rows 3",
    ):
        assert part in text


def test_table_take_selects_rows_in_order() -> None:
    schema = make_schema(AGE, labels={"y": {"positive": ["1"]}})
    table = validate_frame(schema, strings(AGE=["30", "40", "50"], y=["1", "0", "1"]), source="t")
    part = table.take(np.array([2, 0]))
    assert isinstance(part, Table) and len(part) == 2
    assert part.ids.tolist() == ["row-3", "row-1"]
    np.testing.assert_array_equal(part.columns["AGE"], [50.0, 30.0])
    np.testing.assert_array_equal(part.labels["y"], [1.0, 1.0])


# --- file formats ----------------------------------------------------------------------------

SMALL = pd.DataFrame(
    {
        "ID": ["a", "b", "c"],
        "AGE": [30.0, None, 45.5],
        "code": [1, 2, 3],
        "flag": [True, False, True],
        "y": ["yes", "no", "yes"],
    }
)
SMALL_FEATURES = {
    **AGE,
    "code": {"type": "categorical", "vocabulary": [1, 2]},
    "flag": {"type": "boolean"},
}


def _check_small(table: Table) -> None:
    assert table.ids.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(table.columns["AGE"], [30.0, np.nan, 45.5])
    assert table.columns["code"].tolist() == ["1", "2", "3"]
    np.testing.assert_array_equal(table.columns["flag"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(table.labels["y"], [1.0, 0.0, 1.0])


def test_gzip_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "small.csv.gz"
    SMALL.to_csv(path, index=False, compression="gzip", sep=";")
    schema = make_schema(SMALL_FEATURES, id="ID", delimiter=";", labels={"y": {"positive": ["yes"]}})
    _check_small(load_table(schema, path))


def test_parquet_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "small.parquet"
    SMALL.to_parquet(path, index=False)
    schema = make_schema(SMALL_FEATURES, id="ID", labels={"y": {"positive": ["yes"]}})
    _check_small(load_table(schema, path))


def test_cells_are_stripped_and_missing_is_decided_by_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("AGE ,color\n 30 , red \nNA,none\n")
    color = {"type": "categorical", "vocabulary": ["red", "NA"]}
    schema = make_schema({**AGE, "color": color}, na_values=["none"])
    frame = read_frame(schema, path)
    assert list(frame.columns) == ["AGE", "color"]
    assert frame["color"].tolist() == ["red", "none"]
    problems = problems_of(schema, frame)  # "NA" is not missing for this schema
    assert problems == ["column 'AGE': 1 value(s) are not numbers, e.g. 'NA' at rows 2"]


# --- event logs ------------------------------------------------------------------------------

EVENT_LOG = """user,day,amount
a,2024-01-05,10
b,2024-01-20,5
a,2024-02-10,30
a,2024-02-10,2.5
c,2024-03-31,
b,2023-12-30,7
"""


def _event_schema(**events: Any) -> Schema:
    aggregate = {
        "n": {"op": "count"},
        "total": {"op": "sum", "column": "amount"},
        "avg": {"op": "mean", "column": "amount"},
        "big": {"op": "max", "column": "amount"},
        "first_amount": {"op": "first", "column": "amount"},
        "last_amount": {"op": "last", "column": "amount"},
        "kinds": {"op": "nunique", "column": "amount"},
        "since_first": {"op": "days_since_first"},
        "since_last": {"op": "days_since_last"},
        "days": {"op": "active_days"},
        "spend": {"op": "sum_by_period", "column": "amount", "start": "2024-01-01", "periods": 3},
        "visits": {"op": "count_by_period", "start": "2024-01-01", "periods": 3, "freq": "MS"},
    }
    wide = {"type": "numeric", "bounds": [0, 1000]}
    features: dict[str, Any] = {name: wide for name in aggregate if name not in ("spend", "visits")}
    for name in ("spend", "visits"):
        features[name] = {**wide, "type": "sequence", "columns": [f"{name}_{i}" for i in (1, 2, 3)]}
    doc = {
        "table": {"kind": "ecommerce", "id": "customer", "min_rows": 1},
        "events": {
            "user": "user",
            "time": "day",
            "reference": "2024-04-01",
            "aggregate": aggregate,
            **events,
        },
        "features": features,
    }
    return parse_schema(doc, source="events-schema")


def test_event_log_is_aggregated_per_user(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(EVENT_LOG)
    table = load_table(_event_schema(), path)
    assert table.ids.tolist() == ["a", "b", "c"]  # order of first appearance
    expected = {
        "n": [3, 2, 1],
        "total": [42.5, 12, 0],
        "avg": [42.5 / 3, 6, np.nan],
        "big": [30, 7, np.nan],
        "first_amount": [10, 7, np.nan],  # by time: b's first purchase is the 2023 one
        "last_amount": [2.5, 5, np.nan],  # a's two purchases on one day: file order breaks the tie
        "kinds": [3, 2, 0],
        "since_first": [87, 93, 1],  # 2024-04-01 minus 2024-01-05 / 2023-12-30 / 2024-03-31
        "since_last": [51, 72, 1],  # 2024-04-01 minus 2024-02-10 / 2024-01-20 / 2024-03-31
        "days": [2, 2, 1],
        "spend_1": [10, 5, 0],  # b's December purchase is before the first period
        "spend_2": [32.5, 0, 0],
        "spend_3": [0, 0, 0],
        "visits_1": [1, 1, 0],
        "visits_2": [2, 0, 0],
        "visits_3": [0, 0, 1],
    }
    for column, values in expected.items():
        np.testing.assert_allclose(table.columns[column], values, err_msg=column)


def test_event_log_with_bad_dates_names_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(EVENT_LOG.replace("2024-02-10,30", "10/02/2024,30"))
    with pytest.raises(SchemaError, match=r"'10/02/2024' at rows 3"):
        load_table(_event_schema(), path)


# --- real datasets ---------------------------------------------------------------------------

REAL = [  # schema, dataset, rows (users), positives per label (from shared/data/README.md)
    (
        "ecommerce/schema.toml",
        "ecommerce/online_shoppers_intention.csv",
        12_330,
        {"Revenue": 1_908},
    ),
    (
        "finance/schema.toml",
        "finance/credit_card_default_taiwan.csv",
        30_000,
        {"default.payment.next.month": 6_636},
    ),
    ("health/schema.toml", "health/cdc_diabetes_5050.csv.gz", 70_692, {"Diabetes_binary": 35_346}),
    (
        "ecommerce/schema_customer_personality.toml",
        "ecommerce/customer_personality.csv",
        2_240,
        {"Response": 334},
    ),
    ("ecommerce/schema_cdnow.toml", "ecommerce/cdnow_sample.csv", 2_357, {}),
    ("finance/schema_bank_marketing.toml", "finance/bank_marketing.csv", 4_521, {"y": 521}),
    ("health/schema_framingham.toml", "health/framingham_chd.csv", 4_240, {"TenYearCHD": 644}),
]


def _real(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {name} is not available")
    return path


@pytest.mark.parametrize(("schema_file", "data_file", "rows", "positives"), REAL)
def test_real_schema_loads_its_dataset(schema_file: str, data_file: str, rows: int, positives: dict[str, int]) -> None:
    schema = load_schema(CLIENTS / schema_file)
    table = load_table(schema, _real(data_file))
    assert len(table) == rows
    assert len(set(table.ids.tolist())) == rows
    for name, count in positives.items():
        assert int(np.nansum(table.labels[name])) == count
    for column in schema.input_columns:
        if column in table.columns:
            assert len(table.columns[column]) == rows


def test_real_schemas_keep_the_documented_quirks() -> None:
    credit = load_table(
        load_schema(CLIENTS / "finance/schema.toml"),
        _real("finance/credit_card_default_taiwan.csv"),
    )
    assert credit.columns["LIMIT_BAL"].max() == 1_000_000  # written "1e+06" in the file
    assert set(credit.columns["PAY_0"]) == {str(c) for c in range(-2, 9)}
    cdc = load_table(load_schema(CLIENTS / "health/schema.toml"), _real("health/cdc_diabetes_5050.csv.gz"))
    assert set(np.unique(cdc.columns["HighBP"])) == {0.0, 1.0}  # "1.0"/"0.0" are booleans
    shoppers = load_table(
        load_schema(CLIENTS / "ecommerce/schema.toml"),
        _real("ecommerce/online_shoppers_intention.csv"),
    )
    assert shoppers.columns["BounceRates"][11_258] == pytest.approx(7.5e-05)


def test_cdnow_aggregates_match_pandas() -> None:
    path = _real("ecommerce/cdnow_sample.csv")
    table = load_table(load_schema(CLIENTS / "ecommerce/schema_cdnow.toml"), path)
    log = pd.read_csv(
        path,
        sep=r"\s+",
        header=None,
        names=["m", "user", "date", "n", "amount"],
        dtype={"user": str},
    )
    by_user = log.groupby("user", sort=False)
    assert table.ids.tolist() == list(by_user.size().index)
    np.testing.assert_array_equal(table.columns["n_purchases"], by_user.size().to_numpy())
    np.testing.assert_allclose(table.columns["total_cds"], by_user["n"].sum().to_numpy())
    in_q1 = log[log["date"] < 19970401].groupby("user", sort=False)["amount"].sum()
    expected_q1 = in_q1.reindex(by_user.size().index, fill_value=0).clip(upper=5000)
    np.testing.assert_allclose(table.columns["amount_by_quarter_1"], expected_q1.to_numpy())


# --- drafting schemas ------------------------------------------------------------------------

INFER = [
    ("ecommerce/online_shoppers_intention.csv", "ecommerce", "Revenue", 12_330, 1_908),
    ("ecommerce/customer_personality.csv", "ecommerce", "Response", 2_240, 334),
    ("finance/bank_marketing.csv", "finance", "y", 4_521, 521),
    ("finance/german_credit.csv", "finance", "column_21", 1_000, 300),
    ("health/framingham_chd.csv", "health", "TenYearCHD", 4_240, 644),
    ("health/stroke_prediction.csv", "health", "stroke", 5_110, 249),
    ("health/cdc_diabetes_5050.csv.gz", "health", "Diabetes_binary", 70_692, 35_346),
]


@pytest.mark.parametrize(("data_file", "kind", "label", "rows", "positives"), INFER)
def test_inferred_schema_parses_and_validates_its_file(
    data_file: str, kind: str, label: str, rows: int, positives: int
) -> None:
    path = _real(data_file)
    text = infer_schema(path, kind=kind, label=label)
    assert text.startswith("# DRAFT schema")
    assert "PUBLIC" in text
    schema = parse_schema(tomllib.loads(text), source="draft")
    assert schema.kind == kind
    table = load_table(schema, path)
    assert len(table) == rows
    assert int(np.nansum(table.labels[label])) == positives


def test_infer_guesses_types_ids_and_round_bounds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame(
        {
            "customer_id": [f"c{i:04d}" for i in range(n)],
            "age": rng.integers(21, 88, size=n),
            "spend": np.round(rng.lognormal(3, 1.5, size=n), 2),
            "balance": rng.integers(-3313, 71188, size=n),
            "member": rng.choice(["yes", "no"], size=n),
            "plan": rng.choice(["basic", "gold", "platinum"], size=n),
            "city": [f"town{i % 120}" for i in range(n)],
            "comment": [f"parcel {i} arrived late and broken" for i in range(n)],
            "churned": rng.choice(["0", "1"], size=n),
        }
    )
    frame.loc[3, "age"] = 87
    frame.loc[5, "age"] = 21
    frame.loc[7, "plan"] = "diamond"  # one row only: it must not enter a public vocabulary
    path = tmp_path / "customers.txt"
    frame.to_csv(path, index=False, sep="\t")
    text = infer_schema(path, kind="ecommerce", label="churned", max_categories=50)
    doc = tomllib.loads(text)
    assert doc["table"]["id"] == "customer_id"
    assert doc["table"]["delimiter"] == "\\t"
    features = doc["features"]
    p5, p95 = np.quantile(frame["age"], [0.05, 0.95])  # two-digit ages: two digits = integers
    assert features["age"] == {
        "type": "numeric", "bounds": [0, 100], "log": False, "typical": [math.floor(p5), math.ceil(p95)]
    }  # fmt: skip
    assert "typical" not in features["member"] and "typical" not in features["plan"]
    low, high = features["spend"]["typical"]
    assert 0 <= low < high <= features["spend"]["bounds"][1]
    assert "where most of your users lie" in text
    assert features["spend"]["log"] is True
    assert features["balance"]["bounds"] == [-5000, 100000]  # 1, 2 or 5 x 10^k beyond -3313 and 71188 (+10 %)
    assert features["member"] == {"type": "boolean"}
    assert features["plan"]["vocabulary"] == ["basic", "gold", "platinum"]
    assert "diamond" not in text
    assert features["city"] == {"type": "categorical", "buckets": 128}
    assert features["comment"]["type"] == "text"
    assert doc["labels"] == {"churned": {"positive": ["1"]}}
    assert "customer_id" in text.split("Columns that look like ids:")[1].splitlines()[0]
    assert len(load_table(parse_schema(doc), path)) == n


def test_infer_sniffs_whitespace_without_header(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text(" 0004 0001 19970101  2\t  29.33\r\n 0004 0001 19970118  2   29.73\r\n")
    doc = tomllib.loads(infer_schema(path, kind="ecommerce"))
    assert doc["table"]["delimiter"] == "whitespace"
    assert doc["table"]["header"] is False
    assert doc["table"]["columns"] == ["column_1", "column_2", "column_3", "column_4", "column_5"]


def test_infer_rejects_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="kind must be a lower-case word"):
        infer_schema(path, kind="Retail!")
    with pytest.raises(ConfigError, match="no label column 'y'"):
        infer_schema(path, kind="finance", label="y")
    with pytest.raises(ConfigError, match="delimiter must be one of"):
        infer_schema(path, kind="finance", delimiter=":")
    with pytest.raises(DataError, match="does not exist"):
        infer_schema(tmp_path / "nope.csv", kind="finance")


def test_gzip_is_sniffed_through(tmp_path: Path) -> None:
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("a;b\n" + "1;x\n2;y\n" * 5)
    doc = tomllib.loads(infer_schema(path, kind="health"))
    assert doc["table"]["delimiter"] == ";"
    assert doc["features"]["b"]["vocabulary"] == ["x", "y"]


# --- typical ranges (public centring of the encoder's input) ----------------------------------


def test_typical_range_is_parsed_and_enters_the_fingerprint() -> None:
    plain = make_schema({"INCOME": {"type": "numeric", "bounds": [0, 1e6], "log": True}})
    typical = make_schema({"INCOME": {"type": "numeric", "bounds": [0, 1e6], "log": True, "typical": [1e4, 1e5]}})
    assert plain.features[0].typical is None  # type: ignore[union-attr]
    assert typical.features[0].typical == (1e4, 1e5)  # type: ignore[union-attr]
    # Partners of one kind average their adapters only when their inputs mean the same thing.
    assert typical.fingerprint() != plain.fingerprint()
    again = make_schema({"INCOME": {"type": "numeric", "bounds": [0, 1e6], "log": True}})
    assert again.fingerprint() == plain.fingerprint()


@pytest.mark.parametrize(
    ("typical", "shown"),
    [
        ([10, 120], "got [10, 120]"),  # above the bounds
        ([60, 30], "got [60, 30]"),  # not low < high
        ([30], "got [30]"),
        ("20-60", "got '20-60'"),
        ([True, 60], "got [True, 60]"),
    ],
)
def test_bad_typical_range_names_the_key_and_the_bounds(typical: Any, shown: str) -> None:
    with pytest.raises(SchemaError) as caught:
        make_schema({"AGE": {"type": "numeric", "bounds": [18, 100], "typical": typical}})
    assert caught.value.problems == [
        "features.AGE.typical must be [low, high] with 18 <= low < high <= 100 (the public range that holds "
        f"about the middle 90% of users), {shown}"
    ]


def test_typical_range_is_refused_on_a_categorical_sequence() -> None:
    spec = {"type": "sequence", "columns": ["S1", "S2"], "element": "categorical", "vocabulary": ["a", "b"]}
    with pytest.raises(SchemaError) as caught:
        make_schema({"status": {**spec, "typical": [0, 1]}})
    assert caught.value.problems == [
        "features.status.typical is for numbers; a categorical sequence has no typical range"
    ]


def test_layout_centres_and_scales_by_the_typical_range() -> None:
    """(centre, spread) in [0, 1]-scaled units: the middle of the typical range, and the
    standard deviation of a normal whose middle 90% it is; identity without a typical range."""
    from fedpersona.data.features import layout_of

    schema = make_schema({
        "AGE": {"type": "numeric", "bounds": [0, 100], "typical": [20, 60]},
        "INCOME": {"type": "numeric", "bounds": [0, 1e6], "log": True, "typical": [1e4, 1e5]},
        "KIDS": {"type": "numeric", "bounds": [0, 10]},
        "OWNER": {"type": "boolean"},
        "BILL": {"type": "sequence", "columns": ["B1", "B2"], "bounds": [0, 1000], "typical": [100, 300]},
    })  # fmt: skip
    layout = layout_of(schema)
    assert layout.scalar_names == ("AGE", "INCOME", "KIDS", "OWNER")
    z90 = 1.6448536269514722  # the normal's 95th percentile
    (c_age, s_age), (c_inc, s_inc), kids, owner = layout.scalar_standard
    assert c_age == pytest.approx(0.4) and s_age == pytest.approx(0.4 / (2 * z90), rel=1e-4)
    lo, hi = np.log1p(1e4) / np.log1p(1e6), np.log1p(1e5) / np.log1p(1e6)
    assert c_inc == pytest.approx((lo + hi) / 2) and s_inc == pytest.approx((hi - lo) / (2 * z90), rel=1e-4)
    assert kids == (0.0, 1.0) and owner == (0.0, 1.0)
    ((c_bill, s_bill),) = layout.seq_num_standard
    assert c_bill == pytest.approx(0.2) and s_bill == pytest.approx(0.2 / (2 * z90), rel=1e-4)


def test_partner_data_is_read_once_per_process_and_again_when_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import torch

    from fedpersona.config.settings import PartnerConfig, PrivacySettings
    from fedpersona.data.synthetic import generate_silo
    from fedpersona.federation import partner

    silo = generate_silo("finance", 120, seed=4)
    table = tmp_path / "users.csv"
    silo.frame.to_csv(table, index=False)
    schema = tmp_path / "schema.toml"
    from importlib import resources

    schema.write_text(resources.files("fedpersona").joinpath("schemas", "synthetic_finance.toml").read_text())
    cfg = PartnerConfig.model_validate(
        {"name": "bank", "kind": "finance", "data": str(table), "schema": str(schema),
         "state_dir": str(tmp_path / "state"), "privacy": PrivacySettings(target_epsilon=3.0), "public_rows": 100}
    )  # fmt: skip
    reads = []
    real = partner.read_partner_data
    monkeypatch.setattr(partner, "read_partner_data", lambda c, device=None: reads.append(1) or real(c, device=device))
    first = partner.load_partner_data(cfg)
    first.train.tensors["extra"] = torch.zeros(1)  # a caller's addition stays with that caller
    second = partner.load_partner_data(cfg)
    assert len(reads) == 1 and "extra" not in second.train.tensors
    assert torch.equal(first.train.tensors["scalar"], second.train.tensors["scalar"])
    silo.frame.iloc[:60].to_csv(table, index=False)  # the partner's table changes
    os.utime(table, ns=(1, 1))
    third = partner.load_partner_data(cfg)
    assert len(reads) == 2 and len(third.train) + len(third.test) == 60


def test_a_process_keeps_many_partners_and_drops_the_least_recently_used_past_its_memory_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulation's actor answers for many partners: each is read once while they fit in the
    cache's byte budget; past it the least recently used goes, never the newest."""
    from fedpersona.federation import partner
    from tests.conftest import partner_config

    monkeypatch.setattr(partner, "_DATA_CACHE", {})
    reads: list[str] = []
    real = partner.read_partner_data
    monkeypatch.setattr(
        partner,
        "read_partner_data",
        lambda c, device=None: reads.append(f"p{c.synthetic_seed}") or real(c, device=device),
    )
    configs = [partner_config(tmp_path, "finance", rows=200, seed=s) for s in range(6)]
    for _ in range(2):
        for cfg in configs:
            partner.load_partner_data(cfg)
    assert reads == [f"p{s}" for s in range(6)]  # six partners, each read once (the old cache held four)
    one = partner._approximate_bytes(partner.load_partner_data(configs[0]))
    assert one > 0
    monkeypatch.setattr(partner, "_DATA_CACHE_BYTES", int(2.5 * one))  # room for two
    partner.load_partner_data(configs[5])  # p0 was used last, then p5: p1..p4 go
    reads.clear()
    for name in (0, 5, 1):
        partner.load_partner_data(configs[name])
    assert reads == ["p1"]
    partner.load_partner_data(configs[5])  # p0 is now the least recently used and was dropped for p1
    partner.load_partner_data(configs[0])
    assert reads == ["p1", "p0"]


# --- Arrow tables (streaming inference) are validated exactly as their pandas frames ---------------

MIXED = {
    "AGE": {"type": "numeric", "bounds": [18, 100]},
    "paid": {"type": "boolean"},
    "color": {"type": "categorical", "vocabulary": ["red", "blue", "1"], "unseen": "other"},
    "note": {"type": "text"},
}


def same_table(one: Table, other: Table) -> None:
    assert one.ids.tolist() == other.ids.tolist()
    assert one.columns.keys() == other.columns.keys() and one.labels.keys() == other.labels.keys()
    for name, values in one.columns.items():
        assert values.dtype == other.columns[name].dtype, name
        if values.dtype == object:
            assert values.tolist() == other.columns[name].tolist(), name
        else:
            np.testing.assert_array_equal(values, other.columns[name], err_msg=name)
    for name, values in one.labels.items():
        np.testing.assert_array_equal(values, other.labels[name], err_msg=name)


def test_an_arrow_table_gives_the_table_of_its_frame(caplog: pytest.LogCaptureFixture) -> None:
    import pyarrow as pa

    schema = make_schema(MIXED, labels={"y": {"column": "y", "positive": ["1"]}}, id="ID")
    # Whitespace python strips (a no-break space, an ideographic space, U+001C), missing
    # spellings, a clipped number, an unseen category, canonical numbers, non-ASCII text.
    frame = strings(
        ID=[" u1", "u2\u3000", "u3", "u4", "\xa0u5"],
        AGE=["30", " 150", "", "NA", "7.5E1"],
        paid=["yes", "No ", "", "TRUE", "0"],
        color=["red", "green", "1.0", "N/A", " blue"],
        note=["Grüße aus Köln", "", "x\x1c", "  spaced  out ", "NA"],
        y=["1", "0", "", "1", "0"],
        extra=["a", "b", "c", "d", "e"],
    )
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    assert _validate_arrow(schema, arrow, source="t") is not None  # checked in Arrow, not again in pandas
    with caplog.at_level("INFO", logger="fedpersona.data.tables"):
        fast = validate_frame(schema, arrow, source="t")
    fast_log = [r.getMessage() for r in caplog.records]
    caplog.clear()
    with caplog.at_level("INFO", logger="fedpersona.data.tables"):
        same_table(fast, validate_frame(schema, frame, source="t"))
    assert fast_log == [r.getMessage() for r in caplog.records] and len(fast_log) == 3  # extra, clip, unseen
    assert fast.ids.tolist() == ["u1", "u2", "u3", "u4", "u5"]
    # Typed columns (as from Parquet) are read as pandas writes them: 1 and 1.0 are the category "1".
    typed = pa.table(
        {"ID": pa.array([1, 2, 3]), "AGE": pa.array([30.0, None, 99.5]), "paid": pa.array([True, False, None]),
         "color": pa.array([1, 2, 1]), "note": pa.array([1.5, None, 2.0])}
    )  # fmt: skip
    without_label = make_schema(MIXED, id="ID")
    same_table(
        validate_frame(without_label, typed, source="t"), validate_frame(without_label, typed.to_pandas(), source="t")
    )


@pytest.mark.parametrize(
    "column, values",
    [
        ("ID", ["u1", "u1", "u3"]),  # a duplicate id
        ("ID", ["u1", "NA", "u3"]),  # a missing id
        ("AGE", ["30", "old", "40"]),  # not a number
        ("AGE", ["30", "inf", "40"]),  # not finite
        ("paid", ["yes", "perhaps", "no"]),  # not a boolean
        ("color", ["red", "green", "blue"]),  # unseen, where the schema rejects it
        ("y", ["1", "maybe", "no"]),  # not a label value
    ],
)
def test_an_arrow_table_reports_the_problems_of_its_frame(column: str, values: list[str]) -> None:
    import pyarrow as pa

    features = {**MIXED, "color": {**MIXED["color"], "unseen": "reject"}}
    schema = make_schema(features, labels={"y": {"column": "y", "positive": ["1"]}}, id="ID", out_of_bounds="reject")
    cells = {"ID": ["u1", "u2", "u3"], "AGE": ["30", "40", "50"], "paid": ["yes", "no", "yes"],
             "color": ["red", "blue", "red"], "note": ["a", "b", "c"], "y": ["1", "0", "1"]}  # fmt: skip
    frame = strings(**{**cells, column: values})
    expected = problems_of(schema, frame)
    assert len(expected) == 1
    assert problems_of(schema, pa.Table.from_pandas(frame, preserve_index=False)) == expected
    # A repeated column name and a missing column, too.
    repeated = pa.Table.from_pandas(strings(**cells), preserve_index=False).rename_columns(
        ["ID", "AGE", "AGE", "color", "note", "y"]
    )
    assert problems_of(schema, repeated) == problems_of(
        schema, strings(**cells).set_axis(repeated.column_names, axis=1)
    )
