"""What the coordinator writes and hands out at the end of a run.

``privacy.json`` (:func:`write_privacy`: each partner's epsilon as its ledger last reported it,
labelled a lower bound when the partner did not answer the end-of-run status query),
``run.json`` (:func:`write_outcome`: completed or failed, and why), the signed model
(:func:`publish`) and its delivery to every partner (:func:`deliver_model`). A run that
trained nothing publishes nothing (:class:`NothingTrained`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedpersona.config.settings import ModelSettings
from fedpersona.errors import ConfigError, FedPersonaError
from fedpersona.federation.aggregation import ScopedAggregator
from fedpersona.federation.roster import Member, exchange
from fedpersona.model.artifacts import artifact_files, generate_signing_key, save_model
from fedpersona.privacy.manifest import parse_error_reason
from fedpersona.privacy.randomness import KNOWN_SEEDS_LABEL

__all__ = ["NothingTrained", "deliver_model", "publish", "write_outcome", "write_privacy"]

logger = logging.getLogger(__name__)


class NothingTrained(FedPersonaError):
    """A federation ended without aggregating a single training round: nothing is published."""

    category = "error"


def write_outcome(run_dir: Path, *, status: str, reason: str, rounds: int, personas: bool) -> None:
    """``RUN_DIR/run.json``: how the run ended (``completed`` or ``failed``) and why."""
    body = {"status": status, "reason": reason, "rounds_completed": rounds, "personas": personas}
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(run_dir / "run.json")


def write_privacy(run_dir: Path, roster: dict[str, Member]) -> None:
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


def publish(
    run_dir: Path,
    aggregator: ScopedAggregator,
    roster: dict[str, Member],
    model: ModelSettings,
    rounds: int,
    personas: dict[str, Any] | None = None,
    signing_key: Path | None = None,
) -> None:
    """Sign and write ``run_dir/model``. ``signing_key``: the federation's model-signing key (a
    deployment; it must exist); without it the run's own ``run_dir/keys/model-signing.key``,
    made on first use (a simulation)."""
    from cryptography.hazmat.primitives import serialization

    key_path = signing_key or run_dir / "keys" / "model-signing.key"
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    elif signing_key is not None:
        raise ConfigError(
            f"{signing_key}: the federation's model-signing key does not exist, so the model cannot be signed; "
            "server.credentials must name the folder `fedpersona certs init` wrote"
        )
    else:
        key = generate_signing_key(key_path)
    arrays = dict(aggregator.trunk)
    for slot, adapter in aggregator.adapters.items():
        arrays.update({f"{slot}/{name}": value for name, value in adapter.items()})
    card = {
        "version": 1,
        "created": time.time(),
        "rounds": rounds,
        "model": model.model_dump(),
        "slots": sorted(aggregator.adapters),
        "personas": {"k": personas["k"], "method": personas["method"], "slots": personas["slots"]}
        if personas
        else None,
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


def deliver_model(grid: Grid, partners: dict[int, Member], folder: Path, timeout: float, rnd: int) -> list[str]:
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
    for p, reply in exchange(grid, "query.final_model", targets, "final", timeout, partners):
        if reply.has_error():
            category, epsilon = parse_error_reason(reply.error.reason)
            p.record_epsilon(rnd, epsilon)
            logger.warning("partner %s did not install the final model (%s)", p.info["name"], category)
        else:
            delivered.append(str(p.info["name"]))
    logger.info("final model installed at %d of %d partner(s): %s", len(delivered), len(targets), sorted(delivered))
    return sorted(delivered)
