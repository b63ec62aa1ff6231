"""Silo schemas: what a partner's user table looks like, declared in TOML.

A schema is the only place where a partner describes its data. Every bound, vocabulary and
bucket count in it is **public by declaration**: it is part of the model's shape and may be
seen by the coordinator and the other partners. Nothing in a schema is ever fitted from the
private rows at training time (``fedpersona schema infer`` only drafts one for a data steward
to review).

The file format (see ``clients/*/schema.toml`` for complete examples)::

    [table]
    kind = "ecommerce"            # ecommerce | finance | health
    version = 1
    id = "ID"                     # optional id column; without it the row number is the id
    delimiter = ","               # ",", ";", "\\t", "|" or "whitespace"
    header = true                 # false: `columns` names the columns in file order
    missing = "drop"              # default missing-value policy: drop (the token) | reject
    out_of_bounds = "clip"        # clip | reject
    min_rows = 20
    na_values = ["", "NA", "N/A"]

    [features.Administrative]     # the key is the column name unless `column` is given
    type = "numeric"
    bounds = [0, 30]
    log = true
    typical = [0, 8]              # optional: about the middle 90% of users (public knowledge)

    [features.Month]
    type = "categorical"
    vocabulary = ["Feb", "Mar"]   # or: buckets = 64 (hashed)
    unseen = "other"              # other | reject

    [features.Weekend]
    type = "boolean"

    [features.note]
    type = "text"
    buckets = 256
    ngrams = [1, 2]

    [features.bill]
    type = "sequence"
    columns = ["BILL_AMT1", "BILL_AMT2"]
    element = "numeric"           # numeric (bounds, log, typical) | categorical (vocabulary or buckets)
    bounds = [-200000, 1000000]

    [labels.Revenue]
    positive = ["TRUE"]

    [events]                      # optional: the file is an event log, many rows per user
    user = "sample_id"
    time = "date"
    time_format = "%Y%m%d"
    [events.aggregate.n_purchases]
    op = "count"
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedpersona.errors import SchemaError

__all__ = [
    "KINDS",
    "BooleanFeature",
    "CategoricalFeature",
    "EventAggregate",
    "EventSpec",
    "Feature",
    "Label",
    "NumericFeature",
    "Schema",
    "SequenceFeature",
    "TextFeature",
    "canonical",
    "load_schema",
    "parse_schema",
    "slot_id",
]

KINDS: tuple[str, ...] = ("ecommerce", "finance", "health")
DELIMITERS: dict[str, str] = {
    ",": ",",
    ";": ";",
    "\\t": "\t",
    "\t": "\t",
    "|": "|",
    "whitespace": r"\s+",
}
EVENT_OPS: tuple[str, ...] = (
    "count",
    "sum",
    "mean",
    "min",
    "max",
    "nunique",
    "first",
    "last",
    "days_since_first",
    "days_since_last",
    "active_days",
    "sum_by_period",
    "count_by_period",
)
DEFAULT_NA = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
DEFAULT_TRUE = ("1", "1.0", "true", "True", "TRUE", "yes", "Yes", "YES", "y", "Y", "t", "T")
DEFAULT_FALSE = ("0", "0.0", "false", "False", "FALSE", "no", "No", "NO", "n", "N", "f", "F")

MissingPolicy = Literal["drop", "reject"]


@dataclass(frozen=True)
class NumericFeature:
    """A number with public bounds; values are clipped (or rejected) outside ``[lo, hi]``.

    ``typical`` (optional, public) is the range that holds about the middle 90% of users,
    from domain knowledge such as published statistics; the encoder centres and scales its
    input by it (see :func:`fedpersona.data.features.layout_of`).
    """

    name: str
    column: str
    lo: float
    hi: float
    log: bool = False
    missing: MissingPolicy = "drop"
    type: Literal["numeric"] = "numeric"
    typical: tuple[float, float] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


@dataclass(frozen=True)
class CategoricalFeature:
    """A category from a public vocabulary, or hashed into ``buckets`` when none is declared."""

    name: str
    column: str
    vocabulary: tuple[str, ...] | None = None
    buckets: int | None = None
    unseen: Literal["other", "reject"] = "other"
    missing: MissingPolicy = "drop"
    type: Literal["categorical"] = "categorical"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def cardinality(self) -> int:
        """Number of codes: the vocabulary plus one "other" code, or the bucket count."""
        if self.vocabulary is not None:
            return len(self.vocabulary) + 1
        assert self.buckets is not None  # guaranteed by the parser
        return self.buckets


@dataclass(frozen=True)
class BooleanFeature:
    """A yes/no value; the spellings of true and false are declared."""

    name: str
    column: str
    true_values: tuple[str, ...] = DEFAULT_TRUE
    false_values: tuple[str, ...] = DEFAULT_FALSE
    missing: MissingPolicy = "drop"
    type: Literal["boolean"] = "boolean"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


@dataclass(frozen=True)
class TextFeature:
    """Short free text, lower-cased, split into words and hashed as word n-grams."""

    name: str
    column: str
    buckets: int = 256
    ngrams: tuple[int, int] = (1, 2)
    max_tokens: int = 32
    missing: MissingPolicy = "drop"
    type: Literal["text"] = "text"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


@dataclass(frozen=True)
class SequenceFeature:
    """An ordered group of columns (e.g. six monthly bills), first column = first step."""

    name: str
    columns: tuple[str, ...]
    element: Literal["numeric", "categorical"] = "numeric"
    lo: float = 0.0
    hi: float = 1.0
    log: bool = False
    vocabulary: tuple[str, ...] | None = None
    buckets: int | None = None
    unseen: Literal["other", "reject"] = "other"
    missing: MissingPolicy = "drop"
    type: Literal["sequence"] = "sequence"
    typical: tuple[float, float] | None = None  # numeric steps only, as for NumericFeature

    @property
    def cardinality(self) -> int:
        if self.vocabulary is not None:
            return len(self.vocabulary) + 1
        return self.buckets or 0


Feature = NumericFeature | CategoricalFeature | BooleanFeature | TextFeature | SequenceFeature


@dataclass(frozen=True)
class Label:
    """A binary label column for an optional downstream head; ``positive`` lists its spellings."""

    name: str
    column: str
    positive: tuple[str, ...]


@dataclass(frozen=True)
class EventAggregate:
    """One per-user column computed from an event log (see ``EVENT_OPS``)."""

    name: str
    op: str
    column: str | None = None
    start: str | None = None
    periods: int = 0
    freq: str = "MS"


@dataclass(frozen=True)
class EventSpec:
    """How an event log (many rows per user) becomes one row per user before training."""

    user: str
    time: str | None = None
    time_format: str | None = None
    reference: str | None = None
    aggregates: tuple[EventAggregate, ...] = ()


@dataclass(frozen=True)
class Schema:
    """A parsed, validated schema. Build one with :func:`load_schema` or :func:`parse_schema`."""

    kind: str
    version: int
    features: tuple[Feature, ...]
    labels: tuple[Label, ...] = ()
    id_column: str | None = None
    delimiter: str = ","
    header: bool = True
    column_names: tuple[str, ...] | None = None
    missing: MissingPolicy = "drop"
    out_of_bounds: Literal["clip", "reject"] = "clip"
    min_rows: int = 20
    na_values: tuple[str, ...] = DEFAULT_NA
    events: EventSpec | None = None
    name: str = ""
    source: str = "<schema>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Every column of the per-user table the schema reads (id, features, labels)."""
        cols: list[str] = []
        if self.id_column:
            cols.append(self.id_column)
        for feat in self.features:
            cols.extend(feat.columns)
        cols.extend(label.column for label in self.labels)
        return tuple(dict.fromkeys(cols))

    def fingerprint(self) -> str:
        """Hash of everything that shapes the feature adapter (types, bounds, vocabularies).

        Two partners of one kind share (average) their adapter only when their fingerprints
        are equal. Label columns and file-format details do not change the adapter's shape,
        so they are left out.
        """
        spec = {
            "kind": self.kind,
            "features": [_feature_spec(f) for f in self.features],
        }
        blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _feature_spec(feat: Feature) -> dict[str, Any]:
    out: dict[str, Any] = {"name": feat.name, "type": feat.type}
    for key in ("lo", "hi", "log", "vocabulary", "buckets", "ngrams", "max_tokens", "element"):
        if hasattr(feat, key):
            value = getattr(feat, key)
            out[key] = list(value) if isinstance(value, tuple) else value
    if isinstance(feat, SequenceFeature):
        out["steps"] = len(feat.columns)
    typical = getattr(feat, "typical", None)
    if typical is not None:  # only when declared, so older fingerprints stay valid
        out["typical"] = list(typical)
    return out


