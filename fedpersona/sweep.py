"""The privacy-utility sweep: one scenario run once per privacy budget, then compared.

``fedpersona simulate --sweep-epsilon 0.5,1,2,4,8,inf --out DIR`` runs the scenario once per
target epsilon, one after the other (Ray runs one simulation at a time), each in
``DIR/eps-<value>/`` as an ordinary run folder. :func:`write_sweep` then reads those folders
only (so ``fedpersona report DIR`` can rebuild everything) and writes:

- ``DIR/sweep.json``: ``{"runs": [...]}``, one entry per budget in increasing order (``inf``
  last) with the mean final-round ``label_auc`` and ``probe_auc`` over partners, the persona
  quality (mean ``persona_ari`` against the synthetic ground truth, mean
  ``surrogate_fidelity``, and for e-commerce the mean ``rec_hit_rate`` and its popularity
  baseline), the same per silo kind under ``per_kind``, ``epsilon_spent`` per partner and
  ``max_epsilon_spent``: the largest epsilon a partner actually spent (from ``privacy.json``;
  ``null`` for a non-private run);
  a budget too small for the run (e.g. below the persona-clustering reserve: every partner
  refuses to join) gives ``null`` metrics and a ``note``;
- ``DIR/sweep.csv``: the same, one row per budget (per-kind values as ``<kind>.<metric>``);
- ``DIR/report.html`` and ``DIR/report.md``: the table and a plot of label AUC, probe AUC and
  persona quality against epsilon on a log axis, the non-private run drawn as its own point on
  the right, labelled "∞ (not private)".

Every number comes from the runs' opt-in evaluation metrics (``share_eval_metrics``); they
are NOT differentially private and are meant for choosing a budget on synthetic or test data.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.errors import ConfigError
from fedpersona.report import load_run, persona_rows, plot_png, summary_rows

__all__ = ["METRICS", "SweepResult", "parse_epsilons", "run_sweep", "sweep_runs", "write_sweep"]

# (key in sweep.json, key in metrics.jsonl, which rows: "final" round or "personas" phase)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("label_auc", "label_auc", "final"),
    ("probe_auc", "probe_auc", "final"),
    ("persona_ari", "persona_ari", "personas"),
    ("surrogate_fidelity", "surrogate_fidelity", "personas"),
    ("rec_hit_rate", "rec_hit_rate", "personas"),
    ("rec_hit_rate_popularity", "rec_hit_rate_popularity", "personas"),
)
_FOLDER = re.compile(r"^eps-(.+)$")
INF_LABEL = "∞ (not private)"


@dataclass(frozen=True)
class SweepResult:
    out: Path
    runs: list[dict[str, Any]]


def parse_epsilons(text: str, *, option: str = "--sweep-epsilon") -> list[float]:
    """``"0.5,1,inf"`` -> ``[0.5, 1.0, inf]``; every bad item is named in one error."""
    items = [item.strip() for item in text.split(",")]
    values: list[float] = []
    bad: list[str] = []
    for item in items:
        value = _epsilon(item)
        if value is None:
            bad.append(repr(item))
        else:
            values.append(value)
    if bad:
        raise ConfigError(
            f"{option} must be a comma-separated list of numbers > 0 or 'inf'; "
            f"not valid: {', '.join(bad)} (in {text!r})"
        )
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ConfigError(f"{option} lists {', '.join(_label(v) for v in dupes)} more than once (in {text!r})")
    return sorted(values)


def _epsilon(item: str) -> float | None:
    if item.lower() in ("inf", "infinity"):
        return math.inf
    try:
        value = float(item)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def run_sweep(
    *,
    epsilons: list[float],
    out: str | Path,
    scenario_path: str | Path | None = None,
    rounds: int | None = None,
    on_run: Callable[[float, Path], None] | None = None,
    **callbacks: Any,
) -> SweepResult:
    """Run the scenario once per epsilon, sequentially, then write the sweep files.

    ``callbacks`` (``on_round``, ``on_start``) are passed to every
    :func:`fedpersona.simulation.simulate`; ``on_run`` is told each budget before its run.
    """
    from fedpersona.config.files import load_scenario
    from fedpersona.simulation import default_scenario_path, prepare_run_dir, simulate

    if not epsilons:
        raise ConfigError("a sweep needs at least one epsilon")
    path = Path(scenario_path) if scenario_path else default_scenario_path()
    load_scenario(path, rounds=rounds)  # a bad scenario fails before any folder is made
    root = prepare_run_dir(out)
    for epsilon in sorted(epsilons):
        run_dir = root / f"eps-{_label(epsilon)}"
        if on_run is not None:
            on_run(epsilon, run_dir)
        simulate(scenario_path=path, rounds=rounds, epsilon=epsilon, out=run_dir, **callbacks)
    return SweepResult(root, write_sweep(root))


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]


def _summarise(run_dir: Path, epsilon: float) -> dict[str, Any]:
    rows, privacy = load_run(run_dir)
    which = {"final": summary_rows(rows), "personas": persona_rows(rows)}
    entry: dict[str, Any] = {
        "label": _label(epsilon),
        "target_epsilon": None if math.isinf(epsilon) else epsilon,
        "private": not math.isinf(epsilon),
        "run": run_dir.name,
        "partners": len(which["final"]),
    }
    for name, key, source in METRICS:
        entry[name] = _mean(_values(which[source], key))
    kinds = sorted({str(r["kind"]) for r in which["final"] + which["personas"]})
    entry["per_kind"] = {
        kind: {
            name: _mean(_values([r for r in which[source] if r["kind"] == kind], key)) for name, key, source in METRICS
        }
        for kind in kinds
    }
    if not which["final"]:
        entry["note"] = "no round completed: no partner could train within this budget (see the run's log)"
    spent = [p.get("epsilon") for p in privacy.get("partners", {}).values()]
    finite = [float(e) for e in spent if isinstance(e, int | float)]
    entry["max_epsilon_spent"] = max(finite) if finite else None
    entry["epsilon_spent"] = {name: p.get("epsilon") for name, p in sorted(privacy.get("partners", {}).items())}
    return entry


def sweep_runs(out: str | Path) -> list[tuple[float, Path]]:
    """The ``eps-<value>`` run folders of a sweep folder, by increasing epsilon (inf last)."""
    found = []
    for child in Path(out).iterdir():
        match = _FOLDER.match(child.name)
        finished = (child / "metrics.jsonl").exists() or (child / "privacy.json").exists()
        if child.is_dir() and match and finished:
            value = _epsilon(match.group(1))
            if value is not None:
                found.append((value, child))
    return sorted(found)


def write_sweep(out: str | Path) -> list[dict[str, Any]]:
    """Write sweep.json, sweep.csv, report.html and report.md from the run folders of ``out``."""
    out = Path(out)
    runs = [_summarise(run_dir, epsilon) for epsilon, run_dir in sweep_runs(out)]
    if not runs:
        raise ConfigError(f"{out} holds no finished sweep run (no eps-<value>/privacy.json)")
    (out / "sweep.json").write_text(json.dumps({"runs": runs}, indent=2), encoding="utf-8")
    kinds = sorted({kind for r in runs for kind in r["per_kind"]})
    names = [name for name, _, _ in METRICS]
    header = ["epsilon", "max_epsilon_spent", "partners", *names] + [f"{k}.{n}" for k in kinds for n in names]
    with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in runs:
            per = [r["per_kind"].get(k, {}).get(n) for k in kinds for n in names]
            writer.writerow([r["label"], r["max_epsilon_spent"], r["partners"], *(r[n] for n in names), *per])
    _write_report(out, runs)
    return runs


def sweep_figure(runs: list[dict[str, Any]]) -> Any:
    """Label AUC, probe AUC and persona quality against epsilon (a matplotlib Figure).

    The x axis is logarithmic; a non-private run sits one and a half doublings right of the
    largest budget, not joined to the private points, with the tick "∞ (not private)".
    """
    import matplotlib.pyplot as plt

    finite = [r["target_epsilon"] for r in runs if r["target_epsilon"] is not None]
    inf_x = (max(finite) if finite else 1.0) * 2.83
    xs = [r["target_epsilon"] if r["target_epsilon"] is not None else inf_x for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=100)
    panels = (
        ("label AUC (held-out)", (("label_auc", "label AUC"),)),
        ("linear-probe AUC on embeddings", (("probe_auc", "probe AUC"),)),
        (
            "persona quality",
            (
                ("persona_ari", "ARI vs ground truth"),
                ("surrogate_fidelity", "surrogate fidelity"),
                ("rec_hit_rate", "rec. hit rate@3"),
            ),
        ),
    )
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, name in series:
            points = [(x, r[key]) for x, r in zip(xs, runs, strict=True) if r[key] is not None]
            private = [(x, y) for x, y in points if x != inf_x]
            line = None
            if private:
                line = ax.plot(*zip(*private, strict=True), marker="o", label=name)[0]
            public = [(x, y) for x, y in points if x == inf_x]
            if public:
                color = line.get_color() if line is not None else None
                ax.plot(*zip(*public, strict=True), marker="D", linestyle="none", color=color,
                        label=None if line is not None else name)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([INF_LABEL if x == inf_x else f"{x:g}" for x in xs], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("target epsilon per partner")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_COLUMNS = (
    ("label", "epsilon"),
    ("max_epsilon_spent", "max epsilon spent"),
    ("label_auc", "label AUC"),
    ("probe_auc", "probe AUC"),
    ("persona_ari", "persona ARI"),
    ("surrogate_fidelity", "surrogate fidelity"),
    ("rec_hit_rate", "rec. hit rate@3"),
    ("rec_hit_rate_popularity", "popularity hit rate@3"),
)


def _write_report(out: Path, runs: list[dict[str, Any]]) -> None:
    image = plot_png(sweep_figure(runs))
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in _COLUMNS) + "<th>run report</th>"
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(INF_LABEL if key == 'label' and r['label'] == 'inf' else _cell(r[key]))}</td>"
            for key, _ in _COLUMNS
        )
        + f"<td><a href='{html.escape(r['run'])}/report.html'>{html.escape(r['run'])}</a>"
        + (f"<br>{html.escape(r['note'])}" if r.get("note") else "")
        + "</td></tr>"
        for r in runs
    )
    kinds = sorted({kind for r in runs for kind in r["per_kind"]})
    per_kind = "".join(
        f"<tr><td>{html.escape(kind)}</td><td>{html.escape(INF_LABEL if r['label'] == 'inf' else r['label'])}</td>"
        + "".join(f"<td>{_cell(r['per_kind'].get(kind, {}).get(key))}</td>" for key, _ in _COLUMNS[2:])
        + "</tr>"
        for kind in kinds
        for r in runs
    )
    kind_head = "<th>kind</th><th>epsilon</th>" + "".join(f"<th>{html.escape(lab)}</th>" for _, lab in _COLUMNS[2:])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedpersona privacy-utility sweep</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
</style></head><body>
<h1>fedpersona privacy-utility sweep</h1>
<p>Sweep folder: {html.escape(str(out))}. The same scenario was run once per target epsilon
(each run in its own folder, linked below). Values are means over partners of the last
evaluated round (label and probe AUC) and of the persona assignment (ARI against the synthetic
ground truth, surrogate-tree fidelity, e-commerce recommendation hit rate). They are opt-in
evaluation metrics, NOT differentially private. "max epsilon spent" is the largest epsilon any
partner actually spent, training and persona clustering together. The run at
{html.escape(INF_LABEL)} used no differential privacy: a utility reference only.</p>
<figure><img alt='utility against epsilon' src='data:image/png;base64,{image}'/></figure>
<table><tr>{head}</tr>{body}</table>
<h2>Per silo kind</h2>
<table><tr>{kind_head}</tr>{per_kind}</table>
</body></html>
"""
    (out / "report.html").write_text(page, encoding="utf-8")
    md = ["# fedpersona privacy-utility sweep", ""]
    md.append("| " + " | ".join(label for _, label in _COLUMNS) + " |")
    md.append("|" + "---|" * len(_COLUMNS))
    for r in runs:
        cells = [INF_LABEL if key == "label" and r["label"] == "inf" else _cell(r[key]) for key, _ in _COLUMNS]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Opt-in evaluation metrics (NOT DP); the ∞ run used no differential privacy.", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
