"""Command start-up: wall time of the commands that need no training (``fedpersona --help``,
``--version``, ``schema check``, ``certs --help``, ``privacy plan``), each in a fresh Python
process as a user runs it, and whether the process imported torch, opacus or flwr.

``python -m benchmarks.run --only commands`` records it; best (minimum) of ``REPEATS`` runs,
the least disturbed by other load on a shared machine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REPEATS = 3
HEAVY = ("torch", "opacus", "flwr")
COMMANDS: tuple[tuple[str, list[str]], ...] = (
    ("fedpersona --help", ["--help"]),
    ("fedpersona --version", ["--version"]),
    ("fedpersona certs --help", ["certs", "--help"]),
    (
        "fedpersona schema check (2,000 synthetic bank rows)",
        ["schema", "check", "--schema", "{schema}", "--data", "{data}"],
    ),
    (
        "fedpersona privacy plan (default scenario)",
        ["privacy", "plan", "--config", str(REPO / "simulations" / "three_silos.toml")],
    ),
)
# Runs the CLI as `fedpersona` does, then reports which heavy packages it imported.
PROBE = (
    "import sys\n"
    "from fedpersona.cli import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print('IMPORTED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def _once(args: list[str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"fedpersona {' '.join(args)} failed ({done.returncode}): {done.stderr[-500:]}")
    imported = next((line[9:] for line in done.stderr.splitlines() if line.startswith("IMPORTED=")), "?")
    return seconds, imported or "none"


def run(*, quick: bool = True) -> dict[str, Any]:
    import numpy as np

    from fedpersona.data.synthetic import generate_frame

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "bank.csv"
        generate_frame("finance", 2000, rng=np.random.default_rng(0))[0].to_csv(data, index=False)
        files = {"schema": str(REPO / "fedpersona" / "schemas" / "synthetic_finance.toml"), "data": str(data)}
        for name, args in COMMANDS:
            filled = [a.format(**files) for a in args]
            runs = [_once(filled) for _ in range(REPEATS)]
            rows.append([name, round(min(s for s, _ in runs), 2), runs[-1][1]])
    return {
        "title": "Command start-up",
        "tables": [
            {
                "name": f"Wall time of a fresh `python -c` running the CLI (sys.argv as given), best of {REPEATS}",
                "columns": ["command", "seconds", "heavy packages imported"],
                "rows": rows,
            }
        ],
        "notes": ["Target: `fedpersona --help` under 1.5 s on an idle 2-core machine."],
    }
