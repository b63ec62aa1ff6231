"""Partner tables: read a raw file, check it against its schema, hand back typed columns.

The data flow is ``read_frame`` (raw CSV/Parquet -> a frame of strings; an event log is first
aggregated to one row per user) -> ``validate_frame`` (every check at once, one
:class:`~fedpersona.errors.SchemaError` listing every problem) -> :class:`Table`.
``load_table`` does both. ``infer_schema`` drafts a schema from a local file for a data steward
to review; nothing here fits bounds or vocabularies silently.

Rows are numbered from 1, counting data rows only (the header is not a row), in every message.
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import math
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedpersona.data.schema import (
    DEFAULT_FALSE,
    DEFAULT_NA,
    DEFAULT_TRUE,
    DELIMITERS,
    KINDS,
    BooleanFeature,
    CategoricalFeature,
    EventAggregate,
    Feature,
    NumericFeature,
    Schema,
    SequenceFeature,
    TextFeature,
    _canonical,
)
from fedpersona.errors import ConfigError, DataError, SchemaError

__all__ = ["Table", "infer_schema", "load_table", "read_frame", "validate_frame"]

logger = logging.getLogger(__name__)

_PARQUET_SUFFIXES = (".parquet", ".pq")
_SHOWN_ROWS = 5
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ID_NAME = re.compile(r"id|.*[^A-Za-z]id|.*Id|.*ID", re.IGNORECASE)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DATE = r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}(?:[ T][\d:.]+)?"
_RARE = 5  # infer_schema leaves categories seen in fewer rows out of a drafted vocabulary


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
    frame = _read_raw(path, delimiter=schema.delimiter, header=schema.header, names=schema.column_names)
    if schema.events is not None:
        frame = _aggregate_events(schema, frame, source=str(path))
    return frame


def _read_raw(path: Path, *, delimiter: str, header: bool, names: tuple[str, ...] | None) -> pd.DataFrame:
    _check_file(path)
    try:
        if path.suffix.lower() in _PARQUET_SUFFIXES:
            frame = pd.read_parquet(path)
            frame = pd.DataFrame({col: _as_str(frame[col]) for col in frame.columns})
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


def _check_file(path: Path) -> None:
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
        problems.append(f"column name(s) {_quoted(repeated)} occur more than once in the header")
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
        problems.append(f"missing column(s) {_quoted(absent)} (columns found: {_quoted(names)}){hint}")
    extra = [c for c in by_name if c not in wanted]
    if extra:
        logger.info("%s: ignoring %d undeclared column(s): %s", source, len(extra), _quoted(extra))
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
            text, missing = _text(frame[by_name[col]], na_values)
            if feat.missing == "reject" and missing.any():
                problems.append(
                    f"column '{col}': {int(missing.sum())} value(s) are missing but feature "
                    f"'{feat.name}' has missing = \"reject\", at rows {_rows(missing)}"
                )
            columns[col] = _convert(schema, feat, col, text, missing, problems, source)

    labels: dict[str, np.ndarray] = {}
    for label in schema.labels:
        if label.column in by_name:
            text, missing = _text(frame[by_name[label.column]], na_values)
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
        true_keys = {_canonical(v).casefold() for v in feat.true_values}
        false_keys = {_canonical(v).casefold() for v in feat.false_values}

        def truth(value: object) -> float:
            key = _canonical(value).casefold()
            return 1.0 if key in true_keys else 0.0 if key in false_keys else -1.0

        values = _map_unique(text, truth, float)
        bad = values == -1.0
        if bad.any():
            spelled = _quoted(list(feat.true_values[:3]) + list(feat.false_values[:3]))
            problems.append(_problem(col, bad, text, f"are not booleans (such as {spelled})"))
        return np.where(missing | bad, np.nan, values)
    if isinstance(feat, NumericFeature) or (isinstance(feat, SequenceFeature) and feat.element == "numeric"):
        numbers, bad = _numbers(text, missing)
        if bad.any():
            problems.append(_problem(col, bad, text, "are not numbers"))
        outside = (numbers < feat.lo) | (numbers > feat.hi)
        if outside.any():
            bounds = f"[{_number_text(feat.lo)}, {_number_text(feat.hi)}]"
            if schema.out_of_bounds == "reject":
                problems.append(_problem(col, outside, text, f"are outside the bounds {bounds}"))
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
    values = _map_unique(text, _canonical, object)
    if feat.vocabulary is not None:
        unseen = ~missing & ~_isin(values, feat.vocabulary)
        if unseen.any() and feat.unseen == "reject":
            problems.append(
                _problem(
                    col,
                    unseen,
                    text,
                    f"are not in the vocabulary of feature '{feat.name}' ({_quoted(list(feat.vocabulary))})",
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
    text, missing = _text(series, na_values)
    if missing.any():
        problems.append(f"id column '{column}': {int(missing.sum())} row(s) have no id, at rows {_rows(missing)}")
    duplicated = text.duplicated(keep=False).to_numpy() & ~missing
    if duplicated.any():
        first = text.iloc[int(np.flatnonzero(duplicated)[0])]
        same = (text == first).fillna(False).to_numpy(dtype=bool)
        problems.append(
            f"id column '{column}': {text[duplicated].nunique()} id(s) occur more than once "
            f"({int(duplicated.sum())} rows), e.g. {first!r} at rows {_rows(same)}"
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
    positive_keys = {_canonical(p).casefold() for p in positive}
    keys = _map_unique(text, lambda v: _canonical(v).casefold(), object)
    is_positive = _isin(keys, positive_keys)
    negative = ~missing & ~is_positive
    others = set(pd.unique(keys[negative]))
    if len(others) > 1:
        known = {_canonical(v).casefold() for v in DEFAULT_FALSE}
        bad = negative & ~_isin(keys, known)
        if bad.any():
            problems.append(
                _problem(
                    column,
                    bad,
                    text,
                    f"are neither positive ({_quoted(list(positive))}) nor a recognisable negative (0, false, no)",
                )
            )
    return np.where(missing, np.nan, is_positive.astype(np.float64))


def _text(series: pd.Series, na_values: frozenset[str]) -> tuple[pd.Series, np.ndarray]:
    """Stripped strings (NaN where missing) and the missing mask of one column.

    Non-string columns (numbers, booleans: from Parquet or an aggregated event log) are
    written as strings first; categories are canonicalised later, so 1.0 and "1" agree.
    """
    if not isinstance(series.dtype, pd.StringDtype):
        series = _as_str(series)
    text = series.str.strip()
    missing = text.isna().to_numpy(dtype=bool) | text.isin(na_values).to_numpy(dtype=bool)
    return text.where(~missing), missing


def _as_str(series: pd.Series) -> pd.Series:
    """``series`` as strings, keeping missing cells missing (NaN), not the string "nan"."""
    return series.astype(str).where(~series.isna().to_numpy(dtype=bool))


def _map_unique(series: pd.Series, func: Callable[[object], object], dtype: type) -> np.ndarray:
    """``func`` applied to each distinct non-missing value, spread back over the rows."""
    codes, uniques = pd.factorize(series)
    mapped = np.array([func(u) for u in uniques] + [None], dtype=object)
    out = mapped[codes]  # code -1 (missing) picks the trailing None
    return out.astype(np.float64) if dtype is float else out


def _isin(values: np.ndarray, items: Iterable[str]) -> np.ndarray:
    return pd.Series(values, dtype=object).isin(list(items)).to_numpy(dtype=bool)


def _numbers(text: pd.Series, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parsed numbers (NaN where missing or bad) and the mask of cells that are not numbers."""
    try:  # Arrow parses decimal and scientific notation ("7.50E-05") fast, nulls as NaN
        values = pc.cast(pa.array(text, from_pandas=True), pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        values = np.asarray(pd.to_numeric(text, errors="coerce"), dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return np.where(finite, values, np.nan), ~missing & ~finite


def _rows(mask: np.ndarray) -> str:
    where = np.flatnonzero(mask)
    shown = ", ".join(str(int(i) + 1) for i in where[:_SHOWN_ROWS])
    return shown + (", ..." if where.size > _SHOWN_ROWS else "")


def _problem(column: str, mask: np.ndarray, text: pd.Series, what: str) -> str:
    example = text.iloc[int(np.flatnonzero(mask)[0])]
    return f"column '{column}': {int(mask.sum())} value(s) {what}, e.g. {example!r} at rows {_rows(mask)}"


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _number_text(x: float) -> str:
    x = round(float(x), 10)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


# --- event logs -------------------------------------------------------------------------------


def _aggregate_events(schema: Schema, raw: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """One row per user from an event log, following ``schema.events``."""
    events = schema.events
    assert events is not None
    na_values = frozenset(schema.na_values)
    needed = [events.user, events.time] + [a.column for a in events.aggregates]
    absent = [c for c in dict.fromkeys(needed) if c is not None and c not in raw.columns]
    if absent:
        raise SchemaError(
            source,
            [f"event log: missing column(s) {_quoted(absent)} "
             f"(columns found: {_quoted(map(str, raw.columns))})"],
        )  # fmt: skip
    problems: list[str] = []
    users, no_user = _text(raw[events.user], na_values)
    if no_user.any():
        problems.append(
            f"event log column '{events.user}': {int(no_user.sum())} event(s) have no user id, at rows {_rows(no_user)}"
        )
    times = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
    if events.time is not None:
        text, _ = _text(raw[events.time], na_values)
        fmt = events.time_format or "ISO8601"
        try:
            times = pd.to_datetime(text, format=fmt, errors="coerce")
        except (ValueError, TypeError) as exc:
            problems.append(f"events.time_format {fmt!r} cannot be used ({exc})")
        else:
            bad = times.isna().to_numpy(dtype=bool)
            if bad.any():
                what = f"are not dates in the format {fmt!r}"
                problems.append("event log " + _problem(events.time, bad, text, what))
    reference = pd.NaT
    if events.reference is not None:
        try:
            reference = pd.Timestamp(events.reference)
        except (ValueError, TypeError):
            problems.append(f"events.reference {events.reference!r} is not a date")
    numbers: dict[str, np.ndarray] = {}
    texts: dict[str, pd.Series] = {}
    edges: dict[str, pd.DatetimeIndex] = {}
    id_name = schema.id_column or events.user
    for agg in events.aggregates:
        if agg.column and agg.op in ("sum", "mean", "min", "max", "sum_by_period"):
            if agg.column not in numbers:
                text, missing = _text(raw[agg.column], na_values)
                numbers[agg.column], bad = _numbers(text, missing)
                if bad.any():
                    problems.append("event log " + _problem(agg.column, bad, text, "are not numbers"))
        if agg.column and agg.op in ("nunique", "first", "last"):
            texts[agg.column] = _text(raw[agg.column], na_values)[0]
        if agg.op.endswith("_by_period"):
            try:
                edges[agg.name] = pd.date_range(agg.start, periods=agg.periods + 1, freq=agg.freq)
                if edges[agg.name][0] != pd.Timestamp(agg.start):
                    problems.append(
                        f"events.aggregate.{agg.name}.start {agg.start!r} is not at the start "
                        f"of a period of freq {agg.freq!r}"
                    )
            except (ValueError, TypeError) as exc:
                problems.append(f"events.aggregate.{agg.name}: bad start or freq ({exc})")
        if id_name in _output_names(agg):
            problems.append(f"events.aggregate.{agg.name} clashes with the id column '{id_name}'")
    if problems:
        raise SchemaError(source, problems)

    codes, uniques = pd.factorize(users)  # users in order of first appearance
    out: dict[str, object] = {id_name: np.asarray(uniques, dtype=object)}
    order = np.argsort(times.to_numpy(), kind="stable")  # first/last follow time, then file order
    for agg in events.aggregates:
        try:
            out.update(_aggregate(agg, codes, len(uniques), times, reference, numbers, texts, edges, order))
        except (TypeError, ValueError) as exc:  # e.g. dates with time zones vs. a naive start
            problem = f"events.aggregate.{agg.name}: cannot compute ({exc})"
            raise SchemaError(source, [problem]) from None
    return pd.DataFrame(out)


def _output_names(agg: EventAggregate) -> list[str]:
    if agg.op.endswith("_by_period"):
        return [f"{agg.name}_{i}" for i in range(1, agg.periods + 1)]
    return [agg.name]


def _aggregate(
    agg: EventAggregate,
    codes: np.ndarray,
    n_users: int,
    times: pd.Series,
    reference: pd.Timestamp,
    numbers: dict[str, np.ndarray],
    texts: dict[str, pd.Series],
    edges: dict[str, pd.DatetimeIndex],
    order: np.ndarray,
) -> dict[str, object]:
    """The output column(s) of one aggregate, each of length ``n_users``."""
    day = pd.Timedelta(days=1)
    if agg.op == "count":
        return {agg.name: np.bincount(codes, minlength=n_users).astype(np.float64)}
    if agg.op in ("days_since_first", "days_since_last", "active_days"):
        by_user = times.groupby(codes)
        if agg.op == "active_days":
            return {agg.name: times.dt.normalize().groupby(codes).nunique().to_numpy(np.float64)}
        first_or_last = by_user.min() if agg.op == "days_since_first" else by_user.max()
        return {agg.name: ((reference - first_or_last) / day).to_numpy(np.float64)}
    if agg.op.endswith("_by_period"):
        bins = edges[agg.name]
        step = bins.searchsorted(pd.DatetimeIndex(times), side="right") - 1
        inside = (step >= 0) & (step < agg.periods)
        weights = np.ones(len(codes))
        if agg.op == "sum_by_period":
            assert agg.column is not None
            weights = np.nan_to_num(numbers[agg.column])
        flat = codes[inside] * agg.periods + step[inside]
        grid = np.bincount(flat, weights=weights[inside], minlength=n_users * agg.periods)
        grid = grid.reshape(n_users, agg.periods)
        return {f"{agg.name}_{i + 1}": grid[:, i] for i in range(agg.periods)}
    assert agg.column is not None
    if agg.op in ("sum", "mean", "min", "max"):
        series = pd.Series(numbers[agg.column]).groupby(codes)
        return {agg.name: getattr(series, agg.op)().to_numpy(np.float64)}
    text = texts[agg.column]
    if agg.op == "nunique":
        return {agg.name: text.groupby(codes).nunique().to_numpy(np.float64)}
    ordered = text.iloc[order].groupby(codes[order])  # op is first or last
    return {agg.name: getattr(ordered, agg.op)().to_numpy(dtype=object, na_value=None)}


# --- drafting a schema ------------------------------------------------------------------------


def infer_schema(
    path: str | Path,
    *,
    kind: str,
    delimiter: str | None = None,
    label: str | None = None,
    max_categories: int = 50,
) -> str:
    """Draft a schema (TOML text) from a local file, for a data steward to review.

    Types are guessed per column; bounds are the observed range widened to round numbers and
    vocabularies are the observed categories. The header comment says that all of them become
    public once accepted. The delimiter is sniffed (comma, semicolon, tab, pipe, whitespace)
    unless given; a first line without any number is taken as the header.
    """
    path = Path(path)
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if max_categories < 2:
        raise ConfigError(f"max_categories must be >= 2, got {max_categories}")
    _check_file(path)
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        delim_key, header = ",", True
        frame = _read_raw(path, delimiter=",", header=True, names=None)
    else:
        delim_key = _delimiter_key(delimiter) if delimiter is not None else _sniff_delimiter(path)
        header = _sniff_header(path, DELIMITERS[delim_key])
        frame = _read_raw(path, delimiter=DELIMITERS[delim_key], header=header, names=None)
        if not header:
            frame.columns = [f"column_{i}" for i in range(1, frame.shape[1] + 1)]
    names = list(frame.columns)
    if label is not None and label not in names:
        raise ConfigError(f"{path}: no label column {label!r} (columns found: {_quoted(names)})")
    na_values = frozenset(DEFAULT_NA)
    n = len(frame)
    id_column = next(
        (c for c in names if _ID_NAME.fullmatch(c) and c != label and _is_unique(frame[c], na_values)),
        None,
    )
    blocks: list[str] = []
    id_like: list[str] = [id_column] if id_column else []
    for col in names:
        if col in (id_column, label):
            continue
        block, looks_like_id = _draft_feature(col, frame[col], na_values, max_categories)
        if looks_like_id:
            id_like.append(col)
        blocks.append(block)
    if label is not None:
        blocks.append(_draft_label(label, frame[label], na_values))

    head = [
        f"# DRAFT schema drafted by `fedpersona schema infer` from {path.name}",
        f"# ({n} rows, {len(names)} columns). Review every line before accepting it.",
        "#",
        "# Once accepted, every bound, vocabulary and bucket count below is PUBLIC: it is shared",
        "# with the coordinator and with all partners. The bounds were drafted from this local",
        "# file (the observed range, widened and rounded): replace them with domain bounds that do",
        "# not reveal any individual's value, e.g. age [18, 100], durations [0, 4000] seconds.",
        "# Vocabularies list the categories seen here in at least 5 rows: drop any that could",
        "# single out a person (they fall into the 'other' code), add the ones the domain allows.",
        "# A number's `typical` range (this file's 5th to 95th percentile, rounded) centres the",
        "# model's input: it tells the federation where most of your users lie. Replace it with",
        "# published statistics, or delete the line to keep that private.",
        f"# Columns that look like ids: {_quoted(id_like) or 'none'}.",
        "",
        "[table]",
        f"kind = {json.dumps(kind)}",
        "version = 1",
    ]
    if id_column:
        head.append(f"id = {json.dumps(id_column)}")
    head += [f"delimiter = {json.dumps(delim_key)}", f"header = {'true' if header else 'false'}"]
    if not header:
        head.append(f"columns = [{', '.join(json.dumps(c) for c in names)}]")
    head += [
        'missing = "drop"',
        'out_of_bounds = "clip"',
        f"min_rows = {min(20, max(n, 1))}",
        f"na_values = [{', '.join(json.dumps(v) for v in DEFAULT_NA)}]",
    ]
    return "\n".join(head) + "\n\n" + "\n\n".join(blocks) + "\n"


def _draft_feature(col: str, series: pd.Series, na_values: frozenset[str], max_categories: int) -> tuple[str, bool]:
    """The TOML block of one column and whether the column looks like an id."""
    text, missing = _text(series, na_values)
    values = text[~missing]
    counts = values.value_counts()
    key = f"[features.{_toml_key(col)}]"
    if counts.empty:
        return f"# '{col}' is empty in this file: review its type\n{key}\ntype = \"text\"", False
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    numeric = bool(np.isfinite(numbers).all())
    unique = len(counts) == len(values) and len(values) >= 20
    spelled = set(DEFAULT_TRUE) | set(DEFAULT_FALSE)
    if len(counts) <= 2 and all(v in spelled for v in counts.index):
        return f'{key}\ntype = "boolean"', False
    notes: list[str] = []
    if numeric:
        lo, hi = _nice_bounds(float(numbers.min()), float(numbers.max()))
        log = lo >= 0 and len(counts) > 2 and float(pd.Series(numbers).skew()) > 2.0
        integral = bool(np.all(numbers == np.round(numbers)))
        if len(counts) == 1:
            notes.append("a single value in this file: drop it unless it varies elsewhere")
        elif integral and len(counts) <= 20:
            notes.append(f"only {len(counts)} distinct integers: if they are codes, make it categorical")
        if unique and integral:
            notes.append("a different value in every row: an identifier? drop it or make it table.id")
        body = (
            f'type = "numeric"\nbounds = [{_number_text(lo)}, {_number_text(hi)}]\nlog = {"true" if log else "false"}'
        )
        typical = _draft_typical(numbers, lo, hi) if len(counts) > 2 else None
        if typical is not None:
            body += f"\ntypical = [{_number_text(typical[0])}, {_number_text(typical[1])}]"
    elif len(counts) <= max_categories:
        common = [v for v in sorted(counts.index, key=_sort_key) if counts[v] >= _RARE]
        if len(common) < len(counts):
            rare = len(counts) - len(common)
            notes.append(f"{rare} value(s) seen in under {_RARE} rows left out (coded as 'other')")
        vocabulary = dict.fromkeys(_canonical(v) for v in common)
        words = ", ".join(json.dumps(v, ensure_ascii=False) for v in vocabulary)
        body = f'type = "categorical"\nvocabulary = [{words}]\nunseen = "other"'
        if not common:
            body = 'type = "categorical"\nbuckets = 8'
    elif float(values.str.count(" ").mean()) >= 2.0:
        body = 'type = "text"\nbuckets = 256\nngrams = [1, 2]'
    else:
        buckets = min(4096, max(8, 2 ** math.ceil(math.log2(len(counts)))))
        if values.str.fullmatch(_DATE).all():
            notes.append("looks like dates: better derive a number (e.g. days since) from it")
        elif unique:
            notes.append("a different value in every row: an identifier? drop it or make it table.id")
        body = f'type = "categorical"\nbuckets = {buckets}'
    comments = "".join(f"# {col}: {note}\n" for note in notes)
    return f"{comments}{key}\n{body}", unique and (not numeric or integral)


def _draft_label(col: str, series: pd.Series, na_values: frozenset[str]) -> str:
    text, missing = _text(series, na_values)
    counts = text[~missing].value_counts()
    true_keys = {v.casefold() for v in DEFAULT_TRUE}
    spelled = true_keys | {v.casefold() for v in DEFAULT_FALSE}
    if not counts.empty and all(str(v).casefold() in spelled for v in counts.index):
        positive = sorted({_canonical(v) for v in counts.index if v.casefold() in true_keys})
        note = ""
    else:
        positive = [_canonical(counts.index[-1])] if not counts.empty else ["1"]
        note = f"# {col}: the rarest value was taken as positive; check it\n"
    words = ", ".join(json.dumps(v, ensure_ascii=False) for v in positive or ["1"])
    return f"{note}[labels.{_toml_key(col)}]\npositive = [{words}]"


def _is_unique(series: pd.Series, na_values: frozenset[str]) -> bool:
    text, missing = _text(series, na_values)
    return bool(len(text) > 0 and not missing.any() and not text.duplicated().any())


def _draft_typical(numbers: np.ndarray, lo: float, hi: float) -> tuple[float, float] | None:
    """This file's 5th and 95th percentiles rounded outward to two significant digits, inside
    ``[lo, hi]``; ``None`` when they do not make a range. A draft: publishing it tells the
    federation where most of the partner's users lie (not any one user's value)."""
    p5, p95 = np.quantile(numbers, [0.05, 0.95])
    low, high = max(lo, _round_sig(float(p5), math.floor)), min(hi, _round_sig(float(p95), math.ceil))
    return (low, high) if low < high else None


def _round_sig(x: float, rounding: Callable[[float], float]) -> float:
    """``x`` rounded to two significant digits with ``rounding`` (math.floor or math.ceil)."""
    if x == 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(abs(x))) - 1)
    return float(f"{rounding(x / step) * step:.12g}")  # without binary noise such as 0.12000000000000001


def _nice_bounds(lo: float, hi: float) -> tuple[float, float]:
    """The observed range ``[lo, hi]`` widened by 10 % and rounded outward to round numbers."""
    span = hi - lo
    if lo >= 0 and lo <= span:  # the range reaches down to (near) zero
        return 0.0, _nice_ceil(hi * 1.1) if hi > 0 else 1.0
    span = span or abs(lo)
    step = 10.0 ** math.floor(math.log10(span))
    low = math.floor((lo - 0.1 * span) / step) * step
    high = math.ceil((hi + 0.1 * span) / step) * step
    return (max(low, 0.0) if lo >= 0 else low), high


def _nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is >= ``x`` (``x`` > 0)."""
    scale = 10.0 ** math.floor(math.log10(x))
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= x * (1 - 1e-12))


def _sort_key(value: str) -> tuple[bool, float, str]:
    """Numbers first, in numeric order, then strings in alphabetical order."""
    is_number = bool(_NUMBER.fullmatch(value))
    return (not is_number, float(value) if is_number else 0.0, value)


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _delimiter_key(delimiter: str) -> str:
    if delimiter == r"\s+":
        return "whitespace"
    if delimiter not in DELIMITERS:
        raise ConfigError(f"delimiter must be one of {', '.join(repr(d) for d in DELIMITERS)}, got {delimiter!r}")
    return "\\t" if delimiter == "\t" else delimiter


def _sniff_lines(path: Path, limit: int = 50) -> list[str]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as handle:
            lines = [line.rstrip("\r\n") for _, line in zip(range(limit), handle, strict=False)]
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None
    return [line for line in lines if line.strip()]


def _sniff_delimiter(path: Path) -> str:
    """The delimiter that splits the first lines into the same number (> 1) of fields."""
    lines = [re.sub(r'"[^"]*"', '""', line) for line in _sniff_lines(path)]
    best, best_fields = ",", 0
    for key in (",", ";", "\\t", "|"):
        counts = {line.count(DELIMITERS[key]) for line in lines}
        if len(counts) == 1 and (fields := counts.pop() + 1) > max(best_fields, 1):
            best, best_fields = key, fields
    if best_fields == 0 and lines and len({len(line.split()) for line in lines}) == 1:
        if len(lines[0].split()) > 1:
            return "whitespace"
    return best


def _sniff_header(path: Path, sep: str) -> bool:
    """A first line with no number in it is a header."""
    lines = _sniff_lines(path, limit=1)
    if not lines:
        return True
    cells = re.split(sep, lines[0].strip()) if sep == r"\s+" else lines[0].split(sep)
    return not any(_NUMBER.fullmatch(c.strip().strip('"').strip()) for c in cells)
