"""Event logs: many rows per user become one row per user before anything else.

A schema with an ``[events]`` section describes a log (one row per event, e.g. a purchase);
:func:`aggregate_events` groups it by the user column and computes each declared aggregate
(counts, sums, means, recency, the most frequent category ...) so that the table a partner
trains on has one row per user and the DP guarantee is user-level.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from fedpersona.data.cells import parse_numbers, problem, quoted, row_list, text_cells
from fedpersona.data.schema import EventAggregate, Schema
from fedpersona.errors import SchemaError

__all__ = ["aggregate_events"]

logger = logging.getLogger(__name__)


def aggregate_events(schema: Schema, raw: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """One row per user from an event log, following ``schema.events``."""
    events = schema.events
    assert events is not None
    na_values = frozenset(schema.na_values)
    needed = [events.user, events.time] + [a.column for a in events.aggregates]
    absent = [c for c in dict.fromkeys(needed) if c is not None and c not in raw.columns]
    if absent:
        raise SchemaError(
            source,
            [f"event log: missing column(s) {quoted(absent)} "
             f"(columns found: {quoted(map(str, raw.columns))})"],
        )  # fmt: skip
    problems: list[str] = []
    users, no_user = text_cells(raw[events.user], na_values)
    if no_user.any():
        problems.append(
            f"event log column '{events.user}': {int(no_user.sum())} event(s) have no user id, "
            f"at rows {row_list(no_user)}"
        )
    times = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
    if events.time is not None:
        text, _ = text_cells(raw[events.time], na_values)
        fmt = events.time_format or "ISO8601"
        try:
            times = pd.to_datetime(text, format=fmt, errors="coerce")
        except (ValueError, TypeError) as exc:
            problems.append(f"events.time_format {fmt!r} cannot be used ({exc})")
        else:
            bad = times.isna().to_numpy(dtype=bool)
            if bad.any():
                what = f"are not dates in the format {fmt!r}"
                problems.append("event log " + problem(events.time, bad, text, what))
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
                text, missing = text_cells(raw[agg.column], na_values)
                numbers[agg.column], bad = parse_numbers(text, missing)
                if bad.any():
                    problems.append("event log " + problem(agg.column, bad, text, "are not numbers"))
        if agg.column and agg.op in ("nunique", "first", "last"):
            texts[agg.column] = text_cells(raw[agg.column], na_values)[0]
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
            message = f"events.aggregate.{agg.name}: cannot compute ({exc})"
            raise SchemaError(source, [message]) from None
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
