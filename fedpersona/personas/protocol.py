"""The one persona schedule: which release each partner of a silo kind makes, in which order,
and what the coordinator does between them. The coordinator follows it over Flower messages
(:func:`fedpersona.federation.rounds.cluster_personas`); :func:`federated_personas` follows it
without a transport, for tests and benchmarks, so both run the same code.

Per kind (one schema fingerprint), with the protocol's public constants (:class:`PersonaProtocol`):

1. **Gram** (one release per partner): the persona space (:mod:`fedpersona.personas.space`).
2. **Initialisation** (``init_steps`` releases): ``candidates`` random centres drawn by the server
   from the space's spectrum, moved by hard EM steps on the partners' data, then merged to ``k``
   (:func:`~fedpersona.personas.mixture.merge_candidates`).
3. **EM** (``em_steps`` releases): ``hard_steps`` hard steps with Euclidean distance, then soft
   steps under the tied-covariance mixture.

Every partner therefore makes ``1 + init_steps + em_steps`` releases, each one Gaussian mechanism
charged to its ledger: the Gram with noise multiplier ``gram_noise``, every EM-type step with
``step_noise`` (the planner, :func:`fedpersona.privacy.planner.plan_split`, sets both from the
partner's budget). The server's own randomness (the candidates, the merge) is public: it is
derived from the federation seed and the step, so a resumed run repeats it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedpersona.personas.mixture import (
    Mixture,
    StepStats,
    init_candidates,
    m_step,
    merge_candidates,
    stats_release,
    update_candidates,
)
from fedpersona.personas.space import PersonaSpace, fit_space, gram_release
from fedpersona.privacy.randomness import SecretRandomness

__all__ = [
    "PersonaProtocol",
    "PersonaRequest",
    "PersonaResult",
    "PersonaRun",
    "federated_personas",
    "partner_release",
    "personas_from_arrays",
    "request_arrays",
    "result_from_json",
    "result_to_json",
    "state_from_json",
    "state_to_json",
]


@dataclass(frozen=True)
class PersonaProtocol:
    """The public constants of the persona protocol (the same for every partner of a run).

    ``k`` personas in a ``dims``-dimensional space; rows clipped to ``row_clip`` with Gram offset
    ``offset``; embeddings clipped to ``z_clip_mult`` times the root of the space's total
    variance; ``count_noise``: how much more noise the counts get than the sums (relative);
    personas with a noisy count at most ``min_count`` keep their centre; ``floor`` and
    ``shrink`` keep the shared covariance well conditioned; ``gram_share``: the Gram's share of
    the persona budget (the planner's split).
    """

    k: int = 6
    dims: int = 10
    row_clip: float = 5.0
    offset: float = 5.0
    z_clip_mult: float = 1.2
    candidates: int = 30
    init_steps: int = 2
    init_scale: float = 0.7
    em_steps: int = 4
    hard_steps: int = 2
    count_noise: float = 3.0
    min_count: float = 5.0
    floor: float = 0.1
    shrink: float = 0.1
    gram_share: float = 0.3

    def __post_init__(self) -> None:
        problems = []
        if self.k < 2:
            problems.append(f"k must be >= 2, got {self.k}")
        if self.dims < 1:
            problems.append(f"dims must be >= 1, got {self.dims}")
        if self.candidates < self.k and self.init_steps:
            problems.append(f"candidates ({self.candidates}) must be >= k ({self.k})")
        if self.em_steps < 1 or self.init_steps < 0 or not 0 <= self.hard_steps <= self.em_steps:
            problems.append("needs em_steps >= 1, init_steps >= 0 and 0 <= hard_steps <= em_steps")
        if min(self.row_clip, self.offset, self.z_clip_mult, self.count_noise, self.init_scale) <= 0:
            problems.append("row_clip, offset, z_clip_mult, count_noise and init_scale must be > 0")
        if not 0 < self.gram_share < 1 or not 0 <= self.floor < 1 or not 0 <= self.shrink <= 1:
            problems.append("needs 0 < gram_share < 1, 0 <= floor < 1 and 0 <= shrink <= 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def releases(self) -> int:
        """Releases each partner makes: the Gram and every EM-type step."""
        return 1 + self.step_releases

    @property
    def step_releases(self) -> int:
        """EM-type releases (initialisation and EM steps), each ``(step_noise, 1.0, 1)``."""
        return self.init_steps + self.em_steps


@dataclass(frozen=True, eq=False)
class PersonaRequest:
    """What the coordinator asks every partner of a kind for next."""

    kind: Literal["gram", "stats"]
    space: PersonaSpace | None = None
    mixture: Mixture | None = None
    soft: bool = False


@dataclass(frozen=True, eq=False)
class PersonaResult:
    """The released personas of one kind."""

    space: PersonaSpace
    mixture: Mixture
    shares: np.ndarray  # (K,) persona shares from the last release's noisy counts


class PersonaRun:
    """The coordinator's side of the schedule for one kind: :meth:`request`, then
    :meth:`absorb` the partners' summed releases, until :attr:`done`."""

    def __init__(self, *, protocol: PersonaProtocol, dim: int, seed: int, slot: str = "") -> None:
        if dim < protocol.dims:
            raise ValueError(f"the persona view has {dim} columns, fewer than the {protocol.dims} dimensions asked")
        self.protocol, self.dim, self.seed, self.slot = protocol, dim, int(seed), slot
        self.position = 0
        self.space: PersonaSpace | None = None
        self.candidates: np.ndarray | None = None
        self.mixture: Mixture | None = None
        self.shares: np.ndarray | None = None

    def _generator(self) -> np.random.Generator:
        """Public randomness for this step (the same after a resume)."""
        digest = hashlib.blake2b(self.slot.encode(), digest_size=8).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest, "little"), self.position])

    @property
    def done(self) -> bool:
        return self.position >= self.protocol.releases

    def request(self) -> PersonaRequest:
        if self.done:
            raise RuntimeError("the persona schedule is complete")
        if self.position == 0:
            return PersonaRequest("gram")
        assert self.space is not None
        init = self.position <= self.protocol.init_steps
        if init:
            assert self.candidates is not None
            m = len(self.candidates)
            mixture = Mixture(
                centres=self.candidates, weights=np.full(m, 1.0 / m), covariance=np.eye(self.protocol.dims),
                metric="euclid",
            )  # fmt: skip
            return PersonaRequest("stats", space=self.space, mixture=mixture, soft=False)
        assert self.mixture is not None
        step = self.position - 1 - self.protocol.init_steps
        hard = step < self.protocol.hard_steps
        metric: Literal["euclid", "tied"] = "euclid" if hard else "tied"
        mixture = Mixture(self.mixture.centres, self.mixture.weights, self.mixture.covariance, metric=metric)
        return PersonaRequest("stats", space=self.space, mixture=mixture, soft=not hard)

    def absorb(self, total: np.ndarray | StepStats) -> None:
        """The sum of every partner's release for the current request."""
        pr = self.protocol
        if self.position == 0:
            if not isinstance(total, np.ndarray):
                raise TypeError("the first release is a Gram matrix")
            self.space = fit_space(
                total, dim=self.dim, dims=pr.dims, row_clip=pr.row_clip, offset=pr.offset, z_clip_mult=pr.z_clip_mult
            )
            if pr.init_steps:
                self.candidates = init_candidates(
                    self.space.spectrum, candidates=pr.candidates, scale=pr.init_scale, generator=self._generator()
                )
            else:
                centres = init_candidates(self.space.spectrum, candidates=pr.k, scale=pr.init_scale,
                                          generator=self._generator())  # fmt: skip
                self.mixture = _start(centres, self.space)
            self.position += 1
            return
        if not isinstance(total, StepStats):
            raise TypeError("an EM-type release is a StepStats")
        assert self.space is not None
        if self.position <= pr.init_steps:
            assert self.candidates is not None
            self.candidates, weights = update_candidates(self.candidates, total, min_count=pr.min_count)
            if self.position == pr.init_steps:
                centres = merge_candidates(
                    self.candidates, weights, k=pr.k, min_count=pr.min_count, generator=self._generator()
                )
                self.mixture = _start(centres, self.space)
        else:
            assert self.mixture is not None
            self.mixture = m_step(
                total, previous=self.mixture.centres, spectrum=self.space.spectrum, min_count=pr.min_count,
                floor=pr.floor, shrink=pr.shrink,
            )  # fmt: skip
            counts = np.maximum(total.counts, 0.0)
            self.shares = counts / max(float(counts.sum()), 1e-12)
        self.position += 1

    def result(self) -> PersonaResult:
        if not self.done or self.space is None or self.mixture is None or self.shares is None:
            raise RuntimeError("the persona schedule is not complete")
        return PersonaResult(space=self.space, mixture=self.mixture, shares=self.shares)

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (arrays and the position), for the checkpoint."""
        out: dict[str, Any] = {"position": self.position}
        if self.space is not None:
            out.update({f"space.{k}": v for k, v in self.space.arrays().items()})
        if self.candidates is not None:
            out["candidates"] = self.candidates
        if self.mixture is not None:
            out.update({f"mixture.{k}": v for k, v in self.mixture.arrays().items()})
        if self.shares is not None:
            out["shares"] = self.shares
        return out

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (ValueError if it does not fit this run)."""
        position = int(state["position"])
        if not 0 <= position <= self.protocol.releases:
            raise ValueError(f"a persona schedule position must be in [0, {self.protocol.releases}], got {position}")
        space = {k[6:]: np.asarray(v) for k, v in state.items() if k.startswith("space.")}
        mixture = {k[8:]: np.asarray(v) for k, v in state.items() if k.startswith("mixture.")}
        self.space = PersonaSpace.from_arrays(space) if space else None
        self.mixture = Mixture.from_arrays(mixture) if mixture else None
        self.candidates = np.asarray(state["candidates"]) if "candidates" in state else None
        self.shares = np.asarray(state["shares"]) if "shares" in state else None
        if position > 0 and self.space is None:
            raise ValueError("a persona schedule past its Gram release needs the space")
        self.position = position


