"""Privacy: budget settings, noise planning, the partner's ledger and its accountant.

The unit of privacy is one row of a partner's table (one user). A partner's guarantee is
(epsilon, delta)-DP over every mechanism it ever runs for the federation, accounted by
composing all of them in one accountant that is rebuilt from the ledger on every start.

- :func:`plan_noise` picks the noise multiplier once, up front, from the partner's target
  over ALL planned rounds x local epochs x steps. It is never re-planned per round.
- :class:`PrivacyLedger` is an append-only JSON-lines file with a SHA-256 hash chain. Each
  entry is fsync'd (and its directory too) BEFORE the work it pays for starts, so a crash can
  only over-count, never under-count.
- :meth:`PrivacyLedger.charge` computes the epsilon the new entry *would* bring and refuses
  with :class:`PrivacyBudgetExceeded` before anything is written or computed.

Accountants: ``prv`` (default; Gopi et al. 2021, within ~0.5% above Google's PLD) and
``rdp`` (looser, an upper bound). Opacus' ``gdp`` accountant under-reports epsilon for
DP-SGD and is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedpersona.errors import ConfigError, PrivacyBudgetExceeded, PrivacyLedgerError

__all__ = [
    "ACCOUNTANTS",
    "LedgerEntry",
    "PrivacyLedger",
    "PrivacySettings",
    "compute_epsilon",
    "merge_history",
    "plan_noise",
    "sample_rate_for",
]

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class PrivacySettings:
    """A partner's budget. ``target_epsilon = inf`` means an explicitly NON-PRIVATE run."""

    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"

    def __post_init__(self) -> None:
        eps = self.target_epsilon
        if not isinstance(eps, int | float) or isinstance(eps, bool) or math.isnan(eps) or eps <= 0:
            raise ConfigError(f"privacy.target_epsilon must be > 0 (or inf), got {eps!r}")
        if not isinstance(self.delta, int | float) or not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta!r}")
        if not isinstance(self.max_grad_norm, int | float) or not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if self.accountant == "gdp":
            raise ConfigError(
                "privacy.accountant 'gdp' is refused: Opacus' GDP accountant under-reports "
                "epsilon for DP-SGD; use 'prv' (default) or 'rdp'"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")

    @property
    def private(self) -> bool:
        return math.isfinite(self.target_epsilon)


def sample_rate_for(rows: int, batch_size: int) -> float:
    """Poisson sampling rate for an expected batch of ``batch_size`` out of ``rows``.

    Matches Opacus' definition (``1 / len(data_loader)``), so the rate the optimizer's
    accountant hook sees is the rate planned here.
    """
    if rows < 1:
        raise ConfigError(f"a partner needs at least one training row, got {rows}")
    return 1.0 / math.ceil(rows / max(1, min(batch_size, rows)))


def plan_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps stays <= the target."""
    if steps < 1:
        raise ConfigError(f"the plan needs at least one step, got {steps}")
    with rdp_order_notice_silenced():
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )
    # Independent re-check with the same accountant: the plan must never overshoot.
    reached = compute_epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    while reached > target_epsilon:
        sigma *= 1.001
        reached = compute_epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    return sigma


def compute_epsilon(history: list[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of subsampled-Gaussian runs ``(sigma, q, steps)``."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = merge_history(history)
    with rdp_order_notice_silenced():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def rdp_order_notice_silenced() -> Iterator[None]:
    """Opacus' RDP analysis (also used by PRV to size its domain) warns when the best order
    is the largest one it tried; the bound is still valid, only possibly looser than PRV's
    own result, so the notice carries no information for the caller."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def merge_history(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Group runs with the same (sigma, q), summing their steps.

    Composition is commutative, so this changes no epsilon; it keeps the PRV accountant fast
    (it composes one distribution per distinct entry).
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism run, charged before it runs."""

    seq: int
    time: float
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    delta: float
    accountant: str
    prev_hash: str
    hash: str = ""

    def body(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("hash")
        return data


def _digest(body: dict[str, Any]) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


class PrivacyLedger:
    """Append-only, hash-chained, fsync'd record of every mechanism a partner ran.

    The file is ``<dir>/ledger.jsonl``. A torn last line (a crash in the middle of a write)
    is ignored when reading, which is safe because an entry is written *before* its work
    starts: a torn entry paid for nothing that was sent.
    """

    FILE = "ledger.jsonl"

    def __init__(self, directory: str | Path, *, settings: PrivacySettings) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.FILE
        self.settings = settings
        self.entries: list[LedgerEntry] = self._read()

    def _read(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        entries: list[LedgerEntry] = []
        prev = ""
        lines = self.path.read_bytes().split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
                entry = LedgerEntry(**data)
            except (ValueError, TypeError):
                if number >= len(lines) - 1:  # torn final write: nothing was sent for it
                    logger.warning("%s: ignoring a torn last line %d", self.path, number)
                    break
                raise PrivacyLedgerError(f"{self.path}: line {number} is not a ledger entry") from None
            if entry.prev_hash != prev or _digest(entry.body()) != entry.hash:
                raise PrivacyLedgerError(
                    f"{self.path}: line {number} breaks the hash chain; the ledger was edited "
                    "or corrupted and cannot be trusted"
                )
            entries.append(entry)
            prev = entry.hash
        return entries

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self) -> float:
        """Epsilon spent so far, from the whole ledger."""
        return compute_epsilon(self.history, delta=self.settings.delta, accountant=self.settings.accountant)

    def would_reach(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after adding one more run, without writing anything."""
        return compute_epsilon(
            [*self.history, (noise_multiplier, sample_rate, steps)],
            delta=self.settings.delta,
            accountant=self.settings.accountant,
        )

    def charge(
        self,
        *,
        round: int,
        mechanism: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> LedgerEntry:
        """Check the budget, then durably record the run. Raises before writing if over."""
        after = self.would_reach(noise_multiplier, sample_rate, steps)
        target = self.settings.target_epsilon
        if after > target * (1 + 1e-9):
            raise PrivacyBudgetExceeded(
                f"round {round}: {mechanism} with noise {noise_multiplier:.4g}, sample rate "
                f"{sample_rate:.4g} and {steps} steps would bring epsilon to {after:.4f}, above "
                f"the target {target:g} (spent so far {self.epsilon():.4f}, ledger {self.path})"
            )
        prev = self.entries[-1].hash if self.entries else ""
        entry = LedgerEntry(
            seq=len(self.entries) + 1,
            time=time.time(),
            round=round,
            mechanism=mechanism,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=int(steps),
            epsilon_after=after,
            delta=self.settings.delta,
            accountant=self.settings.accountant,
            prev_hash=prev,
        )
        entry = LedgerEntry(**{**entry.body(), "hash": _digest(entry.body())})
        self.directory.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.entries.append(entry)
        return entry
