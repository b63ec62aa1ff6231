"""What a partner gets alone, from its own rows: its own label models and its own personas.

Every utility and persona result of the federation is shown beside this baseline (the
partner-alone baseline of the design). Inputs are arrays, one row per user; how they were made
is the caller's business:

- ``x_enc`` (n, d): a numeric matrix without missing values (e.g. the public encoding);
- ``x_raw`` (n, r): the partner's columns as numbers, NaN where a value is missing;
- ``y`` (n,): the label, 0 or 1, NaN for an unlabelled row (unlabelled rows are left out).

**Own label models.** :func:`fit_own_models` fits a logistic regression (C = 0.1, on the
standardised ``x_enc``) and a histogram gradient-boosting classifier (scikit-learn's defaults,
on ``x_raw``), estimates each one's AUC by cross-validation on the partner's rows
(:func:`cv_plan`: 5-fold; 3-fold above 10,000 rows; 3 repeats of 5-fold at 1,000 rows or
fewer), picks the better one ("own best") and refits it on all rows. The fitted models are
kept as plain arrays (:class:`LinearScorer`, :class:`TreeScorer`) that score without
scikit-learn, so a saved model gives the same numbers after loading, whatever the installed
scikit-learn.

**Statistics of a score on the partner's rows**: :func:`auc`, the DeLong covariance of
several AUCs (:func:`delong`, :func:`delong_difference`) and the one-sided Mann-Whitney U test
(:func:`mann_whitney_greater`), used by the choice of the own best here and by the local
model's selection and "cannot learn" detector (:mod:`fedpersona.model.stacking`).

**Own personas.** :func:`own_personas` clusters the partner's rows by k-means on a given
matrix (standardised), for an adjusted Rand index against ground truth or against the
federated personas.

**Privacy: what may leave the silo.** Nothing here is differentially private, and nothing
needs to be: everything is fitted on the partner's own rows, inside the partner, and no
function here sends anything. This is what the partner could do without the federation at
all. Nothing of the own models ever leaves the partner: no coefficient, tree, score,
prediction or persona assignment. The only things that may leave are aggregate evaluation
metrics (e.g. a cross-validated AUC over the partner's rows), and only as opt-in metrics: keys
the release manifest (:mod:`fedpersona.privacy.manifest`) declares ``opt-in`` ("NOT DP"),
sent only when the partner sets ``release.share_eval_metrics = true``; the ClientApp refuses
any other key. An auditor would call it a leak if anything else from here reached the
coordinator, or if such a metric were sent without that switch. The randomness (folds,
k-means starts, the boosting's validation split) is an ordinary injected generator: no DP
release depends on it, so it need not be secret.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import sklearn
from scipy.stats import norm, rankdata
from sklearn.cluster import KMeans
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from fedpersona.errors import ConfigError, DataError

__all__ = [
    "OWN_CANDIDATES",
    "OWN_LR_C",
    "CvPlan",
    "LinearScorer",
    "OwnCrossFit",
    "OwnModels",
    "Splits",
    "TreeScorer",
    "auc",
    "check_inputs",
    "columns",
    "cross_fit_own",
    "cv_plan",
    "cv_splits",
    "delong",
    "delong_difference",
    "draw_seed",
    "fit_linear",
    "fit_own_models",
    "fit_trees",
    "known_scores",
    "mann_whitney_greater",
    "own_personas",
]

logger = logging.getLogger(__name__)

OWN_CANDIDATES = ("own_lr", "own_hgb")
OWN_LR_C = 0.1  # L2 strength of the own logistic regression (scikit-learn's C)
_MAX_ITER = 2000
_CHUNK = 65536  # rows scored at once by a TreeScorer
_EXACT_LIMIT = 10**7  # exact Mann-Whitney distribution up to this many (positive, negative) pairs

_DTYPES: dict[type, type] = {bool: np.bool_, float: np.float64, int: np.int64}
_TREE_ARRAYS = ("roots", "feature", "threshold", "missing_left", "left", "right", "is_leaf", "value")
Splits = tuple[tuple[tuple[np.ndarray, np.ndarray], ...], ...]  # per repeat, per fold: (fit rows, held-out rows)


# ----------------------------------------------------------------------------- fitted scorers
@dataclass(frozen=True, eq=False)
class LinearScorer:
    """A standardised linear score: ``((x - mean) / scale) @ coef + intercept``, shape (n,).

    Arrays are float64 of shape (d,); ``scale`` is positive (a constant column has scale 1).
    """

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    coef: np.ndarray  # (d,)
    intercept: float

    def __post_init__(self) -> None:
        arrays = [np.asarray(getattr(self, n), dtype=np.float64) for n in ("mean", "scale", "coef")]
        if any(a.ndim != 1 or len(a) != len(arrays[0]) or not np.isfinite(a).all() for a in arrays) or not (
            (arrays[1] > 0).all() and math.isfinite(self.intercept)
        ):
            raise DataError("LinearScorer: mean, scale, coef must be finite 1-D arrays of one length, scale > 0")
        for name, value in zip(("mean", "scale", "coef"), arrays, strict=True):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "intercept", float(self.intercept))

    @property
    def n_features(self) -> int:
        return len(self.coef)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale  # (n, d)

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.standardise(x) @ self.coef + self.intercept  # (n,)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": np.array([self.intercept])}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LinearScorer:
        return cls(
            mean=arrays["mean"], scale=arrays["scale"], coef=arrays["coef"], intercept=float(arrays["intercept"][0])
        )


@dataclass(frozen=True, eq=False)
class TreeScorer:
    """A boosted tree ensemble's raw score (the log-odds): ``baseline + sum of one leaf per tree``.

    The nodes of all trees are stored in flat arrays of one length (tree ``t`` starts at
    ``roots[t]``; ``left`` and ``right`` are absolute node indices). A row goes left where
    ``x[feature] <= threshold``, and where the value is NaN it goes left iff ``missing_left``,
    which is how scikit-learn's histogram gradient boosting scores raw rows.
    """

    baseline: float
    roots: np.ndarray  # (trees,) int64
    feature: np.ndarray  # (nodes,) int64
    threshold: np.ndarray  # (nodes,) float64
    missing_left: np.ndarray  # (nodes,) bool
    left: np.ndarray  # (nodes,) int64
    right: np.ndarray  # (nodes,) int64
    is_leaf: np.ndarray  # (nodes,) bool
    value: np.ndarray  # (nodes,) float64
    n_features: int

    def __post_init__(self) -> None:
        for name in _TREE_ARRAYS:
            kind = bool if name in ("missing_left", "is_leaf") else float if name in ("threshold", "value") else int
            object.__setattr__(self, name, np.asarray(getattr(self, name)).astype(_DTYPES[kind]))
        nodes, inner = len(self.feature), ~self.is_leaf
        index = np.arange(nodes)
        if (
            any(getattr(self, n).ndim != 1 or len(getattr(self, n)) != nodes for n in _TREE_ARRAYS[1:])
            or self.roots.ndim != 1
            or not math.isfinite(self.baseline)
            or self.n_features < 1
            or ((self.roots < 0) | (self.roots >= max(nodes, 1))).any()
            or (
                inner & ((self.left <= index) | (self.right <= index) | (self.left >= nodes) | (self.right >= nodes))
            ).any()
            or (inner & ((self.feature < 0) | (self.feature >= self.n_features))).any()
            or not np.isfinite(self.value[self.is_leaf]).all()
        ):
            raise DataError("TreeScorer: the node arrays are inconsistent (shapes, a child before its parent, range)")
        object.__setattr__(self, "baseline", float(self.baseline))
        object.__setattr__(self, "n_features", int(self.n_features))

    def score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        out = np.empty(len(x))
        for start in range(0, len(x), _CHUNK):
            out[start : start + _CHUNK] = self._score_rows(x[start : start + _CHUNK])
        return out  # (n,)

    def _score_rows(self, x: np.ndarray) -> np.ndarray:
        rows = np.arange(len(x))[:, None]
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()  # (n, trees)
        while True:
            inner = ~self.is_leaf[node]
            if not inner.any():
                break
            values = x[rows, self.feature[node]]
            go_left = np.where(np.isnan(values), self.missing_left[node], values <= self.threshold[node])
            node = np.where(inner, np.where(go_left, self.left[node], self.right[node]), node)
        raw = np.full(len(x), self.baseline)
        for leaf in self.value[node].T:  # tree by tree, in the ensemble's order
            raw += leaf
        return raw

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {n: getattr(self, n) for n in _TREE_ARRAYS}
        return out | {"baseline": np.array([self.baseline]), "n_features": np.array([self.n_features])}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TreeScorer:
        roots, feature, threshold, missing_left, left, right, is_leaf, value = (arrays[n] for n in _TREE_ARRAYS)
        baseline, n_features = float(arrays["baseline"][0]), int(arrays["n_features"][0])
        return cls(baseline, roots, feature, threshold, missing_left, left, right, is_leaf, value, n_features)


Scorer = LinearScorer | TreeScorer


def fit_linear(x: np.ndarray, y: np.ndarray, *, weights: np.ndarray | None = None) -> LinearScorer:
    """Logistic regression (C = 0.1) on ``x`` standardised by its own mean and sd.

    ``weights`` (d,), optional, multiply the standardised columns: a column of weight 10 enters ten
    times larger, so its coefficient is penalised about 100 times less.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    scale = np.where(sd > 0, sd, 1.0)
    if weights is not None:
        scale = scale / weights
    z = (x - mean) / scale
    model = LogisticRegression(C=OWN_LR_C, max_iter=_MAX_ITER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(z, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("logistic regression did not converge in %d iterations; using its last iterate", _MAX_ITER)
    return LinearScorer(mean=mean, scale=scale, coef=model.coef_[0], intercept=float(model.intercept_[0]))


def fit_trees(x: np.ndarray, y: np.ndarray, *, seed: int) -> TreeScorer:
    """scikit-learn's HistGradientBoostingClassifier with its defaults, kept as a :class:`TreeScorer`.

    ``seed`` is its random_state (only used when it early-stops, above 10,000 rows). The trees
    are read from the fitted estimator's node arrays, and the copy is checked against the
    estimator's own ``decision_function`` on the fitting rows.
    """
    x = np.asarray(x, dtype=np.float64)
    model = HistGradientBoostingClassifier(random_state=seed).fit(x, y)
    trees = [iteration[0].nodes for iteration in model._predictors]  # binary: one tree per iteration
    if any(nodes["is_categorical"].any() for nodes in trees):  # cannot happen without categorical_features
        raise DataError("own gradient boosting: categorical splits are not supported")
    roots = np.cumsum([0, *[len(t) for t in trees[:-1]]]).astype(np.int64)
    nodes = np.concatenate(trees)
    offsets = np.repeat(roots, [len(t) for t in trees])  # each node's tree start, to make children absolute
    scorer = TreeScorer(
        baseline=float(model._baseline_prediction.ravel()[0]),
        roots=roots,
        feature=nodes["feature_idx"],
        threshold=nodes["num_threshold"],
        missing_left=nodes["missing_go_to_left"].astype(bool),
        left=nodes["left"].astype(np.int64) + offsets,
        right=nodes["right"].astype(np.int64) + offsets,
        is_leaf=nodes["is_leaf"].astype(bool),
        value=nodes["value"],
        n_features=x.shape[1],
    )
    if not np.allclose(scorer.score(x), model.decision_function(x), rtol=1e-9, atol=1e-9):
        raise RuntimeError(
            f"scikit-learn {sklearn.__version__} stores its boosted trees differently than TreeScorer reads them"
        )
    return scorer


# ----------------------------------------------------------------------------- input checks
def check_inputs(
    *,
    y: np.ndarray,
    x_enc: np.ndarray | None = None,
    x_raw: np.ndarray | None = None,
    fed_logit: np.ndarray | None = None,
    require_labels: bool = True,
    score_name: str = "fed_logit",
) -> np.ndarray:
    """Validate the arrays together and return the labels as float64 (0, 1, NaN).

    Every problem is listed in one :class:`~fedpersona.errors.DataError`: arrays of other
    lengths than ``y``, wrong dimensions, labels other than 0, 1 or NaN, missing or infinite
    values where none may be, and (``require_labels``) labelled rows of a single class.
    """
    problems: list[str] = []
    y_arr = np.asarray(y)
    if y_arr.ndim != 1:
        raise DataError(f"y: the label must be a 1-D array (one value per row), got shape {y_arr.shape}")
    try:
        labels = y_arr.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"y: labels must be 0, 1 or NaN (unlabelled), got values of type {y_arr.dtype}") from None
    n = len(labels)
    bad = ~(np.isnan(labels) | (labels == 0) | (labels == 1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        problems.append(
            f"y: labels must be 0, 1 or NaN (unlabelled); {int(bad.sum())} row(s) are not, the first is row {first} "
            f"with {y_arr[first].item()!r}"
        )
    for name, arr, ndim, nan_ok in (
        ("x_enc", x_enc, 2, False),
        ("x_raw", x_raw, 2, True),
        (score_name, fed_logit, 1, False),
    ):
        if arr is None:
            continue
        a = np.asarray(arr)
        if a.ndim != ndim:
            problems.append(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
            continue
        if len(a) != n:
            problems.append(f"{name}: has {len(a)} rows but y has {n}; they must describe the same users in one order")
        if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
            problems.append(f"{name}: expected numbers, got values of type {a.dtype}")
            continue
        values = a.astype(np.float64)
        if ndim == 2 and a.shape[1] == 0:
            problems.append(f"{name}: has no columns")
        if np.isinf(values).any():
            problems.append(f"{name}: {int(np.isinf(values).sum())} infinite value(s); use finite numbers")
        if not nan_ok and np.isnan(values).any():
            at = tuple(int(i) for i in np.argwhere(np.isnan(values))[0])
            problems.append(
                f"{name}: {int(np.isnan(values).sum())} missing value(s) (NaN), the first at {at}; {name} must be "
                "complete" + (" (columns with missing values belong in x_raw)" if name == "x_enc" else "")
            )
    if require_labels and not bad.any():
        known = labels[~np.isnan(labels)]
        positives, negatives = int((known == 1).sum()), int((known == 0).sum())
        if positives == 0 or negatives == 0:
            problems.append(
                f"y: the labelled rows hold a single class ({positives} positive, {negatives} negative, "
                f"{n - len(known)} unlabelled); a label model needs both 0 and 1"
            )
    if problems:
        raise DataError("The partner's arrays cannot be used: " + "; ".join(problems) + ".")
    return labels


# ----------------------------------------------------------------------------- cross-validation
@dataclass(frozen=True)
class CvPlan:
    """How many folds and repeats a partner's cross-validation uses."""

    folds: int
    repeats: int

    def __post_init__(self) -> None:
        if self.folds < 2 or self.repeats < 1:
            raise ConfigError(f"a CV plan needs folds >= 2 and repeats >= 1, got {self.folds} and {self.repeats}")


def cv_plan(*, rows: int, minority: int) -> CvPlan:
    """5-fold; 3-fold above 10,000 rows; 3 repeats of 5-fold at 1,000 rows or fewer.

    Folds are stratified, so there are never more folds than rows of the smaller class
    (``minority``, at least 2).
    """
    if minority < 2:
        raise DataError(
            f"cross-validation needs at least 2 rows of each class, got {minority} of the smaller class in {rows} rows"
        )
    folds = 3 if rows > 10_000 else 5
    return CvPlan(folds=max(2, min(folds, minority)), repeats=3 if rows <= 1_000 else 1)


def cv_splits(*, y: np.ndarray, plan: CvPlan, generator: np.random.Generator) -> Splits:
    """Stratified folds over the rows of ``y`` (0/1), one set per repeat, shuffled by ``generator``."""
    out = []
    for _ in range(plan.repeats):
        folds = StratifiedKFold(plan.folds, shuffle=True, random_state=draw_seed(generator))
        out.append(tuple((a, b) for a, b in folds.split(np.zeros(len(y)), y)))
    return tuple(out)


def known_scores(*, y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows' labels (int64 0/1) and scores (float64), after checking both arrays."""
    labels = check_inputs(y=y, fed_logit=score, require_labels=False, score_name="score")
    known = ~np.isnan(labels)
    return labels[known].astype(np.int64), np.asarray(score, dtype=np.float64)[known]


def auc(*, y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for labels ``y`` (0/1), ties counted one half."""
    y = np.asarray(y)
    positives = y == 1
    m, n = int(positives.sum()), int(len(y) - positives.sum())
    if m == 0 or n == 0:
        raise DataError(f"an AUC needs both classes, got {m} positive and {n} negative rows")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[positives].sum() - m * (m + 1) / 2) / (m * n))


def delong(*, y: np.ndarray, scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several scores on the same rows and their DeLong covariance matrix.

    DeLong, DeLong & Clarke-Pearson (1988), computed from midranks as in Sun & Xu (2014).
    ``y`` is 0/1; returns the AUCs (k,) and their covariance (k, k). Needs 2 rows of each class.
    """
    y = np.asarray(y)
    positives = y == 1
    m, n = int(positives.sum()), int(len(y) - positives.sum())
    if m < 2 or n < 2:
        raise DataError(f"a DeLong variance needs at least 2 rows of each class, got {m} positive and {n} negative")
    aucs, v10, v01 = [], [], []
    for score in scores:
        s = np.asarray(score, dtype=np.float64)
        pos, neg = s[positives], s[~positives]
        tz = rankdata(np.concatenate([pos, neg]))
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - rankdata(pos)) / n)  # per positive: share of negatives below it (ties 1/2)
        v01.append(1.0 - (tz[m:] - rankdata(neg)) / m)  # per negative: share of positives above it
    cov = np.atleast_2d(np.cov(np.array(v10))) / m + np.atleast_2d(np.cov(np.array(v01))) / n
    return np.array(aucs), cov


def delong_difference(*, y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> tuple[float, float]:
    """``AUC(a) - AUC(b)`` on the same rows and its paired DeLong standard error."""
    aucs, cov = delong(y=y, scores=[score_a, score_b])
    variance = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    return float(aucs[0] - aucs[1]), math.sqrt(max(float(variance), 0.0))


def mann_whitney_greater(*, y: np.ndarray, score: np.ndarray) -> float:
    """One-sided p-value of the Mann-Whitney U test that positives score higher (AUC > 0.5).

    As scipy's ``mannwhitneyu(..., alternative="greater")`` with its default method: the exact
    null distribution when a class has at most 8 rows and no score is tied (and at most
    10 million pairs), else the normal approximation with tie and continuity corrections.
    NaN labels are left out.
    """
    labels, s = known_scores(y=y, score=score)
    positives = labels == 1
    m, n = int(positives.sum()), int(len(labels) - positives.sum())
    if m == 0 or n == 0:
        raise DataError(f"a Mann-Whitney test needs both classes, got {m} positive and {n} negative rows")
    ranks = rankdata(s)
    u = float(ranks[positives].sum() - m * (m + 1) / 2)
    _, counts = np.unique(s, return_counts=True)
    tied = bool((counts > 1).any())
    if min(m, n) <= 8 and not tied and m * n <= _EXACT_LIMIT:
        return _exact_sf(round(u), m, n)
    big = m + n
    ties = float((counts.astype(np.float64) ** 3 - counts).sum())
    sd = math.sqrt(m * n / 12.0 * ((big + 1) - ties / (big * (big - 1))))
    if sd == 0.0:  # every score equal: no evidence at all
        return 1.0
    return float(norm.sf((u - m * n / 2.0 - 0.5) / sd))


def _exact_sf(u: int, m: int, n: int) -> float:
    """P(U >= u) under the null, from the lower tail of U's distribution (which is symmetric)."""
    if u <= 0:
        return 1.0
    if u > m * n:
        return 0.0
    total = float(math.comb(m + n, m))
    if 2 * u > m * n:
        return _lower_cdf(m * n - u, m, n) / total
    return 1.0 - _lower_cdf(u - 1, m, n) / total


def _lower_cdf(top: int, m: int, n: int) -> float:
    """Number of arrangements with U <= ``top``: the coefficients of the Gaussian binomial
    [m+n choose m]_q = prod_i (1 - q^(n+i)) / (1 - q^i), built factor by factor (each partial
    product is itself a polynomial with nonnegative coefficients) up to degree ``top``."""
    small, large = min(m, n), max(m, n)
    c = np.zeros(top + 1)
    c[0] = 1.0
    for i in range(1, small + 1):
        for r in range(min(i, top + 1)):  # divide by (1 - q^i): a running sum with stride i
            c[r::i] = np.cumsum(c[r::i])
        k = large + i
        if k <= top:  # multiply by (1 - q^k)
            c[k:] = c[k:] - c[: top + 1 - k]
    return float(c.sum())


@dataclass(frozen=True, eq=False)
class OwnCrossFit:
    """The own models' out-of-fold scores on the partner's labelled rows.

    ``oof[name]`` (n,) averages each row's held-out score over the repeats. ``fold_scores[name]``
    holds, per fold in ``splits`` order (repeat by repeat), the fold model's scores on its fit
    rows and on its held-out rows, for candidates built on the own model (blends).
    """

    oof: Mapping[str, np.ndarray]
    fold_scores: Mapping[str, tuple[tuple[np.ndarray, np.ndarray], ...]]


def cross_fit_own(*, x_enc: np.ndarray, x_raw: np.ndarray, y: np.ndarray, splits: Splits, seed: int) -> OwnCrossFit:
    """Cross-validate own LR (on ``x_enc``) and own HGB (on ``x_raw``) over ``splits``; ``y`` is 0/1."""
    n = len(y)
    oof = {name: np.zeros(n) for name in OWN_CANDIDATES}
    folds: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in OWN_CANDIDATES}
    for repeat in splits:
        for fit_rows, held in repeat:
            lr = fit_linear(x_enc[fit_rows], y[fit_rows])
            hgb = fit_trees(x_raw[fit_rows], y[fit_rows], seed=seed)
            for name, model, x in (("own_lr", lr, x_enc), ("own_hgb", hgb, x_raw)):
                held_scores = model.score(x[held])
                oof[name][held] += held_scores / len(splits)
                folds[name].append((model.score(x[fit_rows]), held_scores))
    return OwnCrossFit(
        oof=MappingProxyType(oof),
        fold_scores=MappingProxyType({k: tuple(v) for k, v in folds.items()}),
    )


# ----------------------------------------------------------------------------- own label models
@dataclass(frozen=True, eq=False)
class OwnModels:
    """The partner's own best label model and how it was chosen.

    ``cv_auc`` holds each candidate's cross-validated AUC on the partner's rows; ``best`` is the
    higher (``own_lr`` on a tie) and ``model`` is it refitted on all labelled rows. The model
    never leaves the partner; the AUCs only as opt-in evaluation metrics (module docstring).
    """

    cv_auc: Mapping[str, float]
    best: str
    model: LinearScorer | TreeScorer
    rows: int
    plan: CvPlan

    def __post_init__(self) -> None:
        if set(self.cv_auc) != set(OWN_CANDIDATES) or self.best not in OWN_CANDIDATES:
            raise DataError(f"OwnModels: cv_auc must cover {OWN_CANDIDATES} and best be one of them, got {self.best!r}")
        expected = LinearScorer if self.best == "own_lr" else TreeScorer
        if not isinstance(self.model, expected):
            raise DataError(f"OwnModels: {self.best} must be a {expected.__name__}")
        object.__setattr__(self, "cv_auc", MappingProxyType(dict(self.cv_auc)))

    def predict(self, *, x_enc: np.ndarray | None = None, x_raw: np.ndarray | None = None) -> np.ndarray:
        """Scores (log-odds) of new rows: own LR reads ``x_enc``, own HGB reads ``x_raw``."""
        name, x = ("x_enc", x_enc) if self.best == "own_lr" else ("x_raw", x_raw)
        if x is None:
            raise DataError(f"the own best model is {self.best}, which scores from {name}; {name} was not given")
        return self.model.score(columns(name, x, self.model.n_features))


def fit_own_models(*, x_enc: np.ndarray, x_raw: np.ndarray, y: np.ndarray, generator: np.random.Generator) -> OwnModels:
    """Fit own LR and own HGB, choose the better by cross-validated AUC, refit it on all labelled rows."""
    labels = check_inputs(y=y, x_enc=x_enc, x_raw=x_raw)
    known = ~np.isnan(labels)
    xe = np.asarray(x_enc, dtype=np.float64)[known]
    xr = np.asarray(x_raw, dtype=np.float64)[known]
    yk = labels[known].astype(np.int64)
    plan = cv_plan(rows=len(yk), minority=int(min(yk.sum(), len(yk) - yk.sum())))
    seed = draw_seed(generator)
    fitted = cross_fit_own(x_enc=xe, x_raw=xr, y=yk, splits=cv_splits(y=yk, plan=plan, generator=generator), seed=seed)
    scores = {name: auc(y=yk, score=fitted.oof[name]) for name in OWN_CANDIDATES}
    best = max(OWN_CANDIDATES, key=lambda name: scores[name])  # first (own_lr) on a tie
    model: Scorer = fit_linear(xe, yk) if best == "own_lr" else fit_trees(xr, yk, seed=seed)
    return OwnModels(cv_auc=scores, best=best, model=model, rows=len(yk), plan=plan)


# ----------------------------------------------------------------------------- own personas
def own_personas(*, x: np.ndarray, k: int, generator: np.random.Generator) -> np.ndarray:
    """The partner's own personas: k-means (``k`` clusters, 10 starts) on ``x`` standardised per column.

    Returns the assignments (n,) int64 in 0..k-1, e.g. for an adjusted Rand index against the
    ground truth or against the federated personas. Nothing leaves the partner.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 2:
        raise ConfigError(f"own personas: k must be an integer >= 2, got {k!r}")
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"own personas: x must be a numeric 2-D array (rows, columns), got shape {arr.shape}")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"own personas: x has {int((~np.isfinite(values)).sum())} missing or infinite value(s)")
    if len(values) < k:
        raise DataError(f"own personas: {len(values)} rows cannot form k = {k} clusters")
    sd = values.std(axis=0)
    z = (values - values.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    model = KMeans(n_clusters=int(k), n_init=10, random_state=draw_seed(generator)).fit(z)
    return np.asarray(model.labels_, dtype=np.int64)


# ----------------------------------------------------------------------------- small pieces
def draw_seed(generator: np.random.Generator) -> int:
    """An integer seed for scikit-learn, drawn from the injected ``generator``."""
    if not isinstance(generator, np.random.Generator):
        raise ConfigError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
    return int(generator.integers(0, 2**31 - 1))


def columns(name: str, x: np.ndarray, expected: int, *, rows: int | None = None) -> np.ndarray:
    """``x`` as float64 (n, expected), checked for a model that reads it (``name`` is the argument)."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != expected or not np.issubdtype(arr.dtype, np.number):
        raise DataError(
            f"{name}: the model was fitted on {expected} numeric column(s), got an array of shape {arr.shape}"
        )
    if rows is not None and len(arr) != rows:
        raise DataError(f"{name}: has {len(arr)} rows, the other inputs have {rows}; they must describe the same users")
    values = arr.astype(np.float64)
    bad = np.isinf(values) if name == "x_raw" else ~np.isfinite(values)
    if bad.any():
        what = "infinite" if name == "x_raw" else "missing or infinite"
        raise DataError(f"{name}: {int(bad.sum())} {what} value(s); the model cannot score them")
    return values