_TABLE_KEYS = {
    "kind", "version", "id", "delimiter", "header", "columns", "missing",
    "out_of_bounds", "min_rows", "na_values", "name",
}  # fmt: skip
_TOP_KEYS = {"table", "features", "labels", "events"}
_FEATURE_KEYS: dict[str, set[str]] = {
    "numeric": {"type", "column", "bounds", "log", "typical", "missing"},
    "categorical": {"type", "column", "vocabulary", "buckets", "unseen", "missing"},
    "boolean": {"type", "column", "true_values", "false_values", "missing"},
    "text": {"type", "column", "buckets", "ngrams", "max_tokens", "missing"},
    "sequence": {
        "type", "columns", "element", "bounds", "log", "typical", "vocabulary", "buckets", "unseen",
        "missing",
    },
}  # fmt: skip
_EVENT_KEYS = {"user", "time", "time_format", "reference", "aggregate"}
_AGG_KEYS = {"op", "column", "start", "periods", "freq"}


def load_schema(path: str | Path) -> Schema:
    """Read and validate a schema file; every problem is reported in one :class:`SchemaError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaError(str(path), ["the schema file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(str(path), [f"cannot read the schema file ({exc})"]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(str(path), [f"not valid TOML ({exc})"]) from None
    return parse_schema(doc, source=str(path))


def parse_schema(doc: dict[str, Any], *, source: str = "<schema>") -> Schema:
    """Validate a schema document (the parsed TOML) and build a :class:`Schema`."""
    problems: list[str] = []
    for key in sorted(set(doc) - _TOP_KEYS):
        problems.append(f"unknown top-level key '{key}' (valid: {', '.join(sorted(_TOP_KEYS))})")
    table = doc.get("table")
    if not isinstance(table, dict):
        problems.append("missing [table] section")
        table = {}
    for key in sorted(set(table) - _TABLE_KEYS):
        problems.append(f"unknown key 'table.{key}' (valid: {', '.join(sorted(_TABLE_KEYS))})")

    kind = table.get("kind")
    if kind not in KINDS:
        problems.append(f"table.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    version = table.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        problems.append(f"table.version must be an integer >= 1, got {version!r}")
    delimiter = table.get("delimiter", ",")
    if not isinstance(delimiter, str) or delimiter not in DELIMITERS:
        problems.append(f"table.delimiter must be one of {', '.join(repr(d) for d in DELIMITERS)}, got {delimiter!r}")
    header = table.get("header", True)
    if not isinstance(header, bool):
        problems.append(f"table.header must be true or false, got {header!r}")
        header = True
    column_names = table.get("columns")
    if not header:
        if not _is_str_list(column_names) or not column_names:
            problems.append("table.columns must list the column names when table.header = false")
            column_names = None
    elif column_names is not None:
        problems.append("table.columns is only allowed with table.header = false")
        column_names = None
    missing = table.get("missing", "drop")
    if missing not in ("drop", "reject"):
        problems.append(f"table.missing must be 'drop' or 'reject', got {missing!r}")
        missing = "drop"
    oob = table.get("out_of_bounds", "clip")
    if oob not in ("clip", "reject"):
        problems.append(f"table.out_of_bounds must be 'clip' or 'reject', got {oob!r}")
    min_rows = table.get("min_rows", 20)
    if not isinstance(min_rows, int) or isinstance(min_rows, bool) or min_rows < 1:
        problems.append(f"table.min_rows must be an integer >= 1, got {min_rows!r}")
        min_rows = 20
    na_values = table.get("na_values", list(DEFAULT_NA))
    if not _is_str_list(na_values):
        problems.append("table.na_values must be a list of strings")
        na_values = list(DEFAULT_NA)
    id_column = table.get("id")
    if id_column is not None and not isinstance(id_column, str):
        problems.append(f"table.id must be a column name, got {id_column!r}")
        id_column = None

    features: list[Feature] = []
    raw_features = doc.get("features", {})
    if not isinstance(raw_features, dict) or not raw_features:
        problems.append("[features] must declare at least one feature")
        raw_features = {}
    for name, spec in raw_features.items():
        feat = _parse_feature(name, spec, missing, problems)
        if feat is not None:
            features.append(feat)

    labels: list[Label] = []
    raw_labels = doc.get("labels", {})
    if not isinstance(raw_labels, dict):
        problems.append("[labels] must be a table of label columns")
        raw_labels = {}
    for name, spec in raw_labels.items():
        if not isinstance(spec, dict):
            problems.append(f"labels.{name} must be a table with 'positive'")
            continue
        for key in sorted(set(spec) - {"column", "positive"}):
            problems.append(f"unknown key 'labels.{name}.{key}' (valid: column, positive)")
        positive = spec.get("positive")
        if not _is_str_list(positive) or not positive:
            problems.append(f"labels.{name}.positive must be a non-empty list of strings")
            continue
        labels.append(Label(name=name, column=str(spec.get("column", name)), positive=tuple(positive)))

    events = _parse_events(doc.get("events"), problems)

    seen: dict[str, str] = {}
    for feat in features:
        for col in feat.columns:
            if col in seen:
                problems.append(f"column '{col}' is used by both '{seen[col]}' and '{feat.name}'")
            seen[col] = feat.name
    for label in labels:
        if label.column in seen:
            problems.append(f"label column '{label.column}' is also used as feature '{seen[label.column]}'")
    if id_column and id_column in seen:
        problems.append(f"id column '{id_column}' is also used as feature '{seen[id_column]}'")

    if problems:
        raise SchemaError(source, problems)
    return Schema(
        kind=str(kind),
        version=int(version),
        features=tuple(features),
        labels=tuple(labels),
        id_column=id_column,
        delimiter=DELIMITERS[delimiter],
        header=header,
        column_names=tuple(column_names) if column_names else None,
        missing=missing,
        out_of_bounds=oob,
        min_rows=min_rows,
        na_values=tuple(na_values),
        events=events,
        name=str(table.get("name", "")),
        source=source,
        raw=doc,
    )


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _bounds(where: str, spec: dict[str, Any], problems: list[str]) -> tuple[float, float] | None:
    bounds = spec.get("bounds")
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
    ):
        problems.append(f"{where}.bounds must be [lo, hi] numbers, got {bounds!r}")
        return None
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo < hi:
        problems.append(f"{where}.bounds must have lo < hi, got [{lo}, {hi}]")
        return None
    if not math.isfinite(hi - lo):  # inf, or a span too wide to scale: every value would map to 0
        problems.append(f"{where}.bounds must be finite numbers with a finite span, got [{lo}, {hi}]")
        return None
    return lo, hi


def _typical(
    where: str, spec: dict[str, Any], bounds: tuple[float, float], problems: list[str]
) -> tuple[float, float] | None:
    """The optional ``typical = [low, high]`` of a number: inside the bounds, low < high."""
    if "typical" not in spec:
        return None
    value = spec["typical"]
    lo, hi = bounds
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and lo <= value[0] < value[1] <= hi
    ):
        return float(value[0]), float(value[1])
    problems.append(
        f"{where}.typical must be [low, high] with {lo:g} <= low < high <= {hi:g} (the public range that "
        f"holds about the middle 90% of users), got {value!r}"
    )
    return None


def _vocab_or_buckets(
    where: str, spec: dict[str, Any], problems: list[str]
) -> tuple[tuple[str, ...] | None, int | None]:
    vocab = spec.get("vocabulary")
    buckets = spec.get("buckets")
    if vocab is not None and buckets is not None:
        problems.append(f"{where}: give either vocabulary or buckets, not both")
        return None, None
    if vocab is not None:
        if not isinstance(vocab, list) or not vocab:
            problems.append(f"{where}.vocabulary must be a non-empty list")
            return None, None
        words = tuple(canonical(v) for v in vocab)
        if len(set(words)) != len(words):
            problems.append(f"{where}.vocabulary has duplicate entries")
        return words, None
    if buckets is not None:
        if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 2:
            problems.append(f"{where}.buckets must be an integer >= 2, got {buckets!r}")
            return None, None
        return None, buckets
    problems.append(f"{where} needs a vocabulary or a bucket count")
    return None, None


_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def canonical(value: Any) -> str:
    """The string form used to match categories: integers written without a decimal point.

    Applies to TOML numbers and to strings alike, so ``1``, ``1.0``, ``"1.0"`` and ``" 1 "``
    are all the category ``"1"``; any other string is only stripped of surrounding spaces.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    text = str(value).strip()
    if _INTEGER.fullmatch(text):
        return str(int(text))
    if _DECIMAL.fullmatch(text):
        number = float(text)
        if math.isfinite(number) and number.is_integer():
            return str(int(number))
    return text


