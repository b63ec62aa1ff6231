"""Empirical privacy audit: check a partner's claimed epsilon with one federated training run.

Method: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846). ``m`` canary users each go into the audited partner's table with probability
1/2 (independent coin flips from an injected ``numpy.random.Generator``); one federated training
runs; a score per canary gives ``k+`` guesses "included" (highest scores) and ``k-`` guesses
"excluded" (lowest), with ``k+`` and ``k-`` fixed before the run; the number of right guesses
gives a lower bound on epsilon at 95% confidence (:func:`epsilon_lower_bound`). If the pipeline
is (eps, delta)-DP the bound exceeds eps with probability at most 5%, so a bound above the
claim refutes the claim.

**The federation.** One audited partner and ``peers`` others (default 2) of one kind and one
schema, so they share an adapter slot. Each trains every round with the real
:func:`~fedpersona.model.training.train_locally` (Opacus DP-SGD, Poisson sampling, the noise multiplier
:func:`~fedpersona.privacy.accounting.plan_noise` planned for the claim over all rounds, a ledger charged
before each round); :class:`~fedpersona.federation.aggregation.ScopedAggregator` averages the replies, in
process. ``[federation]``, ``[training]`` (except batch size and device) and ``[privacy]`` come
from the scenario; its ``[model]`` and ``[[silos]]`` do not apply, and secure aggregation is not
simulated (it limits what the server sees, not what the partner's guarantee covers).

**Data and canaries.** Tables take the real ingestion path (schema, validated table,
:func:`~fedpersona.data.features.featurize`). The audit schema has four numbers with public bounds, a
label, and a ``canary`` categorical whose public vocabulary is the ``m`` canary ids. Ordinary
users have random numbers, a logistic label and no canary value. Canary ``i`` is an *indicator*
canary: no numbers, canary value ``canary-i``, a random label.

**The model.** :class:`CanaryProbe`, a logistic regression without intercept in the encoder's
scopes: a global ``trunk`` (a weight per number) and a kind-scoped ``adapter`` (a weight per
canary code, times a public gain), zero-initialised. A canary's per-sample gradient lies on its
own adapter weight only (a "Dirac" canary, the strongest data canary for DP-SGD), and the gain
makes it at least ``max_grad_norm``, so clipping leaves it at full sensitivity. The product's
:class:`~fedpersona.model.encoder.PersonaEncoder` is not used: there a canary's own embedding row gets
about 5% of its clipped gradient norm (the rest lands on shared weights), far too little to
catch even a 5-fold noise error. So the audit checks the DP-SGD machinery (plan, accountant,
ledger, Opacus noise, clipping, Poisson sampling) and the federated path, not the per-sample
gradients of the encoder's own layers.

**Scores (white-box).** The ledger's epsilon accounts for the whole DP-SGD transcript, every
noisy gradient of every step, so the auditor may look at all of them. The *transcript* score of
canary ``i`` is ``-sign(i) * sum over steps`` of the noisy gradient of its adapter weight, read
just before the audited partner's optimizer applies it (``sign = +1`` for a positive label, -1
for a negative one: the direction the canary pushes when it is trained on); it gives
``epsilon_lower_bound``. The *releases* score uses only what the partner sends:
``sign(i) * sum over rounds of (sent - received)`` of that weight; it gives
``epsilon_lower_bound_releases``, which Adam's per-coordinate scaling makes weaker. Each bound
holds at the stated confidence on its own; the verdict (``claim_refuted``) uses the first.
Neither score sees the coin flips.

**Guesses (pre-registered).** ``k+ = k- = round(guess_fraction * m)`` (default 10% of the
canaries on each side), fixed before any audit from a simulation of the score distributions.
Ties are broken by canary index.

**Soundness details.** The theorem needs every output to be DP in each coin flip, so nothing
else may depend on how many canaries were included. The batch size is ``B = max(m + 1, 64)``
and the audited partner holds ``2B + 1`` ordinary users, so ``ceil(rows / B) = 3`` (hence the
Poisson rate 1/3 and the step count) whatever the flips; its aggregation weight is its
*declared* row count ``2B + 1 + m // 2``. Opacus divides the noisy sum by ``int(rows * q)``,
which moves by about a percent with the flips; Adam is invariant to such a common scale, and
the transcript score is scale-free across canaries, so neither bound is affected.

**The test knob** ``noise_scale`` (1 = the correct pipeline): training uses the planned noise
multiplier times ``noise_scale`` while the claim stays the planned target. The ledgers are
opened with the budget that noise really spends (else they would, rightly, refuse round 1), and
the audited ledger's final epsilon is reported as ``epsilon_ledger``. ``0`` trains without DP
(``train_locally``'s non-private path: no clipping, no noise).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedpersona.config.settings import PrivacySettings, Scenario, TrainingSettings, sample_rate_for
from fedpersona.data.features import FeatureLayout, FeatureTensors, featurize
from fedpersona.data.schema import Schema, slot_id
from fedpersona.data.schema_reader import parse_schema
from fedpersona.data.tables import validate_frame
from fedpersona.errors import ConfigError
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.training import train_locally
from fedpersona.privacy.accounting import compute_epsilon
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.planner import plan_noise
from fedpersona.privacy.randomness import SecretRandomness

__all__ = [
    "AUDIT_FILE",
    "AuditResult",
    "AuditSettings",
    "CanaryProbe",
    "ProbeConfig",
    "audit_p_value",
    "audit_schema",
    "check_out_dir",
    "epsilon_lower_bound",
    "guesses_from_scores",
    "run_audit",
    "write_audit",
]

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
CITATION = (
    "Steinke, Nasr & Jagielski, Privacy Auditing with One (1) Training Run, NeurIPS 2023 "
    "(arXiv:2305.08846), Theorem 5.2 / Algorithm 2"
)
_KIND = "finance"  # any kind works: every audit partner uses the same audit schema
_NUMBERS = ("x1", "x2", "x3", "x4")
_TRUE_WEIGHTS = np.array([3.0, -3.0, 1.5, 0.0])


# --- the bound ---------------------------------------------------------------------------------


def audit_p_value(*, epsilon: float, delta: float, canaries: int, guesses: int, correct: int) -> float:
    """P-value of ``correct`` right guesses out of ``guesses`` if the run were (eps, delta)-DP.

    Steinke et al. 2023, Theorem 5.2: with ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``,
    ``P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i``, where ``m`` is the
    number of canaries, ``r`` the number of guesses and ``W`` the number of right guesses.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(correct - 1, guesses, p))  # f(v)
    # f(v - i) - f(v) = P[v - i <= Binomial < v] for i = 1..v: one cumulative sum from v - 1 down.
    below = np.cumsum(stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p))
    worst = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * canaries * delta * worst)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``correct`` right out of ``guesses`` rejects at ``confidence``.

    Every epsilon below the result has :func:`audit_p_value` ``< 1 - confidence`` (bisection to
    1e-9, as in the paper's Algorithm 2); 0 when not even epsilon = 0 is rejected.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return audit_p_value(epsilon=eps, delta=delta, canaries=canaries, guesses=guesses, correct=correct) < level

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # ends: the p-value tends to 1 as epsilon grows
        low, high = high, 2.0 * high
    while high - low > 1e-9:
        mid = (low + high) / 2.0
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


def guesses_from_scores(scores: np.ndarray, *, positive: int, negative: int) -> np.ndarray:
    """``+1`` for the ``positive`` highest scores, ``-1`` for the ``negative`` lowest, else 0.

    Ties are broken by index (a stable sort), never by anything that depends on membership.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not np.all(np.isfinite(scores)):
        raise ValueError("scores must be a one-dimensional array of finite numbers")
    if positive < 0 or negative < 0 or positive + negative > len(scores):
        raise ValueError(f"cannot make {positive} + {negative} guesses about {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    out = np.zeros(len(scores), dtype=np.int64)
    out[order[:negative]] = -1
    if positive:
        out[order[-positive:]] = 1
    return out


# --- settings and result -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    """What to audit and how hard; validated on construction."""

    canaries: int = 1000
    noise_scale: float = 1.0
    guess_fraction: float = 0.1
    confidence: float = 0.95
    peers: int = 2
    gain: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or self.canaries < 10:
            raise ConfigError(f"audit canaries must be an integer >= 10, got {self.canaries!r}")
        scale = self.noise_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
            raise ConfigError(f"audit noise_scale must be a finite number >= 0 (1 = as planned), got {scale!r}")
        if not isinstance(self.guess_fraction, int | float) or not 0 < self.guess_fraction <= 0.5:
            raise ConfigError(f"audit guess_fraction must be in (0, 0.5], got {self.guess_fraction!r}")
        if not isinstance(self.confidence, int | float) or not 0 < self.confidence < 1:
            raise ConfigError(f"audit confidence must be in (0, 1), got {self.confidence!r}")
        if isinstance(self.peers, bool) or not isinstance(self.peers, int) or self.peers < 1:
            raise ConfigError(f"audit peers must be an integer >= 1, got {self.peers!r}")
        if not isinstance(self.gain, int | float) or not self.gain >= 2:
            # A canary's gradient is gain * max_grad_norm * |p - y|, and |p - y| starts at 1/2.
            raise ConfigError(f"audit gain must be >= 2 so canaries are clipped to full sensitivity, got {self.gain!r}")

    @property
    def guesses_per_side(self) -> int:
        """``k+ = k-``, fixed by the settings before anything runs."""
        return max(1, round(self.guess_fraction * self.canaries))

    @property
    def batch_size(self) -> int:
        """Large enough that the audited partner's Poisson rate ignores the coin flips."""
        return max(self.canaries + 1, 64)


@dataclass(frozen=True)
class AuditResult:
    """What ``audit.json`` holds; all of it public (the coin flips are counted, not listed)."""

    epsilon_claimed: float
    epsilon_lower_bound: float
    confidence: float
    canaries: int
    canaries_included: int
    guesses: int
    guesses_positive: int
    guesses_negative: int
    correct: int
    correct_positive: int
    correct_negative: int
    epsilon_lower_bound_releases: float
    correct_releases: int
    noise_scale: float
    noise_multiplier_planned: float
    noise_multiplier: float | None
    epsilon_ledger: float | None
    delta: float
    accountant: str
    max_grad_norm: float
    sample_rate: float
    steps: int
    rounds: int
    partners: int
    seconds: float
    method: str = CITATION
    score: str = "transcript: -sign(label) * sum over steps of the canary weight's noisy gradient"
    score_releases: str = "sign(label) * sum over rounds of (sent - received) of the canary weight"

    @property
    def claim_refuted(self) -> bool:
        """The lower bound exceeds the claim: at this confidence, the claimed epsilon is false."""
        return self.epsilon_lower_bound > self.epsilon_claimed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "claim_refuted": self.claim_refuted}


