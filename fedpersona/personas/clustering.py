"""Federated DP k-means on unit-norm persona embeddings (transport-free library functions).

One round of clustering, with ``K`` prototypes that everyone knows:

1. each partner charges its ledger (:func:`charge_kmeans_round`), then runs
   :func:`local_cluster_stats`: every user goes to its nearest prototype (cosine), and the
   partner releases the per-prototype sums of embeddings and user counts, each coordinate
   with Gaussian noise;
2. the server adds the partners' noisy statistics and moves each prototype to the direction
   of its summed embeddings (:func:`update_prototypes`).

**Sensitivity.** Neighbouring tables differ by adding or removing one user (the relation of
the ledger's accountant). An embedding ``z`` has ``||z|| <= 1`` (rows are clipped to the unit
ball, and the encoder's are unit norm already), so one user changes exactly one cluster's sum
by ``z`` (L2 norm <= 1) and the same cluster's count by 1. The released vector
``(sums, counts)`` therefore has joint L2 sensitivity ``sqrt(1**2 + 1**2) = sqrt(2)``, and
adding ``N(0, (noise_multiplier * sqrt(2))**2)`` to every coordinate is a Gaussian mechanism
with noise multiplier ``noise_multiplier`` (std / sensitivity). Its privacy loss is that of
one un-subsampled Gaussian step: the ledger entry is ``(noise_multiplier, q=1.0, steps=1)``
under the mechanism name :data:`KMEANS_MECHANISM`. Everything the server computes from the
noisy statistics (new prototypes, the choice of K, dispersions) is post-processing.

Each partner adds its own noise, so its guarantee does not depend on the others (with or
without secure aggregation); the server's sum over ``P`` partners carries noise of standard
deviation ``sqrt(P) * noise_multiplier * sqrt(2)`` per coordinate.

**Schedule.** The order of releases and what the server does between them is
:class:`fedpersona.personas.schedule.KMeansRun`, the one schedule the coordinator and every
transport-free caller follow. All of it is computed from the noisy releases and public
randomness, so the privacy cost is only the rounds: each round is one release per partner,
whatever the number of prototypes.

**Cosine dispersion from the release alone.** For unit vectors and the centre
``c = S / ||S||`` of a cluster with sum ``S`` and count ``n``,
``sum_i (1 - cos(z_i, c)) = n - ||S||``. So the within-cluster dispersion of a whole
clustering, ``sum_k (n_k - ||S_k||)``, is computed from the noisy aggregates without another
release; :func:`choose_k` uses it.

**Planning.** The clustering spends part of the same budget as DP-SGD: the one planner
(:mod:`fedpersona.privacy.planner`) reserves it when it picks the DP-SGD noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedpersona.privacy.ledger import LedgerEntry, PrivacyLedger
from fedpersona.privacy.randomness import SecretRandomness

__all__ = [
    "KMEANS_MECHANISM",
    "SENSITIVITY",
    "ClusterStats",
    "KChoice",
    "charge_kmeans_round",
    "choose_k",
    "cosine_dispersion",
    "init_prototypes",
    "local_cluster_stats",
    "nearest_prototype",
    "reduce_prototypes",
    "update_prototypes",
]

logger = logging.getLogger(__name__)

KMEANS_MECHANISM = "dp-kmeans"
SENSITIVITY = math.sqrt(2.0)
"""Joint L2 sensitivity of one round's (sums, counts) to adding or removing one user."""

