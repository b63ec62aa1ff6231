"""Personas a person reads: the partner's local persona report (``fedpersona report STATE_DIR``)
and the warnings about a degenerate segmentation, at the coordinator and at a partner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpersona.data.schema_reader import parse_schema
from fedpersona.data.tables import validate_frame
from fedpersona.errors import DataError
from fedpersona.partner_report import load_partner_personas, write_partner_report
from fedpersona.personas.cards import feature_profile, persona_cards
from fedpersona.report import DOMINANT_SHARE, UNUSED_SHARE, federation_warnings, partner_warnings, write_report

SCHEMA = {
    "table": {"kind": "finance", "id": "id", "min_rows": 1},
    "features": {
        "spend": {"type": "numeric", "bounds": [0, 100]},
        "SEX": {"type": "categorical", "vocabulary": [1, 2], "value_labels": {"1": "male", "2": "female"}},
    },
    "labels": {"default": {"positive": ["1"]}},
}


def state_folder(path: Path, personas: np.ndarray, k: int) -> Path:
    """A partner's state folder as a federation leaves it: personas.json and assignments.csv."""
    n = len(personas)
    sex = np.where(personas == 0, "2", "1")
    frame = pd.DataFrame(
        {
            "id": [f"u{i}" for i in range(n)],
            "spend": [str(10 + 5 * (p == 0) + i % 3) for i, p in enumerate(personas)],
            "SEX": sex,
            "default": ["1" if (i % 4 == 0) == (p == 0) else "0" for i, p in enumerate(personas)],
        }
    )
    table = validate_frame(parse_schema(SCHEMA), frame, source="t")
    cards = persona_cards(table, personas, k=k, rng=np.random.default_rng(0), min_users=3)
    path.mkdir(parents=True, exist_ok=True)
    doc = {
        "partner": "bank-1",
        "kind": "finance",
        "k": k,
        "cards": [c.to_dict() for c in cards],
        "profile": feature_profile(table, personas, k=k, min_users=3).to_dict(),
    }
    (path / "personas.json").write_text(json.dumps(doc))
    lines = ["user_id,persona"] + [f"u{i},{int(p)}" for i, p in enumerate(personas)]
    (path / "assignments.csv").write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The CLI in process: exit code and stdout + stderr, whitespace collapsed."""
    from fedpersona import cli

    monkeypatch.setattr(sys, "argv", ["fedpersona", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


# --- the warnings ------------------------------------------------------------------------------


def test_federation_warns_when_one_persona_holds_most_users_of_a_kind() -> None:
    shares = {"ecommerce": [0.9, 0.05, 0.05], "finance": [0.4, 0.3, 0.3]}
    (warning,) = federation_warnings({"shares_by_kind": shares})
    assert warning.startswith("one persona holds most users: P0 has 90% of the ecommerce users (more than 60%)")
    # At the threshold itself, and for a single persona (nothing to separate), no warning.
    assert federation_warnings({"shares_by_kind": {"ecommerce": [DOMINANT_SHARE, 1 - DOMINANT_SHARE]}}) == []
    assert federation_warnings({"shares_by_kind": {"ecommerce": [1.0]}}) == []
    assert federation_warnings({}) == [] and federation_warnings({"shares_by_kind": {}}) == []


def test_federation_warns_about_personas_no_kind_uses() -> None:
    shares = {"ecommerce": [0.5, 0.49, 0.01, 0.0], "health": [0.45, 0.54, 0.005, 0.005]}
    assert federation_warnings({"shares_by_kind": shares}) == [
        "personas that no partner uses: P2, P3 hold under 2% of the users of every kind"
    ]
    # A persona one kind uses is used: P3 has 3% of the health users.
    shares["health"] = [0.45, 0.51, 0.01, UNUSED_SHARE + 0.01]
    assert federation_warnings({"shares_by_kind": shares}) == [
        "a persona that no partner uses: P2 holds under 2% of the users of every kind"
    ]
    assert federation_warnings({"shares_by_kind": {"ecommerce": [0.5, 0.5]}}) == []


def test_partner_warnings_come_from_its_own_counts() -> None:
    assert partner_warnings([95, 5, 0]) == [
        "one persona holds most of your users: P0 has 95% of them (more than 60%), so the personas hardly tell "
        "your users apart",
        "a persona that your users do not use: P2 holds under 2% of your users",
    ]
    assert partner_warnings([40, 35, 25]) == []
    assert partner_warnings([0, 0]) == []


def test_the_run_report_shows_the_warning_only_for_a_degenerate_segmentation(tmp_path: Path) -> None:
    for name, shares, expected in (
        ("flat", {"ecommerce": [1.0, 0.0, 0.0, 0.0]}, True),
        ("fine", {"ecommerce": [0.3, 0.3, 0.2, 0.2]}, False),
    ):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("")
        personas = {"k": 4, "rounds": 3, "shares_by_kind": shares}
        (run / "personas.json").write_text(json.dumps(personas))
        write_report(run)
        md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
        assert ("Degenerate segmentation" in md) is expected and ("Degenerate segmentation" in page) is expected
        assert ("P0 has 100% of the ecommerce users" in md) is expected
        assert ("P1, P2, P3 hold under 2%" in page) is expected
        assert not list(run.glob("*.tmp"))


def test_fedpersona_report_on_a_run_prints_the_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "personas.json").write_text(json.dumps({"k": 2, "shares_by_kind": {"health": [0.97, 0.03]}}))
    code, out = run_cli("report", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "warning: one persona holds most users: P0 has 97% of the health users" in out


# --- the partner's report ----------------------------------------------------------------------


def test_a_partner_report_from_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_folder(tmp_path / "state", np.repeat([0, 1], [24, 16]), k=2)
    (state / "ledger.jsonl").write_text("")  # the report leaves the partner's other files alone
    code, out = run_cli("report", str(state), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, out
    assert f"wrote {state / 'report.html'} and {state / 'report.md'}" in out and "warning" not in out
    page, md = (state / "report.html").read_text(), (state / "report.md").read_text()
    doc = json.loads((state / "personas.json").read_text())
    names = [c["name"] for c in doc["cards"]]
    assert names[0].startswith("SEX: female") and names[1].startswith("SEX: male")
    for name in names:
        assert name in md and name in page
    # sizes and shares, as bars in the HTML (CSS only: no script, nothing fetched)
    assert "| P0 | SEX: female" in md and "| 24 | 60.0% " in md and "| 16 | 40.0% " in md
    assert "style='width:60.0%'" in page and "style='width:40.0%'" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "data:image/png;base64," in page  # the profile heatmap, inline
    # distinguishing features, rules with their users, label rates against the silo
    assert "- 1.7× more likely to have SEX = female (100% vs 60% in the silo)" in md
    assert "| SEX = female | 24 | 100.0% |" in md and "| SEX ≠ female | 16 | 100.0% |" in md
    # P0: every 4th user defaults (6 of 24); P1: the other three of four (12 of 16); all: 18 of 40
    assert "| default | 25.0% | 45.0% |" in md and "| default | 75.0% | 45.0% |" in md
    assert "fidelity 100.0%" in md
    assert (state / "ledger.jsonl").read_text() == "" and not list(state.glob("*.tmp"))


def test_a_degenerate_partner_segmentation_is_flagged_in_its_report(tmp_path: Path) -> None:
    personas = np.repeat([0, 1], [36, 4])  # 90% in P0; P2 has nobody
    done = write_partner_report(state_folder(tmp_path, personas, k=3))
    assert done.warnings == (
        "one persona holds most of your users: P0 has 90% of them (more than 60%), so the personas hardly tell "
        "your users apart",
        "a persona that your users do not use: P2 holds under 2% of your users",
    )
    md, page = done.markdown.read_text(), done.html.read_text()
    assert "**Degenerate segmentation** (judged from your own users' personas only):" in md
    assert "P0 has 90% of them" in md and "P0 has 90% of them" in page
    # P2 (no users) is suppressed on its card and shown as such.
    assert "## P2: Persona 2 (fewer than 3 users)" in md and "Fewer than 3 users: nothing more is shown." in md


def test_without_assignments_the_cards_sizes_stand_in(tmp_path: Path) -> None:
    state = state_folder(tmp_path, np.repeat([0, 1], [36, 4]), k=2)
    (state / "assignments.csv").unlink()
    doc, counts = load_partner_personas(state)
    assert counts is None and [c["users"] for c in doc["cards"]] == [36, 4]
    assert write_partner_report(state).warnings[0].startswith("one persona holds most of your users: P0 has 90%")


def test_a_state_folder_without_cards_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plan.json").write_text("{}")
    code, out = run_cli("report", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "Traceback" not in out
    assert f"{tmp_path} has no persona cards yet (no personas.json)" in out and "Run a federation first" in out
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "report.md").exists()
    (tmp_path / "personas.json").write_text('{"partner": "bank-1", "cards": []}')
    with pytest.raises(DataError, match=r"personas\.json: expected an object with 'cards', a non-empty list"):
        write_partner_report(tmp_path)
    (tmp_path / "personas.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read the persona cards"):
        write_partner_report(tmp_path)


def test_a_share_just_over_the_threshold_is_not_written_as_the_threshold() -> None:
    (warning,) = federation_warnings({"shares_by_kind": {"health": [0.6004, 0.3996]}})
    assert "P0 has 60.0% of the health users (more than 60%)" in warning
    assert "P0 has 61% of them" in partner_warnings([61, 39])[0]


def test_a_folder_that_does_not_exist_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_cli("report", str(tmp_path / "nowhere"), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and f"{tmp_path / 'nowhere'} does not exist or is not a folder" in out
