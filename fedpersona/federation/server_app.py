"""The Flower ServerApp: rounds of scoped training and evaluation over the Message API.

Per run: a ``query`` message asks every partner for its kind, schema fingerprint, public
row count and noise plan; partners of one kind with the most common fingerprint form a
*slot* and share their adapter, the others keep theirs local (and the log says so). Then, per
round, ``train`` messages carry each partner's view of the global model (trunk + its slot's
adapter), replies are aggregated by :class:`~fedpersona.federation.aggregation.ScopedAggregator`, and
``evaluate`` messages collect the cumulative epsilon (and, where a partner opted in, its
held-out metrics). A partner that replies with an error (e.g. its budget is spent) is logged
and dropped; the run goes on while ``min_partners`` remain.

With ``secure_aggregation = true`` each round's ``train`` exchange becomes the four exchanges
of :mod:`fedpersona.federation.secagg` and the server sees only per-scope sums. A round that loses too
many partners to unmask aborts: the server logs why, stops, and publishes no model of it.

**Checkpoint and resume.** After every aggregation (each training round, each DP k-means
round) and at each later stage the server writes ``RUN_DIR/state/checkpoint.npz``
(:mod:`fedpersona.federation.checkpoint`). With ``resume`` a new run loads it, readmits the partners of
the checkpoint by node id (a node id stands for a registered key), asks any other node who it
is (``query``, which costs no privacy budget; a known name keeps its slot and history) and
continues at the *next* round: a round whose aggregate is in
the checkpoint is never sent again, so no partner trains it twice. A round that was sent but
not aggregated before the crash is sent again on resume; the partner trains it again and its
ledger charges it again (a new release with fresh noise is a new mechanism run; the first
one stays charged although the server never used it).

**Partners that drop out and come back.** A partner whose reply is an error the SuperLink made
(its node stopped sending heartbeats, the message expired) or an unexpected failure is left out
and, once its node is online again, asked ``query`` at the start of a later round and admitted
again with its slot, receiving the current global model. A partner that refused for its budget
or whose reply was rejected stays out for the rest of the run. A partner that trained but whose
reply never arrived within ``round_timeout`` simply is not in that round's aggregate: its ledger
counts the round anyway (it was charged before the first gradient step), and the epsilon the
server reports for it comes from the partner's ledger at its next reply, so it includes that
round; ``steps`` in privacy.json counts only the steps of updates the server received. Each
evaluation row in metrics.jsonl says whether the partner's update is in that round's aggregate
(``aggregated``).

**The final model reaches every partner.** In a deployment (``deliver_model``) the signed
artifact (``weights.npz``, ``card.json``, ``signature.json``) is sent to every connected
partner in a ``query.final_model`` message; the partner verifies it against the federation's
model-signing key it was given and installs it in ``state_dir/model`` (see
:func:`fedpersona.model.artifacts.install_model`). The reply is empty.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpersona.config.files import load_scenario
from fedpersona.config.settings import FederationSettings, ModelSettings, TrainingSettings
from fedpersona.errors import ConfigError, FedPersonaError
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.federation.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    load_checkpoint,
    run_settings,
    save_checkpoint,
    settings_fingerprint,
)
from fedpersona.federation.messages import arrays_of, encode_arrays, encode_settings, metrics_of
from fedpersona.federation.secagg import (
    SecAggParams,
    SecureAggregationError,
    SecureRound,
    as_updates,
    blobs,
    decode_shapes,
    ints,
    modulus_bits_for,
    strict_majority,
)
from fedpersona.model.artifacts import artifact_files, generate_signing_key, save_model
from fedpersona.model.encoder import PersonaTrunk
from fedpersona.personas.clustering import ClusterStats, choose_k, init_prototypes, reduce_prototypes, update_prototypes
from fedpersona.privacy.manifest import REFUSALS, parse_error_reason
from fedpersona.privacy.randomness import KNOWN_SEEDS_LABEL

__all__ = ["NothingTrained", "ServerSettings", "app", "build_server_app", "run_federation"]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class ServerSettings:
    """Everything the coordinator needs for one run."""

    federation: FederationSettings
    model: ModelSettings
    training: TrainingSettings
    run_dir: str
    expected_partners: int | None = None
    wait_timeout: float = 120.0
    resume: bool = False  # continue from RUN_DIR/state/checkpoint.npz
    deliver_model: bool = False  # send the signed final model to every partner (deployments)


@dataclass
class _Partner:
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
    def from_dict(cls, data: dict[str, Any]) -> _Partner:
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


@dataclass
class FederationResult:
    rounds_completed: int
    partners: dict[str, dict[str, Any]] = field(default_factory=dict)
    aborted: str = ""  # why a securely aggregated round aborted, if one did
    resumed_after: int | None = None  # the last round of the checkpoint a resumed run started from
    rounds_run: list[int] = field(default_factory=list)  # training rounds this run aggregated
    delivered: list[str] = field(default_factory=list)  # partners that installed the final model


def _model_messages(
    aggregator: ScopedAggregator,
    active: dict[int, _Partner],
    config: Callable[..., ConfigRecord],
    rnd: int,
    *,
    prototypes: np.ndarray | None = None,
) -> dict[int, RecordDict]:
    """Each active partner's view of the global model (trunk + its slot's adapter), the
    round's config and, for the persona phases, the current prototypes."""
    contents = {}
    for n, p in active.items():
        record = RecordDict(
            {
                "arrays": encode_arrays(aggregator.arrays_for(p.slot)),
                "config": config(round=rnd, adapter_shared=p.slot is not None),
            }
        )
        if prototypes is not None:
            record["prototypes"] = encode_arrays({"centres": prototypes.astype(np.float32)})
        contents[n] = record
    return contents


def _exchange(
    grid: Grid,
    kind: str,
    contents: dict[int, RecordDict],
    group: str,
    timeout: float,
    partners: dict[int, _Partner],
) -> list[tuple[_Partner, Message]]:
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


