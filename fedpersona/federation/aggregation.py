"""Scoped aggregation: each parameter is averaged over the partners its scope allows.

- ``global`` parameters (the trunk): weighted mean over every partner that replied.
- ``kind`` parameters (an adapter): weighted mean over the partners of one *slot*, i.e. one
  silo kind with one schema fingerprint. A partner whose schema differs from its kind's
  shared schema keeps its adapter local and never sends it.
- ``local`` parameters (heads): never sent; a reply that contains one is rejected.

Weights are the partners' training-row counts, which are public by declaration (see the
release manifest). The server optimizer then moves the current parameters toward the mean:
FedAvg (``lr = 1`` replaces them), FedAdam (Reddi et al., 2021, on the pseudo-gradient
``mean - current``) or FedProx (FedAvg on the server; the proximal term lives at the clients).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpersona.errors import ConfigError
from fedpersona.model.scopes import parameter_scope

__all__ = ["SERVER_OPTIMIZERS", "PartnerUpdate", "ScopedAggregator", "weighted_mean"]

logger = logging.getLogger(__name__)

SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedprox")
GLOBAL_WEIGHTINGS = ("examples", "kind_balanced")
ROBUST_AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class PartnerUpdate:
    """One partner's reply: its model arrays by state-dict name and its example count."""

    partner: str
    slot: str | None
    arrays: dict[str, np.ndarray]
    num_examples: int
    kind: str | None = None

    @property
    def group(self) -> str:
        """The partner's kind (from its slot when not given), or its own name."""
        if self.kind is not None:
            return self.kind
        if self.slot is not None:
            return self.slot.split(":", 1)[0]
        return self.partner


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted mean of equally shaped arrays (float64 accumulation)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for arr, w in zip(arrays, weights, strict=True):
        acc += np.asarray(arr, dtype=np.float64) * (w / total)
    return acc.astype(arrays[0].dtype)


