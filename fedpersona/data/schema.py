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
    edges = [1, 2, 4, 8, 16]      # optional: public cut points, strictly inside the bounds

    [features.Month]
    type = "categorical"
    vocabulary = ["Feb", "Mar"]   # or: buckets = 64 (hashed)
    unseen = "other"              # other | reject

    [features.SEX]
    type = "categorical"
    vocabulary = [1, 2]
    value_labels = {"1" = "male", "2" = "female"}   # optional: what each code means (public)

    [features.Weekend]
    type = "boolean"

    [features.note]
    type = "text"
    buckets = 256
    ngrams = [1, 2]

    [features.bill]
    type = "sequence"
    columns = ["BILL_AMT1", "BILL_AMT2"]
    element = "numeric"           # numeric (bounds, log, typical, edges) | categorical (vocabulary or buckets,
                                  # value_labels)
    bounds = [-200000, 1000000]

    [labels.Revenue]
    positive = ["TRUE"]

    [events]                      # optional: the file is an event log, many rows per user
    user = "sample_id"
    time = "date"
    time_format = "%Y%m%d"
    [events.aggregate.n_purchases]
    op = "count"

**Value labels** (``value_labels``, on a categorical feature or a categorical sequence with a
vocabulary) say in words what the codes of the vocabulary mean: persona cards, their surrogate
rules and the partner's persona report write ``SEX: female`` instead of ``SEX: 2``. Each key is
a code of the vocabulary (written as a TOML string, matched like the vocabulary, so ``"1"`` and
``"1.0"`` are the same code); each value is a non-empty label, and no two codes share one. A
code without a label, or a value outside the vocabulary, is shown as it is. Labels are public
like the vocabulary (they come from the data's published description, never from the rows),
cost no privacy budget, and change nothing the model computes: they are left out of the
fingerprint, so two partners whose labels differ still share their adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

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
    input by it (see :func:`fedpersona.data.features.layout_of`). ``edges`` (optional, public)
    are cut points strictly inside the bounds, in the column's own units, such as published
    clinical thresholds or round numbers; the label view of :mod:`fedpersona.data.dense`
    encodes the number piecewise-linearly between them.
    """

    name: str
    column: str
    lo: float
    hi: float
    log: bool = False
    missing: MissingPolicy = "drop"
    type: Literal["numeric"] = "numeric"
    typical: tuple[float, float] | None = None
    edges: tuple[float, ...] | None = None

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
    value_labels: tuple[tuple[str, str], ...] = ()  # (code, label) pairs, public; see the module docstring

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    def label_of(self, code: str) -> str:
        """The public label of a code, or the code itself when it has none."""
        return _label_of(self.value_labels, code)

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
    edges: tuple[float, ...] | None = None  # numeric steps only, as for NumericFeature
    value_labels: tuple[tuple[str, str], ...] = ()  # categorical steps only, as for CategoricalFeature

    @property
    def cardinality(self) -> int:
        if self.vocabulary is not None:
            return len(self.vocabulary) + 1
        return self.buckets or 0

    def label_of(self, code: str) -> str:
        """The public label of a code, or the code itself when it has none."""
        return _label_of(self.value_labels, code)


def _label_of(labels: tuple[tuple[str, str], ...], code: str) -> str:
    key = canonical(code)
    return next((label for known, label in labels if known == key), code)


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
        """Hash of everything that shapes the feature adapter (types, bounds, vocabularies,
        typical ranges, edges).

        Two partners of one kind share (average) their adapter only when their fingerprints
        are equal. Label columns and file-format details do not change the adapter's shape,
        so they are left out. A typical range or edges change what each input means, so they
        enter it when declared.
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
    for key in ("typical", "edges"):  # only when declared, so older fingerprints stay valid
        value = getattr(feat, key, None)
        if value is not None:
            out[key] = list(value)
    return out


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


def slot_id(kind: str, fingerprint: str) -> str:
    """The adapter slot of a schema: ``<kind>:<schema fingerprint>``. Partners of one slot
    share (average) their feature adapter; the model artifact names each adapter by it."""
    return f"{kind}:{fingerprint}"
