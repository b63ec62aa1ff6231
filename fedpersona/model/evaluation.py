"""Evaluation of the global model at a partner, on the partner's held-out rows.

All metrics are computed locally. They leave the partner only if its configuration says
``share_eval_metrics = true`` (the simulation's default, where one owner plays every partner);
they are not differentially private and the release manifest says so.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from fedpersona.data.features import FeatureTensors
from fedpersona.model.encoder import PersonaEncoder, random_keep, token_presence

__all__ = ["embed_all", "evaluate"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def embed_all(model: PersonaEncoder, data: FeatureTensors, *, batch_size: int = 8192) -> np.ndarray:
    """Unit-norm persona embeddings of every row, shape (n, embed_dim)."""
    model.eval()
    out = []
    n = len(data)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size), device=data.tensors["scalar"].device)
        out.append(model.embed(data.batch(index)).cpu().numpy())
    if not out:
        return np.zeros((0, model.config.embed_dim), dtype=np.float32)
    return np.concatenate(out)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    known = ~np.isnan(y)
    if known.sum() < 2 or len(np.unique(y[known])) < 2:
        return math.nan
    return float(roc_auc_score(y[known], score[known]))


@torch.no_grad()
def evaluate(
    *,
    model: PersonaEncoder,
    train: FeatureTensors,
    test: FeatureTensors,
    personas: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Label AUC, linear-probe AUC, masked reconstruction error and (synthetic) ARI.

    - ``label_auc``: the local label head on the test rows (first label).
    - ``probe_auc``: a logistic regression fitted on frozen train embeddings, scored on test.
    - ``reconstruction_error``: mean loss on test features hidden with a fixed-seed mask.
    - ``ari``: k-means on the test embeddings against the ground-truth personas.
    """
    model.eval()
    metrics: dict[str, float] = {}
    z_test = embed_all(model, test)
    index = torch.arange(len(test), device=test.tensors["scalar"].device)
    batch = test.batch(index)
    gen = torch.Generator().manual_seed(seed)
    keep = random_keep(token_presence(test.layout, batch), model.config.mask_rate, gen)
    metrics["reconstruction_error"] = float(model.reconstruction_error(batch, keep).mean())
    if test.layout.label_names:
        y_test = test.tensors["labels"][:, 0].cpu().numpy().astype(np.float64)
        logits = model.label_logits(torch.from_numpy(z_test).to(index.device))[:, 0]
        metrics["label_auc"] = _auc(y_test, logits.cpu().numpy())
        z_train = embed_all(model, train)
        y_train = train.tensors["labels"][:, 0].cpu().numpy().astype(np.float64)
        known = ~np.isnan(y_train)
        if known.sum() >= 2 and len(np.unique(y_train[known])) == 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                probe = LogisticRegression(max_iter=300).fit(z_train[known], y_train[known])
            metrics["probe_auc"] = _auc(y_test, probe.decision_function(z_test))
        else:
            metrics["probe_auc"] = math.nan
    if personas is not None and len(personas) == len(test):
        k = len(np.unique(personas))
        if k >= 2 and len(test) > k:
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z_test)
            metrics["ari"] = float(adjusted_rand_score(personas, labels))
    return metrics
