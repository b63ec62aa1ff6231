"""What a partner gets alone, and with the federation, on the three primary real datasets.

The honest baseline of the label side, with the product's own code from end to end:

- **Data.** Per dataset and seed: a stratified 80/20 split of the pooled table (``random_state
  = seed``); the 80% goes to one small partner (400 random rows) and three large partners
  (Dirichlet(1.0) label skew), as ``simulations/real_silos.toml``. Every score is a ROC AUC on
  the same pooled 20% test rows.
- **Alone.** Each partner's own best of logistic regression and gradient boosting on its own
  columns (chosen by cross-validation on its rows; :mod:`fedpersona.model.alone`), refitted on
  all its rows. Non-private: the rows are its own.
- **With the federation.** The label model (:mod:`fedpersona.model.linear`) trained by the
  product's DP-SGD (:func:`fedpersona.model.training.train_locally`, book-keeping clipping,
  secret noise, a ledger per partner) for the shipped recipe (``simulations/real_silos.toml``:
  15 rounds of 5 steps at sample rate 0.2, SGD at learning rate 2, clip 2), the noise planned
  per partner by :func:`fedpersona.privacy.planner.make_plan` with the persona releases' share
  (60%) reserved exactly as in a federation, averaged each round by
  :class:`~fedpersona.federation.aggregation.ScopedAggregator` (FedAvg weighted by the declared
  rows). Then each partner's local model (:func:`fedpersona.model.stacking.fit_local_model`)
  on its own columns and the cross-fitted federated score.
- **Pooled.** Gradient boosting on all the pooled training rows: the centralised ceiling.

Targets (issue "learning redesign"): every large partner's local model with the federation
no worse than alone (mean difference >= -0.005); the small partner closes >= 50% of the gap
between alone and pooled; no AUC below 0.5.

``python -m benchmarks.label_model --seeds 0 1 2`` (about 10 minutes on 2 cores; ``--epsilon``
and ``--datasets`` narrow it). Results: ``docs/results.md``, "The label model".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from fedpersona.config.files import load_scenario
from fedpersona.config.settings import (
    FederationSettings,
    ModelSettings,
    PrivacyPlan,
    PrivacySettings,
    TrainingSettings,
)
from fedpersona.data.dense import dense_views
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.schema_reader import load_schema
from fedpersona.data.tables import load_table
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.model.alone import draw_seed, fit_linear, fit_trees
from fedpersona.model.evaluation import own_columns
from fedpersona.model.linear import HALF, LABEL_INPUT, LabelModel
from fedpersona.model.stacking import fit_local_model
from fedpersona.model.training import train_locally
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.planner import make_plan, sgd_clip
from fedpersona.privacy.randomness import SecretRandomness
from fedpersona.simulation import _label_skew_split

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = {
    "online shoppers": "ecommerce/online_shoppers_intention.csv",
    "credit default": "finance/credit_card_default_taiwan.csv",
    "CDC diabetes": "health/cdc_diabetes_5050.csv.gz",
}
SCHEMAS = {"online shoppers": "ecommerce", "credit default": "finance", "CDC diabetes": "health"}
SMALL_ROWS, LARGE_PARTNERS, ALPHA = 400, 3, 1.0
SCENARIO = REPO / "simulations" / "real_silos.toml"


def partners_of(y: np.ndarray, train: np.ndarray, seed: int) -> list[np.ndarray]:
    """Three large partners (Dirichlet label skew) and the small one (400 rows), as positions."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(train)
    small, rest = np.sort(shuffled[:SMALL_ROWS]), shuffled[SMALL_ROWS:]
    large = [np.sort(rest[p]) for p in _label_skew_split(y[rest], LARGE_PARTNERS, ALPHA, rng)]
    return [*large, small]


