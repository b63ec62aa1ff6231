"""The Flower ServerApp: rounds of scoped training and evaluation over the Message API.

Per run: a ``query`` message asks every partner for its kind, schema fingerprint, public
row count and noise plan; partners of one kind with the most common fingerprint form a
*slot* and share their adapter, the others keep theirs local (and the log says so). Then, per
round, ``train`` messages carry each partner's view of the global model (trunk + its slot's
adapter), replies are aggregated by :class:`~fedpersona.aggregation.ScopedAggregator`, and
``evaluate`` messages collect the cumulative epsilon (and, where a partner opted in, its
held-out metrics). A partner that replies with an error (e.g. its budget is spent) is logged
and dropped; the run goes on while ``min_partners`` remain.

With ``secure_aggregation = true`` each round's ``train`` exchange becomes the four exchanges
of :mod:`fedpersona.secagg` and the server sees only per-scope sums. A round that loses too
many partners to unmask aborts: the server logs why, stops, and publishes no model of it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpersona.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.artifacts import generate_signing_key, save_model
from fedpersona.client_app import ERROR_BUDGET
from fedpersona.clustering import ClusterStats, init_prototypes, reduce_prototypes, update_prototypes
from fedpersona.config import FederationSettings, load_scenario
from fedpersona.encoder import EncoderConfig, PersonaTrunk
from fedpersona.errors import ConfigError
from fedpersona.messages import arrays_of, encode_arrays, encode_settings, metrics_of
from fedpersona.secagg import (
    SecAggParams,
    SecureAggregationError,
    SecureRound,
    as_updates,
    blobs,
    decode_shapes,
    ints,
    modulus_bits_for,
)
from fedpersona.training import TrainingSettings

__all__ = ["ServerSettings", "app", "build_server_app", "run_federation"]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class ServerSettings:
    """Everything the coordinator needs for one run."""

    federation: FederationSettings
    model: EncoderConfig
    training: TrainingSettings
    run_dir: str
    expected_partners: int | None = None
    wait_timeout: float = 120.0


@dataclass
class _Partner:
    node_id: int
    info: dict[str, Any]
    slot: str | None = None
    active: bool = True
    epsilon: float | None = None
    steps: int = 0
    dropped_reason: str = ""


@dataclass
class FederationResult:
    rounds_completed: int
    partners: dict[str, dict[str, Any]] = field(default_factory=dict)
    aborted: str = ""  # why a securely aggregated round aborted, if one did


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


def _initial_trunk(model: EncoderConfig, seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    trunk = PersonaTrunk(model)
    return {f"trunk.{k}": v.detach().cpu().numpy() for k, v in trunk.state_dict().items()}


def run_federation(grid: Grid, settings: ServerSettings, *, on_round: RoundCallback | None = None) -> FederationResult:
    """Run the whole federation; writes metrics.jsonl, privacy.json and model/ in run_dir."""
    fed = settings.federation
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    want = settings.expected_partners or fed.min_partners
    nodes = _wait_for_nodes(grid, want, settings.wait_timeout)
    if len(nodes) < fed.min_partners:
        raise ConfigError(
            f"only {len(nodes)} partner(s) connected within {settings.wait_timeout:.0f}s; "
            f"federation.min_partners is {fed.min_partners}"
        )

    clustering = fed.personas > 0
    kmeans_rounds = fed.kmeans_rounds if clustering else 0

    def config(**extra: Any) -> ConfigRecord:
        return encode_settings(
            settings.model, settings.training, num_rounds=fed.rounds, seed=fed.seed,
            kmeans_rounds=kmeans_rounds, kmeans_noise=float(fed.kmeans_noise), **extra,
        )  # fmt: skip

    partners: dict[int, _Partner] = {}
    replies = grid.send_and_receive(
        _messages(grid, "query", {n: RecordDict({"config": config()}) for n in nodes}, "0"),
        timeout=fed.round_timeout,
    )
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.error("node %s cannot join: %s", node, reply.error.reason)
            continue
        info = dict(reply.content.config_records["info"])
        partners[node] = _Partner(node, info)
        logger.info(
            "partner %s: kind %s, %d rows, schema %s, noise %.4g, q %.4g, %d steps/round",
            info["name"], info["kind"], info["rows"], info["fingerprint"],
            info["noise_multiplier"], info["sample_rate"], info["steps_per_round"],
        )  # fmt: skip
    _assign_slots(partners)
    aggregator = ScopedAggregator(
        optimizer=fed.server_optimizer,
        lr=fed.server_lr,
        global_weighting=fed.global_weighting,
        robust=fed.robust_aggregation,
        trim_fraction=fed.trim_fraction,
        max_update_norm=fed.max_update_norm,
    )
    aggregator.trunk = _initial_trunk(settings.model, fed.seed)
    metrics_path = run_dir / "metrics.jsonl"
    completed = 0
    aborted = ""
    for rnd in range(1, fed.rounds + 1):
        active = {n: p for n, p in partners.items() if p.active}
        if len(active) < fed.min_partners:
            logger.error(
                "round %d not started: %d partner(s) left, federation.min_partners is %d",
                rnd, len(active), fed.min_partners,
            )  # fmt: skip
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
            logger.error("round %d: no partner replied; stopping", rnd)
            break
        aggregator.aggregate(updates)
        completed = rnd
        rows = _evaluate(grid, aggregator, partners, rnd, config)
        with metrics_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        if on_round is not None:
            on_round(rnd, rows)
    personas: dict[str, Any] | None = None
    if clustering and completed:
        personas = _cluster_personas(grid, aggregator, partners, fed, config, settings.model.embed_dim)
        if personas is not None:
            rows = _persona_metrics(grid, aggregator, partners, personas, completed, config)
            with metrics_path.open("a", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
            tmp = run_dir / "personas.json.tmp"
            tmp.write_text(json.dumps({k: v for k, v in personas.items() if k != "centres"}, indent=2))
            tmp.replace(run_dir / "personas.json")
    _write_privacy(run_dir, partners)
    if aborted and not completed:
        logger.error("no round completed; no model is published")
    else:
        _publish(run_dir, aggregator, partners, settings, completed, personas)
    return FederationResult(
        rounds_completed=completed,
        partners={p.info["name"]: p.info for p in partners.values()},
        aborted=aborted,
    )


def _failed(p: _Partner, reply: Message, rnd: int) -> None:
    p.active = False
    p.dropped_reason = reply.error.reason or "error"
    what = "refused (privacy budget)" if reply.error.code == ERROR_BUDGET else "failed"
    logger.warning("round %d: partner %s %s: %s", rnd, p.info["name"], what, p.dropped_reason)


def _trained(p: _Partner, reply: Message) -> None:
    metrics = metrics_of(reply)
    p.steps += int(metrics.get("steps", 0))
    p.epsilon = float(metrics["epsilon"]) if "epsilon" in metrics else None


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
    updates: list[PartnerUpdate] = []
    for p, reply in _exchange(grid, "train", contents, str(rnd), fed.round_timeout, partners):
        if reply.has_error():
            _failed(p, reply, rnd)
            continue
        _trained(p, reply)
        update = PartnerUpdate(
            partner=p.info["name"],
            slot=p.slot,
            arrays=arrays_of(reply),
            num_examples=int(p.info["train_rows"]),
            kind=str(p.info["kind"]),
        )
        problems = aggregator.screen(update)
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
        PartnerUpdate(str(n), p.slot, {}, int(p.info["train_rows"]), kind=str(p.info["kind"]))
        for n, p in active.items()
    ]
    if aggregator.global_weighting == "examples":
        return {n: int(p.info["train_rows"]) for n, p in active.items()}
    weights = aggregator.global_weights(updates)
    return {n: max(1, round(weights[str(n)] * 10_000)) for n in active}


def _train_secure(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    active: dict[int, _Partner],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
) -> list[PartnerUpdate]:
    """One round of :mod:`fedpersona.secagg`; raises SecureAggregationError to abort it."""
    total_rows = sum(int(p.info["train_rows"]) for p in active.values())
    trunk_weight = _integer_trunk_weights(aggregator, active)
    params = SecAggParams(
        threshold=fed.secagg_threshold,
        clipping_range=float(fed.secagg_clipping_range),
        quantization_range=fed.secagg_quantization_range,
        modulus_bits=modulus_bits_for(max(total_rows, sum(trunk_weight.values())), fed.secagg_quantization_range),
    )
    sec = SecureRound(
        server_round=rnd,
        params=params,
        members={n: p.slot for n, p in active.items()},
        trunk_shapes={k: tuple(v.shape) for k, v in aggregator.trunk.items()},
    )

    def exchange(kind: str, contents: dict[int, RecordDict], accept: Callable[[int, RecordDict], None]) -> None:
        """Send one stage; hand each good reply to ``accept``, which may reject that partner."""
        for p, reply in _exchange(grid, kind, contents, str(rnd), fed.round_timeout, partners):
            if reply.has_error():
                _failed(p, reply, rnd)
                continue
            if kind == "train.secagg":
                _trained(p, reply)
            try:
                accept(p.node_id, reply.content)
            except (SecureAggregationError, KeyError, TypeError, ValueError) as exc:
                logger.warning("round %d: partner %s left out at %s: %s", rnd, p.info["name"], kind, exc)

    def settings(n: int, **extra: Any) -> ConfigRecord:
        return config(round=rnd, adapter_shared=active[n].slot is not None, **extra)

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

    exchange(
        "query.secagg_setup", {n: RecordDict({"config": settings(n, **sec.setup_config(n))}) for n in active}, keys
    )
    bundle = ConfigRecord(sec.key_bundle())  # type: ignore[arg-type]
    exchange(
        "query.secagg_share_keys",
        {n: RecordDict({"config": settings(n), "keys": bundle}) for n in sec.joined},
        ciphertexts,
    )
    sec.start_masking()
    train: dict[int, RecordDict] = {}
    for n in sec.sharers:
        sources, relayed = sec.forwarded(n)
        train[n] = RecordDict(
            {
                "arrays": encode_arrays(aggregator.arrays_for(active[n].slot)),
                "config": settings(n, **sec.placement(n).to_config(), **{"secagg.trunk_weight": trunk_weight[n]}),
                "shares": ConfigRecord({"sources": sources, "ciphertexts": relayed}),  # type: ignore[dict-item]
            }
        )
    exchange("train.secagg", train, masked)
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
    return as_updates(trunk, adapters)


def _evaluate(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    rnd: int,
    config: Callable[..., ConfigRecord],
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
        }
        if reply.has_error():
            logger.warning("round %d: evaluation at %s failed: %s", rnd, p.info["name"], reply.error.reason)
        else:
            metrics = metrics_of(reply)
            if "epsilon" in metrics:
                p.epsilon = float(metrics.pop("epsilon"))
                row["epsilon"] = p.epsilon
            row.update({k: float(v) for k, v in metrics.items()})
        rows.append(row)
    rows.sort(key=lambda r: r["partner"])
    return rows


def _write_privacy(run_dir: Path, partners: dict[int, _Partner]) -> None:
    out: dict[str, Any] = {}
    for p in sorted(partners.values(), key=lambda p: p.info["name"]):
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
        out[info["name"]] = entry
    tmp = run_dir / "privacy.json.tmp"
    tmp.write_text(json.dumps({"partners": out}, indent=2))
    tmp.replace(run_dir / "privacy.json")


def _cluster_personas(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, _Partner],
    fed: FederationSettings,
    config: Callable[..., ConfigRecord],
    dim: int,
) -> dict[str, Any] | None:
    """Federated DP k-means on the partners' embeddings (see :mod:`fedpersona.clustering`).

    Each round every active partner releases noisy per-prototype sums and counts (charged to
    its ledger first); the server only ever combines noisy releases. Schedule: half the rounds
    with ``3 x K`` prototypes, a server-side reduction to ``K``, then the rest with ``K``.
    The persona shares per kind come from the last round's noisy counts (post-processing).
    """
    rng = np.random.default_rng([fed.seed, 7])
    k = fed.personas
    summary = fed.kmeans_rounds // 2
    prototypes = init_prototypes(3 * k if summary else k, dim, generator=rng)
    stats: dict[int, ClusterStats] = {}
    for r in range(fed.kmeans_rounds):
        rnd = fed.rounds + 1 + r
        active = {n: p for n, p in partners.items() if p.active}
        contents = _model_messages(aggregator, active, config, rnd, prototypes=prototypes)
        stats = {}
        for p, reply in _exchange(grid, "query.kmeans", contents, str(rnd), fed.round_timeout, partners):
            if reply.has_error():
                _failed(p, reply, rnd)
                continue
            released = reply.content.array_records["stats"]
            metrics = metrics_of(reply)
            if "epsilon" in metrics:
                p.epsilon = float(metrics["epsilon"])
            stats[p.node_id] = ClusterStats(
                sums=released["sums"].numpy().astype(np.float64),
                counts=released["counts"].numpy().astype(np.float64),
                noise_std=float(metrics.get("noise_std", 0.0)),
            )
        if len(stats) < fed.min_partners:
            logger.error("persona clustering stopped: %d partner(s) replied in round %d", len(stats), rnd)
            return None
        if r == summary - 1:
            try:
                prototypes = reduce_prototypes(list(stats.values()), k=k, generator=rng)
            except ValueError as exc:
                # Too few prototypes rose above the noise floor to summarise them: keep the k
                # with the largest noisy counts (post-processing of the same releases).
                logger.warning("persona clustering: %s; keeping the %d largest prototypes", exc, k)
                updated = update_prototypes(prototypes, list(stats.values()), reseed=rng)
                counts = np.sum([s.counts for s in stats.values()], axis=0)
                prototypes = updated[np.argsort(-counts, kind="stable")[:k]]
        else:
            prototypes = update_prototypes(prototypes, list(stats.values()), reseed=rng)
    shares: dict[str, list[float]] = {}
    for node, st in stats.items():
        kind = str(partners[node].info["kind"])
        counts = np.maximum(st.counts, 0.0)
        acc = np.asarray(shares.get(kind, np.zeros(len(counts))))
        shares[kind] = list(acc + counts)
    by_kind = {kind: [c / max(1e-9, sum(v)) for c in v] for kind, v in shares.items()}
    present = {kind: [i for i, s in enumerate(v) if s >= 0.02] for kind, v in by_kind.items()}
    logger.info("personas: %d prototypes after %d DP k-means rounds", len(prototypes), fed.kmeans_rounds)
    return {
        "k": len(prototypes),
        "rounds": fed.kmeans_rounds,
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
            logger.warning("persona cards at %s failed: %s", p.info["name"], reply.error.reason)
            continue
        metrics = metrics_of(reply)
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
    partners: dict[int, _Partner],
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
        "model": {k: getattr(settings.model, k) for k in settings.model.__dataclass_fields__},
        "slots": sorted(aggregator.adapters),
        "prototypes": personas["prototypes"] if personas else None,
        "partners": {
            p.info["name"]: {
                "kind": p.info["kind"],
                "schema_fingerprint": p.info["fingerprint"],
                "schema_version": p.info["schema_version"],
                "slot": p.slot,
                "epsilon": p.epsilon,
                "private": bool(p.info["private"]),
            }
            for p in partners.values()
        },
    }
    save_model(run_dir / "model", arrays=arrays, card=card, key=key)  # type: ignore[arg-type]


def build_server_app(settings: ServerSettings | None = None, *, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp; without ``settings`` it reads ``scenario`` and ``run-dir`` from run config."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nonlocal settings
        if settings is None and context.run_config.get("federation-config"):  # fedpersona server start
            from fedpersona.deploy import load_federation_config, server_settings

            federation = load_federation_config(str(context.run_config["federation-config"]))
            settings = server_settings(federation, run_dir=str(context.run_config["run-dir"]))
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
