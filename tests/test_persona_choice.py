"""Choosing the number of personas among ``federation.persona_candidates``, driven through the
real :func:`fedpersona.federation.server_app.run_federation` with partners that hold planted embeddings
(four well-separated groups) and release exact or noisy k-means statistics as the ClientApp
does. Checks the release schedule each partner is told to plan for, the choice itself, the
prototypes it ends with, and a crash during the candidate rounds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedpersona.config.settings import FederationSettings
from fedpersona.errors import ConfigError
from fedpersona.federation.checkpoint import load_checkpoint
from fedpersona.federation.server_app import ServerSettings, run_federation
from fedpersona.personas.clustering import local_cluster_stats
from fedpersona.privacy.randomness import SecretRandomness
from tests.fake_grid import MODEL, TRAINING, FakeGrid, ScriptedPartner, ServerCrash, _seed

TRUE_K = 4
CENTRES = np.linalg.qr(np.random.default_rng(3).standard_normal((MODEL.embed_dim, MODEL.embed_dim)))[0][:TRUE_K]


@dataclass
class PlantedPartner(ScriptedPartner):
    """A scripted partner whose k-means replies come from its own planted embeddings."""

    noise: float = 0.0
    told: list[int] = field(default_factory=list)  # the kmeans_rounds each k-means message announced
    z: np.ndarray = field(default_factory=lambda: np.zeros((0, MODEL.embed_dim)))

    def __post_init__(self) -> None:
        rng = np.random.default_rng(_seed(self.name, "planted"))
        truth = rng.choice(TRUE_K, size=self.train_rows, p=rng.dirichlet(np.full(TRUE_K, 3.0)))
        z = CENTRES[truth] + 0.3 * rng.standard_normal((self.train_rows, MODEL.embed_dim)) / math.sqrt(MODEL.embed_dim)
        self.z = z / np.linalg.norm(z, axis=1, keepdims=True)

    def __call__(self, msg: Message) -> RecordDict | Error:
        if msg.metadata.message_type != "query.kmeans":
            return super().__call__(msg)
        config = dict(msg.content.config_records["config"])
        rnd = int(config["round"])  # type: ignore[arg-type]
        self.log.append(("query.kmeans", rnd))
        self.charged.append(rnd)
        self.told.append(int(config["kmeans_rounds"]))  # type: ignore[arg-type]
        centres = msg.content.array_records["prototypes"]["centres"].numpy().astype(np.float64)
        rng = np.random.default_rng(_seed(self.name, "kmeans", rnd))
        stats = local_cluster_stats(
            self.z,
            centres,
            noise_multiplier=self.noise,
            randomness=SecretRandomness.from_seed(int(rng.integers(0, 2**62))),
        )
        record = ArrayRecord(
            {"sums": Array(stats.sums.astype(np.float32)), "counts": Array(stats.counts.astype(np.float32))}
        )
        return RecordDict({"stats": record, "metrics": MetricRecord({"noise_std": stats.noise_std, "epsilon": 0.1})})


def _partners(noise: float = 0.0) -> dict[int, PlantedPartner]:
    return {
        31: PlantedPartner("shop-1", "ecommerce", 900, noise=noise),
        32: PlantedPartner("shop-2", "ecommerce", 700, noise=noise),
        33: PlantedPartner("bank-1", "finance", 800, noise=noise),
    }


def _settings(run_dir: Path, **federation: object) -> ServerSettings:
    fed = FederationSettings(
        **{"rounds": 1, "min_partners": 2, "personas": 8, "persona_candidates": [6, 3, 4], "kmeans_rounds": 4,
           "seed": 2, **federation}  # type: ignore[arg-type]
    )  # fmt: skip
    return ServerSettings(federation=fed, model=MODEL, training=TRAINING, run_dir=str(run_dir), wait_timeout=1.0)


def _matched_cosines(prototypes: np.ndarray) -> np.ndarray:
    """For each true centre, the cosine of the closest prototype."""
    unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    return np.max(CENTRES @ unit.T, axis=1)


@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_the_true_number_of_personas_is_chosen_from_the_candidates(tmp_path: Path, noise: float) -> None:
    partners = _partners(noise)
    grid = FakeGrid(partners)  # type: ignore[arg-type]
    run_federation(grid, _settings(tmp_path))
    # 4 Lloyd rounds + one round per candidate, numbered after the training round; every
    # partner was told from the first message on to plan for all 7 releases.
    assert grid.rounds_sent("query.kmeans") == list(range(2, 9))
    for p in partners.values():
        assert p.told == [7] * 7
    personas = json.loads((tmp_path / "personas.json").read_text())
    assert personas["k"] == TRUE_K and personas["rounds"] == 7
    choice = personas["k_choice"]
    assert choice["k"] == TRUE_K and set(choice["scores"]) == {"3", "4", "6"}
    assert choice["scores"]["4"] > max(choice["scores"]["3"], choice["scores"]["6"])
    prototypes = np.array(personas["prototypes"])
    assert prototypes.shape == (TRUE_K, MODEL.embed_dim)
    assert _matched_cosines(prototypes).min() > 0.95


def test_without_candidates_the_schedule_is_unchanged(tmp_path: Path) -> None:
    partners = _partners()
    grid = FakeGrid(partners)  # type: ignore[arg-type]
    run_federation(grid, _settings(tmp_path, persona_candidates=[], personas=4))
    assert grid.rounds_sent("query.kmeans") == [2, 3, 4, 5]
    assert all(p.told == [4] * 4 for p in partners.values())
    personas = json.loads((tmp_path / "personas.json").read_text())
    assert personas["k"] == 4 and personas["k_choice"] is None


def test_a_crash_during_the_candidate_rounds_resumes_before_them(tmp_path: Path) -> None:
    run_federation(FakeGrid(_partners()), _settings(tmp_path / "whole"))  # type: ignore[arg-type]
    partners = _partners()
    grid = FakeGrid(partners)  # type: ignore[arg-type]
    grid.crash_at("query.kmeans", 5)  # the second candidate's round
    with pytest.raises(ServerCrash):
        run_federation(grid, _settings(tmp_path / "crashed"))
    checkpoint = load_checkpoint(tmp_path / "crashed")
    # Not saved between the summary and the last candidate: the resume starts after round 1 of k-means.
    assert checkpoint is not None and (checkpoint.stage, checkpoint.kmeans_done) == ("kmeans", 1)
    grid = FakeGrid(partners)  # type: ignore[arg-type]
    run_federation(grid, replace(_settings(tmp_path / "crashed"), resume=True))
    assert grid.rounds_sent("query.kmeans") == list(range(3, 9))
    whole = json.loads((tmp_path / "whole" / "personas.json").read_text())
    crashed = json.loads((tmp_path / "crashed" / "personas.json").read_text())
    assert crashed["k_choice"] == whole["k_choice"]
    np.testing.assert_array_equal(np.array(crashed["prototypes"]), np.array(whole["prototypes"]))


@pytest.mark.parametrize(
    ("candidates", "message"),
    [
        ([4], "at least two different numbers"),
        ([4, 4], "at least two different numbers"),
        ([1, 4], "integers >= 2"),
        ([4, True], "integers >= 2"),
        ("4,6", "integers >= 2"),
    ],
)
def test_bad_candidates_are_a_config_error(candidates: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FederationSettings.checked(persona_candidates=candidates)


def test_the_releases_a_partner_plans_for() -> None:
    assert FederationSettings(kmeans_rounds=6).kmeans_releases == 6
    assert FederationSettings(kmeans_rounds=6, persona_candidates=(4, 6, 8)).kmeans_releases == 9
    assert FederationSettings(personas=0, persona_candidates=(4, 6)).kmeans_releases == 0


def test_the_report_says_how_k_was_chosen(tmp_path: Path) -> None:
    from fedpersona.report import write_report

    run_federation(FakeGrid(_partners()), _settings(tmp_path))  # type: ignore[arg-type]
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "4 global personas from 7 rounds of federated DP k-means. K = 4 was chosen among the candidates" in md
    assert "(higher is better; 3: " in md and ", 6: " in md
    assert "K = 4 was chosen" in (tmp_path / "report.html").read_text()


def test_simulate_prints_the_chosen_k(tmp_path: Path) -> None:
    from fedpersona.cli.runs import k_choice_line

    run_federation(FakeGrid(_partners()), _settings(tmp_path / "chosen"))  # type: ignore[arg-type]
    assert k_choice_line(tmp_path / "chosen") == (
        "personas: K = 4 chosen among 3, 4, 6 from the noisy k-means statistics (scores in personas.json)"
    )
    run_federation(FakeGrid(_partners()), _settings(tmp_path / "fixed", persona_candidates=[]))  # type: ignore[arg-type]
    assert k_choice_line(tmp_path / "fixed") is None
    assert k_choice_line(tmp_path / "missing") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "personas.json").write_text("{not json")
    assert k_choice_line(tmp_path / "broken") is None
