"""Plain-text logs a person follows while a federation runs.

- The coordinator's ``RUN_DIR/logs/federation.log``: every fedpersona record (INFO and above)
  of the deployed ServerApp (:func:`attach_log_file`): each round, who replied, the end.
- A partner's ``state_dir/logs/activity.log``: one line per message it answered, with its
  cumulative epsilon after it, and ``run finished`` when the final model arrives (:func:`note`).

``fedpersona server start`` and ``fedpersona partner start`` print these lines as they are
written (:class:`LogFollower`). The lines are plain text (no terminal colour codes) and carry
what the logs carry anyway: message types, rounds, partner names, epsilon; never row content.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

__all__ = ["ACTIVITY_LOG", "FEDERATION_LOG", "RUN_FINISHED", "LogFollower", "attach_log_file", "note"]

FEDERATION_LOG = Path("logs") / "federation.log"  # inside the coordinator's run folder
ACTIVITY_LOG = Path("logs") / "activity.log"  # inside a partner's state folder
RUN_FINISHED = "run finished"  # how a partner's activity line marks the end of a run

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def attach_log_file(path: Path) -> None:
    """Append fedpersona's log records (INFO and above) to ``path`` as plain lines.

    Idempotent per path. For a process that runs one federation (the deployed ServerApp): the
    handler stays for the life of the process.
    """
    log = logging.getLogger("fedpersona")
    target = str(path.resolve())
    if any(getattr(h, "fedpersona_file", None) == target for h in log.handlers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.fedpersona_file = target  # type: ignore[attr-defined]
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def note(path: Path, message: str) -> None:
    """Append one timestamped line to ``path`` (opened and closed each time: no handler state,
    so a partner process that serves many messages keeps no file open between them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"{stamp} {message}\n")


class LogFollower:
    """The lines appended to a log file since the last call (like ``tail -f``, polled)."""

    def __init__(self, path: Path, *, from_end: bool = True) -> None:
        self.path = path
        self.offset = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                size = handle.seek(0, 2)
                if size < self.offset:  # the file was replaced: start again
                    self.offset, self._partial = 0, b""
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete if line.strip()]
