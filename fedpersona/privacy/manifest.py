"""The release manifest: everything a partner may send, and why each item is allowed.

Each item is one key (or key pattern) of one record of one message type, with its status:

- ``dp``: the output of a differentially private mechanism, charged to the partner's ledger
  before it was computed (the DP-SGD model update of that round);
- ``public``: public by declaration: a function of the partner's configuration, its schema
  and its example counts, which the partner declares public (as in every FL system: the
  server needs the counts to weight the average);
- ``opt-in``: NOT differentially private, sent only when the partner sets
  ``share_eval_metrics = true`` (evaluation metrics on its held-out rows).

The partner's actual row count is never sent. Its ``rows`` is ``data.public_rows``, a round
figure the partner declares in its client.toml (public by declaration, like the schema's
bounds); the sample rate, steps per round, noise plan, the expected batch size a noisy sum is
divided by and the aggregation weight are functions of that declaration only, so adding or
removing one user changes no parameter of any mechanism (see ``docs/privacy.md``,
"Neighbouring relation"). ``epsilon`` in a reply is the partner's cumulative epsilon as its
ledger records it: a function of the public plan parameters only.

**Error replies** (:func:`error_reason`) carry one of the fixed codes of :data:`ERROR_CODES`
and a reason that is the JSON object ``{"category": ..., "epsilon": ...}``: the category word
and the ledger's epsilon, nothing else. The exception's own text (which may quote a cell of
the partner's table) stays in the partner's log.

Items name the full message type: with secure aggregation (:mod:`fedpersona.federation.secagg`) the
``query.secagg_*`` replies carry public keys, parameter shapes, encrypted shares and revealed
shares (cryptographic material drawn independently of the data), and ``train.secagg`` carries
the masked DP update instead of ``train``'s arrays.

The ClientApp checks every outgoing reply against this list and refuses to send a key that is
not declared (or an opt-in key the partner did not opt into). ``docs/privacy.md`` shows the
same table; a test keeps the two in step.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpersona.errors import FedPersonaError

__all__ = [
    "ERROR_CODES",
    "MANIFEST",
    "REFUSALS",
    "ReleaseError",
    "ReleaseItem",
    "audit_entry",
    "check_outgoing",
    "error_reason",
    "parse_error_reason",
    "write_audit",
]

Status = Literal["dp", "public", "opt-in"]


class ReleaseError(FedPersonaError):
    """An outgoing message holds something the release manifest does not allow."""

    category = "release"


@dataclass(frozen=True)
class ReleaseItem:
    message: str
    record: str
    key: str
    status: Status
    why: str


_PLAN = "the noise plan: a function of the partner's privacy config and its declared public_rows"
_EPS = "cumulative epsilon from the ledger (a function of public plan parameters)"
_ROWS = "data.public_rows, declared by the partner (not computed from its table)"
_KEY = "fresh X25519 public key of this round (cryptographic material, independent of the data)"
_SHAPES = "parameter shapes: a function of the public model config and schema"
_SHARES = "Shamir shares of a random mask seed and a random key (independent of the data)"
MANIFEST: tuple[ReleaseItem, ...] = (
    ReleaseItem("query", "info", "name", "public", "the partner's name from its client.toml"),
    ReleaseItem("query", "info", "kind", "public", "the silo kind from its client.toml"),
    ReleaseItem("query", "info", "fingerprint", "public", "hash of the schema (public by declaration)"),
    ReleaseItem("query", "info", "schema_version", "public", "from the schema"),
    ReleaseItem("query", "info", "rows", "public", _ROWS),
    ReleaseItem("query", "info", "epsilon", "public", _EPS),
    ReleaseItem("query", "info", "noise_seeds_known", "public", "the partner's privacy config (noise_seed set)"),
    ReleaseItem("query", "info", "require_secure_aggregation", "public", "the partner's release config"),
    ReleaseItem("query", "info", "private", "public", "whether the partner runs DP (its config)"),
    ReleaseItem("query", "info", "noise_multiplier", "public", _PLAN),
    ReleaseItem("query", "info", "sample_rate", "public", _PLAN),
    ReleaseItem("query", "info", "steps_per_round", "public", _PLAN),
    ReleaseItem("query", "info", "planned_rounds", "public", _PLAN),
    ReleaseItem("query", "info", "target_epsilon", "public", "the partner's privacy config"),
    ReleaseItem("query", "info", "delta", "public", "the partner's privacy config"),
    ReleaseItem("query", "info", "accountant", "public", "the partner's privacy config"),
    ReleaseItem("query", "info", "max_grad_norm", "public", "the partner's privacy config"),
    ReleaseItem("query", "info", "share_eval_metrics", "public", "the partner's release config"),
    ReleaseItem("query", "info", "persona_width", "public", "columns of the persona view: from the schema alone"),
    ReleaseItem("query", "info", "gram_noise", "public", _PLAN),
    ReleaseItem("query", "info", "em_noise", "public", _PLAN),
    ReleaseItem("train", "arrays", "trunk.*", "dp", "DP-SGD update; ledger entry of this round"),
    ReleaseItem("train", "arrays", "adapter.*", "dp", "DP-SGD update; ledger entry of this round"),
    ReleaseItem("train", "arrays", "label_model.*", "dp", "DP-SGD update; ledger entry of this round"),
    ReleaseItem("train", "metrics", "num-examples", "public", _ROWS),
    ReleaseItem("train", "metrics", "steps", "public", _PLAN),
    ReleaseItem("train", "metrics", "sample_rate", "public", _PLAN),
    ReleaseItem("train", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("evaluate", "metrics", "epsilon", "public", _EPS),
    ReleaseItem(
        "query.persona_release",
        "release",
        "gram",
        "dp",
        "DP Gram matrix of the persona view: Gaussian noise, sensitivity C^2 + gamma^2; ledger entry dp-gram",
    ),
    ReleaseItem(
        "query.persona_release",
        "release",
        "sums",
        "dp",
        "DP-EM statistics: Gaussian noise, joint sensitivity with the counts; ledger entry dp-em",
    ),
    ReleaseItem(
        "query.persona_release", "release", "counts", "dp", "DP-EM statistics: released with the sums, same entry"
    ),
    ReleaseItem("query.persona_release", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.personas", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.personas", "metrics", "personas_found", "opt-in", "count of personas among the users, NOT DP"),
    ReleaseItem("query.personas", "metrics", "persona_ari", "opt-in", "ARI vs synthetic ground truth, NOT DP"),
    ReleaseItem("query.personas", "metrics", "surrogate_fidelity", "opt-in", "surrogate tree fidelity, NOT DP"),
    ReleaseItem(
        "query.personas", "metrics", "rec_hit_rate", "opt-in", "e-commerce persona top-3 category hit rate, NOT DP"
    ),
    ReleaseItem(
        "query.personas", "metrics", "rec_hit_rate_popularity", "opt-in", "popularity-baseline hit rate, NOT DP"
    ),
    ReleaseItem("query.secagg_setup", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.secagg_share_keys", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.secagg_unmask", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.final_model", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.status", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.secagg_setup", "secagg", "mask_key", "public", _KEY),
    ReleaseItem("query.secagg_setup", "secagg", "share_key", "public", _KEY),
    ReleaseItem("query.secagg_setup", "shapes", "trunk.*", "public", _SHAPES),
    ReleaseItem("query.secagg_setup", "shapes", "adapter.*", "public", _SHAPES),
    ReleaseItem("query.secagg_setup", "shapes", "label_model.*", "public", _SHAPES),
    ReleaseItem(
        "query.secagg_setup", "shapes", "persona_total.*", "public", "persona release shapes: from the schema and K"
    ),
    ReleaseItem(
        "query.secagg_setup", "shapes", "persona_kind.*", "public", "persona release shapes: from the schema and K"
    ),
    ReleaseItem(
        "query.persona_release_secagg",
        "masked",
        "vector",
        "dp",
        "masked, quantized DP persona release (Gram or EM statistics); ledger entry",
    ),
    ReleaseItem("query.persona_release_secagg", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.secagg_share_keys", "secagg", "destinations", "public", "indices of the round's partners"),
    ReleaseItem("query.secagg_share_keys", "secagg", "ciphertexts", "public", _SHARES + ", encrypted per recipient"),
    ReleaseItem(
        "train.secagg", "masked", "vector", "dp", "masked, quantized DP-SGD update; ledger entry of this round"
    ),
    ReleaseItem("train.secagg", "metrics", "num-examples", "public", _ROWS),
    ReleaseItem("train.secagg", "metrics", "steps", "public", _PLAN),
    ReleaseItem("train.secagg", "metrics", "sample_rate", "public", _PLAN),
    ReleaseItem("train.secagg", "metrics", "epsilon", "public", _EPS),
    ReleaseItem("query.secagg_unmask", "secagg", "owners", "public", "indices of the round's partners"),
    ReleaseItem(
        "query.secagg_unmask", "secagg", "shares", "public", _SHARES + " (seeds of survivors, keys of dropped)"
    ),
    ReleaseItem("evaluate", "metrics", "label_auc", "opt-in", "held-out metric, NOT DP"),
    ReleaseItem("evaluate", "metrics", "label_signal", "opt-in", "detector verdict on the partner's rows, NOT DP"),
    ReleaseItem("evaluate", "metrics", "probe_auc", "opt-in", "held-out metric, NOT DP"),
    ReleaseItem("evaluate", "metrics", "reconstruction_error", "opt-in", "held-out metric, NOT DP"),
    ReleaseItem("evaluate", "metrics", "ari", "opt-in", "held-out metric on synthetic ground truth, NOT DP"),
    ReleaseItem("evaluate", "metrics", "alone_auc", "opt-in", "held-out AUC of the partner's own model, NOT DP"),
    ReleaseItem("evaluate", "metrics", "local_auc", "opt-in", "held-out AUC, local model with the federation, NOT DP"),
    ReleaseItem("evaluate", "metrics", "alone_ari", "opt-in", "own k-means on synthetic ground truth, NOT DP"),
)


ERROR_CODES: dict[str, int] = {
    "error": 4001,  # any other user-fixable problem at the partner
    "privacy-budget": 4002,  # the work would exceed the partner's epsilon target
    "ledger": 4003,  # the privacy ledger is missing, rolled back, truncated or edited
    "data": 4004,  # the partner's table does not match its schema or cannot be read
    "config": 4005,  # the partner's configuration or plan is invalid or changed
    "secure-aggregation": 4006,  # a secure-aggregation check failed at the partner
    "model": 4007,  # a received model does not verify or cannot be installed
    "release": 4008,  # the reply would hold something the manifest does not allow
    "policy": 4009,  # the partner's policy refuses the request (e.g. plain aggregation)
    "registry": 4010,  # a model registry problem
    "internal": 4099,  # an unexpected failure at the partner (details in its log)
}
"""The codes of a partner's error replies, by category: the whole of what an error says."""

