"""The coordinator's exchanges of one round: training (plain or securely aggregated),
evaluation, the persona releases (plain or securely summed per slot) and the persona assignment.

Each function sends one kind of message to the active partners (:mod:`fedpersona.federation.roster`),
records what each reply says about its sender, and returns what the server may use: the
screened updates of a training round, the rows of an evaluation, the summed noisy releases of
the persona protocol. Secure aggregation runs the four exchanges of :mod:`fedpersona.federation.secagg`
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
from fedpersona.data.schema import slot_id
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.federation.checkpoint import Checkpoint
from fedpersona.federation.messages import arrays_of, decode_arrays, encode_arrays, metrics_of
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
from fedpersona.personas.mixture import StepStats
from fedpersona.personas.protocol import (
    PersonaProtocol,
    PersonaRequest,
    PersonaRun,
    request_arrays,
    result_from_json,
    result_to_json,
    state_from_json,
    state_to_json,
)
from fedpersona.privacy.manifest import parse_error_reason

__all__ = [
    "PERSONA_QUANTIZATION",
    "cluster_personas",
    "evaluate",
    "model_messages",
    "persona_metrics",
    "persona_slot",
    "protocol_for",
    "train_plain",
    "train_secure",
]

logger = logging.getLogger(__name__)


def model_messages(
    aggregator: ScopedAggregator,
    active: dict[int, Member],
    config: Callable[..., ConfigRecord],
    rnd: int,
) -> dict[int, RecordDict]:
    """Each active partner's view of the global model (trunk + its slot's adapter) and the
    round's config."""
    contents = {}
    for n, p in active.items():
        record = RecordDict(
            {
                "arrays": encode_arrays(aggregator.arrays_for(p.slot)),
                "config": config(round=rnd, adapter_shared=p.slot is not None),
            }
        )
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


PERSONA_QUANTIZATION = 2**20  # levels of a securely summed persona statistic


def persona_slot(member: Member) -> str:
    """The persona slot of a partner: its kind and schema fingerprint (one persona space each)."""
    return slot_id(str(member.info["kind"]), str(member.info["fingerprint"]))


def protocol_for(fed: FederationSettings, width: int) -> PersonaProtocol:
    """The persona protocol's public constants for a slot whose persona view has ``width``
    columns (the federation's settings; dims no more than the view's width)."""
    em_steps = fed.persona_steps - 2
    return PersonaProtocol(
        k=fed.personas, dims=min(fed.persona_dims, width), init_steps=2, em_steps=em_steps,
        hard_steps=min(2, em_steps),
    )  # fmt: skip


def _persona_config(request: PersonaRequest, protocol: PersonaProtocol) -> dict[str, Any]:
    """What a partner needs besides the arrays to make its release (public constants)."""
    metric = request.mixture.metric if request.mixture is not None else "euclid"
    return {
        "persona.kind": request.kind,
        "persona.soft": bool(request.soft),
        "persona.metric": metric,
        "persona.row_clip": float(protocol.row_clip),
        "persona.offset": float(protocol.offset),
        "persona.count_noise": float(protocol.count_noise),
        "persona.k": int(request.mixture.k) if request.mixture is not None else 0,
        "persona.dims": int(request.space.dims) if request.space is not None else 0,
    }


def _persona_clip(request: PersonaRequest, protocol: PersonaProtocol, members: list[Member]) -> float:
    """A public bound on any value of one partner's release, for quantization: ``4x`` the
    largest declared row count times the largest term a user adds, plus a wide margin for
    the noise (each partner's planned noise is public)."""
    largest = max(int(p.info["rows"]) for p in members)
    if request.kind == "gram":
        noise = max(float(p.info.get("gram_noise", 0.0) or 0.0) for p in members)
        scale = protocol.row_clip**2 + protocol.offset**2
        return (4.0 * largest + 10.0 * noise + 1.0) * scale
    assert request.space is not None
    noise = max(float(p.info.get("em_noise", 0.0) or 0.0) for p in members)
    z = max(1.0, request.space.z_clip)
    return (4.0 * largest + 10.0 * noise * (protocol.count_noise + 1.0) * math.sqrt(2.0) + 1.0) * z


def _release_of(arrays: dict[str, np.ndarray], request: PersonaRequest) -> np.ndarray | StepStats:
    if request.kind == "gram":
        return np.asarray(arrays["gram"], dtype=np.float64)
    return StepStats(
        counts=np.asarray(arrays["counts"], dtype=np.float64), sums=np.asarray(arrays["sums"], dtype=np.float64)
    )


