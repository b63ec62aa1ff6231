"""The plan a user reads is the plan that runs, and a fixed plan is the one source of truth.

``fedpersona privacy plan`` prints a plan; the partner fixes one at its first round
(``state/plan.json``) and accounts with it. These tests read the printed numbers back and
compare them with the plan the partner fixed, and check that a partner whose client.toml no
longer says what its plan fixed refuses to work, naming each changed key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpersona.cli import app as cli
from fedpersona.config.files import load_partner_config
from fedpersona.config.settings import ModelSettings, TrainingSettings
from fedpersona.errors import ConfigError
from fedpersona.federation.partner import load_partner_data, load_plan
from fedpersona.privacy.accounting import compute_epsilon
from fedpersona.privacy.planner import epsilon_schedule

CLIENT = """\
[partner]
name = "clinic"
kind = "health"
state_dir = "state"

[data]
synthetic_rows = 250
public_rows = 200

[privacy]
target_epsilon = {epsilon}
delta = 1e-5
{extra}
"""


def write_client(folder: Path, *, epsilon: float = 2.0, extra: str = "") -> Path:
    path = folder / "client.toml"
    path.write_text(CLIENT.format(epsilon=epsilon, extra=extra))
    return path


def printed_plan(path: Path, *, rounds: int, persona_releases: int) -> tuple[float, float, int, list[float]]:
    """Noise multiplier, sample rate, steps per round and cumulative epsilons as printed."""
    done = CliRunner().invoke(
        cli,
        [
            "privacy",
            "plan",
            "--config",
            str(path),
            "--rounds",
            str(rounds),
            "--persona-releases",
            str(persona_releases),
        ],
        terminal_width=200,
    )
    assert done.exit_code == 0, done.output
    sigma = float(re.search(r"noise multiplier ([0-9.]+)", done.output).group(1))  # type: ignore[union-attr]
    q = float(re.search(r"sample rate ([0-9.]+)", done.output).group(1))  # type: ignore[union-attr]
    steps = int(re.search(r"(\d+) steps/round", done.output).group(1))  # type: ignore[union-attr]
    rows = [[cell.strip() for cell in line.split("\u2502")[1:-1]] for line in done.output.splitlines()]
    cumulative = [float(row[2]) for row in rows if len(row) == 3 and re.fullmatch(r"[0-9.]+", row[2])]
    return sigma, q, steps, cumulative


@pytest.mark.parametrize(
    ("planned", "persona_releases"),
    [(None, 0), (8, 0), (8, 7)],
    ids=["federation-rounds", "planned-rounds-above-federation", "with-personas"],
)
def test_printed_plan_equals_the_plan_the_partner_fixes(
    tmp_path: Path, planned: int | None, persona_releases: int
) -> None:
    extra = f"planned_rounds = {planned}" if planned else ""
    path = write_client(tmp_path, extra=extra)
    federation_rounds = 3
    sigma, q, steps, cumulative = printed_plan(path, rounds=federation_rounds, persona_releases=persona_releases)

    cfg = load_partner_config(path)
    plan = load_plan(
        cfg, load_partner_data(cfg), TrainingSettings(), rounds=federation_rounds,
        persona_releases=persona_releases, persona_share=0.6,
    )  # fmt: skip
    assert plan.noise_multiplier is not None
    assert round(plan.noise_multiplier, 4) == sigma
    assert round(plan.sample_rate, 5) == q
    assert plan.steps_per_round == steps
    assert plan.planned_rounds == (planned or federation_rounds)
    assert plan.persona_releases == persona_releases
    expected = [round(e, 4) for e in epsilon_schedule(plan)]
    assert cumulative == expected
    # The last printed epsilon is the whole plan's, by an independent composition of all steps.
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * plan.planned_rounds)]
    if persona_releases:
        assert plan.gram_noise is not None and plan.em_noise is not None
        history += [(plan.gram_noise, 1.0, 1), (plan.em_noise, 1.0, persona_releases - 1)]
    total = compute_epsilon(history, delta=1e-5, accountant="prv")
    assert cumulative[-1] == pytest.approx(total, abs=1e-4)
    assert cumulative[-1] <= 2.0 + 1e-9
    # A plan for more rounds than the federation runs needs more noise than one for its rounds.
    if planned:
        (tmp_path / "short").mkdir()
        short = load_partner_config(write_client(tmp_path / "short"))
        shorter = load_plan(
            short, load_partner_data(short), TrainingSettings(), rounds=federation_rounds,
            persona_releases=persona_releases, persona_share=0.6,
        )  # fmt: skip
        assert shorter.noise_multiplier is not None and shorter.noise_multiplier < plan.noise_multiplier

    # Once fixed, `privacy plan` shows the fixed plan, whatever --rounds says now.
    sigma_after, _, _, cumulative_after = printed_plan(path, rounds=1, persona_releases=0)
    assert (sigma_after, cumulative_after) == (sigma, cumulative)


def test_a_partner_whose_settings_drift_from_its_fixed_plan_refuses_naming_each_key(tmp_path: Path) -> None:
    path = write_client(tmp_path, extra="planned_rounds = 5\nmax_grad_norm = 1.0")
    cfg = load_partner_config(path)
    data = load_partner_data(cfg)
    training = TrainingSettings(batch_size=32, sample_rate=None)
    fixed = load_plan(cfg, data, training, rounds=5)
    assert (Path(cfg.state_dir) / "plan.json").exists()

    # Unchanged settings load the same plan (and a different federation round count is fine).
    assert load_plan(load_partner_config(path), data, training, rounds=2) == fixed

    write_client(tmp_path, epsilon=4.0, extra="planned_rounds = 7\nmax_grad_norm = 1.0")
    with pytest.raises(ConfigError) as caught:
        load_plan(load_partner_config(path), data, TrainingSettings(batch_size=64, sample_rate=None), rounds=5)
    message = str(caught.value)
    assert str(path) in message and "plan.json" in message
    assert "privacy.target_epsilon: the plan has 2.0, now 4.0" in message
    assert "privacy.planned_rounds: the plan has 5, client.toml 7" in message
    assert "training.batch_size: the plan has 32, now 64" in message
    assert "max_grad_norm" not in message  # unchanged keys are not named

    # The plan on disk was not touched by the refused attempt.
    write_client(tmp_path, extra="planned_rounds = 5\nmax_grad_norm = 1.0")
    assert load_plan(load_partner_config(path), data, training, rounds=5) == fixed


def test_a_plan_fixed_before_the_persona_protocol_still_loads_and_makes_no_persona_release(tmp_path: Path) -> None:
    from fedpersona.config.files import load_plan as load_plan_file

    state = tmp_path / "state"
    state.mkdir()
    earlier = {
        "private": True, "noise_multiplier": 1.1, "sample_rate": 0.03125, "steps_per_round": 64, "planned_rounds": 5,
        "target_epsilon": 3.0, "delta": 1e-5, "accountant": "prv", "max_grad_norm": 1.0, "kmeans_rounds": 6,
        "kmeans_noise": 10.0, "public_rows": 2000,
    }  # fmt: skip
    (state / "plan.json").write_text(json.dumps(earlier))
    plan = load_plan_file(state)
    assert plan is not None and plan.noise_multiplier == 1.1 and plan.planned_rounds == 5
    assert plan.persona_releases == 0 and plan.gram_noise is None and plan.em_noise is None


def _plan(*, sigma: float | None, rows: int, cap: float = 2.0, q: float = 0.2) -> object:
    from fedpersona.config.settings import PrivacyPlan

    return PrivacyPlan(
        private=sigma is not None, noise_multiplier=sigma, sample_rate=q, steps_per_round=5, planned_rounds=15,
        target_epsilon=3.0 if sigma is not None else float("inf"), delta=1e-5, accountant="prv",
        max_grad_norm=cap, public_rows=rows,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sigma", "rows", "cap", "want"),
    [
        (4.0, 3000, 2.0, 2.0),  # noise on a mean step at clip 2: 2 * 4 / 600 = 0.013, within 0.02: the cap
        (10.0, 3000, 2.0, 1.2),  # 0.02 * 600 / 10: raised above 1 only that far
        (10.0, 1200, 2.0, 1.0),  # 0.02 * 240 / 10 = 0.48: never below 1
        (10.0, 1200, 0.5, 0.5),  # a configured clip below 1 is kept
        (0.1, 3000, 4.0, 4.0),  # little noise: the configured clip
        (None, 3000, 2.0, 2.0),  # not private: nothing is clipped, the configured value is reported
    ],
)
def test_the_sgd_clip_is_the_cap_lowered_for_noisy_plans_never_below_one(
    sigma: float | None, rows: int, cap: float, want: float
) -> None:
    from fedpersona.privacy.planner import sgd_clip

    assert sgd_clip(_plan(sigma=sigma, rows=rows, cap=cap)) == pytest.approx(want)  # type: ignore[arg-type]


def test_a_partner_trains_with_the_plans_clip_and_the_plan_prints_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clip the partner's DP-SGD uses is sgd_clip of its fixed plan (a 200-row partner at
    epsilon 2 is a noisy plan: clip 1, not the configured 2), and `privacy plan` prints it."""
    import fedpersona.federation.partner as partner
    from fedpersona.privacy.planner import sgd_clip

    path = write_client(tmp_path, extra="max_grad_norm = 2.0")
    done = CliRunner().invoke(cli, ["privacy", "plan", "--config", str(path), "--rounds", "3"], terminal_width=200)
    assert done.exit_code == 0, done.output
    printed = float(re.search(r"clip ([0-9.]+) \(max_grad_norm 2\)", done.output).group(1))  # type: ignore[union-attr]
    used: list[float] = []
    real = partner.train_locally

    def spy(**kwargs: object) -> object:
        used.append(kwargs["privacy"].max_grad_norm)  # type: ignore[attr-defined]
        return real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(partner, "train_locally", spy)
    cfg = load_partner_config(path)
    training = TrainingSettings(device="cpu")
    partner.train_round(
        cfg=cfg, model_cfg=ModelSettings(), training=training, received={}, server_round=1, num_rounds=3,
        adapter_shared=False, seed=0,
    )  # fmt: skip
    plan = load_plan(cfg, load_partner_data(cfg), training, 3)  # the plan fixed at round 1
    assert used and set(used) == {sgd_clip(plan)} == {printed} == {1.0}
