"""``python -m benchmarks.run [--quick] [--only NAME,...] [--merge]``: run the benchmarks, write
``benchmarks/results/latest.json`` and ``docs/benchmarks.md``.

Every section records the command, date and load of the run that measured it. With
``--merge`` the sections of the previous ``latest.json`` that this run does not measure are
kept (with their own command and date), so sections measured by separate commands (say
``--quick`` for the cheap ones, ``--only utility`` in full mode) end up in one report."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.report import render

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = (
    "dp_speed",
    "planning",
    "featurize",
    "utility",
    "inference",
    "communication",
    "scale",
    "message_floor",
    "commands",
)
PACKAGES = {"torch": "torch", "opacus": "opacus", "flwr": "flwr", "sklearn": "scikit-learn"}

logger = logging.getLogger("benchmarks")


def environment() -> dict[str, Any]:
    """Versions, machine and load, read before any benchmark runs."""
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0.0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) / 1024**2
    return {
        "versions": {"python": platform.python_version(), **{k: version(p) for k, p in PACKAGES.items()}},
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (under 10 minutes on 2 cores)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=REPO, help="folder holding benchmarks/results and docs")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of the previous latest.json that this run does not measure",
    )
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name] or list(BENCHMARKS)
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results: dict[str, Any] = {
        "command": "python -m benchmarks.run" + " ".join(["", *(sys.argv[1:] if argv is None else argv)]).rstrip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "environment": environment(),
        "benchmarks": {},
    }
    stamp = {
        "command": results["command"],
        "date": results["date"],
        "quick": args.quick,
        "load_average": results["environment"]["load_average"],
    }
    start = time.perf_counter()
    failed = False
    for name in only:
        logger.info("running %s", name)
        began = time.perf_counter()
        try:
            section = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        except Exception as exc:  # one failing benchmark must not lose the others' numbers
            logger.error("%s failed:\n%s", name, traceback.format_exc())
            section = {"title": name, "error": f"{type(exc).__name__}: {exc}"}
            failed = True
        section["seconds"] = round(time.perf_counter() - began, 1)
        section["run"] = stamp
        results["benchmarks"][name] = section
        logger.info("%s done in %.0f s", name, section["seconds"])
    results["runtime_s"] = round(time.perf_counter() - start, 1)
    json_path = args.out / "benchmarks" / "results" / "latest.json"
    md_path = args.out / "docs" / "benchmarks.md"
    if args.merge and json_path.exists():
        results = merge(json.loads(json_path.read_text()), results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path.write_text(render(results))
    logger.info("wrote %s and %s in %.0f s", json_path, md_path, results["runtime_s"])
    return 1 if failed else 0


def merge(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``current`` plus the sections of ``previous`` it did not measure (absent, or only a
    ``skipped`` placeholder such as scale in --quick), in :data:`BENCHMARKS` order; a kept
    section without its own run stamp gets the previous file's command and date."""
    kept = {}
    for name, section in previous.get("benchmarks", {}).items():
        mine = current["benchmarks"].get(name)
        if mine is not None and (not mine.get("skipped") or section.get("skipped")):
            continue
        section.setdefault(
            "run",
            {
                "command": previous["command"],
                "date": previous["date"],
                "quick": previous.get("quick"),
                "load_average": previous.get("environment", {}).get("load_average"),
            },
        )
        kept[name] = section
    sections = {**current["benchmarks"], **kept}
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    return {
        **current,
        "merged": sorted(kept),
        "benchmarks": dict(sorted(sections.items(), key=lambda item: order.get(item[0], len(order)))),
    }


if __name__ == "__main__":
    sys.exit(main())
