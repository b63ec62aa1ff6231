"""`schema infer` drafts safely for a shared schema: domain-looking bounds flagged where they stand,
counts kept numbers, integer codes offered as categories, a saved index taken as the id, a yes/no
target drafted as the label."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from fedpersona.data.drafting import infer_schema
from fedpersona.data.schema_reader import parse_schema
from fedpersona.data.tables import load_table


def _frame(n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "age": rng.integers(23, 80, size=n),
            "signup_year": rng.integers(1995, 2020, size=n),
            "temperature": rng.uniform(-31.0, -2.0, size=n).round(1),
            "Kidhome": rng.choice([0, 1], size=n),  # a count seen only as 0 and 1 in this sample
            "smoker": rng.choice([0, 1], size=n),  # a real yes/no
            "EDUCATION": rng.choice([1, 2, 3, 4], size=n),  # codes
            "y": rng.choice(["yes", "no"], size=n, p=[0.2, 0.8]),
        }
    )


def test_bounds_are_round_domain_limits_flagged_where_they_stand(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    _frame().to_csv(path, index=False)
    text = infer_schema(path, kind="health")
    features = tomllib.loads(text)["features"]
    assert features["age"]["bounds"] == [0, 100]
    assert features["signup_year"]["bounds"] == [1900, 2100]  # not [1990, 2030], which is near the file's range
    assert features["temperature"]["bounds"] == [-50, 0]
    flagged = re.findall(r"^bounds = \[[^\]]*\]  # DRAFTED FROM THIS FILE.*round limits.*domain's limits", text, re.M)
    assert len(flagged) == len(re.findall(r"^bounds = ", text, re.M)) == 5  # age, year, temperature, Kidhome, codes
    assert "replace it with the domain's limits" in text


def test_counts_stay_numbers_codes_are_offered_as_categories_and_yes_no_stays_boolean(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    _frame().to_csv(path, index=False)
    text = infer_schema(path, kind="health")
    features = tomllib.loads(text)["features"]
    assert features["Kidhome"]["type"] == "numeric" and features["Kidhome"]["bounds"] == [0, 2]
    assert "# Kidhome: only 0 and 1 in this file, but named like a count: kept a number, not a yes/no" in text
    assert features["smoker"] == {"type": "boolean"}
    assert features["EDUCATION"]["type"] == "numeric"  # the numeric block stays active ...
    offered = (
        "# EDUCATION: only 4 distinct integers. If they are codes rather than amounts, replace the block\n"
        "# above with this one (remove the `#` of each line) and name every code from your codebook:\n"
        "# [features.EDUCATION]\n"
        '# type = "categorical"\n'
        '# vocabulary = ["1", "2", "3", "4"]\n'
        '# unseen = "other"\n'
        '# # what each code means (keep it a comment): "1" = "?", "2" = "?", "3" = "?", "4" = "?"\n'
    )
    assert offered in text  # ... with the categorical alternative right below it
    numeric_block = re.search(r"\[features\.EDUCATION\]\ntype = \"numeric\"\n[^\n]*\nlog = false\n(?:typical[^\n]*\n)?"
                              r"(?:# edges[^\n]*\n)?", text)  # fmt: skip
    assert numeric_block is not None
    accepted = text.replace(numeric_block.group(0), "").replace(offered, "".join(
        line[2:] + "\n" for line in offered.splitlines()[2:-1]
    ))  # fmt: skip
    schema = parse_schema(tomllib.loads(accepted), source="accepted.toml")
    education = next(f for f in schema.features if f.name == "EDUCATION")
    assert education.type == "categorical" and education.vocabulary == ("1", "2", "3", "4")  # type: ignore[union-attr]
    assert len(load_table(schema, path)) == 300


def test_a_saved_index_is_the_id_and_a_yes_no_target_is_the_label(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    _frame().to_csv(path)  # pandas writes its index as a first column without a name
    pd.read_csv(path).to_csv(tmp_path / "again.csv", index=False)  # read back and saved: a column "Unnamed: 0"
    named = tomllib.loads(infer_schema(tmp_path / "again.csv", kind="health"))
    assert named["table"]["id"] == "Unnamed: 0" and "Unnamed: 0" not in named["features"]
    assert len(load_table(parse_schema(named, source="again.toml"), tmp_path / "again.csv")) == 300
    text = infer_schema(path, kind="health")
    doc = tomllib.loads(text)
    assert "id" not in doc["table"] and "" not in doc["features"]
    assert "# The column without a name is a saved row index (unique in every row): it is left out" in text
    assert doc["labels"] == {"y": {"positive": ["yes"]}} and "y" not in doc["features"]
    assert "# Label: 'y' is a yes/no column named like a target, so it is drafted under [labels]," in text
    schema = parse_schema(doc, source="draft.toml")
    table = load_table(schema, path)
    assert len(table) == 300 and int(np.nansum(table.labels["y"])) == int((_frame()["y"] == "yes").sum())
    # A label named on the command line wins; then no other column is suggested.
    chosen = tomllib.loads(infer_schema(path, kind="health", label="smoker"))
    assert chosen["labels"] == {"smoker": {"positive": ["1"]}} and chosen["features"]["y"] == {"type": "boolean"}