def _start(centres: np.ndarray, space: PersonaSpace) -> Mixture:
    k = len(centres)
    return Mixture(centres=centres, weights=np.full(k, 1.0 / k), covariance=np.diag(space.spectrum) / 4.0,
                   metric="euclid")  # fmt: skip


def partner_release(
    x_train: np.ndarray,
    request: PersonaRequest,
    *,
    protocol: PersonaProtocol,
    gram_noise: float,
    step_noise: float,
    randomness: SecretRandomness | None,
) -> np.ndarray | StepStats:
    """One partner's release for ``request`` from its training rows' persona view (the noise
    multipliers are those of its plan; 0 for an explicitly non-private partner)."""
    if request.kind == "gram":
        return gram_release(
            x_train, clip=protocol.row_clip, offset=protocol.offset, noise_multiplier=gram_noise, randomness=randomness
        )
    assert request.space is not None and request.mixture is not None
    z = request.space.embed(x_train)
    return stats_release(
        z, request.mixture, soft=request.soft, z_clip=request.space.z_clip, noise_multiplier=step_noise,
        count_noise=protocol.count_noise, randomness=randomness,
    )  # fmt: skip


def federated_personas(
    partners: Sequence[np.ndarray],
    *,
    protocol: PersonaProtocol,
    gram_noise: float,
    step_noise: float,
    randomness: Callable[[int, int], SecretRandomness | None],
    seed: int,
    slot: str = "",
) -> PersonaResult:
    """The whole schedule for one kind without a transport: ``partners`` are the partners'
    training rows (persona views); ``randomness(partner, release)`` gives each release's secret
    stream (None when the noise is 0)."""
    if not partners:
        raise ValueError("federated personas need at least one partner")
    run = PersonaRun(protocol=protocol, dim=int(partners[0].shape[1]), seed=seed, slot=slot)
    release = 0
    while not run.done:
        request = run.request()
        outs = [
            partner_release(x, request, protocol=protocol, gram_noise=gram_noise, step_noise=step_noise,
                            randomness=randomness(i, release))
            for i, x in enumerate(partners)
        ]  # fmt: skip
        total: Any = outs[0]
        for out in outs[1:]:
            total = total + out
        run.absorb(total)
        release += 1
    return run.result()


