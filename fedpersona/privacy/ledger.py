"""The partner's privacy ledger: every mechanism it ran, charged before it ran.

:class:`PrivacyLedger` is an append-only JSON-lines file (``state/ledger.jsonl``) with a
SHA-256 hash chain. Each entry is fsync'd (and its directory too) BEFORE the work it pays for
starts, so a crash can only over-count, never under-count. Appends hold an exclusive lock and
first catch up with the file if it changed, so two ledger objects (or processes) on one folder
cannot both spend the same budget; a torn tail left by a crash is cut off before the next
append. :meth:`PrivacyLedger.charge` computes the epsilon the new entry *would* bring and
refuses with :class:`~fedpersona.errors.PrivacyBudgetExceeded` before anything is written or
computed; each entry stores that epsilon, so the spent epsilon is read, not recomputed.
``state/ledger.head`` records the last entry after every append, so a ledger deleted,
truncated or replaced by an older copy is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedpersona.config.settings import PartnerConfig, PrivacySettings
from fedpersona.errors import PrivacyBudgetExceeded, PrivacyLedgerError
from fedpersona.privacy.accounting import compute_epsilon

__all__ = ["LedgerEntry", "PrivacyLedger", "spent_epsilon"]

logger = logging.getLogger(__name__)


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


def spent_epsilon(cfg: PartnerConfig) -> float | None:
    """A partner's cumulative epsilon from its ledger (None for an explicitly non-private partner)."""
    if not cfg.privacy.private:
        return None
    return PrivacyLedger(cfg.state_dir, settings=cfg.privacy).epsilon()
