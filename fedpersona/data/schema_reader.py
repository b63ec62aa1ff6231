"""Reading a schema file: TOML in, a validated :class:`~fedpersona.data.schema.Schema` out.

:func:`load_schema` reads a file; :func:`parse_schema` checks a parsed document. Every problem
of a schema (an unknown key, bounds that are not numbers, a typical range or edges outside the
bounds, a vocabulary with duplicates, a value label for a code outside the vocabulary, an unknown
aggregate ...) is collected and raised at once as one
:class:`~fedpersona.errors.SchemaError` naming the file and each key.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from pathlib import Path
from typing import Any

from fedpersona.config.settings import PartnerConfig, valid_kind
from fedpersona.data.schema import (
    DEFAULT_FALSE,
    DEFAULT_NA,
    DEFAULT_TRUE,
    DELIMITERS,
    EVENT_OPS,
    KINDS,
    BooleanFeature,
    CategoricalFeature,
    EventAggregate,
    EventSpec,
    Feature,
    Label,
    NumericFeature,
    Schema,
    SequenceFeature,
    TextFeature,
    canonical,
)
from fedpersona.errors import ConfigError, SchemaError

__all__ = ["load_schema", "parse_schema", "partner_schema"]


_TABLE_KEYS = {
    "kind", "version", "id", "delimiter", "header", "columns", "missing",
    "out_of_bounds", "min_rows", "na_values", "name",
}  # fmt: skip
_TOP_KEYS = {"table", "features", "labels", "events"}
_FEATURE_KEYS: dict[str, set[str]] = {
    "numeric": {"type", "column", "bounds", "log", "typical", "edges", "missing"},
    "categorical": {"type", "column", "vocabulary", "buckets", "unseen", "missing", "value_labels"},
    "boolean": {"type", "column", "true_values", "false_values", "missing"},
    "text": {"type", "column", "buckets", "ngrams", "max_tokens", "missing"},
    "sequence": {
        "type", "columns", "element", "bounds", "log", "typical", "edges", "vocabulary", "buckets",
        "unseen", "missing", "value_labels",
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
    if not isinstance(kind, str) or not valid_kind(kind):
        problems.append(
            f"table.kind must be a lower-case word (letters, digits, underscores; e.g. {', '.join(KINDS)} or your "
            f"own, like insurance), got {kind!r}"
        )
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


def _edges(
    where: str, spec: dict[str, Any], bounds: tuple[float, float], problems: list[str]
) -> tuple[float, ...] | None:
    """The optional ``edges = [e1, e2, ...]`` of a number: finite, strictly increasing, strictly
    inside the bounds (an edge on a bound would cut off an empty piece). A bad list gets one
    problem that says what is wrong with it first and then what is expected."""
    if "edges" not in spec:
        return None
    value = spec["edges"]
    lo, hi = bounds
    numbers = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not isinstance(value, list):
        what = "it is not a list"
    elif not value:
        what = "it is empty"
    elif not numbers:
        what = "not every entry is a number"
    elif not all(math.isfinite(v) for v in value):
        what = "it holds " + ", ".join(str(v) for v in value if not math.isfinite(v))
    elif not all(a < b for a, b in itertools.pairwise(value)):
        a, b = next((a, b) for a, b in itertools.pairwise(value) if not a < b)
        what = f"it is not strictly increasing ({_plain(a)} then {_plain(b)})"
    elif not lo < value[0] or not value[-1] < hi:
        outside = [v for v in value if not lo < v < hi]
        verb = "is" if len(outside) == 1 else "are"
        what = f"{', '.join(_plain(v) for v in outside)} {verb} on or outside the bounds"
    else:
        return tuple(float(v) for v in value)
    problems.append(
        f"{where}.edges: {what}. Expected a non-empty list of finite numbers, strictly increasing and strictly "
        f"between the bounds {_plain(lo)} and {_plain(hi)} (public cut points in the column's units, e.g. round "
        f"numbers or published thresholds), got {value!r}"
    )
    return None


def _plain(x: float) -> str:
    """A bound as written in a schema: ``2000000``, not ``2e+06``."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


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


