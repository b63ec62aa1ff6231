"""Persona cards: who each persona's users are, computed locally by a partner for its own users.

A card is made from the partner's validated :class:`~fedpersona.data.tables.Table` and each user's
persona (from :mod:`fedpersona.model.inference`); nothing on it is sent anywhere. It holds:

- the persona's **share** of the partner's users;
- **distinguishing features** in plain language, each against the whole silo: numeric ->
  standardised mean difference ``d = (mean_persona - mean_silo) / sd_silo`` (Cohen's d with
  the silo's sample standard deviation, observed values only); categorical -> lift
  ``P(value | persona) / P(value | silo)`` ("3.1x more likely to have device = mobile");
  boolean -> rate difference. A categorical sequence (e.g. the last five purchases) counts a
  user as having a value when any step holds it; a numeric sequence is summarised by the
  user's mean over its present steps. Text features are not described. Effects of different
  types are ranked on one scale, the standardised difference (``d`` itself for numbers,
  ``(p_persona - p_silo) / sqrt(p_silo (1 - p_silo))`` for a yes/no or a category), and the
  top ones are kept, at most one per feature;
- a **decision-tree surrogate** (scikit-learn, depth <= 3) that predicts the persona from the
  raw features (numbers in their own units, missing ones imputed with the silo median;
  categories and sequence values as yes/no indicators; also each single step of a sequence,
  and groups of a category's values, "region is one of 1, 3, 7", chosen on the training rows
  only), with its leaves as rules in plain text and its **fidelity**: accuracy against the
  assignments on held-out rows;
- **label rates** per persona for every label of the schema;
- with ``category_feature`` (e.g. an e-commerce purchase-category sequence): the **top
  categories by lift** and **recommendations** (the persona's most frequent categories, then
  the silo's most popular); :func:`hit_rate_at_k` measures them against a popularity baseline;
- a short generated **name** from the top features.

**Value labels.** Where the schema declares public labels for a category's codes
(``value_labels``, see :mod:`fedpersona.data.schema`), every text on a card says the label
instead of the code: the name (``SEX: female``, not ``SEX: 2``), the effects, the surrogate's
rules and the profile's rows; an effect and a category keep the code in ``value`` /
``category`` and carry the label in ``label``. Labels come from the schema, not the rows, so
they add nothing to what a card reveals.

**Small cells are suppressed** (k-anonymity of every published number): a persona with fewer
than ``min_users`` users is shown only as suppressed; a rate, lift or label rate is shown only
when at least ``min_users`` of the persona's users have the attribute; a mean only when at
least ``min_users`` users have a value; a rule only when its leaf holds at least
``min_users`` users (the tree is also grown with ``min_samples_leaf = min_users``).
Suppressed cells keep their place with ``suppressed = True`` and no numbers. k-anonymity does
not protect against homogeneity: a rate near 0 or 1 still says that (almost) every member of
the persona shares a value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from fedpersona.data.schema import CategoricalFeature, SequenceFeature
from fedpersona.data.tables import Table
from fedpersona.personas.columns import (
    Column,
    EffectKind,
    describable_columns,
    describe,
    fmt,
    present,
    step_columns,
    users_per_value,
)
from fedpersona.personas.surrogate import Rule, surrogate

__all__ = [
    "DEFAULT_MIN_USERS",
    "CategoryLift",
    "Effect",
    "FeatureProfile",
    "HitRate",
    "LabelRate",
    "PersonaCard",
    "Rule",
    "feature_profile",
    "hit_rate_at_k",
    "persona_cards",
]

DEFAULT_MIN_USERS = 10
_MAX_RECOMMENDATIONS = 10


@dataclass(frozen=True)
class Effect:
    """One distinguishing feature of a persona, against the whole silo."""

    feature: str  # schema feature name (a numeric sequence: "<name> (mean)")
    kind: EffectKind
    value: str | None  # the category, for kind "category"
    users: int | None  # persona users the cell describes; None when suppressed
    persona: float | None  # persona mean (numeric) or rate
    silo: float | None  # silo mean or rate
    effect: float | None  # Cohen's d (numeric), lift (category), rate difference (boolean)
    strength: float | None  # standardised difference: the ranking key
    suppressed: bool
    text: str
    label: str | None = None  # the public label of ``value``, when the schema declares one


@dataclass(frozen=True)
class LabelRate:
    """A label's positive rate among the persona's users with a known label."""

    label: str
    rate: float | None
    silo_rate: float | None
    users: int | None  # persona users with the label positive
    suppressed: bool


@dataclass(frozen=True)
class CategoryLift:
    """How much more (or less) often the persona's users have a category than the silo's."""

    category: str
    rate: float | None  # share of the persona's users (with any category) having it
    silo_rate: float | None
    lift: float | None
    users: int | None
    suppressed: bool
    label: str | None = None  # the public label of ``category``, when the schema declares one


@dataclass(frozen=True)
class PersonaCard:
    """Everything a partner's analyst sees about one persona (JSON via :meth:`to_dict`)."""

    persona: int
    name: str
    users: int | None
    share: float | None
    suppressed: bool
    features: tuple[Effect, ...]
    label_rates: tuple[LabelRate, ...]
    categories: tuple[CategoryLift, ...]  # top categories by lift; hidden cells (marked) fill up
    recommendations: tuple[str, ...]  # most frequent in the persona, then the silo's most popular
    rules: tuple[Rule, ...]  # surrogate leaves predicting this persona
    fidelity: float  # the surrogate's held-out accuracy (the same on every card)
    min_users: int

    def recommend(self, k: int) -> tuple[str, ...]:
        """The ``k`` categories to recommend to this persona's users."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not self.recommendations:
            raise ValueError("this card was made without a category_feature, so it has no recommendations")
        return self.recommendations[:k]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (no NaN, no numpy scalars)."""
        return _plain(asdict(self))


