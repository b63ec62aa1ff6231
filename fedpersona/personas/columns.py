"""A partner's table as columns a persona card can describe.

Numbers keep their own units; categories and sequence values become yes/no indicators (the
most frequent values only, and only values at least ``min_users`` users have); a numeric
sequence is summarised by each user's mean over its present steps, and each single step of a
sequence is a column of its own for the surrogate trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from fedpersona.data.schema import BooleanFeature, CategoricalFeature, NumericFeature, SequenceFeature
from fedpersona.data.tables import Table

__all__ = [
    "MAX_VALUES",
    "Column",
    "EffectKind",
    "describable_columns",
    "describe",
    "fmt",
    "present",
    "step_columns",
    "users_per_value",
]

EffectKind = Literal["numeric", "boolean", "category"]

MAX_VALUES = 50  # categorical values considered per feature (the most frequent in the silo)


@dataclass(frozen=True, eq=False)
class Column:
    """One analysed column: a number (numeric, boolean, sequence mean) or a value indicator."""

    feature: str
    kind: EffectKind
    values: np.ndarray  # (n,) float64, NaN = missing (an indicator is 0/1, NaN without a value)
    value: str | None = None  # the category of an indicator
    sequence: bool = False  # an indicator of "any step has the value"
    group: bool = False  # an indicator of "the value is one of" (``value`` lists them)
    integral: bool = False  # all observed values are whole numbers
    true_text: str = "yes"
    false_text: str = "no"

    def imputed(self) -> np.ndarray:
        """Missing values replaced by the silo median (0 for an indicator)."""
        if self.kind == "category":
            return np.nan_to_num(self.values)
        observed = self.values[~np.isnan(self.values)]
        fill = float(np.median(observed)) if observed.size else 0.0
        return np.where(np.isnan(self.values), fill, self.values)


def describable_columns(table: Table, min_users: int) -> list[Column]:
    out: list[Column] = []
    for feat in table.schema.features:
        if isinstance(feat, NumericFeature):
            out.append(_numeric(feat.name, table.columns[feat.column].astype(np.float64)))
        elif isinstance(feat, BooleanFeature):
            values = table.columns[feat.column].astype(np.float64)
            yes, no = feat.true_values[0], feat.false_values[0]
            out.append(Column(feat.name, "boolean", values, true_text=yes, false_text=no))
        elif isinstance(feat, CategoricalFeature):
            values = table.columns[feat.column][:, None]
            out.extend(_indicators(feat.name, values, min_users, sequence=False))
        elif isinstance(feat, SequenceFeature) and feat.element == "numeric":
            steps = np.stack([table.columns[c].astype(np.float64) for c in feat.columns], axis=1)
            present = ~np.isnan(steps)
            count = present.sum(axis=1)
            mean = np.where(count > 0, np.nan_to_num(steps).sum(axis=1) / np.maximum(count, 1), np.nan)
            out.append(_numeric(f"{feat.name} (mean)", mean))
        elif isinstance(feat, SequenceFeature):
            values = np.stack([table.columns[c] for c in feat.columns], axis=1)
            out.extend(_indicators(feat.name, values, min_users, sequence=True))
    return out


def step_columns(table: Table, min_users: int) -> list[Column]:
    """Each step of a sequence on its own ("PAY_AMT1 ≤ 2,000", "PAY_0 = 2"): extra candidate
    splits for the surrogate tree only (the cards describe a sequence as a whole)."""
    out: list[Column] = []
    for feat in table.schema.features:
        if not isinstance(feat, SequenceFeature):
            continue
        for column in feat.columns:
            if feat.element == "numeric":
                out.append(_numeric(column, table.columns[column].astype(np.float64)))
            else:
                out.extend(_indicators(column, table.columns[column][:, None], min_users, sequence=False))
    return out


def _numeric(name: str, values: np.ndarray) -> Column:
    observed = values[~np.isnan(values)]
    return Column(name, "numeric", values, integral=bool(np.all(observed == np.round(observed))))


def _indicators(name: str, values: np.ndarray, min_users: int, *, sequence: bool) -> list[Column]:
    """Yes/no columns for the feature's most frequent values (users having them >= min_users)."""
    known = present(values).any(axis=1)
    users = users_per_value(values)
    out = []
    for value in [v for v, count in users if count >= min_users][:MAX_VALUES]:
        has = np.any(values == value, axis=1)
        column = np.where(known, has.astype(np.float64), np.nan)
        out.append(Column(name, "category", column, value=value, sequence=sequence))
    return out


def users_per_value(values: np.ndarray) -> list[tuple[str, int]]:
    """``(value, users having it in any step)`` of an (n, steps) object array, most users first."""
    rows, steps = np.nonzero(present(values))
    if rows.size == 0:
        return []
    pairs = pd.DataFrame({"row": rows, "value": values[rows, steps].astype(str)}).drop_duplicates()
    counts = pairs["value"].value_counts()
    return sorted(((str(v), int(c)) for v, c in counts.items()), key=lambda vc: (-vc[1], vc[0]))


# --- effects ----------------------------------------------------------------------------------


def describe(col: Column) -> str:
    if col.group:
        return f"{col.feature} is one of {col.value}"
    if col.kind == "category":
        return f"{col.feature} including {col.value}" if col.sequence else f"{col.feature} = {col.value}"
    if col.kind == "boolean":
        return f"{col.feature} = {col.true_text}"
    return col.feature


def present(values: np.ndarray) -> np.ndarray:
    """Elementwise "has a value" of an object array of category strings (None = missing)."""
    return np.asarray(pd.notna(values), dtype=bool)


def fmt(x: float) -> str:
    """A number for people: 3 significant digits, whole numbers from 100 up."""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"
