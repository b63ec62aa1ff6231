"""Secure aggregation on Flower's Message API: SecAgg+ (Bell et al., CCS 2020).

With ``[federation] secure_aggregation = true`` the server learns, per round, only the *sum* of
the partners' weighted updates, never one partner's update. A round has four exchanges:

1. ``query.secagg_setup``: the server gives each partner an index (1..n) and the round's
   parameters. The partner makes two fresh X25519 key pairs (one for pairwise masks, one for
   encrypting shares), keeps the private keys in ``Context.state`` and replies with the two
   public keys and the shapes of the parameters it shares.
2. ``query.secagg_share_keys``: the server sends everyone's public keys. The partner draws a
   private mask seed, splits it and its mask private key into Shamir shares (threshold t, one
   share per partner) and replies with each share pair encrypted for its recipient
   (X25519 + HKDF-SHA256 -> Fernet), so the server relays ciphertexts it cannot read.
3. ``train.secagg``: the server sends the global model, where this partner's parameters go in
   the round's flat vector, and the ciphertexts addressed to it. The partner decrypts its
   shares, trains (DP-SGD, charged to its ledger as always), checks that its update is finite,
   clips it per coordinate to the clipping range, quantizes it, multiplies it by its example
   count, adds its private mask and one pairwise mask per other partner (``+`` towards lower,
   ``-`` towards higher indices) modulo ``2**modulus_bits``, and replies with that vector only.
4. ``query.secagg_unmask``: the server names the survivors (masked vector received) and the
   dropped. Each survivor reveals its shares of the survivors' seeds and of the dropped
   partners' mask keys, never both for one partner. The server, which holds only the running
   sum of the masked vectors, rebuilds each seed and key from t shares, removes the masks from
   the sum and divides each segment by its summed count.

The flat vector is laid out over *all* shared parameters of the round: one count per segment,
then the trunk, then every shared slot's adapter. A partner fills the trunk and its own slot's
adapter with ``n_i * q(w_i)`` and both counts with ``n_i``, and leaves zeros elsewhere, so the
server can only ever compute the per-scope weighted means that :class:`ScopedAggregator` needs.
Every partner is every other partner's neighbour (SecAgg+'s graph with k = n - 1).

A round aborts when fewer than ``threshold`` partners are left at any stage: nothing is
unmasked, nothing aggregated. Partners refuse to reveal shares for fewer than ``threshold``
survivors, or for a partner named both survivor and dropped.

Primitives: X25519, HKDF-SHA256 and ChaCha20 from ``cryptography``; Shamir sharing, Fernet
encryption, share packing and dequantization from ``flwr.common.secure_aggregation``. The
masks are ChaCha20 keystreams keyed by 32-byte secrets, not Flower's ``pseudo_rand_gen``,
which folds its seed into 32 bits. Stochastic rounding draws from an injected generator.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedpersona.errors import FedPersonaError
from fedpersona.model.scopes import parameter_scope

__all__ = [
    "PartnerSecrets",
    "Placement",
    "SecAggParams",
    "SecureAggregationError",
    "blobs",
    "decode_shapes",
    "encode_shapes",
    "encode_update",
    "ints",
    "mask_vector",
    "modulus_bits_for",
    "quantize",
    "receive_shares",
    "reveal_shares",
    "share_keys",
    "start_round",
]

logger = logging.getLogger(__name__)

MASK_INFO = b"fedpersona/secagg/pairwise-mask"
_SHARE_INFO = b"fedpersona/secagg/share-encryption"
_SEED_BYTES = 32
Shapes = dict[str, tuple[int, ...]]


class SecureAggregationError(FedPersonaError):
    """A secure-aggregation step cannot go on (a partner refuses, or the server aborts)."""

    category = "secure-aggregation"


# --------------------------------------------------------------------------- parameters

RELEASE_SCOPES = {"persona_total": "global", "persona_kind": "kind"}
"""The securely summed persona releases: a slot's Gram matrix or EM statistics
(``persona_kind.*``, the slot's segment) and a count of contributors over every partner
(``persona_total.ones``)."""


def vector_scope(name: str) -> str:
    """The scope of a name in a secure vector: a model parameter's, or a persona release's."""
    prefix = name.split(".", 1)[0]
    if prefix in RELEASE_SCOPES:
        return RELEASE_SCOPES[prefix]
    return parameter_scope(name)


def strict_majority(partners: int) -> int:
    """The smallest threshold a partner accepts for a round of ``partners``: more than half."""
    return partners // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """One round's public parameters, chosen by the server and checked by every partner."""

    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_bits: int

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.threshold, int) or self.threshold < 2:
            problems.append(f"threshold must be an integer >= 2, got {self.threshold!r}")
        c = self.clipping_range
        if not (isinstance(c, int | float) and math.isfinite(c) and c > 0):
            problems.append(f"clipping_range must be a finite number > 0, got {c!r}")
        if not isinstance(self.quantization_range, int) or not 2 <= self.quantization_range <= 2**32:
            problems.append(f"quantization_range must be an integer in [2, 2**32], got {self.quantization_range!r}")
        if self.modulus_bits not in (32, 64):
            problems.append(f"modulus_bits must be 32 or 64, got {self.modulus_bits!r}")
        if problems:
            raise SecureAggregationError("secure aggregation: " + "; ".join(problems))

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        """Vectors live in Z / 2**modulus_bits; unsigned arithmetic wraps exactly there."""
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    @property
    def step(self) -> float:
        """One quantization step: every coordinate of a mean is within this of the exact one."""
        return 2.0 * self.clipping_range / self.quantization_range

    def to_config(self) -> dict[str, Any]:
        return {f"secagg.{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SecAggParams:
        return cls(
            threshold=int(config["secagg.threshold"]),
            clipping_range=float(config["secagg.clipping_range"]),
            quantization_range=int(config["secagg.quantization_range"]),
            modulus_bits=int(config["secagg.modulus_bits"]),
        )


def modulus_bits_for(total_examples: int, quantization_range: int) -> int:
    """32 when the largest possible sum ``total_examples * quantization_range`` fits, else 64."""
    largest = total_examples * quantization_range
    if largest < 2**32:
        return 32
    if largest < 2**64:
        return 64
    raise SecureAggregationError(
        f"secure aggregation: {total_examples} examples x quantization range {quantization_range} "
        "does not fit in 64 bits; lower federation.secagg_quantization_range"
    )


def encode_shapes(shapes: Shapes) -> dict[str, str]:
    """Shapes as JSON strings (a ConfigRecord holds no empty lists)."""
    return {name: json.dumps(list(shape)) for name, shape in shapes.items()}


def decode_shapes(record: ConfigRecord | dict[str, Any]) -> Shapes:
    return {str(name): tuple(int(d) for d in json.loads(str(value))) for name, value in record.items()}


def ints(value: object, what: str) -> list[int]:
    """A received list of integers, checked (records come from the other side)."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SecureAggregationError(f"secure aggregation: {what} must be a list of integers")
    return [int(v) for v in value]


def blobs(value: object, what: str) -> list[bytes]:
    """A received list of byte strings, checked."""
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise SecureAggregationError(f"secure aggregation: {what} must be a list of byte strings")
    return list(value)


# --------------------------------------------------------------------------- vector layout


@dataclass(frozen=True)
class Placement:
    """What one partner needs to know of the layout: its two segments, nothing of the others."""

    length: int
    trunk_count: int
    trunk_offset: int
    trunk_size: int
    adapter_count: int = -1
    adapter_offset: int = -1
    adapter_size: int = 0

    def __post_init__(self) -> None:
        counts, spans = [self.trunk_count], [(self.trunk_offset, self.trunk_size)]
        if self.adapter_size:
            counts.append(self.adapter_count)
            spans.append((self.adapter_offset, self.adapter_size))
        spans.sort()
        position, ok = spans[0][0], len(set(counts)) == len(counts) and all(0 <= c < spans[0][0] for c in counts)
        for offset, size in spans:  # segments after the counts, in order, not overlapping
            ok = ok and offset >= position and size >= 0
            position = offset + size
        if not (ok and position <= self.length):
            raise SecureAggregationError(f"secure aggregation: the server's vector layout is inconsistent: {self}")

    def to_config(self) -> dict[str, int]:
        return {f"secagg.{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Placement:
        return cls(**{f.name: int(config[f"secagg.{f.name}"]) for f in fields(cls)})


def _new_key_pair() -> tuple[bytes, bytes]:
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def agree(private: bytes, public: bytes, info: bytes) -> bytes:
    """X25519 key agreement, then HKDF-SHA256 to a 32-byte key bound to its purpose."""
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise SecureAggregationError(f"secure aggregation: key agreement failed ({exc})") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def mask_stream(key: bytes, length: int, dtype: type[np.unsignedinteger[Any]]) -> np.ndarray:
    """A uniform vector in Z / 2**bits: the ChaCha20 keystream of a 32-byte key."""
    item = np.dtype(dtype)
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(length * item.itemsize))
    return np.frombuffer(stream, dtype=item.newbyteorder("<")).astype(item)


def quantize(
    values: np.ndarray, *, clipping_range: float, quantization_range: int, generator: np.random.Generator
) -> np.ndarray:
    """Stochastic rounding of ``values`` (already inside +-clipping_range) to {0..range}.

    Unbiased; ``flwr``'s :func:`dequantize` is the inverse on averages.
    """
    scaled = (np.asarray(values, dtype=np.float64) + clipping_range) * (quantization_range / (2 * clipping_range))
    floor = np.floor(scaled)
    up = generator.random(scaled.shape) < scaled - floor
    return np.clip(floor + up, 0, quantization_range).astype(np.int64)


# --------------------------------------------------------------------------- partner side


@dataclass(frozen=True)
class PartnerSecrets:
    """A partner's state for one round; kept in ``Context.state["secagg"]``, never sent.

    Stages: ``setup`` (key pairs made) -> ``shared`` (seed drawn, shares sent) -> ``received``
    (others' shares decrypted) -> ``masked`` (private keys and seed wiped) -> ``done`` (shares
    revealed once, everything wiped).
    """

    server_round: int
    index: int
    params: SecAggParams
    stage: str
    mask_private: bytes = b""
    mask_public: bytes = b""
    share_private: bytes = b""
    share_public: bytes = b""
    seed: bytes = b""
    peers: tuple[int, ...] = ()  # every partner of the round, this one included
    peer_mask_keys: tuple[bytes, ...] = ()  # aligned with peers
    peer_share_keys: tuple[bytes, ...] = ()  # aligned with peers
    holders: tuple[int, ...] = ()  # whose shares this partner holds (itself first)
    seed_shares: tuple[bytes, ...] = ()  # aligned with holders
    key_shares: tuple[bytes, ...] = ()  # aligned with holders

    def to_record(self) -> ConfigRecord:
        values: dict[str, Any] = dict(self.params.to_config())
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "params":
                continue
            if isinstance(value, tuple):
                value = list(value)
            if value in (b"", []):
                continue  # a ConfigRecord cannot size empty values
            values[f.name] = value
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: ConfigRecord, *, server_round: int) -> PartnerSecrets:
        data: dict[str, Any] = dict(record)
        if int(data.get("server_round", -1)) != server_round:
            raise SecureAggregationError(
                f"secure aggregation: this node is in round {data.get('server_round')}'s protocol, "
                f"the server asked for round {server_round}"
            )
        kwargs: dict[str, Any] = {"params": SecAggParams.from_config(data)}
        for f in fields(cls):
            if f.name == "params" or f.name not in data:
                continue
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecureAggregationError(
                f"secure aggregation: round {self.server_round} is at stage '{self.stage}' on this node, "
                f"expected '{stage}'; refusing"
            )


def start_round(*, server_round: int, index: int, params: SecAggParams) -> tuple[PartnerSecrets, dict[str, bytes]]:
    """Stage 1: two fresh X25519 key pairs; returns the secrets and the two public keys."""
    if not isinstance(index, int) or index < 1:
        raise SecureAggregationError(f"secure aggregation: partner index must be >= 1, got {index!r}")
    mask_private, mask_public = _new_key_pair()
    share_private, share_public = _new_key_pair()
    secrets = PartnerSecrets(
        server_round=server_round, index=index, params=params, stage="setup",
        mask_private=mask_private, mask_public=mask_public,
        share_private=share_private, share_public=share_public,
    )  # fmt: skip
    return secrets, {"mask_key": mask_public, "share_key": share_public}


def _share_key(secrets: PartnerSecrets, public: bytes) -> bytes:
    return base64.urlsafe_b64encode(agree(secrets.share_private, public, _SHARE_INFO))


def share_keys(
    secrets: PartnerSecrets, public_keys: dict[int, tuple[bytes, bytes]]
) -> tuple[PartnerSecrets, dict[int, bytes]]:
    """Stage 2: Shamir-share a fresh mask seed and the mask key; one ciphertext per peer."""
    secrets.expect("setup")
    problems = []
    t = secrets.params.threshold
    if public_keys.get(secrets.index) != (secrets.mask_public, secrets.share_public):
        problems.append(f"the key list does not hold this partner's own keys at index {secrets.index}")
    if len(public_keys) < t:
        problems.append(f"{len(public_keys)} partner(s) in the round, fewer than the threshold {t}")
    elif t < strict_majority(len(public_keys)):
        # Below a strict majority a deviating server can collect one partner's mask-key shares
        # from some partners ("it dropped") and its seed shares from others ("it survived").
        problems.append(
            f"the threshold {t} is not a strict majority of the {len(public_keys)} partners of the round "
            f"(at least {strict_majority(len(public_keys))})"
        )
    every = [key for pair in public_keys.values() for key in pair]
    if len(set(every)) != len(every):
        problems.append("two partners advertised the same public key")
    if problems:
        raise SecureAggregationError("secure aggregation: refusing to share keys: " + "; ".join(problems))
    seed = os.urandom(_SEED_BYTES)
    peers = sorted(public_keys)
    seed_shares = create_shares(seed, t, len(peers))
    key_shares = create_shares(secrets.mask_private, t, len(peers))
    own: tuple[bytes, bytes] = (b"", b"")
    out: dict[int, bytes] = {}
    for peer, seed_share, key_share in zip(peers, seed_shares, key_shares, strict=True):
        if peer == secrets.index:
            own = (seed_share, key_share)
            continue
        plaintext = share_keys_plaintext_concat(secrets.index, peer, seed_share, key_share)
        out[peer] = encrypt(_share_key(secrets, public_keys[peer][1]), plaintext)
    shared = replace(
        secrets, stage="shared", seed=seed, peers=tuple(peers),
        peer_mask_keys=tuple(public_keys[p][0] for p in peers),
        peer_share_keys=tuple(public_keys[p][1] for p in peers),
        holders=(secrets.index,), seed_shares=(own[0],), key_shares=(own[1],),
    )  # fmt: skip
    return shared, out


def receive_shares(secrets: PartnerSecrets, ciphertexts: dict[int, bytes]) -> PartnerSecrets:
    """Stage 3, first half: decrypt and check the shares the other partners sent this one."""
    secrets.expect("shared")
    strangers = sorted(src for src in ciphertexts if src == secrets.index or src not in secrets.peers)
    if strangers:
        raise SecureAggregationError(
            f"secure aggregation: refusing ciphertexts from indices {strangers}: not other partners of this round"
        )
    t = secrets.params.threshold
    if len(ciphertexts) + 1 < t:
        raise SecureAggregationError(
            f"secure aggregation: shares from {len(ciphertexts)} other partner(s); with this one that is "
            f"fewer than the threshold {t}"
        )
    problems = []
    holders, seed_shares, key_shares = [secrets.index], [secrets.seed_shares[0]], [secrets.key_shares[0]]
    public_of = dict(zip(secrets.peers, secrets.peer_share_keys, strict=True))
    for src in sorted(ciphertexts):
        try:
            plaintext = decrypt(_share_key(secrets, public_of[src]), ciphertexts[src])
        except InvalidToken:
            problems.append(f"the ciphertext from index {src} does not decrypt")
            continue
        actual_src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (actual_src, dst) != (src, secrets.index):
            problems.append(f"the ciphertext relayed as {src} -> {secrets.index} says {actual_src} -> {dst}")
            continue
        holders.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    if problems:
        raise SecureAggregationError("secure aggregation: refusing the shares: " + "; ".join(problems))
    return replace(
        secrets, stage="received", share_private=b"",
        holders=tuple(holders), seed_shares=tuple(seed_shares), key_shares=tuple(key_shares),
    )  # fmt: skip


def encode_update(
    arrays: dict[str, np.ndarray],
    *,
    num_examples: int,
    placement: Placement,
    params: SecAggParams,
    generator: np.random.Generator,
    trunk_weight: int | None = None,
) -> np.ndarray:
    """The plaintext vector: ``n * q(clip(w))`` in this partner's segments, ``n`` in its counts.

    ``trunk_weight`` (an integer the server derives from public counts and kinds, e.g. for
    kind-balanced trunk averaging) replaces ``n`` in the trunk segment and its count.

    Refuses non-finite values (quantization would silently turn NaN into a large number) and
    clips every coordinate to +-clipping_range first, logging how many it clipped.
    """
    trunk = {n: v for n, v in arrays.items() if vector_scope(n) == "global"}
    adapter = {n: v for n, v in arrays.items() if vector_scope(n) == "kind"}
    problems = []
    if set(arrays) - set(trunk) - set(adapter):
        problems.append(f"local parameters {sorted(set(arrays) - set(trunk) - set(adapter))} cannot be sent")
    sizes = (sum(v.size for v in trunk.values()), sum(v.size for v in adapter.values()))
    if sizes != (placement.trunk_size, placement.adapter_size):
        problems.append(
            f"this partner shares {sizes[0]} trunk and {sizes[1]} adapter values, the server's layout "
            f"expects {placement.trunk_size} and {placement.adapter_size}"
        )
    tw = num_examples if trunk_weight is None else trunk_weight
    for what, weight in (("example count", num_examples), ("trunk weight", tw)):
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            problems.append(f"the {what} must be an integer >= 1, got {weight!r}")
        elif weight * params.quantization_range >= 2**params.modulus_bits:
            problems.append(f"a {what} of {weight} overflows a {params.modulus_bits}-bit sum")
    if problems:
        raise SecureAggregationError("secure aggregation: refusing to encode the update: " + "; ".join(problems))
    names = sorted(trunk) + sorted(adapter)
    values = np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in names])
    bad = ~np.isfinite(values)
    if bad.any():
        raise SecureAggregationError(
            f"secure aggregation: the update holds {int(bad.sum())} non-finite value(s); refusing to send it"
        )
    c = params.clipping_range
    over = np.abs(values) > c
    if over.any():
        logger.warning(
            "secure aggregation: %d of %d update values outside +-%g clipped (largest |value| %.4g); "
            "raise federation.secagg_clipping_range if this repeats",
            int(over.sum()), values.size, c, float(np.abs(values).max()),
        )  # fmt: skip
    q = quantize(
        np.clip(values, -c, c), clipping_range=c, quantization_range=params.quantization_range, generator=generator
    )
    q = q.astype(params.dtype)
    vector = np.zeros(placement.length, dtype=params.dtype)  # products < 2**bits, checked above
    vector[placement.trunk_count] = tw
    vector[placement.trunk_offset : placement.trunk_offset + placement.trunk_size] = q[
        : placement.trunk_size
    ] * params.dtype(tw)
    if placement.adapter_size:
        vector[placement.adapter_count] = num_examples
        end = placement.adapter_offset + placement.adapter_size
        vector[placement.adapter_offset : end] = q[placement.trunk_size :] * params.dtype(num_examples)
    return vector


def mask_vector(secrets: PartnerSecrets, vector: np.ndarray) -> tuple[np.ndarray, PartnerSecrets]:
    """Stage 3, second half: add the private mask and the pairwise masks (mod 2**bits)."""
    secrets.expect("received")
    dtype = secrets.params.dtype
    if vector.dtype != dtype or vector.ndim != 1:
        raise SecureAggregationError(f"secure aggregation: expected a flat {np.dtype(dtype)} vector")
    masked = vector + mask_stream(secrets.seed, vector.size, dtype)
    mask_key_of = dict(zip(secrets.peers, secrets.peer_mask_keys, strict=True))
    for peer in secrets.holders[1:]:
        pairwise = mask_stream(agree(secrets.mask_private, mask_key_of[peer], MASK_INFO), vector.size, dtype)
        masked = masked + pairwise if secrets.index > peer else masked - pairwise
    wiped = replace(secrets, stage="masked", mask_private=b"", seed=b"")
    return masked, wiped


def reveal_shares(
    secrets: PartnerSecrets, *, survivors: list[int], dropped: list[int]
) -> tuple[dict[int, bytes], PartnerSecrets]:
    """Stage 4: seed shares of survivors and mask-key shares of dropped partners, once."""
    secrets.expect("masked")
    problems = []
    t = secrets.params.threshold
    both = sorted(set(survivors) & set(dropped))
    if both:
        problems.append(f"indices {both} are named both survivor and dropped")
    if secrets.index not in survivors:
        problems.append("this partner is not among the survivors")
    if len(set(survivors)) < t:
        problems.append(f"{len(set(survivors))} survivor(s), fewer than the threshold {t}")
    unknown = sorted((set(survivors) | set(dropped)) - set(secrets.holders))
    if unknown:
        problems.append(f"this partner holds no shares of indices {unknown}")
    if problems:
        raise SecureAggregationError("secure aggregation: refusing to reveal shares: " + "; ".join(problems))
    position = {holder: i for i, holder in enumerate(secrets.holders)}
    shares = {s: secrets.seed_shares[position[s]] for s in sorted(set(survivors))}
    shares.update({d: secrets.key_shares[position[d]] for d in sorted(set(dropped))})
    done = PartnerSecrets(secrets.server_round, secrets.index, secrets.params, "done")
    return shares, done


# --------------------------------------------------------------------------- server side
