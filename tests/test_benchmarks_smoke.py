"""The benchmark harness: the report renderer and one cheap benchmark end to end (no timings)."""

from __future__ import annotations

import json

from benchmarks.report import render
from benchmarks.run import main

RESULTS = {
    "command": "python -m benchmarks.run --quick",
    "date": "2026-01-01T00:00:00+00:00",
    "runtime_s": 12.0,
    "environment": {
        "versions": {"python": "3.11", "torch": "2", "opacus": "1", "flwr": "1", "sklearn": "1"},
        "cpu_model": "Test CPU",
        "cores": 2,
        "memory_gb": 8.0,
        "load_average": [1.5, 1.0, 0.5],
    },
    "benchmarks": {
        "speed": {
            "title": "DP training speed",
            "tables": [
                {"name": "One epoch", "columns": ["mode", "samples/s"], "rows": [["ghost", 12345], ["a|b", 1.5]]}
            ],
            "notes": ["a note"],
        },
        "broken": {"title": "Broken", "error": "RuntimeError: boom"},
    },
}


def test_render_writes_header_tables_and_errors() -> None:
    md = render(RESULTS)
    assert "`python -m benchmarks.run --quick`" in md
    assert "python 3.11, torch 2, opacus 1, flwr 1, sklearn 1" in md
    assert "Test CPU, 2 cores, 8.0 GB memory" in md
    assert "1.50 / 1.00 / 0.50" in md
    assert "## DP training speed" in md and "**One epoch**" in md
    assert "| mode | samples/s |\n|---|---|\n| ghost | 12,345 |\n| a\\|b | 1.5 |" in md
    assert "- a note" in md
    assert "## Broken" in md and "Failed: `RuntimeError: boom`" in md