def request_arrays(request: PersonaRequest) -> dict[str, np.ndarray]:
    """The public arrays of a request (the space and the mixture, none for the Gram release),
    as ``space.*`` and ``mixture.*`` names: what a message carries to a partner."""
    out: dict[str, np.ndarray] = {}
    if request.space is not None:
        out.update({f"space.{k}": v for k, v in request.space.arrays().items()})
    if request.mixture is not None:
        out.update({f"mixture.{k}": v for k, v in request.mixture.arrays().items()})
    return out


def personas_from_arrays(arrays: dict[str, np.ndarray], *, metric: str) -> tuple[PersonaSpace, Mixture]:
    """The space and mixture of :func:`request_arrays` (ValueError when they do not fit)."""
    if metric not in ("euclid", "tied"):
        raise ValueError(f"a mixture's metric must be 'euclid' or 'tied', got {metric!r}")
    space = PersonaSpace.from_arrays({k[6:]: np.asarray(v) for k, v in arrays.items() if k.startswith("space.")})
    mixture = Mixture.from_arrays(
        {k[8:]: np.asarray(v) for k, v in arrays.items() if k.startswith("mixture.")},
        metric="tied" if metric == "tied" else "euclid",
    )
    if mixture.centres.shape[1] != space.dims:
        raise ValueError(f"the mixture has {mixture.centres.shape[1]} dimensions, the space {space.dims}")
    return space, mixture


def result_to_json(result: PersonaResult) -> dict[str, Any]:
    """A released result as plain lists (for the checkpoint and the model card)."""
    arrays = {**{f"space.{k}": v for k, v in result.space.arrays().items()},
              **{f"mixture.{k}": v for k, v in result.mixture.arrays().items()}}  # fmt: skip
    return {
        "arrays": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in arrays.items()},
        "metric": result.mixture.metric,
        "shares": np.asarray(result.shares, dtype=np.float64).tolist(),
    }


def result_from_json(doc: dict[str, Any]) -> PersonaResult:
    """The inverse of :func:`result_to_json` (ValueError when it does not fit)."""
    try:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in dict(doc["arrays"]).items()}
        space, mixture = personas_from_arrays(arrays, metric=str(doc.get("metric", "tied")))
        shares = np.asarray(doc["shares"], dtype=np.float64)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a persona result ({exc})") from None
    if shares.shape != (mixture.k,):
        raise ValueError(f"a persona result needs {mixture.k} shares, got shape {shares.shape}")
    return PersonaResult(space=space, mixture=mixture, shares=shares)


def state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """:meth:`PersonaRun.state` as plain lists (for the checkpoint's JSON)."""
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}


def state_from_json(doc: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`state_to_json`."""
    return {k: (v if k == "position" else np.asarray(v, dtype=np.float64)) for k, v in doc.items()}
