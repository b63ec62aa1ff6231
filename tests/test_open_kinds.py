"""Kinds are open: a partner may declare its own kind (an insurer is not a bank)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpersona.config.files import dump_toml, load_partner_config
from fedpersona.data.drafting import infer_schema
from fedpersona.data.schema_reader import load_schema
from fedpersona.errors import ConfigError, SchemaError
from fedpersona.federation.partner import read_partner_data
from fedpersona.federation.partner_personas import persona_width

SCHEMA = """
[table]
kind = "{kind}"
id = "id"

[features.age]
type = "numeric"
bounds = [18, 100]
typical = [25, 70]

[features.cover]
type = "categorical"
vocabulary = ["basic", "plus", "premium"]

[labels.claimed]
column = "claimed"
positive = ["1"]
"""


def _insurer(tmp_path: Path, *, kind: str = "insurance", partner_kind: str = "insurance") -> Path:
    rng = np.random.default_rng(0)
    rows = ["id,age,cover,claimed"] + [
        f"u{i},{rng.integers(18, 90)},{rng.choice(['basic', 'plus', 'premium'])},{rng.integers(0, 2)}"
        for i in range(80)
    ]
    (tmp_path / "users.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "schema.toml").write_text(SCHEMA.format(kind=kind))
    path = tmp_path / "client.toml"
    dump_toml(
        path,
        {
            "partner": {"name": "insurer-1", "kind": partner_kind, "state_dir": "state"},
            "data": {"path": "users.csv", "schema": "schema.toml", "public_rows": 60},
            "privacy": {"target_epsilon": 3.0, "delta": 1e-5},
        },
    )
    return path


def test_a_partner_of_its_own_kind_loads_its_table_and_persona_view(tmp_path: Path) -> None:
    cfg = load_partner_config(_insurer(tmp_path))
    assert load_schema(tmp_path / "schema.toml").kind == "insurance"
    data = read_partner_data(cfg)
    assert len(data.table) == 80 and data.persona_train.shape[1] == persona_width(cfg) == 5  # age, 3 codes and "other"


def test_a_kind_must_be_a_lower_case_word_and_agree_with_the_schema(tmp_path: Path) -> None:
    _insurer(tmp_path, kind="Insurance!")
    with pytest.raises(SchemaError, match=r"table\.kind must be a lower-case word"):
        load_schema(tmp_path / "schema.toml")
    cfg = load_partner_config(_insurer(tmp_path, kind="finance"))
    mismatch = r"partner\.kind is 'insurance' but the schema .* says table\.kind = 'finance'"
    with pytest.raises(ConfigError, match=mismatch):
        read_partner_data(cfg)


def test_schema_infer_drafts_for_any_kind(tmp_path: Path) -> None:
    _insurer(tmp_path)
    assert 'kind = "insurance"' in infer_schema(tmp_path / "users.csv", kind="insurance")
    with pytest.raises(ConfigError, match="kind must be a lower-case word"):
        infer_schema(tmp_path / "users.csv", kind="Insurance")