def _personas_plain(
    grid: Grid,
    partners: dict[int, Member],
    active: dict[int, Member],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
    requests: dict[str, tuple[PersonaRequest, PersonaProtocol]],
) -> tuple[dict[str, Any], dict[str, int]]:
    """One persona release with each partner's noisy release sent as it is; returns the sum
    per slot and how many partners of each slot contributed."""
    contents = {}
    for n, p in active.items():
        request, protocol = requests[persona_slot(p)]
        contents[n] = RecordDict(
            {
                "config": config(round=rnd, **_persona_config(request, protocol)),
                "persona": encode_arrays(request_arrays(request)),
            }
        )
    totals: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    for p, reply in exchange(grid, "query.persona_release", contents, str(rnd), fed.round_timeout, partners):
        if reply.has_error():
            failed(p, reply, rnd)
            continue
        metrics = metrics_of(reply)
        if "epsilon" in metrics:
            p.record_epsilon(rnd, float(metrics["epsilon"]))
        slot = persona_slot(p)
        try:
            released = _release_of(decode_arrays(reply.content.array_records["release"]), requests[slot][0])
        except (KeyError, ValueError) as exc:
            logger.warning("round %d: the persona release of %s is malformed (%s); left out", rnd, p.info["name"], exc)
            continue
        totals[slot] = released if slot not in totals else totals[slot] + released
        counts[slot] += 1
    return totals, dict(counts)


def _personas_secure(
    grid: Grid,
    partners: dict[int, Member],
    active: dict[int, Member],
    rnd: int,
    config: Callable[..., ConfigRecord],
    fed: FederationSettings,
    requests: dict[str, tuple[PersonaRequest, PersonaProtocol]],
) -> tuple[dict[str, Any], dict[str, int]]:
    """One persona release whose statistics the server sees only as sums per slot (SecAgg+).

    Each partner adds its own Gaussian noise (charged to its ledger) before masking, so the
    sum of a slot carries the noise of every contributor of that slot. A slot with a single
    partner is summed over that partner alone: its release is then seen as it is (it is DP
    on its own; the secure sum adds nothing there). Values are clipped to a public bound
    (:func:`_persona_clip`) before quantization.
    """
    slots = {n: persona_slot(p) for n, p in active.items()}
    clip = max(_persona_clip(requests[s][0], requests[s][1], [p for n, p in active.items() if slots[n] == s])
               for s in set(slots.values()))  # fmt: skip

    def settings(n: int, **extra: Any) -> ConfigRecord:
        request, protocol = requests[slots[n]]
        return config(round=rnd, **_persona_config(request, protocol), **extra)

    _, by_slot, sec = _secure_sum(
        grid, partners, active, rnd, settings, fed,
        purpose="personas",
        members=dict(slots),
        global_shapes={"persona_total.ones": (1,)},
        weights=dict.fromkeys(active, 1),
        largest_sum=len(active),
        clipping_range=clip,
        quantization_range=PERSONA_QUANTIZATION,
        stage_type="query.persona_release_secagg",
        payload=lambda n: {"persona": encode_arrays(request_arrays(requests[slots[n]][0]))},
    )  # fmt: skip
    survivors = Counter(slots[sec.node[i]] for i in sec.survivors)
    totals: dict[str, Any] = {}
    for slot, values in by_slot.items():
        arrays = {k.split(".", 1)[1]: v.astype(np.float64) * survivors[slot] for k, v in values.items()}
        totals[slot] = _release_of(arrays, requests[slot][0])
    return totals, dict(survivors)