def test_run_writes_json_and_markdown(tmp_path) -> None:
    assert main(["--only", "communication", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmarks" / "results" / "latest.json").read_text())
    section = results["benchmarks"]["communication"]
    plain_up = section["tables"][0]["rows"][0][2]
    secure_up = section["tables"][0]["rows"][0][4]
    stages = sum(row[1] for row in section["tables"][1]["rows"])
    assert secure_up == stages > plain_up > 4 * section["tables"][0]["rows"][0][1]  # float32 values + framing
    assert results["environment"]["cores"] >= 1
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Communication" in md and "--only communication" in md


def test_merge_keeps_sections_of_earlier_runs_with_their_own_command(tmp_path) -> None:
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    earlier = {**RESULTS, "quick": True, "benchmarks": {"dp_speed": RESULTS["benchmarks"]["speed"]}}
    (results / "latest.json").write_text(json.dumps(earlier))
    assert main(["--only", "communication", "--merge", "--out", str(tmp_path)]) == 0
    merged = json.loads((results / "latest.json").read_text())
    assert list(merged["benchmarks"]) == ["dp_speed", "communication"]  # in BENCHMARKS order
    assert merged["merged"] == ["dp_speed"]
    kept = merged["benchmarks"]["dp_speed"]["run"]
    assert kept["command"] == "python -m benchmarks.run --quick" and kept["date"] == RESULTS["date"]
    assert "--only communication --merge" in merged["benchmarks"]["communication"]["run"]["command"]
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "Measured by `python -m benchmarks.run --quick` on 2026-01-01T00:00:00+00:00" in md
    assert "Measured by `python -m benchmarks.run --only communication --merge --out" in md
    assert md.index("## DP training speed") < md.index("## Communication") < md.index("## GPU")
    assert "has not been run on a GPU" in md

    # Without --merge a run replaces the file: only what it measured is left.
    assert main(["--only", "communication", "--out", str(tmp_path)]) == 0
    assert list(json.loads((results / "latest.json").read_text())["benchmarks"]) == ["communication"]


def test_scale_scenarios_are_valid_and_split_partners_over_the_kinds(tmp_path) -> None:
    import tomli_w

    from benchmarks import scale
    from fedpersona.simulation import load_scenario

    assert scale._per_kind(100) == [34, 33, 33] and scale._per_kind(30) == [10, 10, 10]
    assert [s.partners for s in scale.SIZES] == [3, 9, 30, 100]
    for size in scale.SIZES:
        path = tmp_path / f"scale-{size.partners}.toml"
        path.write_text(tomli_w.dumps(scale._scenario(size)))
        scenario = load_scenario(path)
        assert sum(group.partners for group in scenario.silos) == size.partners
        assert scenario.federation.evaluate_every == 1  # every round ends with an on_round stamp
        assert scenario.privacy.private  # every size is private, 100 partners included


def test_merge_does_not_replace_a_measured_section_by_a_skipped_one() -> None:
    from benchmarks.run import merge

    measured = {"title": "Simulation scale", "tables": [{"name": "t", "columns": ["a"], "rows": [[1]]}]}
    skipped = {"title": "Simulation scale", "skipped": True, "tables": [], "notes": ["Skipped in --quick"]}
    previous = {**RESULTS, "benchmarks": {"scale": measured, "communication": {"title": "old"}}}
    current = {**RESULTS, "benchmarks": {"communication": {"title": "new"}, "scale": skipped}}
    merged = merge(previous, current)["benchmarks"]
    assert list(merged) == ["communication", "scale"]
    assert merged["scale"]["tables"] == measured["tables"] and merged["communication"]["title"] == "new"
    assert merge({**previous, "benchmarks": {"scale": skipped}}, current)["benchmarks"]["scale"] is skipped


def test_utility_notes_judge_the_targets_on_the_probe() -> None:
    from benchmarks.utility import _notes

    def dataset(fed3: float, inf: float, small_alone: float, small_fed: float) -> dict:
        scores = {"1": 0.5, "3": fed3, "8": 0.5, "inf": inf}
        return {
            "parameters": 1000,
            "partner_rows": [100, 200, 300, 400],
            "hgb": 0.8,
            "federated": {"probe": scores, "head": {**scores, "3": fed3 - 0.1}},
            "small": {
                "probe": {"alone_eps3": small_alone, "federated_eps3": small_fed},
                "head": {"alone_eps3": 0.5, "federated_eps3": 0.7},
            },
        }

    data = {"met": dataset(0.78, 0.80, 0.70, 0.74), "noisy": dataset(0.70, 0.79, 0.70, 0.71)}
    notes = "\n".join(_notes(data, rounds=5, train_cap=None, quick=False))
    assert "eps=3 >= 97% of HGB AUC (probe): missed on noisy (met 97.5%, noisy 87.5%;" in notes
    assert "label head met 85.0%, noisy 75.0%" in notes
    assert "on noisy the encoder reaches the target without noise, so the shortfall at eps=3 is the DP noise" in notes
    assert "probe missed on noisy (gains met +0.040, noisy +0.010); label head gains met +0.200" in notes
    assert "trains on all of the 80% train rows" in notes


def test_persona_geometry_centring_undoes_a_kind_offset() -> None:
    """Two kinds hold the same two personas, shifted far apart. Pooled k-means (K = 2) splits
    by kind, so within a partner everyone shares one cluster (ARI 0); centring each kind on
    its own mean puts the personas on top of each other and k-means finds them (ARI 1)."""
    import numpy as np
    import pytest

    from benchmarks.persona_geometry import kind_centred, pca_projected, pooled_ari

    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 100)
    personas = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    offsets = {"a": np.array([0.0, 20.0, 0.0]), "b": np.array([0.0, -20.0, 0.0])}
    kinds = ["a", "a", "b", "b"]
    embeddings = [personas[truth] + offsets[kind] + rng.normal(0.0, 0.1, (200, 3)) for kind in kinds]
    truths = [truth] * 4
    assert pooled_ari(embeddings, truths, k=2) == pytest.approx(0.0, abs=1e-9)
    centred = kind_centred(embeddings, kinds)
    assert np.allclose(np.linalg.norm(np.vstack(centred), axis=1), 1.0)
    assert pooled_ari(centred, truths, k=2) == pytest.approx(1.0)
    assert pooled_ari(kind_centred(embeddings, kinds, standardise=True), truths, k=2) == pytest.approx(1.0)
    # The first principal axis of the pooled rows is the kind offset (the y axis).
    first = np.vstack(pca_projected(embeddings, 1))[:, 0]
    y = np.vstack(embeddings)[:, 1]
    assert abs(np.corrcoef(first, y)[0, 1]) > 0.999


def test_persona_geometry_overrides_are_typed_and_checked() -> None:
    import pytest

    from benchmarks.persona_ablation import MODEL, TRAINING
    from benchmarks.persona_geometry import _override

    model, training = _override(MODEL, TRAINING, ["model.hidden=32", "training.lr=0.02"])
    assert model.hidden == 32 and isinstance(model.hidden, int) and model.token_dim == MODEL.token_dim
    assert training.lr == 0.02 and training.batch_size == TRAINING.batch_size
    for bad in ("model.width=3", "hidden=3", "model.hidden"):
        with pytest.raises(SystemExit, match=r"expected model\.KEY=VALUE or training\.KEY=VALUE"):
            _override(MODEL, TRAINING, [bad])


def test_print_section_prints_each_table_and_note(capsys) -> None:
    from benchmarks.report import print_section

    print_section({"tables": [{"name": "T", "columns": ["a", "b"], "rows": [[1, 2.5]]}], "notes": ["a note"]})
    out = capsys.readouterr().out
    assert "**T**" in out and "| a | b |" in out and "| 1 | 2.5 |" in out and "- a note" in out


def test_label_recipe_variants_start_every_partner_from_the_same_model() -> None:
    """FedAvg needs every partner of a slot to start from the same parameters: the variants'
    hidden layers come from a public seed; the random features stay fixed (not trained)."""
    import torch

    from benchmarks.label_recipe import variant
    from fedpersona.config.settings import ModelSettings
    from fedpersona.model.linear import HALF, LABEL_INPUT

    for kind in ("hidden", "linear+hidden", "random features"):
        first, second = (variant(kind, 4)(6, 1, ModelSettings()) for _ in range(2))
        a, b = first.state_dict(), second.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
        trainable = {n for n, p in first.named_parameters() if p.requires_grad}
        assert any(".hidden." in n for n in trainable) == (kind != "random features"), kind
        batch = {LABEL_INPUT: torch.randn(5, 6), HALF: torch.tensor([0, 1, 0, 1, 1]), "labels": torch.ones(5, 1)}
        assert first(batch).shape == (5,) and getattr(first, "clipped_sum", None) is None  # the generic clipping


def test_local_selection_shipped_rule_is_the_products_rule_and_its_blends_are_the_products() -> None:
    """The benchmark's ``first_within`` must pick what the product's fed-first rule picks on the
    shipped candidates, and a blend it builds with the own best model must score as the
    product's blend of that weight; else its table would describe a rule the product does not run."""
    import numpy as np

    from benchmarks.local_selection import PartnerResult, _blend, first_within
    from fedpersona.model import stacking
    from fedpersona.model.alone import LinearScorer

    rng = np.random.default_rng(3)
    picks = set()
    for draw in range(40):
        y = rng.integers(0, 2, size=120)
        signal = rng.uniform(0.0, 1.5, size=len(stacking.CANDIDATES))
        oof = {n: s * y + rng.normal(size=len(y)) for n, s in zip(stacking.CANDIDATES, signal, strict=True)}
        result = PartnerResult(small=True, y=y, oof=oof, validation_auc={}, own_best="own_lr", pooled=1.0)
        expected = stacking.fed_first_choice(y=y, oof=oof)[2]
        assert first_within(result, stacking.CANDIDATES) == expected, draw
        picks.add(expected)
    assert len(picks) >= 3  # the draws exercise the rule, not one fixed answer

    x, y = rng.normal(size=(80, 3)), rng.integers(0, 2, size=80)
    fed, x_new, fed_new = rng.normal(size=80), rng.normal(size=(7, 3)), rng.normal(size=7)
    data = {"x_enc": x, "x_raw": x, "fed": fed, "y": y}
    product = stacking._fit("blend0.5", rows=np.arange(80), data=data, own_best="own_lr", seed=0)
    assert isinstance(product.model, LinearScorer)
    ours = _blend(0.5, fed_new, fed, product.model.score(x_new), product.model.score(x))
    np.testing.assert_allclose(ours, product.score(x_enc=x_new, x_raw=x_new, fed=fed_new))


def test_label_recipe_freezes_the_hidden_part_only_for_noisy_plans() -> None:
    """``step_noise`` is ``C sigma / E[B]`` of the plan, and ``freezer`` stops the hidden part of
    exactly the partners above the threshold (their linear map still trains)."""
    import pytest

    from benchmarks.label_recipe import freezer, step_noise, variant
    from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings
    from fedpersona.privacy.planner import make_plan, sgd_clip

    def plan(rows: int, epsilon: float):  # type: ignore[no-untyped-def]
        return make_plan(
            privacy=PrivacySettings(target_epsilon=epsilon, delta=1e-5), training=TrainingSettings(),
            public_rows=rows, rounds=15,
        )  # fmt: skip

    quiet, noisy = plan(20_000, 3.0), plan(400, 1.0)
    for p in (quiet, noisy):
        expected = sgd_clip(p) * p.noise_multiplier / (p.sample_rate * p.public_rows)
        assert step_noise(p) == pytest.approx(expected)
    assert step_noise(quiet) < 0.01 < step_noise(noisy)
    assert step_noise(plan(400, float("inf"))) == 0.0
    for p, frozen in ((quiet, False), (noisy, True)):
        model = variant("linear+hidden", 4)(6, 1, ModelSettings())
        freezer(0.01)(model, p)
        trainable = {n for n, q in model.named_parameters() if q.requires_grad}
        assert any(".linear." in n for n in trainable)
        assert any(".hidden." in n or ".out." in n for n in trainable) == (not frozen)
