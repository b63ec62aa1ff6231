"""``python -m benchmarks.run [--quick] [--only NAME,...]``: run the benchmarks, write
``benchmarks/results/latest.json`` and ``docs/benchmarks.md``."""

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
BENCHMARKS = ("dp_speed", "utility", "inference", "communication", "scale")
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
        results["benchmarks"][name] = section
        logger.info("%s done in %.0f s", name, section["seconds"])
    results["runtime_s"] = round(time.perf_counter() - start, 1)
    json_path = args.out / "benchmarks" / "results" / "latest.json"
    md_path = args.out / "docs" / "benchmarks.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path.write_text(render(results))
    logger.info("wrote %s and %s in %.0f s", json_path, md_path, results["runtime_s"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
