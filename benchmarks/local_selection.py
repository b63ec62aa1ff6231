"""What the 400-row partner can get by combining the federated score with its own rows, on validation splits.

The small partner's share of the gap closed (``docs/results.md``, "The label model") depends on
two things: the federated score, and how the partner combines it with its own columns
(:mod:`fedpersona.model.stacking`). This benchmark measures the second part's ceiling, on the
validation splits of :mod:`benchmarks.label_recipe` (the 20% test rows are never read): the
federation trains on 75% of the training rows with the shipped recipe, and each partner's
candidates are scored on the other 25%.

Per dataset, epsilon and seed, for every partner:

- the shipped candidates (:data:`fedpersona.model.stacking.CANDIDATES`), cross-validated on the
  partner's rows exactly as :func:`~fedpersona.model.stacking.fit_local_model` does (same folds,
  same repeats), plus blends with each own model separately (``tblendA``: the federated score
  with the partner's own gradient boosting; ``lblendA``: with its own logistic regression), since
  the shipped blends use only the own model that cross-validates best;
- every candidate refitted on all the partner's rows and scored on the validation rows.

Then, per selection rule, what the small partner closes of the gap between its own best model
and gradient boosting on all pooled fitting rows (both on the validation rows), and what the
large partners gain over their own best:

- ``shipped``: the fed-first one-standard-error rule over the shipped candidates (the audit that
  follows it in the product is left out: it changes the choice only when a candidate fails);
- the same rule over the wider set, with a half standard error, or starting from a blend;
- the best cross-validated candidate;
- each candidate served always (no selection): an upper reference that no rule which must
  choose from 400 rows can be relied on to reach.

``--ceiling`` adds, per dataset, what model class the gap to pooled boosting needs: non-private
models on all pooled fitting rows, scored on the validation rows (logistic regression on the
label model's dense view, boosting without interactions, with pairwise interactions, and full).

``python -m benchmarks.local_selection --seeds 0 1 2 3 --epsilon 3 1 --ceiling`` (about 20
minutes on 2 cores). Results: ``docs/results.md``, "What the small partner can get from
combining".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from benchmarks.label_model import DATASETS, federate
from benchmarks.label_recipe import fit_and_validation, load, split
from fedpersona.model import stacking
from fedpersona.model.alone import auc, cross_fit_own, cv_plan, cv_splits, delong_difference, draw_seed, fit_trees
from fedpersona.model.evaluation import own_columns
from fedpersona.model.linear import LABEL_INPUT

WEIGHTS = (0.75, 0.5, 0.25)
EXTRA = {f"{tag}blend{w:g}": (own, w) for tag, own in (("t", "own_hgb"), ("l", "own_lr")) for w in WEIGHTS}
WIDE = ("fed", *(n for w in WEIGHTS for n in (f"blend{w:g}", f"tblend{w:g}", f"lblend{w:g}")),
        "stk_lr", "stk_hgb", "own_lr", "own_hgb")  # fmt: skip


@dataclass(frozen=True)
class PartnerResult:
    """One partner's candidates: out-of-fold scores on its rows and AUCs on the validation rows."""

    small: bool
    y: np.ndarray
    oof: Mapping[str, np.ndarray]
    validation_auc: Mapping[str, float]
    own_best: str
    pooled: float  # pooled boosting's validation AUC (the same for every partner of a federation)


def _blend(weight: float, fed: np.ndarray, fed_ref: np.ndarray, own: np.ndarray, own_ref: np.ndarray) -> np.ndarray:
    """``weight z(fed) + (1 - weight) z(own)``, standardised by the fitting rows' scores (as the product's blends)."""
    (fc, fs), (oc, os_) = stacking._centre(fed_ref), stacking._centre(own_ref)
    return weight * (fed - fc) / fs + (1.0 - weight) * (own - oc) / os_


