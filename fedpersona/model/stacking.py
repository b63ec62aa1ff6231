"""The partner's local model on top of the federation, its safeguard, and the "cannot learn" detector.

After the federated label model is final, each partner combines its score with what the
partner knows alone (its own columns) and serves the result to itself. Inputs are arrays:
``x_enc`` (n, d) complete numbers, ``x_raw`` (n, r) with NaN for missing, ``y`` (n,) 0/1/NaN,
and ``fed_logit`` (n,): the federated model's cross-fitted logit of each of the partner's rows,
i.e. from the half-model that did not train on that row, so it is out of sample on every row.
New rows are scored with the mean of the two half-models' logits, which the caller passes.

**Candidates**, all scored on the same cross-validation folds (:func:`~fedpersona.model.alone.cv_plan`):
``own_lr``, ``own_hgb`` (the partner alone); ``fed`` (the federated logit as it is);
``blendA = A·z(fed) + (1-A)·z(own best)`` for A in 0.75, 0.5, 0.25 (z standardises a score by
its mean and sd on the fitting rows; own best is the better own model by CV); ``stk_lr``, a
logistic regression (C = 0.1) on [standardised ``x_enc``, 10·z(fed)] (the factor 10 leaves the
federated logit almost unpenalised); ``stk_hgb``, gradient boosting on [``x_raw``, fed logit].
The federated candidates enter only when the federated score itself passes the detector on
the partner's rows: a score with no detectable signal cannot help.

**Selection, the fed-first one-standard-error rule.** Take the best cross-validated AUC, then
walk ``fed, blend0.75, blend0.5, blend0.25, stk_lr, stk_hgb, own_lr, own_hgb`` and keep the
first candidate within one paired DeLong standard error of the best. The federated score was
estimated on far more rows than the partner has, so among statistically tied candidates it is
the lower-variance choice; the partner's own models win only when they are clearly better.
Alternatives were measured on validation splits of the three public primaries at epsilon 3
and 1 (``python -m benchmarks.local_selection``; ``docs/results.md``): half a standard error,
starting from an equal blend, the best cross-validated candidate, and blends with each own
model rather than the best one. Each gains on one table or budget and loses on another: the
400-row partner's share of the gap to pooled boosting (online shoppers / credit default / CDC
diabetes, epsilon 3) is 39/43/70% under this rule and 49/47/66% under the alternative that
comes closest to half on online shoppers, which loses on two tables at epsilon 1. The rule stays.

**Audit and fallback.** A stratified 20% of the labelled rows is held back; the selected
candidate is refitted on the other 80% and must pass the detector on the held-back rows at
level 2.5% / (number of candidates). If it fails, the partner serves the federated score if
that passed the detector, else its own best model if that passed its audit (level 2.5% / 2),
else "no signal": a constant score, reported as "no signal" instead of an AUC. The choice is
then refitted on all labelled rows.

**The detector** (:func:`detect_signal`): a one-sided Mann-Whitney U test of AUC > 0.5 at
2.5% on rows the score was not fitted on: the cross-fitted federated logit on all the
partner's rows (at least 5 of each class, else it cannot be tested), the audited candidates on
the held-back rows (only when the partner has at least 10 rows of each class; the held-back
fifth must then still hold 5 of each). A partner that can validate nothing (fewer than 5 rows
of a class) reports "no signal" unless its configuration opts into serving the federated
score labelled "unverified".

**Why this need not be differentially private** (what an auditor should accept). The
partner's guarantee covers what it releases to the federation: the noisy updates of the
federated model, all finished before anything here runs; the federated model they use is
already released, so using it is post-processing. Nothing of the local model ever leaves the
partner (its arrays, its candidates' scores, its predictions, the saved file) and nothing of it
feeds a later DP release. The local model is exactly as private as the own-columns model the
partner may fit anyway from the same rows (:mod:`fedpersona.model.alone`), and what the
partner does with its own predictions for its own users is governed by its own data policy.
Two conditions keep this true:

1. the aggregate evaluation metrics of :class:`LocalModelReport` (AUCs, p-values, the verdict)
   leave the partner only as opt-in metrics: keys the release manifest
   (:mod:`fedpersona.privacy.manifest`) declares ``opt-in`` ("NOT DP"), sent only when the
   partner sets ``release.share_eval_metrics = true`` (the ClientApp refuses any other key),
   or else through a DP mechanism charged to the partner's privacy ledger;
2. the federated model is never retrained on anything the stacker chose (that would be a new
   release, with its own ledger entry).

The randomness here (folds, audit split, boosting's validation split) comes from an injected
ordinary generator: no release depends on it.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from fedpersona.config.files import write_durably
from fedpersona.errors import ConfigError, DataError
from fedpersona.model.alone import (
    OWN_CANDIDATES,
    LinearScorer,
    Splits,
    TreeScorer,
    auc,
    check_inputs,
    columns,
    cross_fit_own,
    cv_plan,
    cv_splits,
    delong_difference,
    draw_seed,
    fit_linear,
    fit_trees,
    known_scores,
    mann_whitney_greater,
)

__all__ = [
    "ALPHA",
    "CANDIDATES",
    "NO_SIGNAL",
    "POLICIES",
    "Detection",
    "FittedCandidate",
    "LocalModel",
    "LocalModelReport",
    "detect_signal",
    "fed_first_choice",
    "fit_local_model",
    "load_local_model",
    "local_model_path",
    "save_local_model",
    "served_choice",
]

CANDIDATES = ("fed", "blend0.75", "blend0.5", "blend0.25", "stk_lr", "stk_hgb", "own_lr", "own_hgb")  # fed-first
BLENDS = {"blend0.75": 0.75, "blend0.5": 0.5, "blend0.25": 0.25}  # weight on z(fed)
NO_SIGNAL = "no_signal"
POLICIES = ("no_signal", "unverified_federated")  # what a partner that can validate nothing serves
VERDICTS = ("signal", "no_signal", "unverified")
ALPHA = 0.025  # one-sided level of the detector, before Bonferroni
FED_MIN_PER_CLASS = 5  # rows of each class needed to test a score
AUDIT_MIN_PER_CLASS = 10  # rows of each class a partner needs before holding any back for an audit
AUDIT_SHARE = 0.2
FED_LOGIT_WEIGHT = 10.0
_FORMAT = 1
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# ----------------------------------------------------------------------------- the detector
@dataclass(frozen=True)
class Detection:
    """The detector's verdict on one score: is its AUC significantly above 0.5?

    ``p_value`` and ``auc`` are None when the rows held fewer than ``min_per_class`` of a class
    (nothing can be told: "no signal"). Leaves the partner only as an opt-in evaluation metric
    (module docstring, condition 1).
    """

    signal: bool
    p_value: float | None
    auc: float | None
    positives: int
    negatives: int
    alpha: float
    min_per_class: int

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"the detector's alpha must be in (0, 1), got {self.alpha}")
        if self.signal and (self.p_value is None or self.p_value >= self.alpha):
            raise DataError(f"Detection: signal needs p < alpha, got p = {self.p_value}, alpha = {self.alpha}")

    def describe(self) -> str:
        rows = self.positives + self.negatives
        if self.p_value is None:
            return (
                f"no signal (cannot be tested: {self.positives} positive and {self.negatives} negative rows, "
                f"at least {self.min_per_class} of each are needed)"
            )
        if not self.signal:
            return f"no signal (AUC {self.auc:.3f} not significantly above 0.5 on {rows} rows, p = {self.p_value:.3g})"
        return f"signal (AUC {self.auc:.3f} on {rows} rows, p = {self.p_value:.3g} < {self.alpha:.3g})"


def detect_signal(
    *, y: np.ndarray, score: np.ndarray, alpha: float = ALPHA, min_per_class: int = FED_MIN_PER_CLASS
) -> Detection:
    """The "cannot learn" detector: one-sided Mann-Whitney U test of AUC > 0.5 at level ``alpha``.

    Valid only on rows ``score`` was not fitted on (held-back rows, or a cross-fitted score).
    Fewer than ``min_per_class`` rows of a class: "no signal" without a test. NaN labels are
    left out.
    """
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, int) or min_per_class < 1:
        raise ConfigError(f"the detector's min_per_class must be an integer >= 1, got {min_per_class!r}")
    labels, s = known_scores(y=y, score=score)
    m, n = int((labels == 1).sum()), int((labels == 0).sum())
    if m < min_per_class or n < min_per_class:
        return Detection(False, None, None, m, n, alpha, min_per_class)
    p = mann_whitney_greater(y=labels, score=s)
    return Detection(p < alpha, p, auc(y=labels, score=s), m, n, alpha, min_per_class)


# ----------------------------------------------------------------------------- candidates
@dataclass(frozen=True, eq=False)
class FittedCandidate:
    """One candidate fitted on some rows, kept as arrays (:meth:`score` needs no scikit-learn).

    ``model``: own_lr / own_hgb: the own model (LinearScorer on x_enc / TreeScorer on x_raw);
    blends: the own best; stk_lr: LinearScorer on [x_enc, fed]; stk_hgb: TreeScorer on
    [x_raw, fed]; None for ``fed`` and ``no_signal``. Blends standardise the federated logit by
    ``fed_center``, ``fed_spread`` and the own score by ``own_center``, ``own_spread``.
    """

    name: str
    model: LinearScorer | TreeScorer | None = None
    fed_center: float = 0.0
    fed_spread: float = 1.0
    own_center: float = 0.0
    own_spread: float = 1.0

    def __post_init__(self) -> None:
        names = (*CANDIDATES, NO_SIGNAL)
        if self.name not in names:
            raise DataError(f"unknown local model {self.name!r}; expected one of {', '.join(names)}")
        expected = {"own_lr": LinearScorer, "own_hgb": TreeScorer, "stk_lr": LinearScorer, "stk_hgb": TreeScorer}
        kinds = (LinearScorer, TreeScorer) if self.name in BLENDS else expected.get(self.name, type(None))
        spreads = (self.fed_spread, self.own_spread)
        if not isinstance(self.model, kinds):
            raise DataError(f"local model {self.name!r}: got a {type(self.model).__name__} as its fitted model")
        if not all(math.isfinite(v) for v in (self.fed_center, self.own_center, *spreads)) or min(spreads) <= 0:
            raise DataError(f"local model {self.name!r}: centres must be finite and spreads > 0")

    @property
    def needs(self) -> tuple[str, ...]:
        """The inputs it reads, of ``x_enc``, ``x_raw``, ``fed_logit``."""
        if self.name in ("fed", NO_SIGNAL):
            return ("fed_logit",) if self.name == "fed" else ()
        own = "x_enc" if isinstance(self.model, LinearScorer) else "x_raw"
        return (own,) if self.name.startswith("own_") else (own, "fed_logit")

    @property
    def width(self) -> int:
        """Columns of the own matrix it reads (0 when it reads none)."""
        if self.model is None:
            return 0
        return self.model.n_features - (1 if self.name.startswith("stk_") else 0)

    def score(self, *, x_enc: np.ndarray | None, x_raw: np.ndarray | None, fed: np.ndarray | None) -> np.ndarray:
        """Scores (n,) from checked float64 inputs (None where it does not read them)."""
        x = x_enc if "x_enc" in self.needs else x_raw
        if self.name == NO_SIGNAL or self.name == "fed":
            n = next(len(a) for a in (fed, x_enc, x_raw) if a is not None)
            return np.zeros(n) if self.name == NO_SIGNAL else np.array(fed, dtype=np.float64)
        if self.model is not None and x is not None and self.name.startswith("own_"):
            return self.model.score(x)
        if self.model is None or x is None or fed is None:
            raise DataError(f"local model {self.name!r} reads {', '.join(self.needs)}")
        if self.name.startswith("stk_"):
            return self.model.score(np.column_stack([x, fed]))
        weight, own = BLENDS[self.name], (self.model.score(x) - self.own_center) / self.own_spread
        return weight * (fed - self.fed_center) / self.fed_spread + (1.0 - weight) * own


def _centre(s: np.ndarray) -> tuple[float, float]:
    sd = float(s.std())
    return float(s.mean()), sd if sd > 0 else 1.0


def _fit(name: str, *, rows: np.ndarray, data: Mapping[str, np.ndarray], own_best: str, seed: int) -> FittedCandidate:
    """Candidate ``name`` fitted on ``rows`` of ``data`` (x_enc, x_raw, fed, y)."""
    xe, xr, fed, y = (data[k][rows] for k in ("x_enc", "x_raw", "fed", "y"))
    if name in ("fed", NO_SIGNAL):
        return FittedCandidate(name)
    if name in OWN_CANDIDATES:
        return FittedCandidate(name, fit_linear(xe, y) if name == "own_lr" else fit_trees(xr, y, seed=seed))
    if name == "stk_lr":
        weights = np.r_[np.ones(xe.shape[1]), FED_LOGIT_WEIGHT]
        return FittedCandidate(name, fit_linear(np.column_stack([xe, fed]), y, weights=weights))
    if name == "stk_hgb":
        return FittedCandidate(name, fit_trees(np.column_stack([xr, fed]), y, seed=seed))
    own = _fit(own_best, rows=rows, data=data, own_best=own_best, seed=seed).model
    if own is None:
        raise DataError(f"a blend needs an own model, got own best {own_best!r}")
    fc, fs = _centre(fed)
    oc, os_ = _centre(own.score(xe if own_best == "own_lr" else xr))
    return FittedCandidate(name, own, fed_center=fc, fed_spread=fs, own_center=oc, own_spread=os_)


def _scored(fitted: FittedCandidate, rows: np.ndarray, data: Mapping[str, np.ndarray]) -> np.ndarray:
    return fitted.score(x_enc=data["x_enc"][rows], x_raw=data["x_raw"][rows], fed=data["fed"][rows])


def _cross_validate(
    data: Mapping[str, np.ndarray], *, splits: Splits, seed: int, with_fed: bool
) -> tuple[dict[str, np.ndarray], str]:
    """Out-of-fold scores (averaged over repeats) of every candidate, and the own best."""
    y = data["y"]
    own = cross_fit_own(x_enc=data["x_enc"], x_raw=data["x_raw"], y=y, splits=splits, seed=seed)
    oof = dict(own.oof)
    own_best = max(OWN_CANDIDATES, key=lambda name: auc(y=y, score=oof[name]))  # own_lr on a tie
    if not with_fed:
        return oof, own_best
    fed = data["fed"]
    oof |= {"fed": fed.copy()} | {name: np.zeros(len(y)) for name in (*BLENDS, "stk_lr", "stk_hgb")}
    folds = [fold for repeat in splits for fold in repeat]
    for (fit_rows, held), (own_fit, own_held) in zip(folds, own.fold_scores[own_best], strict=True):
        (fc, fs), (oc, os_) = _centre(fed[fit_rows]), _centre(own_fit)
        for name, weight in BLENDS.items():
            oof[name][held] += (weight * (fed[held] - fc) / fs + (1.0 - weight) * (own_held - oc) / os_) / len(splits)
        for name in ("stk_lr", "stk_hgb"):
            fitted = _fit(name, rows=fit_rows, data=data, own_best=own_best, seed=seed)
            oof[name][held] += _scored(fitted, held, data) / len(splits)
    return oof, own_best


def fed_first_choice(*, y: np.ndarray, oof: Mapping[str, np.ndarray]) -> tuple[dict[str, float], str, str]:
    """The fed-first one-standard-error rule on out-of-fold scores: ``(CV AUCs, best, selected)``.

    ``selected`` is the first of :data:`CANDIDATES` present in ``oof`` whose AUC is within one
    paired DeLong standard error of the best one's (``y`` is 0/1).
    """
    order = [name for name in CANDIDATES if name in oof]
    aucs = {name: auc(y=y, score=oof[name]) for name in order}
    best = max(order, key=lambda name: aucs[name])  # the first in fed-first order on a tie
    for name in order[: order.index(best)]:
        gap, se = delong_difference(y=y, score_a=oof[best], score_b=oof[name])
        if gap <= se:
            return aucs, best, name
    return aucs, best, best


# ----------------------------------------------------------------------------- report and model
@dataclass(frozen=True)
class LocalModelReport:
    """How the partner's local model was chosen: aggregate evaluation metrics, no model.

    Sending any of it (AUCs, p-values, the verdict) to the coordinator releases facts about the
    partner's labels that no DP mechanism covers: it may leave only as opt-in evaluation metrics
    (``release.share_eval_metrics = true``, declared "NOT DP" in the release manifest) or through
    a DP mechanism charged to the partner's privacy ledger (module docstring, condition 1).

    - ``rows`` = ``positives`` + ``negatives``: labelled rows used; ``unlabelled``: rows left out.
    - ``cv_folds`` x ``cv_repeats``; ``cv_auc``: every candidate's cross-validated AUC (empty
      when a class has fewer than 2 rows); ``own_best``; ``cv_best``; ``selected``: the
      fed-first rule's pick, before the audit.
    - ``fed_p_value``: the federated score on all rows; ``own_best_p_value``: the own best on the
      held-back rows; ``audit_p_value`` at ``audit_alpha``: the selected candidate's audit (None:
      not tested; for ``fed``, the detector on all rows at 2.5%); ``audit_rows``: rows held
      back (0: too few of a class to hold any back).
    - ``chosen``: the candidate served, or ``no_signal``; ``verdict``: ``signal`` (verified),
      ``no_signal`` (a constant score is served), or ``unverified`` (the federated score, served
      without validation by the opt-in policy); ``policy``; ``reason``, in words.
    """

    rows: int
    positives: int
    negatives: int
    unlabelled: int
    cv_folds: int
    cv_repeats: int
    cv_auc: Mapping[str, float]
    own_best: str | None
    cv_best: str | None
    selected: str | None
    fed_p_value: float | None
    own_best_p_value: float | None
    audit_rows: int
    audit_alpha: float
    audit_p_value: float | None
    audit_passed: bool
    chosen: str
    verdict: str
    policy: str
    reason: str

    def __post_init__(self) -> None:
        checks = {
            "row counts must be >= 0 and positives + negatives = rows": min(
                self.positives, self.negatives, self.unlabelled, self.audit_rows
            )
            >= 0
            and self.positives + self.negatives == self.rows,
            f"chosen must be a candidate or {NO_SIGNAL!r}": self.chosen in (*CANDIDATES, NO_SIGNAL),
            f"verdict must be one of {VERDICTS}": self.verdict in VERDICTS,
            f"policy must be one of {POLICIES}": self.policy in POLICIES,
            "the no_signal model goes with the 'no_signal' verdict, and only it": (self.chosen == NO_SIGNAL)
            == (self.verdict == "no_signal"),
            "'unverified' serves 'fed' under 'unverified_federated'": self.verdict != "unverified"
            or (self.chosen, self.policy) == ("fed", "unverified_federated"),
            "cv_auc names candidates": set(self.cv_auc) <= set(CANDIDATES),
        }
        problems = [text for text, ok in checks.items() if not ok]
        if problems:
            raise DataError("LocalModelReport: " + "; ".join(problems))
        object.__setattr__(self, "cv_auc", MappingProxyType({k: float(v) for k, v in self.cv_auc.items()}))

    def describe(self) -> str:
        """One line for the partner's own log."""
        lead = {"no_signal": "no signal", "unverified": "unverified federated score"}.get(self.verdict, self.chosen)
        cv = self.cv_auc.get(self.chosen) if self.verdict == "signal" else None
        return lead + ("" if cv is None else f" (CV AUC {cv:.3f})") + f": {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"cv_auc": dict(self.cv_auc)}


