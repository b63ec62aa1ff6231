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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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


def validate_frame(schema: Schema, frame: pd.DataFrame | pa.Table, *, source: str) -> Table:
    """Check every column and row of ``frame`` against ``schema``; raise once, listing all.

    Problems reported together: missing columns, values that are not numbers / booleans,
    values outside the public bounds (``out_of_bounds = "reject"``; with ``"clip"`` they are
    clipped and counted in the log), unseen categories (``unseen = "reject"``), missing values
    where the policy is ``"reject"``, missing or duplicate ids, too few rows, label values that
    are neither positive nor a recognisable negative. Columns the schema does not declare are
    ignored and listed in the log.

    ``frame`` may also be an Arrow table (cells as read, e.g. by ``pyarrow.csv``; column names
    already stripped): it is checked column by column in Arrow and numpy, with the same result
    as its pandas frame; a table with any problem is checked again as a pandas frame, so the
    error is exactly the one the frame gives.
    """
    if isinstance(frame, pa.Table):
        table = _validate_arrow(schema, frame, source=source)
        if table is not None:
            return table
        frame = _arrow_frame(frame)
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


# --- Arrow tables: the same checks without a Python object per cell ------------------------------

# Exactly the characters str.strip() removes (str.isspace(); none lies above U+3000).
_WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_EDGE_BYTE = np.zeros(256, dtype=bool)  # bytes a stripped character may start or end with
_EDGE_BYTE[[ord(c) for c in _WHITESPACE if ord(c) < 0x80]] = True
_EDGE_BYTE[0x80:] = True  # any byte of a non-ASCII character (checked exactly by the trim)


def _arrow_frame(table: pa.Table) -> pd.DataFrame:
    """The pandas frame of an Arrow table, repeated column names kept."""
    frame = pd.DataFrame({i: column.to_pandas() for i, column in enumerate(table.columns)})
    frame.columns = list(table.column_names)
    return frame


def _arrow_strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as strings, as :func:`~fedpersona.data.cells.as_str` writes it (nulls kept)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array
    if pa.types.is_integer(array.type) and array.null_count == 0:  # str(int) is Arrow's cast
        return pc.cast(array, pa.string())
    return pa.array(as_str(array.to_pandas()), type=pa.string(), from_pandas=True)  # as pandas writes it


def _stripped_cells(array: pa.Array, na_values: frozenset[str]) -> tuple[pa.Array, np.ndarray]:
    """As :func:`~fedpersona.data.cells.text_cells`: stripped strings (null where missing) and
    the missing mask. Only a column with a cell that may start or end in whitespace is trimmed."""
    if _may_need_strip(array):
        array = pc.utf8_trim(array, characters=_WHITESPACE)
    missing_cells = pc.is_in(array, value_set=pa.array(sorted(na_values), type=array.type))
    missing = np.asarray(missing_cells.to_numpy(zero_copy_only=False), dtype=bool)
    if array.null_count:
        missing |= np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if missing.any():
        array = pc.if_else(pa.array(missing), pa.scalar(None, array.type), array)
    return array, missing


