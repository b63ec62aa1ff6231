"""Who is in the federation and how the coordinator talks to them.

:class:`Member` is the coordinator's record of one partner (its node, what it declared in its
``query`` reply, its slot, whether it is active, the epsilon it last reported). Partners of one
kind with the most common schema fingerprint form a *slot* and share their adapter
(:func:`assign_slots`); the others keep theirs local and the log says so. :func:`admit` asks
nodes who they are; :func:`rejoin` readmits a partner whose node came back; :func:`failed`
and :func:`trained` record a reply; :func:`ask_status` collects each partner's ledger epsilon
(at resume and at the end of a run). :func:`exchange` sends one message per partner and pairs
each reply with the partner it answers.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpersona.config.settings import FederationSettings
from fedpersona.data.schema import slot_id
from fedpersona.federation.messages import metrics_of
from fedpersona.privacy.manifest import REFUSALS, parse_error_reason
from fedpersona.privacy.randomness import KNOWN_SEEDS_LABEL

__all__ = [
    "AdmissionWindow",
    "Arrivals",
    "Clock",
    "Member",
    "admit",
    "ask_status",
    "assign_slots",
    "exchange",
    "failed",
    "names",
    "newcomer_slot",
    "refusals",
    "rejoin",
    "reported_number",
    "trained",
    "wait_for_nodes",
]

logger = logging.getLogger(__name__)


@dataclass
class Member:
    node_id: int
    info: dict[str, Any]
    slot: str | None = None
    active: bool = True
    epsilon: float | None = None
    steps: int = 0
    dropped_reason: str = ""
    rejoinable: bool = False  # dropped as unreachable: admitted again when its node is back
    history: list[list[float]] = field(default_factory=list)  # [round, cumulative epsilon]
    # True once the partner answered the end-of-run status query: its epsilon is then its
    # ledger's final figure; otherwise it is the last one reported, a lower bound.
    epsilon_final: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "info": self.info, "slot": self.slot, "active": self.active,
            "epsilon": self.epsilon, "steps": self.steps, "dropped_reason": self.dropped_reason,
            "rejoinable": self.rejoinable, "history": self.history, "epsilon_final": self.epsilon_final,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Member:
        return cls(
            node_id=int(data["node_id"]), info=dict(data["info"]), slot=data["slot"], active=bool(data["active"]),
            epsilon=data["epsilon"], steps=int(data["steps"]), dropped_reason=str(data["dropped_reason"]),
            rejoinable=bool(data["rejoinable"]), history=[list(h) for h in data["history"]],
            epsilon_final=bool(data.get("epsilon_final", False)),
        )  # fmt: skip

    def record_epsilon(self, rnd: int, epsilon: float | None) -> None:
        """The partner's cumulative epsilon as its latest reply reported it (never lowered:
        a ledger only grows, so a smaller figure is an older one)."""
        if epsilon is None:
            return
        if self.epsilon is not None and epsilon < self.epsilon:
            return
        self.epsilon = epsilon
        self.epsilon_final = False
        if rnd < 1:  # admission before round 1: nothing spent in this run yet
            return
        if self.history and self.history[-1][0] == rnd:
            self.history[-1] = [rnd, epsilon]
        else:
            self.history.append([rnd, epsilon])


def exchange(
    grid: Grid,
    kind: str,
    contents: dict[int, RecordDict],
    group: str,
    timeout: float,
    partners: dict[int, Member],
) -> list[tuple[Member, Message]]:
    """Send one message per partner and pair each reply with the partner it answers.

    A reply that the SuperLink itself generated (the partner went offline, the message
    expired) carries the SuperLink's node id, not the partner's: it is matched through the
    id of the message it replies to, and a reply nobody can be matched to is logged and
    skipped rather than crashing the run.
    """
    messages = _messages(grid, kind, contents, group)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    out = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in partners:
            node = sent.get(reply.metadata.reply_to_message_id, -1)
        if node not in partners:
            reason = reply.error.reason if reply.has_error() else "no error"
            logger.warning("a %s reply from node %s matches no partner (%s); ignored", kind, node, reason)
            continue
        out.append((partners[node], reply))
    return out


def _messages(grid: Grid, kind: str, contents: dict[int, RecordDict], group: str) -> list[Message]:
    return [Message(content, dst_node_id=node, message_type=kind, group_id=group) for node, content in contents.items()]


@dataclass(frozen=True)
class Clock:
    """Where waiting code reads the time and sleeps (a test passes a fake one)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class AdmissionWindow:
    """How long the coordinator waits for partners before the first round (``[server]`` settings).

    The window is ``initial`` seconds; every partner that connects pushes the deadline to at
    least ``extension`` seconds after its arrival (partners that are still starting, each
    import costing tens of seconds on a loaded machine, are not given up on while others keep
    arriving), but never past ``maximum`` seconds after the wait began. Progress is logged as
    partners arrive and every ``progress_every`` seconds.
    """

    initial: float
    extension: float = 120.0
    maximum: float = 3600.0
    progress_every: float = 30.0
    poll: float = 1.0

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "progress_every", "poll"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"AdmissionWindow.{name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.extension) and self.extension >= 0):
            raise ValueError(f"AdmissionWindow.extension must be a finite number >= 0, got {self.extension!r}")
        if self.maximum < self.initial:
            raise ValueError(f"AdmissionWindow.maximum ({self.maximum:g}) must be >= initial ({self.initial:g})")