@dataclass(frozen=True, eq=False)
class LocalModel:
    """The partner's local label model: the fitted candidate it serves, and how it was chosen."""

    candidate: FittedCandidate
    report: LocalModelReport

    def __post_init__(self) -> None:
        if self.candidate.name != self.report.chosen:
            raise DataError(f"LocalModel: serves {self.candidate.name!r} but its report chose {self.report.chosen!r}")

    @property
    def needs(self) -> tuple[str, ...]:
        """The inputs :meth:`predict` reads, of ``x_enc``, ``x_raw``, ``fed_logit``."""
        return self.candidate.needs

    def predict(
        self, *, x_enc: np.ndarray | None = None, x_raw: np.ndarray | None = None, fed_logit: np.ndarray | None = None
    ) -> np.ndarray:
        """Scores (n,) of rows, higher = more likely positive; a constant 0 for "no signal".

        For new rows ``fed_logit`` is the mean of the two cross-fitted federated models' logits.
        Inputs this model does not read (:attr:`needs`) may be left out.
        """
        given = {"x_enc": x_enc, "x_raw": x_raw, "fed_logit": fed_logit}
        missing = [name for name in self.needs if given[name] is None]
        if missing or all(a is None for a in given.values()):
            raise DataError(
                f"the local model {self.candidate.name!r} scores from {', '.join(self.needs) or 'nothing'}; "
                f"{', '.join(missing) or 'no rows'} given"
            )
        rows = {name: len(a) if np.ndim(a) else -1 for name, a in given.items() if a is not None}
        if len(set(rows.values())) > 1 or -1 in rows.values():
            raise DataError(f"the inputs must be arrays with the same number of rows, got {rows}")
        n = next(iter(rows.values()))
        fed = None if fed_logit is None else np.asarray(fed_logit)
        if fed is not None and (fed.ndim != 1 or not np.issubdtype(fed.dtype, np.number) or not np.isfinite(fed).all()):
            raise DataError(f"fed_logit: expected finite numbers, one per row, got shape {fed.shape}")
        width, read = self.candidate.width, set(self.needs)
        xe = columns("x_enc", x_enc, width, rows=n) if "x_enc" in read and x_enc is not None else None
        xr = columns("x_raw", x_raw, width, rows=n) if "x_raw" in read and x_raw is not None else None
        if self.candidate.name == NO_SIGNAL:
            return np.zeros(n)
        return self.candidate.score(x_enc=xe, x_raw=xr, fed=None if fed is None else fed.astype(np.float64))


