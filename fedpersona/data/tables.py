"""Partner tables: read a raw file, check it against its schema, hand back typed columns.

The data flow is ``read_frame`` (raw CSV/Parquet -> a frame of strings; an event log is first
aggregated to one row per user) -> ``validate_frame`` (every check at once, one
:class:`~fedpersona.errors.SchemaError` listing every problem) -> :class:`Table`.
``load_table`` does both. Nothing here fits bounds or vocabularies silently; drafting a
schema from a file is :mod:`fedpersona.data.drafting`, aggregating an event log
:mod:`fedpersona.data.events`.

Rows are numbered from 1, counting data rows only (the header is not a row), in every message.
"""

from __future__ import annotations

import logging
import lzma
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedpersona.data.cells import (
    as_str,
    isin,
    map_unique,
    number_text,
    parse_numbers,
    problem,
    quoted,
    row_list,
    text_cells,
)
from fedpersona.data.events import aggregate_events
from fedpersona.data.schema import (
    DEFAULT_FALSE,
    BooleanFeature,
    CategoricalFeature,
    Feature,
    NumericFeature,
    Schema,
    SequenceFeature,
    TextFeature,
    canonical,
)
from fedpersona.errors import DataError, SchemaError

__all__ = ["PARQUET_SUFFIXES", "Table", "check_file", "load_table", "read_frame", "read_raw", "validate_frame"]

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare by identity
class Table:
    """A validated per-user table: one row per user, typed columns, labels as 1.0/0.0/NaN.

    ``columns`` is keyed by column name (a sequence feature's columns appear one by one):
    numeric columns are float64 with NaN for missing, already clipped into the public bounds
    when the schema clips (log scaling is left to featurization); categorical columns are
    object arrays of canonical strings, ``None`` for missing (values outside the vocabulary
    keep their own string when ``unseen = "other"``); boolean columns are float64 1.0/0.0/NaN;
    text columns are object arrays of str or ``None``.
    """

    schema: Schema
    source: str  # the file path, or e.g. "synthetic:ecommerce"
    ids: np.ndarray  # (n,) object: the id column, or "row-<i>" without one
    columns: dict[str, np.ndarray]  # column name -> (n,)
    labels: dict[str, np.ndarray]  # label name -> (n,) float64

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray) -> Table:
        """The rows at integer positions ``index``, in that order."""
        idx = np.asarray(index)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"Table.take needs integer positions, got dtype {idx.dtype}")
        return Table(
            schema=self.schema,
            source=self.source,
            ids=self.ids[idx],
            columns={name: values[idx] for name, values in self.columns.items()},
            labels={name: values[idx] for name, values in self.labels.items()},
        )


def load_table(schema: Schema, path: str | Path) -> Table:
    """Read ``path`` and validate it against ``schema`` (see :func:`validate_frame`)."""
    return validate_frame(schema, read_frame(schema, path), source=str(path))


def read_frame(schema: Schema, path: str | Path) -> pd.DataFrame:
    """Read a raw CSV (optionally compressed) or Parquet file into a frame of stripped strings.

    Missing cells are left as written (the schema's ``na_values`` decide later). An event log
    (``schema.events``) is aggregated to one row per user. Raises :class:`DataError` when the
    file cannot be read, :class:`SchemaError` when its shape contradicts the schema.
    """
    path = Path(path)
    frame = read_raw(path, delimiter=schema.delimiter, header=schema.header, names=schema.column_names)
    if schema.events is not None:
        frame = aggregate_events(schema, frame, source=str(path))
    return frame


