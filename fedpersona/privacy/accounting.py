"""Privacy: budget settings, noise planning, the partner's ledger and its accountant.

The unit of privacy is one row of a partner's table (one user). A partner's guarantee is
(epsilon, delta)-DP over every mechanism it ever runs for the federation, accounted by
composing all of them in one accountant that is rebuilt from the ledger on every start.

- :func:`plan_noise` picks the noise multiplier once, up front, from the partner's target
  over ALL planned rounds x local epochs x steps. It is never re-planned per round.
- :class:`PrivacyLedger` is an append-only JSON-lines file with a SHA-256 hash chain. Each
  entry is fsync'd (and its directory too) BEFORE the work it pays for starts, so a crash can
  only over-count, never under-count. Appends hold an exclusive lock and first catch up with
  the file if it changed, so two ledger objects (or processes) on one folder cannot both
  spend the same budget; a torn tail left by a crash is cut off before the next append.
- :meth:`PrivacyLedger.charge` computes the epsilon the new entry *would* bring and refuses
  with :class:`PrivacyBudgetExceeded` before anything is written or computed.

Accountants: ``prv`` (default; Gopi et al. 2021; above Google's PLD by at most its absolute
``eps_error`` of 0.01 plus ~0.2%) and ``rdp`` (looser, an upper bound). Opacus' ``gdp``
accountant under-reports epsilon for DP-SGD and is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
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
    planned_rounds: int | None = None
    # Reproducible noise: every DP key is derived from this seed (see fedpersona.privacy.randomness).
    # Whoever knows it can remove the noise, so a run with it is labelled NOT private against
    # the coordinator. Unset (the default), every key comes from os.urandom.
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        eps = self.target_epsilon
        if not isinstance(eps, int | float) or isinstance(eps, bool) or math.isnan(eps) or eps <= 0:
            raise ConfigError(f"privacy.target_epsilon must be > 0 (or inf), got {eps!r}")
        if not isinstance(self.delta, int | float) or not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta!r}")
        norm = self.max_grad_norm
        if not isinstance(norm, int | float) or isinstance(norm, bool) or not (norm > 0 and math.isfinite(norm)):
            # An infinite clipping norm is no clipping: the sensitivity, and so epsilon, is unbounded.
            raise ConfigError(f"privacy.max_grad_norm must be a finite number > 0, got {norm!r}")
        if self.planned_rounds is not None and (
            not isinstance(self.planned_rounds, int) or isinstance(self.planned_rounds, bool) or self.planned_rounds < 1
        ):
            raise ConfigError(f"privacy.planned_rounds must be an integer >= 1, got {self.planned_rounds!r}")
        seed = self.noise_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"privacy.noise_seed must be an integer >= 0 (or absent), got {seed!r}")
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
    own result, so the notice carries no information for the caller.

    Also silenced: NumPy's "divide by zero encountered in log" from Opacus' PRV at sample
    rate 1 (a partner with no more rows than the batch size): it evaluates ``log(1 - q)`` =
    -inf on purpose inside an ``np.where`` and the epsilon is right (tests pin it to PLD)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings(
            "ignore",
            message="divide by zero encountered in log",
            category=RuntimeWarning,
            module=r"opacus\.accountants\.analysis\.prv\.prvs",
        )
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
    starts: a torn entry paid for nothing that was sent. The next :meth:`charge` cuts the
    torn bytes off before it appends (appending after them would fuse the new entry with the
    fragment into one unreadable line).
    """

    FILE = "ledger.jsonl"
    HEAD = "ledger.head"

    def __init__(self, directory: str | Path, *, settings: PrivacySettings) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.FILE
        self.head_path = self.directory / self.HEAD
        self.settings = settings
        self.entries: list[LedgerEntry]
        self._valid_end: int  # bytes of the file up to the end of its last whole entry
        self.entries, self._valid_end = self._read()
        self._check_head()

    def _check_head(self) -> None:
        """Refuse a ledger shorter than, or different from, the last entry this folder recorded.

        After each append the ledger's last sequence number and hash go to ``ledger.head`` (a
        separate file, replaced atomically). A ledger deleted, truncated or swapped for an older
        copy while the head remains would otherwise start a fresh (or a smaller) budget.
        """
        if not self.head_path.exists():
            return
        try:
            head = json.loads(self.head_path.read_text())
            seq, digest = int(head["seq"]), str(head["hash"])
        except (OSError, ValueError, KeyError, TypeError):
            raise PrivacyLedgerError(f"{self.head_path} is unreadable; the ledger cannot be trusted") from None
        if seq > len(self.entries):
            what = "is gone" if not self.path.exists() else f"holds {len(self.entries)} entries"
            raise PrivacyLedgerError(
                f"{self.path} {what}, but this state folder recorded {seq} charged entries ({self.head_path}): "
                "the ledger was deleted, truncated or replaced by an older copy; refusing to charge a fresh budget"
            )
        if seq and self.entries[seq - 1].hash != digest:
            raise PrivacyLedgerError(
                f"{self.path}: entry {seq} is not the one this state folder recorded ({self.head_path}); "
                "the ledger was replaced; refusing to charge"
            )

    def _write_head(self) -> None:
        last = self.entries[-1]
        tmp = self.head_path.with_name(self.HEAD + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"seq": last.seq, "hash": last.hash}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.head_path)

    def _read(self) -> tuple[list[LedgerEntry], int]:
        """The entries on disk and the byte offset just past the last one (and its newline)."""
        if not self.path.exists():
            return [], 0
        entries: list[LedgerEntry] = []
        prev = ""
        blob = self.path.read_bytes()
        lines = blob.split(b"\n")
        end = valid_end = 0
        for number, raw in enumerate(lines, start=1):
            end += len(raw) + 1
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
            valid_end = min(end, len(blob))
        return entries, valid_end

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self) -> float:
        """Epsilon spent so far, from the whole ledger.

        Each entry stores the epsilon of the composition up to and including itself, computed
        by :meth:`charge` before the entry was written; when the last entry was accounted with
        this ledger's delta and accountant, that stored figure is the answer (epsilon is
        computed once per charge, not once per question). Otherwise it is recomputed.
        """
        if not self.entries:
            return 0.0
        last = self.entries[-1]
        if last.delta == self.settings.delta and last.accountant == self.settings.accountant:
            return float(last.epsilon_after)
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
        """Check the budget, then durably record the run. Raises before writing if over.

        The append runs under an exclusive lock on the ledger file. When the file is not what
        this object last read or wrote, it is read again and the budget checked again, so two
        ledger objects (or processes) on one folder cannot both spend the same budget; a file
        that no longer starts with the entries read before (rolled back, replaced) is refused.
        A torn tail left by a crash is cut off before appending.
        """
        entry = self._next_entry(round, mechanism, noise_multiplier, sample_rate, steps)
        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_directory(self.directory.parent)
        flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT if self._valid_end == 0 else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            raise PrivacyLedgerError(
                f"{self.path} held {len(self.entries)} entries and is gone: it was deleted or moved; "
                "refusing to charge a fresh ledger"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size != self._valid_end:
                seen = len(self.entries)
                self._reread()
                if len(self.entries) != seen:  # someone else charged meanwhile: check again
                    entry = self._next_entry(round, mechanism, noise_multiplier, sample_rate, steps)
            size = os.fstat(fd).st_size
            if size > self._valid_end:
                logger.warning("%s: cutting off a torn tail of %d bytes", self.path, size - self._valid_end)
                os.ftruncate(fd, self._valid_end)
            line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
            if self._valid_end > 0 and os.pread(fd, 1, self._valid_end - 1) != b"\n":
                line = b"\n" + line  # the last entry was written without its newline
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
        _fsync_directory(self.directory)
        self.entries.append(entry)
        self._valid_end += len(line)
        self._write_head()
        return entry

    def _reread(self) -> None:
        """Catch up with the file on disk; it must still start with the entries read before."""
        known = [e.hash for e in self.entries]
        entries, valid_end = self._read()
        if [e.hash for e in entries[: len(known)]] != known:
            raise PrivacyLedgerError(
                f"{self.path} no longer starts with the {len(known)} entries read from it before: "
                "it was rolled back or replaced; refusing to charge"
            )
        self.entries, self._valid_end = entries, valid_end

    def _next_entry(
        self, round: int, mechanism: str, noise_multiplier: float, sample_rate: float, steps: int
    ) -> LedgerEntry:
        """The entry this run would append, or :class:`PrivacyBudgetExceeded`."""
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
        return LedgerEntry(**{**entry.body(), "hash": _digest(entry.body())})


def _fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a new file, a new subfolder) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