def evaluate(
    grid: Grid,
    aggregator: ScopedAggregator,
    partners: dict[int, Member],
    rnd: int,
    config: Callable[..., ConfigRecord],
    used: set[str],
    timeout: float,
) -> list[dict[str, Any]]:
    """Every active partner's evaluation of the global model (replies within ``timeout`` s)."""
    active = {n: p for n, p in partners.items() if p.active}
    contents = model_messages(aggregator, active, config, rnd)
    rows = []
    for p, reply in exchange(grid, "evaluate", contents, str(rnd), timeout, partners):
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
    partners: dict[int, Member],
    personas: dict[str, Any],
    rnd: int,
    config: Callable[..., ConfigRecord],
    timeout: float,
) -> list[dict[str, Any]]:
    """Ask each partner to assign its users to its slot's personas and write its persona
    cards locally (a partner whose slot has no personas is not asked; replies within
    ``timeout`` s)."""
    slots = personas.get("slots", {})
    active = {n: p for n, p in partners.items() if p.active and persona_slot(p) in slots}
    contents = {}
    for n, p in active.items():
        result = result_from_json(slots[persona_slot(p)])
        request = PersonaRequest("stats", space=result.space, mixture=result.mixture)
        contents[n] = RecordDict(
            {"config": config(round=rnd, **{"persona.metric": result.mixture.metric}),
             "persona": encode_arrays(request_arrays(request))}
        )  # fmt: skip
    rows = []
    for p, reply in exchange(grid, "query.personas", contents, str(rnd), timeout, partners):
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
    partners: dict[int, Member],
    fed: FederationSettings,
    config: Callable[..., ConfigRecord],
    *,
    checkpoint: Checkpoint | None = None,
    save: Callable[..., None] | None = None,
) -> dict[str, Any] | None:
    """The persona protocol (:mod:`fedpersona.personas.protocol`) over Flower messages: one
    :class:`~fedpersona.personas.protocol.PersonaRun` per slot (kind and schema fingerprint),
    all advancing together, one release per message round.

    Each release is every active partner's noisy Gram matrix or EM statistics for its slot
    (charged to its ledger first; with secure aggregation only the slot's sums reach the
    server). After each release ``save`` checkpoints every run's state; a resumed run
    continues after ``checkpoint.persona_done`` releases. A slot that gets no contribution in
    a release stops (its partners get no personas); the protocol stops when fewer than
    ``min_partners`` partners contribute. Persona shares come from the last release's noisy
    counts (post-processing).
    """
    active = {n: p for n, p in partners.items() if p.active}
    widths: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for p in active.values():
        width = int(p.info.get("persona_width", 0) or 0)
        if width < 1:
            logger.warning("partner %s has no persona view (no column fits one); it gets no personas", p.info["name"])
            continue
        widths[persona_slot(p)] = width
        kinds[persona_slot(p)] = str(p.info["kind"])
    runs = {
        slot: PersonaRun(protocol=protocol_for(fed, width), dim=width, seed=fed.seed, slot=slot)
        for slot, width in sorted(widths.items())
    }
    if not runs:
        logger.error("personas: no partner has a persona view")
        return None
    if checkpoint is not None and checkpoint.stage == "personas":
        for slot, state in checkpoint.persona_runs.items():
            if slot in runs:
                runs[slot].restore(state_from_json(state))
    one_round = _personas_secure if fed.secure_aggregation else _personas_plain
    done = min(run.position for run in runs.values())
    while not all(run.done for run in runs.values()):
        rnd = fed.rounds + 1 + done
        active = {n: p for n, p in partners.items() if p.active and persona_slot(p) in runs}
        requests = {slot: (run.request(), run.protocol) for slot, run in runs.items()}
        logger.info("personas: release %d of %d (%s) to %d partner(s)", done + 1,
                    max(r.protocol.releases for r in runs.values()),
                    ", ".join(sorted({r.kind for r, _ in requests.values()})), len(active))  # fmt: skip
        try:
            totals, contributors = one_round(grid, partners, active, rnd, config, fed, requests)
        except SecureAggregationError as exc:
            logger.error("personas stopped in round %d: %s", rnd, exc)
            return None
        if sum(contributors.values()) < fed.min_partners:
            logger.error("personas stopped: %d partner(s) replied in round %d", sum(contributors.values()), rnd)
            return None
        for slot in list(runs):
            if slot not in totals:
                logger.warning("personas of %s stopped: no partner of the slot replied in round %d", slot, rnd)
                del runs[slot]
                continue
            try:
                runs[slot].absorb(totals[slot])
            except ValueError as exc:  # e.g. a Gram sum too noisy to hold a row
                logger.warning("personas of %s stopped in round %d: %s", slot, rnd, exc)
                del runs[slot]
        if not runs:
            logger.error("personas stopped: no slot is left")
            return None
        done += 1
        if save is not None and not all(run.done for run in runs.values()):
            save(stage="personas", persona_done=done,
                 persona_runs={slot: state_to_json(run.state()) for slot, run in runs.items()})  # fmt: skip
    results = {slot: run.result() for slot, run in runs.items()}
    k = max(len(r.shares) for r in results.values())
    labels = _kind_labels(results, kinds)
    by_kind = {labels[slot]: [float(v) for v in r.shares] for slot, r in results.items()}
    present = {label: [i for i, s in enumerate(v) if s >= 0.02] for label, v in by_kind.items()}
    releases = max(run.protocol.releases for run in runs.values())
    logger.info("personas: %d per kind for %d kind(s) after %d releases", k, len(results), releases)
    return {
        "k": k,
        "rounds": releases,
        "method": "DP-PCA (one Gram release) and DP-EM of a tied Gaussian mixture, per kind",
        "shares_by_kind": by_kind,
        "personas_by_kind": present,
        "slots": {
            slot: {**result_to_json(r), "kind": kinds[slot], "label": labels[slot]} for slot, r in results.items()
        },
        "note": "spaces, personas and shares come from DP-noised releases only (charged to every partner's ledger)",
    }


def _kind_labels(results: dict[str, Any], kinds: dict[str, str]) -> dict[str, str]:
    """A readable name per slot: its kind, with the fingerprint's start when a kind has several."""
    per_kind = Counter(kinds[slot] for slot in results)
    return {
        slot: kinds[slot] if per_kind[kinds[slot]] == 1 else f"{kinds[slot]} ({slot.rsplit(':', 1)[-1][:8]})"
        for slot in results
    }