# --- the probe model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's public constants (``mask_rate`` is what ``train_locally`` reads)."""

    gain: float = 4.0
    mask_rate: float = 0.0


class CanaryProbe(nn.Module):
    """Logistic regression without intercept, in the encoder's scopes; owns its loss.

    ``logit = trunk(numbers * kept) + gain * sum_c adapter(code_c) * kept_c``: ``trunk`` (scope
    global) holds one weight per number, ``adapter`` (scope kind) one weight per categorical code.
    """

    def __init__(self, layout: FeatureLayout, config: ProbeConfig) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.trunk = nn.Linear(len(layout.scalar_names), 1, bias=False)
        self.adapter = nn.Embedding(sum(layout.cat_cardinalities), 1)
        nn.init.zeros_(self.trunk.weight)
        nn.init.zeros_(self.adapter.weight)

    def forward(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``(B,)``; ``keep`` (B, T) masks tokens as in the encoder."""
        n_scalar = len(self.layout.scalar_names)
        numbers = batch["scalar"] * keep[:, :n_scalar].to(batch["scalar"].dtype)  # (B, S)
        codes = self.adapter(batch["cat"]).squeeze(-1)  # (B, C)
        kept = keep[:, n_scalar : n_scalar + codes.shape[1]].to(codes.dtype)  # (B, C)
        logit = self.trunk(numbers).squeeze(-1) + self.config.gain * (codes * kept).sum(1)  # (B,)
        label = batch["labels"][:, 0]  # (B,), NaN = unknown
        bce = F.binary_cross_entropy_with_logits(logit, torch.nan_to_num(label), reduction="none")
        return bce * ~torch.isnan(label)


# --- data --------------------------------------------------------------------------------------


def audit_schema(canaries: int) -> Schema:
    """The audit table's schema; the canary ids are its public vocabulary."""
    doc = {
        "table": {"kind": _KIND, "id": "user_id", "name": "privacy audit"},
        "features": {
            **{name: {"type": "numeric", "bounds": [0.0, 1.0]} for name in _NUMBERS},
            "canary": {"type": "categorical", "vocabulary": _canary_ids(canaries), "unseen": "reject"},
        },
        "labels": {"label": {"positive": ["1"]}},
    }
    return parse_schema(doc, source="<audit schema>")


def _canary_ids(canaries: int) -> list[str]:
    width = len(str(canaries - 1))
    return [f"canary-{i:0{width}d}" for i in range(canaries)]


def _ordinary_frame(rows: int, prefix: str, rng: np.random.Generator) -> pd.DataFrame:
    x = rng.random((rows, len(_NUMBERS)))
    label = rng.random(rows) < 1.0 / (1.0 + np.exp(-(x @ _TRUE_WEIGHTS - 0.75)))
    frame = pd.DataFrame({name: np.round(x[:, j], 4).astype(str) for j, name in enumerate(_NUMBERS)})
    frame.insert(0, "user_id", [f"{prefix}-{i:06d}" for i in range(rows)])
    frame["canary"] = ""
    frame["label"] = np.where(label, "1", "0")
    return frame


def _canary_frame(ids: list[str], labels: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"user_id": ids, **{name: "" for name in _NUMBERS}})
    frame["canary"] = ids
    frame["label"] = np.where(labels == 1, "1", "0")
    return frame