def read_raw(path: Path, *, delimiter: str, header: bool, names: tuple[str, ...] | None) -> pd.DataFrame:
    check_file(path)
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            frame = pd.read_parquet(path)
            frame = pd.DataFrame({col: as_str(frame[col]) for col in frame.columns})
        else:
            # The header is read as a data row: pandas would otherwise rename a repeated
            # column name ("AGE", "AGE.1") and turn the first field of rows that are one
            # field longer than the header into an index, shifting every value silently.
            frame = pd.read_csv(
                path,
                sep=delimiter,
                header=None,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                compression="infer",
                encoding="utf-8-sig",
            )
            if header:
                columns = ["" if pd.isna(c) else str(c) for c in frame.iloc[0]]
                frame = frame.iloc[1:].reset_index(drop=True)
                frame.columns = columns
    except pd.errors.EmptyDataError:
        raise DataError(f"cannot read data file {path}: the file is empty") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read data file {path}: it is not UTF-8 text ({exc})") from None
    except (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, tarfile.TarError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read data file {path}: {reason}") from None
    except ImportError as exc:  # e.g. a .zst file without the zstandard package
        raise DataError(f"cannot read data file {path}: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if not header and names is not None:
        if frame.shape[1] != len(names):
            raise SchemaError(
                str(path),
                [f"the file has {frame.shape[1]} columns but table.columns names {len(names)}"],
            )
        frame.columns = list(names)
    for i in range(frame.shape[1]):  # by position: a repeated name is reported by validate_frame
        frame.isetitem(i, frame.iloc[:, i].str.strip())
    return frame


def check_file(path: Path) -> None:
    if not path.is_file():
        reason = "it does not exist" if not path.exists() else "it is not a regular file"
        raise DataError(f"cannot read data file {path}: {reason}")


def validate_frame(schema: Schema, frame: pd.DataFrame, *, source: str) -> Table:
    """Check every column and row of ``frame`` against ``schema``; raise once, listing all.

    Problems reported together: missing columns, values that are not numbers / booleans,
    values outside the public bounds (``out_of_bounds = "reject"``; with ``"clip"`` they are
    clipped and counted in the log), unseen categories (``unseen = "reject"``), missing values
    where the policy is ``"reject"``, missing or duplicate ids, too few rows, label values that
    are neither positive nor a recognisable negative. Columns the schema does not declare are
    ignored and listed in the log.
    """
    problems: list[str] = []
    na_values = frozenset(schema.na_values)
    n = len(frame)
    names = [str(c) for c in frame.columns]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        problems.append(f"column name(s) {quoted(repeated)} occur more than once in the header")
    by_name = {str(c): c for c in frame.columns if str(c) not in repeated}
    id_column = schema.id_column or (schema.events.user if schema.events else None)
    wanted = list(dict.fromkeys(([id_column] if id_column else []) + list(schema.input_columns)))
    absent = [c for c in wanted if c not in by_name and c not in repeated]
    if absent:
        hint = next(
            (
                f"; the header looks delimited by {d!r}, not by table.delimiter {schema.delimiter!r}"
                for d in (",", ";", "\t", "|")
                if d != schema.delimiter and len(names) == 1 and d in names[0]
            ),
            "",
        )
        problems.append(f"missing column(s) {quoted(absent)} (columns found: {quoted(names)}){hint}")
    extra = [c for c in by_name if c not in wanted]
    if extra:
        logger.info("%s: ignoring %d undeclared column(s): %s", source, len(extra), quoted(extra))
    if n == 0:
        problems.append("the table has no data rows")
    elif n < schema.min_rows:
        problems.append(f"the table has {n} row(s), fewer than table.min_rows = {schema.min_rows}")

    if id_column and id_column in by_name:
        ids = _ids(id_column, frame[by_name[id_column]], na_values, problems)
    else:
        ids = ("row-" + pd.Series(np.arange(1, n + 1)).astype(str)).to_numpy(dtype=object)

    columns: dict[str, np.ndarray] = {}
    for feat in schema.features:
        for col in feat.columns:
            if col not in by_name:
                continue
            text, missing = text_cells(frame[by_name[col]], na_values)
            if feat.missing == "reject" and missing.any():
                problems.append(
                    f"column '{col}': {int(missing.sum())} value(s) are missing but feature "
                    f"'{feat.name}' has missing = \"reject\", at rows {row_list(missing)}"
                )
            columns[col] = _convert(schema, feat, col, text, missing, problems, source)

    labels: dict[str, np.ndarray] = {}
    for label in schema.labels:
        if label.column in by_name:
            text, missing = text_cells(frame[by_name[label.column]], na_values)
            labels[label.name] = _label(label.column, label.positive, text, missing, problems)

    if problems:
        raise SchemaError(source, problems)
    return Table(schema=schema, source=source, ids=ids, columns=columns, labels=labels)


def _convert(
    schema: Schema,
    feat: Feature,
    col: str,
    text: pd.Series,
    missing: np.ndarray,
    problems: list[str],
    source: str,
) -> np.ndarray:
    """One column's typed values; appends its problems."""
    if isinstance(feat, TextFeature):
        return text.to_numpy(dtype=object, na_value=None)
    if isinstance(feat, BooleanFeature):
        true_keys = {canonical(v).casefold() for v in feat.true_values}
        false_keys = {canonical(v).casefold() for v in feat.false_values}

        def truth(value: object) -> float:
            key = canonical(value).casefold()
            return 1.0 if key in true_keys else 0.0 if key in false_keys else -1.0

        values = map_unique(text, truth, float)
        bad = values == -1.0
        if bad.any():
            spelled = quoted(list(feat.true_values[:3]) + list(feat.false_values[:3]))
            problems.append(problem(col, bad, text, f"are not booleans (such as {spelled})"))
        return np.where(missing | bad, np.nan, values)
    if isinstance(feat, NumericFeature) or (isinstance(feat, SequenceFeature) and feat.element == "numeric"):
        numbers, bad = parse_numbers(text, missing)
        if bad.any():
            problems.append(problem(col, bad, text, "are not numbers"))
        outside = (numbers < feat.lo) | (numbers > feat.hi)
        if outside.any():
            bounds = f"[{number_text(feat.lo)}, {number_text(feat.hi)}]"
            if schema.out_of_bounds == "reject":
                problems.append(problem(col, outside, text, f"are outside the bounds {bounds}"))
            else:
                logger.info(
                    "%s: clipped %d value(s) of column '%s' into %s",
                    source,
                    int(outside.sum()),
                    col,
                    bounds,
                )
                numbers = np.clip(numbers, feat.lo, feat.hi)
        return numbers
    assert isinstance(feat, CategoricalFeature | SequenceFeature)
    values = map_unique(text, canonical, object)
    if feat.vocabulary is not None:
        unseen = ~missing & ~isin(values, feat.vocabulary)
        if unseen.any() and feat.unseen == "reject":
            problems.append(
                problem(
                    col,
                    unseen,
                    text,
                    f"are not in the vocabulary of feature '{feat.name}' ({quoted(list(feat.vocabulary))})",
                )
            )
        elif unseen.any():
            logger.info(
                "%s: %d value(s) of column '%s' are outside the vocabulary (coded as other)",
                source,
                int(unseen.sum()),
                col,
            )
    return values


def _ids(column: str, series: pd.Series, na_values: frozenset[str], problems: list[str]) -> np.ndarray:
    text, missing = text_cells(series, na_values)
    if missing.any():
        problems.append(f"id column '{column}': {int(missing.sum())} row(s) have no id, at rows {row_list(missing)}")
    duplicated = text.duplicated(keep=False).to_numpy() & ~missing
    if duplicated.any():
        first = text.iloc[int(np.flatnonzero(duplicated)[0])]
        same = (text == first).fillna(False).to_numpy(dtype=bool)
        problems.append(
            f"id column '{column}': {text[duplicated].nunique()} id(s) occur more than once "
            f"({int(duplicated.sum())} rows), e.g. {first!r} at rows {row_list(same)}"
        )
    return text.to_numpy(dtype=object, na_value=None)


def _label(
    column: str,
    positive: tuple[str, ...],
    text: pd.Series,
    missing: np.ndarray,
    problems: list[str],
) -> np.ndarray:
    """1.0 for a positive spelling, 0.0 otherwise, NaN when missing.

    A non-positive value must be a usual negative spelling (0, false, no, ...) unless it is
    the only non-positive value in the column (e.g. ``1`` where ``2`` is positive).
    """
    positive_keys = {canonical(p).casefold() for p in positive}
    keys = map_unique(text, lambda v: canonical(v).casefold(), object)
    is_positive = isin(keys, positive_keys)
    negative = ~missing & ~is_positive
    others = set(pd.unique(keys[negative]))
    if len(others) > 1:
        known = {canonical(v).casefold() for v in DEFAULT_FALSE}
        bad = negative & ~isin(keys, known)
        if bad.any():
            problems.append(
                problem(
                    column,
                    bad,
                    text,
                    f"are neither positive ({quoted(list(positive))}) nor a recognisable negative (0, false, no)",
                )
            )
    return np.where(missing, np.nan, is_positive.astype(np.float64))