# ----------------------------------------------------------------------------- fitting
def fit_local_model(
    *,
    x_enc: np.ndarray,
    x_raw: np.ndarray,
    fed_logit: np.ndarray,
    y: np.ndarray,
    generator: np.random.Generator,
    when_unverifiable: str = "no_signal",
) -> LocalModel:
    """Choose, audit and fit the partner's local model on its own rows (module docstring).

    ``fed_logit`` is each row's cross-fitted federated logit (out of sample on every row); rows
    with a NaN label are left out. ``when_unverifiable`` applies only when the federated score
    cannot be tested at all (fewer than 5 labelled rows of a class): ``"no_signal"`` (default)
    serves a constant score, ``"unverified_federated"`` serves the federated score with the
    verdict ``"unverified"``. Raises :class:`~fedpersona.errors.DataError` listing every problem
    with the arrays, :class:`~fedpersona.errors.ConfigError` for an unknown policy.
    """
    if when_unverifiable not in POLICIES:
        raise ConfigError(f"when_unverifiable must be one of {', '.join(POLICIES)}, got {when_unverifiable!r}")
    labels = check_inputs(y=y, x_enc=x_enc, x_raw=x_raw, fed_logit=fed_logit)
    known = ~np.isnan(labels)
    data = {
        "x_enc": np.asarray(x_enc, dtype=np.float64)[known],
        "x_raw": np.asarray(x_raw, dtype=np.float64)[known],
        "fed": np.asarray(fed_logit, dtype=np.float64)[known],
        "y": labels[known].astype(np.int64),
    }
    y_k, fed = data["y"], data["fed"]
    positives, negatives = int(y_k.sum()), int(len(y_k) - y_k.sum())
    minority, everything = min(positives, negatives), np.arange(len(y_k))
    seed = draw_seed(generator)
    fed_check = detect_signal(y=y_k, score=fed)
    aucs: dict[str, float] = {}
    own_best = cv_best = selected = None
    folds = repeats = candidates = 0
    if minority >= 2:
        plan = cv_plan(rows=len(y_k), minority=minority)
        folds, repeats = plan.folds, plan.repeats
        splits = cv_splits(y=y_k, plan=plan, generator=generator)
        oof, own_best = _cross_validate(data, splits=splits, seed=seed, with_fed=fed_check.signal)
        aucs, cv_best, selected = fed_first_choice(y=y_k, oof=oof)
        candidates = len(oof)

    audit_alpha, audit_rows = ALPHA / max(candidates, 1), 0
    own_check: Detection | None = None
    audit = fed_check if selected == "fed" else None
    if own_best is not None and minority >= AUDIT_MIN_PER_CLASS:
        dev, held = (
            np.sort(r)
            for r in train_test_split(
                everything, test_size=AUDIT_SHARE, stratify=y_k, random_state=draw_seed(generator)
            )
        )
        audit_rows = len(held)
        own_fit = _fit(own_best, rows=dev, data=data, own_best=own_best, seed=seed)
        own_scores = _scored(own_fit, held, data)
        own_check = detect_signal(y=y_k[held], score=own_scores, alpha=ALPHA / len(OWN_CANDIDATES))
        if selected not in (None, "fed"):
            fitted = (
                own_fit
                if selected == own_best
                else _fit(str(selected), rows=dev, data=data, own_best=own_best, seed=seed)
            )
            audit = detect_signal(y=y_k[held], score=_scored(fitted, held, data), alpha=audit_alpha)

    chosen, verdict, reason = served_choice(
        selected=selected, audit=audit, fed=fed_check, own_best=own_best, own=own_check, policy=when_unverifiable
    )
    report = LocalModelReport(
        rows=len(y_k),
        positives=positives,
        negatives=negatives,
        unlabelled=int((~known).sum()),
        cv_folds=folds,
        cv_repeats=repeats,
        cv_auc=aucs,
        own_best=own_best,
        cv_best=cv_best,
        selected=selected,
        fed_p_value=fed_check.p_value,
        own_best_p_value=None if own_check is None else own_check.p_value,
        audit_rows=audit_rows,
        audit_alpha=audit_alpha if audit is None else audit.alpha,
        audit_p_value=None if audit is None else audit.p_value,
        audit_passed=bool(audit is not None and audit.signal),
        chosen=chosen,
        verdict=verdict,
        policy=when_unverifiable,
        reason=reason,
    )
    return LocalModel(_fit(chosen, rows=everything, data=data, own_best=str(own_best), seed=seed), report)


