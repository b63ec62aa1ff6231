"""``python -m benchmarks.surrogate_fidelity [--seeds 0 1 2 3]``: how well a depth-3 surrogate tree
explains k = 4 personas on each primary real dataset (3,000 users drawn with a fixed seed),
for personas from:

- the encoder after a short non-private training (2 rounds of 1 epoch, batch 128, the small
  model of the test suite) with ``label_weight`` 1 and 0, k-means on its embeddings; one
  column per training seed (the encoder's initialisation, its batches and k-means);
- k-means on the standardised featurized columns themselves (scalars, presence flags,
  one-hot codes, numeric sequence steps): the same partition method without any encoder,
  a reference for how tree-shaped k-means personas on that table are at all;
- the persona protocol the federation runs (:mod:`fedpersona.personas.protocol`: a DP-PCA
  space from one Gram release per partner, then DP-EM) with the users split into 3 partners
  of 1,000, at epsilon 3 (each partner's plan from the one planner, 5 rounds of DP-SGD
  beside it, the personas' default share) and without noise; one column per noise seed.

The fidelity is the surrogate's accuracy on its held-out 30% of users
(:func:`fedpersona.personas.cards.persona_cards`). The datasets come from ``../shared/data``.
Prints a Markdown table; nothing is written. About 10 minutes on 2 cores for 4 seeds.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from benchmarks.workload import standardised_columns
from fedpersona.config.settings import FederationSettings, ModelSettings, PrivacySettings, TrainingSettings
from fedpersona.data.dense import dense_views
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.schema_reader import load_schema
from fedpersona.data.tables import Table, load_table
from fedpersona.federation.partner_personas import assign_rows
from fedpersona.federation.rounds import protocol_for
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.evaluation import embed_all
from fedpersona.model.training import train_locally
from fedpersona.personas.cards import persona_cards
from fedpersona.personas.protocol import federated_personas
from fedpersona.privacy.planner import make_plan
from fedpersona.privacy.randomness import SecretRandomness

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PRIMARY = (
    ("ecommerce/schema.toml", "ecommerce/online_shoppers_intention.csv"),
    ("finance/schema.toml", "finance/credit_card_default_taiwan.csv"),
    ("health/schema.toml", "health/cdc_diabetes_5050.csv.gz"),
)
USERS, K, DEPTH = 3000, 4, 3
# Where the personas come from: the encoder with this label_weight, (None) the columns, or the
# persona protocol at this epsilon.
SOURCES: dict[str, float | str | None] = {
    "encoder, label_weight 1": 1.0,
    "encoder, label_weight 0": 0.0,
    "k-means on the columns": None,
    "persona protocol, epsilon 3": "3",
    "persona protocol, no noise": "inf",
}
PARTNERS = 3


def primary_table(schema_file: str, data_file: str) -> Table:
    """``USERS`` rows of one primary real dataset, drawn with a fixed seed (file order kept)."""
    table = load_table(load_schema(REPO / "clients" / schema_file), DATA / data_file)
    return table.take(np.sort(np.random.default_rng(0).permutation(len(table))[:USERS]))


def encoder_personas(features: FeatureTensors, *, seed: int = 0, label_weight: float = 1.0) -> np.ndarray:
    """k-means personas on the embeddings of a short non-private training of a small encoder."""
    torch.manual_seed(seed)
    config = ModelSettings(token_dim=16, embed_dim=16, hidden=32, blocks=1, label_weight=label_weight)
    model = PersonaEncoder(features.layout, config)
    settings = TrainingSettings(
        sample_rate=None, optimizer="adam", local_epochs=1, batch_size=128, lr=0.01, device="cpu"
    )
    public = PrivacySettings(target_epsilon=math.inf)
    for rnd in (1, 2):
        generator = SecretRandomness.from_seed(rnd + 10 * seed)  # reproducible on purpose
        train_locally(model=model, data=features, settings=settings, privacy=public,
                      noise_multiplier=None, ledger=None, round=rnd, randomness=generator)  # fmt: skip
    return KMeans(K, n_init=4, random_state=seed).fit_predict(embed_all(model, features)).astype(np.int64)


def column_personas(features: FeatureTensors, *, seed: int = 0) -> np.ndarray:
    """k-means personas on the standardised featurized columns (no encoder)."""
    x = standardised_columns(features)
    return KMeans(K, n_init=4, random_state=seed).fit_predict(x).astype(np.int64)


def protocol_personas(table: Table, *, seed: int = 0, epsilon: float = 3.0) -> np.ndarray:
    """The persona protocol's personas for ``table`` split into :data:`PARTNERS` partners."""
    x = dense_views(table).persona.astype(np.float64)
    parts = np.array_split(np.arange(len(x)), PARTNERS)
    fed = FederationSettings(personas=K)
    gram = em = 0.0
    if math.isfinite(epsilon):
        plan = make_plan(
            privacy=PrivacySettings(target_epsilon=epsilon, delta=1e-5), training=TrainingSettings(),
            public_rows=len(parts[0]), rounds=5, persona_releases=fed.persona_releases, persona_share=fed.persona_share,
        )  # fmt: skip
        gram, em = float(plan.gram_noise or 0.0), float(plan.em_noise or 0.0)
    result = federated_personas(
        [x[i] for i in parts], protocol=protocol_for(fed, x.shape[1]), gram_noise=gram, step_noise=em,
        randomness=lambda p, r: SecretRandomness.from_seed(seed, p, r), seed=seed,
    )  # fmt: skip
    return assign_rows(result.space, result.mixture, x)[0]


def fidelity(table: Table, personas: np.ndarray) -> float:
    """The depth-3 surrogate's held-out accuracy for ``personas`` (the cards' fixed split seed)."""
    return persona_cards(table, personas, k=K, rng=np.random.default_rng(1), max_depth=DEPTH)[0].fidelity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.surrogate_fidelity", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="training and k-means seeds")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    seeds = args.seeds
    print("| dataset | personas from | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|---|" + "---|" * (len(seeds) + 1))
    for schema_file, data_file in PRIMARY:
        table = primary_table(schema_file, data_file)
        features = featurize(table)
        for name, source in SOURCES.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                values = [fidelity(table, _personas(table, features, source, s)) for s in seeds]
            cells = " | ".join(f"{v:.3f}" for v in values)
            print(f"| {Path(data_file).name} | {name} | {cells} | {np.mean(values):.3f} |", flush=True)


def _personas(table: Table, features: FeatureTensors, source: float | str | None, seed: int) -> np.ndarray:
    if source is None:
        return column_personas(features, seed=seed)
    if isinstance(source, str):
        return protocol_personas(table, seed=seed, epsilon=float(source))
    return encoder_personas(features, seed=seed, label_weight=source)


if __name__ == "__main__":
    main()