def _parse_feature(name: str, spec: Any, default_missing: str, problems: list[str]) -> Feature | None:
    where = f"features.{name}"
    if not isinstance(spec, dict):
        problems.append(f"{where} must be a table")
        return None
    ftype = spec.get("type")
    if not isinstance(ftype, str) or ftype not in _FEATURE_KEYS:
        problems.append(f"{where}.type must be one of {', '.join(_FEATURE_KEYS)}, got {ftype!r}")
        return None
    unknown = sorted(set(spec) - _FEATURE_KEYS[ftype])
    for key in unknown:
        problems.append(
            f"unknown key '{where}.{key}' for a {ftype} feature (valid: {', '.join(sorted(_FEATURE_KEYS[ftype]))})"
        )
    missing = spec.get("missing", default_missing)
    if missing not in ("drop", "reject"):
        problems.append(f"{where}.missing must be 'drop' or 'reject', got {missing!r}")
        missing = "drop"
    column = spec.get("column", name)
    if not isinstance(column, str):
        problems.append(f"{where}.column must be a string")
        return None
    unseen = spec.get("unseen", "other")
    if unseen not in ("other", "reject"):
        problems.append(f"{where}.unseen must be 'other' or 'reject', got {unseen!r}")
        unseen = "other"
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{where}.log must be true or false")
        log = False

    if ftype == "numeric":
        bounds = _bounds(where, spec, problems)
        if bounds is None:
            return None
        typical = _typical(where, spec, bounds, problems)
        return NumericFeature(name, column, bounds[0], bounds[1], log, missing, typical=typical)
    if ftype == "categorical":
        vocab, buckets = _vocab_or_buckets(where, spec, problems)
        if vocab is None and buckets is None:
            return None
        return CategoricalFeature(name, column, vocab, buckets, unseen, missing)
    if ftype == "boolean":
        tv = spec.get("true_values", list(DEFAULT_TRUE))
        fv = spec.get("false_values", list(DEFAULT_FALSE))
        if not _is_str_list(tv) or not _is_str_list(fv):
            problems.append(f"{where}.true_values/false_values must be lists of strings")
            return None
        if set(tv) & set(fv):
            problems.append(f"{where}: a spelling is both true and false: {sorted(set(tv) & set(fv))}")
        return BooleanFeature(name, column, tuple(tv), tuple(fv), missing)
    if ftype == "text":
        buckets = spec.get("buckets", 256)
        ngrams = spec.get("ngrams", [1, 2])
        max_tokens = spec.get("max_tokens", 32)
        if not isinstance(buckets, int) or buckets < 2:
            problems.append(f"{where}.buckets must be an integer >= 2")
            return None
        if (
            not isinstance(ngrams, list)
            or len(ngrams) != 2
            or not all(isinstance(n, int) and n >= 1 for n in ngrams)
            or ngrams[0] > ngrams[1]
        ):
            problems.append(f"{where}.ngrams must be [min, max] with 1 <= min <= max")
            return None
        if not isinstance(max_tokens, int) or max_tokens < 1:
            problems.append(f"{where}.max_tokens must be an integer >= 1")
            return None
        return TextFeature(name, column, buckets, (ngrams[0], ngrams[1]), max_tokens, missing)
    # sequence
    columns = spec.get("columns")
    if not isinstance(columns, list) or not _is_str_list(columns) or len(columns) < 2:
        problems.append(f"{where}.columns must list at least two column names, in order")
        return None
    element = spec.get("element", "numeric")
    if element == "numeric":
        bounds = _bounds(where, spec, problems)
        if bounds is None:
            return None
        typical = _typical(where, spec, bounds, problems)
        return SequenceFeature(
            name, tuple(columns), "numeric", bounds[0], bounds[1], log, missing=missing, typical=typical
        )
    if element == "categorical":
        if "typical" in spec:
            problems.append(f"{where}.typical is for numbers; a categorical sequence has no typical range")
        vocab, buckets = _vocab_or_buckets(where, spec, problems)
        if vocab is None and buckets is None:
            return None
        return SequenceFeature(
            name, tuple(columns), "categorical", vocabulary=vocab, buckets=buckets,
            unseen=unseen, missing=missing,
        )  # fmt: skip
    problems.append(f"{where}.element must be 'numeric' or 'categorical', got {element!r}")
    return None


