"""A partner's persona report: ``STATE_DIR/report.html`` and ``STATE_DIR/report.md``.

``fedpersona report STATE_DIR`` builds it from the partner's local persona cards
(``personas.json``, written at the end of a federation) and its users' personas
(``assignments.csv``). Both files are written in the state folder and never sent; every number
on them is from the cards, with the cards' small-cell suppression (a persona, rate or rule of
fewer than ``min_users`` users is hidden). They are not differentially private: the partner
shares them only as it would share aggregates of its own data.

Each persona's name, size and share, its distinguishing features, the surrogate tree's rules,
its label rates and (e-commerce) categories by lift, with charts as CSS bars and the
persona-by-feature heatmap as an inline image: one self-contained page, no script, nothing
fetched. The degenerate-segmentation warning (:func:`fedpersona.report.partner_warnings`) is
judged from the partner's own assignments.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpersona.config.files import write_durably
from fedpersona.errors import DataError
from fedpersona.report import heatmap_png, partner_warnings, warnings_html, warnings_markdown

__all__ = ["PARTNER_REPORT", "PartnerReport", "is_partner_state", "load_partner_personas", "write_partner_report"]

PARTNER_REPORT = ("report.html", "report.md")  # written in the partner's state folder
_STATE_MARKERS = ("personas.json", "assignments.csv", "plan.json", "ledger.jsonl")


def is_partner_state(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a partner's state folder (its persona cards, its users'
    personas, its noise plan or its privacy ledger) rather than a run folder."""
    folder = Path(folder)
    return (
        folder.is_dir()
        and not (folder / "metrics.jsonl").exists()
        and any((folder / name).exists() for name in _STATE_MARKERS)
    )


def load_partner_personas(state_dir: str | Path) -> tuple[dict[str, Any], list[int] | None]:
    """The partner's persona cards (personas.json) and its users per persona (assignments.csv,
    None when absent), or one clear :class:`DataError` when there are no cards yet."""
    state_dir = Path(state_dir)
    path = state_dir / "personas.json"
    if not path.exists():
        raise DataError(
            f"{state_dir} has no persona cards yet (no personas.json): a partner writes them at the end of a "
            "federation that clustered personas. Run a federation first (fedpersona partner start --config "
            "client.toml, until the coordinator reports the run finished), then run fedpersona report on this "
            "folder again."
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot read the persona cards ({exc}); expected the JSON a federation wrote"
        ) from None
    cards = doc.get("cards") if isinstance(doc, dict) else None
    if (
        not isinstance(cards, list)
        or not cards
        or not all(isinstance(c, dict) and isinstance(c.get("persona"), int) for c in cards)
    ):
        raise DataError(
            f"{path}: expected an object with 'cards', a non-empty list of persona cards (as a federation writes "
            "them); this file has none. Run a federation first, then run fedpersona report on this folder again."
        )
    k = int(doc.get("k") or len(cards))
    return doc, _assignment_counts(state_dir / "assignments.csv", k)


def _assignment_counts(path: Path, k: int) -> list[int] | None:
    """Users per persona from ``user_id,persona`` lines; None when the file is absent or unreadable
    (the cards' own sizes stand in)."""
    if not path.exists():
        return None
    counts = [0] * k
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        for line in lines:
            if line.strip():
                p = int(line.rsplit(",", 1)[1])
                if not 0 <= p < k:
                    return None
                counts[p] += 1
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        return None
    return counts


@dataclass(frozen=True)
class PartnerReport:
    """The files a partner's persona report wrote, and its degenerate-segmentation warnings."""

    html: Path
    markdown: Path
    warnings: tuple[str, ...]