def partner(
    *, x_enc: np.ndarray, x_raw: np.ndarray, y: np.ndarray, fed: np.ndarray, validation: Mapping[str, np.ndarray],
    generator: np.random.Generator, small: bool, pooled: float,
) -> PartnerResult:  # fmt: skip
    """Cross-validate and score every candidate of one partner (module docstring)."""
    data = {"x_enc": x_enc, "x_raw": x_raw, "fed": fed, "y": y}
    seed = draw_seed(generator)  # drawn in the order fit_local_model draws them
    minority = int(min(y.sum(), len(y) - y.sum()))
    splits = cv_splits(y=y, plan=cv_plan(rows=len(y), minority=minority), generator=generator)
    with_fed = stacking.detect_signal(y=y, score=fed).signal
    oof, own_best = stacking._cross_validate(data, splits=splits, seed=seed, with_fed=with_fed)
    oof = dict(oof)
    everything = np.arange(len(y))
    val_x = {"x_enc": validation["x_enc"], "x_raw": validation["x_raw"], "fed": validation["fed"]}
    scores = {
        name: stacking._fit(name, rows=everything, data=data, own_best=own_best, seed=seed).score(
            x_enc=val_x["x_enc"], x_raw=val_x["x_raw"], fed=val_x["fed"]
        )
        for name in oof
    }
    if with_fed:
        own = cross_fit_own(x_enc=x_enc, x_raw=x_raw, y=y, splits=splits, seed=seed)
        folds = [fold for repeat in splits for fold in repeat]
        for name, (own_name, weight) in EXTRA.items():
            oof[name] = np.zeros(len(y))
            for (fit_rows, held), (own_fit, own_held) in zip(folds, own.fold_scores[own_name], strict=True):
                oof[name][held] += _blend(weight, fed[held], fed[fit_rows], own_held, own_fit) / len(splits)
            model = stacking._fit(own_name, rows=everything, data=data, own_best=own_best, seed=seed).model
            assert model is not None
            x = x_enc if own_name == "own_lr" else x_raw
            x_val = val_x["x_enc"] if own_name == "own_lr" else val_x["x_raw"]
            scores[name] = _blend(weight, val_x["fed"], fed, model.score(x_val), model.score(x))
    return PartnerResult(
        small=small,
        y=y,
        oof=oof,
        validation_auc={name: auc(y=validation["y"], score=s) for name, s in scores.items()},
        own_best=own_best,
        pooled=pooled,
    )


def first_within(result: PartnerResult, order: Sequence[str], width: float = 1.0) -> str:
    """The first of ``order`` whose cross-validated AUC is within ``width`` paired DeLong
    standard errors of the best one's (the product's fed-first rule at ``width = 1`` and the
    shipped order)."""
    names = [n for n in order if n in result.oof]
    aucs = {n: auc(y=result.y, score=result.oof[n]) for n in names}
    best = max(names, key=lambda n: aucs[n])
    for name in names[: names.index(best)]:
        gap, se = delong_difference(y=result.y, score_a=result.oof[best], score_b=result.oof[name])
        if gap <= width * se:
            return name
    return best


def best_cv(result: PartnerResult, order: Sequence[str]) -> str:
    names = [n for n in order if n in result.oof]
    return max(names, key=lambda n: auc(y=result.y, score=result.oof[n]))


RULES: dict[str, Callable[[PartnerResult], str]] = {
    "shipped: fed-first, one SE, shipped candidates": lambda r: first_within(r, stacking.CANDIDATES),
    "fed-first, one SE, with tblend/lblend": lambda r: first_within(r, WIDE),
    "fed-first, half an SE, with tblend/lblend": lambda r: first_within(r, WIDE, 0.5),
    "blend0.5 first, one SE": lambda r: first_within(r, ("blend0.5", *(n for n in WIDE if n != "blend0.5"))),
    "tblend0.5 first, one SE": lambda r: first_within(r, ("tblend0.5", *(n for n in WIDE if n != "tblend0.5"))),
    "best cross-validated, shipped candidates": lambda r: best_cv(r, stacking.CANDIDATES),
    "best cross-validated, with tblend/lblend": lambda r: best_cv(r, WIDE),
}


def federation(name: str, *, seed: int, epsilon: float, features: Any, y: np.ndarray) -> list[PartnerResult]:
    """One federation on the validation split of ``name`` and every partner's candidates."""
    data = split(features, y, seed)
    positions, val = data.partner_rows, data.validation_rows
    fit = np.sort(np.concatenate(positions))
    enc_all, raw_all = own_columns(features)
    labels = y.astype(np.int64)
    pooled = auc(y=labels[val], score=fit_trees(raw_all[fit], labels[fit], seed=seed).score(raw_all[val]))
    models = federate(data.parts, epsilon=epsilon, seed=seed)
    fed_val = models[0].logits(data.validation.batch(torch.arange(len(val))))[:, 0].numpy().astype(np.float64)
    validation = {"x_enc": enc_all[val], "x_raw": raw_all[val], "fed": fed_val, "y": labels[val]}
    out = []
    for i, (pos, part, model) in enumerate(zip(positions, data.parts, models, strict=True)):
        fed = model.out_of_sample_logits(part.batch(torch.arange(len(part))))[:, 0].numpy().astype(np.float64)
        out.append(
            partner(
                x_enc=enc_all[pos], x_raw=raw_all[pos], y=labels[pos], fed=fed, validation=validation,
                generator=np.random.default_rng(seed * 10 + i), small=i == len(positions) - 1, pooled=pooled,
            )
        )  # fmt: skip
    return out


