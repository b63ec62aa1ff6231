"""The coordinator's exchanges of one round: training (plain or securely aggregated),
evaluation, DP k-means releases (plain or securely summed) and the persona assignment.

Each function sends one kind of message to the active partners (:mod:`fedpersona.federation.roster`),
records what each reply says about its sender, and returns what the server may use: the
screened updates of a training round, the rows of an evaluation, the noisy statistics of a
k-means release. Secure aggregation runs the four exchanges of :mod:`fedpersona.federation.secagg`
(:func:`_secure_sum`), by default with a threshold of a strict majority of the round's partners.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedpersona.config.settings import FederationSettings
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.federation.checkpoint import Checkpoint
from fedpersona.federation.messages import arrays_of, encode_arrays, metrics_of
from fedpersona.federation.roster import Member, exchange, failed, reported_number, trained
from fedpersona.federation.secagg import (
    SecAggParams,
    SecureAggregationError,
    blobs,
    decode_shapes,
    ints,
    modulus_bits_for,
    strict_majority,
)
from fedpersona.federation.secure_round import SecureRound, as_updates
from fedpersona.personas.clustering import ClusterStats
from fedpersona.personas.schedule import KMeansRun
from fedpersona.privacy.manifest import parse_error_reason

__all__ = [
    "KMEANS_QUANTIZATION",
    "cluster_personas",
    "evaluate",
    "model_messages",
    "persona_metrics",
    "train_plain",
    "train_secure",
]

logger = logging.getLogger(__name__)


def model_messages(
    aggregator: ScopedAggregator,
    active: dict[int, Member],
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


def train_plain(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, Member],
    active: dict[int, Member],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
) -> list[PartnerUpdate]:
    contents = model_messages(aggregator, active, config, rnd)
    received: list[tuple[Member, PartnerUpdate]] = []
    for p, reply in exchange(grid, "train", contents, str(rnd), fed.round_timeout, partners):
        if reply.has_error():
            failed(p, reply, rnd)
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
        trained(p, reply, rnd)
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


def _integer_trunk_weights(aggregator: ScopedAggregator, active: dict[int, Member]) -> dict[int, int]:
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
    partners: dict[int, Member],
    active: dict[int, Member],
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
    stage_type: str,
    payload: Callable[[int], dict[str, Any]],
    largest_sum: int,
    setup_extra: dict[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], SecureRound]:
    """One SecAgg+ exchange of :mod:`fedpersona.federation.secagg`: setup, share keys, ``stage_type`` (the
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

    def stage(kind: str, contents: dict[int, RecordDict], accept: Callable[[int, RecordDict], None]) -> None:
        """Send one stage; hand each good reply to ``accept``, which may reject that partner."""
        for p, reply in exchange(grid, kind, contents, str(rnd), fed.round_timeout, partners):
            if reply.has_error():
                failed(p, reply, rnd)
                continue
            if kind == "train.secagg":
                trained(p, reply, rnd)
            elif "metrics" in reply.content.metric_records:
                p.record_epsilon(rnd, reported_number(reply.content.metric_records["metrics"].get("epsilon")))
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
    stage(
        "query.secagg_setup",
        {n: RecordDict({"config": settings(n, **sec.setup_config(n), **setup)}) for n in active},
        keys,
    )
    bundle = ConfigRecord(sec.key_bundle())  # type: ignore[arg-type]
    stage(
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
    stage(stage_type, contents, masked)
    survivors, dropped = sec.unmask_request()
    if dropped:
        logger.warning("round %d: %d partner(s) dropped after sharing keys; unmasking without them", rnd, len(dropped))
    request: dict[str, Any] = {"secagg.survivors": survivors, **({"secagg.dropped": dropped} if dropped else {})}
    stage(
        "query.secagg_unmask",
        {sec.node[i]: RecordDict({"config": settings(sec.node[i], **request)}) for i in survivors},
        shares,
    )
    trunk, adapters = sec.result()
    return trunk, adapters, sec


def train_secure(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, Member],
    active: dict[int, Member],
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
        stage_type="train.secagg",
        payload=lambda n: {"arrays": encode_arrays(aggregator.arrays_for(active[n].slot))},
    )  # fmt: skip
    return as_updates(trunk, adapters)


KMEANS_QUANTIZATION = 2**20  # levels of a securely summed k-means statistic


def _kmeans_secure(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, Member],
    active: dict[int, Member],
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
        stage_type="query.kmeans_secagg",
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
    partners: dict[int, Member],
    active: dict[int, Member],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
    prototypes: np.ndarray,
) -> tuple[list[ClusterStats], dict[str, np.ndarray], int]:
    """One DP k-means round with each partner's noisy statistics sent as they are."""
    contents = model_messages(aggregator, active, config, rnd, prototypes=prototypes)
    stats: list[ClusterStats] = []
    kind_counts: dict[str, np.ndarray] = {}
    for p, reply in exchange(grid, "query.kmeans", contents, str(rnd), fed.round_timeout, partners):
        if reply.has_error():
            failed(p, reply, rnd)
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