def _may_need_strip(array: pa.Array) -> bool:
    if len(array) == 0:
        return False
    offsets_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    _, offsets_buffer, data_buffer = array.buffers()
    if data_buffer is None:
        return False
    width = np.dtype(offsets_type).itemsize
    offsets = np.frombuffer(
        offsets_buffer, dtype=offsets_type, count=len(array) + 1, offset=array.offset * width
    ).astype(np.int64, copy=False)
    data = np.frombuffer(data_buffer, dtype=np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    filled = starts < ends
    return bool(_EDGE_BYTE[data[starts[filled]]].any() or _EDGE_BYTE[data[ends[filled] - 1]].any())


def _unique_map(array: pa.Array, func: Callable[[str], object], fill: object) -> tuple[np.ndarray, np.ndarray]:
    """``func`` of each distinct non-null value, then ``fill``; per row, the index of its value
    there (-1, i.e. ``fill``, for a null)."""
    encoded = array.dictionary_encode()
    mapped = np.empty(len(encoded.dictionary) + 1, dtype=object)
    mapped[:-1] = [func(v) for v in encoded.dictionary.to_pylist()]
    mapped[-1] = fill
    index = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return mapped, index


def _validate_arrow(schema: Schema, frame: pa.Table, *, source: str) -> Table | None:
    """The :class:`Table` of an Arrow table that passes every check of :func:`validate_frame`,
    ``None`` at the first problem (the caller then reports every problem from the pandas frame).
    Log lines are written only when the table passes."""
    na_values = frozenset(schema.na_values)
    n = frame.num_rows
    names = list(frame.column_names)
    if len(set(names)) != len(names) or n == 0 or n < schema.min_rows:
        return None
    id_column = schema.id_column or (schema.events.user if schema.events else None)
    wanted = list(dict.fromkeys(([id_column] if id_column else []) + list(schema.input_columns)))
    if any(c not in names for c in wanted):
        return None
    notes: list[tuple[object, ...]] = []
    extra = [c for c in names if c not in wanted]
    if extra:
        notes.append(("%s: ignoring %d undeclared column(s): %s", source, len(extra), quoted(extra)))

    if id_column:
        text, missing = _stripped_cells(_arrow_strings(frame.column(id_column)), na_values)
        if missing.any() or pc.count_distinct(text).as_py() != n:
            return None
        ids = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
    else:
        ids = ("row-" + pd.Series(np.arange(1, n + 1)).astype(str)).to_numpy(dtype=object)

    columns: dict[str, np.ndarray] = {}
    for feat in schema.features:
        for col in feat.columns:
            text, missing = _stripped_cells(_arrow_strings(frame.column(col)), na_values)
            if feat.missing == "reject" and missing.any():
                return None
            values = _convert_arrow(schema, feat, col, text, missing, notes, source)
            if values is None:
                return None
            columns[col] = values

    labels: dict[str, np.ndarray] = {}
    for label in schema.labels:
        if label.column in names:
            problems: list[str] = []
            cells, missing = text_cells(frame.column(label.column).to_pandas(), na_values)
            labels[label.name] = _label(label.column, label.positive, cells, missing, problems)
            if problems:
                return None
    for note in notes:
        logger.info(*note)
    return Table(schema=schema, source=source, ids=ids, columns=columns, labels=labels)


def _convert_arrow(
    schema: Schema,
    feat: Feature,
    col: str,
    text: pa.Array,
    missing: np.ndarray,
    notes: list[tuple[object, ...]],
    source: str,
) -> np.ndarray | None:
    """As :func:`_convert` on a stripped Arrow column; ``None`` where it would report a problem."""
    if isinstance(feat, TextFeature):
        mapped, index = _unique_map(text, str, None)
        return mapped[index]
    if isinstance(feat, BooleanFeature):
        true_keys = {canonical(v).casefold() for v in feat.true_values}
        false_keys = {canonical(v).casefold() for v in feat.false_values}

        def truth(value: object) -> float:
            key = canonical(value).casefold()
            return 1.0 if key in true_keys else 0.0 if key in false_keys else -1.0

        mapped, index = _unique_map(text, truth, np.nan)
        if (mapped[:-1] == -1.0).any():
            return None
        return mapped.astype(np.float64)[index]
    if isinstance(feat, NumericFeature) or (isinstance(feat, SequenceFeature) and feat.element == "numeric"):
        try:
            parsed = pc.cast(text, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
        numbers = np.asarray(parsed.to_numpy(zero_copy_only=False), dtype=np.float64)
        finite = np.isfinite(numbers)
        if (~missing & ~finite).any():
            return None
        numbers = np.where(finite, numbers, np.nan)
        outside = (numbers < feat.lo) | (numbers > feat.hi)
        if outside.any():
            if schema.out_of_bounds == "reject":
                return None
            bounds = f"[{number_text(feat.lo)}, {number_text(feat.hi)}]"
            notes.append(("%s: clipped %d value(s) of column '%s' into %s", source, int(outside.sum()), col, bounds))
            numbers = np.clip(numbers, feat.lo, feat.hi)
        return numbers
    assert isinstance(feat, CategoricalFeature | SequenceFeature)
    mapped, index = _unique_map(text, canonical, None)
    values = mapped[index]
    if feat.vocabulary is not None:
        unseen = (~isin(mapped, feat.vocabulary))[index] & ~missing
        if unseen.any():
            if feat.unseen == "reject":
                return None
            notes.append(
                (
                    "%s: %d value(s) of column '%s' are outside the vocabulary (coded as other)",
                    source,
                    int(unseen.sum()),
                    col,
                )
            )
    return values
