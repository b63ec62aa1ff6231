"""Personas as a Gaussian mixture in a kind's persona space, fitted by DP expectation-maximisation.

The coordinator holds a public mixture (centres, weights and one covariance shared by all
personas); each partner embeds its training rows (:class:`~fedpersona.personas.space.PersonaSpace`)
and releases, for that mixture, the noisy statistics of one EM step (:func:`stats_release`):

    counts_k = sum_i r_ik + N(0, (m * se)^2),   sums_k = sum_i r_ik z_i + N(0, (se * c_z)^2)

with ``r_i`` the user's responsibilities (one-hot for a hard step, the posterior for a soft
one; ``sum_k r_ik = 1``), ``c_z`` the space's embedding clip and ``m`` the extra weight of the
count noise (counts are few numbers and the centres divide by them).

**Sensitivity.** Adding or removing one user changes the counts by ``r_i`` (L2 norm <= 1) and
the sums by ``r_i z_i^T`` (Frobenius norm <= ``||r_i|| ||z_i|| <= c_z``). Dividing the counts by
``m * se`` and the sums by ``se * c_z`` gives unit-variance noise and a joint sensitivity of
``sqrt(1/m^2 + 1) / se``: one Gaussian mechanism with noise multiplier
``z = se / sqrt(1 + 1/m^2)``. A partner planned with noise multiplier ``z`` therefore uses
``se = z * sqrt(1 + 1/m^2)``. Ledger entry per step: ``(z, 1.0, 1)``.

**The server (post-processing).** It sums the partners' statistics and moves the mixture:
new centres ``sums / counts`` (a persona whose noisy count is at most ``min_count`` keeps its
centre), weights from the counts, and the shared covariance as the total variance of the space
minus the between-persona part (:func:`m_step`), floored and shrunk so that noise cannot make it
singular. Without public data the first centres come from the data too (:func:`init_candidates`
draws ``M`` random candidates from the space's own spectrum, hard steps move them, and
:func:`merge_candidates` merges the surviving ones to ``K`` by weighted k-means): the
initialisation of DP k-means is its hard part (Scott, Lampert & Saulpic, ICML 2025).

**Assigning a user** (:meth:`Mixture.assign`) is a fixed public function of the row once the
mixture is released: free, and it never leaves the partner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import logsumexp

from fedpersona.privacy.randomness import SecretRandomness

__all__ = [
    "STATS_MECHANISM",
    "Mixture",
    "StepStats",
    "init_candidates",
    "m_step",
    "merge_candidates",
    "stats_release",
    "update_candidates",
]

STATS_MECHANISM = "dp-em"

Metric = Literal["euclid", "tied"]


@dataclass(frozen=True, eq=False)  # arrays: compare by identity
class Mixture:
    """Public personas in a persona space.

    ``centres`` (K, p); ``weights`` (K,) positive, summing to one; ``covariance`` (p, p), the
    covariance every persona shares (used by the ``tied`` metric; ``euclid`` ignores it and
    scores ``-|z - centre|^2 / 2``).
    """

    centres: np.ndarray
    weights: np.ndarray
    covariance: np.ndarray
    metric: Metric = "tied"

    def __post_init__(self) -> None:
        k, p = self.centres.shape
        if self.weights.shape != (k,) or self.covariance.shape != (p, p):
            raise ValueError(
                f"weights {self.weights.shape} and covariance {self.covariance.shape} do not fit centres {(k, p)}"
            )
        if not (np.isfinite(self.centres).all() and np.isfinite(self.covariance).all() and (self.weights > 0).all()):
            raise ValueError("a mixture needs finite centres and covariance and positive weights")
        if self.metric not in ("euclid", "tied"):
            raise ValueError(f"metric must be 'euclid' or 'tied', got {self.metric!r}")

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def log_posterior(self, z: np.ndarray) -> np.ndarray:
        """Unnormalised log posterior of each persona for each row: (n, K)."""
        z = np.asarray(z, dtype=np.float64)
        if self.metric == "euclid":
            w, c = z, self.centres
        else:
            # (z - c)^T S^-1 (z - c) = |L^T z - L^T c|^2 with S^-1 = L L^T (Cholesky of the precision)
            factor = np.linalg.cholesky(np.linalg.inv(self.covariance))
            w, c = z @ factor, self.centres @ factor
        distance = (w * w).sum(axis=1)[:, None] - 2.0 * (w @ c.T) + (c * c).sum(axis=1)[None, :]
        return -0.5 * np.maximum(distance, 0.0) + np.log(self.weights)[None, :]

    def responsibilities(self, z: np.ndarray, *, soft: bool) -> np.ndarray:
        """Each row's share in each persona: the posterior (``soft``) or one-hot (n, K)."""
        scores = self.log_posterior(z)
        if soft:
            return np.exp(scores - logsumexp(scores, axis=1, keepdims=True))
        return np.eye(self.k)[scores.argmax(axis=1)]

    def assign(self, z: np.ndarray) -> np.ndarray:
        """Each row's persona (the highest posterior; ties to the lowest index): (n,) int64."""
        if len(z) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.log_posterior(z).argmax(axis=1).astype(np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "centres": self.centres.astype(np.float64),
            "weights": self.weights.astype(np.float64),
            "covariance": self.covariance.astype(np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], metric: Metric = "tied") -> Mixture:
        missing = {"centres", "weights", "covariance"} - set(arrays)
        if missing:
            raise ValueError(f"a mixture needs arrays {sorted(missing)}")
        return cls(
            centres=np.asarray(arrays["centres"], dtype=np.float64),
            weights=np.asarray(arrays["weights"], dtype=np.float64),
            covariance=np.asarray(arrays["covariance"], dtype=np.float64),
            metric=metric,
        )


