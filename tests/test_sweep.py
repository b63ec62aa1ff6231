"""The privacy-utility sweep: option parsing, the summary against hand-made run folders, and a
real two-budget sweep on Flower's simulation engine."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpersona.errors import ConfigError
from fedpersona.sweep import INF_LABEL, parse_epsilons, sweep_figure, write_sweep

SCENARIO = """
[federation]
rounds = 1
min_partners = 2
personas = 4
persona_steps = 3
[model]
token_dim = 16
embed_dim = 16
hidden = 32
blocks = 1
[training]
batch_size = 32
local_epochs = 1
[[silos]]
kind = "ecommerce"
name = "shop"
partners = 2
rows = 600
[[silos]]
kind = "health"
name = "clinic"
partners = 1
rows = 300
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpersona.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_parse_epsilons_sorts_and_names_every_bad_item() -> None:
    assert parse_epsilons("8, 0.5,inf,1") == [0.5, 1.0, 8.0, math.inf]
    assert parse_epsilons("Infinity") == [math.inf]
    with pytest.raises(ConfigError) as err:
        parse_epsilons("1,abc,-2,0,nan,,2")
    text = str(err.value)
    for bad in ("'abc'", "'-2'", "'0'", "'nan'", "''"):
        assert bad in text
    assert "'1'" not in text and "'2'" not in text
    with pytest.raises(ConfigError, match="more than once"):
        parse_epsilons("1,2,1.0")