@dataclass(frozen=True)
class HitRate:
    """Hit rate at ``k`` of persona recommendations against the silo's most popular categories."""

    k: int
    persona: float
    popularity: float
    users: int  # users evaluated (with at least one category)


# --- the cards --------------------------------------------------------------------------------


def persona_cards(
    table: Table,
    assignments: np.ndarray,
    *,
    k: int,
    rng: np.random.Generator,
    min_users: int = DEFAULT_MIN_USERS,
    category_feature: str | None = None,
    max_depth: int = 3,
    top_features: int = 5,
    top_categories: int = 5,
) -> list[PersonaCard]:
    """One card per persona ``0 .. k-1`` for the users of ``table`` (see the module docstring).

    ``assignments`` (n,) holds each row's persona. ``rng`` draws the held-out split of the
    surrogate tree and its tie-breaking. ``category_feature`` names a categorical feature or
    categorical sequence of the schema whose values are purchase categories.
    """
    labels = _check_assignments(table, assignments, k)
    if len(table) < 2:
        raise ValueError(f"persona cards need a table of at least 2 users, got {len(table)}")
    _check_positive("min_users", min_users)
    _check_positive("top_features", top_features)
    _check_positive("top_categories", top_categories)
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 1 <= max_depth <= 3:
        raise ValueError(f"max_depth must be 1, 2 or 3 (a surrogate people can read), got {max_depth!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    columns = describable_columns(table, min_users)
    named = _labeller(table)
    sizes = np.bincount(labels, minlength=k)
    shown = sizes >= min_users
    rules, fidelity = surrogate(
        [named(c) for c in columns + step_columns(table, min_users)],
        labels,
        k,
        max_depth=max_depth,
        min_users=min_users,
        rng=rng,
    )
    effects = [_effects(columns, labels == p, min_users, named) if shown[p] else [] for p in range(k)]
    rates = [_label_rates(table, labels == p, min_users) if shown[p] else () for p in range(k)]
    lifts: list[tuple[CategoryLift, ...]] = [()] * k
    recs: list[tuple[str, ...]] = [()] * k
    if category_feature is not None:
        matrix = _category_matrix(table, category_feature)
        stats = _CategoryStats.of(matrix, labels, k, min_users)
        feat = _category_feature(table, category_feature)
        lifts = [
            tuple(_labelled_lift(c, feat) for c in stats.lifts(p)[:top_categories]) if shown[p] else ()
            for p in range(k)
        ]
        recs = [stats.recommend(p if shown[p] else None) for p in range(k)]
    names = _names(effects, shown, min_users)
    n = len(table)
    cards = []
    for p in range(k):
        top = _top(effects[p], top_features)
        cards.append(
            PersonaCard(
                persona=p,
                name=names[p],
                users=int(sizes[p]) if shown[p] else None,
                share=float(sizes[p] / n) if shown[p] else None,
                suppressed=not bool(shown[p]),
                features=top,
                label_rates=rates[p],
                categories=lifts[p],
                recommendations=recs[p],
                rules=tuple(r for r in rules if r.persona == p) if shown[p] else (),
                fidelity=fidelity,
                min_users=min_users,
            )
        )
    return cards


@dataclass(frozen=True)
class FeatureProfile:
    """Persona-by-feature standardised differences: the data of a heatmap, local to a partner.

    ``strength[p][f]`` is persona ``p``'s standardised difference from the silo on row ``f``
    (Cohen's d for a number, ``(p_persona - p_silo) / sqrt(p_silo (1 - p_silo))`` for a yes/no
    or a category, as on the cards); ``None`` where the cell is suppressed (fewer than
    ``min_users`` users) or the persona is. Rows: every numeric and boolean feature, then the
    category values strongest for some persona (at most ``max_rows`` rows in all).
    Computed from the partner's own rows: like the cards, it never leaves the partner.
    """

    rows: tuple[str, ...]
    strength: tuple[tuple[float | None, ...], ...]  # (k, rows)
    min_users: int

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


def feature_profile(
    table: Table,
    assignments: np.ndarray,
    *,
    k: int,
    min_users: int = DEFAULT_MIN_USERS,
    max_rows: int = 24,
    min_category_strength: float = 0.5,
) -> FeatureProfile:
    """The persona-by-feature heatmap of the partner's own users (see :class:`FeatureProfile`)."""
    labels = _check_assignments(table, assignments, k)
    _check_positive("min_users", min_users)
    _check_positive("max_rows", max_rows)
    sizes = np.bincount(labels, minlength=k)
    columns = describable_columns(table, min_users)
    named = _labeller(table)
    found: dict[str, list[float | None]] = {}
    order: list[tuple[bool, str]] = []  # (is a category, row name)
    for p in range(k):
        effects = _effects(columns, labels == p, min_users, named) if sizes[p] >= min_users else []
        for effect in effects:
            shown = effect.label or effect.value
            name = effect.feature if effect.kind != "category" else f"{effect.feature} = {shown}"
            if name not in found:
                found[name] = [None] * k
                order.append((effect.kind == "category", name))
            found[name][p] = None if effect.suppressed else effect.strength

    def peak(name: str) -> float:
        return max((abs(v) for v in found[name] if v is not None), default=0.0)

    plain = [name for is_cat, name in order if not is_cat]
    categories = sorted(
        (name for is_cat, name in order if is_cat and peak(name) >= min_category_strength),
        key=lambda name: (-peak(name), name),
    )
    rows = (plain + categories)[:max_rows]
    return FeatureProfile(
        rows=tuple(rows),
        strength=tuple(tuple(found[name][p] for name in rows) for p in range(k)),
        min_users=min_users,
    )


def hit_rate_at_k(
    table: Table,
    assignments: np.ndarray,
    *,
    k: int,
    category_feature: str,
    top_k: int = 3,
    min_users: int = DEFAULT_MIN_USERS,
    most_recent: Literal["first", "last"] = "first",
) -> HitRate:
    """Held-out hit rate of persona recommendations vs. the silo's most popular categories.

    Each user's most recent category (the first present step of the sequence, or the last
    with ``most_recent = "last"``) is hidden; the persona statistics and the silo popularity
    are computed from the remaining steps only, with the cards' suppression; a hit is the
    hidden category among the ``top_k`` recommended. Users with no category are skipped.
    """
    labels = _check_assignments(table, assignments, k)
    _check_positive("top_k", top_k)
    _check_positive("min_users", min_users)
    if most_recent not in ("first", "last"):
        raise ValueError(f"most_recent must be 'first' or 'last', got {most_recent!r}")
    feat = _category_feature(table, category_feature)
    if not isinstance(feat, SequenceFeature):
        raise ValueError(f"hit_rate_at_k needs a sequence feature (to hide the most recent step); '{feat.name}' is not")
    matrix = _category_matrix(table, category_feature)
    if most_recent == "last":
        matrix = matrix[:, ::-1]
    available = present(matrix)
    has_any = available.any(axis=1)
    first = np.argmax(available, axis=1)
    rows = np.flatnonzero(has_any)
    hidden = matrix[rows, first[rows]]
    history = matrix.copy()
    history[rows, first[rows]] = None
    stats = _CategoryStats.of(history, labels, k, min_users)
    persona_recs = [stats.recommend(p if stats.sizes[p] >= min_users else None)[:top_k] for p in range(k)]
    popular = stats.recommend(None)[:top_k]
    persona_hits = np.array([h in persona_recs[labels[r]] for r, h in zip(rows, hidden, strict=True)])
    popular_hits = np.array([h in popular for h in hidden])
    users = len(rows)
    return HitRate(
        k=top_k,
        persona=float(persona_hits.mean()) if users else math.nan,
        popularity=float(popular_hits.mean()) if users else math.nan,
        users=users,
    )


# --- columns: the features as numbers ---------------------------------------------------------


def _labeller(table: Table) -> Callable[[Column], Column]:
    """The columns as people read them: a category indicator whose codes have public labels
    (``value_labels`` of the schema, also on each step of a categorical sequence) says the label
    instead of the code; every other column is returned as it is."""
    features: dict[str, CategoricalFeature | SequenceFeature] = {}
    for feat in table.schema.features:
        if isinstance(feat, CategoricalFeature | SequenceFeature) and feat.value_labels:
            features[feat.name] = feat
            if isinstance(feat, SequenceFeature):
                features.update(dict.fromkeys(feat.columns, feat))

    def named(col: Column) -> Column:
        feat = features.get(col.feature)
        if feat is None or col.kind != "category" or col.value is None:
            return col
        if col.group:  # "is one of 1, 3": the surrogate joins the values it groups
            return replace(col, value=", ".join(feat.label_of(v) for v in col.value.split(", ")))
        return replace(col, value=feat.label_of(col.value))

    return named


def _labelled_lift(lift: CategoryLift, feat: CategoricalFeature | SequenceFeature) -> CategoryLift:
    label = feat.label_of(lift.category)
    return replace(lift, label=label) if label != lift.category else lift


def _effects(
    columns: list[Column], member: np.ndarray, min_users: int, named: Callable[[Column], Column]
) -> list[Effect]:
    out = []
    for col in columns:
        observed = ~np.isnan(col.values)
        mine = observed & member
        silo_values = col.values[observed]
        if silo_values.size < 2:
            continue
        if col.kind == "numeric":
            sd = float(np.std(silo_values, ddof=1))
            if sd == 0.0:
                continue
            users = int(mine.sum())
            silo_mean = float(silo_values.mean())
            if users < min_users:
                out.append(_suppressed(col, f"{col.feature}: fewer than {min_users} users have a value"))
                continue
            mean = float(col.values[mine].mean())
            d = (mean - silo_mean) / sd
            text = f"{col.feature}: mean {fmt(mean)} vs {fmt(silo_mean)} in the silo (d = {d:+.2f})"
            out.append(Effect(col.feature, "numeric", None, users, mean, silo_mean, d, d, False, text))
            continue
        silo_rate = float(silo_values.mean())
        if silo_rate in (0.0, 1.0):
            continue
        users = int(col.values[mine].sum())
        denominator = int(mine.sum())
        if users < min_users or denominator < min_users:
            what = describe(named(col))
            out.append(_suppressed(col, f"{what}: fewer than {min_users} of the persona's users"))
            continue
        rate = users / denominator
        strength = (rate - silo_rate) / math.sqrt(silo_rate * (1.0 - silo_rate))
        shown = named(col)
        if col.kind == "boolean":
            diff = rate - silo_rate
            text = (
                f"{col.feature} = {col.true_text}: {rate:.0%} vs {silo_rate:.0%} in the silo ({100 * diff:+.0f} points)"
            )
            out.append(Effect(col.feature, "boolean", None, users, rate, silo_rate, diff, strength, False, text))
        else:
            lift = rate / silo_rate
            how = f"{lift:.1f}× more likely" if lift >= 1 else f"{lift:.2f}× as likely"
            text = f"{how} to have {describe(shown)} ({rate:.0%} vs {silo_rate:.0%} in the silo)"
            label = shown.value if shown.value != col.value else None
            out.append(
                Effect(col.feature, "category", col.value, users, rate, silo_rate, lift, strength, False, text, label)
            )
    return out


def _suppressed(col: Column, text: str) -> Effect:
    return Effect(col.feature, col.kind, col.value, None, None, None, None, None, True, text)


def _top(effects: list[Effect], n: int) -> tuple[Effect, ...]:
    """The ``n`` strongest shown effects, at most one per feature."""
    shown = sorted(
        (e for e in effects if not e.suppressed and e.strength is not None),
        key=lambda e: (-abs(e.strength or 0.0), e.feature, e.value or ""),
    )
    out: list[Effect] = []
    seen: set[str] = set()
    for effect in shown:
        if effect.feature not in seen:
            out.append(effect)
            seen.add(effect.feature)
        if len(out) == n:
            break
    return tuple(out)


def _label_rates(table: Table, member: np.ndarray, min_users: int) -> tuple[LabelRate, ...]:
    out = []
    for label in table.schema.labels:
        values = table.labels.get(label.name)
        if values is None:
            continue
        known = ~np.isnan(values)
        silo = float(values[known].mean()) if known.any() else None
        mine = known & member
        positives = int(values[mine].sum())
        if positives < min_users or int(mine.sum()) < min_users:
            out.append(LabelRate(label.name, None, None, None, True))
        else:
            out.append(LabelRate(label.name, positives / int(mine.sum()), silo, positives, False))
    return tuple(out)


def _names(effects: list[list[Effect]], shown: np.ndarray, min_users: int) -> list[str]:
    """Short names from each persona's strongest effects ("High age, device: mobile"), unique."""
    names: list[str] = []
    for p, found in enumerate(effects):
        if not shown[p]:
            names.append(f"Persona {p} (fewer than {min_users} users)")
            continue
        phrases = [phrase for e in _top(found, 8) if (phrase := _phrase(e))]
        name = ", ".join(phrases[:2]) or f"Persona {p}"
        if name in names and len(phrases) > 2:
            name = ", ".join(phrases[:3])
        if name in names:
            name = f"{name} ({p})"
        names.append(name)
    return names


def _phrase(effect: Effect) -> str | None:
    if effect.kind == "numeric":
        return f"{'High' if (effect.effect or 0) > 0 else 'Low'} {effect.feature}"
    if effect.kind == "boolean":
        return f"{effect.feature}" if (effect.effect or 0) > 0 else f"no {effect.feature}"
    if (effect.effect or 0) > 1:  # a category the persona has more often
        return f"{effect.feature}: {effect.label or effect.value}"
    return None


# --- the surrogate tree -----------------------------------------------------------------------


def _category_feature(table: Table, name: str) -> CategoricalFeature | SequenceFeature:
    for feat in table.schema.features:
        if feat.name == name:
            if isinstance(feat, CategoricalFeature) or (
                isinstance(feat, SequenceFeature) and feat.element == "categorical"
            ):
                return feat
            raise ValueError(f"category_feature '{name}' is a {feat.type} feature; it must be categorical")
    names = ", ".join(f.name for f in table.schema.features)
    raise ValueError(f"category_feature '{name}' is not a feature of the schema (features: {names})")


def _category_matrix(table: Table, name: str) -> np.ndarray:
    """(n, steps) object array of category strings, None where missing."""
    feat = _category_feature(table, name)
    return np.stack([table.columns[c] for c in feat.columns], axis=1)


@dataclass(frozen=True, eq=False)
class _CategoryStats:
    """Users having each category, per persona and in the silo (users with any category).

    Only categories that at least ``min_users`` users of the silo have are kept.
    """

    categories: tuple[str, ...]
    counts: np.ndarray  # (k, C) persona users having the category
    sizes: np.ndarray  # (k,) persona users with any category
    silo_counts: np.ndarray  # (C,)
    silo_size: int
    min_users: int

    @classmethod
    def of(cls, matrix: np.ndarray, labels: np.ndarray, k: int, min_users: int) -> _CategoryStats:
        known = present(matrix).any(axis=1)
        # A category fewer than min_users users of the whole silo have is hidden for every
        # persona and never popular: it is left out altogether.
        categories = tuple(sorted(v for v, users in users_per_value(matrix) if users >= min_users))
        has = np.zeros((len(labels), len(categories)), dtype=bool)
        for j, category in enumerate(categories):
            has[:, j] = np.any(matrix == category, axis=1)
        counts = np.zeros((k, len(categories)), dtype=np.int64)
        np.add.at(counts, labels, has.astype(np.int64))
        return cls(
            categories=categories,
            counts=counts,
            sizes=np.bincount(labels[known], minlength=k),
            silo_counts=has.sum(axis=0),
            silo_size=int(known.sum()),
            min_users=min_users,
        )

    def lifts(self, p: int) -> tuple[CategoryLift, ...]:
        """The persona's shown categories by lift (highest first), then the suppressed ones."""
        shown, hidden = [], []
        for j, category in enumerate(self.categories):
            users, size = int(self.counts[p, j]), int(self.sizes[p])
            silo_rate = float(self.silo_counts[j] / self.silo_size) if self.silo_size else 0.0
            if users < self.min_users or size < self.min_users or silo_rate == 0:
                hidden.append(CategoryLift(category, None, None, None, None, True))
                continue
            rate = users / size
            shown.append(CategoryLift(category, rate, silo_rate, rate / silo_rate, users, False))
        shown.sort(key=lambda c: (-(c.lift or 0.0), c.category))
        return tuple(shown + hidden)

    def recommend(self, p: int | None) -> tuple[str, ...]:
        """Persona ``p``'s most frequent shown categories, then the silo's most popular shown ones."""
        popular = [
            self.categories[j]
            for j in sorted(range(len(self.categories)), key=lambda j: (-int(self.silo_counts[j]), self.categories[j]))
            if self.silo_counts[j] >= self.min_users
        ]
        if p is None:
            return tuple(popular[:_MAX_RECOMMENDATIONS])
        mine = [
            self.categories[j]
            for j in sorted(range(len(self.categories)), key=lambda j: (-int(self.counts[p, j]), self.categories[j]))
            if self.counts[p, j] >= self.min_users
        ]
        ranked = list(dict.fromkeys(mine + popular))
        return tuple(ranked[:_MAX_RECOMMENDATIONS])


# --- checks and formatting --------------------------------------------------------------------


def _check_assignments(table: Table, assignments: np.ndarray, k: int) -> np.ndarray:
    if not isinstance(table, Table):
        raise ValueError(f"table must be a fedpersona Table, got {type(table).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    labels = np.asarray(assignments)
    if labels.shape != (len(table),):
        raise ValueError(f"assignments must have shape ({len(table)},), one persona per row, got {labels.shape}")
    if labels.size and labels.dtype.kind not in "iu":
        raise ValueError(f"assignments must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"assignments must lie in [0, {k}), got values from {labels.min()} to {labels.max()}")
    return labels.astype(np.int64)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
