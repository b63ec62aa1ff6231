"""Utility on the three primary real datasets: centralised sklearn vs DP partners alone vs
an in-process federation (FedAvg with :class:`~fedpersona.federation.aggregation.ScopedAggregator` and
partner-level :func:`~fedpersona.model.training.train_locally`, no Ray).

Per dataset: one stratified 80/20 split (seed 0) of the pooled table. Every method is scored
by ROC AUC on the same pooled 20% test rows. The 80% is split over three partners with
Dirichlet(1.0) label skew plus one small partner of 400 rows (as ``simulations/real_silos.toml``).
Encoder methods are scored two ways: a logistic probe fitted (not privately) on the frozen
embeddings and labels of the partner's own training rows, and the partner's own DP-trained
label head (as ``label_auc`` in a simulation's evaluation). The tables report the mean over
the three large partners, and the small partner separately.

The training settings (:data:`MODEL`, :data:`TRAINING`) are one configuration applied
identically to every encoder method and every epsilon. They were chosen before any test row
was scored, on a validation split (20% of the train rows, stratified, seed 1) of online
shoppers (4,000 train rows) and credit default (12,000 train rows) at eps=3 and eps=inf; the
notes written into the report say what was compared.
"""

from __future__ import annotations

import logging
import math
import os
import time
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

from benchmarks.workload import federate
from fedpersona.config.settings import ModelSettings, TrainingSettings
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.schema_reader import load_schema
from fedpersona.data.tables import load_table
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.evaluation import embed_all
from fedpersona.simulation import _label_skew_split

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
FULL_TRAIN_ROWS: int | None = None  # full mode: all train rows (set a number to cap them as in --quick)
QUICK_ROUNDS = FULL_ROUNDS = 5  # the same training in both modes; --quick has fewer rows
MODEL = ModelSettings()  # the default encoder (a smaller one was tried: see the notes)
TRAINING = TrainingSettings(local_epochs=3, batch_size=128, lr=0.003, grad_sample_mode="bookkeeping", device="cpu")
SCORES = ("probe", "head")  # logistic probe on embeddings (primary), DP-trained label head


def run(*, quick: bool) -> dict[str, Any]:
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    train_cap = QUICK_TRAIN_ROWS if quick else FULL_TRAIN_ROWS
    rows, small_rows, data, notes = [], [], {}, []
    for name, kind, file, ref_hgb, ref_lr in DATASETS:
        path = DATA / file
        if not path.exists():
            notes.append(f"{name}: {path} not found, skipped (set FEDPERSONA_DATA).")
            continue
        res = _dataset(kind, path, rounds=rounds, train_cap=train_cap)
        data[name] = res
        hgb = res["hgb"]
        for score in SCORES:
            fed = res["federated"][score]
            rows.append(
                [
                    name,
                    score,
                    f"{res['train_rows']}/{res['test_rows']}",
                    f"{hgb:.3f} ({ref_hgb})",
                    f"{res['logreg']:.3f} ({ref_lr})",
                    f"{res['alone_eps3'][score]:.3f}",
                ]
                + [f"{fed[_key(e)]:.3f}" for e in EPSILONS]
                + [f"{fed['3'] / hgb:.1%}"]
            )
        small = res["small"]
        small_rows.append(
            [name, res["partner_rows"][-1]]
            + [f"{small[score][k]:.3f}" for score in SCORES for k in ("alone_eps3", "federated_eps3")]
            + [f"{small[score]['federated_eps3'] - small[score]['alone_eps3']:+.3f}" for score in SCORES]
        )
    notes += _notes(data, rounds=rounds, train_cap=train_cap, quick=quick)
    return {
        "title": "Utility on the primary real datasets",
        "tables": [
            {
                "name": "ROC AUC on the pooled 20% test split (encoder methods: mean over the 3 large partners; "
                "score probe = logistic probe on the embeddings, head = the partner's DP-trained label head)",
                "columns": ["dataset", "score", "train/test rows", "HGB (ref)", "LogReg (ref)", "alone eps=3"]
                + [f"fed eps={_key(e)}" for e in EPSILONS]
                + ["fed eps=3 / HGB"],
                "rows": rows,
            },
            {
                "name": f"Small partner ({SMALL_ROWS} rows): alone vs in the federation, eps=3",
                "columns": ["dataset", "rows"]
                + [f"{score} {k}" for score in SCORES for k in ("alone", "federated")]
                + [f"{score} gain" for score in SCORES],
                "rows": small_rows,
            },
        ],
        "notes": notes,
        "data": {
            "rounds": rounds,
            "train_cap": train_cap,
            "model": MODEL.model_dump(),
            "training": TRAINING.model_dump(),
            "datasets": data,
        },
    }


