"""Privacy audit of a partner's real training round: canaries, a one-run bound, mechanism checks.

The audit runs the partner's own round, :func:`fedpersona.federation.partner.train_round`, on a
table written to disk and read back through the partner's ingestion (schema, validation, the
keyed train/test split, the declared public row count, ``plan.json``, the ledger, the secret
randomness, the scenario's per-sample clipping mode (book-keeping, or Opacus' ghost or hooks), the
real persona encoder). The one thing
it adds is a set of *gradient canaries* (Nasr et al., "Tight Auditing of Differentially Private
Machine Learning", USENIX Security 2023, section 3.2): ``m`` canary users, each put into the
table with probability 1/2 (independent coin flips from an injected ``numpy.random.Generator``),
whose per-sample gradient the audit sets to ``gain * max_grad_norm`` on one coordinate of its
own, in an audit-only canary table next to the encoder, and zero everywhere else. Ordinary users
keep their real gradients and give the canary table none. A canary's gradient therefore goes
through the round's own per-sample norm, clipping, sum, noise and optimizer step; nothing about
the guarantee is simulated.

**Bound (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846).** The score of canary ``i`` is the sum over all steps of the privatised
gradient of its coordinate, read just before the inner optimizer applies it (the ledger's epsilon
covers the whole transcript of noisy gradients, so a white-box auditor may read all of it). The
``k`` highest scores are guessed "included", the ``k`` lowest "excluded" (``k`` fixed before the
run); the number of right guesses gives :func:`epsilon_lower_bound`. A correct pipeline stays
below the claim with probability at least the confidence.

**Mechanism checks.** The bound needs many rounds to see a moderate error, so the audit also
uses what it knows as the auditor (the coin flips and the plan) to check each part of the
mechanism directly; any failed check is a *finding* and the verdict is "inconsistent":

- *Noise against clipping*: an excluded canary's score is pure noise, ``N(0, T (sigma C / B)^2)``
  over ``T`` steps; an included one also holds ``C / B`` per step it was sampled (``q T`` on
  average). So ``sd(excluded) * sqrt(T) * q / (mean(included) - mean(excluded))`` estimates the
  noise multiplier the round really applied relative to the clipped signal; it must match the
  planned ``sigma`` within ``max(4 standard errors, 10%)``. Noise scaled down, or clipping that
  lets a canary's ``gain * C`` through, moves it by that factor.
- *Accounting*: the ledger file is read (its JSON lines, not through the ledger class) and its
  DP-SGD steps and epsilon must cover the steps the audit saw, with the plan's ``sigma`` and
  ``q``, recomputed with the claimed accountant.
- *Secret randomness*: round 1 is run again from a copy of the partner's state before round 1,
  with the same data, settings and message. A round whose noise and batches are fresh secret
  randomness releases different parameters; identical ones mean the randomness is a function of
  what the coordinator knows (or of ``noise_seed``, which is labelled as such).

**Soundness details.** Nothing a release depends on may depend on the coin flips except through
the DP mechanism: the declared public row count is the ordinary users' training rows plus
``m // 2``, and the batch size is a third of it (so the Poisson rate is 1/3 whatever the flips).
Canary ids are chosen among those the partner's secret split key sends to the training side (the
audit is run by the partner, on its own state folder). A one-partner federation: each round
receives what the partner sent the round before (the guarantee is the partner's, whatever the
server does with its releases). The batch size and device are the audit's; everything else
(rounds, local epochs, learning rate, clipping mode, model, privacy) is the scenario's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedpersona.config.files import load_plan as load_plan_file
from fedpersona.config.settings import PartnerConfig, PrivacyPlan, Scenario
from fedpersona.data.synthetic import KINDS, generate_frame
from fedpersona.errors import ConfigError
from fedpersona.federation.partner import PartnerData, split_key, train_mask, train_round
from fedpersona.model.training import TrainedModel
from fedpersona.privacy.accounting import compute_epsilon
from fedpersona.privacy.ledger import PrivacyLedger

__all__ = [
    "AUDIT_FILE",
    "AuditResult",
    "AuditSettings",
    "CanaryModel",
    "audit_p_value",
    "check_out_dir",
    "epsilon_lower_bound",
    "guesses_from_scores",
    "noise_ratio",
    "run_audit",
    "write_audit",
]

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
CITATION = (
    "Steinke, Nasr & Jagielski, Privacy Auditing with One (1) Training Run, NeurIPS 2023 "
    "(arXiv:2305.08846), Theorem 5.2 / Algorithm 2; gradient canaries as in Nasr et al., USENIX Security 2023"
)
_CANARY_COLUMN = "audit_canary"


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
    rows: int = 2000
    guess_fraction: float = 0.1
    confidence: float = 0.95
    gain: float = 4.0
    kind: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or self.canaries < 10:
            raise ConfigError(f"audit canaries must be an integer >= 10, got {self.canaries!r}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 100:
            raise ConfigError(f"audit rows must be an integer >= 100 (ordinary users), got {self.rows!r}")
        if not isinstance(self.guess_fraction, int | float) or not 0 < self.guess_fraction <= 0.5:
            raise ConfigError(f"audit guess_fraction must be in (0, 0.5], got {self.guess_fraction!r}")
        if not isinstance(self.confidence, int | float) or not 0 < self.confidence < 1:
            raise ConfigError(f"audit confidence must be in (0, 1), got {self.confidence!r}")
        if not isinstance(self.gain, int | float) or not self.gain >= 2:
            raise ConfigError(f"audit gain must be >= 2 so canaries are clipped to full sensitivity, got {self.gain!r}")
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"audit kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def guesses_per_side(self) -> int:
        """``k+ = k-``, fixed by the settings before anything runs."""
        return max(1, round(self.guess_fraction * self.canaries))


@dataclass(frozen=True)
class AuditResult:
    """What ``audit.json`` holds; all of it public (the coin flips are counted, not listed)."""

    epsilon_claimed: float
    epsilon_lower_bound: float
    confidence: float
    canaries: int
    canaries_included: int
    guesses: int
    correct: int
    noise_multiplier_planned: float
    noise_multiplier_measured: float
    noise_multiplier_stderr: float
    steps_observed: int
    steps_ledger: int
    epsilon_observed: float
    epsilon_ledger: float
    replay_identical: bool
    delta: float
    accountant: str
    max_grad_norm: float
    sample_rate: float
    rounds: int
    kind: str
    grad_sample_mode: str
    seconds: float
    findings: tuple[str, ...] = field(default_factory=tuple)
    method: str = CITATION

    @property
    def claim_refuted(self) -> bool:
        """The lower bound exceeds the claim: at this confidence, the claimed epsilon is false."""
        return self.epsilon_lower_bound > self.epsilon_claimed

    @property
    def consistent(self) -> bool:
        """No finding and no refutation."""
        return not self.findings and not self.claim_refuted

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["findings"] = list(self.findings)
        return {**out, "claim_refuted": self.claim_refuted, "consistent": self.consistent}


# --- the canaries ------------------------------------------------------------------------------


class CanaryModel(nn.Module):
    """The partner's encoder plus an audit-only canary table, trained as one module.

    ``forward`` returns the encoder's per-sample loss for ordinary rows and
    ``scale * canary[code]`` for canary rows (``code = batch["audit_canary"]``, 0 = ordinary):
    a canary's per-sample gradient is ``scale`` on its own coordinate and zero elsewhere; an
    ordinary row's is the encoder's own. ``config`` is the encoder's (DP-SGD reads its mask rate).
    """

    def __init__(self, encoder: TrainedModel, canaries: int, scale: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.takes_keep = getattr(encoder, "takes_keep", True)
        self.canary = nn.Embedding(canaries + 1, 1)
        nn.init.zeros_(self.canary.weight)
        self.scale = float(scale)

    def forward(self, batch: dict[str, torch.Tensor], keep: torch.Tensor | None) -> torch.Tensor:
        per_sample = self.encoder(batch, keep)  # type: ignore[arg-type]
        code = batch[_CANARY_COLUMN]
        dirac = self.scale * self.canary(code).squeeze(-1).to(per_sample.dtype)
        return torch.where(code > 0, dirac, per_sample)


class _Instrument:
    """Wraps the round's encoder in a :class:`CanaryModel` and records its noisy gradients."""

    def __init__(self, codes_by_id: dict[str, int], canaries: int, scale: float, cfg: PartnerConfig) -> None:
        self.codes_by_id = codes_by_id
        self.canaries = canaries
        self.scale = scale
        self.cfg = cfg
        self.model: CanaryModel | None = None

    def __call__(self, encoder: TrainedModel, data: PartnerData) -> nn.Module:
        keys = [str(x) for x in data.table.ids]
        in_train = train_mask(keys, split_key(self.cfg), self.cfg.test_fraction)
        codes = np.array([self.codes_by_id.get(k, 0) for k, keep in zip(keys, in_train, strict=True) if keep])
        device = data.train.tensors["scalar"].device
        data.train.tensors[_CANARY_COLUMN] = torch.from_numpy(codes.astype(np.int64)).to(device)
        self.model = CanaryModel(encoder, self.canaries, self.scale).to(device)
        return self.model