def write_partner_report(state_dir: str | Path) -> PartnerReport:
    """Write ``report.html`` and ``report.md`` of a partner's personas into its state folder.
    See the module docstring for what it reads; nothing is sent."""
    state_dir = Path(state_dir)
    doc, counts = load_partner_personas(state_dir)
    cards = sorted(doc["cards"], key=lambda c: int(c["persona"]))
    if counts is None:  # the cards' sizes; a suppressed persona counts as (almost) nobody
        counts = [int(c.get("users") or 0) for c in cards]
    warnings = partner_warnings(counts)
    who = f"{doc.get('partner', '?')} ({doc.get('kind', '?')})"
    min_users = int(cards[0].get("min_users") or 0)
    intro = (
        f"Personas of {who}: {len(cards)} personas, computed by this partner from its own users with the "
        "federation's model. Everything here comes from this state folder (personas.json, assignments.csv) and "
        "never left it; it is not differentially private, so share it only as you would share aggregates of "
        f"your data. Cells with fewer than {min_users} users are hidden."
    )
    fidelity = cards[0].get("fidelity")
    profile = doc.get("profile")
    heatmap = ""
    if isinstance(profile, dict) and profile.get("rows"):
        heatmap = (
            "<h2>How each persona differs from all your users</h2><p>Standardised differences (Cohen's d for a "
            "number, the rate difference over its spread for a yes/no or a category), red above and blue below "
            f"your whole table.</p><figure><img alt='persona profile' src='data:image/png;base64,{heatmap_png(doc)}'"
            "/></figure>"
        )
    overview = "".join(
        f"<tr><td>P{int(c['persona'])}</td><td>{html.escape(str(c.get('name', '')))}</td>"
        f"<td>{_count(c.get('users'))}</td><td>{_bar(c.get('share'))}</td></tr>"
        for c in cards
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>personas of {html.escape(who)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }}
table {{ border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: middle; }}
th {{ background: #f3f3f3; }}
.warn {{ background: #fee; border: 1px solid #c00; padding: 0.5em; }}
.track {{ display: inline-block; width: 10em; height: 0.8em; background: #eee; vertical-align: middle; }}
.fill {{ display: block; height: 100%; background: #4a78b5; }}
.silo {{ background: #aaa; }}
.diverge {{ display: inline-block; width: 12em; height: 0.8em; background: #eee; position: relative; }}
.diverge span {{ position: absolute; top: 0; height: 100%; }}
.up {{ background: #c0504d; left: 50%; }} .down {{ background: #4a78b5; right: 50%; }}
.muted {{ color: #777; }}
</style></head><body>
<h1>Personas of {html.escape(who)}</h1>
<p>{html.escape(intro)}</p>
{warnings_html(warnings, "your own users' personas")}
<h2>Overview</h2>
<table><tr><th>persona</th><th>name</th><th>users</th><th>share of your users</th></tr>{overview}</table>
{heatmap}
{"".join(_card_html(c) for c in cards)}
<p class='muted'>Rules: a shallow decision tree that imitates the persona assignment from your columns
(fidelity {_pct(fidelity)} on held-out users).</p>
</body></html>
"""
    md = [f"# Personas of {who}", "", intro]
    md += warnings_markdown(warnings, "your own users' personas")
    md += ["", "| persona | name | users | share |", "|---|---|---:|---:|"]
    md += [
        f"| P{int(c['persona'])} | {_md(str(c.get('name', '')))} | {_count(c.get('users'))} | "
        f"{_pct(c.get('share'))} {_text_bar(c.get('share'))} |"
        for c in cards
    ]
    for c in cards:
        md += _card_md(c)
    md += ["", f"Rules: a shallow decision tree imitating the assignment (fidelity {_pct(fidelity)} held out)."]
    return PartnerReport(
        html=write_durably(state_dir / PARTNER_REPORT[0], page.encode("utf-8")),
        markdown=write_durably(state_dir / PARTNER_REPORT[1], ("\n".join(md) + "\n").encode("utf-8")),
        warnings=tuple(warnings),
    )


def _card_html(card: dict[str, Any]) -> str:
    head = f"<h2>P{int(card['persona'])}: {html.escape(str(card.get('name', '')))}</h2>"
    if card.get("suppressed"):
        return head + f"<p>Fewer than {int(card.get('min_users') or 0)} users: nothing more is shown.</p>"
    parts = [head, f"<p>{_count(card.get('users'))} users, {_pct(card.get('share'))} of yours.</p>"]
    features = [f for f in card.get("features", []) if not f.get("suppressed")]
    if features:
        rows = "".join(
            f"<tr><td>{_diverging(f.get('strength'))}</td><td>{html.escape(str(f.get('text', '')))}</td></tr>"
            for f in features
        )
        parts.append(f"<h3>What sets them apart</h3><table><tr><th>vs all users</th><th></th></tr>{rows}</table>")
    rules = [r for r in card.get("rules", []) if not r.get("suppressed")]
    if rules:
        rows = "".join(
            f"<tr><td>{html.escape(str(r.get('text', '')))}</td><td>{_count(r.get('users'))}</td>"
            f"<td>{_pct(r.get('precision'))}</td></tr>"
            for r in rules
        )
        parts.append(
            "<h3>Rules</h3><table><tr><th>users who match</th><th>users</th><th>of them in this persona</th></tr>"
            f"{rows}</table>"
        )
    rates = card.get("label_rates", [])
    if rates:
        rows = "".join(
            f"<tr><td>{html.escape(str(r.get('label')))}</td>"
            + (
                "<td colspan='2' class='muted'>hidden (too few users)</td>"
                if r.get("suppressed")
                else f"<td>{_bar(r.get('rate'))}</td><td>{_bar(r.get('silo_rate'), silo=True)}</td>"
            )
            + "</tr>"
            for r in rates
        )
        parts.append(
            f"<h3>Label rates</h3><table><tr><th>label</th><th>persona</th><th>all users</th></tr>{rows}</table>"
        )
    categories = [c for c in card.get("categories", []) if not c.get("suppressed")]
    if categories:
        rows = "".join(
            f"<tr><td>{html.escape(str(c.get('label') or c.get('category')))}</td><td>{_bar(c.get('rate'))}</td>"
            f"<td>{_bar(c.get('silo_rate'), silo=True)}</td><td>{float(c.get('lift') or 0):.2f}×</td></tr>"
            for c in categories
        )
        parts.append(
            "<h3>Top categories by lift</h3><table><tr><th>category</th><th>persona</th><th>all users</th>"
            f"<th>lift</th></tr>{rows}</table>"
        )
    if card.get("recommendations"):
        parts.append(f"<p>Recommend: {html.escape(', '.join(str(r) for r in card['recommendations'][:5]))}</p>")
    return "".join(parts)


def _card_md(card: dict[str, Any]) -> list[str]:
    out = ["", f"## P{int(card['persona'])}: {card.get('name', '')}", ""]
    if card.get("suppressed"):
        return [*out, f"Fewer than {int(card.get('min_users') or 0)} users: nothing more is shown."]
    out.append(f"{_count(card.get('users'))} users, {_pct(card.get('share'))} of yours.")
    features = [f for f in card.get("features", []) if not f.get("suppressed")]
    if features:
        out += ["", "What sets them apart:", ""] + [f"- {f.get('text', '')}" for f in features]
    rules = [r for r in card.get("rules", []) if not r.get("suppressed")]
    if rules:
        out += ["", "| rule | users | of them in this persona |", "|---|---:|---:|"]
        out += [
            f"| {_md(str(r.get('text', '')))} | {_count(r.get('users'))} | {_pct(r.get('precision'))} |" for r in rules
        ]
    rates = card.get("label_rates", [])
    if rates:
        out += ["", "| label | persona | all users |", "|---|---:|---:|"]
        out += [
            f"| {_md(str(r.get('label')))} | "
            + ("hidden | hidden |" if r.get("suppressed") else f"{_pct(r.get('rate'))} | {_pct(r.get('silo_rate'))} |")
            for r in rates
        ]
    categories = [c for c in card.get("categories", []) if not c.get("suppressed")]
    if categories:
        out += ["", "| category | persona | all users | lift |", "|---|---:|---:|---:|"]
        out += [
            f"| {_md(str(c.get('label') or c.get('category')))} | {_pct(c.get('rate'))} | {_pct(c.get('silo_rate'))} "
            f"| {float(c.get('lift') or 0):.2f}× |"
            for c in categories
        ]
    return out


def _count(value: Any) -> str:
    return "hidden" if value is None else f"{int(value):,}"


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) or math.isnan(float(value)) else f"{100 * float(value):.1f}%"


def _bar(value: Any, *, silo: bool = False) -> str:
    """A share as a CSS bar with its number (no script, nothing fetched)."""
    if not isinstance(value, int | float) or math.isnan(float(value)):
        return "-"
    width = min(100.0, max(0.0, 100 * float(value)))
    css = "fill silo" if silo else "fill"
    return f"<span class='track'><span class='{css}' style='width:{width:.1f}%'></span></span> {_pct(value)}"


def _diverging(strength: Any) -> str:
    """A standardised difference as a bar left (below) or right (above) of the middle, +-2 full."""
    if not isinstance(strength, int | float) or math.isnan(float(strength)):
        return "-"
    width = min(50.0, 25 * abs(float(strength)))
    side = "up" if strength > 0 else "down"
    return f"<span class='diverge'><span class='{side}' style='width:{width:.1f}%'></span></span> {strength:+.2f}"


def _text_bar(value: Any) -> str:
    return "█" * round(20 * float(value)) if isinstance(value, int | float) and not math.isnan(float(value)) else ""


def _md(text: str) -> str:
    """A Markdown table cell: pipes escaped, no line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")