def served_choice(
    *,
    selected: str | None,
    audit: Detection | None,
    fed: Detection,
    own_best: str | None,
    own: Detection | None,
    policy: str,
) -> tuple[str, str, str]:
    """What the partner serves after the audit: ``(chosen, verdict, reason)``.

    The selected candidate if its audit passed; else the federated score if it passed the
    detector; else the own best if its audit passed; else, when nothing could be tested at all
    (``fed.p_value`` is None) and ``policy`` is ``"unverified_federated"``, the federated score
    marked "unverified"; else ``no_signal``.
    """
    if policy not in POLICIES:
        raise ConfigError(f"when_unverifiable must be one of {', '.join(POLICIES)}, got {policy!r}")
    if selected is not None and audit is not None and audit.signal:
        return selected, "signal", f"selected by CV and verified: {audit.describe()}"
    if fed.signal:
        return "fed", "signal", f"{selected} failed its audit; the federated score passed: {fed.describe()}"
    if own_best is not None and own is not None and own.signal:
        return own_best, "signal", f"{selected} failed its audit, the federated score {fed.describe()}; own best passed"
    if fed.p_value is None and policy == "unverified_federated":
        return "fed", "unverified", f"the partner's rows cannot validate any model: {fed.describe()}"
    tested = audit or fed
    return NO_SIGNAL, "no_signal", f"AUC not significantly above 0.5: {tested.describe()}"


