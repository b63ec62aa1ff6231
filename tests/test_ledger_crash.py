"""The privacy ledger survives kill -9 at random points: it never under-counts.

A small script (written to ``tmp_path``) imports fedpersona once and then, for each kill
point, forks a worker that opens the ledger and charges it in a loop. After each charge
returns, the worker "sends" the update: it appends the entry's seq, hash and epsilon to
``sent.jsonl`` (the rule under test: an update leaves only after its ledger entry is
durable). The script kills the worker with SIGKILL once the worker has charged a number of
entries the test draws from a seeded RNG (0 to 3), after a further random delay; so every
kill lands in the middle of work however slow or loaded the machine is, and the harness
asserts invariants only, never how fast the workers were. (The forking script,
not the test, sends the signal: the worker is its unreaped child, so the pid cannot have
been reused by another process.) Forking from an already-imported interpreter keeps 100+
kill points cheap; each worker is a real process that dies mid-work with no chance to
clean up.

SIGKILL cannot tear a single small ``write(2)`` to a regular file, so at some kill points the
test also appends a torn fragment of an entry to the ledger, the state a power loss in the
middle of a write leaves, and the next worker must resume from that.

After every kill: the ledger opens, it still holds every entry it held before (append-only),
its epsilon never decreases, and every sent record is in it with the same hash and an epsilon
no greater than the ledger's.
"""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedpersona.config.settings import PrivacySettings
from fedpersona.errors import PrivacyBudgetExceeded, PrivacyLedgerError
from fedpersona.privacy.ledger import PrivacyLedger

KILL_POINTS = 100  # random kill points
MAX_AFTER = 3  # the worker is killed after 0..3 charges have been sent ...
MAX_DELAY_S = 0.05  # ... plus a random delay (one charge takes ~30 ms on an idle machine)
REPLY_TIMEOUT_S = 300.0  # generous: only a hung harness may take this long
TORN_TAIL_RATE = 0.3
SEED = 20240517

# Charging with the RDP accountant keeps each charge in the millisecond range; the durability
# logic under test does not depend on the accountant.
SETTINGS = PrivacySettings(target_epsilon=1e9, delta=1e-5, accountant="rdp")

ZYGOTE = textwrap.dedent(
    """
    import json, os, random, select, signal, sys, time, traceback

    from fedpersona.privacy.ledger import PrivacyLedger
    from fedpersona.config.settings import PrivacySettings

    SETTINGS = PrivacySettings(target_epsilon=1e9, delta=1e-5, accountant="rdp")


    def work(folder, sent_path, seed, max_charges, progress):
        rng = random.Random(seed)
        ledger = PrivacyLedger(folder, settings=SETTINGS)
        os.write(progress, b"o")  # the ledger is open
        for _ in range(max_charges):
            entry = ledger.charge(
                round=len(ledger.entries) + 1,
                mechanism="dp-sgd",
                noise_multiplier=rng.choice((1.0, 1.5, 2.0)),
                sample_rate=0.01,
                steps=rng.randint(1, 50),
            )
            # Only now, with the entry durable, may the update leave.
            record = {"seq": entry.seq, "hash": entry.hash, "epsilon": entry.epsilon_after}
            with open(sent_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\\n")
            os.write(progress, b"c")  # one more charge sent


    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_end)
                work(command["folder"], command["sent"], command["seed"], command["max_charges"], write_end)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        # Wait until the ledger is open and command["after"] charges were sent (or the worker
        # ended): progress, not time, decides when the kill comes.
        wanted = 1 + command["after"]
        while wanted and select.select([read_end], [], [], 300.0)[0]:
            if not os.read(read_end, 1):
                break
            wanted -= 1
        time.sleep(command["delay"])
        os.kill(pid, signal.SIGKILL)  # our unreaped child (maybe a zombie by now): no pid reuse
        _, status = os.waitpid(pid, 0)
        os.close(read_end)  # only now: the worker may write progress until it dies
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        print(json.dumps({"killed": killed, "exit_code": code}), flush=True)
    """
)