@dataclass(frozen=True, eq=False)
class StepStats:
    """One EM step's statistics: ``counts`` (K,) and ``sums`` (K, p), noisy when released."""

    counts: np.ndarray
    sums: np.ndarray

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(counts=self.counts + other.counts, sums=self.sums + other.sums)


def stats_release(
    z: np.ndarray,
    mixture: Mixture,
    *,
    soft: bool,
    z_clip: float,
    noise_multiplier: float,
    count_noise: float,
    randomness: SecretRandomness | None,
) -> StepStats:
    """A partner's noisy EM statistics of its embedded training rows ``z`` (each of norm at
    most ``z_clip``; see the module docstring for the noise and its multiplier)."""
    z = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(z, axis=1) if len(z) else np.zeros(0)
    if (norms > z_clip * (1 + 1e-9)).any():
        raise ValueError(f"embeddings must be clipped to norm {z_clip} before the release")
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier) or count_noise <= 0:
        raise ValueError("noise_multiplier must be finite and >= 0, count_noise > 0")
    r = mixture.responsibilities(z, soft=soft) if len(z) else np.zeros((0, mixture.k))
    counts, sums = r.sum(axis=0), r.T @ z if len(z) else np.zeros(mixture.centres.shape)
    if noise_multiplier > 0:
        if randomness is None:
            raise ValueError("a noisy release needs the partner's secret randomness")
        se = noise_multiplier * math.sqrt(1.0 + 1.0 / count_noise**2)
        counts = counts + randomness.normal(counts.shape, count_noise * se)
        sums = sums + randomness.normal(sums.shape, se * z_clip)
    return StepStats(counts=counts, sums=sums)


def init_candidates(
    spectrum: np.ndarray, *, candidates: int, scale: float, generator: np.random.Generator
) -> np.ndarray:
    """``candidates`` random centres from ``N(0, scale^2 diag(spectrum))`` (public randomness)."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    return generator.standard_normal((candidates, spectrum.shape[0])) * np.sqrt(spectrum) * scale


def update_candidates(candidates: np.ndarray, stats: StepStats, *, min_count: float) -> tuple[np.ndarray, np.ndarray]:
    """A hard Lloyd step on the candidates: new positions and their (noisy, floored at 0) weights."""
    ok = stats.counts > min_count
    moved = stats.sums / np.maximum(stats.counts, 1.0)[:, None]
    return np.where(ok[:, None], moved, candidates), np.maximum(stats.counts, 0.0)


def merge_candidates(
    candidates: np.ndarray, weights: np.ndarray, *, k: int, min_count: float, generator: np.random.Generator
) -> np.ndarray:
    """``k`` centres: weighted k-means of the candidates whose weight is above ``min_count``
    (the ``k`` heaviest when fewer survive)."""
    from sklearn.cluster import KMeans

    if len(candidates) < k:
        raise ValueError(f"{len(candidates)} candidates cannot make {k} personas")
    keep = weights > min_count
    if keep.sum() < k:
        keep = np.zeros(len(weights), dtype=bool)
        keep[np.argsort(-weights, kind="stable")[:k]] = True
    seed = int(generator.integers(2**31 - 1))
    fitted = KMeans(n_clusters=k, n_init=20, random_state=seed).fit(
        candidates[keep], sample_weight=np.maximum(weights[keep], 1e-9)
    )
    return np.asarray(fitted.cluster_centers_, dtype=np.float64)


def m_step(
    stats: StepStats,
    *,
    previous: np.ndarray,
    spectrum: np.ndarray,
    min_count: float,
    floor: float,
    shrink: float,
    min_weight: float = 1e-3,
) -> Mixture:
    """The server's M-step from summed statistics (post-processing of the releases).

    Centres: ``sums / counts`` (``previous`` where the count is at most ``min_count``).
    Weights: the counts floored at 0, normalised, floored at ``min_weight``. Covariance: the
    space's total variance ``diag(spectrum)`` minus the between-persona second moment, its
    eigenvalues floored at ``floor`` times their mean, then shrunk by ``shrink`` towards a
    multiple of the identity.
    """
    p = spectrum.shape[0]
    ok = stats.counts > min_count
    centres = np.where(ok[:, None], stats.sums / np.maximum(stats.counts, 1.0)[:, None], previous)
    weights = np.maximum(stats.counts, 0.0)
    weights = np.maximum(weights / max(float(weights.sum()), 1.0), min_weight)
    weights = weights / weights.sum()
    between = np.einsum("k,kp,kq->pq", weights, centres, centres)
    values, vectors = np.linalg.eigh(np.diag(spectrum) - between)
    values = np.maximum(values, floor * float(spectrum.sum()) / p)
    covariance = (vectors * values) @ vectors.T
    covariance = (1.0 - shrink) * covariance + shrink * float(np.trace(covariance)) / p * np.eye(p)
    return Mixture(centres=centres, weights=weights, covariance=(covariance + covariance.T) / 2.0, metric="tied")