# ----------------------------------------------------------------------------- persistence
def local_model_path(*, state_dir: str | Path, label: str) -> Path:
    """``STATE_DIR/local-model-<label>.npz``: where the partner keeps its local model for ``label``."""
    if not isinstance(label, str) or not _LABEL.match(label):
        raise ConfigError(f"local model label must be 1-64 letters, digits, '_', '.' or '-', got {label!r}")
    return Path(state_dir) / f"local-model-{label}.npz"


def save_local_model(*, state_dir: str | Path, label: str, model: LocalModel) -> Path:
    """Write the local model for ``label`` into the partner's own state folder; returns the path.

    The file (numpy ``.npz``, no pickled objects) holds the served candidate's arrays (a linear
    model's coefficients and standardisation constants, or boosted trees as node arrays), the
    blend constants, and the :class:`LocalModelReport` (CV AUCs, p-values, verdict) as JSON.
    These are numbers computed from the partner's labels, for the partner's own use: the file
    never leaves the partner, and nothing sent to the coordinator reads it. It is written to a
    fsync'd temporary file renamed over the old one, then the folder is fsync'd, so a crash
    leaves the old file or the new one.
    """
    path = local_model_path(state_dir=state_dir, label=label)
    path.parent.mkdir(parents=True, exist_ok=True)
    fitted = model.candidate
    kind = None if fitted.model is None else ("linear" if isinstance(fitted.model, LinearScorer) else "trees")
    meta = {
        "format": _FORMAT,
        "label": label,
        "name": fitted.name,
        "model": kind,
        "centres": [fitted.fed_center, fitted.fed_spread, fitted.own_center, fitted.own_spread],
        "report": model.report.to_json(),
    }
    arrays = {} if fitted.model is None else {f"model.{k}": v for k, v in fitted.model.to_arrays().items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta, allow_nan=False).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return write_durably(path, buffer.getvalue())


