"""Config parsing: every problem of a file at once, unknown keys with a did-you-mean, ranges
and types checked strictly, the shipped files valid."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from fedpersona.config.files import load_federation_config, load_partner_config, load_scenario
from fedpersona.config.settings import FederationSettings, ModelSettings, PrivacySettings
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
    for kind in ("ecommerce", "finance", "health"):
        assert load_partner_config(REPO / "clients" / kind / "client.toml").kind == kind
    assert load_federation_config(REPO / "server" / "federation.toml").partners


def test_unknown_keys_get_a_did_you_mean_and_the_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[privacy]\ntarget_epsilom = 1.0\n[federaton]\nrounds = 2\n[[silos]]\nkind="health"\nname="c"\nrows=100\n'
    )
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    text = str(info.value)
    assert str(path) in text and "2 problem(s)" in text
    assert "unknown key privacy.target_epsilom: did you mean target_epsilon?" in text
    assert "unknown key federaton: did you mean federation?" in text


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[federation]\nrounds = 0\nserver_optimizer = "sgd"\n[privacy]\ndelta = 2\naccountant = "gdp"\n'
        '[training]\nbatch_size = "64"\n[[silos]]\nkind="health"\nname="c"\nrows=100\n'
    )
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    text = str(info.value)
    assert "5 problem(s)" in text
    for fragment in (
        "federation.rounds: must be >= 1, got 0",
        "federation.server_optimizer: must be one of fedavg, fedadam, fedprox, got 'sgd'",
        "privacy.delta: must be < 1, got 2",
        "privacy.accountant: 'gdp' is refused",
        "training.batch_size: must be an integer, got '64'",  # strict: a string is no number
    ):
        assert fragment in text, fragment


def test_overrides_and_inf(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[[silos]]\nkind="health"\nname="c"\nrows=100\n')
    sc = load_scenario(path, rounds=7, epsilon=math.inf)
    assert sc.federation.rounds == 7 and not sc.privacy.private
    with pytest.raises(ConfigError, match=re.escape("privacy.target_epsilon: must be > 0, got 0.0")):
        load_scenario(path, epsilon=0.0)
    path.write_text('[privacy]\ntarget_epsilon = "inf"\n[[silos]]\nkind="health"\nname="c"\nrows=100\n')
    assert math.isinf(load_scenario(path).privacy.target_epsilon)


def test_partner_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text('[partner]\nname="x"\nkind="Bakery!"\n[data]\npath="d.csv"\nschema="s.toml"\n')
    with pytest.raises(ConfigError, match=r"partner.kind: must be a lower-case word"):
        load_partner_config(path)
    # A kind of one's own is fine with one's own table, not with a synthetic one.
    path.write_text('[partner]\nname="x"\nkind="insurance"\n[data]\npath="d.csv"\nschema="s.toml"\n')
    assert load_partner_config(path).kind == "insurance"
    path.write_text('[partner]\nname="x"\nkind="insurance"\n[data]\nsynthetic_rows=10\n')
    with pytest.raises(ConfigError, match=r"exists for the kinds ecommerce, finance, health only"):
        load_partner_config(path)
    path.write_text('[partner]\nname="x"\nkind="health"\n[data]\npath="d.csv"\n')
    with pytest.raises(ConfigError, match=r"data.schema must name the schema file"):
        load_partner_config(path)
    path.write_text('[partner]\nname="x"\nkind="health"\n[data]\nsynthetic_rows=10\n[privacy]\ndelta=2\n')
    with pytest.raises(ConfigError, match=r"privacy.delta: must be < 1, got 2"):
        load_partner_config(path)
    path.write_text('[partner]\nname="x"\nkind="health"\n[data]\nsynthetic_rows=10\n[release]\naudit_log="false"\n')
    with pytest.raises(ConfigError, match=r"release.audit_log: must be true or false, got 'false'"):
        load_partner_config(path)


def test_settings_built_in_code_check_their_ranges() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.mask_rate: must be < 1, got 1.5")):
        ModelSettings.checked(mask_rate=1.5)
    with pytest.raises(ConfigError, match=re.escape("federation.persona_share: must be a finite number")):
        FederationSettings().replace(persona_share=math.inf)
    assert PrivacySettings().replace(target_epsilon="inf").private is False