def _main(*args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The CLI in process (as the console script runs it): exit code and stderr."""
    from fedpersona import cli

    monkeypatch.setattr(sys, "argv", ["fedpersona", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    code = done.value.code
    return (code if isinstance(code, int) else 1), " ".join(capsys.readouterr().err.split())


def test_cli_rejects_a_bad_sweep_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    code, err = _main("simulate", "--sweep-epsilon", "0.5,1,x1,inf", "--out", str(out), monkeypatch=monkeypatch,
                      capsys=capsys)  # fmt: skip
    assert code == 2 and "'x1'" in err and "--sweep-epsilon" in err and "Traceback" not in err
    assert not out.exists()
    code, err = _main("simulate", "--epsilon", "1", "--sweep-epsilon", "1,2", "--out", str(out),
                      monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert code == 2 and "exclude each other" in err and not out.exists()
    code, err = _main("report", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "not a run folder" in err


def _run_folder(path: Path, rows: list[dict[str, object]], spent: dict[str, float | None]) -> None:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    partners = {name: {"kind": "x", "epsilon": eps} for name, eps in spent.items()}
    (path / "privacy.json").write_text(json.dumps({"partners": partners}))


def _rows(label: list[float], ari: list[float], hit: float) -> list[dict[str, object]]:
    kinds = ["ecommerce", "ecommerce", "health"]
    names = ["shop-1", "shop-2", "clinic-1"]
    out: list[dict[str, object]] = []
    for rnd in (1, 2):  # round 1 is not the final one: its AUC must not count
        for name, kind, auc in zip(names, kinds, label, strict=True):
            out.append({"round": rnd, "partner": name, "kind": kind, "label_auc": auc - (2 - rnd) * 0.3,
                        "probe_auc": auc / 2})  # fmt: skip
    for name, kind, a in zip(names, kinds, ari, strict=True):
        row: dict[str, object] = {"round": 2, "partner": name, "kind": kind, "phase": "personas",
                                  "persona_ari": a, "surrogate_fidelity": 0.9}  # fmt: skip
        if kind == "ecommerce":
            row.update(rec_hit_rate=hit, rec_hit_rate_popularity=0.3)
        out.append(row)
    return out


def test_sweep_summary_report_and_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    label = {"0.5": [0.6, 0.7, 0.5], "4": [0.8, 0.9, 0.7], "inf": [0.9, 0.95, 0.85]}
    ari = {"0.5": [0.1, 0.2, 0.0], "4": [0.4, 0.5, 0.3], "inf": [0.6, 0.7, 0.5]}
    spent = {"0.5": {"shop-1": 0.49, "shop-2": 0.5, "clinic-1": 0.47}, "4": {"shop-1": 3.9, "shop-2": 3.1,
             "clinic-1": 3.95}, "inf": {"shop-1": None, "shop-2": None, "clinic-1": None}}  # fmt: skip
    for eps in ("4", "inf", "0.5"):
        _run_folder(tmp_path / f"eps-{eps}", _rows(label[eps], ari[eps], 0.5), spent[eps])
    (tmp_path / "eps-bogus").mkdir()  # not a sweep run: ignored
    (tmp_path / "eps-0.1").mkdir()  # every partner refused this budget: no round ran
    (tmp_path / "eps-0.1" / "privacy.json").write_text(json.dumps({"partners": {}}))
    refused, *runs = write_sweep(tmp_path)
    assert refused["label"] == "0.1" and refused["label_auc"] is None and refused["max_epsilon_spent"] is None
    assert "no round completed" in refused["note"]
    assert [r["label"] for r in runs] == ["0.5", "4", "inf"]
    for r in runs:
        eps = r["label"]
        assert r["label_auc"] == pytest.approx(np.mean(label[eps]))
        assert r["probe_auc"] == pytest.approx(np.mean(label[eps]) / 2)
        assert r["persona_ari"] == pytest.approx(np.mean(ari[eps]))
        assert r["per_kind"]["health"]["label_auc"] == pytest.approx(label[eps][2])
        assert r["per_kind"]["ecommerce"]["persona_ari"] == pytest.approx(np.mean(ari[eps][:2]))
        assert r["per_kind"]["health"]["rec_hit_rate"] is None and r["rec_hit_rate"] == pytest.approx(0.5)
    assert [r["max_epsilon_spent"] for r in runs] == [0.5, 3.95, None]
    assert [r["epsilon_spent"] for r in runs] == [spent[e] for e in ("0.5", "4", "inf")]
    assert [r["target_epsilon"] for r in runs] == [0.5, 4.0, None] and runs[2]["private"] is False
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"] == [refused, *runs]
    table = list(csv.DictReader((tmp_path / "sweep.csv").read_text().splitlines()))
    assert [t["epsilon"] for t in table] == ["0.1", "0.5", "4", "inf"]
    assert float(table[2]["health.label_auc"]) == pytest.approx(0.7)
    page = (tmp_path / "report.html").read_text()
    assert INF_LABEL in page and "data:image/png;base64," in page and "eps-4/report.html" in page
    assert INF_LABEL in (tmp_path / "report.md").read_text()

    assert "no round completed" in page
    fig = sweep_figure(runs)
    for ax in fig.axes[:3]:
        assert ax.get_xscale() == "log"
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["0.5", "4", INF_LABEL]
        assert ax.get_xticks()[-1] > 4  # the non-private point sits right of every budget
    private_line = fig.axes[0].lines[0]
    assert list(private_line.get_xdata()) == [0.5, 4.0]  # inf is not joined to the private points
    import matplotlib.pyplot as plt

    plt.close(fig)

    (tmp_path / "sweep.json").unlink()
    from fedpersona import cli

    monkeypatch.setattr(sys, "argv", ["fedpersona", "report", str(tmp_path)])
    cli.main()  # returns normally on success
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"] == [refused, *runs]


@pytest.mark.slow
def test_real_sweep_runs_the_budget_and_reports(tmp_path: Path) -> None:
    """One budget keeps this under a minute; the inf point and the ordering are covered above."""
    scenario = tmp_path / "sweep.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "sweep"
    done = _cli("simulate", "--scenario", str(scenario), "--sweep-epsilon", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["label"] for r in sweep] == ["1"]
    private = json.loads((out / "eps-1" / "privacy.json").read_text())["partners"]
    assert sweep[0]["max_epsilon_spent"] == pytest.approx(max(p["epsilon"] for p in private.values()))
    assert sweep[0]["epsilon_spent"] == {name: p["epsilon"] for name, p in private.items()}
    assert 0 < sweep[0]["max_epsilon_spent"] <= 1.0
    rows = [json.loads(x) for x in (out / "eps-1" / "metrics.jsonl").read_text().splitlines()]
    personas = {r["partner"]: r for r in rows if r.get("phase") == "personas"}
    assert set(personas) == {"shop-1", "shop-2", "clinic-1"}
    for name in ("shop-1", "shop-2"):  # e-commerce: the recommendation check vs popularity
        assert 0.0 <= personas[name]["rec_hit_rate"] <= 1.0
        assert 0.0 <= personas[name]["rec_hit_rate_popularity"] <= 1.0
    assert "rec_hit_rate" not in personas["clinic-1"]
    assert sweep[0]["rec_hit_rate"] == pytest.approx(
        np.mean([personas[n]["rec_hit_rate"] for n in ("shop-1", "shop-2")])
    )
    final = [r for r in rows if "phase" not in r and r["round"] == 1]
    aucs = [r["label_auc"] for r in final if "label_auc" in r]  # a partner without signal reports none
    assert all(("label_auc" in r) == (r["label_signal"] == 1.0) for r in final) and len(final) == 3
    assert sweep[0]["label_auc"] == (pytest.approx(float(np.mean(aucs))) if aucs else None)
    page = (out / "eps-1" / "report.html").read_text()
    assert "Persona profiles at each partner (local, not sent)" in page
    assert page.count("alt='persona profile of") == 3
    assert "data:image/png;base64," in (out / "report.html").read_text()