@dataclass(frozen=True)
class Arrivals:
    """What :func:`wait_for_nodes` saw: the nodes online when it returned and how long it waited."""

    nodes: list[int]
    waited: float
    deadline: float  # seconds after the start at which the wait would have ended


def wait_for_nodes(grid: Grid, want: int, window: AdmissionWindow, *, clock: Clock | None = None) -> Arrivals:
    """Wait until ``want`` nodes are online or the (progress-extended) window closes."""
    clock = clock or Clock()
    start = clock.now()
    deadline = start + window.initial
    seen: set[int] = set()
    last_report = -math.inf  # the first look is always reported
    while True:
        nodes = sorted(grid.get_node_ids())
        now = clock.now()
        new = set(nodes) - seen
        if new:
            seen |= new
            deadline = min(start + window.maximum, max(deadline, now + window.extension))
        if len(nodes) >= want:
            logger.info("%d of %d partners connected after %.0fs", len(nodes), want, now - start)
            return Arrivals(nodes, now - start, deadline - start)
        if now >= deadline:
            return Arrivals(nodes, now - start, deadline - start)
        if new or now - last_report >= window.progress_every:
            last_report = now
            extends = window.extension > 0 and deadline < start + window.maximum
            logger.info(
                "%d of %d partners connected, waiting up to %.0fs more%s",
                len(nodes), want, deadline - now, " (each new partner extends the wait)" if extends else "",
            )  # fmt: skip
        clock.sleep(min(window.poll, max(0.0, deadline - now)))


