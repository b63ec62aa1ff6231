"""The decision-tree surrogate of a persona assignment: rules a person can read.

A shallow tree (scikit-learn, depth <= 3) predicts each user's persona from the raw columns
(:mod:`fedpersona.personas.columns`), trained on a seeded part of the rows and scored on the
rest (its **fidelity**: accuracy against the assignments on held-out rows). Candidates are
grown with two criteria and on random halves of the columns, and groups of a category's values
("region is one of 1, 3, 7", chosen on the training rows only) are offered as extra columns,
since a depth-3 tree cannot say that with single values. Each leaf with at least ``min_users``
users becomes a :class:`Rule` in plain text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.tree import DecisionTreeClassifier

from fedpersona.personas.columns import Column, describe, fmt

__all__ = ["Rule", "surrogate"]

_HOLDOUT = 0.3
_CRITERIA = ("entropy", "gini")
_RANDOM_TREES = 24  # extra candidate trees, each choosing splits among a random half of the columns
_MAX_TREE_ROWS = 50_000  # training (and held-out) rows of the surrogate at most: seeded subsamples


@dataclass(frozen=True)
class Rule:
    """One leaf of the surrogate tree: conditions in the features' own units."""

    persona: int  # the persona the leaf predicts
    conditions: tuple[str, ...]
    text: str
    users: int | None  # users (all rows) that fall in the leaf
    precision: float | None  # share of them assigned to ``persona``
    suppressed: bool


def surrogate(
    columns: list[Column],
    labels: np.ndarray,
    k: int,
    *,
    max_depth: int,
    min_users: int,
    rng: np.random.Generator,
) -> tuple[list[Rule], float]:
    n = len(labels)
    if not columns:
        return [], float(np.mean(labels == np.bincount(labels, minlength=k).argmax()))
    order = rng.permutation(n)
    n_test = min(max(1, round(_HOLDOUT * n)), _MAX_TREE_ROWS)
    test, train = order[:n_test], order[n_test : n_test + _MAX_TREE_ROWS]
    columns = columns + _value_groups(columns, labels, train, k, min_users)
    imputed = [c.imputed() for c in columns]

    def design(rows: np.ndarray) -> np.ndarray:  # (len(rows), n_columns)
        return np.stack([values[rows] for values in imputed], axis=1)

    x_train = design(train)
    # A greedy depth-3 tree can spend a split badly; among a few candidates (both criteria,
    # and trees restricted to random halves of the columns at each split) keep the one with
    # the best TRAINING accuracy. The held-out rows only measure the winner's fidelity.
    seeds = rng.integers(2**31 - 1, size=_RANDOM_TREES + 1)
    candidates = [(criterion, None, int(seeds[0])) for criterion in _CRITERIA] + [
        (_CRITERIA[i % 2], 0.5, int(seed)) for i, seed in enumerate(seeds[1:])
    ]
    best: DecisionTreeClassifier | None = None
    best_accuracy = -1.0
    for criterion, max_features, seed in candidates:
        tree = DecisionTreeClassifier(
            criterion=criterion,
            max_depth=max_depth,
            min_samples_leaf=min_users,
            max_features=max_features,
            random_state=seed,
        ).fit(x_train, labels[train])
        accuracy = float(np.mean(tree.predict(x_train) == labels[train]))
        if accuracy > best_accuracy:
            best, best_accuracy = tree, accuracy
    assert best is not None
    fidelity = float(np.mean(best.predict(design(test)) == labels[test]))
    every = np.arange(n)
    leaves = np.concatenate([best.apply(design(every[i : i + _MAX_TREE_ROWS])) for i in range(0, n, _MAX_TREE_ROWS)])
    rules = []
    for leaf, conditions in _paths(best, columns):
        inside = leaves == leaf
        users = int(inside.sum())
        persona = int(best.classes_[int(np.argmax(best.tree_.value[leaf][0]))])
        text = " and ".join(conditions) if conditions else "all users"
        if users < min_users:
            rules.append(Rule(persona, (), f"a leaf of fewer than {min_users} users", None, None, True))
            continue
        precision = float(np.mean(labels[inside] == persona))
        rules.append(Rule(persona, conditions, text, users, precision, False))
    return rules, fidelity