@contextlib.contextmanager
def _noisy_gradients(instrument: _Instrument, sink: list[np.ndarray]) -> Iterator[None]:
    """Record the canary table's gradient just before each inner optimizer step.

    That is the privatised gradient (clipped per-sample gradients summed, plus the noise, over
    the expected batch size) as the inner optimizer is about to apply it: the one Opacus' DP
    optimizer wraps, or the one book-keeping clipping hands its gradient to. The hook is
    process-wide, so it is registered only around one round and always removed.
    """

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if isinstance(optimizer, DPOptimizer) or instrument.model is None:  # the outer one sees un-noised sums
            return
        weight = instrument.model.canary.weight
        if weight.grad is not None and any(p is weight for group in optimizer.param_groups for p in group["params"]):
            sink.append(weight.grad.detach()[1:, 0].double().cpu().numpy().copy())

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def noise_ratio(scores: np.ndarray, included: np.ndarray, *, steps: int, sample_rate: float) -> tuple[float, float]:
    """The noise multiplier the transcript shows, and its standard error.

    ``sd(excluded) * sqrt(steps) * q / (mean(included) - mean(excluded))`` (see the module
    docstring); the error is the delta method's for that ratio. ``(inf, inf)`` when included
    canaries do not score above excluded ones.
    """
    scores = np.asarray(scores, dtype=np.float64)
    inc, exc = scores[included], scores[~included]
    if len(inc) < 2 or len(exc) < 2:
        raise ValueError("the noise check needs at least two included and two excluded canaries")
    diff = float(inc.mean() - exc.mean())
    sd = float(exc.std(ddof=1))
    if diff <= 0:
        return math.inf, math.inf
    estimate = sd * math.sqrt(steps) * sample_rate / diff
    se_diff = math.sqrt(inc.var(ddof=1) / len(inc) + exc.var(ddof=1) / len(exc))
    relative = math.sqrt((se_diff / diff) ** 2 + 1.0 / (2.0 * (len(exc) - 1)))
    return estimate, estimate * relative


