"""Child processes of the deployment commands: started with logs in files, stopped with their children.

:class:`ProcessSupervisor` starts each child in its own session (so a terminal's Ctrl-C
reaches fedpersona only), copies its output to a log file without terminal colour codes
(:func:`strip_ansi`), and stops it with SIGTERM, then SIGKILL after a grace period, together with
every descendant it had (Flower's SuperLink/SuperNode start flower-superexec, which starts
flwr-serverapp/flwr-clientapp). :class:`StopSignals` turns SIGINT/SIGTERM into a
:class:`Stopped` exception at the next check of a bounded wait loop.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from fedpersona.errors import ConfigError, FedPersonaError

__all__ = [
    "ProcessSupervisor",
    "StopSignals",
    "Stopped",
    "alive",
    "child_env",
    "descendants",
    "flower_tool",
    "signal_all",
    "strip_ansi",
    "wait_port",
]


def flower_tool(name: str) -> str:
    """A Flower executable: next to this interpreter first (the venv), then on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise ConfigError(f"`{name}` is not installed; install fedpersona (it depends on flwr) in this environment")
    return found


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # flower-superlink/-supernode start flower-superexec, flwr-serverapp, flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True


def signal_all(pids: list[int], sig: int) -> None:
    """Send ``sig`` to each process of ``pids`` still alive (one may exit in between: fine)."""
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(data: bytes) -> bytes:
    """``data`` without terminal colour and cursor codes (Flower colours its log levels even
    when its output goes to a file)."""
    return _ANSI.sub(b"", data)


def _copy_plain(source: IO[bytes], handle: IO[bytes]) -> None:
    """Copy a child's output to its log file line by line, without colour codes."""
    for line in iter(source.readline, b""):
        handle.write(strip_ansi(line))
        handle.flush()
    source.close()


@dataclass
class ProcessSupervisor:
    """Starts child processes with logs in files (plain text); stops all of them (and their children)."""

    grace: float = 10.0
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)
    copiers: dict[int, threading.Thread] = field(default_factory=dict)

    def start(self, cmd: Sequence[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        handle.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        handle.flush()
        # A new session: Ctrl-C in the terminal reaches fedpersona only, which stops children in order.
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(env), start_new_session=True
        )
        output = cast(IO[bytes], proc.stdout)  # a pipe: stdout=PIPE above
        copier = threading.Thread(target=_copy_plain, args=(output, handle), daemon=True)
        copier.start()
        self.copiers[proc.pid] = copier
        self.procs.append((proc, handle))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM ``proc`` and its descendants; SIGKILL whatever is left after ``grace``."""
        family = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.grace)
        family += [p for p in descendants(proc.pid) if p not in family]
        signal_all(family, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(alive(p) for p in family):
            time.sleep(0.2)
        signal_all(family, signal.SIGKILL)
        deadline = time.monotonic() + 5.0  # SIGKILL is not instant; orphans are reaped by init
        while time.monotonic() < deadline and any(alive(p) for p in family):
            time.sleep(0.05)
        copier = self.copiers.pop(proc.pid, None)
        if copier is not None:
            copier.join(timeout=self.grace)  # the output ends when the last process holding it exits
        for p, handle in self.procs:
            if p is proc and not (copier is not None and copier.is_alive()):
                handle.close()

    def stop_all(self) -> None:
        for proc, _ in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


class Stopped(Exception):
    """Raised inside the main loop when SIGINT/SIGTERM arrived."""


class StopSignals:
    """Turns SIGINT/SIGTERM into :class:`Stopped` at the next check (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def check(self) -> None:
        if self.received is not None:
            raise Stopped(signal.Signals(self.received).name)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self.check()

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def wait_port(host: str, port: int, *, timeout: float, proc: subprocess.Popen[bytes], signals: StopSignals) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        signals.check()
        if proc.poll() is not None:
            raise FedPersonaError(f"flower-superlink exited with code {proc.returncode} while starting; see its log")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            signals.sleep(0.5)
    raise FedPersonaError(f"flower-superlink did not open {host}:{port} within {timeout:.0f}s; see its log")