REFUSALS = frozenset(
    ERROR_CODES[c] for c in ("error", "privacy-budget", "ledger", "data", "config", "release", "policy", "model")
)
"""Codes by which a partner refuses for the rest of the run (its own decision, not a fault)."""


def error_reason(category: str, epsilon: float | None) -> str:
    """The reason string of an error reply: the category and the ledger's epsilon, as JSON."""
    if category not in ERROR_CODES:
        raise ValueError(f"unknown error category {category!r}")
    body: dict[str, Any] = {"category": category}
    if epsilon is not None:
        body["epsilon"] = float(epsilon)
    return json.dumps(body, sort_keys=True)


def parse_error_reason(reason: str | None) -> tuple[str, float | None]:
    """``(category, epsilon)`` of an error reply's reason; errors Flower itself made (a node
    went away, a message expired) are not JSON and come back as ``("unreachable", None)``."""
    try:
        body = json.loads(reason or "")
    except ValueError:
        return "unreachable", None
    if not isinstance(body, dict) or body.get("category") not in ERROR_CODES:
        return "unreachable", None
    epsilon = body.get("epsilon")
    return str(body["category"]), float(epsilon) if isinstance(epsilon, int | float) else None


def _lookup(message: str, record: str, key: str) -> ReleaseItem | None:
    for item in MANIFEST:
        if item.message == message and item.record == record and fnmatch.fnmatchcase(key, item.key):
            return item
    return None