# --- the audit ---------------------------------------------------------------------------------


def run_audit(
    *,
    scenario: Scenario,
    settings: AuditSettings,
    rng: np.random.Generator,
    workdir: str | Path | None = None,
) -> AuditResult:
    """Audit one partner's real rounds (``scenario``'s rounds, training, model and privacy).

    ``scenario.privacy.target_epsilon`` is the claim; it must be finite. The coin flips, the
    table and the canary ids come from ``rng``; the round's own DP randomness is the partner's
    secret (so two audits differ in their scores, not in their conclusion). The partner's
    state and table go under ``workdir`` (by default a temporary folder, removed afterwards).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not scenario.privacy.private:
        raise ConfigError("an audit needs a finite claimed epsilon; a NOT PRIVATE run has nothing to audit")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fedpersona-audit-") as tmp:
            return run_audit(scenario=scenario, settings=settings, rng=rng, workdir=tmp)
    started = time.perf_counter()
    work = Path(workdir)
    m, rounds, claim = settings.canaries, scenario.federation.rounds, scenario.privacy
    kind = settings.kind or scenario.silos[0].kind
    if kind not in KINDS:
        raise ConfigError(f"the audit generates a {kind!r} table, but only {', '.join(KINDS)} can be generated")

    # Coins and the ordinary users first, in a fixed order.
    included = rng.random(m) < 0.5
    frame, _ = generate_frame(kind, settings.rows, rng=rng)

    def partner(public_rows: int, state_dir: Path) -> PartnerConfig:
        return PartnerConfig.model_validate(
            {"name": "audited", "kind": kind, "schema": str(work / "schema.toml"), "data": str(work / "table.csv"),
             "state_dir": str(state_dir), "privacy": claim, "public_rows": public_rows}
        )  # fmt: skip

    work.mkdir(parents=True, exist_ok=True)
    schema_text = resources.files("fedpersona").joinpath("schemas", f"synthetic_{kind}.toml").read_text("utf-8")
    (work / "schema.toml").write_text(schema_text, encoding="utf-8")
    cfg = partner(2, work / "state")
    key = split_key(cfg)
    ordinary_train = int(train_mask([str(x) for x in frame["user_id"]], key, cfg.test_fraction).sum())
    candidates = [f"audit-canary-{j:06d}" for j in range(20 * m + 100)]
    on_train = train_mask(candidates, key, cfg.test_fraction)
    ids = [c for c, t in zip(candidates, on_train, strict=True) if t][:m]
    if len(ids) < m:
        raise ConfigError(f"test_fraction {cfg.test_fraction} leaves too few training-side canary ids")
    public_rows = ordinary_train + m // 2
    cfg = partner(public_rows, work / "state")
    canary_rows = frame.iloc[rng.integers(0, len(frame), size=m)].copy()
    canary_rows["user_id"] = ids
    table = pd.concat([frame, canary_rows[included]], ignore_index=True)
    table = table.iloc[rng.permutation(len(table))]
    table.to_csv(work / "table.csv", index=False)
    training = scenario.training.replace(batch_size=math.ceil(public_rows / 3), sample_rate=None, device="cpu")
    instrument = _Instrument({c: i + 1 for i, c in enumerate(ids)}, m, settings.gain * claim.max_grad_norm, cfg)
    logger.info(
        "audit: %d canaries (%d included), %d rounds, claimed epsilon %g",
        m,
        included.sum(),
        rounds,
        claim.target_epsilon,
    )

    def one_round(
        config: PartnerConfig, received: dict[str, np.ndarray], rnd: int, sink: list[np.ndarray]
    ) -> dict[str, np.ndarray]:
        with _noisy_gradients(instrument, sink):
            outcome = train_round(
                cfg=config, model_cfg=scenario.model, training=training, received=received, server_round=rnd,
                num_rounds=rounds, adapter_shared=True, seed=scenario.federation.seed, instrument=instrument,
            )  # fmt: skip
        return outcome.arrays

    before = work / "state-before-round-1"
    shutil.copytree(cfg.state_dir, before)
    transcript: list[np.ndarray] = []
    received: dict[str, np.ndarray] = {}
    first: dict[str, np.ndarray] = {}
    for rnd in range(1, rounds + 1):
        received = one_round(cfg, received, rnd, transcript)
        first = first or received
        logger.info("audit: round %d of %d done", rnd, rounds)
    again = one_round(partner(public_rows, before), {}, 1, [])
    replay_identical = all(np.array_equal(first[k], again[k]) for k in first)

    plan = load_plan_file(Path(cfg.state_dir))
    assert plan is not None and plan.noise_multiplier is not None
    scores = np.sum(transcript, axis=0) if transcript else np.zeros(m)
    k = settings.guesses_per_side
    guess = guesses_from_scores(scores, positive=k, negative=k)
    correct = int(np.sum(guess == np.where(included, 1, -1)))
    bound = epsilon_lower_bound(
        canaries=m, guesses=2 * k, correct=correct, delta=claim.delta, confidence=settings.confidence
    )
    measured, stderr = noise_ratio(scores, included, steps=len(transcript), sample_rate=plan.sample_rate)
    ledger_steps, ledger_eps = _read_ledger(Path(cfg.state_dir) / PrivacyLedger.FILE)
    observed_eps = compute_epsilon(
        [(plan.noise_multiplier, plan.sample_rate, len(transcript))], delta=claim.delta, accountant=claim.accountant
    )
    findings = _findings(
        plan=plan, measured=measured, stderr=stderr, steps=len(transcript), ledger_steps=ledger_steps,
        ledger_eps=ledger_eps, observed_eps=observed_eps, replay_identical=replay_identical, claim=claim.target_epsilon,
    )  # fmt: skip
    return AuditResult(
        epsilon_claimed=float(claim.target_epsilon),
        epsilon_lower_bound=bound,
        confidence=settings.confidence,
        canaries=m,
        canaries_included=int(included.sum()),
        guesses=2 * k,
        correct=correct,
        noise_multiplier_planned=float(plan.noise_multiplier),
        noise_multiplier_measured=measured,
        noise_multiplier_stderr=stderr,
        steps_observed=len(transcript),
        steps_ledger=ledger_steps,
        epsilon_observed=observed_eps,
        epsilon_ledger=ledger_eps,
        replay_identical=replay_identical,
        delta=claim.delta,
        accountant=claim.accountant,
        max_grad_norm=claim.max_grad_norm,
        sample_rate=plan.sample_rate,
        rounds=rounds,
        kind=kind,
        grad_sample_mode=training.grad_sample_mode,
        seconds=round(time.perf_counter() - started, 3),
        findings=tuple(findings),
    )


def _read_ledger(path: Path) -> tuple[int, float]:
    """DP-SGD steps and the last epsilon in a ledger file, read as plain JSON lines."""
    steps, epsilon = 0, 0.0
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                steps += int(entry["steps"]) if entry["mechanism"] == "dp-sgd" else 0
                epsilon = max(epsilon, float(entry["epsilon_after"]))
    return steps, epsilon


def _findings(
    *,
    plan: PrivacyPlan,
    measured: float,
    stderr: float,
    steps: int,
    ledger_steps: int,
    ledger_eps: float,
    observed_eps: float,
    replay_identical: bool,
    claim: float,
) -> list[str]:
    sigma = float(plan.noise_multiplier or 0.0)
    out = []
    if not abs(measured - sigma) <= max(4.0 * stderr, 0.1 * sigma):
        out.append(
            f"noise: the transcript shows a noise multiplier of {measured:.3g} (standard error {stderr:.2g}) "
            f"relative to the clipped signal, the plan {sigma:.4g}: the noise or the clipping is not as accounted"
        )
    if ledger_steps < steps or ledger_eps < observed_eps * (1 - 1e-6):
        out.append(
            f"accounting: the ledger holds {ledger_steps} DP-SGD steps and epsilon {ledger_eps:.4g}, but "
            f"{steps} noisy steps ran, worth epsilon {observed_eps:.4g}: steps ran that were not charged"
        )
    if observed_eps > claim * (1 + 1e-6):
        out.append(f"plan: the steps that ran are worth epsilon {observed_eps:.4g}, above the claim {claim:g}")
    if replay_identical:
        out.append(
            "randomness: the same round on the same state and message released identical parameters: its "
            "noise and batches are a function of what the coordinator knows (or of a declared noise_seed)"
        )
    return out


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
