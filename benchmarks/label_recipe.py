"""Choosing the label model's DP-SGD recipe on validation splits: no test row is ever scored.

Per dataset and seed the rows are split exactly as in :mod:`benchmarks.label_model` (a
stratified 80/20 split, ``random_state = seed``); the 20% test rows are set aside and never
read here. The 80% training rows are split again, stratified 75/25 (``random_state = 100 +
seed``): the federation (three large Dirichlet(1) partners and a 400-row one, as in
:func:`benchmarks.label_model.partners_of`) trains on the 75%, and each recipe is scored by the
ROC AUC of the federated score (the mean of the two halves' logits) on the 25% validation rows.
Each recipe runs the product's own training (:func:`benchmarks.label_model.federate`: planner,
ledger, book-keeping clipping, secret noise, FedAvg within the slot) at the same epsilon, with
the persona releases' share reserved as in a federation.

``python -m benchmarks.label_recipe --seeds 0 1 2 3 [--epsilon 3] [--recipes NAME ...]``
prints one row per recipe: the validation AUC per dataset (mean and spread over seeds) and the
mean over the datasets, which is what a recipe is chosen by. The rows ``no noise`` (non-private,
no clipping) and ``clipping only`` (epsilon 100, little noise) are references, not candidates: they show how
much of the gap to the non-private model is noise and how much is clipping and the recipe.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

from benchmarks.label_model import DATA, DATASETS, REPO, SCENARIO, SCHEMAS, federate, partners_of
from fedpersona.config.files import load_scenario
from fedpersona.config.settings import ModelSettings, PrivacyPlan
from fedpersona.data.dense import dense_views
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.schema_reader import load_schema
from fedpersona.data.tables import load_table
from fedpersona.model.linear import HALF, LABEL_INPUT, LabelModel
from fedpersona.privacy.planner import sgd_clip

# name -> changes to the shipped recipe: TrainingSettings fields, "rounds", "max_grad_norm", "epsilon"
RECIPES: dict[str, dict[str, Any]] = {
    "shipped (simulations/real_silos.toml; clip: planner.sgd_clip)": {},
    "clip 1 (the recipe before 2026-12-04)": {"max_grad_norm": 1.0},
    "fixed clip 2 (no lowering for noisy plans)": {"max_grad_norm": 2.0},
    "lr 4": {"lr": 4.0},
    "lr 8": {"lr": 8.0},
    "clip 3": {"max_grad_norm": 3.0},
    "clip 5": {"max_grad_norm": 5.0},
    "clip 10": {"max_grad_norm": 10.0},
    "clip 5, q 0.5": {"max_grad_norm": 5.0, "sample_rate": 0.5},
    "clip 5, q 0.5, 2 local epochs": {"max_grad_norm": 5.0, "sample_rate": 0.5, "local_epochs": 2},
    "clip 3, q 0.5, 2 local epochs": {"max_grad_norm": 3.0, "sample_rate": 0.5, "local_epochs": 2},
    "3 local epochs (15 steps a round)": {"local_epochs": 3},
    "3 local epochs, lr 4": {"local_epochs": 3, "lr": 4.0},
    "3 local epochs, clip 3": {"local_epochs": 3, "max_grad_norm": 3.0},
    "30 rounds": {"rounds": 30},
    # other model classes on the same view, trained by the same DP-SGD (the generic book-keeping clipping)
    "one hidden layer of 8 (ReLU), lr 4": {"model": ("hidden", 8), "lr": 4.0},
    "one hidden layer of 16 (ReLU), lr 4": {"model": ("hidden", 16), "lr": 4.0},
    "linear + a hidden layer of 8 (ReLU), lr 4": {"model": ("linear+hidden", 8), "lr": 4.0},
    "linear on x and 64 fixed random ReLU features": {"model": ("random features", 64)},
    # one shared model class, its hidden part trained only by partners whose plan is quiet enough
    "linear + hidden 8, lr 4, hidden frozen where the step noise > 0.01": {
        "model": ("linear+hidden", 8),
        "lr": 4.0,
        "freeze_above": 0.01,
    },
    "linear + hidden 8, lr 4, hidden frozen where the step noise > 0.025": {
        "model": ("linear+hidden", 8),
        "lr": 4.0,
        "freeze_above": 0.025,
    },
    "linear + hidden 8, lr 4, hidden frozen everywhere (the linear model at lr 4)": {
        "model": ("linear+hidden", 8),
        "lr": 4.0,
        "freeze_above": 0.0,
    },
    "reference: clipping only (epsilon 100)": {"epsilon": 100.0},
    "reference: clip 1, epsilon 100": {"max_grad_norm": 1.0, "epsilon": 100.0},
    "reference: no noise, no clipping": {"epsilon": float("inf")},
}


class _Half(nn.Module):
    """One half of a label-model variant on the dense view ``(B, d) -> (B, L)``: ``"hidden"``
    (``d -> H -> L``, ReLU), ``"linear+hidden"`` (a linear map plus that), ``"random features"``
    (a linear map of ``x`` and ``relu(R x + b)``, ``R`` and ``b`` fixed at a public seed). The
    layers that train start at zero where a zero start leaves the others a gradient; the hidden
    layer starts at N(0, 1/d), the same for every partner (a public seed)."""

    def __init__(self, kind: str, width: int, labels: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.kind = kind
        self.hidden = nn.Linear(width, hidden)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(hidden, width, generator=generator) / width**0.5)
            self.hidden.bias.copy_(torch.randn(hidden, generator=generator) * 0.1 if kind == "random features" else 0)
        self.hidden.requires_grad_(kind != "random features")
        self.out = nn.Linear(hidden + (width if kind == "random features" else 0), labels)
        self.linear = nn.Linear(width, labels) if kind == "linear+hidden" else None
        for layer in (self.out, self.linear):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        if self.kind == "random features":
            return self.out(torch.cat([x, h], 1))
        return self.out(h) + (self.linear(x) if self.linear is not None else 0)


def variant(kind: str, hidden: int) -> Callable[[int, int, ModelSettings], LabelModel]:
    """A label model whose two halves are :class:`_Half` (no closed-form clipping: the generic
    book-keeping path clips it, exactly)."""

    def build(width: int, labels: int, config: ModelSettings) -> LabelModel:
        model = LabelModel(width, labels, config)
        model.clipped_sum = None  # type: ignore[assignment, method-assign]
        generator = torch.Generator().manual_seed(0)
        halves = {f"half{h}": _Half(kind, width, labels, hidden, generator) for h in (0, 1)}
        model.label_model = nn.ModuleDict(halves)
        return model

    return build


@dataclass(frozen=True)
class Split:
    parts: list[FeatureTensors]
    validation: FeatureTensors
    y_validation: np.ndarray
    partner_rows: list[np.ndarray]  # each partner's positions in the whole table (the last is the 400-row one)
    validation_rows: np.ndarray


def load(name: str, tables: dict[str, tuple[Path, Path]] | None = None) -> tuple[FeatureTensors, np.ndarray]:
    """A dataset's tensors with its dense label view and a fixed half per row: a primary by name,
    or one of ``tables`` (name -> (data file, schema file); its first label is scored)."""
    if tables and name in tables:
        data, schema_path = tables[name]
    else:
        data, schema_path = DATA / DATASETS[name], REPO / "clients" / SCHEMAS[name] / "schema.toml"
    table = load_table(load_schema(schema_path), data)
    features = featurize(table)
    features.tensors[LABEL_INPUT] = torch.from_numpy(np.ascontiguousarray(dense_views(table).label))
    features.tensors[HALF] = torch.from_numpy(np.random.default_rng(7).integers(0, 2, size=len(table)))
    return features, features.tensors["labels"][:, 0].numpy().astype(np.float64)


def fit_and_validation(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted positions of the fitting rows and of the validation rows (module docstring);
    the 20% test rows are in neither."""
    train, _test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    fit, validation = train_test_split(np.sort(train), test_size=0.25, stratify=y[np.sort(train)],
                                       random_state=100 + seed)  # fmt: skip
    return np.sort(fit), np.sort(validation)


