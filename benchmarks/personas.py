"""``python -m benchmarks.personas [--seeds 0 1 2] [--epsilons 3 inf] [--scenario FILE]``: persona
recovery of the persona protocol on a scenario's synthetic partners, against each partner's own
k-means, without the transport.

For every scenario seed it materialises the partners exactly as ``fedpersona simulate`` does
(:func:`fedpersona.simulation.materialize_partners`: the same rows, mixes and keyed splits),
plans each partner's noise with the one planner (:func:`fedpersona.privacy.planner.make_plan`,
the scenario's rounds and the personas' ``persona_share``), and runs the protocol of
:mod:`fedpersona.personas.protocol` per kind with the partners' training rows, the same code the
coordinator follows over Flower (:func:`fedpersona.federation.rounds.protocol_for` sets its
constants). It reports, per partner, the ARI of its users' personas against the ground truth
(all its rows) and the ARI of k-means with the true number of personas on its own standardised
columns (:func:`fedpersona.model.alone.own_personas`, the same rows): what it gets alone. The
noise is reproducible (a stream per seed, partner and release), so a rerun gives the same table.
Settings were chosen on seeds 10-13; report seeds 0-2.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score

from fedpersona.config.files import load_partner_config, load_scenario
from fedpersona.data.features import featurize
from fedpersona.data.schema import slot_id
from fedpersona.data.synthetic import generate_silo
from fedpersona.federation.partner import public_rows_of, read_partner_data
from fedpersona.federation.partner_personas import assign_rows
from fedpersona.federation.rounds import protocol_for
from fedpersona.model.alone import own_personas
from fedpersona.model.evaluation import own_columns
from fedpersona.personas.protocol import federated_personas
from fedpersona.privacy.planner import make_plan
from fedpersona.privacy.randomness import SecretRandomness
from fedpersona.simulation import materialize_partners

DEFAULT_SCENARIO = Path(__file__).resolve().parents[1] / "simulations" / "three_silos.toml"


def one_run(scenario_path: Path, *, seed: int, epsilon: float) -> list[dict[str, Any]]:
    """Per partner: kind, persona ARI with the federation, own k-means ARI (one scenario seed)."""
    scenario = load_scenario(scenario_path, epsilon=epsilon)
    scenario = scenario.model_copy(update={"federation": scenario.federation.replace(seed=seed)})
    fed = scenario.federation
    with tempfile.TemporaryDirectory() as folder:
        paths = materialize_partners(scenario, Path(folder))
        partners = []
        for path in paths:
            cfg = load_partner_config(path)
            data = read_partner_data(cfg)
            plan = make_plan(
                privacy=cfg.privacy, training=scenario.training, public_rows=public_rows_of(cfg, data),
                rounds=fed.rounds, persona_releases=fed.persona_releases, persona_share=fed.persona_share,
            )  # fmt: skip
            partners.append((cfg, data, plan))
    slots: dict[str, list[int]] = defaultdict(list)
    for i, (cfg, data, _) in enumerate(partners):
        slots[slot_id(cfg.kind, data.schema.fingerprint())].append(i)
    rows = []
    for slot, members in sorted(slots.items()):
        plans = {(partners[i][2].gram_noise, partners[i][2].em_noise) for i in members}
        if len(plans) != 1:
            raise ValueError(f"{slot}: the partners' persona noises differ ({plans}); this benchmark runs one plan")
        gram, em = plans.pop()
        xs = [partners[i][1].persona_train for i in members]
        result = federated_personas(
            xs, protocol=protocol_for(fed, xs[0].shape[1]), gram_noise=gram or 0.0, step_noise=em or 0.0,
            randomness=lambda p, r, s=slot: SecretRandomness.from_seed(seed, s, p, r), seed=fed.seed, slot=slot,
        )  # fmt: skip
        for i in members:
            cfg, data, _ = partners[i]
            truth = generate_silo(cfg.kind, int(cfg.synthetic_rows or 0), seed=cfg.synthetic_seed,
                                  mix=np.asarray(cfg.synthetic_mix)).persona  # fmt: skip
            federated = assign_rows(result.space, result.mixture, data.dense.persona)[0]
            own = own_personas(
                x=own_columns(featurize(data.table))[0], k=len(np.unique(truth)), generator=np.random.default_rng(seed)
            )
            rows.append(
                {
                    "seed": seed, "epsilon": epsilon, "partner": cfg.name, "kind": cfg.kind,
                    "federated": float(adjusted_rand_score(truth, federated)),
                    "alone": float(adjusted_rand_score(truth, own)),
                }
            )  # fmt: skip
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Per epsilon: mean (min-max over seeds) of the partners' mean ARI, the worst partner, and
    the smallest margin over a partner's own k-means."""
    out = []
    for epsilon in sorted({r["epsilon"] for r in rows}):
        mine = [r for r in rows if r["epsilon"] == epsilon]
        seeds = sorted({r["seed"] for r in mine})
        means = [statistics.fmean(r["federated"] for r in mine if r["seed"] == s) for s in seeds]
        alone = [statistics.fmean(r["alone"] for r in mine if r["seed"] == s) for s in seeds]
        margin = min(r["federated"] - r["alone"] for r in mine)
        worst = min(r["federated"] for r in mine)
        out.append(
            [
                "inf" if math.isinf(epsilon) else f"{epsilon:g}",
                ", ".join(str(s) for s in seeds),
                f"{statistics.fmean(means):.3f} ({min(means):.3f}-{max(means):.3f})",
                f"{worst:.3f}",
                f"{statistics.fmean(alone):.3f}",
                f"{margin:+.3f}",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.personas", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0, math.inf])
    parser.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO)
    args = parser.parse_args(argv)
    rows = [r for e in args.epsilons for s in args.seeds for r in one_run(args.scenario, seed=s, epsilon=e)]
    head = ["epsilon", "seeds", "persona ARI, mean of partners (min-max over seeds)", "worst partner",
            "own k-means ARI, mean", "smallest margin over own k-means"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for line in summarise(rows):
        print("| " + " | ".join(line) + " |")
    print()
    print("| seed | epsilon | partner | persona ARI | own k-means ARI |")
    print("|---|---|---|---|---|")
    for r in rows:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        print(f"| {r['seed']} | {eps} | {r['partner']} | {r['federated']:.3f} | {r['alone']:.3f} |")


if __name__ == "__main__":
    main()