def load_local_model(*, state_dir: str | Path, label: str) -> LocalModel:
    """Read the local model :func:`save_local_model` wrote for ``label``; it scores exactly as before."""
    path = local_model_path(state_dir=state_dir, label=label)
    if not path.is_file():
        raise DataError(f"{path}: no local model for label {label!r}; fit one (fit_local_model) and save it first")
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        if meta.get("format") != _FORMAT or meta.get("label") != label:
            raise ValueError(f"format {meta.get('format')!r} for label {meta.get('label')!r}")
        parts = {k.removeprefix("model."): v for k, v in arrays.items()}
        inner: LinearScorer | TreeScorer | None = None
        if meta["model"] == "linear":
            inner = LinearScorer.from_arrays(parts)
        elif meta["model"] == "trees":
            inner = TreeScorer.from_arrays(parts)
        fc, fs, oc, os_ = (float(v) for v in meta["centres"])
        candidate = FittedCandidate(meta["name"], inner, fed_center=fc, fed_spread=fs, own_center=oc, own_spread=os_)
        return LocalModel(candidate, LocalModelReport(**meta["report"]))
    except (OSError, ValueError, KeyError, TypeError, DataError) as exc:
        raise DataError(
            f"{path}: not a local model file for label {label!r} that this version can read ({exc}); "
            "fit the local model again"
        ) from None