def split(features: FeatureTensors, y: np.ndarray, seed: int) -> Split:
    """The federation's partners on the fitting rows and the validation rows (module docstring)."""
    fit, validation = fit_and_validation(y, seed)

    def subset(index: np.ndarray) -> FeatureTensors:
        return FeatureTensors(features.layout, features.batch(torch.from_numpy(index)))

    partners = partners_of(y, fit, seed)
    return Split([subset(p) for p in partners], subset(validation), y[validation], partners, validation)


def step_noise(plan: PrivacyPlan) -> float:
    """The standard deviation a DP-SGD step adds to each coordinate of the mean clipped gradient
    under ``plan``, ``C sigma / E[B]`` (public numbers only); 0 without privacy."""
    if not plan.private or plan.noise_multiplier is None:
        return 0.0
    return sgd_clip(plan) * plan.noise_multiplier / max(1.0, plan.sample_rate * plan.public_rows)


def freezer(threshold: float) -> Callable[[LabelModel, PrivacyPlan], None]:
    """Freeze the hidden part (hidden and output layers) of a :class:`_Half` variant for a partner
    whose :func:`step_noise` is above ``threshold``: it trains only the linear map and releases
    the hidden part as it received it. A frozen hidden part that starts at zero output leaves
    exactly the linear model."""

    def prepare(model: LabelModel, plan: PrivacyPlan) -> None:
        if step_noise(plan) > threshold:
            for half in model.label_model.values():
                assert isinstance(half, _Half)
                half.hidden.requires_grad_(False)
                half.out.requires_grad_(False)

    return prepare