def assign_slots(partners: dict[int, Member]) -> None:
    by_kind: dict[str, Counter[str]] = {}
    for p in partners.values():
        by_kind.setdefault(p.info["kind"], Counter())[p.info["fingerprint"]] += 1
    for p in partners.values():
        kind, fp = p.info["kind"], p.info["fingerprint"]
        shared_fp = sorted(by_kind[kind].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        if fp == shared_fp:
            p.slot = slot_id(kind, fp)
        else:
            logger.warning(
                "partner %s (%s) has schema fingerprint %s, not its kind's shared %s: "
                "its feature adapter stays local and is never averaged",
                p.info["name"], kind, fp, shared_fp,
            )  # fmt: skip


def admit(
    grid: Grid,
    nodes: list[int],
    partners: dict[int, Member],
    roster: dict[str, Member],
    refused: dict[int, str],
    config: Callable[..., ConfigRecord],
    timeout: float,
    group: str,
) -> list[Member]:
    """Ask ``nodes`` who they are (``query``) and admit those that answer; returns the admitted.

    A name the roster knows (a partner of the checkpoint, or one that dropped out) keeps its
    slot, epsilon and history, provided its kind and schema are unchanged; a partner that
    refused for its budget or whose reply was rejected stays out. A node whose query fails is
    not asked again in this run.
    """
    admitted: list[Member] = []
    contents = {n: RecordDict({"config": config()}) for n in nodes}
    probe = {n: Member(n, {"name": f"node {n}"}) for n in nodes}
    for stub, reply in exchange(grid, "query", contents, group, timeout, probe):
        node = stub.node_id
        if reply.has_error():
            category, _ = parse_error_reason(reply.error.reason)
            logger.error("node %s cannot join: the partner refused (%s)", node, category)
            if reply.error.code in REFUSALS:  # the partner's own refusal
                refused[node] = category
            continue
        info = dict(reply.content.config_records["info"])
        epsilon = info.pop("epsilon", None)
        name = str(info["name"])
        known = roster.get(name)
        if known is not None:
            if (known.info["kind"], known.info["fingerprint"]) != (info["kind"], info["fingerprint"]):
                logger.error(
                    "partner %s is back with kind %s and schema %s, not %s and %s as before: it stays out "
                    "(its adapter slot and its share of the model belong to the old schema)",
                    name, info["kind"], info["fingerprint"], known.info["kind"], known.info["fingerprint"],
                )  # fmt: skip
                refused[node] = "schema changed"
                continue
            other = partners.get(known.node_id)
            if known.active and other is known and known.node_id != node:
                logger.error("node %s claims the name %s of the active node %s; refused", node, name, known.node_id)
                refused[node] = "name taken"
                continue
            if not known.active and not known.rejoinable and known.dropped_reason:
                logger.warning("partner %s stays out of this run: %s", name, known.dropped_reason)
                refused[node] = known.dropped_reason.split(" (", 1)[0]
                continue
            partners.pop(known.node_id, None)
            known.node_id, known.info = node, info
            known.active, known.rejoinable, known.dropped_reason = True, False, ""
            partner = known
            logger.info("partner %s (node %s) is back in the federation, slot %s", name, node, partner.slot)
        else:
            partner = Member(node, info)
            roster[name] = partner
            logger.info(
                "partner %s: kind %s, %d rows, schema %s, noise %.4g, q %.4g, %d steps/round",
                name, info["kind"], info["rows"], info["fingerprint"],
                info["noise_multiplier"], info["sample_rate"], info["steps_per_round"],
            )  # fmt: skip
        partner.record_epsilon(int(group) if group.isdigit() else 0, reported_number(epsilon))
        if info.get("noise_seeds_known"):
            logger.warning("partner %s: %s", name, KNOWN_SEEDS_LABEL)
        partners[node] = partner
        admitted.append(partner)
    return admitted


def newcomer_slot(partner: Member, roster: dict[str, Member]) -> None:
    """A partner that joins after the slots were formed: it shares its kind's adapter when its
    schema is the kind's shared one (or it is the first of its kind), else keeps it local."""
    kind, fp = partner.info["kind"], partner.info["fingerprint"]
    slots = {p.slot for p in roster.values() if p is not partner and p.info.get("kind") == kind and p.slot}
    mine = slot_id(kind, fp)
    if not slots or mine in slots:
        partner.slot = mine
    else:
        logger.warning(
            "partner %s (%s) has schema fingerprint %s, not its kind's shared %s: its feature adapter stays local",
            partner.info["name"], kind, fp, sorted(slots)[0],
        )  # fmt: skip


def rejoin(
    grid: Grid,
    partners: dict[int, Member],
    roster: dict[str, Member],
    refused: dict[int, str],
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
    rnd: int,
) -> None:
    """Admit partners whose node came (back) online since the last round."""
    online = sorted(grid.get_node_ids())
    waiting = [
        n for n in online
        if n not in refused and (n not in partners or (not partners[n].active and partners[n].rejoinable))
    ]  # fmt: skip
    if not waiting:
        return
    known = set(roster)
    for partner in admit(grid, waiting, partners, roster, refused, config, fed.round_timeout, str(rnd)):
        if partner.info["name"] not in known:
            newcomer_slot(partner, roster)


def refusals(roster: dict[str, Member], refused: dict[int, str]) -> str:
    """``" (partners out: privacy-budget x3)"``: why partners left the run, by category."""
    reasons = Counter(p.dropped_reason.split(" (", 1)[0] for p in roster.values() if p.dropped_reason)
    reasons.update(refused.values())
    if not reasons:
        return ""
    return " (partners out: " + ", ".join(f"{r} x{n}" for r, n in sorted(reasons.items())) + ")"


def names(active: dict[int, Member]) -> list[str]:
    return [str(p.info["name"]) for p in active.values() if p.active]


def reported_number(value: object) -> float | None:
    """A reported number, or None for anything else (a reply is the other side's word)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def ask_status(
    grid: Grid, partners: dict[int, Member], nodes: list[int], timeout: float, rnd: int, *, ended: str | None = None
) -> None:
    """Ask ``nodes`` for their ledger's epsilon (``query.status``, no release, no cost).

    Sent at resume and once more before privacy.json and the model card are written, so both
    carry each reachable partner's final spending (``epsilon_final``); a partner that does not
    answer keeps the last figure it reported, which privacy.json labels a lower bound. With
    ``ended`` (why a run that publishes nothing ended) the message also tells each partner the
    run is over, so its ``partner start`` stops instead of waiting for a final model.
    """
    config: dict[str, Any] = {"round": rnd, **({"run.ended": ended} if ended else {})}
    contents = {n: RecordDict({"config": ConfigRecord(config)}) for n in nodes}
    for p, reply in exchange(grid, "query.status", contents, "status", timeout, partners):
        if reply.has_error():
            category, epsilon = parse_error_reason(reply.error.reason)
            p.record_epsilon(rnd, epsilon)
            logger.warning("partner %s did not report its final epsilon (%s)", p.info["name"], category)
            continue
        epsilon = metrics_of(reply).get("epsilon") if "metrics" in reply.content.metric_records else None
        if epsilon is not None:
            p.record_epsilon(rnd, float(epsilon))
            p.epsilon_final = True
        elif not p.info.get("private", True):
            p.epsilon_final = True


def failed(p: Member, reply: Message, rnd: int) -> None:
    category, epsilon = parse_error_reason(reply.error.reason)
    p.record_epsilon(rnd, epsilon)
    p.active = False
    p.dropped_reason = f"{category} (round {rnd})"
    # The partner's own refusals (budget, bad data, a rolled-back ledger) hold for the run; an
    # error the SuperLink made (node gone, message expired) or a crash may pass: it can rejoin.
    p.rejoinable = reply.error.code not in REFUSALS
    what = "refused" if reply.error.code in REFUSALS else "failed"
    logger.warning(
        "round %d: partner %s %s: %s%s", rnd, p.info["name"], what, category,
        " (it is admitted again when its node is back)" if p.rejoinable else "",
    )  # fmt: skip


def trained(p: Member, reply: Message, rnd: int) -> None:
    metrics = metrics_of(reply)
    p.steps += int(metrics.get("steps", 0))
    p.record_epsilon(rnd, float(metrics["epsilon"]) if "epsilon" in metrics else None)