def _parse_events(spec: Any, problems: list[str]) -> EventSpec | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        problems.append("[events] must be a table")
        return None
    for key in sorted(set(spec) - _EVENT_KEYS):
        problems.append(f"unknown key 'events.{key}' (valid: {', '.join(sorted(_EVENT_KEYS))})")
    user = spec.get("user")
    if not isinstance(user, str):
        problems.append("events.user must name the user-id column of the event log")
        return None
    aggregates: list[EventAggregate] = []
    raw = spec.get("aggregate", {})
    if not isinstance(raw, dict) or not raw:
        problems.append("events.aggregate must declare at least one per-user column")
        raw = {}
    needs_time = False
    for name, agg in raw.items():
        where = f"events.aggregate.{name}"
        if not isinstance(agg, dict):
            problems.append(f"{where} must be a table")
            continue
        for key in sorted(set(agg) - _AGG_KEYS):
            problems.append(f"unknown key '{where}.{key}' (valid: {', '.join(sorted(_AGG_KEYS))})")
        op = agg.get("op")
        if op not in EVENT_OPS:
            problems.append(f"{where}.op must be one of {', '.join(EVENT_OPS)}, got {op!r}")
            continue
        column = agg.get("column")
        if op not in (
            "count",
            "days_since_first",
            "days_since_last",
            "active_days",
            "count_by_period",
        ) and not isinstance(column, str):
            problems.append(f"{where}.column is required for op '{op}'")
            continue
        periods = agg.get("periods", 0)
        if op.endswith("_by_period"):
            if not isinstance(periods, int) or periods < 2 or not isinstance(agg.get("start"), str):
                problems.append(f"{where} needs start (a date) and periods (>= 2) for op '{op}'")
                continue
        if op in ("days_since_first", "days_since_last", "active_days") or op.endswith("_by_period"):
            needs_time = True
        aggregates.append(EventAggregate(name, op, column, agg.get("start"), int(periods), str(agg.get("freq", "MS"))))
    time_col = spec.get("time")
    if needs_time and not isinstance(time_col, str):
        problems.append("events.time must name the timestamp column for time-based aggregates")
    if (
        needs_time
        and not isinstance(spec.get("reference"), str)
        and any(a.op in ("days_since_first", "days_since_last") for a in aggregates)
    ):
        problems.append("events.reference must give the reference date (public) for days_since_* aggregates")
    return EventSpec(
        user=user,
        time=time_col,
        time_format=spec.get("time_format"),
        reference=spec.get("reference"),
        aggregates=tuple(aggregates),
    )


def slot_id(kind: str, fingerprint: str) -> str:
    """The adapter slot of a schema: ``<kind>:<schema fingerprint>``. Partners of one slot
    share (average) their feature adapter; the model artifact names each adapter by it."""
    return f"{kind}:{fingerprint}"
