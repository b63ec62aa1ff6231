"""Featurization: a validated :class:`~fedpersona.data.tables.Table` becomes tensors.

Every constant used here comes from the schema, which is public by declaration: numeric
bounds scale values into [0, 1] (and a declared ``typical`` range sets where the encoder
centres and scales them, see :func:`_standard`), vocabularies and bucket counts fix the
codes, and hashing uses a fixed keyed BLAKE2b. Nothing is fitted on the private rows (no
means, no standard deviations, no vocabulary discovery), so featurizing one more or one fewer
user changes no constant. *Could an auditor call this a leak?* No: the mapping row -> tensor is a fixed,
public function of the row alone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from fedpersona.data.schema import (
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    Schema,
    SequenceFeature,
    TextFeature,
)
from fedpersona.data.tables import Table

__all__ = ["FeatureLayout", "FeatureTensors", "featurize", "hash_bucket", "layout_of"]

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class FeatureLayout:
    """The shape of one schema's tokens; derived from the schema alone.

    Token order is: scalars (numeric and boolean), categoricals, texts, numeric sequences,
    categorical sequences.
    """

    scalar_names: tuple[str, ...]
    cat_names: tuple[str, ...]
    cat_cardinalities: tuple[int, ...]
    text_names: tuple[str, ...]
    text_buckets: tuple[int, ...]
    text_lengths: tuple[int, ...]
    seq_num_names: tuple[str, ...]
    seq_num_lengths: tuple[int, ...]
    seq_cat_names: tuple[str, ...]
    seq_cat_lengths: tuple[int, ...]
    seq_cat_cardinalities: tuple[int, ...]
    label_names: tuple[str, ...]
    # Per scalar and per numeric sequence: (centre, spread) in [0, 1]-scaled units, from the
    # schema's public ``typical`` range; the adapter feeds (value - centre) / spread. (0, 1)
    # leaves the value as it is. Empty = (0, 1) for every one.
    scalar_standard: tuple[tuple[float, float], ...] = ()
    seq_num_standard: tuple[tuple[float, float], ...] = ()

    @property
    def n_tokens(self) -> int:
        return (
            len(self.scalar_names)
            + len(self.cat_names)
            + len(self.text_names)
            + len(self.seq_num_names)
            + len(self.seq_cat_names)
        )

    @property
    def cat_offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0, *self.cat_cardinalities))[:-1])


@dataclass(frozen=True)
class FeatureTensors:
    """All of a table's rows as tensors (first dimension = users), ready to batch by index.

    ``tensors`` keys: ``scalar`` (n, S) in [0, 1]; ``scalar_present`` (n, S) bool;
    ``cat`` (n, C) int64 codes, offset into one shared table; ``cat_present`` (n, C);
    ``text{i}`` (n, L) int64 bucket ids, 0 = empty; ``seqnum{i}`` (n, L) in [0, 1] and
    ``seqnum{i}_present``; ``seqcat{i}`` (n, L) codes offset by step, ``seqcat{i}_present``;
    ``labels`` (n, n_labels) float with NaN for unknown.
    """

    layout: FeatureLayout
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.tensors["scalar"].shape[0])

    def batch(self, index: torch.Tensor, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Rows ``index`` of every tensor, or of the tensors named in ``keys`` (a tensor gather,
        no per-row Python)."""
        if keys is None:
            return {key: value[index] for key, value in self.tensors.items()}
        return {key: self.tensors[key][index] for key in keys}

    def to(self, device: torch.device | str) -> FeatureTensors:
        return FeatureTensors(self.layout, {k: v.to(device) for k, v in self.tensors.items()})