def _notes(data: dict[str, Any], *, rounds: int, train_cap: int | None, quick: bool) -> list[str]:
    """What was run, how the settings were chosen, and the targets met or missed (probe AUC)."""
    params = {n: d["parameters"] for n, d in data.items()}
    sizes = {n: "/".join(str(r) for r in d["partner_rows"]) for n, d in data.items()}
    ratios = {n: d["federated"]["probe"]["3"] / d["hgb"] for n, d in data.items()}
    head_ratios = {n: d["federated"]["head"]["3"] / d["hgb"] for n, d in data.items()}
    inf_ratios = {n: d["federated"]["probe"]["inf"] / d["hgb"] for n, d in data.items()}
    gains = {n: d["small"]["probe"]["federated_eps3"] - d["small"]["probe"]["alone_eps3"] for n, d in data.items()}
    head_gains = {n: d["small"]["head"]["federated_eps3"] - d["small"]["head"]["alone_eps3"] for n, d in data.items()}

    def listing(values: dict[str, Any], fmt: str) -> str:
        return ", ".join(f"{n} {format(v, fmt)}" for n, v in values.items())

    missed = [n for n, r in ratios.items() if r < 0.97]
    missed_gain = [n for n, g in gains.items() if g < 0.03]
    noise_limited = [n for n in missed if inf_ratios[n] >= 0.97]
    model_limited = [n for n in missed if inf_ratios[n] < 0.97]
    why = []
    if noise_limited:
        why.append(
            f"on {', '.join(noise_limited)} the encoder reaches the target without noise, so the shortfall at eps=3 "
            "is the DP noise: each partner plans its noise for its own rows only (partner sizes "
            f"{listing({n: sizes[n] for n in noise_limited}, 's')}), and the fewer rows (and the rarer the positive "
            "label) the larger the noise relative to the clipped gradients"
        )
    if model_limited:
        why.append(
            f"on {', '.join(model_limited)} even eps=inf is below 97% of HGB: there the model and its training "
            "(a 32-d embedding of a self-supervised + label objective, scored linearly, against a tree ensemble on "
            "the raw columns) limit it before the noise does"
        )
    return [
        f"{'--quick' if quick else 'Full mode'}: "
        + (
            f"every method (sklearn baselines too) trains on a stratified subsample of {train_cap:,} of the 80% "
            "train rows; the test rows are always the full 20%."
            if train_cap
            else "every method trains on all of the 80% train rows and is scored on the 20% test rows."
        ),
        f"Encoder methods: the default encoder (embed_dim {MODEL.embed_dim}; {listing(params, ',')} parameters), "
        f"FedAvg, {rounds} rounds x {TRAINING.local_epochs} local epochs, Poisson batch {TRAINING.batch_size}, Adam "
        f"lr {TRAINING.lr}, ghost clipping, max_grad_norm 1.0, delta {DELTA}, PRV accountant; noise planned for all "
        "rounds at the target epsilon. One federation per dataset: 3 partners with Dirichlet(1.0) label skew plus "
        f"the small one (rows: {listing(sizes, 's')}), not the 12-partner mixed federation. 'Alone' is the same "
        "training with one partner.",
        "How the settings were chosen: one configuration for every method and epsilon, picked before any test "
        "row was scored, on a validation split (20% of the train rows) of online shoppers (4,000 train rows) and "
        "credit default (12,000) at eps=3 and eps=inf (one seed each, so differences under ~0.03 are noise). "
        "Compared: 1-5 local epochs, batch 64/128/256, lr 0.003/0.01, 2-10 rounds, label_weight 1/5, and a "
        "small encoder (token/embed 8, hidden 16, 1 block). The old setting (2 rounds x 1 epoch, batch 256, lr "
        "0.01) reached validation probe AUC 0.65 on online shoppers even without noise, 0.85 with 5 rounds x 3 "
        "epochs. At eps=3 the small encoder helped on online shoppers (0.73 vs 0.63) but lost on credit default "
        "(0.57 vs 0.71, two seeds), so the default encoder was kept; lr 0.003 beat 0.01 on both (0.73 vs 0.67-0.71 "
        "on credit default, 0.64 vs 0.63 on online shoppers).",
        "Scores: 'probe' is a logistic regression fitted on the frozen embeddings and labels of the partner's "
        "own training rows (a non-private fit on the partner's own data, as a partner would use its embeddings); "
        "'head' is the partner's local label head, trained by the same DP-SGD steps, applied to the final "
        "global trunk. The 97% target is judged on the probe (the better of the two in every validation run).",
        "HGB / LogReg: sklearn defaults (LogReg: mean imputation + scaling, max_iter 1000) on the pooled "
        "featurized scalar, categorical-code and sequence columns (no text); in brackets the reference "
        "AUCs measured earlier on all rows.",
        "Target federated eps=3 >= 97% of HGB AUC (probe): "
        + ("met on every dataset" if not missed else f"missed on {', '.join(missed)}")
        + f" ({listing(ratios, '.1%')}; label head {listing(head_ratios, '.1%')}). Without noise (eps=inf) the "
        f"probe reaches {listing(inf_ratios, '.1%')} of HGB" + (f"; {'; '.join(why)}." if why else "."),
        "Target small-partner gain >= +0.03 AUC: probe "
        + ("met on every dataset" if not missed_gain else f"missed on {', '.join(missed_gain)}")
        + f" (gains {listing(gains, '+.3f')}); label head gains {listing(head_gains, '+.3f')}. Alone, the small "
        "partner's DP model is mostly noise (its noise is planned for 400 rows), but its probe is a non-private "
        "logistic fit on its own 400 rows and recovers much of the signal even from those embeddings; the DP-"
        "trained head has no such help, so it shows what the federation's trunk gives the small partner.",
    ]


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
    alone = [_scores(_federate([p], epsilon=3.0, rounds=rounds)[0], p, test) for p in parts]
    out["parameters"] = sum(p.numel() for p in PersonaEncoder(parts[0].layout, MODEL).parameters())
    out["alone_eps3"] = {s: float(np.mean([a[s] for a in alone[:PARTNERS]])) for s in SCORES}
    out["alone_eps3_per_partner"] = alone
    out["federated"] = {s: {} for s in SCORES}
    out["federated_per_partner"] = {}
    out["train_seconds"] = {}
    for epsilon in EPSILONS:
        logger.info("%s: federated eps=%s", kind, _key(epsilon))
        began = time.perf_counter()
        models = _federate(parts, epsilon=epsilon, rounds=rounds)
        out["train_seconds"][_key(epsilon)] = round(time.perf_counter() - began, 1)
        scores = [_scores(m, p, test) for m, p in zip(models, parts, strict=True)]
        for s in SCORES:
            out["federated"][s][_key(epsilon)] = float(np.mean([a[s] for a in scores[:PARTNERS]]))
        out["federated_per_partner"][_key(epsilon)] = scores
    out["small"] = {
        s: {"alone_eps3": alone[-1][s], "federated_eps3": out["federated_per_partner"]["3"][-1][s]} for s in SCORES
    }
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
    """FedAvg over ``parts`` (one partner: training alone), all in one adapter slot; returns
    each partner's final model (global trunk and adapter, its own heads)."""
    slots = ["benchmark:slot"] * len(parts)
    return federate(
        parts, slots=slots, model=MODEL, training=TRAINING, epsilon=epsilon, rounds=rounds, delta=DELTA, seed=seed
    )


def _scores(model: PersonaEncoder, train: FeatureTensors, test: FeatureTensors) -> dict[str, float]:
    """Test AUC of a logistic probe fitted on the partner's own embeddings (``probe``) and of
    the partner's DP-trained label head (``head``), on the pooled test rows."""
    y_train = train.tensors["labels"][:, 0].numpy()
    y_test = test.tensors["labels"][:, 0].numpy()
    z_test = embed_all(model, test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(max_iter=300).fit(embed_all(model, train), y_train)
    with torch.no_grad():
        head = model.label_logits(torch.from_numpy(z_test))[:, 0].numpy()
    return {
        "probe": float(roc_auc_score(y_test, probe.decision_function(z_test))),
        "head": float(roc_auc_score(y_test, head)),
    }
