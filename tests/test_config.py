"""Config parsing: unknown keys rejected with the valid ones, ranges checked."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedpersona.config.files import load_partner_config, load_scenario
from fedpersona.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_scenarios_load_and_default_matches_package_copy() -> None:
    default = load_scenario(REPO / "simulations" / "three_silos.toml")
    packaged = load_scenario(REPO / "fedpersona" / "scenarios" / "three_silos.toml")
    assert default.to_dict() == packaged.to_dict()
    assert {s.kind for s in default.silos} == {"ecommerce", "finance", "health"}
    assert sum(s.partners for s in default.silos) == 9
    real = load_scenario(REPO / "simulations" / "real_silos.toml")
    assert all(s.small_partner_rows and s.small_partner_rows <= 500 for s in real.silos)


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[privacy]\ntarget_epsilom = 1.0\n[[silos]]\nkind="health"\nname="c"\nrows=100\n')
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    text = str(info.value)
    assert "privacy.target_epsilom" in text and "target_epsilon" in text and str(path) in text


def test_overrides_and_inf(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[[silos]]\nkind="health"\nname="c"\nrows=100\n')
    sc = load_scenario(path, rounds=7, epsilon=math.inf)
    assert sc.federation.rounds == 7 and not sc.privacy.private
    with pytest.raises(ConfigError, match="target_epsilon must be > 0"):
        load_scenario(path, epsilon=0.0)


def test_partner_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text('[partner]\nname="x"\nkind="bakery"\n[data]\nsynthetic_rows=10\n')
    with pytest.raises(ConfigError, match=r"partner.kind must be one of"):
        load_partner_config(path)
    path.write_text('[partner]\nname="x"\nkind="health"\n[data]\npath="d.csv"\n')
    with pytest.raises(ConfigError, match=r"data.schema"):
        load_partner_config(path)
    path.write_text('[partner]\nname="x"\nkind="health"\n[data]\nsynthetic_rows=10\n[privacy]\ndelta=2\n')
    with pytest.raises(ConfigError, match=r"delta must be in \(0, 1\)"):
        load_partner_config(path)