_FLOOR_STDS = 3.0  # default count floor: three standard deviations of the summed count noise


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare by identity
class ClusterStats:
    """One partner's noisy per-prototype statistics for one round.

    ``sums`` (k, dim) and ``counts`` (k,) carry the Gaussian noise already; ``noise_std``
    is the standard deviation that was added to every coordinate (public: it is
    ``noise_multiplier * sqrt(2)``), so the server can tell a count from noise.
    """

    sums: np.ndarray  # (k, dim) float64
    counts: np.ndarray  # (k,) float64
    noise_std: float

    def __post_init__(self) -> None:
        sums, counts = np.asarray(self.sums), np.asarray(self.counts)
        if sums.ndim != 2 or counts.ndim != 1 or sums.shape[0] != counts.shape[0]:
            raise ValueError(f"ClusterStats needs sums (k, dim) and counts (k,), got {sums.shape} and {counts.shape}")
        if not (np.all(np.isfinite(sums)) and np.all(np.isfinite(counts))):
            raise ValueError("ClusterStats sums and counts must be finite")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")

    @property
    def k(self) -> int:
        return int(self.counts.shape[0])


@dataclass(frozen=True)
class KChoice:
    """The number of personas :func:`choose_k` picked, with every candidate's score."""

    k: int
    scores: dict[int, float]  # candidate k -> cosine Calinski-Harabasz score (higher = better)
    dispersions: dict[int, float]  # candidate k -> sum_k (n_k - ||S_k||), from noisy aggregates


def init_prototypes(k: int, dim: int, *, generator: np.random.Generator) -> np.ndarray:
    """``k`` random unit vectors in ``dim`` dimensions (data-independent, so free of privacy cost).

    Directions are uniform on the sphere (normalised standard normal draws). Every partner
    and the server derive the same prototypes from the same seeded generator.
    """
    _check_int("k", k, 1)
    _check_int("dim", dim, 2)
    _check_generator(generator)
    draws = generator.standard_normal((k, dim))
    return draws / np.linalg.norm(draws, axis=1, keepdims=True)