def closed(result: PartnerResult, name: str) -> float:
    """The share of the gap between the partner's own best and pooled boosting that ``name`` closes."""
    alone = result.validation_auc[result.own_best]
    return (result.validation_auc[name] - alone) / (result.pooled - alone)


def gain(result: PartnerResult, name: str) -> float:
    return result.validation_auc[name] - result.validation_auc[result.own_best]


def _always(name: str) -> Callable[[PartnerResult], str]:
    """Serve ``name`` whatever the cross-validation says (``fed`` where the federated
    candidates were not entered: the federated score showed no signal on the partner's rows)."""
    return lambda r: name if name in r.oof else "fed"


def table(results: Mapping[tuple[str, float], list[list[PartnerResult]]]) -> list[str]:
    """One row per rule (and per always-served candidate): the small partner's share of the gap
    closed per dataset and epsilon (mean over seeds), and the large partners' mean and worst gain."""
    keys = sorted(results, key=lambda k: (-k[1], k[0]))
    head = " | ".join(f"{name}, eps {eps:g}: small closed; large mean, worst" for name, eps in keys)
    lines = [f"| rule | {head} |", "|---|" + "---|" * len(keys)]
    rows: dict[str, Callable[[PartnerResult], str]] = dict(RULES)
    rows |= {f"always {n}": _always(n) for n in WIDE}
    for rule, choose in rows.items():
        cells = []
        for key in keys:
            feds = results[key]
            small = [closed(r, choose(r)) for fed in feds for r in fed if r.small]
            large = [gain(r, choose(r)) for fed in feds for r in fed if not r.small]
            cells.append(f"{100 * statistics.mean(small):.0f}%; {statistics.mean(large):+.4f}, {min(large):+.4f}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return lines


def ceiling(name: str, features: Any, y: np.ndarray, seeds: Sequence[int]) -> str:
    """Non-private models on all pooled fitting rows, validation AUC (mean over seeds)."""
    raw_all = own_columns(features)[1]
    dense = features.tensors[LABEL_INPUT].numpy()
    models: dict[str, Callable[[], Any]] = {
        "logistic regression, dense view": lambda: LogisticRegression(C=1.0, max_iter=2000),
        "boosting, no interactions": lambda: HistGradientBoostingClassifier(
            max_depth=2, interaction_cst="no_interactions", random_state=0
        ),
        "boosting, depth 2 (pairs)": lambda: HistGradientBoostingClassifier(max_depth=2, random_state=0),
        "boosting, full": lambda: HistGradientBoostingClassifier(random_state=0),
    }
    scores: dict[str, list[float]] = {m: [] for m in models}
    for seed in seeds:
        fit, val = fit_and_validation(y, seed)
        for label, make in models.items():
            x = dense if label.startswith("logistic") else raw_all
            model = make().fit(x[fit], y[fit])
            s = model.decision_function(x[val]) if label.startswith("logistic") else model.predict_proba(x[val])[:, 1]
            scores[label].append(auc(y=y[val].astype(np.int64), score=np.asarray(s, dtype=np.float64)))
    return f"| {name} | " + " | ".join(f"{statistics.mean(v):.4f}" for v in scores.values()) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--ceiling", action="store_true", help="also the non-private model-class ceiling table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[tuple[str, float], list[list[PartnerResult]]] = {}
    ceilings = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in args.datasets:
            features, y = load(name)
            for eps in args.epsilon:
                for seed in args.seeds:
                    fed = federation(name, seed=seed, epsilon=eps, features=features, y=y)
                    results.setdefault((name, eps), []).append(fed)
                    small = next(r for r in fed if r.small)
                    print(json.dumps({"dataset": name, "epsilon": eps, "seed": seed, "small_own_best": small.own_best,
                                      "small_validation_auc": small.validation_auc, "pooled": small.pooled}),
                          file=sys.stderr, flush=True)  # fmt: skip
            if args.ceiling:
                ceilings.append(ceiling(name, features, y, args.seeds))
    print(f"Validation rows, seeds {args.seeds}: the small partner's share of the gap closed (mean over seeds); "
          "the large partners' gain over their own best (mean, worst)")  # fmt: skip
    print("\n".join(table(results)))
    if ceilings:
        print("\nNon-private, all pooled fitting rows, validation AUC (mean over seeds)")
        print("| dataset | logistic regression, dense view | boosting, no interactions | depth 2 | boosting |")
        print("|---|---|---|---|---|")
        print("\n".join(ceilings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
