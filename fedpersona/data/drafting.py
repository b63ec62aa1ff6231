"""``fedpersona schema infer``: a draft schema from a local file, for a data steward to review.

Nothing drafted here is used until a steward accepts it and declares it public: the header of
the draft says what publishing each bound, typical range, edge list and vocabulary reveals, and
every ``typical`` and ``edges`` line drafted from the file's own distribution says so where it
stands. Training never reads a file to fill them in: only a schema a steward accepted counts.

``edges`` are drafted only as a commented-out suggestion (``# edges = [...]``): a draft accepted
as it stands declares no edges, so no cut point taken from this file's distribution becomes
public unless the steward removes the ``#`` on purpose. The suggestion is this file's deciles
moved to round numbers (or, for a few integer codes, midway between codes seen in at least 5
rows), which says roughly where the file's users lie; published thresholds are the better
choice, and the header says so.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fedpersona.config.settings import valid_kind
from fedpersona.data.cells import NUMBER, number_text, quoted, text_cells
from fedpersona.data.schema import DEFAULT_FALSE, DEFAULT_NA, DEFAULT_TRUE, DELIMITERS, KINDS, canonical
from fedpersona.data.tables import PARQUET_SUFFIXES, check_file, read_raw
from fedpersona.errors import ConfigError, DataError

__all__ = ["infer_schema"]

logger = logging.getLogger(__name__)

_ID_NAME = re.compile(r"id|.*[^A-Za-z]id|.*Id|.*ID", re.IGNORECASE)
_UNNAMED = re.compile(r"Unnamed: \d+|")  # pandas' name for a column without a header: a saved index
# Names of counts: a column of these seen only as 0 and 1 is still a count, not a yes/no.
_COUNT_WORDS = frozenset(
    {"n", "num", "number", "count", "cnt", "qty", "quantity", "total", "times", "kid", "kids", "kidhome", "teen",
     "teens", "teenhome", "child", "children", "dependents", "visits", "purchases", "orders", "items", "calls"}
)  # fmt: skip
# Names of prediction targets: a yes/no column named so is drafted as the label, not as an input.
_TARGET_WORDS = frozenset(
    {"churn", "churned", "default", "target", "label", "outcome", "y", "class", "response", "converted",
     "conversion", "exited", "attrition", "fraud", "revenue", "subscribed", "defaulted"}
)  # fmt: skip
_CODES = 20  # integer columns with at most this many values are offered as categorical codes
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DATE = r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}(?:[ T][\d:.]+)?"
_RARE = 5  # categories seen in fewer rows are left out of a drafted vocabulary
_DRAFTED = "# DRAFTED FROM THIS FILE: review before use"


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
    if not valid_kind(kind):
        raise ConfigError(
            f"kind must be a lower-case word (letters, digits, underscores; e.g. {', '.join(KINDS)} or your own, like "
            f"insurance), got {kind!r}"
        )
    if max_categories < 2:
        raise ConfigError(f"max_categories must be >= 2, got {max_categories}")
    check_file(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        delim_key, header = ",", True
        frame = read_raw(path, delimiter=",", header=True, names=None)
    else:
        delim_key = _delimiter_key(delimiter) if delimiter is not None else _sniff_delimiter(path)
        header = _sniff_header(path, DELIMITERS[delim_key])
        frame = read_raw(path, delimiter=DELIMITERS[delim_key], header=header, names=None)
        if not header:
            frame.columns = [f"column_{i}" for i in range(1, frame.shape[1] + 1)]
    names = list(frame.columns)
    if label is not None and label not in names:
        raise ConfigError(f"{path}: no label column {label!r} (columns found: {quoted(names)})")
    na_values = frozenset(DEFAULT_NA)
    n = len(frame)
    id_column = next(
        (
            c
            for c in names
            if (_ID_NAME.fullmatch(c) or _UNNAMED.fullmatch(c)) and c != label and _is_unique(frame[c], na_values)
        ),
        None,
    )
    suggested = None
    if label is None:
        targets = [c for c in names if c != id_column and _words(c) & _TARGET_WORDS and _yes_no(frame[c], na_values)]
        label = suggested = targets[0] if targets else None
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
        "# A number's `edges` cut it into pieces for the label model. They are only SUGGESTED, as a",
        "# commented-out line (this file's deciles moved to round numbers; for a few integer codes,",
        "# midway between the codes seen in at least 5 rows): they say where your users lie. Prefer",
        "# published thresholds (clinical cut-offs, codebook levels) and round numbers (powers of two",
        "# for counts, 1k/5k/10k for money); remove the `#` only once you declare them public.",
        "# `typical` and `edges` lines are DRAFTED FROM THIS FILE: review before use. Nothing fills",
        "# them in from your data at training time.",
        f"# Columns that look like ids: {quoted(id_like) or 'none'}.",
        "# Every `bounds` line is this file's range widened to round limits (flagged where it stands):",
        "# replace it with the domain's limits (published ranges, codebook limits) before you accept it.",
    ]
    if id_column == "":
        head += [
            "# The column without a name is a saved row index (unique in every row): it is left out, and rows",
            "# are numbered in file order. Give it a name and set table.id if it is a real user id.",
        ]
    if suggested is not None:
        head += [
            f"# Label: '{suggested}' is a yes/no column named like a target, so it is drafted under [labels],",
            "# not as an input feature. If it is an input, move it to [features] (or name the label with --label).",
        ]
    head += [
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
    text, missing = text_cells(series, na_values)
    values = text[~missing]
    counts = values.value_counts()
    key = f"[features.{_toml_key(col)}]"
    if counts.empty:
        return f"# '{col}' is empty in this file: review its type\n{key}\ntype = \"text\"", False
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    numeric = bool(np.isfinite(numbers).all())
    unique = len(counts) == len(values) and len(values) >= 20
    spelled = set(DEFAULT_TRUE) | set(DEFAULT_FALSE)
    count = numeric and bool(_words(col) & _COUNT_WORDS)
    if len(counts) <= 2 and all(v in spelled for v in counts.index) and not count:
        return f'{key}\ntype = "boolean"', False
    notes: list[str] = []
    after = ""
    if numeric:
        lo, hi = _nice_bounds(float(numbers.min()), float(numbers.max()))
        log = lo >= 0 and len(counts) > 2 and float(pd.Series(numbers).skew()) > 2.0
        integral = bool(np.all(numbers == np.round(numbers)))
        if len(counts) == 1:
            notes.append("a single value in this file: drop it unless it varies elsewhere")
        elif count and len(counts) <= 2:
            notes.append("only 0 and 1 in this file, but named like a count: kept a number, not a yes/no")
        elif integral and len(counts) <= _CODES and not count:
            after = _codes_block(col, key, counts)
        if unique and integral:
            notes.append("a different value in every row: an identifier? drop it or make it table.id")
        body = (
            f'type = "numeric"\nbounds = [{number_text(lo)}, {number_text(hi)}]  {_DRAFTED} (range widened to round '
            f"limits): the domain's limits are better\nlog = {'true' if log else 'false'}"
        )
        typical = _draft_typical(numbers, lo, hi) if len(counts) > 2 else None
        if typical is not None:
            body += (
                f"\ntypical = [{number_text(typical[0])}, {number_text(typical[1])}]  {_DRAFTED} (5th-95th percentile)"
            )
        edges, how = _draft_edges(numbers, lo, hi, log=log, integral=integral) if len(counts) > 2 else ((), "")
        if edges:
            suggestion = ", ".join(number_text(e) for e in edges)
            body += f"\n# edges = [{suggestion}]  {_DRAFTED} ({how}); a suggestion: declare public to use"
    elif len(counts) <= max_categories:
        common = [v for v in sorted(counts.index, key=_sort_key) if counts[v] >= _RARE]
        if len(common) < len(counts):
            rare = len(counts) - len(common)
            notes.append(f"{rare} value(s) seen in under {_RARE} rows left out (coded as 'other')")
        vocabulary = dict.fromkeys(canonical(v) for v in common)
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
    return f"{comments}{key}\n{body}{after}", unique and (not numeric or integral)


def _codes_block(col: str, key: str, counts: pd.Series) -> str:
    """A commented-out categorical alternative for a column of a few integers (codes such as
    education levels), with a placeholder to name each code. Only codes seen in at least
    ``_RARE`` rows are listed, as for any drafted vocabulary."""
    codes = [canonical(v) for v in sorted(counts.index, key=_sort_key) if counts[v] >= _RARE]
    if len(codes) < 2:
        return ""
    words = ", ".join(json.dumps(v) for v in codes)
    names = ", ".join(f'{json.dumps(v)} = "?"' for v in codes)
    return (
        f"\n# {col}: only {len(counts)} distinct integers. If they are codes rather than amounts, replace the block"
        f"\n# above with this one (remove the `#` of each line) and name every code from your codebook:"
        f'\n# {key}\n# type = "categorical"\n# vocabulary = [{words}]\n# unseen = "other"'
        f"\n# # what each code means (keep it a comment): {names}"
    )


def _words(name: str) -> set[str]:
    """The lower-cased words of a column name (split at non-letters and at camel-case humps)."""
    return {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", name)}


def _yes_no(series: pd.Series, na_values: frozenset[str]) -> bool:
    """Whether a column holds two values (at most), each a yes/no spelling such as 1/0 or yes/no."""
    text, missing = text_cells(series, na_values)
    values = set(text[~missing].unique())
    spelled = {v.casefold() for v in (*DEFAULT_TRUE, *DEFAULT_FALSE)}
    return 1 <= len(values) <= 2 and all(str(v).casefold() in spelled for v in values)


def _draft_label(col: str, series: pd.Series, na_values: frozenset[str]) -> str:
    text, missing = text_cells(series, na_values)
    counts = text[~missing].value_counts()
    true_keys = {v.casefold() for v in DEFAULT_TRUE}
    spelled = true_keys | {v.casefold() for v in DEFAULT_FALSE}
    if not counts.empty and all(str(v).casefold() in spelled for v in counts.index):
        positive = sorted({canonical(v) for v in counts.index if v.casefold() in true_keys})
        note = ""
    else:
        positive = [canonical(counts.index[-1])] if not counts.empty else ["1"]
        note = f"# {col}: the rarest value was taken as positive; check it\n"
    words = ", ".join(json.dumps(v, ensure_ascii=False) for v in positive or ["1"])
    return f"{note}[labels.{_toml_key(col)}]\npositive = [{words}]"


def _is_unique(series: pd.Series, na_values: frozenset[str]) -> bool:
    text, missing = text_cells(series, na_values)
    return bool(len(text) > 0 and not missing.any() and not text.duplicated().any())


def _draft_typical(numbers: np.ndarray, lo: float, hi: float) -> tuple[float, float] | None:
    """This file's 5th and 95th percentiles rounded outward to two significant digits, inside
    ``[lo, hi]``; ``None`` when they do not make a range. A draft: publishing it tells the
    federation where most of the partner's users lie (not any one user's value)."""
    p5, p95 = np.quantile(numbers, [0.05, 0.95])
    low, high = max(lo, _round_sig(float(p5), math.floor)), min(hi, _round_sig(float(p95), math.ceil))
    return (low, high) if low < high else None


def _draft_edges(
    numbers: np.ndarray, lo: float, hi: float, *, log: bool, integral: bool
) -> tuple[tuple[float, ...], str]:
    """Cut points strictly inside ``(lo, hi)`` drafted from this file, and how: midway between
    the values of a column of at most 20 integer codes (those seen in at least 5 rows, so that a
    rare value is not published), else its deciles moved to round numbers (1, 2 or 5 times a power
    of ten for a log-scaled column; multiples of a round step for a linear one). A draft: the
    steward replaces them with published thresholds or keeps the round numbers."""
    distinct, counts = np.unique(numbers, return_counts=True)
    if integral and len(distinct) <= 20:
        common = distinct[counts >= _RARE]
        cuts, how = (common[:-1] + common[1:]) / 2.0, "midway between the codes seen"
    else:
        deciles = np.quantile(numbers, np.linspace(0.1, 0.9, 9))
        how = "deciles, rounded"
        if log:
            cuts = np.array([_round_125(float(x)) for x in deciles])
        else:
            p5, p95 = np.quantile(numbers, [0.05, 0.95])
            step = _round_125(max(float(p95 - p5), 1e-12) / 10.0)
            cuts = np.round(deciles / step) * step
    cleaned = {float(f"{c:.12g}") for c in cuts if lo < c < hi}  # without binary noise such as 0.30000000000000004
    return tuple(sorted(cleaned)), how


def _round_125(x: float) -> float:
    """The nearest of 1, 2 and 5 times a power of ten to ``|x|`` (on a log scale), sign kept."""
    if x == 0:
        return 0.0
    scale = 10.0 ** math.floor(math.log10(abs(x)))
    mantissa = min((1.0, 2.0, 5.0, 10.0), key=lambda m: abs(math.log(abs(x) / (m * scale))))
    return math.copysign(float(f"{mantissa * scale:.12g}"), x)


def _round_sig(x: float, rounding: Callable[[float], float]) -> float:
    """``x`` rounded to two significant digits with ``rounding`` (math.floor or math.ceil)."""
    if x == 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(abs(x))) - 1)
    return float(f"{rounding(x / step) * step:.12g}")  # without binary noise such as 0.12000000000000001


def _nice_bounds(lo: float, hi: float) -> tuple[float, float]:
    """The observed range ``[lo, hi]`` widened to limits that look like a domain's, not a file's.

    A range that reaches down to (near) zero becomes ``[0, L]`` and one across zero ``[-M, L]``,
    with ``L`` and ``M`` the next 1, 2 or 5 times a power of ten above the extremes plus 10 %
    (an age up to 87 gives 100, a balance of -3,313 gives -5,000): such limits say little about
    the largest or smallest value in the file. A range far from zero (years 1995..2019) is
    rounded outward to a step one order of magnitude above its span (1900..2100).
    """
    span = hi - lo
    if lo >= 0 and lo <= span:  # the range reaches down to (near) zero
        return 0.0, _nice_ceil(hi * 1.1) if hi > 0 else 1.0
    if hi <= 0 and -hi <= span:  # it reaches up to (near) zero
        return -_nice_ceil(-lo * 1.1) if lo < 0 else -1.0, 0.0
    if lo < 0 < hi:
        return -_nice_ceil(-lo * 1.1), _nice_ceil(hi * 1.1)
    span = span or abs(lo)
    step = 10.0 ** math.ceil(math.log10(span * 1.2))
    low, high = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if high - low < step:
        high = low + step
    return (max(low, 0.0) if lo >= 0 else low), high


def _nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is >= ``x`` (``x`` > 0)."""
    scale = 10.0 ** math.floor(math.log10(x))
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= x * (1 - 1e-12))


def _sort_key(value: str) -> tuple[bool, float, str]:
    """Numbers first, in numeric order, then strings in alphabetical order."""
    is_number = bool(NUMBER.fullmatch(value))
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
    return not any(NUMBER.fullmatch(c.strip().strip('"').strip()) for c in cells)
