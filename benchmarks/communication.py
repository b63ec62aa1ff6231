"""Communication: bytes per round per partner, plain FedAvg vs SecAgg+ (:mod:`fedpersona.federation.secagg`),
for the default encoder on the three primary schemas in one federation of 12 partners
(``simulations/real_silos.toml``: 3 kinds x (3 + 1 small) partners).

Payload sizes come from the messages' content: ``ArrayRecord.count_bytes()`` for arrays, the
real key, ciphertext and share lengths of a SecAgg+ round for the rest (message headers and
gRPC framing are not counted).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.secure_aggregation.crypto.shamir import create_shares

from fedpersona.config.settings import ModelSettings
from fedpersona.data.features import layout_of
from fedpersona.data.schema_reader import load_schema
from fedpersona.federation.messages import encode_arrays
from fedpersona.federation.secagg import SecAggParams, modulus_bits_for, share_keys, start_round
from fedpersona.federation.secure_round import VectorLayout
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.scopes import parameter_scope

REPO = Path(__file__).resolve().parents[1]
KINDS, PER_KIND, ROWS_PER_PARTNER = ("ecommerce", "finance", "health"), 4, 20_000
QUANTIZATION_RANGE, CLIPPING_RANGE = 2**16, 8.0  # fedpersona.config.legacy defaults


def run(*, quick: bool) -> dict[str, Any]:
    del quick  # cheap either way
    shared: dict[str, dict[str, np.ndarray]] = {}
    for kind in KINDS:
        schema = load_schema(REPO / "clients" / kind / "schema.toml")
        torch.manual_seed(0)
        model = PersonaEncoder(layout_of(schema), ModelSettings())
        shared[kind] = {n: v.numpy() for n, v in model.state_dict().items() if parameter_scope(n) != "local"}
    n = len(KINDS) * PER_KIND
    trunk = {k: v.shape for k, v in shared[KINDS[0]].items() if parameter_scope(k) == "global"}
    slots = {kind: {k: v.shape for k, v in a.items() if parameter_scope(k) == "kind"} for kind, a in shared.items()}
    layout = VectorLayout.build(trunk, slots)
    params = SecAggParams(
        threshold=n // 2 + 1, clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
        modulus_bits=modulus_bits_for(n * ROWS_PER_PARTNER, QUANTIZATION_RANGE),
    )  # fmt: skip
    masked = np.zeros(layout.length, dtype=params.dtype)
    masked_bytes = encode_arrays({"masked": masked}).count_bytes()
    keys = {}
    secrets = {}
    for index in range(1, n + 1):
        secrets[index], public = start_round(server_round=1, index=index, params=params)
        keys[index] = (public["mask_key"], public["share_key"])
    _, ciphertexts = share_keys(secrets[1], keys)
    key_bytes = sum(len(k) for k in keys[1])
    cipher_bytes = sum(len(c) for c in ciphertexts.values())
    share_len = len(create_shares(os.urandom(32), params.threshold, n)[0])
    reveal_bytes = (n - 1) * share_len  # one share per other survivor (no drop-outs)
    rows = []
    for kind in KINDS:
        plain = encode_arrays(shared[kind]).count_bytes()
        up_secure = key_bytes + cipher_bytes + masked_bytes + reveal_bytes
        down_secure = plain + n * key_bytes + (n - 1) * max(len(c) for c in ciphertexts.values())
        rows.append([kind, sum(v.size for v in shared[kind].values()), plain, plain, up_secure, down_secure,
                     f"{up_secure / plain:.2f}x"])  # fmt: skip
    return {
        "title": "Communication",
        "tables": [
            {
                "name": f"Bytes per round per partner, default encoder, {n} partners, SecAgg+ with "
                f"{params.modulus_bits}-bit modulus, threshold {params.threshold}",
                "columns": [
                    "kind",
                    "shared values",
                    "plain up",
                    "plain down",
                    "SecAgg+ up",
                    "SecAgg+ down",
                    "SecAgg+ / plain (up)",
                ],
                "rows": rows,
            },
            {
                "name": "SecAgg+ uplink, per partner per round, by stage",
                "columns": ["stage", "bytes"],
                "rows": [
                    ["1 setup: two X25519 public keys", key_bytes],
                    [f"2 share keys: {n - 1} encrypted share pairs", cipher_bytes],
                    [
                        f"3 masked vector ({layout.length:,} x {params.modulus_bits // 8} bytes, all slots)",
                        masked_bytes,
                    ],
                    [f"4 unmask: {n - 1} seed shares", reveal_bytes],
                ],
            },
        ],
        "notes": [
            "The masked vector spans the trunk and every slot's adapter (a partner fills only its own), "
            "so SecAgg+ uplink grows with the number of kinds; plain FedAvg sends the trunk and its own adapter.",
            "Downlink with SecAgg+ adds everyone's public keys and the ciphertexts addressed to the partner.",
        ],
        "data": {"partners": n, "vector_length": layout.length, "modulus_bits": params.modulus_bits},
    }