def nearest_prototype(z: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Index of the nearest prototype (highest cosine) of every row of ``z``: (n,) int64.

    Ties go to the lowest index. Rows of ``z`` need not be normalised (cosine ranks
    prototypes the same for any positive scaling of a row).
    """
    z = _check_embeddings(z)
    centres = _unit_prototypes(prototypes, z.shape[1])
    if z.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(z @ centres.T, axis=1).astype(np.int64)


def local_cluster_stats(
    z: np.ndarray,
    prototypes: np.ndarray,
    *,
    noise_multiplier: float,
    randomness: SecretRandomness,
) -> ClusterStats:
    """A partner's noisy per-prototype sums and counts of its users' embeddings.

    Rows of ``z`` (n, dim) with norm above 1 are scaled down to norm 1 (that bound is what
    the sensitivity assumes; the encoder's embeddings are unit norm already). Every row goes
    to its nearest prototype by cosine; then ``N(0, (noise_multiplier * sqrt(2))**2)`` is
    added to every coordinate of the sums and of the counts (see the module docstring for
    why ``sqrt(2)``). ``noise_multiplier = 0`` releases exact statistics (only for an
    explicitly non-private run). The noise comes from ``randomness``, the partner's secret
    stream (:mod:`fedpersona.privacy.randomness`): noise the coordinator could regenerate would let it
    subtract the noise and read the exact counts. The caller must have charged the ledger first
    (:func:`charge_kmeans_round`): this function only computes.
    """
    z = _check_embeddings(z)
    centres = _unit_prototypes(prototypes, z.shape[1])
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not isinstance(randomness, SecretRandomness):
        raise ValueError(f"expected a SecretRandomness, got {type(randomness).__name__}")
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    clipped = z / np.maximum(norms, 1.0)  # (n, dim), every row in the unit ball
    k, dim = centres.shape
    assigned = nearest_prototype(clipped, centres)
    sums = np.zeros((k, dim), dtype=np.float64)
    np.add.at(sums, assigned, clipped)
    counts = np.bincount(assigned, minlength=k).astype(np.float64)
    std = float(noise_multiplier) * SENSITIVITY
    if std > 0:
        sums = sums + randomness.normal(sums.shape, std)
        counts = counts + randomness.normal(counts.shape, std)
    return ClusterStats(sums=sums, counts=counts, noise_std=std)


def charge_kmeans_round(ledger: PrivacyLedger, *, round: int, noise_multiplier: float) -> LedgerEntry:
    """Charge one clustering round to ``ledger`` before its statistics are computed.

    Records mechanism :data:`KMEANS_MECHANISM` as ``(noise_multiplier, sample_rate=1.0,
    steps=1)``: every user takes part in every round (no subsampling). The ledger checks the
    budget first and raises :class:`~fedpersona.errors.PrivacyBudgetExceeded` without writing
    anything when the round would exceed it.
    """
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"a private clustering round needs noise_multiplier > 0, got {noise_multiplier!r}")
    return ledger.charge(
        round=round, mechanism=KMEANS_MECHANISM, noise_multiplier=float(noise_multiplier), sample_rate=1.0, steps=1
    )


def update_prototypes(
    prototypes: np.ndarray,
    stats: Sequence[ClusterStats],
    *,
    min_count: float | None = None,
    reseed: np.random.Generator | None = None,
) -> np.ndarray:
    """The server step: new prototypes from the partners' summed noisy statistics.

    A prototype whose summed noisy count exceeds the floor moves to ``normalize(sum)``; any
    other keeps its old centre (too few users to tell from the noise). The floor is
    ``min_count`` when given, else three standard deviations of the summed count noise
    (``3 * sqrt(sum of the partners' noise_std**2)``) and at least 1.

    With ``reseed`` (a generator), a prototype under the floor is instead re-seeded by
    splitting the cluster with the largest cosine dispersion ``n_j - ||S_j||`` (the next
    largest for the next one, and so on): the two halves start at ``c_j`` moved by plus and
    minus half the cluster's angular radius along a random direction. A cluster that holds two
    true groups has a large dispersion, so the next rounds pull them apart. Only noisy
    statistics and fresh randomness are used: post-processing, no privacy cost.
    """
    centres = _unit_prototypes(prototypes, None)
    if reseed is not None:
        _check_generator(reseed)
    total_sums, total_counts, total_std = _totals(stats, centres.shape)
    if min_count is not None and not (isinstance(min_count, int | float) and min_count >= 0):
        raise ValueError(f"min_count must be a number >= 0, got {min_count!r}")
    floor = max(_FLOOR_STDS * total_std, 1.0) if min_count is None else float(min_count)
    norms = np.linalg.norm(total_sums, axis=1)
    move = (total_counts > floor) & (norms > 0)
    out = centres.copy()
    out[move] = total_sums[move] / norms[move, None]
    kept = np.flatnonzero(~move)
    if kept.size and reseed is not None and move.any():
        spread = total_counts - _debiased_norms(total_sums, total_std)  # (k,) cosine dispersion
        donors = [int(j) for j in np.argsort(-np.where(move, spread, -np.inf), kind="stable") if move[j]]
        for i, empty in enumerate(kept):
            j = donors[i % len(donors)]
            radius = math.sqrt(2.0 * min(max(spread[j] / total_counts[j], 1e-4), 1.0))
            direction = reseed.standard_normal(out.shape[1])
            direction -= (direction @ out[j]) * out[j]
            direction /= max(float(np.linalg.norm(direction)), 1e-12)
            step = 0.5 * radius * direction
            out[empty] = _normalized(out[j] + step)
            if i < len(donors):  # the first split of a donor also moves the donor itself
                out[j] = _normalized(out[j] - step)
        logger.info(
            "k-means: %d of %d prototypes under the floor %.1f re-seeded by splits", kept.size, len(move), floor
        )
    elif kept.size:
        logger.info("k-means: %d of %d prototypes kept (noisy count <= %.1f)", kept.size, len(move), floor)
    return out


def reduce_prototypes(
    stats: Sequence[ClusterStats],
    *,
    k: int,
    generator: np.random.Generator,
    restarts: int = 10,
    iterations: int = 50,
) -> np.ndarray:
    """Summarise ``m`` over-sampled prototypes into ``k`` starting prototypes (post-processing).

    Random starting prototypes often leave Lloyd's iterations in a poor local optimum (two
    true groups sharing a prototype). The remedy costs no privacy: run the first rounds with
    more prototypes than wanted, then let the server cluster the *noisy* summary it already
    holds -- each prototype's direction ``normalize(S_j)`` weighted by its noisy count -- into
    ``k`` centres with weighted spherical k-means (k-means++ seeding, ``restarts`` tries, the
    lowest weighted cosine dispersion wins). ``stats`` are the partners' statistics of the
    last over-sampled round; prototypes whose summed count is under the floor of
    :func:`update_prototypes` get no weight. The result starts the remaining rounds.
    """
    _check_int("k", k, 1)
    _check_int("restarts", restarts, 1)
    _check_int("iterations", iterations, 1)
    _check_generator(generator)
    sums, counts, std = _totals(stats, None)
    norms = np.linalg.norm(sums, axis=1)
    weight = np.where((counts > max(_FLOOR_STDS * std, 1.0)) & (norms > 0), counts, 0.0)
    points = sums / np.maximum(norms, 1e-300)[:, None]  # rows without weight never matter
    if np.count_nonzero(weight) < k:
        raise ValueError(
            f"only {np.count_nonzero(weight)} of {len(weight)} prototypes hold more users than the noise floor; "
            f"cannot summarise them into k = {k}: run more rounds, or with less noise or a smaller k"
        )
    best, best_cost = points[:k], math.inf
    for _ in range(restarts):
        found, cost = _weighted_spherical_kmeans(points, weight, k, generator, iterations)
        if cost < best_cost:
            best, best_cost = found, cost
    return best


def _weighted_spherical_kmeans(
    points: np.ndarray, weight: np.ndarray, k: int, generator: np.random.Generator, iterations: int
) -> tuple[np.ndarray, float]:
    """One weighted spherical k-means run with k-means++ seeding: (centres, cost)."""
    chosen = [int(generator.choice(len(points), p=weight / weight.sum()))]
    for _ in range(1, k):
        gap = np.clip(1.0 - np.max(points @ points[chosen].T, axis=1), 0.0, None) * weight
        p = gap / gap.sum() if gap.sum() > 0 else weight / weight.sum()
        chosen.append(int(generator.choice(len(points), p=p)))
    centres = points[chosen].copy()
    for _ in range(iterations):
        assigned = np.argmax(points @ centres.T, axis=1)
        moved = np.zeros_like(centres)
        np.add.at(moved, assigned, points * weight[:, None])
        norms = np.linalg.norm(moved, axis=1)
        new = np.where(norms[:, None] > 0, moved / np.maximum(norms, 1e-300)[:, None], centres)
        if np.allclose(new, centres):
            break
        centres = new
    cost = float(np.sum(weight * (1.0 - np.max(points @ centres.T, axis=1))))
    return centres, cost


def cosine_dispersion(stats: Sequence[ClusterStats]) -> float:
    """Within-cluster cosine dispersion ``sum_k (n_k - ||S_k||)`` of summed noisy statistics.

    ``||S_k||`` is de-biased for the noise (``E||S + e||**2 = ||S||**2 + dim * std**2``) and
    each cluster's term is kept in ``[0, n_k]``, as it is for exact statistics.
    """
    if not stats:
        raise ValueError("cosine_dispersion needs the statistics of at least one partner")
    sums, counts, std = _totals(stats, None)
    norms = _debiased_norms(sums, std)
    counts = np.maximum(counts, 0.0)
    return float(np.sum(np.clip(counts - norms, 0.0, counts)))


def choose_k(stats_by_k: Mapping[int, Sequence[ClusterStats]]) -> KChoice:
    """Pick the number of personas from noisy statistics only (pure post-processing).

    ``stats_by_k`` maps each candidate K (>= 2) to the partners' statistics of one round run
    with that K's final prototypes (each such round is a release the partners charged). The
    score is a cosine Calinski-Harabasz ratio, all of it from the noisy aggregates::

        W = sum_k (n_k - ||S_k||)        within-cluster cosine dispersion
        T = N - ||S||                    dispersion around the overall direction (S = sum S_k)
        score = ((T - W) / (K - 1)) / (W / (N - K))

    The K with the highest score wins (ties: the smaller K).
    """
    if len(stats_by_k) < 2:
        raise ValueError(f"choose_k needs at least two candidate K, got {sorted(stats_by_k)}")
    scores: dict[int, float] = {}
    dispersions: dict[int, float] = {}
    for k, stats in sorted(stats_by_k.items()):
        _check_int("candidate k", k, 2)
        if not stats or any(s.k != k for s in stats):
            raise ValueError(f"the statistics given for k = {k} must be non-empty and have {k} clusters each")
        sums, counts, std = _totals(stats, None)
        n = float(np.maximum(counts, 0.0).sum())
        within = cosine_dispersion(stats)
        total = max(n - float(_debiased_norms(sums.sum(0, keepdims=True), std * math.sqrt(k))[0]), 0.0)
        if n <= k:
            raise ValueError(f"for k = {k} the noisy statistics count {n:.1f} users, too few to compare")
        between = max(total - within, 0.0)
        scores[k] = (between / (k - 1)) / max(within / (n - k), 1e-12)
        dispersions[k] = within
    best = max(sorted(scores), key=lambda k: scores[k])
    logger.info("choose_k: scores %s -> k = %d", {k: round(v, 2) for k, v in scores.items()}, best)
    return KChoice(k=best, scores=scores, dispersions=dispersions)


# --- checks and helpers -----------------------------------------------------------------------


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_generator(generator: object) -> None:
    if not isinstance(generator, np.random.Generator):
        raise ValueError(f"expected a numpy.random.Generator, got {type(generator).__name__}")


def _check_embeddings(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (n, dim), got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("embeddings must be finite (found NaN or inf)")
    return z


def _unit_prototypes(prototypes: np.ndarray, dim: int | None) -> np.ndarray:
    centres = np.asarray(prototypes, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[0] < 1:
        raise ValueError(f"prototypes must have shape (k, dim) with k >= 1, got {centres.shape}")
    if dim is not None and centres.shape[1] != dim:
        raise ValueError(f"prototypes have dimension {centres.shape[1]} but the embeddings {dim}")
    norms = np.linalg.norm(centres, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("prototypes must be finite, non-zero vectors")
    return centres / norms


def _totals(stats: Sequence[ClusterStats], shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Summed sums, summed counts and the std of the summed noise, over partners."""
    if not stats:
        raise ValueError("the server step needs the statistics of at least one partner")
    want = shape if shape is not None else np.asarray(stats[0].sums).shape
    for i, s in enumerate(stats):
        if not isinstance(s, ClusterStats):
            raise ValueError(f"stats[{i}] is a {type(s).__name__}, not ClusterStats")
        if np.asarray(s.sums).shape != tuple(want):
            raise ValueError(f"stats[{i}] has sums of shape {np.asarray(s.sums).shape}, expected {tuple(want)}")
    sums = np.sum([np.asarray(s.sums, dtype=np.float64) for s in stats], axis=0)
    counts = np.sum([np.asarray(s.counts, dtype=np.float64) for s in stats], axis=0)
    std = math.sqrt(sum(s.noise_std**2 for s in stats))
    return sums, counts, std


def _normalized(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _debiased_norms(sums: np.ndarray, std: float) -> np.ndarray:
    """``||S||`` from noisy ``S + e`` with ``e ~ N(0, std**2 I)``: sqrt(max(||.||**2 - dim std**2, 0))."""
    squared = np.sum(sums**2, axis=1) - sums.shape[1] * std**2
    return np.sqrt(np.maximum(squared, 0.0))
