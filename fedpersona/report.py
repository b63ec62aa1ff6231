"""The run report: ``DIR/report.html`` (self-contained, plots inline) and ``DIR/report.md``.

The run report is built only from files in the run folder (metrics.jsonl, privacy.json,
personas.json), so ``fedpersona report DIR`` can rebuild it at any time. Everything from the
server's side is a DP release or an opt-in evaluation metric; the one exception is marked in the
report itself: the persona-by-feature heatmaps, read from the partners' own folders that a
simulation run holds (see :func:`local_profiles`).

A partner's own persona report is :mod:`fedpersona.partner_report`.

The reports warn when a segmentation is degenerate (:func:`federation_warnings`,
:func:`partner_warnings`): one persona holds most users, or personas hold (almost) nobody.
Each place judges only from what it already has: the coordinator from the DP-noised shares it
released, a partner from its own assignments. No new statistic of anyone's rows leaves a silo.

Files are written whole or not at all (a temporary file renamed over the old one).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedpersona.config.files import write_durably
from fedpersona.privacy.randomness import KNOWN_SEEDS_LABEL

__all__ = [
    "BASELINE_COLUMNS",
    "DOMINANT_SHARE",
    "SUMMARY_COLUMNS",
    "UNUSED_SHARE",
    "baseline_rows",
    "federation_warnings",
    "heatmap_png",
    "load_run",
    "local_profiles",
    "partner_warnings",
    "plot_png",
    "summary_columns",
    "summary_rows",
    "warnings_html",
    "warnings_markdown",
    "write_report",
]

DOMINANT_SHARE = 0.6
"""A persona with more than this share of a kind's (or a partner's) users makes the segmentation
degenerate: most users then get one and the same description, and the other personas describe
a minority. Well over half is the point where "a persona" stops being a segment and becomes the
population (the warning is for a collapse, such as every user landing in one persona, not for a
large segment)."""

UNUSED_SHARE = 0.02
"""A persona under this share of the users everywhere is one that nobody uses: a prototype that
no partner's users are near. The same 2% under which the coordinator leaves a persona out of a
kind's ``personas_by_kind`` in personas.json."""

SUMMARY_COLUMNS = (
    ("partner", "partner"),
    ("kind", "kind"),
    ("rows", "rows"),
    ("epsilon", "epsilon spent"),
    ("label_auc", "label AUC"),
    ("probe_auc", "probe AUC"),
    ("reconstruction_error", "recon. error"),
    ("ari", "ARI"),
)

_OPTIONAL_COLUMNS = ("probe_auc", "reconstruction_error", "ari")  # the encoder's metrics


def summary_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """:data:`SUMMARY_COLUMNS` without the encoder's metrics (probe AUC, reconstruction
    error, embedding ARI) when no row has them: the label model has no embedding."""
    return tuple(c for c in SUMMARY_COLUMNS if c[0] not in _OPTIONAL_COLUMNS or any(c[0] in r for r in rows))


BASELINE_COLUMNS = (
    ("partner", "partner"),
    ("kind", "kind"),
    ("alone_auc", "alone: own model AUC"),
    ("local_auc", "with the federation: local model AUC"),
    ("auc_gain", "gain"),
    ("alone_ari", "alone: own k-means ARI"),
    ("persona_ari", "with the federation: persona ARI"),
)
BASELINE_TEXT = (
    "What each partner gets alone from its own columns (its own logistic regression or gradient "
    "boosting, chosen by cross-validation on its training rows; its own k-means), beside what it "
    "gets with the federation (its local model on its own columns and the federated score; the "
    "federated personas of its kind, their ARI over all its rows), on its held-out rows."
)


def baseline_rows(final: list[dict[str, Any]], personas: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The partners whose last evaluation carries the honest baseline, with the AUC gain and,
    from the persona rows (:func:`persona_rows`), the ARI of the federated personas."""
    ari = {r["partner"]: r["persona_ari"] for r in personas or [] if "persona_ari" in r}
    out = []
    for row in final:
        if "alone_auc" in row or "alone_ari" in row:
            gain = float(row.get("local_auc", math.nan)) - float(row.get("alone_auc", math.nan))
            out.append({**row, "auc_gain": gain, "persona_ari": ari.get(row["partner"], math.nan)})
    return out


def load_run(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    privacy_path = run_dir / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else {"partners": {}}
    return rows, privacy


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last evaluated round of each partner."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if "phase" not in row:
            last[row["partner"]] = row
    return [last[k] for k in sorted(last)]


def persona_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each partner's persona-assignment row (after the persona protocol), if the run found personas."""
    return sorted((r for r in rows if r.get("phase") == "personas"), key=lambda r: r["partner"])


def _cell(value: Any) -> str:
    if value is None:
        return "NOT PRIVATE"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _plot(rows: list[dict[str, Any]], key: str, title: str) -> str | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if "phase" in row:
            continue
        value = row.get(key)
        if isinstance(value, int | float) and not math.isnan(float(value)):
            series.setdefault(row["partner"], []).append((row["round"], float(value)))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    for name, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=name, linewidth=1.2, markersize=3)
    ax.set_xlabel("round")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return plot_png(fig)


