"""Utility on the three primary real datasets: centralised sklearn vs DP partners alone vs
an in-process federation (FedAvg with :class:`~fedpersona.aggregation.ScopedAggregator` and
partner-level :func:`~fedpersona.training.train_locally`, no Ray).

Per dataset: one stratified 80/20 split (seed 0) of the pooled table. Every method is scored
by ROC AUC on the same pooled 20% test rows. The 80% is split over three partners with
Dirichlet(1.0) label skew plus one small partner of 400 rows (as ``simulations/real_silos.toml``).
Encoder methods are scored with a logistic probe fitted on the frozen embeddings of the
partner's own training rows (not the label head); the table reports the mean over the three
large partners, and the small partner separately.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedpersona.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.encoder import EncoderConfig, PersonaEncoder, parameter_scope
from fedpersona.evaluation import embed_all
from fedpersona.features import FeatureTensors, featurize
from fedpersona.privacy import PrivacyLedger, PrivacySettings, plan_noise, sample_rate_for
from fedpersona.schema import load_schema
from fedpersona.simulation import _label_skew_split
from fedpersona.tables import load_table
from fedpersona.training import TrainingSettings, train_locally

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDPERSONA_DATA", REPO.parent / "shared" / "data"))
# (name, kind, file under DATA, reference HGB AUC, reference LR AUC measured earlier)
DATASETS = (
    ("online shoppers", "ecommerce", "ecommerce/online_shoppers_intention.csv", 0.934, 0.904),
    ("credit default", "finance", "finance/credit_card_default_taiwan.csv", 0.780, 0.714),
    ("CDC diabetes", "health", "health/cdc_diabetes_5050.csv.gz", 0.834, 0.829),
)
EPSILONS = (1.0, 3.0, 8.0, math.inf)
PARTNERS, SMALL_ROWS, ALPHA, DELTA = 3, 400, 1.0, 1e-5
QUICK_TRAIN_ROWS = 4_000  # --quick: a stratified subsample of the 80% train rows (test rows unchanged)
TRAINING = TrainingSettings(local_epochs=1, batch_size=256, lr=0.01, grad_sample_mode="ghost", device="cpu")


def run(*, quick: bool) -> dict[str, Any]:
    rounds = 2 if quick else 10
    train_cap = QUICK_TRAIN_ROWS if quick else None
    rows, small_rows, data, notes = [], [], {}, []
    for name, kind, file, ref_hgb, ref_lr in DATASETS:
        path = DATA / file
        if not path.exists():
            notes.append(f"{name}: {path} not found, skipped (set FEDPERSONA_DATA).")
            continue
        res = _dataset(kind, path, rounds=rounds, train_cap=train_cap)
        data[name] = res
        hgb = res["hgb"]
        fed = res["federated"]
        rows.append(
            [
                name,
                f"{res['train_rows']}/{res['test_rows']}",
                f"{hgb:.3f} ({ref_hgb})",
                f"{res['logreg']:.3f} ({ref_lr})",
                f"{res['alone_eps3']:.3f}",
            ]
            + [f"{fed[_key(e)]:.3f}" for e in EPSILONS]
            + [f"{fed['3'] / hgb:.1%}"]
        )
        small = res["small"]
        small_rows.append(
            [name, SMALL_ROWS, f"{small['alone_eps3']:.3f}", f"{small['federated_eps3']:.3f}",
             f"{small['federated_eps3'] - small['alone_eps3']:+.3f}"]
        )  # fmt: skip
    missed = [r[0] for r in rows if float(r[-1].rstrip("%")) < 97.0]
    gains = [float(r[-1]) for r in small_rows]
    notes += [
        (
            f"--quick: every method trains on a stratified {QUICK_TRAIN_ROWS:,}-row subsample of the 80% "
            "train rows (sklearn baselines too); the test rows are the full 20%. "
            if quick
            else ""
        )
        + f"Federation: FedAvg, {rounds} rounds x 1 local epoch, batch 256, lr 0.01, ghost clipping, "
        f"max_grad_norm 1.0, delta {DELTA}, PRV accountant; noise planned for all rounds at the target "
        "epsilon. One federation per dataset (its 3 + 1 partners), not the 12-partner mixed federation.",
        "HGB / LogReg: sklearn defaults (LogReg: mean imputation + scaling, max_iter 1000) on the pooled "
        "featurized scalar, categorical-code and sequence columns (no text); in brackets the reference "
        "AUCs measured earlier on all rows.",
        "Target federated eps=3 >= 97% of HGB AUC: "
        + ("met on every dataset." if not missed else f"missed on {', '.join(missed)}.")
        + " Target small-partner gain +0.03: "
        + ("met on every dataset." if gains and min(gains) >= 0.03 else "not met on every dataset (see table).")
        + " Why: the encoder methods are a linear probe on 32-d DP embeddings against a non-private tree "
        "ensemble on the raw columns; "
        + (
            f"in --quick each partner takes only a few Poisson steps per round ({rounds} rounds on "
            f"{QUICK_TRAIN_ROWS:,} rows), so the encoder is far from converged: when eps=inf is itself far "
            "below HGB the gap is under-training, not privacy, and a small partner gains little from a "
            "global model that has not learned yet. Full mode (all rows, 10 rounds) is the run to judge "
            "the targets by."
            if quick
            else "where eps=inf is close to HGB and eps=3 is not, the gap is the DP noise."
        ),
    ]
    return {
        "title": "Utility on the primary real datasets",
        "tables": [
            {
                "name": "ROC AUC on the pooled 20% test split (mean over the 3 large partners for encoder methods)",
                "columns": ["dataset", "train/test rows", "HGB (ref)", "LogReg (ref)", "alone eps=3"]
                + [f"fed eps={_key(e)}" for e in EPSILONS]
                + ["fed eps=3 / HGB"],
                "rows": rows,
            },
            {
                "name": f"Small partner ({SMALL_ROWS} rows): alone vs in the federation, eps=3",
                "columns": ["dataset", "rows", "alone", "federated", "gain"],
                "rows": small_rows,
            },
        ],
        "notes": notes,
        "data": {"rounds": rounds, "datasets": data},
    }


def _key(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def _dataset(kind: str, path: Path, *, rounds: int, train_cap: int | None) -> dict[str, Any]:
    schema = load_schema(REPO / "clients" / kind / "schema.toml")
    features = featurize(load_table(schema, path))
    y = features.tensors["labels"][:, 0].numpy().astype(np.float64)
    known = np.flatnonzero(~np.isnan(y))
    train_idx, test_idx = train_test_split(known, test_size=0.2, stratify=y[known], random_state=0)
    if train_cap is not None and len(train_idx) > train_cap:
        train_idx, _ = train_test_split(train_idx, train_size=train_cap, stratify=y[train_idx], random_state=0)
    x = _flat(features)
    out: dict[str, Any] = {"rows": len(known), "train_rows": len(train_idx), "test_rows": len(test_idx)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        hgb = HistGradientBoostingClassifier(random_state=0).fit(x[train_idx], y[train_idx])
        lr = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=1000))
        lr.fit(x[train_idx], y[train_idx])
    out["hgb"] = float(roc_auc_score(y[test_idx], hgb.predict_proba(x[test_idx])[:, 1]))
    out["logreg"] = float(roc_auc_score(y[test_idx], lr.predict_proba(x[test_idx])[:, 1]))

    rng = np.random.default_rng(0)
    shuffled = rng.permutation(train_idx)
    small_idx, rest = np.sort(shuffled[:SMALL_ROWS]), shuffled[SMALL_ROWS:]
    large = [rest[p] for p in _label_skew_split(y[rest], PARTNERS, ALPHA, rng)]
    parts = [_subset(features, idx) for idx in [*large, small_idx]]
    test = _subset(features, np.sort(test_idx))
    out["partner_rows"] = [len(p) for p in parts]

    logger.info("%s: baselines done; partners alone at eps=3", kind)
    alone = [_probe_auc(_federate([p], epsilon=3.0, rounds=rounds)[0], p, test) for p in parts]
    out["alone_eps3"] = float(np.mean(alone[:PARTNERS]))
    out["alone_eps3_per_partner"] = alone
    out["federated"] = {}
    out["federated_per_partner"] = {}
    for epsilon in EPSILONS:
        logger.info("%s: federated eps=%s", kind, _key(epsilon))
        models = _federate(parts, epsilon=epsilon, rounds=rounds)
        aucs = [_probe_auc(m, p, test) for m, p in zip(models, parts, strict=True)]
        out["federated"][_key(epsilon)] = float(np.mean(aucs[:PARTNERS]))
        out["federated_per_partner"][_key(epsilon)] = aucs
    out["small"] = {"alone_eps3": alone[-1], "federated_eps3": out["federated_per_partner"]["3"][-1]}
    return out


def _flat(features: FeatureTensors) -> np.ndarray:
    """Every scalar, categorical-code and sequence column (NaN where missing) as one float
    matrix; hashed text ids are left out."""
    t = features.tensors
    blocks = []
    for key in sorted(t):
        if key == "labels" or key.endswith("_present") or key.startswith("text"):
            continue
        values = t[key].numpy().astype(np.float64)
        present = t.get(f"{key}_present")
        if present is not None:
            values[~present.numpy().astype(bool)] = np.nan
        blocks.append(values)
    return np.hstack(blocks)


def _subset(features: FeatureTensors, index: np.ndarray) -> FeatureTensors:
    return FeatureTensors(features.layout, features.batch(torch.from_numpy(np.asarray(index))))


def _federate(parts: list[FeatureTensors], *, epsilon: float, rounds: int, seed: int = 0) -> list[PersonaEncoder]:
    """FedAvg over ``parts`` (one partner: training alone); returns each partner's final model
    (global trunk and adapter, its own heads)."""
    privacy = PrivacySettings(target_epsilon=epsilon, delta=DELTA, accountant="prv")
    slot = "benchmark:slot"
    models = []
    for _ in parts:
        torch.manual_seed(seed)
        models.append(PersonaEncoder(parts[0].layout, EncoderConfig()))
    shared = [n for n in models[0].state_dict() if parameter_scope(n) != "local"]
    sigmas = [
        _sigma(epsilon, sample_rate_for(len(p), TRAINING.batch_size), TRAINING.steps_per_round(len(p)) * rounds)
        if privacy.private else None
        for p in parts
    ]  # fmt: skip
    aggregator = ScopedAggregator(optimizer="fedavg")
    with tempfile.TemporaryDirectory() as state, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ledgers = [
            PrivacyLedger(Path(state) / str(i), settings=privacy) if privacy.private else None
            for i in range(len(parts))
        ]
        for r in range(1, rounds + 1):
            updates = []
            for i, (model, part) in enumerate(zip(models, parts, strict=True)):
                _load(model, aggregator.arrays_for(slot))
                train_locally(
                    model=model, data=part, settings=TRAINING, privacy=privacy, noise_multiplier=sigmas[i],
                    ledger=ledgers[i], round=r, generator=torch.Generator().manual_seed(seed * 10_000 + r * 100 + i),
                )  # fmt: skip
                state_dict = model.state_dict()
                arrays = {n: state_dict[n].detach().numpy().copy() for n in shared}
                updates.append(PartnerUpdate(f"p{i}", slot, arrays, len(part), kind="benchmark"))
            aggregator.aggregate(updates)
    for model in models:
        _load(model, aggregator.arrays_for(slot))
    return models


@functools.cache
def _sigma(epsilon: float, sample_rate: float, steps: int) -> float:
    """The planned noise multiplier (cached: a partner alone and federated plans the same)."""
    return plan_noise(target_epsilon=epsilon, delta=DELTA, sample_rate=sample_rate, steps=steps, accountant="prv")


def _load(model: PersonaEncoder, arrays: dict[str, np.ndarray]) -> None:
    if arrays:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=False)


def _probe_auc(model: PersonaEncoder, train: FeatureTensors, test: FeatureTensors) -> float:
    """A logistic probe fitted on the partner's own embeddings, scored on the pooled test rows."""
    y_train = train.tensors["labels"][:, 0].numpy()
    y_test = test.tensors["labels"][:, 0].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(max_iter=300).fit(embed_all(model, train), y_train)
    return float(roc_auc_score(y_test, probe.decision_function(embed_all(model, test))))