@dataclass
class ScopedAggregator:
    """Holds the global state (trunk + one adapter per shared slot) and updates it."""

    optimizer: str = "fedavg"
    lr: float = 1.0
    global_weighting: str = "kind_balanced"
    robust: str = "mean"
    trim_fraction: float = 0.2
    krum_byzantine: int = 1
    max_update_norm: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    trunk: dict[str, np.ndarray] = field(default_factory=dict)
    adapters: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in SERVER_OPTIMIZERS:
            raise ConfigError(
                f"federation.server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.global_weighting not in GLOBAL_WEIGHTINGS:
            raise ConfigError(
                f"federation.global_weighting must be one of {', '.join(GLOBAL_WEIGHTINGS)}, "
                f"got {self.global_weighting!r}"
            )
        if not self.lr > 0:
            raise ConfigError(f"federation.server_lr must be > 0, got {self.lr!r}")
        if self.robust not in ROBUST_AGGREGATORS:
            raise ConfigError(
                f"federation.robust_aggregation must be one of {', '.join(ROBUST_AGGREGATORS)}, got {self.robust!r}"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"federation.trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(f"federation.max_update_norm must be > 0, got {self.max_update_norm!r}")

    def screen_round(self, updates: list[PartnerUpdate]) -> list[list[str]]:
        """:meth:`screen` for one round's replies together, in order.

        A slot that has no global adapter yet (its first round) has no reference for the
        adapter's shapes and norm, so its replies are checked against each other: the
        shapes and dtypes that a strict majority of the slot's replies agree on are the
        reference (without such a majority every reply of the slot is refused), and the
        coordinate-wise median of those replies stands in for the global adapter. Partners
        of a slot start from the same public initialisation (``partner.build_model``), so an
        honest reply lies within ``max_update_norm`` of it and, as long as honest replies are
        the majority, every coordinate of the median lies between honest values; the adapter
        part of the distance to the median is therefore counted at half weight (the triangle
        inequality's factor of two). A slot with a single partner has only itself to compare
        with: its shapes and values are still checked for dtype and finiteness.
        """
        provisional: dict[str, dict[str, np.ndarray] | None] = {}
        by_slot: dict[str, list[PartnerUpdate]] = {}
        for upd in updates:
            if upd.slot is not None and upd.slot not in self.adapters:
                by_slot.setdefault(upd.slot, []).append(upd)
        for slot, group in by_slot.items():
            signatures = [_adapter_signature(u) for u in group]
            best, count = Counter(signatures).most_common(1)[0]
            members = [
                u
                for u, sig in zip(group, signatures, strict=True)
                if sig == best and all(np.all(np.isfinite(np.asarray(u.arrays[n]))) for n, _, _ in sig)
            ]
            if 2 * count <= len(group) or not members:
                provisional[slot] = None
                continue
            provisional[slot] = {
                name: np.median(np.stack([np.asarray(u.arrays[name]) for u in members]), axis=0).astype(dtype)
                for name, _, dtype in best
            }
        results = []
        for upd in updates:
            if upd.slot in provisional and provisional[upd.slot] is None:
                results.append([f"no majority of slot {upd.slot}'s first replies agrees on the adapter's shapes"])
            else:
                results.append(self.screen(upd, provisional=provisional.get(upd.slot) if upd.slot else None))
        return results

    def screen(self, upd: PartnerUpdate, *, provisional: dict[str, np.ndarray] | None = None) -> list[str]:
        """Why a reply must not be aggregated: unknown or local keys, wrong shapes or dtypes,
        non-finite values, or an update (reply minus current global) above ``max_update_norm``.
        An empty list means the reply is fine. ``provisional`` stands in for a slot's adapter
        that does not exist yet (see :meth:`screen_round`)."""
        problems: list[str] = []
        reference = self.arrays_for(upd.slot)
        if provisional is not None and upd.slot not in self.adapters:
            reference.update(provisional)
        squared = 0.0
        for name, value in upd.arrays.items():
            try:
                scope = parameter_scope(name)
            except KeyError:
                problems.append(f"unknown key '{name}'")
                continue
            if scope == "local":
                problems.append(f"local parameter '{name}'")
                continue
            if scope == "kind" and upd.slot is None:
                problems.append(f"adapter '{name}' although its adapter is local")
                continue
            array = np.asarray(value)
            ref = reference.get(name)
            if ref is None and (self.trunk if scope == "global" else upd.slot in self.adapters or provisional):
                problems.append(f"unknown key '{name}' (not in the global model)")
                continue
            if array.dtype.kind != "f" or (ref is not None and array.dtype != ref.dtype):
                expected = ref.dtype if ref is not None else "floating point"
                problems.append(f"'{name}' has dtype {array.dtype}, expected {expected}")
                continue
            if not np.all(np.isfinite(array)):
                problems.append(f"'{name}' holds {int(np.sum(~np.isfinite(array)))} non-finite value(s)")
                continue
            if ref is not None:
                if ref.shape != array.shape:
                    problems.append(f"'{name}' has shape {array.shape}, the global model {ref.shape}")
                    continue
                with np.errstate(over="ignore"):  # a huge update has an infinite norm: rejected below
                    distance = float(np.sum((array.astype(np.float64) - ref) ** 2))
                squared += distance / 4.0 if provisional is not None and scope == "kind" else distance
        for part, keys in (("trunk", self.trunk), ("adapter", reference.keys() - self.trunk.keys())):
            missing = sorted(k for k in keys if k not in upd.arrays)
            if missing:
                problems.append(f"missing {part} keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if self.max_update_norm is not None and not problems and squared**0.5 > self.max_update_norm:
            problems.append(f"update norm {squared**0.5:.4g} above federation.max_update_norm {self.max_update_norm:g}")
        return problems

    def arrays_for(self, slot: str | None) -> dict[str, np.ndarray]:
        """What a partner of ``slot`` receives: the trunk, plus its slot's adapter if any."""
        out = dict(self.trunk)
        if slot is not None and slot in self.adapters:
            out.update(self.adapters[slot])
        return out

    def aggregate(self, updates: list[PartnerUpdate]) -> None:
        """Apply one round of updates, scope by scope.

        The updates are taken in the order of their partners' names, not of arrival, so that
        floating-point sums, and the model, do not depend on which reply came first."""
        updates = sorted(updates, key=lambda u: u.partner)
        groups: dict[tuple[str, str | None], list[tuple[dict[str, np.ndarray], float]]] = {}
        global_weight = self.global_weights(updates)
        for upd in updates:
            arrays: dict[str, dict[str, np.ndarray]] = {"global": {}, "kind": {}}
            for name, value in upd.arrays.items():
                scope: str = parameter_scope(name)
                if scope == "local":
                    raise ValueError(f"{upd.partner} sent local parameter '{name}'")
                if scope == "kind" and upd.slot is None:
                    raise ValueError(f"{upd.partner} sent adapter '{name}' but its adapter is local")
                arrays[scope][name] = value
            groups.setdefault(("global", None), []).append((arrays["global"], global_weight[upd.partner]))
            if arrays["kind"]:
                groups.setdefault(("kind", upd.slot), []).append((arrays["kind"], upd.num_examples))
        for (scope, slot), members in groups.items():
            names = set(members[0][0])
            for member, _ in members[1:]:
                if set(member) != names:
                    raise ValueError(f"replies for scope {scope} {slot or ''} carry different keys")
            weights = [w for _, w in members]
            if scope == "global" and self.robust != "mean" and len(members) >= 3:
                mean = self._robust_global(members, sorted(names))
            else:
                mean = {n: weighted_mean([a[n] for a, _ in members], weights) for n in sorted(names)}
            target = self.trunk if scope == "global" else self.adapters.setdefault(str(slot), {})
            for name, value in mean.items():
                key = name if scope == "global" else f"{slot}/{name}"
                target[name] = self._step(key, target.get(name), value)

    def _robust_global(
        self, members: list[tuple[dict[str, np.ndarray], float]], names: list[str]
    ) -> dict[str, np.ndarray]:
        """The trunk from Flower's robust aggregation functions (median, trimmed mean, Krum),
        which ignore the weights: each of them bounds what a few hostile partners can do."""
        from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

        results = [([np.asarray(a[n], dtype=np.float64) for n in names], 1) for a, _ in members]
        if self.robust == "median":
            out = aggregate_median(results)
        elif self.robust == "trimmed_mean":
            out = aggregate_trimmed_avg(results, proportiontocut=self.trim_fraction)
        else:
            out = aggregate_krum(results, num_malicious=self.krum_byzantine, to_keep=0)
        dtype = members[0][0][names[0]].dtype
        return {n: np.asarray(v).astype(dtype) for n, v in zip(names, out, strict=True)}

    def global_weights(self, updates: list[PartnerUpdate]) -> dict[str, float]:
        """Weights of the global (trunk) average: example counts, or example counts
        normalised within each kind so that every kind weighs the same (``kind_balanced``),
        which keeps one large silo kind from dictating the shared trunk. Both use only
        public numbers (counts and kinds)."""
        if self.global_weighting == "examples":
            return {u.partner: float(u.num_examples) for u in updates}
        per_group: dict[str, float] = {}
        for u in updates:
            per_group[u.group] = per_group.get(u.group, 0.0) + u.num_examples
        return {u.partner: u.num_examples / per_group[u.group] for u in updates}

    def get_state(self) -> dict[str, np.ndarray]:
        """The global model and the server optimizer's state, flat by name (for checkpoints).

        Keys: ``trunk/<name>``, ``adapter/<slot>/<name>``, ``moment1/<key>`` and
        ``moment2/<key>`` (FedAdam's first and second moments). :meth:`set_state` inverts it.
        """
        state: dict[str, np.ndarray] = {f"trunk/{k}": v for k, v in self.trunk.items()}
        for slot, adapter in self.adapters.items():
            state.update({f"adapter/{slot}/{k}": v for k, v in adapter.items()})
        for key, (m, v) in self.moments.items():
            state[f"moment1/{key}"] = m
            state[f"moment2/{key}"] = v
        return {k: np.array(v, copy=True) for k, v in state.items()}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the global model and optimizer state with one :meth:`get_state` returned."""
        trunk: dict[str, np.ndarray] = {}
        adapters: dict[str, dict[str, np.ndarray]] = {}
        first: dict[str, np.ndarray] = {}
        second: dict[str, np.ndarray] = {}
        for name, value in state.items():
            part, _, rest = name.partition("/")
            array = np.array(value, copy=True)
            if part == "trunk" and rest:
                trunk[rest] = array
            elif part == "adapter" and "/" in rest:
                slot, _, key = rest.rpartition("/")
                adapters.setdefault(slot, {})[key] = array
            elif part == "moment1" and rest:
                first[rest] = array
            elif part == "moment2" and rest:
                second[rest] = array
            else:
                raise ValueError(f"unknown aggregator state entry '{name}'")
        if set(first) != set(second):
            raise ValueError("the optimizer state has first moments without second moments or the reverse")
        self.trunk, self.adapters = trunk, adapters
        self.moments = {k: (first[k], second[k]) for k in first}

    def _step(self, key: str, current: np.ndarray | None, mean: np.ndarray) -> np.ndarray:
        if current is None:
            return mean
        if self.optimizer in ("fedavg", "fedprox"):
            return (current + self.lr * (mean - current)).astype(current.dtype)
        delta = (mean - current).astype(np.float64)
        m, v = self.moments.get(key, (np.zeros_like(delta), np.zeros_like(delta)))
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.beta2 * v + (1 - self.beta2) * delta**2
        self.moments[key] = (m, v)
        return (current + self.lr * m / (np.sqrt(v) + self.tau)).astype(current.dtype)


def _adapter_signature(upd: PartnerUpdate) -> tuple[tuple[str, tuple[int, ...], np.dtype[Any]], ...]:
    """The names, shapes and dtypes of a reply's adapter (scope ``kind``) arrays."""
    out = []
    for name, value in upd.arrays.items():
        try:
            scope = parameter_scope(name)
        except KeyError:
            continue
        if scope == "kind":
            array = np.asarray(value)
            out.append((name, tuple(array.shape), array.dtype))
    return tuple(sorted(out, key=lambda item: item[0]))
