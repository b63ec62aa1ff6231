"""Benchmarks of fedpersona: ``python -m benchmarks.run [--quick] [--only NAME,...]``.

Every benchmark module exposes ``run(*, quick: bool) -> dict`` returning a *section*:
``{"title": str, "tables": [{"name", "columns", "rows"}], "notes": [str], "data": {...}}``.
:mod:`benchmarks.run` writes all sections to ``benchmarks/results/latest.json`` and renders
them with :mod:`benchmarks.report` to ``docs/benchmarks.md``. Nothing here asserts timings.
"""
