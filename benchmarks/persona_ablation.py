"""``python -m benchmarks.persona_ablation [--seeds 0 1]``: what moves persona recovery on
the default synthetic scenario, in a plain-loop federation (no Flower, no Ray) that trains
exactly like the simulation: 3 partners of each kind, non-IID archetype mixes (Dirichlet 1),
2,000 training rows each, 5 rounds of 2 local epochs, batch 64, Adam lr 0.01, FedAvg with the
parameter scopes (adapter per kind, trunk global), DP-SGD planned for epsilon 3 (delta 1e-5,
PRV; the simulation also reserves a little of the budget for the clustering).

Persona quality is the mean over partners of the adjusted Rand index against the archetypes,
with k-means (scikit-learn, K = 8, the default) on the pooled unit-norm embeddings; the
federated DP k-means reaches the same ARI on the same embeddings (``docs/results.md``). Also
shown: K = 6 per kind (the embedding's own quality) and global K = 12 and 16.

Variants:

- ``bounds only``: numbers enter the encoder scaled by their bounds alone (no typical range);
- ``typical ranges``: the default, numbers centred and scaled by the schema's typical range;
- ``typical, label_weight 0``: as above without the label loss shaping the embedding;
- ``untrained``: the encoder as initialised (what training adds at all).

Prints a Markdown table; nothing is written. About 10 minutes per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import replace

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from benchmarks.workload import federate
from fedpersona.config.settings import ModelSettings, TrainingSettings
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.schema import KINDS
from fedpersona.data.synthetic import generate_silo, partner_mixes
from fedpersona.model.evaluation import embed_all

ROWS, PARTNERS_PER_KIND, ROUNDS = 2000, 3, 5
TRAINING = TrainingSettings(sample_rate=None, optimizer="adam", local_epochs=2, batch_size=64, lr=0.01, device="cpu")
MODEL = ModelSettings(token_dim=32, embed_dim=32, hidden=64, blocks=2, mask_rate=0.3)
VARIANTS = {
    "bounds only": {"typical": False, "label_weight": 1.0, "train": True},
    "typical ranges": {"typical": True, "label_weight": 1.0, "train": True},
    "typical, label_weight 0": {"typical": True, "label_weight": 0.0, "train": True},
    "untrained": {"typical": True, "label_weight": 1.0, "train": False},
}


def scenario_partners(seed: int) -> tuple[list[FeatureTensors], list[np.ndarray], list[str]]:
    parts, truths, kinds = [], [], []
    for i, kind in enumerate(KINDS):
        mixes = partner_mixes(PARTNERS_PER_KIND, alpha=1.0, rng=np.random.default_rng([seed, i]))
        for j in range(PARTNERS_PER_KIND):
            silo = generate_silo(kind, ROWS, seed=10_000 * seed + 100 * i + j, mix=mixes[j])
            parts.append(featurize(silo.table))
            truths.append(silo.persona)
            kinds.append(kind)
    return parts, truths, kinds


def _bounds_only(part: FeatureTensors) -> FeatureTensors:
    """The same rows with the typical ranges dropped from the layout (inputs scaled by bounds)."""
    return FeatureTensors(replace(part.layout, scalar_standard=(), seq_num_standard=()), part.tensors)


def _federate(
    parts: list[FeatureTensors], kinds: list[str], *, epsilon: float, label_weight: float, train: bool
) -> list[np.ndarray]:
    """Train the federation (one adapter per kind); every partner's embeddings under the
    final global model."""
    models = federate(
        parts, slots=[f"{kind}:synthetic" for kind in kinds], model=MODEL.replace(label_weight=label_weight),
        training=TRAINING, epsilon=epsilon, rounds=ROUNDS if train else 0,
    )  # fmt: skip
    return [embed_all(model, part) for model, part in zip(models, parts, strict=True)]


def pooled_ari(embeddings: list[np.ndarray], truths: list[np.ndarray], k: int = 8) -> float:
    """Mean over partners of the ARI of k-means on the pooled rows (one clustering for all)."""
    labels = KMeans(k, n_init=4, random_state=0).fit_predict(np.vstack(embeddings))
    edges = np.cumsum([0] + [len(z) for z in embeddings])
    return float(np.mean([adjusted_rand_score(t, labels[edges[i] : edges[i + 1]]) for i, t in enumerate(truths)]))


def _scores(embeddings: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    out = {f"K={k}": pooled_ari(embeddings, truths, k) for k in (8, 12, 16)}
    per_kind = []
    for start in range(0, len(embeddings), PARTNERS_PER_KIND):
        z = np.vstack(embeddings[start : start + PARTNERS_PER_KIND])
        truth = np.concatenate(truths[start : start + PARTNERS_PER_KIND])
        per_kind.append(adjusted_rand_score(truth, KMeans(6, n_init=4, random_state=0).fit_predict(z)))
    out["per kind, K=6"] = float(np.mean(per_kind))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.persona_ablation", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data seeds (each a new federation)")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    columns = ["K=8", "K=12", "K=16", "per kind, K=6"]
    print("| variant | epsilon | " + " | ".join(f"ARI {c}" for c in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, variant in VARIANTS.items():
        for epsilon in (3.0, math.inf):
            if not variant["train"] and epsilon == 3.0:
                continue  # no training, no privacy cost: one row
            results = []
            for seed in args.seeds:
                parts, truths, kinds = scenario_partners(seed)
                if not variant["typical"]:
                    parts = [_bounds_only(p) for p in parts]
                embeddings = _federate(
                    parts, kinds, epsilon=epsilon, label_weight=float(variant["label_weight"]),
                    train=bool(variant["train"]),
                )  # fmt: skip
                results.append(_scores(embeddings, truths))
            cells = [f"{np.mean([r[c] for r in results]):.3f}" for c in columns]
            eps = "-" if not variant["train"] else ("inf" if math.isinf(epsilon) else f"{epsilon:g}")
            print(f"| {name} | {eps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