def _featurized(schema: Schema, frame: pd.DataFrame, source: str) -> FeatureTensors:
    return featurize(validate_frame(schema, frame.reset_index(drop=True), source=source))


# --- the audit ---------------------------------------------------------------------------------


@dataclass
class _Partner:
    name: str
    data: FeatureTensors
    declared_rows: int
    model: CanaryProbe
    ledger: PrivacyLedger | None


@dataclass(frozen=True)
class _Plan:
    """The claim's plan and what the pipeline actually runs under the ``noise_scale`` knob."""

    sample_rate: float
    steps: int  # over all rounds
    planned: float
    used: float | None  # None: non-private training
    privacy: PrivacySettings  # the partners' settings (budget = what ``used`` really spends)


def run_audit(
    *,
    scenario: Scenario,
    settings: AuditSettings,
    rng: np.random.Generator,
    workdir: str | Path | None = None,
) -> AuditResult:
    """Run one audited federated training and bound the audited partner's epsilon.

    ``scenario.privacy.target_epsilon`` is the claim; it must be finite. All randomness comes
    from ``rng``: the same seed gives the same result. The partners' ledgers go under
    ``workdir`` (by default a temporary folder, removed afterwards).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not scenario.privacy.private:
        raise ConfigError("an audit needs a finite claimed epsilon; a NOT PRIVATE run has nothing to audit")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fedpersona-audit-") as tmp:
            return run_audit(scenario=scenario, settings=settings, rng=rng, workdir=tmp)
    started = time.perf_counter()
    m, rounds, claim = settings.canaries, scenario.federation.rounds, scenario.privacy
    training = scenario.training.replace(batch_size=settings.batch_size, device="cpu")
    schema = audit_schema(m)

    # Coins, canary labels, tables and seeds are drawn first, in a fixed order.
    included = rng.random(m) < 0.5
    labels = (rng.random(m) < 0.5).astype(np.int64)
    base_rows = 2 * settings.batch_size + 1  # at the audited partner: ceil(rows / B) = 3 always
    frames = [_ordinary_frame(base_rows, "audited", rng)]
    frames += [_ordinary_frame(base_rows + m // 2, f"peer{p}", rng) for p in range(1, settings.peers + 1)]
    seeds = rng.integers(0, 2**62, size=(rounds, settings.peers + 1))
    ids = _canary_ids(m)
    frames[0] = pd.concat([frames[0], _canary_frame([ids[i] for i in np.flatnonzero(included)], labels[included])])
    tables = [_featurized(schema, frame, f"audit:{p}") for p, frame in enumerate(frames)]

    plan = _plan(claim, training, tables, rounds, settings.noise_scale)
    logger.info(
        "audit: %d canaries, claimed epsilon %g, planned noise %.4g, used %s",
        m, claim.target_epsilon, plan.planned, plan.used,
    )  # fmt: skip
    probe = ProbeConfig(gain=settings.gain * claim.max_grad_norm)
    private = plan.used is not None
    partners = [
        _Partner(
            name=f"peer{p}" if p else "audited",
            data=data,
            declared_rows=len(data) if p else base_rows + m // 2,
            model=CanaryProbe(data.layout, probe),
            ledger=PrivacyLedger(Path(workdir) / f"partner{p}", settings=plan.privacy) if private else None,
        )
        for p, data in enumerate(tables)
    ]
    slot = slot_id(schema.kind, schema.fingerprint())
    transcript, released = _federate(partners, slot, scenario, training, plan, seeds)

    sign = np.where(labels == 1, 1.0, -1.0)
    k = settings.guesses_per_side
    truth = np.where(included, 1, -1)
    guess = guesses_from_scores(-sign * transcript, positive=k, negative=k)
    correct_pos = int(np.sum((guess == 1) & (truth == 1)))
    correct_neg = int(np.sum((guess == -1) & (truth == -1)))
    correct_releases = int(np.sum(guesses_from_scores(sign * released, positive=k, negative=k) == truth))

    def bound(correct: int) -> float:
        return epsilon_lower_bound(
            canaries=m, guesses=2 * k, correct=correct, delta=claim.delta, confidence=settings.confidence
        )

    ledger = partners[0].ledger
    return AuditResult(
        epsilon_claimed=float(claim.target_epsilon),
        epsilon_lower_bound=bound(correct_pos + correct_neg),
        confidence=settings.confidence,
        canaries=m,
        canaries_included=int(included.sum()),
        guesses=2 * k,
        guesses_positive=k,
        guesses_negative=k,
        correct=correct_pos + correct_neg,
        correct_positive=correct_pos,
        correct_negative=correct_neg,
        epsilon_lower_bound_releases=bound(correct_releases),
        correct_releases=correct_releases,
        noise_scale=float(settings.noise_scale),
        noise_multiplier_planned=plan.planned,
        noise_multiplier=plan.used,
        epsilon_ledger=ledger.epsilon() if ledger is not None else None,
        delta=claim.delta,
        accountant=claim.accountant,
        max_grad_norm=claim.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        rounds=rounds,
        partners=len(partners),
        seconds=round(time.perf_counter() - started, 3),
    )


def _plan(
    claim: PrivacySettings, training: TrainingSettings, tables: list[FeatureTensors], rounds: int, scale: float
) -> _Plan:
    """Plan the claim's noise once (every partner has the same rate and steps by construction)."""
    rates = {sample_rate_for(len(t), training.batch_size) for t in tables}
    per_round = {training.steps_per_round(len(t)) for t in tables}
    if len(rates) != 1 or len(per_round) != 1:
        raise RuntimeError(f"audit partners differ in sample rate {rates} or steps per round {per_round}")
    q, steps = rates.pop(), per_round.pop() * rounds
    sigma = plan_noise(
        target_epsilon=claim.target_epsilon, delta=claim.delta, sample_rate=q, steps=steps, accountant=claim.accountant
    )
    if scale == 0:
        return _Plan(q, steps, sigma, None, claim.replace(target_epsilon=math.inf))
    used = sigma * scale
    spent = compute_epsilon([(used, q, steps)], delta=claim.delta, accountant=claim.accountant)
    budget = max(claim.target_epsilon, spent * (1 + 1e-6))
    return _Plan(q, steps, sigma, used, claim.replace(target_epsilon=budget))


