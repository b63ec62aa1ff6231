"""The benchmark harness: the report renderer and one cheap benchmark end to end (no timings)."""

from __future__ import annotations

import json

from benchmarks.report import render
from benchmarks.run import main

RESULTS = {
    "command": "python -m benchmarks.run --quick",
    "date": "2026-01-01T00:00:00+00:00",
    "runtime_s": 12.0,
    "environment": {
        "versions": {"python": "3.11", "torch": "2", "opacus": "1", "flwr": "1", "sklearn": "1"},
        "cpu_model": "Test CPU",
        "cores": 2,
        "memory_gb": 8.0,
        "load_average": [1.5, 1.0, 0.5],
    },
    "benchmarks": {
        "speed": {
            "title": "DP training speed",
            "tables": [
                {"name": "One epoch", "columns": ["mode", "samples/s"], "rows": [["ghost", 12345], ["a|b", 1.5]]}
            ],
            "notes": ["a note"],
        },
        "broken": {"title": "Broken", "error": "RuntimeError: boom"},
    },
}


def test_render_writes_header_tables_and_errors() -> None:
    md = render(RESULTS)
    assert "`python -m benchmarks.run --quick`" in md
    assert "python 3.11, torch 2, opacus 1, flwr 1, sklearn 1" in md
    assert "Test CPU, 2 cores, 8.0 GB memory" in md
    assert "1.50 / 1.00 / 0.50" in md
    assert "## DP training speed" in md and "**One epoch**" in md
    assert "| mode | samples/s |\n|---|---|\n| ghost | 12,345 |\n| a\\|b | 1.5 |" in md
    assert "- a note" in md
    assert "## Broken" in md and "Failed: `RuntimeError: boom`" in md


def test_run_writes_json_and_markdown(tmp_path) -> None:
    assert main(["--only", "communication", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmarks" / "results" / "latest.json").read_text())
    section = results["benchmarks"]["communication"]
    plain_up = section["tables"][0]["rows"][0][2]
    secure_up = section["tables"][0]["rows"][0][4]
    stages = sum(row[1] for row in section["tables"][1]["rows"])
    assert secure_up == stages > plain_up > 4 * section["tables"][0]["rows"][0][1]  # float32 values + framing
    assert results["environment"]["cores"] >= 1
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Communication" in md and "--only communication" in md