def _read_sent(path: Path) -> list[dict[str, float]]:
    """Records in ``sent.jsonl``; a torn last line (killed mid-append) was never sent."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert number == len(lines), f"sent.jsonl line {number} is corrupt but is not the last"
    return records


def _reply(proc: subprocess.Popen[bytes], stderr_path: Path) -> dict[str, object]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], REPLY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if not line:
        pytest.fail(f"the crash harness did not answer; its stderr:\n{stderr_path.read_text()[-4000:]}")
    return json.loads(line)


def _torn_fragment(ledger: PrivacyLedger, rng: random.Random) -> bytes:
    """A strict prefix of a plausible next entry, as a write cut short by a power loss leaves."""
    last = ledger.entries[-1] if ledger.entries else None
    body = {"seq": len(ledger.entries) + 1, "time": time.time(), "round": 0, "mechanism": "dp-sgd",
            "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "epsilon_after": 1.0,
            "delta": 1e-5, "accountant": "rdp", "prev_hash": last.hash if last else "", "hash": "0" * 64}  # fmt: skip
    blob = json.dumps(body, sort_keys=True).encode()
    return blob[: rng.randrange(1, len(blob))]


@pytest.mark.slow
def test_ledger_never_under_counts_across_random_kills(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    sent_path = tmp_path / "sent.jsonl"
    script = tmp_path / "zygote.py"
    script.write_text(ZYGOTE, encoding="utf-8")
    stderr_path = tmp_path / "zygote.stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rng = random.Random(SEED)
    kills = exits = torn_injected = durable_unsent = last_unsent = 0
    last_epsilon = 0.0
    last_hashes: list[str] = []
    started = time.monotonic()
    waited = 0  # charges the kills waited for: the ledger must hold at least this many entries
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        try:
            assert _reply(proc, stderr_path) == {"ready": True}
            assert proc.stdin is not None
            for _ in range(KILL_POINTS):
                command = {
                    "folder": str(folder),
                    "sent": str(sent_path),
                    "seed": rng.randrange(2**32),
                    "max_charges": 500,
                    "after": rng.randint(0, MAX_AFTER),
                    "delay": rng.uniform(0.0, MAX_DELAY_S),
                }
                waited += int(command["after"])
                proc.stdin.write((json.dumps(command) + "\n").encode())
                proc.stdin.flush()
                outcome = _reply(proc, stderr_path)
                if outcome["killed"]:
                    kills += 1
                else:
                    assert outcome["exit_code"] == 0, stderr_path.read_text()[-4000:]
                    exits += 1

                ledger = PrivacyLedger(folder, settings=SETTINGS)  # parses, or raises here
                hashes = [e.hash for e in ledger.entries]
                assert hashes[: len(last_hashes)] == last_hashes, "an entry vanished or changed"
                epsilon = ledger.epsilon()
                assert epsilon >= last_epsilon
                sent = _read_sent(sent_path)
                for record in sent:
                    seq = int(record["seq"])
                    assert seq <= len(hashes), f"entry {seq} was sent but is not in the ledger"
                    assert hashes[seq - 1] == record["hash"]
                    assert record["epsilon"] <= epsilon
                unsent = len(hashes) - len(sent)  # killed between its fsync and its send
                durable_unsent += unsent > last_unsent
                last_unsent = unsent
                last_epsilon, last_hashes = epsilon, hashes

                if rng.random() < TORN_TAIL_RATE:
                    folder.mkdir(exist_ok=True)  # a torn very first write is possible too
                    with ledger.path.open("ab") as handle:
                        handle.write(_torn_fragment(ledger, rng))
                    torn_injected += 1
                    reopened = PrivacyLedger(folder, settings=SETTINGS)
                    assert [e.hash for e in reopened.entries] == hashes
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=REPLY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    duration = time.monotonic() - started
    print(
        f"kill harness: {kills} SIGKILLs, {exits} clean exits, {torn_injected} torn tails injected, "
        f"{durable_unsent} kills left a durable but unsent entry, {len(last_hashes)} entries, "
        f"epsilon {last_epsilon:.3f}, {duration:.1f} s"
    )
    assert kills + exits == KILL_POINTS
    assert len(last_hashes) >= waited  # every charge a kill waited for is durable
    assert last_epsilon > 0


# --- the same properties, one deterministic scenario at a time --------------------------------


def _charge(ledger: PrivacyLedger, sigma: float = 1.0) -> None:
    ledger.charge(round=1, mechanism="dp-sgd", noise_multiplier=sigma, sample_rate=0.01, steps=10)


def test_charge_after_a_torn_tail_keeps_the_new_entry(tmp_path: Path) -> None:
    first = PrivacyLedger(tmp_path, settings=SETTINGS)
    _charge(first)
    with first.path.open("ab") as handle:
        handle.write(_torn_fragment(first, random.Random(0)))
    resumed = PrivacyLedger(tmp_path, settings=SETTINGS)  # the torn line is ignored ...
    assert len(resumed.entries) == 1
    _charge(resumed, sigma=1.5)  # ... and must not swallow the entry written after it
    reread = PrivacyLedger(tmp_path, settings=SETTINGS)
    assert [e.hash for e in reread.entries] == [e.hash for e in resumed.entries]
    assert len(reread.entries) == 2
    assert reread.epsilon() == resumed.entries[-1].epsilon_after


def test_a_last_entry_without_its_newline_is_not_fused_with_the_next(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, settings=SETTINGS)
    _charge(ledger)
    ledger.path.write_bytes(ledger.path.read_bytes().rstrip(b"\n"))
    resumed = PrivacyLedger(tmp_path, settings=SETTINGS)
    _charge(resumed)
    assert len(PrivacyLedger(tmp_path, settings=SETTINGS).entries) == 2


def test_two_ledger_objects_on_one_folder_cannot_both_spend(tmp_path: Path) -> None:
    probe = PrivacyLedger(tmp_path / "probe", settings=SETTINGS)
    _charge(probe, sigma=1.0)
    single = probe.entries[-1].epsilon_after
    both = probe.would_reach(1.0, 0.01, 10)
    budget = PrivacySettings(target_epsilon=(single + both) / 2, accountant="rdp")  # room for one run
    a = PrivacyLedger(tmp_path / "partner", settings=budget)
    b = PrivacyLedger(tmp_path / "partner", settings=budget)  # read before a charged
    _charge(a)
    with pytest.raises(PrivacyBudgetExceeded):
        _charge(b)
    assert len(PrivacyLedger(tmp_path / "partner", settings=budget).entries) == 1


def test_a_ledger_rolled_back_under_an_open_object_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, settings=SETTINGS)
    _charge(ledger)
    first_line = ledger.path.read_bytes()
    _charge(ledger)
    ledger.path.write_bytes(first_line)  # restored from an older copy
    with pytest.raises(PrivacyLedgerError, match="rolled back"):
        _charge(ledger)
    ledger.path.unlink()
    with pytest.raises(PrivacyLedgerError, match="gone"):
        _charge(ledger)
