"""Simulation scale (full mode only): wall time per round of ``fedpersona.simulation.simulate``
(Flower's simulation engine on Ray) with 3, 9 and 30 synthetic partners vs the same partners'
local training in a plain loop, and the peak RSS of the whole process tree (Ray workers included).

Only one Ray simulation may run on a shared machine at a time: before each run this waits (at
most ``WAIT_S``) while ``pgrep -f "fedpersona simulate|ray::"`` finds another one.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from benchmarks.workload import median, synthetic_features, time_epoch

SIZES = (3, 9, 30)  # 100 partners do not fit a 2-core machine's benchmark budget: not run
ROWS_PER_PARTNER, ROUNDS, BATCH, WAIT_S = 1_000, 3, 64, 600
KINDS = ("ecommerce", "finance", "health")


def run(*, quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "title": "Simulation scale",
            "tables": [],
            "notes": ["Skipped in --quick (starts Ray; run `python -m benchmarks.run --only scale`)."],
            "data": {},
        }
    from fedpersona.simulation import simulate

    rows, data = [], {}
    for partners in SIZES:
        per_kind = partners // len(KINDS)
        local = sum(
            time_epoch(synthetic_features(kind, ROWS_PER_PARTNER, seed=i), mode="ghost", batch_size=BATCH).seconds
            for kind in KINDS
            for i in range(per_kind)
        )
        _wait_for_other_simulations()
        with tempfile.TemporaryDirectory() as folder:
            scenario = Path(folder) / "scale.toml"
            scenario.write_text(tomli_w.dumps(_scenario(per_kind)))
            stamps: list[float] = []
            peak = _PeakRss()
            peak.start()
            started = time.perf_counter()
            simulate(
                scenario_path=scenario,
                out=Path(folder) / "run",
                on_round=lambda *_, mark=stamps.append: mark(time.perf_counter()),
            )
            total = time.perf_counter() - started
            peak.stop()
        per_round = median(list(np.diff([started, *stamps])[1:])) if len(stamps) > 1 else total
        rows.append(
            [partners, round(total, 1), round(per_round, 1), round(local, 1), f"{per_round / local:.1f}x",
             round(peak.peak / 2**20)]
        )  # fmt: skip
        data[partners] = {"total_s": total, "round_stamps": stamps, "local_s": local, "peak_rss_bytes": peak.peak}
    return {
        "title": "Simulation scale",
        "tables": [
            {
                "name": f"Synthetic partners ({ROWS_PER_PARTNER:,} rows each, 3 kinds), {ROUNDS} rounds, "
                f"1 local epoch, batch {BATCH}, eps=3, no persona clustering",
                "columns": [
                    "partners",
                    "total s",
                    "s / round (median, rounds 2+)",
                    "local compute s (plain loop)",
                    "round / local",
                    "peak RSS MiB (tree)",
                ],
                "rows": rows,
            }
        ],
        "notes": ["100 partners not run: it does not fit the benchmark's time budget on a 2-core machine."],
        "data": data,
    }


def _scenario(per_kind: int) -> dict[str, Any]:
    return {
        "federation": {"rounds": ROUNDS, "min_partners": 2, "personas": 0, "seed": 0},
        "training": {"local_epochs": 1, "batch_size": BATCH, "lr": 0.01, "grad_sample_mode": "ghost"},
        "privacy": {"target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv"},
        "simulation": {"cpus_per_partner": 1.0, "test_fraction": 0.2, "share_eval_metrics": True},
        "silos": [
            {"kind": k, "name": k, "partners": per_kind, "rows": ROWS_PER_PARTNER * per_kind, "non_iid_alpha": 1.0}
            for k in KINDS
        ],
    }


def _wait_for_other_simulations() -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", "fedpersona simulate|ray::"], capture_output=True, text=True)
        others = [p for p in found.stdout.split() if int(p) != os.getpid()]
        if not others:
            return
        time.sleep(10)
    raise RuntimeError(f"another Ray simulation is still running after {WAIT_S} s; not starting a second one")


class _PeakRss(threading.Thread):
    """Samples the summed VmRSS of this process and all its descendants from /proc."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self._stop_event = every, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total
