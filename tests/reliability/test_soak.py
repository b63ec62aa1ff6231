"""Load and soak: the real simulation entry point (:func:`fedpersona.simulation.simulate`, Flower's
Simulation Engine on Ray) with 100 partners, and a 50-round run whose memory must not grow.

Each run goes in its own Python process (a small driver calling ``simulate``), so that Ray's
processes and their memory belong to one process tree that the test can measure and that ends
with the run. Memory is read from ``/proc`` (``psutil`` is not a dependency): the sum of RSS over
the driver and all its descendants (Ray's GCS, raylet, workers and actors), taken in the
``on_round`` callback. PSS (shared pages split among the processes mapping them) is recorded
too, for information only: it also moves when unrelated processes on the machine start or exit.

Run one Ray simulation at a time per machine: ``flock /tmp/fedpersona-ray.lock pytest ...``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# Growth of the process tree's RSS from round 10 to round 50 that the soak run must stay under.
# Measured on a 2-core CI machine: see docs/reliability.md for the last numbers.
MAX_GROWTH_MB = 64.0

DRIVER = r"""
import json, os, sys, time

def tree_memory(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, pids = [root], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss, len(pids)

from fedpersona.simulation import simulate

scenario, out, log = sys.argv[1:4]
started = time.monotonic()

def on_round(rnd, rows):
    rss, pss, processes = tree_memory(os.getpid())
    with open(log, "a") as fh:
        fh.write(json.dumps({"round": rnd, "rss": rss, "pss": pss, "processes": processes,
                             "partners": len(rows), "seconds": time.monotonic() - started}) + "\n")

result = simulate(scenario_path=scenario, out=out, on_round=on_round)
print(json.dumps({"seconds": result.seconds}))
"""

MODEL = """
[model]
token_dim = 8
embed_dim = 8
hidden = 8
blocks = 1
[training]
batch_size = 16
local_epochs = 1
"""


def _run(tmp_path: Path, scenario: str) -> tuple[Path, list[dict[str, float]]]:
    path = tmp_path / "scenario.toml"
    path.write_text(scenario)
    out, log = tmp_path / "run", tmp_path / "memory.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(path), str(out), str(log)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    rounds = [json.loads(line) for line in log.read_text().splitlines()]
    return out, rounds


def test_one_hundred_partners_complete_a_round(tmp_path: Path) -> None:
    """100 partners (34 shops, 33 banks, 33 clinics of 30 rows each) really go through Flower:
    a query, a train and an evaluate message each, on four Ray actors (0.5 CPU per partner).
    The cheapest configuration that still does it: no DP (noise planning costs ~1.5 s per
    partner and is tested elsewhere), no persona clustering, a tiny model, one round."""
    scenario = f"""
[federation]
rounds = 1
min_partners = 100
personas = 0
{MODEL}
[privacy]
target_epsilon = "inf"
[simulation]
cpus_per_partner = 0.5
[[silos]]
kind = "ecommerce"
name = "shop"
partners = 34
rows = 1020
[[silos]]
kind = "finance"
name = "bank"
partners = 33
rows = 990
[[silos]]
kind = "health"
name = "clinic"
partners = 33
rows = 990
"""
    out, rounds = _run(tmp_path, scenario)
    assert [r["round"] for r in rounds] == [1] and rounds[0]["partners"] == 100
    print(
        f"100 partners: round 1 done {rounds[0]['seconds']:.0f} s after start, "
        f"{rounds[0]['processes']} processes, rss {rounds[0]['rss'] / 2**20:.0f} MB"
    )
    privacy = json.loads((out / "privacy.json").read_text())["partners"]
    assert len(privacy) == 100 and not [n for n, p in privacy.items() if "dropped" in p]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({m["partner"] for m in metrics if m["round"] == 1}) == sorted(privacy)
    for name in privacy:  # every partner ran its own DP-free round at its own site
        assert (out / "partners" / name / "state" / "local.pt").exists(), name
    card = json.loads((out / "model" / "card.json").read_text())
    assert len(card["partners"]) == 100 and len(card["slots"]) == 3
    weights = np.load(out / "model" / "weights.npz")
    assert all(np.all(np.isfinite(weights[k])) for k in weights.files)


def test_fifty_rounds_without_memory_growth(tmp_path: Path) -> None:
    """Two partners, 50 rounds: the process tree's RSS at round 50 is within MAX_GROWTH_MB
    of round 10 (rounds 1-9 warm up imports, allocator pools and Ray's workers), and no
    process is left behind or added along the way. Not private, to stay cheap per round
    (a private round costs ~4x as much; the ledger's durability is tested elsewhere)."""
    scenario = f"""
[federation]
rounds = 50
min_partners = 2
personas = 0
{MODEL}
[privacy]
target_epsilon = "inf"
[simulation]
cpus_per_partner = 1.0
[[silos]]
kind = "health"
name = "clinic"
partners = 2
rows = 80
"""
    out, rounds = _run(tmp_path, scenario)
    assert [r["round"] for r in rounds] == list(range(1, 51))
    assert all(r["partners"] == 2 for r in rounds)
    at = {r["round"]: r for r in rounds}
    rss_growth = (at[50]["rss"] - at[10]["rss"]) / 2**20
    pss_growth = (at[50]["pss"] - at[10]["pss"]) / 2**20
    print(
        f"soak: rss round 10 {at[10]['rss'] / 2**20:.1f} MB, round 50 {at[50]['rss'] / 2**20:.1f} MB "
        f"(+{rss_growth:.1f}); pss +{pss_growth:.1f} MB; {at[50]['processes']} processes; "
        f"{(at[50]['seconds'] - at[10]['seconds']) / 40:.2f} s per round"
    )
    trace = [(r["round"], round(r["rss"] / 2**20, 1), round(r["pss"] / 2**20, 1)) for r in rounds]
    # RSS, not PSS: a process tree's PSS also moves when unrelated processes that map the same
    # libraries (torch, Ray) start or exit on a shared machine.
    assert rss_growth < MAX_GROWTH_MB, trace
    assert {r["processes"] for r in rounds[9:]} == {at[10]["processes"]}, trace
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(m["round"], m["partner"]) for m in metrics} == {(r, f"clinic-{i}") for r in range(1, 51) for i in (1, 2)}
    weights = np.load(out / "model" / "weights.npz")
    assert all(np.all(np.isfinite(weights[k])) for k in weights.files)