def layout_of(schema: Schema) -> FeatureLayout:
    """The token layout a schema implies."""
    scalars = [f for f in schema.features if isinstance(f, NumericFeature | BooleanFeature)]
    cats = [f for f in schema.features if isinstance(f, CategoricalFeature)]
    texts = [f for f in schema.features if isinstance(f, TextFeature)]
    seq_num = [f for f in schema.features if isinstance(f, SequenceFeature) and f.element == "numeric"]
    seq_cat = [f for f in schema.features if isinstance(f, SequenceFeature) and f.element != "numeric"]
    return FeatureLayout(
        scalar_names=tuple(f.name for f in scalars),
        cat_names=tuple(f.name for f in cats),
        cat_cardinalities=tuple(f.cardinality for f in cats),
        text_names=tuple(f.name for f in texts),
        text_buckets=tuple(f.buckets for f in texts),
        text_lengths=tuple(f.max_tokens for f in texts),
        seq_num_names=tuple(f.name for f in seq_num),
        seq_num_lengths=tuple(len(f.columns) for f in seq_num),
        seq_cat_names=tuple(f.name for f in seq_cat),
        seq_cat_lengths=tuple(len(f.columns) for f in seq_cat),
        seq_cat_cardinalities=tuple(f.cardinality for f in seq_cat),
        label_names=tuple(label.name for label in schema.labels),
        scalar_standard=tuple(_standard(f) for f in scalars),
        seq_num_standard=tuple(_standard(f) for f in seq_num),
    )


_TYPICAL_SDS = 2.0 * NormalDist().inv_cdf(0.95)  # a normal's middle 90% spans 3.29 standard deviations


def _standard(feature: NumericFeature | BooleanFeature | SequenceFeature) -> tuple[float, float]:
    """``(centre, spread)`` of a feature's encoder input, in its [0, 1]-scaled units.

    A declared ``typical = [low, high]`` (public, about the middle 90% of users) gives the
    centre of that range and a spread of one standard deviation of a normal covering it, so
    typical users reach the encoder as values of about -1.6 .. 1.6 whatever the bounds. Without
    it the scaled value passes unchanged: ``(0, 1)``.

    *Why:* bounds must hold every legal value, so most users sit in a narrow slice of
    [0, 1] (an income spread over a twentieth of its bounds). DP-SGD, which moves each weight
    by small noisy steps, then barely learns such a feature before the budget is spent. The
    typical range is declared, public domain knowledge like the bounds; nothing is computed
    from the partner's rows. *Could an auditor call this a leak?* No: it is a fixed, public
    affine map of each value.
    """
    typical = getattr(feature, "typical", None)
    if typical is None or isinstance(feature, BooleanFeature):
        return (0.0, 1.0)
    lo, hi = _scale(np.array(typical, dtype=np.float64), feature.lo, feature.hi, feature.log)
    return (float(lo + hi) / 2.0, max(float(hi - lo) / _TYPICAL_SDS, 1e-6))


def hash_bucket(feature: str, value: str, buckets: int) -> int:
    """Stable bucket of ``value`` for ``feature`` in ``[0, buckets)`` (BLAKE2b, keyed by name)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, key=feature.encode()[:64])
    return int.from_bytes(digest.digest(), "little") % buckets


def _scale(values: np.ndarray, lo: float, hi: float, log: bool) -> np.ndarray:
    """Map ``[lo, hi]`` onto ``[0, 1]`` (after log1p of the offset when ``log``); NaN stays."""
    clipped = np.clip(values, lo, hi)
    if log:
        return np.log1p(clipped - lo) / np.log1p(hi - lo)
    return (clipped - lo) / (hi - lo)


def _codes(
    name: str,
    values: np.ndarray,
    vocabulary: tuple[str, ...] | None,
    buckets: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Codes for categorical strings: vocabulary index + 1 (0 = other), or a hash bucket."""
    present = np.array([v is not None for v in values], dtype=bool)
    codes = np.zeros(len(values), dtype=np.int64)
    if not present.any():
        return codes, present
    uniq, inverse = np.unique(values[present].astype(str), return_inverse=True)
    if vocabulary is not None:
        index = {word: i + 1 for i, word in enumerate(vocabulary)}
        mapped = np.array([index.get(str(u), 0) for u in uniq], dtype=np.int64)
    else:
        assert buckets is not None
        mapped = np.array([hash_bucket(name, str(u), buckets) for u in uniq], dtype=np.int64)
    codes[present] = mapped[inverse]
    return codes, present