def _records(content: RecordDict) -> list[tuple[str, str, ArrayRecord | ConfigRecord | MetricRecord]]:
    out: list[tuple[str, str, Any]] = []
    for name, record in content.items():
        out.append((name, type(record).__name__, record))
    return out


def check_outgoing(message_type: str, content: RecordDict, *, share_eval_metrics: bool) -> list[ReleaseItem]:
    """The manifest items an outgoing reply uses; raises :class:`ReleaseError` otherwise.

    Items match the exact message type: a ``query.secagg_setup`` reply may carry only what is
    declared for ``query.secagg_setup``, not what a ``query`` reply may.
    """
    used: list[ReleaseItem] = []
    problems: list[str] = []
    for name, _, record in _records(content):
        for key in record:
            item = _lookup(message_type, name, key)
            if item is None:
                problems.append(f"'{name}.{key}' is not in the release manifest for '{message_type}' replies")
            elif item.status == "opt-in" and not share_eval_metrics:
                problems.append(f"'{name}.{key}' is not DP and release.share_eval_metrics is false")
            else:
                used.append(item)
    if problems:
        raise ReleaseError("refusing to send: " + "; ".join(problems))
    return used


def audit_entry(
    message_type: str, server_round: int | None, content: RecordDict, ledger_seq: int | None
) -> dict[str, Any]:
    """What left: message type, keys, shapes, dtypes and bytes, and the ledger entry that paid."""
    items: list[dict[str, Any]] = []
    total = 0
    for name, _, record in _records(content):
        for key, value in record.items():
            if isinstance(value, Array):
                array = value.numpy()
                items.append(
                    {
                        "record": name,
                        "key": key,
                        "shape": list(array.shape),
                        "dtype": str(array.dtype),
                        "bytes": array.nbytes,
                    }
                )
                total += array.nbytes
            else:
                size = len(json.dumps(value, default=str))
                items.append({"record": name, "key": key, "value": value, "bytes": size})
                total += size
    return {
        "time": time.time(),
        "message_type": message_type,
        "round": server_round,
        "ledger_entry": ledger_seq,
        "bytes": total,
        "items": items,
    }


def write_audit(state_dir: str | Path, entry: dict[str, Any]) -> None:
    """Append one entry to ``<state_dir>/audit.jsonl`` (the partner's outbound audit log)."""
    path = Path(state_dir) / "audit.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
