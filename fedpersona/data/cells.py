"""Raw cells: how fedpersona reads the strings of a data file.

Every reader of a partner's table (validation, event-log aggregation, schema drafting,
streaming inference) turns raw cells into values the same way: :func:`as_str` (the text of a
column, whatever type the file gave it), :func:`parse_numbers` (decimal numbers, strictly),
and the problem texts that name columns, rows and values (:func:`problem`, :func:`quoted`,
:func:`row_list`). Rows are numbered from 1, counting data rows only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "NUMBER",
    "as_str",
    "isin",
    "map_unique",
    "number_text",
    "parse_numbers",
    "problem",
    "quoted",
    "row_list",
    "text_cells",
]

SHOWN_ROWS = 5
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def map_unique(series: pd.Series, func: Callable[[object], object], dtype: type) -> np.ndarray:
    """``func`` applied to each distinct non-missing value, spread back over the rows."""
    codes, uniques = pd.factorize(series)
    mapped = np.array([func(u) for u in uniques] + [None], dtype=object)
    out = mapped[codes]  # code -1 (missing) picks the trailing None
    return out.astype(np.float64) if dtype is float else out


def isin(values: np.ndarray, items: Iterable[str]) -> np.ndarray:
    return pd.Series(values, dtype=object).isin(list(items)).to_numpy(dtype=bool)


def parse_numbers(text: pd.Series, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parsed numbers (NaN where missing or bad) and the mask of cells that are not numbers."""
    try:  # Arrow parses decimal and scientific notation ("7.50E-05") fast, nulls as NaN
        values = pc.cast(pa.array(text, from_pandas=True), pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        values = np.asarray(pd.to_numeric(text, errors="coerce"), dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return np.where(finite, values, np.nan), ~missing & ~finite


def row_list(mask: np.ndarray) -> str:
    where = np.flatnonzero(mask)
    shown = ", ".join(str(int(i) + 1) for i in where[:SHOWN_ROWS])
    return shown + (", ..." if where.size > SHOWN_ROWS else "")


def problem(column: str, mask: np.ndarray, text: pd.Series, what: str) -> str:
    example = text.iloc[int(np.flatnonzero(mask)[0])]
    return f"column '{column}': {int(mask.sum())} value(s) {what}, e.g. {example!r} at rows {row_list(mask)}"


def quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def number_text(x: float) -> str:
    x = round(float(x), 10)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


# --- event logs -------------------------------------------------------------------------------


def as_str(series: pd.Series) -> pd.Series:
    """``series`` as strings, keeping missing cells missing (NaN), not the string "nan"."""
    return series.astype(str).where(~series.isna().to_numpy(dtype=bool))


def text_cells(series: pd.Series, na_values: frozenset[str]) -> tuple[pd.Series, np.ndarray]:
    """Stripped strings (NaN where missing) and the missing mask of one column.

    Non-string columns (numbers, booleans: from Parquet or an aggregated event log) are
    written as strings first; categories are canonicalised later, so 1.0 and "1" agree.
    """
    if not isinstance(series.dtype, pd.StringDtype):
        series = as_str(series)
    text = series.str.strip()
    missing = text.isna().to_numpy(dtype=bool) | text.isin(na_values).to_numpy(dtype=bool)
    return text.where(~missing), missing
