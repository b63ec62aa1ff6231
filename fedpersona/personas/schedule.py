"""The one schedule of federated DP k-means, used by the coordinator and by every caller.

:class:`KMeansRun` holds the server's side of a clustering run and nothing else: which
prototypes the next release is asked for (:meth:`KMeansRun.next_prototypes`) and what the
server does with the partners' noisy statistics of it (:meth:`KMeansRun.absorb`). The
ServerApp drives it over Flower messages (:mod:`fedpersona.federation.server_app`);
:func:`federated_kmeans` drives the same object with in-process partners, so the tests of the
schedule test what runs.

**Schedule.** From random starting prototypes, Lloyd's rounds often leave two true groups
under one prototype. The run therefore starts with ``oversample * K`` prototypes, re-seeds
prototypes that end up under the noise floor by splitting the most dispersed clusters, and
after the first ``summary_rounds`` (default: half the rounds) summarises the noisy prototypes
into ``K`` (:func:`~fedpersona.personas.clustering.reduce_prototypes`). With candidate numbers
of personas (``candidates``), the summary makes one start per candidate, each candidate gets
one release of its own, and the best cosine Calinski-Harabasz score
(:func:`~fedpersona.personas.clustering.choose_k`) picks K; the winner's release is one more
Lloyd step for it. Every step is computed from the noisy releases and the run's own
randomness: post-processing, no privacy cost beyond the releases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpersona.personas.clustering import (
    ClusterStats,
    charge_kmeans_round,
    choose_k,
    init_prototypes,
    local_cluster_stats,
    reduce_prototypes,
    update_prototypes,
)
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.randomness import SecretRandomness

__all__ = ["KMeansResult", "KMeansRun", "federated_kmeans"]

logger = logging.getLogger(__name__)

CRITERION = "cosine Calinski-Harabasz on the noisy statistics (fedpersona.personas.clustering.choose_k)"


class KMeansRun:
    """The server's state of one clustering run (see the module docstring).

    ``releases`` is the number of noisy releases each partner makes: ``rounds`` Lloyd rounds
    plus one per candidate K. ``position`` counts the releases absorbed so far.
    """

    def __init__(
        self,
        *,
        k: int,
        rounds: int,
        dim: int,
        generator: np.random.Generator,
        candidates: Sequence[int] = (),
        oversample: int = 3,
        summary_rounds: int | None = None,
    ) -> None:
        self.candidates = sorted(candidates)
        self.k = max(self.candidates) if self.candidates else k
        summary = rounds // 2 if summary_rounds is None else summary_rounds
        if oversample == 1:
            summary = 0
        if isinstance(summary, bool) or not isinstance(summary, int) or not 0 <= summary < rounds:
            raise ValueError(f"summary_rounds must be an integer in [0, rounds), got {summary_rounds!r}")
        self.summary = summary
        self.steps = ["lloyd"] * summary + ["select"] * len(self.candidates) + ["lloyd"] * (rounds - summary)
        self.rng = generator
        self.prototypes = init_prototypes(oversample * self.k if summary else self.k, dim, generator=generator)
        self.options: list[np.ndarray] = []
        if self.candidates and not summary:
            self.options = [init_prototypes(c, dim, generator=generator) for c in self.candidates]
        self.selected: dict[int, list[ClusterStats]] = {}
        self.choice: dict[str, Any] | None = None
        self.position = 0
        self.last: list[ClusterStats] = []

    @property
    def releases(self) -> int:
        return len(self.steps)

    @property
    def done(self) -> bool:
        return self.position >= len(self.steps)

    def next_prototypes(self) -> np.ndarray:
        """The prototypes the next release is computed for."""
        if self.steps[self.position] == "select":
            return self.options[self.position - self.summary]
        return self.prototypes

    def absorb(self, stats: list[ClusterStats]) -> None:
        """The partners' noisy statistics of the release at ``position``: the server's step."""
        r, step = self.position, self.steps[self.position]
        self.last = list(stats)
        if step == "select":
            prototypes = self.options[r - self.summary]
            self.selected[len(prototypes)] = list(stats)
            if len(self.selected) == len(self.candidates):
                picked = choose_k(self.selected)
                best = self.candidates.index(picked.k)
                # The winner's own round is one more Lloyd step for it (post-processing).
                self.prototypes = update_prototypes(self.options[best], self.selected[picked.k], reseed=self.rng)
                self.choice = {
                    "k": picked.k,
                    "scores": {str(c): picked.scores[c] for c in self.candidates},
                    "criterion": CRITERION,
                }
                logger.info("personas: K = %d chosen among %s", picked.k, self.candidates)
        elif r == self.summary - 1:
            self.options = [self._summarise(stats, c) for c in (self.candidates or [self.k])]
            self.prototypes = self.options[-1]
        else:
            self.prototypes = update_prototypes(self.prototypes, list(stats), reseed=self.rng)
        self.position += 1

    def _summarise(self, stats: list[ClusterStats], k: int) -> np.ndarray:
        """The oversampled prototypes summarised into ``k`` (post-processing)."""
        try:
            return reduce_prototypes(stats, k=k, generator=self.rng)
        except ValueError as exc:
            # Too few prototypes rose above the noise floor to summarise them: keep the k with
            # the largest noisy counts (post-processing of the same releases).
            logger.warning("persona clustering: %s; keeping the %d largest prototypes", exc, k)
            updated = update_prototypes(self.prototypes, stats, reseed=self.rng)
            counts = np.sum([s.counts for s in stats], axis=0)
            return updated[np.argsort(-counts, kind="stable")[:k]]

    @property
    def resumable(self) -> bool:
        """Whether the state after the last absorbed release may be checkpointed: after every
        Lloyd round but the last, not between the candidate rounds (a resume from before them
        sends them again, and the partners' ledgers charge them again)."""
        r = self.position - 1
        between = bool(self.candidates) and self.summary - 1 <= r < self.summary + len(self.candidates) - 1
        return 0 <= r and self.position < len(self.steps) and not between

    def restore(self, *, prototypes: np.ndarray, position: int, rng_state: dict[str, Any] | None, choice: Any) -> None:
        """Continue a checkpointed run after its ``position``-th release."""
        self.prototypes, self.position = np.asarray(prototypes, dtype=np.float64), int(position)
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state
        self.choice = choice
        logger.info("persona clustering resumes after round %d of %d", self.position, len(self.steps))


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """What :func:`federated_kmeans` found: final prototypes and the last round's releases."""

    prototypes: np.ndarray  # (k, dim) unit rows
    stats: tuple[ClusterStats, ...]  # the partners' noisy statistics of the last round
    rounds: int  # releases per partner (each one charged)
    choice: dict[str, Any] | None = None


def federated_kmeans(
    embeddings: Sequence[np.ndarray],
    *,
    k: int,
    rounds: int,
    noise_multiplier: float,
    generator: np.random.Generator,
    candidates: Sequence[int] = (),
    oversample: int = 3,
    summary_rounds: int | None = None,
    ledgers: Sequence[PrivacyLedger] | None = None,
    first_round: int = 1,
) -> KMeansResult:
    """A whole clustering run of :class:`KMeansRun` with in-process partners (tests, benchmarks).

    Each partner (one entry of ``embeddings``) makes one :func:`local_cluster_stats` release
    per step, charged first to its ledger when ``ledgers`` are given (rounds ``first_round``,
    ``first_round + 1``, ...); its noise comes from a stream seeded from ``generator`` (a
    reproducible simulation of the partners' secret streams).
    """
    if not embeddings:
        raise ValueError("federated_kmeans needs the embeddings of at least one partner")
    if ledgers is not None and len(ledgers) != len(embeddings):
        raise ValueError(f"got {len(ledgers)} ledgers for {len(embeddings)} partners")
    dims = {np.asarray(z).shape[-1] for z in embeddings}
    if len(dims) != 1:
        raise ValueError(f"all partners' embeddings must have one dimension, got {sorted(dims)}")
    if not isinstance(generator, np.random.Generator):
        raise ValueError(f"expected a numpy.random.Generator, got {type(generator).__name__}")
    partner_rngs = generator.spawn(len(embeddings))
    run = KMeansRun(
        k=k, rounds=rounds, dim=dims.pop(), generator=generator, candidates=candidates,
        oversample=oversample, summary_rounds=summary_rounds,
    )  # fmt: skip
    while not run.done:
        if ledgers is not None:
            for ledger in ledgers:
                charge_kmeans_round(ledger, round=first_round + run.position, noise_multiplier=noise_multiplier)
        prototypes = run.next_prototypes()
        released = []
        for z, rng in zip(embeddings, partner_rngs, strict=True):
            randomness = SecretRandomness.from_seed(int(rng.integers(0, 2**62)))
            noisy = local_cluster_stats(z, prototypes, noise_multiplier=noise_multiplier, randomness=randomness)
            released.append(noisy)
        run.absorb(released)
    return KMeansResult(prototypes=run.prototypes, stats=tuple(run.last), rounds=run.releases, choice=run.choice)