def plot_png(fig: Any) -> str:
    """A matplotlib figure as base64 PNG (for an inline ``<img>``); closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def local_profiles(run_dir: str | Path) -> list[dict[str, Any]]:
    """The persona-by-feature profiles in the partners' own folders of a simulation run.

    In a simulation the driver plays every partner, so their local files
    (``partners/<name>/state/personas.json``) sit in the run folder; in a deployment each
    partner has only its own and the server has none (they are never sent).
    """
    out = []
    for path in sorted(Path(run_dir).glob("partners/*/state/personas.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc.get("profile"), dict) and doc["profile"].get("rows"):
            out.append(doc)
    return out


def heatmap_png(doc: dict[str, Any]) -> str:
    """One partner's persona-by-feature standardised differences as a heatmap (base64 PNG)."""
    profile = doc["profile"]
    rows = list(profile["rows"])
    values = np.array(
        [[np.nan if v is None else float(v) for v in persona] for persona in profile["strength"]], dtype=float
    ).T  # (rows, k)
    k = values.shape[1]
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * k, 1.0 + 0.26 * len(rows)), dpi=100)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-1.5, vmax=1.5, aspect="auto")
    ax.set_xticks(range(k), [f"P{p}" for p in range(k)], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, f"{v:+.1f}", ha="center", va="center", fontsize=6, color="white" if abs(v) > 1 else "black")
    ax.set_title(f"{doc.get('partner', '?')} ({doc.get('kind', '?')})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return plot_png(fig)


def _profiles_html(run_dir: Path) -> str:
    docs = local_profiles(run_dir)
    if not docs:
        return ""
    figures = "".join(
        f"<figure><img alt='persona profile of {html.escape(str(d.get('partner')))}' "
        f"src='data:image/png;base64,{heatmap_png(d)}'/></figure>"
        for d in docs
    )
    return (
        "<h2>Persona profiles at each partner (local, not sent)</h2>"
        "<p>Each heatmap shows, for one partner's own users, how each persona differs from the "
        "partner's whole silo on each feature: the standardised difference (Cohen's d for a "
        "number; (rate in persona − rate in silo) / √(rate in silo × (1 − rate in silo)) for a "
        "yes/no or a category value), red above the silo and blue below, grey where a cell has "
        "fewer than the cards' minimum of users. These numbers are NOT differentially private: "
        "they come from each partner's local persona cards "
        "(<code>partners/&lt;name&gt;/state/personas.json</code>), which the partner computes "
        "from its own rows and never sends. They appear here only because in a simulation the "
        "driver plays every partner; in a deployment each partner sees its own heatmap and the "
        "server's report has only the DP shares above.</p>" + figures
    )


def write_report(run_dir: str | Path) -> Path:
    """Write report.html and report.md for a run folder; returns the HTML path."""
    run_dir = Path(run_dir)
    rows, privacy = load_run(run_dir)
    spent = {name: p.get("epsilon") for name, p in privacy.get("partners", {}).items()}
    final = [{**r, "epsilon": spent.get(r["partner"], r.get("epsilon"))} for r in summary_rows(rows)]
    any_public = any(p.get("private") is False for p in privacy.get("partners", {}).values())
    seeded = sorted(name for name, p in privacy.get("partners", {}).items() if p.get("noise_seeds_known"))
    banner = (
        "<p class='warn'>NOT PRIVATE: at least one partner ran without differential privacy "
        "(epsilon = inf). Use this run only as a utility reference.</p>"
        if any_public
        else ""
    )
    if seeded:
        banner += (
            f"<p class='warn'>{html.escape(KNOWN_SEEDS_LABEL.upper())}: {html.escape(', '.join(seeded))} drew "
            "their noise from a configured seed (privacy.noise_seed); whoever knows it can remove the noise.</p>"
        )
    columns = summary_columns(final)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(_cell(r.get(k) if k == 'epsilon' else r.get(k, math.nan)))}</td>" for k, _ in columns
        )
        + "</tr>"
        for r in final
    )
    baseline = baseline_rows(final, persona_rows(rows))
    baseline_html = ""
    if baseline:
        b_head = "".join(f"<th>{html.escape(label)}</th>" for _, label in BASELINE_COLUMNS)
        b_body = "".join(
            "<tr>"
            + "".join(f"<td>{html.escape(_cell(r.get(k, math.nan)))}</td>" for k, _ in BASELINE_COLUMNS)
            + "</tr>"
            for r in baseline
        )
        baseline_html = (
            f"<h2>Alone or with the federation</h2><p>{html.escape(BASELINE_TEXT)}</p>"
            f"<table><tr>{b_head}</tr>{b_body}</table>"
        )
    priv_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(p['kind']))}</td>"
        f"<td>{html.escape(_cell(p.get('epsilon')))}</td><td>{html.escape(str(p.get('target_epsilon')))}</td>"
        f"<td>{p.get('delta')}</td><td>{_cell(float(p.get('noise_multiplier') or 0.0))}</td>"
        f"<td>{_cell(float(p.get('sample_rate') or 0.0))}</td><td>{p.get('steps')}</td>"
        f"<td>{html.escape(str(p.get('accountant')))}</td></tr>"
        for name, p in sorted(privacy.get("partners", {}).items())
    )
    personas_path = run_dir / "personas.json"
    persona_html = ""
    personas: dict[str, Any] = {}
    warnings: list[str] = []
    if personas_path.exists():
        personas = json.loads(personas_path.read_text())
        warnings = federation_warnings(personas)
        share_rows = "".join(
            f"<tr><td>{html.escape(kind)}</td>" + "".join(f"<td>{100 * s:.1f}%</td>" for s in shares) + "</tr>"
            for kind, shares in sorted(personas.get("shares_by_kind", {}).items())
        )
        head_p = "".join(f"<th>P{i}</th>" for i in range(int(personas.get("k", 0))))
        local = "".join(
            f"<tr><td>{html.escape(r['partner'])}</td><td>{int(r.get('personas_found', 0))}</td>"
            f"<td>{_cell(r.get('surrogate_fidelity', math.nan))}</td>"
            f"<td>{_cell(r.get('persona_ari', math.nan))}</td>"
            f"<td>{_cell(r.get('rec_hit_rate', math.nan))}</td>"
            f"<td>{_cell(r.get('rec_hit_rate_popularity', math.nan))}</td></tr>"
            for r in persona_rows(rows)
        )
        persona_html = (
            f"<h2>Personas</h2><p>{html.escape(_persona_method(personas))} "
            "Shares per kind come from DP-noised counts only. Each partner's persona cards stay at the partner "
            "(<code>partners/&lt;name&gt;/state/personas.json</code> in a simulation).</p>"
            f"<table><tr><th>kind</th>{head_p}</tr>{share_rows}</table>"
            + warnings_html(warnings, "the shares above")
            + "<table><tr><th>partner</th><th>personas among its users</th><th>surrogate fidelity</th>"
            "<th>ARI vs ground truth</th><th>persona top-3 hit rate</th><th>popularity top-3 hit rate</th>"
            f"</tr>{local}</table>"
            "<p>Hit rates (e-commerce): how often a user's most recent purchase category, hidden "
            "while the statistics are made, is among the 3 categories recommended to the user's "
            "persona, against the silo's 3 most popular categories.</p>"
        )
    plots = []
    for key, title in (
        ("epsilon", "cumulative epsilon per partner"),
        ("label_auc", "label AUC (held-out)"),
        ("probe_auc", "linear-probe AUC on embeddings"),
        ("reconstruction_error", "masked reconstruction error"),
        ("ari", "ARI vs ground-truth personas (synthetic)"),
    ):
        image = _plot(rows, key, title)
        if image:
            plots.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{image}'/></figure>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedpersona run report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