def federate(
    parts: list[FeatureTensors],
    *,
    epsilon: float,
    seed: int,
    training: TrainingSettings | None = None,
    rounds: int | None = None,
    max_grad_norm: float | None = None,
    model: Callable[[int, int, ModelSettings], LabelModel] = LabelModel,
    prepare: Callable[[LabelModel, PrivacyPlan], None] | None = None,
) -> list[LabelModel]:
    """The shipped recipe over ``parts`` (one slot); each partner's final model. ``training``,
    ``rounds``, ``max_grad_norm`` and the model class replace the recipe's (for
    :mod:`benchmarks.label_recipe`); a ``max_grad_norm`` given here is the clip every step uses,
    without it each partner clips as the product does (:func:`fedpersona.privacy.planner.sgd_clip`).
    ``prepare(model, plan)``, when given, sees each partner's model and plan before the first
    round (a recipe that trains part of a model only under some plans)."""
    scenario = load_scenario(SCENARIO)
    training = (training or scenario.training).replace(device="cpu")
    fed = scenario.federation if rounds is None else scenario.federation.replace(rounds=rounds)
    clip = scenario.privacy.max_grad_norm if max_grad_norm is None else max_grad_norm
    privacy = PrivacySettings(
        target_epsilon=epsilon, delta=scenario.privacy.delta, accountant="prv", max_grad_norm=clip
    )
    personas = FederationSettings(personas=6)  # the persona releases every partner plans for
    width, labels = int(parts[0].tensors[LABEL_INPUT].shape[1]), 1
    aggregator = ScopedAggregator()
    models = [model(width, labels, scenario.model) for _ in parts]
    releases = personas.persona_releases if privacy.private else 0
    plans = [
        make_plan(
            privacy=privacy,
            training=training,
            public_rows=len(p),
            rounds=fed.rounds,
            persona_releases=releases,
            persona_share=personas.persona_share,
        )
        for p in parts
    ]
    if prepare is not None:
        for m, plan in zip(models, plans, strict=True):
            prepare(m, plan)
    with tempfile.TemporaryDirectory() as state:
        ledgers = [PrivacyLedger(Path(state) / f"p{i}", settings=privacy) for i in range(len(parts))]
        for rnd in range(1, fed.rounds + 1):
            updates = []
            for i, (part, model, plan) in enumerate(zip(parts, models, plans, strict=True)):
                if rnd > 1:
                    model.load_state_dict({k: torch.from_numpy(v) for k, v in aggregator.adapters["slot"].items()})
                # the product's clip for the plan (planner.sgd_clip), or the fixed one a recipe gives
                clipped = privacy.replace(max_grad_norm=sgd_clip(plan) if max_grad_norm is None else max_grad_norm)
                train_locally(
                    model=model, data=part, settings=training, privacy=clipped, noise_multiplier=plan.noise_multiplier,
                    ledger=ledgers[i] if privacy.private else None, round=rnd, public_rows=len(part),
                    randomness=SecretRandomness.from_seed(seed, i, rnd),
                )  # fmt: skip
                arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
                updates.append(PartnerUpdate(f"p{i}", "slot", arrays, len(part), kind="k"))
            aggregator.aggregate(updates)
        for model in models:
            model.load_state_dict({k: torch.from_numpy(v) for k, v in aggregator.adapters["slot"].items()})
    return models


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s))


