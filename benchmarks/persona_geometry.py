"""``python -m benchmarks.persona_geometry [--seeds 0 1] [--epsilon 3 inf] [--set KEY=VALUE ...]``:
where the default scenario loses persona recovery. Trains the plain-loop federation of
``benchmarks/persona_ablation.py`` (typical ranges, ``label_weight = 0``, the default
scenario's model and training; ``--set model.hidden=32`` or ``--set training.lr=0.02``
change one setting) and asks of the final embeddings:

- ``K=8``: k-means (scikit-learn, K = 8) on the pooled unit-norm embeddings, mean ARI over
  the partners (what the simulation measures);
- ``kind-centred``: the same after subtracting each kind's mean embedding (what a DP release
  of per-kind mean embeddings would allow) and renormalising; ``kind-standardised`` also
  divides each coordinate by the kind's standard deviation;
- ``PCA 8``: the same on the top 8 principal components of the pooled embeddings;
- ``GMM per kind``: a Gaussian mixture with full covariances and the true K = 6, one kind at a
  time;
- ``probe accuracy``: a logistic regression trained WITH the archetypes (3-fold
  cross-validated accuracy, mean over the kinds): how much of the persona the embedding
  carries linearly, whatever its geometry.

Everything here uses the ground truth and the pooled embeddings of all partners: it is an
analysis of the synthetic scenario, not something a federation could run. Prints a Markdown
table; nothing is written. About 2 minutes per federation on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import cross_val_score

from benchmarks.persona_ablation import MODEL, PARTNERS_PER_KIND, ROUNDS, TRAINING, pooled_ari, scenario_partners
from benchmarks.workload import federate
from fedpersona.config.settings import ModelSettings, TrainingSettings
from fedpersona.data.synthetic import ARCHETYPES
from fedpersona.model.evaluation import embed_all

COLUMNS = ("K=8", "kind-centred", "kind-standardised", "PCA 8", "GMM per kind", "probe accuracy")


def kind_centred(embeddings: list[np.ndarray], kinds: list[str], *, standardise: bool = False) -> list[np.ndarray]:
    """Each partner's rows minus its kind's mean over all partners of that kind (divided by the
    kind's per-coordinate standard deviation with ``standardise``), back on the unit sphere."""
    out = []
    for z, kind in zip(embeddings, kinds, strict=True):
        same = np.vstack([e for e, k in zip(embeddings, kinds, strict=True) if k == kind])
        x = z - same.mean(axis=0)
        if standardise:
            x = x / np.maximum(same.std(axis=0), 1e-12)
        out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return out


def pca_projected(embeddings: list[np.ndarray], components: int) -> list[np.ndarray]:
    """Every partner's rows on the top ``components`` principal axes of the pooled rows."""
    pooled = np.vstack(embeddings)
    mean = pooled.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(pooled - mean, rowvar=False))
    axes = vectors[:, ::-1][:, :components]
    return [(z - mean) @ axes for z in embeddings]


def _per_kind(embeddings: list[np.ndarray], truths: list[np.ndarray]) -> tuple[float, float]:
    """Mean over kinds of the Gaussian-mixture ARI (true K) and the supervised probe accuracy."""
    mixture, probe = [], []
    for start in range(0, len(embeddings), PARTNERS_PER_KIND):
        z = np.vstack(embeddings[start : start + PARTNERS_PER_KIND])
        truth = np.concatenate(truths[start : start + PARTNERS_PER_KIND])
        gmm = GaussianMixture(len(ARCHETYPES), covariance_type="full", n_init=2, random_state=0)
        mixture.append(adjusted_rand_score(truth, gmm.fit_predict(z)))
        probe.append(cross_val_score(LogisticRegression(max_iter=3000), z, truth, cv=3).mean())
    return float(np.mean(mixture)), float(np.mean(probe))


def scores(embeddings: list[np.ndarray], truths: list[np.ndarray], kinds: list[str]) -> dict[str, float]:
    """Every column of the table for one federation's embeddings."""
    mixture, probe = _per_kind(embeddings, truths)
    return {
        "K=8": pooled_ari(embeddings, truths),
        "kind-centred": pooled_ari(kind_centred(embeddings, kinds), truths),
        "kind-standardised": pooled_ari(kind_centred(embeddings, kinds, standardise=True), truths),
        "PCA 8": pooled_ari(pca_projected(embeddings, 8), truths),
        "GMM per kind": mixture,
        "probe accuracy": probe,
    }


def _override(
    model: ModelSettings, training: TrainingSettings, assignments: list[str]
) -> tuple[ModelSettings, TrainingSettings]:
    """Apply ``model.KEY=VALUE`` / ``training.KEY=VALUE`` to the defaults (typed like the field)."""
    for item in assignments:
        key, sep, text = item.partition("=")
        section, _, name = key.partition(".")
        known = {
            "model": set(ModelSettings.model_fields),
            "training": set(TrainingSettings.model_fields),
        }
        if not sep or name not in known.get(section, set()):
            raise SystemExit(f"--set {item!r}: expected model.KEY=VALUE or training.KEY=VALUE with a known KEY")
        if section == "model":
            model = model.replace(**{name: type(getattr(model, name))(text)})
        else:
            training = training.replace(**{name: type(getattr(training, name))(text)})
    return model, training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.persona_geometry", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data seeds (each a new federation)")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0, math.inf], help="budgets to train at")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    model, training = _override(MODEL.replace(label_weight=0.0), TRAINING, args.overrides)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    print(f"model: {model}\ntraining: {training}\n")
    print("| epsilon | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for epsilon in args.epsilon:
        results = []
        for seed in args.seeds:
            parts, truths, kinds = scenario_partners(seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                models = federate(
                    parts, slots=[f"{kind}:synthetic" for kind in kinds], model=model, training=training,
                    epsilon=epsilon, rounds=ROUNDS,
                )  # fmt: skip
            embeddings = [embed_all(m, part) for m, part in zip(models, parts, strict=True)]
            results.append(scores(embeddings, truths, kinds))
        cells = [f"{np.mean([r[c] for r in results]):.3f}" for c in COLUMNS]
        print(f"| {'inf' if math.isinf(epsilon) else f'{epsilon:g}'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