.warn {{ background: #fee; border: 1px solid #c00; padding: 0.5em; font-weight: bold; }}
figure {{ display: inline-block; margin: 0.5em; }}
</style></head><body>
<h1>fedpersona run report</h1>
<p>Run folder: {html.escape(str(run_dir))}</p>
{banner}
<h2>Partners after the last round</h2>
<table><tr>{head}</tr>{body}</table>
{baseline_html}
<h2>Privacy spent</h2>
<table><tr><th>partner</th><th>kind</th><th>epsilon</th><th>target</th><th>delta</th>
<th>noise</th><th>sample rate</th><th>steps</th><th>accountant</th></tr>{priv_rows}</table>
{persona_html}
{_profiles_html(run_dir)}
<h2>Training curves</h2>
{"".join(plots)}
</body></html>
"""
    out = write_durably(run_dir / "report.html", page.encode("utf-8"))
    md = ["# fedpersona run report", ""]
    if any_public:
        md += ["**NOT PRIVATE**: at least one partner ran without differential privacy.", ""]
    if seeded:
        md += [f"**{KNOWN_SEEDS_LABEL.upper()}**: {', '.join(seeded)} (privacy.noise_seed).", ""]
    md.append("| " + " | ".join(label for _, label in columns) + " |")
    md.append("|" + "---|" * len(columns))
    for r in final:
        md.append(
            "| " + " | ".join(_cell(r.get(k) if k == "epsilon" else r.get(k, math.nan)) for k, _ in columns) + " |"
        )
    if baseline:
        md += ["", "## Alone or with the federation", "", BASELINE_TEXT, ""]
        md.append("| " + " | ".join(label for _, label in BASELINE_COLUMNS) + " |")
        md.append("|" + "---|" * len(BASELINE_COLUMNS))
        for r in baseline:
            md.append("| " + " | ".join(_cell(r.get(k, math.nan)) for k, _ in BASELINE_COLUMNS) + " |")
    if personas:
        md += [
            "",
            _persona_method(personas),
        ]
        md += warnings_markdown(warnings, "the released shares per kind")
    write_durably(run_dir / "report.md", ("\n".join(md) + "\n").encode("utf-8"))
    return out


def _persona_method(personas: dict[str, Any]) -> str:
    """The sentence saying how the personas were found."""
    return (
        f"{int(personas.get('k', 0))} personas per silo kind from {int(personas.get('rounds', 0))} releases per "
        f"partner: {personas.get('method', 'the persona protocol')}."
    )


# --- degenerate segmentations -----------------------------------------------------------------


def federation_warnings(personas: Mapping[str, Any]) -> list[str]:
    """Warnings about the global personas, from the coordinator's personas.json.

    Judged from ``shares_by_kind`` alone: each kind's persona shares as the coordinator released
    them, from DP-noised counts already charged to every partner's ledger. A noisy share can sit
    a little off the true one, so a warning near a threshold is a hint, not a measurement.
    """
    raw = personas.get("shares_by_kind")
    if not isinstance(raw, Mapping):
        return []
    shares = {str(kind): [float(s) for s in values] for kind, values in raw.items() if isinstance(values, list)}
    out = [
        f"one persona holds most users: P{p} has {_share(share)} of the {kind} users (more than "
        f"{DOMINANT_SHARE:.0%}), so the personas hardly tell those users apart"
        for kind, (p, share) in sorted(_dominant(shares).items())
    ]
    unused = _unused(shares)
    if unused:
        names = ", ".join(f"P{p}" for p in unused)
        out.append(
            f"{'a persona' if len(unused) == 1 else 'personas'} that no partner uses: {names} "
            f"{'holds' if len(unused) == 1 else 'hold'} under {UNUSED_SHARE:.0%} of the users of every kind"
        )
    return out


def partner_warnings(counts: Sequence[int]) -> list[str]:
    """Warnings about a partner's own segmentation, from its users per persona (``counts[p]``,
    from its own assignments). Local: the counts and the warnings stay at the partner."""
    total = sum(counts)
    if total <= 0:
        return []
    shares = {"": [c / total for c in counts]}
    out = [
        f"one persona holds most of your users: P{p} has {_share(share)} of them (more than {DOMINANT_SHARE:.0%}), "
        "so the personas hardly tell your users apart"
        for p, share in _dominant(shares).values()
    ]
    unused = _unused(shares)
    if unused:
        names = ", ".join(f"P{p}" for p in unused)
        out.append(
            f"{'a persona' if len(unused) == 1 else 'personas'} that your users do not use: {names} "
            f"{'holds' if len(unused) == 1 else 'hold'} under {UNUSED_SHARE:.0%} of your users"
        )
    return out


def _share(share: float) -> str:
    """A share in whole percent, or to a tenth where whole percent would read as the threshold."""
    return f"{share:.1%}" if f"{share:.0%}" == f"{DOMINANT_SHARE:.0%}" else f"{share:.0%}"


def _dominant(shares: Mapping[str, list[float]]) -> dict[str, tuple[int, float]]:
    """Each group whose largest persona holds more than DOMINANT_SHARE (with K >= 2 personas)."""
    out = {}
    for group, values in shares.items():
        if len(values) >= 2 and sum(values) > 0:
            p = int(np.argmax(values))
            if values[p] / sum(values) > DOMINANT_SHARE:
                out[group] = (p, values[p] / sum(values))
    return out


def _unused(shares: Mapping[str, list[float]]) -> list[int]:
    """The personas under UNUSED_SHARE in every group that has users."""
    groups = [v for v in shares.values() if sum(v) > 0]
    if not groups:
        return []
    k = max(len(v) for v in groups)
    return [p for p in range(k) if all(p >= len(v) or v[p] / sum(v) < UNUSED_SHARE for v in groups)]


def warnings_html(warnings: list[str], source: str) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return (
        f"<div class='warn'>Degenerate segmentation (judged from {html.escape(source)} only):"
        f"<ul>{items}</ul>Consider fewer personas, other features, or a check of the data.</div>"
    )


def warnings_markdown(warnings: list[str], source: str) -> list[str]:
    if not warnings:
        return []
    return ["", f"**Degenerate segmentation** (judged from {source} only):", "", *(f"- {w}" for w in warnings)]
