"""Planning time: :func:`~fedpersona.privacy.planner.plan_noise` and
:func:`~fedpersona.privacy.planner.plan_split`, cold (every cache cleared: the noise search's
answers and the accountant's epsilons and RDP curves) and cached (the same call again), against
Opacus' ``get_noise_multiplier`` (PRV, ``epsilon_tolerance`` 0.005) for the same DP-SGD plan.

``python -m benchmarks.planning`` prints the tables (numpy/scipy only); ``python -m
benchmarks.run --only planning --merge`` writes them into ``docs/benchmarks.md``. Each cold
time is the median over ``REPEATS`` runs with the caches cleared before each; each cached time
the mean over 1,000 calls. The second table times ``make_plan`` (what a partner, ``fedpersona
privacy plan`` and the audit call) on every silo group of the shipped scenarios. Measured on
2026-12-03 (2 cores shared with other jobs, load average 6.3), delta 1e-5, PRV:

=====================================  ==================================  ===============  ===========
silo group                             plan                                make_plan cold   cached
=====================================  ==================================  ===============  ===========
three_silos.toml (each group)          q 0.03125, 320 steps, 7 releases    25-35 ms         89-141 µs
real_silos.toml: shop (3,288 rows)     q 0.07692, 130 steps, 7 releases    16 ms            130 µs
real_silos.toml: bank (8,000 rows)     q 0.03125, 320 steps, 7 releases    22 ms            123 µs
real_silos.toml: clinic (18,851 rows)  q 0.01351, 740 steps, 7 releases    34 ms            72 µs
=====================================  ==================================  ===============  ===========

A cold plan is one exact PRV evaluation (60-80% of its time) and a handful of coarse ones; a
repeated plan (the CLI's view, the partner's fixed plan, every re-check, every partner of a
simulation's actor with the same public inputs) is a dictionary look-up. Long runs cost more
(10,000 steps: 430 ms cold, a fine PRV mesh); Opacus' own search takes 1-9 s on the same plans.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opacus.accountants.utils import get_noise_multiplier

from fedpersona.privacy.accounting import clear_caches, compute_epsilon, rdp_order_notice_silenced
from fedpersona.privacy.noise_search import clear_memory_cache
from fedpersona.privacy.planner import make_plan, plan_noise, plan_split

DELTA = 1e-5
REPEATS = 5
# (target epsilon, sample rate, steps): a short, a typical and a long federated run
CASES = ((1.0, 0.01, 200), (3.0, 0.02, 1_000), (8.0, 0.005, 10_000))


def _cold(call: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        clear_memory_cache()
        clear_caches()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cached(call: Callable[[], object], calls: int = 1_000) -> float:
    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def shipped_plans() -> list[tuple[str, dict[str, Any]]]:
    """``make_plan``'s arguments for each silo group of the shipped scenarios, as
    ``fedpersona privacy plan SCENARIO`` plans them (a real dataset's group: skipped when its
    file is not there)."""
    from fedpersona.budget import _group_rows
    from fedpersona.config.files import load_scenario
    from fedpersona.simulation import default_scenario_path

    root = Path(__file__).resolve().parent.parent
    out = []
    for path in (default_scenario_path(), root / "simulations" / "real_silos.toml"):
        scenario = load_scenario(path)
        for group in scenario.silos:
            if group.source != "synthetic" and not (path.parent / group.source).exists():
                continue
            rows = _group_rows(group, scenario.simulation.test_fraction)
            args = {
                "privacy": scenario.privacy.replace(**(group.privacy or {})),
                "training": scenario.training,
                "public_rows": rows,
                "rounds": scenario.federation.rounds,
                "persona_releases": scenario.federation.persona_releases,
                "persona_share": scenario.federation.persona_share,
            }
            out.append((f"{path.name}: {group.name} ({rows:,} rows)", args))
    return out


def _shipped_rows() -> list[list[Any]]:
    rows = []
    for name, args in shipped_plans():
        plan = make_plan(**args)
        rows.append(
            [
                name,
                f"q {plan.sample_rate:.4g}, {plan.steps_per_round * plan.planned_rounds:,} steps, "
                f"{plan.persona_releases} persona releases",
                round(_cold(lambda args=args: make_plan(**args)) * 1e3, 1),
                round(_cached(lambda args=args: make_plan(**args)) * 1e6, 1),
                f"{plan.noise_multiplier:.4f}",
            ]
        )
    return rows


def run(*, quick: bool) -> dict[str, Any]:
    del quick  # cheap either way
    shipped = _shipped_rows()
    slowest = max(row[2] for row in shipped)
    rows: list[list[Any]] = []
    for target, q, steps in CASES:

        def noise(target: float = target, q: float = q, steps: int = steps) -> float:
            return plan_noise(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant="prv")

        def split(target: float = target, q: float = q, steps: int = steps) -> object:
            return plan_split(
                target_epsilon=target, delta=DELTA, accountant="prv", persona_share=0.3, em_releases=10,
                sgd_sample_rate=q, sgd_steps=steps,
            )  # fmt: skip

        def opacus(target: float = target, q: float = q, steps: int = steps) -> float:
            with rdp_order_notice_silenced():
                return float(
                    get_noise_multiplier(
                        target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="prv",
                        epsilon_tolerance=0.005,
                    )
                )  # fmt: skip

        sigma = noise()
        reached = compute_epsilon([(sigma, q, steps)], delta=DELTA, accountant="prv")
        start = time.perf_counter()
        theirs = opacus()
        opacus_seconds = time.perf_counter() - start
        rows.append(
            [
                f"eps {target:g}, q {q:g}, {steps:,} steps",
                round(_cold(noise) * 1e3, 1),
                round(_cached(noise) * 1e6, 1),
                round(_cold(split) * 1e3, 1),
                round(_cached(split) * 1e6, 1),
                round(opacus_seconds * 1e3),
                f"{sigma:.4f} (eps {reached:.4f})",
                f"{theirs:.4f}",
            ]
        )
    return {
        "title": "Privacy planning time",
        "tables": [
            {
                "name": f"PRV accountant, delta {DELTA:g}; plan_split with persona_share 0.3, 10 EM releases",
                "columns": [
                    "plan",
                    "plan_noise cold ms",
                    "plan_noise cached µs",
                    "plan_split cold ms",
                    "plan_split cached µs",
                    "Opacus get_noise_multiplier ms",
                    "plan_noise sigma",
                    "Opacus sigma",
                ],
                "rows": rows,
            },
            {
                "name": "The shipped scenarios' plans (make_plan per silo group: plan_split with the scenario's "
                "persona releases and persona_share)",
                "columns": ["silo group", "plan", "make_plan cold ms", "make_plan cached µs", "DP-SGD noise"],
                "rows": shipped,
            },
        ],
        "notes": [
            f"cold: median of {REPEATS} runs with every cache cleared; cached: mean of 1,000 repeated calls",
            f"Target: a plan within 50 ms for the shipped scenarios: slowest cold make_plan {slowest:g} ms "
            f"({'met' if slowest <= 50 else 'missed'}); every noise is checked with the ledger's accountant "
            "(tests/test_planning.py).",
        ],
    }


def main() -> None:
    from benchmarks.report import print_section

    print_section(run(quick=False))


if __name__ == "__main__":
    main()
