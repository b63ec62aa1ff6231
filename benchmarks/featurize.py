"""Dense featurization: rows/s of :func:`fedpersona.data.dense.dense_views` on synthetic tables.

Command (one core; the table is generated and validated first, only ``dense_views`` is timed)::

    OMP_NUM_THREADS=1 python -m benchmarks.featurize            # 100,000 rows
    OMP_NUM_THREADS=1 python -m benchmarks.featurize --rows 20000

Measured 2026-12-03 with the first command on the project's shared 2-core machine (Python
3.11, one thread, load average about 20 from other jobs, so these are lower bounds; best of 5),
100,000 rows:

=======================================  =====================  =======  =========
schema                                   persona + label cols   seconds     rows/s
=======================================  =====================  =======  =========
ecommerce, numbers only (10 features)    10 + 83                  0.070  1,434,542
health, numbers only (12 features)       12 + 90                  0.090  1,114,006
finance, numbers only (7 features)       19 + 156                 0.152    656,417
ecommerce, full schema (16 features)     99 + 172                 0.287    348,078
finance, full schema (12 features)       41 + 178                 0.274    364,888
health, full schema (21 features)        31 + 109                 0.140    714,138
=======================================  =====================  =======  =========

The numbers-only schemas keep the synthetic schema's numbers and numeric sequences (with their
public typical ranges and edges) and drop everything else; the full schemas add booleans,
categories, a categorical sequence and (e-commerce) a hashed category and a text of up to 8
words with 1- and 2-grams, whose hashing dominates that row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from typing import Any

from benchmarks.workload import best_time
from fedpersona.data.dense import dense_views
from fedpersona.data.schema import KINDS, NumericFeature, SequenceFeature
from fedpersona.data.synthetic import generate_silo
from fedpersona.data.tables import Table

REPEATS = 5


def numbers_only(table: Table) -> Table:
    """``table`` with only its numbers and numeric sequences, under a schema of those alone."""
    keep = tuple(
        f
        for f in table.schema.features
        if isinstance(f, NumericFeature) or (isinstance(f, SequenceFeature) and f.element == "numeric")
    )
    schema = dataclasses.replace(table.schema, features=keep, labels=())
    columns = {c: table.columns[c] for f in keep for c in f.columns}
    return Table(schema=schema, source=table.source, ids=table.ids, columns=columns, labels={})


def run(*, quick: bool = True, rows: int | None = None) -> dict[str, Any]:
    """Time ``dense_views`` (one thread) on a numbers-only and a full table of every kind."""
    n = rows if rows is not None else (100_000 if quick else 1_000_000)
    table_rows = []
    for kind in KINDS:
        full = generate_silo(kind, n, seed=0).table
        for name, table in ((f"{kind}, numbers only", numbers_only(full)), (f"{kind}, full schema", full)):
            views = dense_views(table)  # also warms the caches
            seconds = best_time(functools.partial(dense_views, table), REPEATS)
            width = f"{views.layout.persona_width} + {views.layout.label_width}"
            features = len(table.schema.features)
            table_rows.append([f"{name} ({features} features)", width, round(seconds, 3), round(n / seconds)])
    return {
        "title": "Dense featurization",
        "tables": [
            {
                "name": f"{n:,} synthetic rows, dense_views(threads=1), OMP_NUM_THREADS="
                f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
                "columns": ["schema", "persona + label columns", "seconds", "rows/s"],
                "rows": table_rows,
            }
        ],
        "notes": [f"Best (minimum) of {REPEATS} runs; the table is generated and validated before timing."],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.featurize", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per table (default 100000)")
    args = parser.parse_args(argv)
    result = run(rows=args.rows)
    table = result["tables"][0]
    print(table["name"])
    for row in table["rows"]:
        print(json.dumps(dict(zip(table["columns"], row, strict=True))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