def score(data: Split, recipe: dict[str, Any], *, epsilon: float, seed: int) -> float:
    changes = dict(recipe)
    rounds = changes.pop("rounds", None)
    threshold = changes.pop("freeze_above", None)
    clip = changes.pop("max_grad_norm", None)
    epsilon = changes.pop("epsilon", epsilon)
    model = variant(*changes.pop("model")) if "model" in changes else LabelModel
    training = load_scenario(SCENARIO).training.replace(**changes)
    prepare = None if threshold is None else freezer(float(threshold))
    models = federate(
        data.parts, epsilon=epsilon, seed=seed, training=training, rounds=rounds, max_grad_norm=clip, model=model,
        prepare=prepare,
    )  # fmt: skip
    logits = models[0].logits(data.validation.batch(torch.arange(len(data.y_validation))))[:, 0].numpy()
    return float(roc_auc_score(data.y_validation, logits.astype(np.float64)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument(
        "--table", nargs=2, action="append", default=[], metavar=("DATA", "SCHEMA"),
        help="another table (a CSV or Parquet file and its schema) to score, named by the file; repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    tables = {Path(data).stem: (Path(data), Path(schema)) for data, schema in args.table}
    datasets = [*args.datasets, *tables]
    torch.set_num_threads(1)
    scores: dict[str, dict[str, list[float]]] = {r: {d: [] for d in datasets} for r in args.recipes}
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in datasets:
            features, y = load(name, tables)
            for seed in args.seeds:
                data = split(features, y, seed)
                for recipe in args.recipes:
                    scores[recipe][name].append(score(data, RECIPES[recipe], epsilon=args.epsilon, seed=seed))
                    print(f"{name} seed {seed} {recipe}: {scores[recipe][name][-1]:.4f}", file=sys.stderr, flush=True)
    print(f"Validation AUC of the federated score, epsilon {args.epsilon:g}, seeds {args.seeds} "
          f"(mean, spread over seeds), {time.perf_counter() - began:.0f} s")  # fmt: skip
    print("| recipe | " + " | ".join(datasets) + " | mean over datasets |")
    print("|---|" + "---|" * (len(datasets) + 1))
    for recipe in args.recipes:
        cells = [f"{statistics.mean(v):.4f} ({min(v):.3f}-{max(v):.3f})" for v in scores[recipe].values()]
        overall = statistics.mean(statistics.mean(v) for v in scores[recipe].values())
        print(f"| {recipe} | " + " | ".join(cells) + f" | {overall:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
