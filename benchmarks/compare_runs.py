"""Compare two run folders file by file, apart from what legitimately differs between runs.

Used to check that a change leaves a run's outputs as they were: run the same non-private
simulation before and after (``fedpersona simulate --epsilon inf --reproducible-noise
--rounds 2 --out BEFORE``, then ``--out AFTER`` on the changed code) and compare::

    python -m benchmarks.compare_runs BEFORE AFTER

Text files are compared after masking absolute paths of the two folders, dates and
timestamps; ``.npz`` files by their arrays' values. Listed as expected differences, not
failures: the model-signing key pair (fresh for every run) and what it signs, and the node
ids Flower draws at random. The exit status is 1 when anything else differs.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

RANDOM_PER_RUN = ("keys/model-signing.key", "model/signature.json")


def _masked(text: str, folders: tuple[Path, Path]) -> str:
    for folder in folders:
        text = text.replace(str(folder.resolve()), "RUN")
    text = re.sub(r'"[^"]*/fedpersona/scenarios/', '"PACKAGE/scenarios/', text)  # the installed package
    text = re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(\+00:00|Z)?", "DATE", text)
    text = re.sub(r'"(created|started|finished|elapsed_s|seconds|wall_s|time)": ?[^,}\n]+', r'"\1": X', text)
    return re.sub(r'"node_id": ?\d+', '"node_id": X', text)


def _without_node_ids(value: object) -> object:
    """JSON without Flower's random node ids, lists in a canonical order (they may be kept by node)."""
    if isinstance(value, dict):
        return {k: _without_node_ids(v) for k, v in sorted(value.items()) if k != "node_id"}
    if isinstance(value, list):
        items = [_without_node_ids(v) for v in value]
        return sorted(items, key=json.dumps) if all(isinstance(v, dict) for v in items) else items
    return value


def _npz_meta(data: bytes) -> dict[str, np.ndarray]:
    arrays = dict(np.load(io.BytesIO(data)))
    if "__meta__" in arrays:  # a checkpoint's JSON metadata, stored as bytes
        meta = _without_node_ids(json.loads(bytes(arrays.pop("__meta__")).decode()))
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return arrays


def compare(before: Path, after: Path) -> list[str]:
    """One line per file that differs; lines starting with "DIFF" or "ONLY" are failures."""
    files = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
    files |= {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    out = []
    for name in sorted(files):
        a, b = before / name, after / name
        if not a.exists() or not b.exists():
            out.append(f"ONLY in {'before' if a.exists() else 'after'}: {name}")
            continue
        da, db = a.read_bytes(), b.read_bytes()
        if da == db:
            continue
        if str(name) in RANDOM_PER_RUN:
            out.append(f"expected (random per run): {name}")
        elif name.suffix == ".npz":
            x, y = _npz_meta(da), _npz_meta(db)
            same = x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
            out.append(f"{'same values' if same else 'DIFF values'}: {name}")
        else:
            try:
                ta, tb = _masked(da.decode(), (before, after)), _masked(db.decode(), (before, after))
            except UnicodeDecodeError:
                out.append(f"DIFF bytes: {name}")
                continue
            if ta == tb:
                out.append(f"same after masking: {name}")
                continue
            lines = [
                line
                for line in difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="", n=0)
                if not line.startswith(("---", "+++", "@@"))
            ]
            out.append(f"DIFF text: {name}: " + " | ".join(line[:120] for line in lines[:4]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    lines = compare(args.before, args.after)
    print("\n".join(lines) or "identical")
    return 1 if any(line.startswith(("DIFF", "ONLY")) for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