def _value_groups(columns: list[Column], labels: np.ndarray, train: np.ndarray, k: int, min_users: int) -> list[Column]:
    """Extra yes/no candidates for the surrogate: "<feature> is one of <values>".

    A split on one category value at a time cannot say "region is 1, 3 or 7" within depth 3.
    For each categorical feature with 3 or more analysed values and each persona, the group is
    the values whose users (at least ``min_users`` of the TRAINING rows) belong to that persona
    more often than all users do; the held-out rows that measure fidelity play no part.
    """
    by_feature: dict[str, list[Column]] = {}
    for col in columns:
        if col.kind == "category" and not col.sequence and not col.group:
            by_feature.setdefault(col.feature, []).append(col)
    train_labels = labels[train]
    base = np.bincount(train_labels, minlength=k) / max(1, len(train))
    out: list[Column] = []
    for feature, cols in by_feature.items():
        if len(cols) < 3:
            continue
        has = [col.values[train] == 1 for col in cols]
        seen: set[tuple[int, ...]] = set()
        for p in range(k):
            chosen = tuple(
                j for j, h in enumerate(has) if h.sum() >= min_users and np.mean(train_labels[h] == p) > base[p]
            )
            if not 1 < len(chosen) < len(cols) or chosen in seen:
                continue
            seen.add(chosen)
            member = np.any([cols[j].values == 1 for j in chosen], axis=0)
            values = np.where(np.isnan(cols[0].values), np.nan, member.astype(np.float64))
            names = ", ".join(str(cols[j].value) for j in chosen)
            out.append(Column(feature, "category", values, value=names, group=True))
    return out


def _paths(tree: DecisionTreeClassifier, columns: list[Column]) -> list[tuple[int, tuple[str, ...]]]:
    """Every leaf with the simplified conditions on its path."""
    t = tree.tree_
    out: list[tuple[int, tuple[str, ...]]] = []

    def walk(node: int, path: list[tuple[int, bool, float]]) -> None:
        if t.children_left[node] == t.children_right[node]:  # a leaf
            out.append((node, _conditions(path, columns)))
            return
        feature, threshold = int(t.feature[node]), float(t.threshold[node])
        walk(int(t.children_left[node]), [*path, (feature, True, threshold)])
        walk(int(t.children_right[node]), [*path, (feature, False, threshold)])

    walk(0, [])
    return out


def _conditions(path: list[tuple[int, bool, float]], columns: list[Column]) -> tuple[str, ...]:
    """``(column, goes_left, threshold)`` steps -> readable conditions, one per column."""
    bounds: dict[int, list[float]] = {}
    flags: dict[int, bool] = {}
    for index, left, threshold in path:
        if columns[index].kind == "numeric":
            lo_hi = bounds.setdefault(index, [-math.inf, math.inf])
            if left:
                lo_hi[1] = min(lo_hi[1], threshold)
            else:
                lo_hi[0] = max(lo_hi[0], threshold)
        else:
            flags[index] = not left  # an indicator or boolean: right = yes
    equal_to = {
        columns[i].feature for i, yes in flags.items() if yes and not columns[i].sequence and not columns[i].group
    }
    out: list[str] = []
    for index in sorted(set(bounds) | set(flags)):
        col = columns[index]
        if index in bounds:
            out.append(_range(col, *bounds[index]))
        elif col.kind == "boolean":
            out.append(f"{col.feature} = {col.true_text if flags[index] else col.false_text}")
        elif flags[index]:
            out.append(describe(col))
        elif not col.sequence and col.feature in equal_to:
            continue  # "device = mobile" already excludes "device = desktop"
        elif col.group:
            out.append(f"{col.feature} is none of {col.value}")
        else:
            out.append(f"{col.feature} without {col.value}" if col.sequence else f"{col.feature} ≠ {col.value}")
    return tuple(out)


def _range(col: Column, lo: float, hi: float) -> str:
    """``lo < x <= hi`` in the column's own units (whole numbers when the column is)."""
    if col.integral:
        low = f"{col.feature} ≥ {math.floor(lo) + 1}" if math.isfinite(lo) else ""
        high = f"{col.feature} ≤ {math.floor(hi)}" if math.isfinite(hi) else ""
        if low and high:
            return f"{math.floor(lo) + 1} ≤ {col.feature} ≤ {math.floor(hi)}"
        return low or high
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{fmt(lo)} < {col.feature} ≤ {fmt(hi)}"
    return f"{col.feature} > {fmt(lo)}" if math.isfinite(lo) else f"{col.feature} ≤ {fmt(hi)}"


# --- categories and recommendations -----------------------------------------------------------