def _federate(
    partners: list[_Partner],
    slot: str,
    scenario: Scenario,
    training: TrainingSettings,
    plan: _Plan,
    seeds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """All rounds; returns per canary the audited partner's summed noisy gradients and its
    summed release deltas (both of its canary adapter weights, canary ``i`` at code ``i + 1``)."""
    federation = scenario.federation
    aggregator = ScopedAggregator(optimizer=federation.server_optimizer, lr=federation.server_lr)
    audited = partners[0].model.adapter.weight
    rows = torch.arange(1, audited.shape[0])
    gradients: list[np.ndarray] = []
    released = np.zeros(len(rows))
    for rnd in range(1, federation.rounds + 1):
        received = aggregator.arrays_for(slot)
        updates = []
        for p, partner in enumerate(partners):
            if received:
                partner.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in received.items()})
            generator = SecretRandomness.from_seed(int(seeds[rnd - 1, p]))
            if p == 0:
                before = audited.detach()[rows, 0].double().numpy().copy()
                with _noisy_gradients(audited, rows, gradients):
                    _train(partner, training, plan, rnd, generator, received)
                released += audited.detach()[rows, 0].double().numpy() - before
            else:
                _train(partner, training, plan, rnd, generator, received)
            state = {k: v.detach().cpu().numpy().copy() for k, v in partner.model.state_dict().items()}
            updates.append(PartnerUpdate(partner.name, slot, state, partner.declared_rows))
        aggregator.aggregate(updates)
        logger.info("audit: round %d of %d done", rnd, federation.rounds)
    return np.sum(gradients, axis=0), released


