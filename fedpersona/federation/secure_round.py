"""The server's side of secure aggregation (:mod:`fedpersona.federation.secagg`).

:class:`SecureRound` runs one round for the coordinator: it assigns indices, checks and relays
keys and encrypted shares, adds each masked vector to one running sum as it arrives (never
keeping an individual vector), asks the survivors for exactly the shares it needs, removes the
masks from the sum and decodes the per-scope weighted means (:class:`VectorLayout`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.quantization import dequantize

from fedpersona.federation.aggregation import PartnerUpdate
from fedpersona.federation.secagg import (
    MASK_INFO,
    RELEASE_SCOPES,
    Placement,
    SecAggParams,
    SecureAggregationError,
    Shapes,
    agree,
    mask_stream,
    vector_scope,
)
from fedpersona.model.scopes import SCOPES

__all__ = ["SecureRound", "VectorLayout", "as_updates"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """One scope's stretch of the flat vector: the trunk (slot None) or one slot's adapter."""

    slot: str | None
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # sorted by name
    count_index: int
    offset: int

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)


@dataclass(frozen=True)
class VectorLayout:
    """Counts first (one per segment), then the trunk, then each shared slot's adapter."""

    segments: tuple[Segment, ...]

    @classmethod
    def build(cls, trunk: Shapes, slots: dict[str, Shapes]) -> VectorLayout:
        scopes: list[tuple[str | None, Shapes]] = [(None, trunk), *((s, slots[s]) for s in sorted(slots))]
        offset = len(scopes)
        segments = []
        for count_index, (slot, shapes) in enumerate(scopes):
            segment = Segment(slot, tuple(sorted(shapes.items())), count_index, offset)
            segments.append(segment)
            offset += segment.size
        return cls(tuple(segments))

    @property
    def length(self) -> int:
        last = self.segments[-1]
        return last.offset + last.size

    def segment(self, slot: str | None) -> Segment:
        for segment in self.segments:
            if segment.slot == slot:
                return segment
        raise KeyError(slot)

    def placement(self, slot: str | None) -> Placement:
        trunk = self.segments[0]
        out = Placement(self.length, trunk.count_index, trunk.offset, trunk.size)
        if slot is None:
            return out
        adapter = self.segment(slot)
        return replace(out, adapter_count=adapter.count_index, adapter_offset=adapter.offset, adapter_size=adapter.size)

    def decode(
        self, total: np.ndarray, params: SecAggParams
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        """Per-scope weighted means from the unmasked sum: (trunk, {slot: adapter}).

        A slot nobody contributed to this round (its count is 0) is left out.
        """
        counts = total[: len(self.segments)].astype(np.float64)
        means: list[dict[str, np.ndarray]] = []
        for segment in self.segments:
            count = counts[segment.count_index]
            if count <= 0:
                means.append({})
                continue
            flat = total[segment.offset : segment.offset + segment.size].astype(np.float64) / count
            values = dequantize([flat], params.clipping_range, params.quantization_range)[0]
            arrays, start = {}, 0
            for name, shape in segment.shapes:
                size = math.prod(shape)
                arrays[name] = values[start : start + size].reshape(shape).astype(np.float32)
                start += size
            means.append(arrays)
        if counts[self.segments[0].count_index] <= 0:  # every partner counts in the trunk's segment (it may be empty)
            raise SecureAggregationError("secure aggregation: the unmasked sum holds no trunk count")
        adapters = {str(seg.slot): m for seg, m in zip(self.segments[1:], means[1:], strict=True) if m}
        return means[0], adapters


def as_updates(trunk: dict[str, np.ndarray], adapters: dict[str, dict[str, np.ndarray]]) -> list[PartnerUpdate]:
    """The means as pseudo-updates for :class:`ScopedAggregator` (one per slot, same trunk).

    Each carries the trunk mean, so the aggregator's trunk average of identical arrays is that
    mean, and its slot's adapter mean; the server optimizer then applies unchanged.
    """
    if not adapters:
        return [PartnerUpdate("secure-sum", None, dict(trunk), 1)]
    return [PartnerUpdate(f"secure-sum:{slot}", slot, {**trunk, **adapter}, 1) for slot, adapter in adapters.items()]


# --------------------------------------------------------------------------- primitives


class SecureRound:
    """The server's side of one round.

    It never holds an unmasked individual vector: a masked vector is added into one running sum
    (mod 2**bits) as it arrives and is not kept, and masks are only ever removed from that sum.
    Methods named ``add_*`` reject one partner's bad reply (the caller drops that partner);
    ``key_bundle``, ``start_masking``, ``unmask_request`` and ``result`` raise
    :class:`SecureAggregationError` when the round must abort.
    """

    def __init__(
        self,
        *,
        server_round: int,
        params: SecAggParams,
        members: dict[int, str | None],
        trunk_shapes: Shapes,
    ) -> None:
        self.server_round = server_round
        self.params = params
        self.slot_of = dict(members)
        self.trunk_shapes = dict(trunk_shapes)
        self.index = {node: i for i, node in enumerate(sorted(members), start=1)}
        self.node = {i: node for node, i in self.index.items()}
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.slot_shapes: dict[str, Shapes] = {}
        self.outbox: dict[int, dict[int, bytes]] = {}  # src -> dst -> ciphertext
        self.layout: VectorLayout | None = None
        self.total: np.ndarray | None = None
        self.survivors: list[int] = []
        self.shares: dict[int, list[bytes]] = {}  # owner -> shares revealed for it
        self.revealed: set[int] = set()  # who has revealed shares

    # stage 1 ---------------------------------------------------------------
    def setup_config(self, node: int) -> dict[str, Any]:
        return {"secagg.index": self.index[node], **self.params.to_config()}

    def add_keys(self, node: int, mask_key: bytes, share_key: bytes, shapes: Shapes) -> None:
        slot = self.slot_of[node]
        if len(mask_key) != 32 or len(share_key) != 32:
            raise SecureAggregationError("its public keys are not X25519 keys")
        if any(name.split(".", 1)[0] not in {**SCOPES, **RELEASE_SCOPES} for name in shapes):
            raise SecureAggregationError("it names parameters of no declared scope")
        trunk = {n: s for n, s in shapes.items() if vector_scope(n) == "global"}
        adapter = {n: s for n, s in shapes.items() if vector_scope(n) == "kind"}
        if trunk != self.trunk_shapes:
            raise SecureAggregationError("its trunk shapes differ from the global trunk")
        if set(shapes) - set(trunk) - set(adapter):
            raise SecureAggregationError("it would send local parameters")
        if slot is None and adapter:
            raise SecureAggregationError("its adapter is local but it would send one")
        if slot is not None:
            if not adapter:
                raise SecureAggregationError("its slot shares an adapter but it would send none")
            if self.slot_shapes.setdefault(slot, adapter) != adapter:
                raise SecureAggregationError(f"its adapter shapes differ from slot {slot}'s")
        self.keys[self.index[node]] = (mask_key, share_key)

    def key_bundle(self) -> dict[str, list[bytes]]:
        self._enough(len(self.keys), "advertised keys")
        return {str(i): list(pair) for i, pair in sorted(self.keys.items())}

    @property
    def joined(self) -> list[int]:
        """Nodes whose keys are in the bundle."""
        return [self.node[i] for i in sorted(self.keys)]

    # stage 2 ---------------------------------------------------------------
    def add_ciphertexts(self, node: int, destinations: list[int], ciphertexts: list[bytes]) -> None:
        src = self.index[node]
        expected = sorted(set(self.keys) - {src})
        if sorted(destinations) != expected or len(destinations) != len(ciphertexts):
            raise SecureAggregationError("its encrypted shares are not addressed to exactly the other partners")
        self.outbox[src] = dict(zip(destinations, ciphertexts, strict=True))

    def start_masking(self) -> None:
        """Close stage 2: fix who masks with whom and lay out the round's vector."""
        self._enough(len(self.outbox), "sent encrypted shares")
        sharers = [self.node[i] for i in self.outbox]
        slots = {self.slot_of[n] for n in sharers} - {None}
        self.layout = VectorLayout.build(self.trunk_shapes, {s: self.slot_shapes[s] for s in slots if s})
        self.total = np.zeros(self.layout.length, dtype=self.params.dtype)
        for slot in sorted(s for s in slots if s):
            members = [n for n in sharers if self.slot_of[n] == slot]
            if len(members) == 1:
                logger.warning(
                    "round %d: slot %s has one partner: secure aggregation cannot hide its adapter, "
                    "which is protected by its DP guarantee only", self.server_round, slot,
                )  # fmt: skip

    @property
    def sharers(self) -> list[int]:
        return [self.node[i] for i in sorted(self.outbox)]

    def placement(self, node: int) -> Placement:
        if self.layout is None:
            raise RuntimeError("start_masking() first")
        return self.layout.placement(self.slot_of[node])

    def forwarded(self, node: int) -> tuple[list[int], list[bytes]]:
        """The ciphertexts addressed to ``node`` by every other partner that shared keys."""
        dst = self.index[node]
        sources = sorted(src for src in self.outbox if src != dst)
        return sources, [self.outbox[src][dst] for src in sources]

    # stage 3 ---------------------------------------------------------------
    def add_masked(self, node: int, vector: np.ndarray) -> None:
        if self.layout is None or self.total is None:
            raise RuntimeError("start_masking() first")
        i = self.index[node]
        if i not in self.outbox or i in self.survivors:
            raise SecureAggregationError("it did not share keys this round, or already sent a vector")
        if vector.dtype != self.params.dtype or vector.shape != (self.layout.length,):
            raise SecureAggregationError(
                f"its masked vector is {vector.dtype}{vector.shape}, expected "
                f"{np.dtype(self.params.dtype)}({self.layout.length},)"
            )
        self.total += vector  # wraps mod 2**bits; the vector itself is not kept
        self.survivors.append(i)

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """(survivors, dropped) by index; aborts below the threshold, before any share is asked."""
        self._enough(len(self.survivors), "sent masked vectors")
        survivors = sorted(self.survivors)
        dropped = sorted(set(self.outbox) - set(survivors))
        return survivors, dropped

    # stage 4 ---------------------------------------------------------------
    def add_shares(self, node: int, shares: dict[int, bytes]) -> None:
        if self.index[node] not in self.survivors or self.index[node] in self.revealed:
            raise SecureAggregationError("it sent no masked vector this round, or already sent shares")
        survivors, dropped = self.unmask_request()
        if set(shares) != set(survivors) | set(dropped):
            raise SecureAggregationError("its shares do not cover exactly the survivors and the dropped")
        for owner, share in shares.items():
            self.shares.setdefault(owner, []).append(share)
        self.revealed.add(self.index[node])

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        """Remove every mask from the running sum and decode the per-scope means."""
        if self.layout is None or self.total is None:
            raise RuntimeError("start_masking() first")
        survivors, dropped = self.unmask_request()
        t = self.params.threshold
        short = sorted(owner for owner in survivors + dropped if len(self.shares.get(owner, [])) < t)
        if short:
            raise SecureAggregationError(
                f"secure aggregation aborted in round {self.server_round}: fewer than {t} shares "
                f"came back for partner index(es) {short}"
            )
        dtype, length = self.params.dtype, self.layout.length
        total = self.total.copy()
        for owner in survivors:
            seed = self._combine(owner)
            total -= mask_stream(seed, length, dtype)
        for owner in dropped:
            mask_private = self._combine(owner)
            if _public_of_or_none(mask_private) != self.keys[owner][0]:
                raise SecureAggregationError(
                    f"secure aggregation aborted in round {self.server_round}: the shares of partner "
                    f"index {owner}'s mask key do not rebuild the key it advertised"
                )
            for survivor in survivors:
                pairwise = mask_stream(agree(mask_private, self.keys[survivor][0], MASK_INFO), length, dtype)
                # The survivor added the mask when its index was higher, subtracted it otherwise.
                total = total - pairwise if survivor > owner else total + pairwise
        return self.layout.decode(total, self.params)

    def _combine(self, owner: int) -> bytes:
        try:
            return combine_shares(self.shares[owner][: self.params.threshold])
        except ValueError:
            raise SecureAggregationError(
                f"secure aggregation aborted in round {self.server_round}: the shares of partner "
                f"index {owner} do not combine"
            ) from None

    def _enough(self, count: int, what: str) -> None:
        t = self.params.threshold
        if count < t:
            raise SecureAggregationError(
                f"secure aggregation aborted in round {self.server_round}: only {count} partner(s) "
                f"{what}, fewer than federation.secagg_threshold = {t}; nothing is unmasked or aggregated"
            )


def _public_of_or_none(private: bytes) -> bytes | None:
    try:
        return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    except ValueError:
        return None