def dataset(name: str, *, seed: int, epsilon: float) -> dict[str, Any]:
    schema = load_schema(REPO / "clients" / SCHEMAS[name] / "schema.toml")
    table = load_table(schema, DATA / DATASETS[name])
    features = featurize(table)
    features.tensors[LABEL_INPUT] = torch.from_numpy(np.ascontiguousarray(dense_views(table).label))
    rng = np.random.default_rng(1000 + seed)
    features.tensors[HALF] = torch.from_numpy(rng.integers(0, 2, size=len(table)))  # a secret key's halves
    y = features.tensors["labels"][:, 0].numpy().astype(np.float64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    train, test = np.sort(train), np.sort(test)
    positions = partners_of(y, train, seed)

    def subset(index: np.ndarray) -> FeatureTensors:
        return FeatureTensors(features.layout, features.batch(torch.from_numpy(index)))

    parts = [subset(p) for p in positions]
    test_data = subset(test)
    enc_all, raw_all = own_columns(features)
    y_test = y[test]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pooled = _auc(y_test, fit_trees(raw_all[train], y[train].astype(np.int64), seed=seed).score(raw_all[test]))
        models = federate(parts, epsilon=epsilon, seed=seed)
        rows = []
        for i, (pos, part, model) in enumerate(zip(positions, parts, models, strict=True)):
            index = torch.arange(len(part))
            fed_train = model.out_of_sample_logits(part.batch(index))[:, 0].numpy().astype(np.float64)
            fed_test = model.logits(test_data.batch(torch.arange(len(test))))[:, 0].numpy().astype(np.float64)
            generator = np.random.default_rng(seed * 10 + i)
            local = fit_local_model(
                x_enc=enc_all[pos], x_raw=raw_all[pos], fed_logit=fed_train, y=y[pos], generator=generator
            )
            best = local.report.own_best
            if best == "own_lr":
                alone = fit_linear(enc_all[pos], y[pos].astype(np.int64)).score(enc_all[test])
            else:
                alone = fit_trees(raw_all[pos], y[pos].astype(np.int64), seed=draw_seed(generator)).score(raw_all[test])
            rows.append(
                {
                    "partner": "small" if i == len(positions) - 1 else f"large-{i + 1}",
                    "rows": len(pos),
                    "alone": _auc(y_test, alone),
                    "fed": _auc(y_test, fed_test),
                    "local": _auc(y_test, local.predict(x_enc=enc_all[test], x_raw=raw_all[test], fed_logit=fed_test)),
                    "served": local.report.chosen,
                }
            )
    return {"dataset": name, "seed": seed, "epsilon": epsilon, "pooled": pooled, "partners": rows,
            "seconds": time.perf_counter() - started}  # fmt: skip


def summary(results: list[dict[str, Any]]) -> list[str]:
    """A Markdown table per dataset and the targets, from :func:`dataset` results."""
    lines = [
        "| dataset | epsilon | large: local - alone (mean; worst) | small: alone / local / pooled, gap closed "
        "| fed score alone (large mean, small) | lowest AUC served |",
        "|---|---|---|---|---|---|",
    ]
    for name, eps in sorted({(r["dataset"], r["epsilon"]) for r in results}):
        group = [r for r in results if r["dataset"] == name and r["epsilon"] == eps]
        large = [p for r in group for p in r["partners"] if p["partner"] != "small"]
        small = [(p, r["pooled"]) for r in group for p in r["partners"] if p["partner"] == "small"]
        gains = [p["local"] - p["alone"] for p in large]
        closed = [(p["local"] - p["alone"]) / (pooled - p["alone"]) for p, pooled in small if pooled > p["alone"]]
        lowest = min(p["local"] for r in group for p in r["partners"])
        lines.append(
            f"| {name} | {eps:g} | {np.mean(gains):+.4f}; {min(gains):+.4f} "
            f"| {np.mean([p['alone'] for p, _ in small]):.3f} / {np.mean([p['local'] for p, _ in small]):.3f} / "
            f"{np.mean([x for _, x in small]):.3f}, {100 * np.mean(closed):.0f}% "
            f"(seeds {', '.join(f'{100 * c:.0f}%' for c in closed)}) "
            f"| {np.mean([p['fed'] for p in large]):.3f}, {np.mean([p['fed'] for p, _ in small]):.3f} | {lowest:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--out", type=Path, default=None, help="write every result as JSON lines here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for name in args.datasets:
        if not (DATA / DATASETS[name]).exists():
            print(f"{name}: {DATA / DATASETS[name]} is not available, skipped", file=sys.stderr)
            continue
        for eps in args.epsilon:
            for seed in args.seeds:
                result = dataset(name, seed=seed, epsilon=eps)
                results.append(result)
                print(json.dumps(result), flush=True)
                if args.out is not None:
                    with args.out.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(result) + "\n")
    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