@contextlib.contextmanager
def _noisy_gradients(weight: torch.Tensor, rows: torch.Tensor, sink: list[np.ndarray]) -> Iterator[None]:
    """Record ``weight.grad[rows]`` just before each optimizer step that updates ``weight``.

    Under Opacus that is the privatised gradient (clipped per-sample gradients summed, plus the
    noise, over the expected batch size) as the inner Adam is about to apply it. The hook is
    process-wide, so it is registered only around one ``train_locally`` call and always removed.
    """

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if isinstance(optimizer, DPOptimizer):  # its own pre-step hook sees the un-noised gradient
            return
        if weight.grad is not None and any(p is weight for group in optimizer.param_groups for p in group["params"]):
            sink.append(weight.grad.detach()[rows, 0].double().cpu().numpy().copy())

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _train(
    partner: _Partner,
    training: TrainingSettings,
    plan: _Plan,
    rnd: int,
    generator: SecretRandomness,
    received: dict[str, np.ndarray],
) -> None:
    with warnings.catch_warnings():
        # As in partner.train_round: the hook notice for an Embedding fed integer ids is expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        train_locally(
            # train_locally reads only ``config.mask_rate`` and a forward returning per-sample
            # losses, which the probe provides.
            model=cast(PersonaEncoder, partner.model),
            data=partner.data,
            settings=training,
            privacy=plan.privacy,
            noise_multiplier=plan.used,
            ledger=partner.ledger,
            round=rnd,
            randomness=generator,
            public_rows=partner.declared_rows,
            anchor={k: torch.from_numpy(v.copy()) for k, v in received.items()},
        )


# --- output ------------------------------------------------------------------------------------


def check_out_dir(out: str | Path) -> Path:
    """The audit file's path under ``out``; refuses a file as ``out`` and an existing audit."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    path = out / AUDIT_FILE
    if path.exists():
        raise ConfigError(f"{path} already exists; choose another --out so that no earlier audit is overwritten")
    return path


def write_audit(result: AuditResult, out: str | Path) -> Path:
    """Write ``out/audit.json`` atomically (a temporary file, fsync'd, then renamed)."""
    path = check_out_dir(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(AUDIT_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result.to_dict(), handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path