def _text_ids(feature: TextFeature, values: np.ndarray) -> np.ndarray:
    """Hashed word n-grams, ids in ``[1, buckets]``, zero-padded to ``max_tokens``."""
    out = np.zeros((len(values), feature.max_tokens), dtype=np.int64)
    cache: dict[str, list[int]] = {}
    lo, hi = feature.ngrams
    for row, value in enumerate(values):
        if value is None:
            continue
        ids = cache.get(value)
        if ids is None:
            words = _WORD.findall(str(value).lower())
            grams = [" ".join(words[i : i + n]) for n in range(lo, hi + 1) for i in range(len(words) - n + 1)]
            ids = [1 + hash_bucket(feature.name, g, feature.buckets) for g in grams]
            ids = ids[: feature.max_tokens]
            cache[value] = ids
        out[row, : len(ids)] = ids
    return out


def featurize(table: Table) -> FeatureTensors:
    """Turn a validated table into tensors using only the schema's public constants."""
    schema = table.schema
    layout = layout_of(schema)
    n = len(table)
    scalar = np.zeros((n, len(layout.scalar_names)), dtype=np.float32)
    scalar_present = np.zeros_like(scalar, dtype=bool)
    cat = np.zeros((n, len(layout.cat_names)), dtype=np.int64)
    cat_present = np.zeros_like(cat, dtype=bool)
    tensors: dict[str, torch.Tensor] = {}
    s = c = t = sn = sc = 0
    offsets = layout.cat_offsets
    for feat in schema.features:
        if isinstance(feat, NumericFeature):
            values = table.columns[feat.column].astype(np.float64)
            scalar_present[:, s] = ~np.isnan(values)
            scalar[:, s] = np.nan_to_num(_scale(values, feat.lo, feat.hi, feat.log))
            s += 1
        elif isinstance(feat, BooleanFeature):
            values = table.columns[feat.column].astype(np.float64)
            scalar_present[:, s] = ~np.isnan(values)
            scalar[:, s] = np.nan_to_num(values)
            s += 1
        elif isinstance(feat, CategoricalFeature):
            codes, present = _codes(feat.name, table.columns[feat.column], feat.vocabulary, feat.buckets)
            cat[:, c] = codes + offsets[c]
            cat_present[:, c] = present
            c += 1
        elif isinstance(feat, TextFeature):
            tensors[f"text{t}"] = torch.from_numpy(_text_ids(feat, table.columns[feat.column]))
            t += 1
        elif feat.element == "numeric":
            values = np.stack([table.columns[col].astype(np.float64) for col in feat.columns], 1)
            tensors[f"seqnum{sn}"] = torch.from_numpy(
                np.nan_to_num(_scale(values, feat.lo, feat.hi, feat.log)).astype(np.float32)
            )
            tensors[f"seqnum{sn}_present"] = torch.from_numpy(~np.isnan(values))
            sn += 1
        else:
            steps = []
            present_steps = []
            for step, col in enumerate(feat.columns):
                codes, present = _codes(feat.name, table.columns[col], feat.vocabulary, feat.buckets)
                steps.append(codes + step * feat.cardinality)
                present_steps.append(present)
            tensors[f"seqcat{sc}"] = torch.from_numpy(np.stack(steps, 1))
            tensors[f"seqcat{sc}_present"] = torch.from_numpy(np.stack(present_steps, 1))
            sc += 1
    tensors["scalar"] = torch.from_numpy(scalar)
    tensors["scalar_present"] = torch.from_numpy(scalar_present)
    tensors["cat"] = torch.from_numpy(cat)
    tensors["cat_present"] = torch.from_numpy(cat_present)
    labels = np.full((n, len(layout.label_names)), np.nan, dtype=np.float32)
    for j, label in enumerate(schema.labels):
        labels[:, j] = table.labels[label.name]
    tensors["labels"] = torch.from_numpy(labels)
    return FeatureTensors(layout, tensors)
