"""Evaluation of the global model at a partner, on the partner's held-out rows.

All metrics are computed locally. They leave the partner only if its configuration says
``share_eval_metrics = true`` (the simulation's default, where one owner plays every partner);
they are not differentially private and the release manifest says so.

**The honest baseline** (``baseline=True``, the final evaluation): what the partner gets alone
from its own columns beside what it gets with the federation, both on its held-out rows:

- ``alone_auc``: its own best of logistic regression and gradient boosting on its own columns
  (chosen by cross-validation on its training rows: the folds of the local model's choice
  below, so the own models are cross-validated once), refitted on all its training rows;
- ``local_auc``: its local model with the federation (:func:`fedpersona.model.stacking.fit_local_model`:
  the federated score, blends and stacks of it with its own columns, and its own models, chosen
  fed-first by cross-validation and audited on held-back rows; a federated score that shows no
  signal there is replaced by the partner's own model, so the federation never makes a
  partner's served score worse than what cross-validation says it can do alone);
- ``alone_ari`` (synthetic tables): k-means on its own standardised columns against the ground
  truth, beside ``ari`` of the federated embedding.

"Own columns" are the featurized table: numbers (missing as 0 with a presence flag for the
linear model, NaN for the trees) and categorical codes (one-hot for the linear model, codes
for the trees). These models are fitted on the partner's own rows, inside the partner, and are
not DP: nothing of them leaves the partner, only the three aggregate metrics above, and only
as opt-in evaluation metrics (see :mod:`fedpersona.model.alone`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from fedpersona.data.features import FeatureTensors
from fedpersona.model.alone import draw_seed, fit_linear, fit_trees, own_personas
from fedpersona.model.encoder import PersonaEncoder, random_keep, token_presence
from fedpersona.model.linear import LabelModel
from fedpersona.model.stacking import detect_signal, fit_local_model

__all__ = ["embed_all", "evaluate", "own_columns"]

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
    model: PersonaEncoder | LabelModel,
    train: FeatureTensors,
    test: FeatureTensors,
    personas: np.ndarray | None = None,
    seed: int = 0,
    baseline: bool = False,
) -> dict[str, float]:
    """Label AUC, linear-probe AUC, masked reconstruction error and (synthetic) ARI.

    - ``label_auc``: the local label head on the test rows (first label).
    - ``probe_auc``: a logistic regression fitted on frozen train embeddings, scored on test.
    - ``reconstruction_error``: mean loss on test features hidden with a fixed-seed mask.
    - ``ari``: k-means on the test embeddings against the ground-truth personas.
    - with ``baseline``: ``alone_auc``, ``local_auc`` and ``alone_ari`` (module docstring).

    For the label model (:mod:`fedpersona.model.linear`) only ``label_auc`` (the mean of the two
    halves on the test rows; NaN, with ``label_signal`` 0, when its out-of-sample score on the
    partner's training rows shows no signal) and the baseline's metrics: it has no embedding (the personas come
    from the persona protocol and are scored there).
    """
    model.eval()
    if isinstance(model, LabelModel):
        return _evaluate_label_model(model, train, test, personas=personas, seed=seed, baseline=baseline)
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
            if baseline:
                own = own_personas(x=own_columns(test)[0], k=k, generator=np.random.default_rng(seed))
                metrics["alone_ari"] = float(adjusted_rand_score(personas, own))
    if baseline and test.layout.label_names:
        metrics.update(_label_baseline(model, train, test, seed))
    return metrics


def _evaluate_label_model(
    model: LabelModel,
    train: FeatureTensors,
    test: FeatureTensors,
    *,
    personas: np.ndarray | None,
    seed: int,
    baseline: bool,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if test.layout.label_names:
        y_test = test.tensors["labels"][:, 0].cpu().numpy().astype(np.float64)
        y_train = train.tensors["labels"][:, 0].cpu().numpy().astype(np.float64)
        fed_train, fed_test = _all_rows(model.out_of_sample_logits, train), _all_rows(model.logits, test)
        # A score that shows no signal on the partner's own rows (the out-of-sample halves, the
        # detector of fedpersona.model.stacking) says so, rather than report a chance-level AUC.
        detection = detect_signal(y=y_train, score=fed_train)
        metrics["label_signal"] = float(detection.signal)
        metrics["label_auc"] = _auc(y_test, fed_test) if detection.signal else math.nan
        if baseline:
            metrics.update(_stacked_baseline(train, test, fed_train=fed_train, fed_test=fed_test, seed=seed))
    if baseline and personas is not None and len(personas) == len(test):
        k = len(np.unique(personas))
        if k >= 2 and len(test) > k:
            own = own_personas(x=own_columns(test)[0], k=k, generator=np.random.default_rng(seed))
            metrics["alone_ari"] = float(adjusted_rand_score(personas, own))
    return metrics


def _all_rows(score: Callable[[dict[str, torch.Tensor]], torch.Tensor], data: FeatureTensors) -> np.ndarray:
    """The first label's logit of every row of ``data``, in blocks."""
    out = []
    for start in range(0, len(data), 65_536):
        index = torch.arange(start, min(len(data), start + 65_536), device=data.tensors["scalar"].device)
        out.append(score(data.batch(index))[:, 0].cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def own_columns(data: FeatureTensors) -> tuple[np.ndarray, np.ndarray]:
    """The partner's own columns as ``(x_enc, x_raw)``: every feature of its schema.

    ``x_enc`` (linear models, k-means): numbers and every step of a numeric sequence in [0, 1]
    with missing as 0 and a presence flag each; a one-hot block per categorical column and per
    step of a categorical sequence; a text as the counts of its hashed words folded to at most
    64 columns. ``x_raw`` (trees): the same numbers with NaN for missing, categorical codes as
    numbers (NaN for missing), the same text counts.
    """
    t = {k: v.cpu().numpy() for k, v in data.tensors.items()}
    layout = data.layout
    present = t["scalar_present"].astype(bool)
    raw = [np.where(present, t["scalar"], np.nan).astype(np.float64)]
    enc = [np.where(present, t["scalar"], 0.0).astype(np.float64), present.astype(np.float64)]

    def one_hot(codes: np.ndarray, here: np.ndarray, size: int) -> None:
        here = here & (codes >= 0) & (codes < size)
        block = np.zeros((len(codes), size))
        block[np.flatnonzero(here), codes[here]] = 1.0
        enc.append(block)
        raw.append(np.where(here, codes, np.nan).astype(np.float64)[:, None])

    for j, (offset, size) in enumerate(zip(layout.cat_offsets, layout.cat_cardinalities, strict=True)):
        one_hot(t["cat"][:, j] - offset, t["cat_present"][:, j].astype(bool), size)
    for i in range(len(layout.text_names)):
        ids = t[f"text{i}"]
        width = min(64, layout.text_buckets[i])
        counts = np.zeros((len(ids), width))
        rows, cols = np.nonzero(ids > 0)
        np.add.at(counts, (rows, ids[rows, cols] % width), 1.0)
        enc.append(counts)
        raw.append(counts)
    for i in range(len(layout.seq_num_names)):
        values, here = t[f"seqnum{i}"].astype(np.float64), t[f"seqnum{i}_present"].astype(bool)
        enc += [np.where(here, values, 0.0), here.astype(np.float64)]
        raw.append(np.where(here, values, np.nan))
    for i, size in enumerate(layout.seq_cat_cardinalities):
        codes, here = t[f"seqcat{i}"], t[f"seqcat{i}_present"].astype(bool)
        for step in range(codes.shape[1]):
            one_hot(codes[:, step] - step * size, here[:, step], size)
    return np.concatenate(enc, axis=1), np.concatenate(raw, axis=1)


def _label_baseline(model: PersonaEncoder, train: FeatureTensors, test: FeatureTensors, seed: int) -> dict[str, float]:
    """``alone_auc`` and ``local_auc`` on the test rows, the encoder's head as the federated score."""
    device = train.tensors["scalar"].device

    def fed(data: FeatureTensors) -> np.ndarray:
        z = torch.from_numpy(embed_all(model, data)).to(device)
        with torch.no_grad():
            return model.label_logits(z)[:, 0].cpu().numpy().astype(np.float64)

    return _stacked_baseline(train, test, fed_train=fed(train), fed_test=fed(test), seed=seed)


def _stacked_baseline(
    train: FeatureTensors, test: FeatureTensors, *, fed_train: np.ndarray, fed_test: np.ndarray, seed: int
) -> dict[str, float]:
    """``alone_auc`` and ``local_auc`` on the test rows (module docstring), from the federated
    score of every training row (out of sample where the model allows) and of every test row."""
    y_train = train.tensors["labels"][:, 0].cpu().numpy().astype(np.float64)
    y_test = test.tensors["labels"][:, 0].cpu().numpy().astype(np.float64)
    known = ~np.isnan(y_train)
    positives = int(np.nansum(y_train))
    if min(positives, int(known.sum()) - positives) < 10:
        return {}  # too few labelled rows of a class for cross-validation
    enc_train, raw_train = own_columns(train)
    enc_test, raw_test = own_columns(test)
    generator = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        local = fit_local_model(x_enc=enc_train, x_raw=raw_train, fed_logit=fed_train, y=y_train, generator=generator)
        # The partner's own best (LR or HGB, as cross-validated on the same folds inside the
        # local model's choice), refitted on all its labelled training rows.
        best = local.report.own_best
        if best == "own_lr":
            alone = fit_linear(enc_train[known], y_train[known].astype(np.int64)).score(enc_test)
        elif best == "own_hgb":
            trees = fit_trees(raw_train[known], y_train[known].astype(np.int64), seed=draw_seed(generator))
            alone = trees.score(raw_test)
        else:
            return {}
    return {
        "alone_auc": _auc(y_test, alone),
        "local_auc": _auc(y_test, local.predict(x_enc=enc_test, x_raw=raw_test, fed_logit=fed_test)),
    }