def _value_labels(
    where: str, spec: dict[str, Any], vocab: tuple[str, ...] | None, problems: list[str]
) -> tuple[tuple[str, str], ...]:
    """The optional ``value_labels = {"1" = "male", ...}`` of a category: each key a code of the
    vocabulary, each value a non-empty label, no label given twice. Every bad entry is its own
    problem, naming the code."""
    if "value_labels" not in spec:
        return ()
    value = spec["value_labels"]
    if not isinstance(value, dict) or not value:
        problems.append(
            f'{where}.value_labels must be a table of code = label, e.g. {{"1" = "male", "2" = "female"}}, '
            f"got {value!r}"
        )
        return ()
    if vocab is None:
        problems.append(f"{where}.value_labels need a vocabulary: hashed buckets have no codes to name")
        return ()
    declared = ", ".join(vocab)
    out: list[tuple[str, str]] = []
    keys: list[str] = []  # each entry's code as written
    owner: dict[str, str] = {}
    for key, label in value.items():
        code = canonical(key)
        if code not in vocab:
            problems.append(
                f"{where}.value_labels: code {key!r} is not in the vocabulary ({declared}); "
                "a label can only name a declared code"
            )
            continue
        if not isinstance(label, str) or not label.strip():
            problems.append(
                f"{where}.value_labels: the label of code {key!r} must be a non-empty string, got {label!r}"
            )
            continue
        text = label.strip()
        first = next((written for written, (known, _) in zip(keys, out, strict=True) if known == code), None)
        if first is not None:
            problems.append(f"{where}.value_labels: {first!r} and {key!r} are the same code, labelled twice")
            continue
        if text in owner:
            problems.append(
                f"{where}.value_labels: codes {owner[text]!r} and {key!r} share the label {text!r}; "
                "each code needs its own label"
            )
            continue
        owner[text] = key
        keys.append(key)
        out.append((code, text))
    return tuple(out)


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
        edges = _edges(where, spec, bounds, problems)
        return NumericFeature(name, column, bounds[0], bounds[1], log, missing, typical=typical, edges=edges)
    if ftype == "categorical":
        vocab, buckets = _vocab_or_buckets(where, spec, problems)
        if vocab is None and buckets is None:
            return None
        labels = _value_labels(where, spec, vocab, problems)
        return CategoricalFeature(name, column, vocab, buckets, unseen, missing, value_labels=labels)
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
        if "value_labels" in spec:
            problems.append(f"{where}.value_labels name the codes of a category; a numeric sequence has none")
        bounds = _bounds(where, spec, problems)
        if bounds is None:
            return None
        typical = _typical(where, spec, bounds, problems)
        edges = _edges(where, spec, bounds, problems)
        return SequenceFeature(
            name, tuple(columns), "numeric", bounds[0], bounds[1], log, missing=missing, typical=typical, edges=edges
        )
    if element == "categorical":
        if "typical" in spec:
            problems.append(f"{where}.typical is for numbers; a categorical sequence has no typical range")
        if "edges" in spec:
            problems.append(f"{where}.edges are for numbers; a categorical sequence has no edges")
        vocab, buckets = _vocab_or_buckets(where, spec, problems)
        if vocab is None and buckets is None:
            return None
        labels = _value_labels(where, spec, vocab, problems)
        return SequenceFeature(
            name, tuple(columns), "categorical", vocabulary=vocab, buckets=buckets,
            unseen=unseen, missing=missing, value_labels=labels,
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


def partner_schema(cfg: PartnerConfig) -> Schema:
    """The partner's schema: its own file, or the packaged synthetic one."""
    if cfg.schema_path is not None:
        schema = load_schema(cfg.schema_path)
        if schema.kind != cfg.kind:
            raise ConfigError(
                f"{cfg.source}: partner.kind is {cfg.kind!r} but the schema {cfg.schema_path} says table.kind = "
                f"{schema.kind!r}; they must agree (the kind and the schema's fingerprint name the partner's slot)"
            )
        return schema
    from fedpersona.data.synthetic import synthetic_schema

    return synthetic_schema(cfg.kind)