def _wait_for_nodes(grid: Grid, want: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def _messages(grid: Grid, kind: str, contents: dict[int, RecordDict], group: str) -> list[Message]:
    return [Message(content, dst_node_id=node, message_type=kind, group_id=group) for node, content in contents.items()]


def _assign_slots(partners: dict[int, _Partner]) -> None:
    by_kind: dict[str, Counter[str]] = {}
    for p in partners.values():
        by_kind.setdefault(p.info["kind"], Counter())[p.info["fingerprint"]] += 1
    for p in partners.values():
        kind, fp = p.info["kind"], p.info["fingerprint"]
        shared_fp = sorted(by_kind[kind].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        if fp == shared_fp:
            p.slot = f"{kind}:{fp}"
        else:
            logger.warning(
                "partner %s (%s) has schema fingerprint %s, not its kind's shared %s: "
                "its feature adapter stays local and is never averaged",
                p.info["name"], kind, fp, shared_fp,
            )  # fmt: skip


def _initial_trunk(model: ModelSettings, seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    trunk = PersonaTrunk(model)
    return {f"trunk.{k}": v.detach().cpu().numpy() for k, v in trunk.state_dict().items()}


def _resume_point(run_dir: Path, settings: ServerSettings) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (validated), or None to start at round 1."""
    path = run_dir / CHECKPOINT
    if not settings.resume:
        if path.exists():
            raise ConfigError(
                f"{run_dir} holds the checkpoint of an earlier run ({path}); resume it "
                "(fedpersona server start --resume) or choose another run folder"
            )
        return None
    checkpoint = load_checkpoint(run_dir, settings=(settings.federation, settings.model, settings.training))
    if checkpoint is None:
        logger.warning("resume: %s has no checkpoint (no round was aggregated); starting at round 1", run_dir)
    return checkpoint


def _admit(
    grid: Grid,
    nodes: list[int],
    partners: dict[int, _Partner],
    roster: dict[str, _Partner],
    refused: dict[int, str],
    config: Callable[..., ConfigRecord],
    timeout: float,
    group: str,
) -> list[_Partner]:
    """Ask ``nodes`` who they are (``query``) and admit those that answer; returns the admitted.

    A name the roster knows (a partner of the checkpoint, or one that dropped out) keeps its
    slot, epsilon and history, provided its kind and schema are unchanged; a partner that
    refused for its budget or whose reply was rejected stays out. A node whose query fails is
    not asked again in this run.
    """
    admitted: list[_Partner] = []
    contents = {n: RecordDict({"config": config()}) for n in nodes}
    probe = {n: _Partner(n, {"name": f"node {n}"}) for n in nodes}
    for stub, reply in _exchange(grid, "query", contents, group, timeout, probe):
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
            partner = _Partner(node, info)
            roster[name] = partner
            logger.info(
                "partner %s: kind %s, %d rows, schema %s, noise %.4g, q %.4g, %d steps/round",
                name, info["kind"], info["rows"], info["fingerprint"],
                info["noise_multiplier"], info["sample_rate"], info["steps_per_round"],
            )  # fmt: skip
        partner.record_epsilon(int(group) if group.isdigit() else 0, _number(epsilon))
        if info.get("noise_seeds_known"):
            logger.warning("partner %s: %s", name, KNOWN_SEEDS_LABEL)
        partners[node] = partner
        admitted.append(partner)
    return admitted


def _newcomer_slot(partner: _Partner, roster: dict[str, _Partner]) -> None:
    """A partner that joins after the slots were formed: it shares its kind's adapter when its
    schema is the kind's shared one (or it is the first of its kind), else keeps it local."""
    kind, fp = partner.info["kind"], partner.info["fingerprint"]
    slots = {p.slot for p in roster.values() if p is not partner and p.info.get("kind") == kind and p.slot}
    mine = f"{kind}:{fp}"
    if not slots or mine in slots:
        partner.slot = mine
    else:
        logger.warning(
            "partner %s (%s) has schema fingerprint %s, not its kind's shared %s: its feature adapter stays local",
            partner.info["name"], kind, fp, sorted(slots)[0],
        )  # fmt: skip


def _rejoin(
    grid: Grid,
    partners: dict[int, _Partner],
    roster: dict[str, _Partner],
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
    for partner in _admit(grid, waiting, partners, roster, refused, config, fed.round_timeout, str(rnd)):
        if partner.info["name"] not in known:
            _newcomer_slot(partner, roster)


def run_federation(grid: Grid, settings: ServerSettings, *, on_round: RoundCallback | None = None) -> FederationResult:
    """Run (or, with ``settings.resume``, continue) the federation; writes metrics.jsonl,
    privacy.json, model/ and state/checkpoint.npz in run_dir."""
    fed = settings.federation
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = _resume_point(run_dir, settings)
    want = settings.expected_partners or fed.min_partners
    nodes = _wait_for_nodes(grid, want, settings.wait_timeout)
    if len(nodes) < fed.min_partners:
        raise ConfigError(
            f"only {len(nodes)} partner(s) connected within {settings.wait_timeout:.0f}s; "
            f"federation.min_partners is {fed.min_partners}"
        )

    clustering = fed.personas > 0
    kmeans_rounds = fed.kmeans_releases  # what each partner plans its reserve for

    def config(**extra: Any) -> ConfigRecord:
        return encode_settings(
            settings.model, settings.training, num_rounds=fed.rounds, seed=fed.seed,
            kmeans_rounds=kmeans_rounds, kmeans_noise=float(fed.kmeans_noise), **extra,
        )  # fmt: skip

    aggregator = ScopedAggregator(
        optimizer=fed.server_optimizer,
        lr=fed.server_lr,
        global_weighting=fed.global_weighting,
        robust=fed.robust_aggregation,
        trim_fraction=fed.trim_fraction,
        max_update_norm=fed.max_update_norm,
    )
    roster: dict[str, _Partner] = {}  # every partner of the federation, by name
    resumed_after: int | None = None
    if checkpoint is None:
        checkpoint = Checkpoint(
            fingerprint=settings_fingerprint(fed, settings.model, settings.training),
            settings=run_settings(fed, settings.model, settings.training),
        )
        aggregator.trunk = _initial_trunk(settings.model, fed.seed)
    else:
        try:
            aggregator.set_state(checkpoint.arrays)
            roster = {name: _Partner.from_dict(data) for name, data in checkpoint.partners.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{run_dir / CHECKPOINT} is damaged and cannot be resumed ({exc}); move it away to start at round 1"
            ) from None
        for p in roster.values():
            p.active = False  # until it answers this run's query
        resumed_after = checkpoint.round
        logger.info(
            "resuming %s from its checkpoint: stage %s, %d round(s) aggregated, %d partner(s)",
            run_dir, checkpoint.stage, checkpoint.round, len(roster),
        )  # fmt: skip
    partners: dict[int, _Partner] = {}  # the partners connected to this run, by node id
    refused: dict[int, str] = {}  # node -> why it stays out of this run
    fresh = not roster
    known = set(roster)
    # Resuming: a node id is a registered key, so a node of the checkpoint is that partner; it
    # is readmitted (or kept out) as the checkpoint says, without a query. Others are asked.
    by_node = {p.node_id: p for p in roster.values()}
    for node in [n for n in nodes if n in by_node]:
        p = by_node[node]
        p.active = p.rejoinable or not p.dropped_reason
        if p.active:
            p.rejoinable, p.dropped_reason = False, ""
        partners[node] = p
    if partners:  # their epsilon as their ledgers hold it now, not as the checkpoint says
        _status(grid, partners, list(partners), fed.round_timeout, checkpoint.round)
    unknown = [n for n in nodes if n not in by_node]
    admitted = _admit(grid, unknown, partners, roster, refused, config, fed.round_timeout, "0") if unknown else []
    if fresh:
        _assign_slots(partners)
    else:
        for p in admitted:
            if p.info["name"] not in known:
                _newcomer_slot(p, roster)

    def save(**changes: Any) -> None:
        for key, value in changes.items():
            setattr(checkpoint, key, value)
        checkpoint.arrays = aggregator.get_state()
        checkpoint.partners = {name: p.to_dict() for name, p in roster.items()}
        save_checkpoint(run_dir, checkpoint)

    metrics_path = run_dir / "metrics.jsonl"

    def evaluate(rnd: int, used: set[str]) -> None:
        rows = _evaluate(grid, aggregator, partners, rnd, config, used)
        with metrics_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        save(evaluated=True)
        if on_round is not None:
            on_round(rnd, rows)

    def due(rnd: int) -> bool:
        """Evaluation costs every partner a message: every ``evaluate_every``-th round and the last."""
        return rnd == fed.rounds or rnd % fed.evaluate_every == 0

    completed = checkpoint.round
    rounds_run: list[int] = []
    aborted = ""
    stopped = ""  # why the training rounds stopped early, if they did
    if checkpoint.stage == "train" and completed and not checkpoint.evaluated and due(completed):
        evaluate(completed, set(checkpoint.extra.get("aggregated", [])))  # the crash came before it
    first = completed + 1 if checkpoint.stage == "train" else fed.rounds + 1
    for rnd in range(first, fed.rounds + 1):
        if rnd > first:
            _rejoin(grid, partners, roster, refused, config, fed, rnd)
        active = {n: p for n, p in partners.items() if p.active}
        if len(active) < fed.min_partners:
            stopped = (
                f"round {rnd} not started: {len(active)} partner(s) left, federation.min_partners is "
                f"{fed.min_partners}{_refusals(roster, refused)}"
            )
            logger.error("%s", stopped)
            break
        if fed.secure_aggregation:
            try:
                updates = _train_secure(grid, aggregator, partners, active, rnd, config, fed)
            except SecureAggregationError as exc:
                aborted = str(exc)
                logger.error("round %d: %s; stopping", rnd, aborted)
                break
        else:
            updates = _train_plain(grid, aggregator, partners, active, rnd, config, fed)
        if not updates:
            stopped = f"round {rnd}: no partner replied{_refusals(roster, refused)}"
            logger.error("%s; stopping", stopped)
            break
        aggregator.aggregate(updates)
        # With secure aggregation the sums name no partner: those still in the round are in them.
        used = {u.partner for u in updates} if not fed.secure_aggregation else set(_names(active))
        completed = rnd
        rounds_run.append(rnd)
        save(stage="train", round=rnd, evaluated=False, extra={**checkpoint.extra, "aggregated": sorted(used)})
        if due(rnd):
            evaluate(rnd, used)
    personas: dict[str, Any] | None = checkpoint.personas
    if clustering and completed and checkpoint.stage in ("train", "kmeans"):
        personas = _cluster_personas(
            grid, aggregator, partners, fed, config, settings.model.embed_dim, checkpoint=checkpoint, save=save
        )
        if personas is not None:
            save(stage="clustered", personas=personas)
    if checkpoint.stage != "done":
        if personas is not None:
            rows = _persona_metrics(grid, aggregator, partners, personas, completed, config)
            with metrics_path.open("a", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
            tmp = run_dir / "personas.json.tmp"
            tmp.write_text(json.dumps({k: v for k, v in personas.items() if k != "centres"}, indent=2))
            tmp.replace(run_dir / "personas.json")
        online = set(grid.get_node_ids())
        reachable = [
            n for n, p in partners.items() if n in online and not p.dropped_reason.startswith("reply rejected")
        ]
        if reachable:
            _status(grid, partners, reachable, fed.round_timeout, completed)
        _write_privacy(run_dir, roster)
        if not completed:
            # A run that trained nothing publishes nothing: an empty model would replace a good
            # one wherever it is installed.
            reason = aborted or stopped or "no training round completed"
            _write_outcome(run_dir, status="failed", reason=reason, rounds=0, personas=False)
            logger.error("no round completed (%s); nothing is published", reason)
            raise NothingTrained(f"the federation trained nothing, so no model was published: {reason}")
        _publish(run_dir, aggregator, roster, settings, completed, personas)
        save(stage="done")
        _write_outcome(run_dir, status="completed", reason=stopped, rounds=completed, personas=personas is not None)
    delivered: list[str] = []
    if settings.deliver_model and (run_dir / "model" / "signature.json").exists():
        _rejoin(grid, partners, roster, refused, config, fed, completed)
        delivered = _deliver_model(grid, partners, run_dir / "model", fed.round_timeout, completed)
    return FederationResult(
        rounds_completed=completed,
        partners={name: p.info for name, p in roster.items()},
        aborted=aborted,
        resumed_after=resumed_after,
        rounds_run=rounds_run,
        delivered=delivered,
    )


class NothingTrained(FedPersonaError):
    """A federation ended without aggregating a single training round: nothing is published."""

    category = "error"


def _refusals(roster: dict[str, _Partner], refused: dict[int, str]) -> str:
    """``" (partners out: privacy-budget x3)"``: why partners left the run, by category."""
    reasons = Counter(p.dropped_reason.split(" (", 1)[0] for p in roster.values() if p.dropped_reason)
    reasons.update(refused.values())
    if not reasons:
        return ""
    return " (partners out: " + ", ".join(f"{r} x{n}" for r, n in sorted(reasons.items())) + ")"


def _write_outcome(run_dir: Path, *, status: str, reason: str, rounds: int, personas: bool) -> None:
    """``RUN_DIR/run.json``: how the run ended (``completed`` or ``failed``) and why."""
    body = {"status": status, "reason": reason, "rounds_completed": rounds, "personas": personas}
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(run_dir / "run.json")


def _names(active: dict[int, _Partner]) -> list[str]:
    return [str(p.info["name"]) for p in active.values() if p.active]


def _deliver_model(grid: Grid, partners: dict[int, _Partner], folder: Path, timeout: float, rnd: int) -> list[str]:
    """Send the signed final model to every connected partner (whose replies were never
    rejected); each verifies it against the federation's key and installs it locally."""
    files = ConfigRecord(artifact_files(folder))  # type: ignore[arg-type]
    online = set(grid.get_node_ids())
    targets = {
        n: RecordDict({"artifact": files, "config": ConfigRecord({"round": rnd})})
        for n, p in partners.items()
        if n in online and not p.dropped_reason.startswith("reply rejected")
    }
    delivered = []
    for p, reply in _exchange(grid, "query.final_model", targets, "final", timeout, partners):
        if reply.has_error():
            category, epsilon = parse_error_reason(reply.error.reason)
            p.record_epsilon(rnd, epsilon)
            logger.warning("partner %s did not install the final model (%s)", p.info["name"], category)
        else:
            delivered.append(str(p.info["name"]))
    logger.info("final model installed at %d of %d partner(s): %s", len(delivered), len(targets), sorted(delivered))
    return sorted(delivered)


def _number(value: object) -> float | None:
    """A reported number, or None for anything else (a reply is the other side's word)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _status(grid: Grid, partners: dict[int, _Partner], nodes: list[int], timeout: float, rnd: int) -> None:
    """Ask ``nodes`` for their ledger's epsilon (``query.status``, no release, no cost).

    Sent at resume and once more before privacy.json and the model card are written, so both
    carry each reachable partner's final spending (``epsilon_final``); a partner that does not
    answer keeps the last figure it reported, which privacy.json labels a lower bound.
    """
    contents = {n: RecordDict({"config": ConfigRecord({"round": rnd})}) for n in nodes}
    for p, reply in _exchange(grid, "query.status", contents, "status", timeout, partners):
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


def _failed(p: _Partner, reply: Message, rnd: int) -> None:
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


def _trained(p: _Partner, reply: Message, rnd: int) -> None:
    metrics = metrics_of(reply)
    p.steps += int(metrics.get("steps", 0))
    p.record_epsilon(rnd, float(metrics["epsilon"]) if "epsilon" in metrics else None)


def _train_plain(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    active: dict[int, _Partner],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
) -> list[PartnerUpdate]:
    contents = _model_messages(aggregator, active, config, rnd)
    received: list[tuple[_Partner, PartnerUpdate]] = []
    for p, reply in _exchange(grid, "train", contents, str(rnd), fed.round_timeout, partners):
        if reply.has_error():
            _failed(p, reply, rnd)
            continue
        missing = [
            name
            for name, records in (("arrays", reply.content.array_records), ("metrics", reply.content.metric_records))
            if name not in list(records.keys())
        ]
        if missing:
            # A malformed reply drops its sender, never the federation.
            p.active = False
            p.dropped_reason = f"reply rejected: no '{', '.join(missing)}' record"
            logger.warning("round %d: rejected the reply of %s: %s", rnd, p.info["name"], p.dropped_reason)
            continue
        _trained(p, reply, rnd)
        received.append(
            (
                p,
                PartnerUpdate(
                    partner=p.info["name"],
                    slot=p.slot,
                    arrays=arrays_of(reply),
                    num_examples=int(p.info["rows"]),
                    kind=str(p.info["kind"]),
                ),
            )
        )
    # Screened together: a slot's first replies are checked against each other.
    updates: list[PartnerUpdate] = []
    for (p, update), problems in zip(received, aggregator.screen_round([u for _, u in received]), strict=True):
        if problems:
            # A broken or hostile reply never reaches the global model; its sender is dropped.
            p.active = False
            p.dropped_reason = "reply rejected: " + "; ".join(problems)
            logger.warning("round %d: rejected the reply of %s: %s", rnd, p.info["name"], "; ".join(problems))
            continue
        updates.append(update)
    return updates


def _integer_trunk_weights(aggregator: ScopedAggregator, active: dict[int, _Partner]) -> dict[int, int]:
    """Each partner's trunk weight as an integer (the masked sum is modular arithmetic).

    ``examples`` weighting is exact (the example counts); ``kind_balanced`` weights
    ``n_i / N_kind`` are scaled by 10,000 and rounded, a relative error below 1e-4 per kind.
    Both come from public counts and kinds only.
    """
    updates = [
        PartnerUpdate(str(n), p.slot, {}, int(p.info["rows"]), kind=str(p.info["kind"])) for n, p in active.items()
    ]
    if aggregator.global_weighting == "examples":
        return {n: int(p.info["rows"]) for n, p in active.items()}
    weights = aggregator.global_weights(updates)
    return {n: max(1, round(weights[str(n)] * 10_000)) for n in active}


def _secure_sum(
    grid: Grid,
    partners: dict[int, _Partner],
    active: dict[int, _Partner],
    rnd: int,
    settings: Callable[..., ConfigRecord],
    fed: FederationSettings,
    *,
    purpose: str,
    members: dict[int, str | None],
    global_shapes: dict[str, tuple[int, ...]],
    weights: dict[int, int],
    clipping_range: float,
    quantization_range: int,
    stage: str,
    payload: Callable[[int], dict[str, Any]],
    largest_sum: int,
    setup_extra: dict[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], SecureRound]:
    """One SecAgg+ exchange of :mod:`fedpersona.federation.secagg`: setup, share keys, ``stage`` (the
    partners' masked vectors), unmask; returns the per-scope weighted means. Raises
    SecureAggregationError to abort.

    The threshold is ``federation.secagg_threshold`` or, by default, a strict majority of the
    round's partners (partners refuse anything less). ``largest_sum`` bounds any segment's
    summed weight (it sizes the modulus).
    """
    threshold = fed.secagg_threshold or strict_majority(len(active))
    params = SecAggParams(
        threshold=max(2, threshold),
        clipping_range=float(clipping_range),
        quantization_range=quantization_range,
        modulus_bits=modulus_bits_for(max(1, largest_sum), quantization_range),
    )
    sec = SecureRound(server_round=rnd, params=params, members=members, trunk_shapes=global_shapes)

    def exchange(kind: str, contents: dict[int, RecordDict], accept: Callable[[int, RecordDict], None]) -> None:
        """Send one stage; hand each good reply to ``accept``, which may reject that partner."""
        for p, reply in _exchange(grid, kind, contents, str(rnd), fed.round_timeout, partners):
            if reply.has_error():
                _failed(p, reply, rnd)
                continue
            if kind == "train.secagg":
                _trained(p, reply, rnd)
            elif "metrics" in reply.content.metric_records:
                p.record_epsilon(rnd, _number(reply.content.metric_records["metrics"].get("epsilon")))
            try:
                accept(p.node_id, reply.content)
            except (SecureAggregationError, KeyError, TypeError, ValueError) as exc:
                logger.warning("round %d: partner %s left out at %s: %s", rnd, p.info["name"], kind, exc)

    def keys(n: int, content: RecordDict) -> None:
        record = content.config_records["secagg"]
        mask_key, share_key = blobs([record["mask_key"], record["share_key"]], "public keys")
        sec.add_keys(n, mask_key, share_key, decode_shapes(content.config_records["shapes"]))

    def ciphertexts(n: int, content: RecordDict) -> None:
        record = content.config_records["secagg"]
        sec.add_ciphertexts(
            n, ints(record["destinations"], "destinations"), blobs(record["ciphertexts"], "ciphertexts")
        )

    def masked(n: int, content: RecordDict) -> None:
        sec.add_masked(n, content.array_records["masked"]["vector"].numpy())

    def shares(n: int, content: RecordDict) -> None:
        record = content.config_records["secagg"]
        owners, values = ints(record["owners"], "owners"), blobs(record["shares"], "shares")
        sec.add_shares(n, dict(zip(owners, values, strict=True)))

    setup = {"secagg.purpose": purpose, **(setup_extra or {})}
    exchange(
        "query.secagg_setup",
        {n: RecordDict({"config": settings(n, **sec.setup_config(n), **setup)}) for n in active},
        keys,
    )
    bundle = ConfigRecord(sec.key_bundle())  # type: ignore[arg-type]
    exchange(
        "query.secagg_share_keys",
        {n: RecordDict({"config": settings(n), "keys": bundle}) for n in sec.joined},
        ciphertexts,
    )
    sec.start_masking()
    contents: dict[int, RecordDict] = {}
    for n in sec.sharers:
        sources, relayed = sec.forwarded(n)
        extra = payload(n)
        config_extra = {**sec.placement(n).to_config(), "secagg.trunk_weight": weights[n], **extra.pop("config", {})}
        contents[n] = RecordDict(
            {
                **extra,
                "config": settings(n, **config_extra),
                "shares": ConfigRecord({"sources": sources, "ciphertexts": relayed}),  # type: ignore[dict-item]
            }
        )
    exchange(stage, contents, masked)
    survivors, dropped = sec.unmask_request()
    if dropped:
        logger.warning("round %d: %d partner(s) dropped after sharing keys; unmasking without them", rnd, len(dropped))
    request: dict[str, Any] = {"secagg.survivors": survivors, **({"secagg.dropped": dropped} if dropped else {})}
    exchange(
        "query.secagg_unmask",
        {sec.node[i]: RecordDict({"config": settings(sec.node[i], **request)}) for i in survivors},
        shares,
    )
    trunk, adapters = sec.result()
    return trunk, adapters, sec


def _train_secure(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    active: dict[int, _Partner],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
) -> list[PartnerUpdate]:
    """One securely aggregated training round; raises SecureAggregationError to abort it."""
    trunk_weight = _integer_trunk_weights(aggregator, active)
    total_rows = sum(int(p.info["rows"]) for p in active.values())

    def settings(n: int, **extra: Any) -> ConfigRecord:
        return config(round=rnd, adapter_shared=active[n].slot is not None, **extra)

    trunk, adapters, _ = _secure_sum(
        grid, partners, active, rnd, settings, fed,
        purpose="model",
        members={n: p.slot for n, p in active.items()},
        global_shapes={k: tuple(v.shape) for k, v in aggregator.trunk.items()},
        weights=trunk_weight,
        largest_sum=max(total_rows, sum(trunk_weight.values())),
        clipping_range=float(fed.secagg_clipping_range),
        quantization_range=fed.secagg_quantization_range,
        stage="train.secagg",
        payload=lambda n: {"arrays": encode_arrays(aggregator.arrays_for(active[n].slot))},
    )  # fmt: skip
    return as_updates(trunk, adapters)


KMEANS_QUANTIZATION = 2**20  # levels of a securely summed k-means statistic


def _kmeans_secure(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    active: dict[int, _Partner],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
    prototypes: np.ndarray,
) -> tuple[list[ClusterStats], dict[str, np.ndarray], int]:
    """One DP k-means round whose statistics the server sees only as sums: over every partner
    (sums and counts) and per silo kind (counts, for the persona shares per kind).

    Each partner adds its own Gaussian noise (charged to its ledger), so the securely summed
    statistics carry the noise of every contributor: the result is one :class:`ClusterStats`
    whose ``noise_std`` is ``sqrt(P) * kmeans_noise * sqrt(2)`` for ``P`` contributors.
    Values are clipped to +-``4 * max(public_rows) + 100 * kmeans_noise`` (public numbers)
    before quantization.
    """
    k, dim = prototypes.shape
    largest = max(int(p.info["rows"]) for p in active.values())
    clip = 4.0 * largest + 100.0 * float(fed.kmeans_noise)

    def settings(n: int, **extra: Any) -> ConfigRecord:
        return config(round=rnd, adapter_shared=active[n].slot is not None, **extra)

    total, by_kind, sec = _secure_sum(
        grid, partners, active, rnd, settings, fed,
        purpose="kmeans",
        members={n: str(p.info["kind"]) for n, p in active.items()},
        global_shapes={"kmeans_total.counts": (k,), "kmeans_total.sums": (k, dim)},
        weights=dict.fromkeys(active, 1),
        largest_sum=len(active),
        clipping_range=clip,
        quantization_range=KMEANS_QUANTIZATION,
        stage="query.kmeans_secagg",
        payload=lambda n: {
            "arrays": encode_arrays(aggregator.arrays_for(active[n].slot)),
            "prototypes": encode_arrays({"centres": prototypes.astype(np.float32)}),
        },
        setup_extra={"secagg.k": int(k), "secagg.dim": int(dim)},
    )  # fmt: skip
    survivors = [sec.node[i] for i in sec.survivors]
    contributors = len(survivors)
    kinds = Counter(str(partners[n].info["kind"]) for n in survivors)
    sums = total["kmeans_total.sums"].astype(np.float64) * contributors
    counts = total["kmeans_total.counts"].astype(np.float64) * contributors
    std = math.sqrt(contributors) * float(fed.kmeans_noise) * math.sqrt(2.0)
    kind_counts = {
        kind: values["kmeans_kind.counts"].astype(np.float64) * kinds[kind] for kind, values in by_kind.items()
    }
    return [ClusterStats(sums=sums, counts=counts, noise_std=std)], kind_counts, contributors


def _kmeans_plain(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    active: dict[int, _Partner],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
    prototypes: np.ndarray,
) -> tuple[list[ClusterStats], dict[str, np.ndarray], int]:
    """One DP k-means round with each partner's noisy statistics sent as they are."""
    contents = _model_messages(aggregator, active, config, rnd, prototypes=prototypes)
    stats: list[ClusterStats] = []
    kind_counts: dict[str, np.ndarray] = {}
    for p, reply in _exchange(grid, "query.kmeans", contents, str(rnd), fed.round_timeout, partners):
        if reply.has_error():
            _failed(p, reply, rnd)
            continue
        released = reply.content.array_records["stats"]
        metrics = metrics_of(reply)
        if "epsilon" in metrics:
            p.record_epsilon(rnd, float(metrics["epsilon"]))
        one = ClusterStats(
            sums=released["sums"].numpy().astype(np.float64),
            counts=released["counts"].numpy().astype(np.float64),
            noise_std=float(metrics.get("noise_std", 0.0)),
        )
        stats.append(one)
        kind = str(p.info["kind"])
        kind_counts[kind] = kind_counts.get(kind, np.zeros(one.k)) + one.counts
    return stats, kind_counts, len(stats)


def _evaluate(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    rnd: int,
    config: Callable[..., ConfigRecord],
    used: set[str],
) -> list[dict[str, Any]]:
    active = {n: p for n, p in partners.items() if p.active}
    contents = _model_messages(aggregator, active, config, rnd)
    rows = []
    for p, reply in _exchange(grid, "evaluate", contents, str(rnd), 3600, partners):
        row: dict[str, Any] = {
            "round": rnd,
            "partner": p.info["name"],
            "kind": p.info["kind"],
            "rows": p.info["rows"],
            "epsilon": p.epsilon,
            "private": bool(p.info["private"]),
            "aggregated": p.info["name"] in used,
        }
        if reply.has_error():
            category, epsilon = parse_error_reason(reply.error.reason)
            p.record_epsilon(rnd, epsilon)
            row["epsilon"] = p.epsilon
            logger.warning("round %d: evaluation at %s failed (%s)", rnd, p.info["name"], category)
        else:
            metrics = metrics_of(reply)
            if "epsilon" in metrics:
                p.record_epsilon(rnd, float(metrics.pop("epsilon")))
                row["epsilon"] = p.epsilon
            row.update({k: float(v) for k, v in metrics.items()})
        rows.append(row)
    rows.sort(key=lambda r: r["partner"])
    return rows


def _write_privacy(run_dir: Path, roster: dict[str, _Partner]) -> None:
    """privacy.json: each partner's epsilon as its ledger last reported it (rounds whose reply
    never arrived included), its plan, the steps of the updates the server received, and the
    epsilon after each round it reported (``epsilon_history``)."""
    out: dict[str, Any] = {}
    for p in sorted(roster.values(), key=lambda p: p.info["name"]):
        info = p.info
        private = bool(info["private"])
        entry: dict[str, Any] = {
            "kind": info["kind"],
            "epsilon": p.epsilon if private else None,
            "delta": info["delta"],
            "target_epsilon": info["target_epsilon"] if private else math.inf,
            "noise_multiplier": info["noise_multiplier"] if private else 0.0,
            "sample_rate": info["sample_rate"],
            "steps": p.steps,
            "accountant": info["accountant"],
            "max_grad_norm": info["max_grad_norm"],
        }
        if not private:
            entry["private"] = False
            entry["target_epsilon"] = None
        if p.dropped_reason:
            entry["dropped"] = p.dropped_reason
        if private and not p.epsilon_final:
            # The partner did not answer the end-of-run status query: its ledger may hold more
            # than the last figure it reported.
            entry["epsilon_is_lower_bound"] = True
        if info.get("noise_seeds_known"):
            entry["noise_seeds_known"] = True
            entry["warning"] = KNOWN_SEEDS_LABEL
        if private:
            entry["epsilon_history"] = p.history
        out[info["name"]] = entry
    tmp = run_dir / "privacy.json.tmp"
    tmp.write_text(json.dumps({"partners": out}, indent=2))
    tmp.replace(run_dir / "privacy.json")


def _summarise(prototypes: np.ndarray, stats: list[ClusterStats], k: int, rng: np.random.Generator) -> np.ndarray:
    """The ``3 x K`` oversampled prototypes summarised into ``k`` (post-processing)."""
    try:
        return reduce_prototypes(stats, k=k, generator=rng)
    except ValueError as exc:
        # Too few prototypes rose above the noise floor to summarise them: keep the k with
        # the largest noisy counts (post-processing of the same releases).
        logger.warning("persona clustering: %s; keeping the %d largest prototypes", exc, k)
        updated = update_prototypes(prototypes, stats, reseed=rng)
        counts = np.sum([s.counts for s in stats], axis=0)
        return updated[np.argsort(-counts, kind="stable")[:k]]


def _cluster_personas(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    fed: FederationSettings,
    config: Callable[..., ConfigRecord],
    dim: int,
    *,
    checkpoint: Checkpoint | None = None,
    save: Callable[..., None] | None = None,
) -> dict[str, Any] | None:
    """Federated DP k-means on the partners' embeddings (see :mod:`fedpersona.personas.clustering`).

    Each round every active partner releases noisy per-prototype sums and counts (charged to
    its ledger first); the server only ever combines noisy releases. Schedule: half the rounds
    with ``3 x K`` prototypes, a server-side reduction to ``K``, then the rest with ``K``.
    The persona shares per kind come from the last round's noisy counts (post-processing).

    After each round but the last, ``save`` checkpoints the prototypes and the generator; a
    resumed run continues with the round after ``checkpoint.kmeans_done``.
    """
    rng = np.random.default_rng([fed.seed, 7])
    candidates = list(fed.persona_candidates)
    k = max(candidates) if candidates else fed.personas
    summary = fed.kmeans_rounds // 2
    # One step per release: Lloyd rounds, and after the summary one round per candidate K.
    schedule = ["lloyd"] * summary + ["select"] * len(candidates) + ["lloyd"] * (fed.kmeans_rounds - summary)
    prototypes = init_prototypes(3 * k if summary else k, dim, generator=rng)
    choice: dict[str, Any] | None = None
    options: list[np.ndarray] = []
    if candidates and not summary:
        options = [init_prototypes(c, dim, generator=rng) for c in candidates]
    selected: dict[int, list[ClusterStats]] = {}
    start = 0
    if checkpoint is not None and checkpoint.stage == "kmeans" and checkpoint.prototypes is not None:
        prototypes, start = np.asarray(checkpoint.prototypes, dtype=np.float64), checkpoint.kmeans_done
        if checkpoint.kmeans_rng is not None:
            rng.bit_generator.state = checkpoint.kmeans_rng
        choice = checkpoint.extra.get("k_choice")
        logger.info("persona clustering resumes after round %d of %d", start, len(schedule))
    stats: dict[int, ClusterStats] = {}
    kind_counts: dict[str, np.ndarray] = {}
    for r in range(start, len(schedule)):
        rnd = fed.rounds + 1 + r
        step = schedule[r]
        selecting = step == "select"
        if selecting:
            prototypes = options[r - summary]
        active = {n: p for n, p in partners.items() if p.active}
        one_round = _kmeans_secure if fed.secure_aggregation else _kmeans_plain
        try:
            released, kind_counts, contributors = one_round(
                grid, aggregator, partners, active, rnd, config, fed, prototypes
            )
        except SecureAggregationError as exc:
            logger.error("persona clustering stopped in round %d: %s", rnd, exc)
            return None
        if contributors < fed.min_partners:
            logger.error("persona clustering stopped: %d partner(s) replied in round %d", contributors, rnd)
            return None
        stats = dict(enumerate(released))
        if selecting:
            selected[len(prototypes)] = list(stats.values())
            if len(selected) == len(candidates):
                picked = choose_k(selected)
                best = candidates.index(picked.k)
                # The winner's own round is one more Lloyd step for it (post-processing).
                prototypes = update_prototypes(options[best], selected[picked.k], reseed=rng)
                choice = {
                    "k": picked.k,
                    "scores": {str(c): picked.scores[c] for c in candidates},
                    "criterion": "cosine Calinski-Harabasz on the noisy statistics (fedpersona.personas.clustering.choose_k)",
                }
                logger.info("personas: K = %d chosen among %s", picked.k, candidates)
        elif r == summary - 1:
            sizes = candidates or [k]
            options = [_summarise(prototypes, list(stats.values()), c, rng) for c in sizes]
            prototypes = options[-1]
        else:
            prototypes = update_prototypes(prototypes, list(stats.values()), reseed=rng)
        # Saved after each Lloyd round but the last; not between the candidate rounds (a
        # resume from before them sends them again, and the partners' ledgers charge them again).
        if (
            save is not None
            and r + 1 < len(schedule)
            and not (candidates and summary - 1 <= r < summary + len(candidates) - 1)
        ):
            extra = {**checkpoint.extra, "k_choice": choice} if checkpoint is not None else {"k_choice": choice}
            save(
                stage="kmeans",
                kmeans_done=r + 1,
                prototypes=prototypes,
                kmeans_rng=rng.bit_generator.state,
                extra=extra,
            )
    shares = {kind: list(np.maximum(counts, 0.0)) for kind, counts in kind_counts.items()}
    by_kind = {kind: [c / max(1e-9, sum(v)) for c in v] for kind, v in shares.items()}
    present = {kind: [i for i, s in enumerate(v) if s >= 0.02] for kind, v in by_kind.items()}
    logger.info("personas: %d prototypes after %d DP k-means rounds", len(prototypes), len(schedule))
    return {
        "k": len(prototypes),
        "k_choice": choice,
        "rounds": len(schedule),
        "noise_multiplier": fed.kmeans_noise,
        "prototypes": prototypes.astype(float).tolist(),
        "shares_by_kind": by_kind,
        "personas_by_kind": present,
        "note": "shares come from DP-noised counts only (charged to every partner's ledger)",
    }


def _persona_metrics(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    personas: dict[str, Any],
    rnd: int,
    config: Callable[..., ConfigRecord],
) -> list[dict[str, Any]]:
    """Ask each partner to assign its users and write its persona cards locally."""
    prototypes = np.asarray(personas["prototypes"], dtype=np.float32)
    active = {n: p for n, p in partners.items() if p.active}
    contents = _model_messages(aggregator, active, config, rnd, prototypes=prototypes)
    rows = []
    for p, reply in _exchange(grid, "query.personas", contents, str(rnd), 3600, partners):
        if reply.has_error():
            category, epsilon = parse_error_reason(reply.error.reason)
            p.record_epsilon(rnd, epsilon)
            logger.warning("persona cards at %s failed (%s)", p.info["name"], category)
            continue
        metrics = metrics_of(reply)
        if "epsilon" in metrics:
            p.record_epsilon(rnd, float(metrics["epsilon"]))
        row = {
            "round": rnd,
            "partner": p.info["name"],
            "kind": p.info["kind"],
            "rows": p.info["rows"],
            "epsilon": p.epsilon,
            "private": bool(p.info["private"]),
            "phase": "personas",
        }
        row.update({k: float(v) for k, v in metrics.items() if k != "epsilon"})
        rows.append(row)
    return sorted(rows, key=lambda r: r["partner"])


def _publish(
    run_dir: Path,
    aggregator: ScopedAggregator,
    roster: dict[str, _Partner],
    settings: ServerSettings,
    rounds: int,
    personas: dict[str, Any] | None = None,
) -> None:
    key_path = run_dir / "keys" / "model-signing.key"
    from cryptography.hazmat.primitives import serialization

    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        key = generate_signing_key(key_path)
    arrays = dict(aggregator.trunk)
    for slot, adapter in aggregator.adapters.items():
        arrays.update({f"{slot}/{name}": value for name, value in adapter.items()})
    card = {
        "version": 1,
        "created": time.time(),
        "rounds": rounds,
        "model": settings.model.model_dump(),
        "slots": sorted(aggregator.adapters),
        "prototypes": personas["prototypes"] if personas else None,
        "partners": {
            p.info["name"]: {
                "kind": p.info["kind"],
                "schema_fingerprint": p.info["fingerprint"],
                "schema_version": p.info["schema_version"],
                "slot": p.slot,
                "epsilon": p.epsilon,
                "epsilon_is_lower_bound": bool(p.info["private"]) and not p.epsilon_final,
                "noise_seeds_known": bool(p.info.get("noise_seeds_known", False)),
                "private": bool(p.info["private"]),
            }
            for p in roster.values()
        },
    }
    save_model(run_dir / "model", arrays=arrays, card=card, key=key)  # type: ignore[arg-type]


def forward_logs_to_flower() -> None:
    """Write fedpersona's log records (INFO and above) to stderr in a deployed ServerApp.

    flwr-serverapp mirrors what its process writes to stdout/stderr to the SuperLink (shown by
    ``flwr log RUN_ID``; ``server start`` copies it to ``RUN_DIR/logs/serverapp.log`` when the
    run finishes; the SuperExec itself starts the ServerApp with its output suppressed, so
    nothing reaches ``superlink.log``). Without a handler, Python's fallback prints only WARNING
    and above, so the rounds, the chosen K and who installed the final model were never seen.
    Idempotent; the records do not also propagate to the root logger (no duplicates).
    """
    log = logging.getLogger("fedpersona")
    if any(getattr(h, "fedpersona_forward", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.fedpersona_forward = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def build_server_app(settings: ServerSettings | None = None, *, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp; without ``settings`` it reads ``scenario`` and ``run-dir`` from run config."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nonlocal settings
        if settings is None and context.run_config.get("federation-config"):  # fedpersona server start
            from fedpersona.config.files import load_federation_config
            from fedpersona.deploy.coordinator import server_settings

            forward_logs_to_flower()
            federation = load_federation_config(str(context.run_config["federation-config"]))
            settings = server_settings(
                federation,
                run_dir=str(context.run_config["run-dir"]),
                resume=bool(context.run_config.get("resume", False)),
            )
        if settings is None:
            scenario = load_scenario(str(context.run_config["scenario"]))
            settings = ServerSettings(
                federation=scenario.federation,
                model=scenario.model,
                training=scenario.training,
                run_dir=str(context.run_config.get("run-dir", "runs/flwr")),
            )
        run_federation(grid, settings, on_round=on_round)

    return server


app = build_server_app()