def evaluate(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, Member],
    rnd: int,
    config: Callable[..., ConfigRecord],
    used: set[str],
) -> list[dict[str, Any]]:
    active = {n: p for n, p in partners.items() if p.active}
    contents = model_messages(aggregator, active, config, rnd)
    rows = []
    for p, reply in exchange(grid, "evaluate", contents, str(rnd), 3600, partners):
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


def persona_metrics(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, Member],
    personas: dict[str, Any],
    rnd: int,
    config: Callable[..., ConfigRecord],
) -> list[dict[str, Any]]:
    """Ask each partner to assign its users and write its persona cards locally."""
    prototypes = np.asarray(personas["prototypes"], dtype=np.float32)
    active = {n: p for n, p in partners.items() if p.active}
    contents = model_messages(aggregator, active, config, rnd, prototypes=prototypes)
    rows = []
    for p, reply in exchange(grid, "query.personas", contents, str(rnd), 3600, partners):
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


def cluster_personas(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, Member],
    fed: FederationSettings,
    config: Callable[..., ConfigRecord],
    dim: int,
    *,
    checkpoint: Checkpoint | None = None,
    save: Callable[..., None] | None = None,
) -> dict[str, Any] | None:
    """Federated DP k-means on the partners' embeddings, following the one schedule
    (:class:`~fedpersona.personas.schedule.KMeansRun`) over Flower messages.

    Each release is every active partner's noisy per-prototype sums and counts (charged to
    its ledger first; with secure aggregation only their sums reach the server). After each
    resumable release ``save`` checkpoints the run; a resumed run continues after
    ``checkpoint.kmeans_done``. The persona shares per kind come from the last release's
    noisy counts (post-processing).
    """
    candidates = list(fed.persona_candidates)
    run = KMeansRun(
        k=fed.personas, rounds=fed.kmeans_rounds, dim=dim, generator=np.random.default_rng([fed.seed, 7]),
        candidates=candidates,
    )  # fmt: skip
    if checkpoint is not None and checkpoint.stage == "kmeans" and checkpoint.prototypes is not None:
        run.restore(
            prototypes=checkpoint.prototypes, position=checkpoint.kmeans_done, rng_state=checkpoint.kmeans_rng,
            choice=checkpoint.extra.get("k_choice"),
        )  # fmt: skip
    kind_counts: dict[str, np.ndarray] = {}
    one_round = _kmeans_secure if fed.secure_aggregation else _kmeans_plain
    while not run.done:
        rnd = fed.rounds + 1 + run.position
        active = {n: p for n, p in partners.items() if p.active}
        try:
            released, kind_counts, contributors = one_round(
                grid, aggregator, partners, active, rnd, config, fed, run.next_prototypes()
            )
        except SecureAggregationError as exc:
            logger.error("persona clustering stopped in round %d: %s", rnd, exc)
            return None
        if contributors < fed.min_partners:
            logger.error("persona clustering stopped: %d partner(s) replied in round %d", contributors, rnd)
            return None
        run.absorb(released)
        if save is not None and run.resumable:
            extra = {**checkpoint.extra, "k_choice": run.choice} if checkpoint is not None else {"k_choice": run.choice}
            save(
                stage="kmeans", kmeans_done=run.position, prototypes=run.prototypes,
                kmeans_rng=run.rng.bit_generator.state, extra=extra,
            )  # fmt: skip
    shares = {kind: list(np.maximum(counts, 0.0)) for kind, counts in kind_counts.items()}
    by_kind = {kind: [c / max(1e-9, sum(v)) for c in v] for kind, v in shares.items()}
    present = {kind: [i for i, s in enumerate(v) if s >= 0.02] for kind, v in by_kind.items()}
    logger.info("personas: %d prototypes after %d DP k-means rounds", len(run.prototypes), run.releases)
    return {
        "k": len(run.prototypes),
        "k_choice": run.choice,
        "rounds": run.releases,
        "noise_multiplier": fed.kmeans_noise,
        "prototypes": run.prototypes.astype(float).tolist(),
        "shares_by_kind": by_kind,
        "personas_by_kind": present,
        "note": "shares come from DP-noised counts only (charged to every partner's ledger)",
    }
