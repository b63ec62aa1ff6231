"""``python -m benchmarks.persona_ceiling [--rows N ...]``: how well can the synthetic personas be
recovered at all, and what does DP-SGD cost? One partner of each kind with the uniform
archetype mix, adjusted Rand index (ARI) of k-means (K = 6, the true number) against the
ground truth, for:

- the latent traits the generator drew (the upper bound: the archetypes are separable there);
- a gradient-boosting classifier trained WITH the labels (3-fold cross-validated predictions):
  how much of the persona the featurized columns carry at all;
- k-means on the standardised featurized columns (scalars, presence flags, one-hot codes,
  sequences; text left out): a plain unsupervised baseline;
- k-means on the embeddings of the default encoder trained alone for 5 rounds of 2 local
  epochs (batch 64, lr 0.01): non-private, non-private with ``label_weight = 0``, and DP-SGD
  at epsilon 3 (delta 1e-5, PRV), for each ``--rows``.

Prints a Markdown table; nothing is written. Takes a few minutes on 2 cores per row count.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_predict

from benchmarks.workload import standardised_columns
from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings, sample_rate_for
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.schema import KINDS
from fedpersona.data.synthetic import ARCHETYPES, TRAIT_NOISE, generate_silo
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.evaluation import embed_all
from fedpersona.model.training import train_locally
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.planner import plan_noise
from fedpersona.privacy.randomness import SecretRandomness

K = len(ARCHETYPES)
ROUNDS, TRAINING = (
    5,
    TrainingSettings(sample_rate=None, optimizer="adam", local_epochs=2, batch_size=64, lr=0.01, device="cpu"),
)


def _kmeans_ari(x: np.ndarray, truth: np.ndarray) -> float:
    return float(adjusted_rand_score(truth, KMeans(K, n_init=4, random_state=0).fit_predict(x)))


def _encoder_ari(features: FeatureTensors, truth: np.ndarray, *, epsilon: float, label_weight: float) -> float:
    torch.manual_seed(0)
    model = PersonaEncoder(features.layout, ModelSettings(label_weight=label_weight))
    privacy = PrivacySettings(target_epsilon=epsilon, delta=1e-5, accountant="prv")
    rows = len(features)
    sigma = None
    with tempfile.TemporaryDirectory() as state, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ledger = None
        if privacy.private:
            steps = ROUNDS * TRAINING.steps_per_round(rows)
            q = sample_rate_for(rows, TRAINING.batch_size)
            sigma = plan_noise(target_epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, accountant="prv")
            ledger = PrivacyLedger(state, settings=privacy)
        generator = SecretRandomness.from_seed(0)  # benchmark: reproducible on purpose
        for rnd in range(1, ROUNDS + 1):
            train_locally(
                model=model, data=features, settings=TRAINING, privacy=privacy, noise_multiplier=sigma,
                ledger=ledger, round=rnd, randomness=generator,
            )  # fmt: skip
    return _kmeans_ari(embed_all(model, features), truth)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.persona_ceiling", description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 8000], help="rows of each partner")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    header = ["kind", "rows", "latent traits", "supervised HGB (uses labels)", "raw columns",
              "encoder eps=inf", "encoder eps=inf, label_weight 0", "encoder eps=3"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    means: dict[int, list[float]] = {}
    for rows in args.rows:
        for kind in KINDS:
            silo = generate_silo(kind, rows, seed=3)
            truth = silo.persona
            traits = np.array([a.traits for a in ARCHETYPES])[truth]
            traits = traits + np.random.default_rng(2).normal(0.0, TRAIT_NOISE, traits.shape)
            features = featurize(silo.table)
            x = standardised_columns(features)
            predicted = cross_val_predict(HistGradientBoostingClassifier(random_state=0), x, truth, cv=3)
            private = _encoder_ari(features, truth, epsilon=3.0, label_weight=1.0)
            means.setdefault(rows, []).append(private)
            cells = [
                _kmeans_ari(traits, truth),
                float(adjusted_rand_score(truth, predicted)),
                _kmeans_ari(x, truth),
                _encoder_ari(features, truth, epsilon=math.inf, label_weight=1.0),
                _encoder_ari(features, truth, epsilon=math.inf, label_weight=0.0),
                private,
            ]
            print(f"| {kind} | {rows:,} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    for rows, values in means.items():
        print(f"\nmean ARI at eps=3 with {rows:,} rows: {np.mean(values):.3f}")


if __name__ == "__main__":
    main()
