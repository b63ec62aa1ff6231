"""The Flower ClientApp: decode a message, call :mod:`fedpersona.partner`, encode the reply.

How a partner finds its own configuration (``Context.node_config``):

- deployment: ``client-config = "/path/to/client.toml"`` (set by ``fedpersona partner start``);
- simulation: ``partition-id`` picks an entry of ``<run-dir>/partners/index.json``.

A user-fixable problem (e.g. an exhausted privacy budget, a bad data file) is sent back as
an error reply whose reason is the one-paragraph message, so the server can log it and go
on without this partner.

At the end of a deployed run the server sends the signed final model (``query.final_model``);
the partner verifies it against the federation's model-signing key named in its node config
(``model-public-key``, set by ``fedpersona partner start --model-key``), installs it in
``state_dir/model`` and replies with nothing.

With secure aggregation the ``query.secagg_*`` and ``train.secagg`` handlers run the partner's
side of :mod:`fedpersona.secagg`; its secrets live in ``Context.state["secagg"]`` (kept by the
SuperNode between messages, never sent).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpersona.config import PartnerConfig, load_partner_config
from fedpersona.errors import (
    ConfigError,
    FedPersonaError,
    PrivacyBudgetExceeded,
    PrivacyLedgerError,
)
from fedpersona.manifest import audit_entry, check_outgoing, write_audit
from fedpersona.messages import arrays_of, config_of, decode_settings, encode_arrays
from fedpersona.partner import (
    RoundOutcome,
    build_model,
    cluster_round,
    evaluate_round,
    load_partner_data,
    load_plan,
    partner_schema,
    persona_round,
    shared_names,
    spent_epsilon,
    train_round,
)
from fedpersona.privacy import PrivacyLedger
from fedpersona.secagg import (
    PartnerSecrets,
    Placement,
    SecAggParams,
    SecureAggregationError,
    blobs,
    encode_shapes,
    encode_update,
    ints,
    mask_vector,
    receive_shares,
    reveal_shares,
    share_keys,
    start_round,
)
from fedpersona.training import pick_device

__all__ = ["ERROR_BUDGET", "ERROR_USER", "app", "build_client_app"]

logger = logging.getLogger(__name__)

ERROR_USER = 4001
ERROR_BUDGET = 4002


def _partner_config(context: Context, run_dir: str | None) -> PartnerConfig:
    node = context.node_config
    if "client-config" in node:
        return load_partner_config(str(node["client-config"]))
    folder = run_dir or context.run_config.get("run-dir")
    if "partition-id" in node and folder:
        index = json.loads((Path(str(folder)) / "partners" / "index.json").read_text())
        return load_partner_config(index[int(node["partition-id"])])
    raise ConfigError(
        "this node has no partner configuration: start it with node config "
        "client-config=<path to client.toml> (fedpersona partner start does this)"
    )


def _guarded(
    handler: Callable[[Message, Context, PartnerConfig], RecordDict], run_dir: str | None
) -> Callable[[Message, Context], Message]:
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            cfg = _partner_config(context, run_dir)
            content = handler(msg, context, cfg)
            message_type = msg.metadata.message_type
            check_outgoing(message_type, content, share_eval_metrics=cfg.share_eval_metrics)
            if cfg.audit_log:
                rnd = config_of(msg).get("round")
                seq = _last_ledger_seq(cfg) if message_type.startswith("train") else None
                write_audit(cfg.state_dir, audit_entry(message_type, rnd, content, seq))
            return Message(content, reply_to=msg)
        except PrivacyBudgetExceeded as exc:
            logger.warning("refusing work: %s", exc)
            return Message(Error(code=ERROR_BUDGET, reason=str(exc)), reply_to=msg)
        except FedPersonaError as exc:
            logger.error("%s", exc)
            return Message(Error(code=ERROR_USER, reason=str(exc)), reply_to=msg)

    wrapped.__name__ = handler.__name__
    return wrapped


def _last_ledger_seq(cfg: PartnerConfig) -> int | None:
    if not cfg.privacy.private:
        return None
    entries = PrivacyLedger(cfg.state_dir, settings=cfg.privacy).entries
    return entries[-1].seq if entries else None


def _query(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Describe this partner: kind, schema fingerprint, public row count and noise plan."""
    _, training = decode_settings(config_of(msg))
    config = config_of(msg)
    rounds = int(config["num_rounds"])
    data = load_partner_data(cfg, device=pick_device(training.device))
    plan = load_plan(
        cfg, data, training, rounds,
        kmeans_rounds=int(config.get("kmeans_rounds", 0)),
        kmeans_noise=float(config["kmeans_noise"]) if config.get("kmeans_rounds") else None,
    )  # fmt: skip
    schema = partner_schema(cfg)
    info: dict[str, Any] = {
        "name": cfg.name,
        "kind": cfg.kind,
        "fingerprint": schema.fingerprint(),
        "schema_version": schema.version,
        "rows": len(data.train) + len(data.test),
        "train_rows": len(data.train),
        "private": plan.private,
        "noise_multiplier": plan.noise_multiplier if plan.noise_multiplier is not None else 0.0,
        "sample_rate": plan.sample_rate,
        "steps_per_round": plan.steps_per_round,
        "planned_rounds": plan.planned_rounds,
        "target_epsilon": plan.target_epsilon if math.isfinite(plan.target_epsilon) else -1.0,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "max_grad_norm": plan.max_grad_norm,
        "share_eval_metrics": cfg.share_eval_metrics,
    }
    return RecordDict({"info": ConfigRecord(info)})


def _check_ledger_not_rolled_back(context: Context, cfg: PartnerConfig) -> int:
    """Compare the ledger on disk with the entry count this node remembers in Context.state.

    A ledger with fewer entries than the node has already charged means the file was
    replaced or restored from an old copy: the partner refuses to train rather than
    under-count its spending.
    """
    on_disk = len(PrivacyLedger(cfg.state_dir, settings=cfg.privacy).entries)
    if "privacy" in context.state:
        remembered = int(context.state["privacy"]["ledger_entries"])  # type: ignore[arg-type]
        if on_disk < remembered:
            raise PrivacyLedgerError(
                f"{cfg.state_dir}/ledger.jsonl has {on_disk} entries but this node has already "
                f"charged {remembered}: the ledger was rolled back; refusing to train"
            )
    return on_disk


def _run_training(msg: Message, context: Context, cfg: PartnerConfig) -> tuple[RoundOutcome, MetricRecord]:
    config = config_of(msg)
    model_cfg, training = decode_settings(config)
    if cfg.privacy.private:
        _check_ledger_not_rolled_back(context, cfg)
    outcome = train_round(
        cfg=cfg,
        model_cfg=model_cfg,
        training=training,
        received=arrays_of(msg),
        server_round=int(config["round"]),
        num_rounds=int(config["num_rounds"]),
        adapter_shared=bool(config["adapter_shared"]),
        seed=int(config["seed"]),
    )
    metrics: dict[str, Any] = {
        "num-examples": outcome.train_rows,
        "steps": outcome.result.steps,
        "sample_rate": outcome.result.sample_rate,
    }
    if outcome.epsilon is not None:
        metrics["epsilon"] = outcome.epsilon
        entries = len(PrivacyLedger(cfg.state_dir, settings=cfg.privacy).entries)
        context.state["privacy"] = ConfigRecord({"ledger_entries": entries, "epsilon": float(outcome.epsilon)})
    return outcome, MetricRecord(metrics)


def _train(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    outcome, metrics = _run_training(msg, context, cfg)
    return RecordDict({"arrays": encode_arrays(outcome.arrays), "metrics": metrics})


def _secrets(context: Context, config: dict[str, Any]) -> PartnerSecrets:
    if "secagg" not in context.state.config_records:
        raise SecureAggregationError("secure aggregation: this node has no round in progress (no setup message)")
    return PartnerSecrets.from_record(context.state.config_records["secagg"], server_round=int(config["round"]))


def _secagg_setup(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Fresh key pairs for this round; reply with the public keys and the shared shapes."""
    config = config_of(msg)
    model_cfg, training = decode_settings(config)
    data = load_partner_data(cfg, device=pick_device(training.device))
    model = build_model(data, model_cfg, seed=int(config["seed"]), device=pick_device(training.device))
    state = model.state_dict()
    names = shared_names(model, adapter_shared=bool(config["adapter_shared"]))
    secrets, public = start_round(
        server_round=int(config["round"]), index=int(config["secagg.index"]), params=SecAggParams.from_config(config)
    )
    context.state["secagg"] = secrets.to_record()
    shapes = encode_shapes({n: tuple(state[n].shape) for n in names})
    return RecordDict({"secagg": ConfigRecord(dict(public)), "shapes": ConfigRecord(dict(shapes))})


def _secagg_share_keys(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Shamir shares of a fresh mask seed and of the mask key, encrypted per recipient."""
    secrets = _secrets(context, config_of(msg))
    bundle: dict[int, tuple[bytes, bytes]] = {}
    for index, value in msg.content.config_records["keys"].items():
        pair = blobs(value, f"the public keys of index {index}")
        if len(pair) != 2:
            raise SecureAggregationError(f"secure aggregation: index {index} has {len(pair)} public keys, not 2")
        bundle[int(index)] = (pair[0], pair[1])
    secrets, ciphertexts = share_keys(secrets, bundle)
    context.state["secagg"] = secrets.to_record()
    destinations = sorted(ciphertexts)
    return RecordDict(
        {"secagg": ConfigRecord({"destinations": destinations, "ciphertexts": [ciphertexts[d] for d in destinations]})}
    )


def _secagg_train(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Train as usual, then send only the masked, quantized, count-weighted update."""
    config = config_of(msg)
    secrets = _secrets(context, config)
    relayed = msg.content.config_records["shares"]
    sources, ciphertexts = ints(relayed["sources"], "sources"), blobs(relayed["ciphertexts"], "ciphertexts")
    if len(sources) != len(ciphertexts):
        raise SecureAggregationError("secure aggregation: relayed sources and ciphertexts differ in number")
    secrets = receive_shares(secrets, dict(zip(sources, ciphertexts, strict=True)))
    outcome, metrics = _run_training(msg, context, cfg)
    vector = encode_update(
        outcome.arrays,
        num_examples=outcome.train_rows,
        placement=Placement.from_config(config),
        params=secrets.params,
        generator=np.random.default_rng(),
        trunk_weight=int(config["secagg.trunk_weight"]) if "secagg.trunk_weight" in config else None,
    )
    masked, secrets = mask_vector(secrets, vector)
    context.state["secagg"] = secrets.to_record()
    return RecordDict({"masked": ArrayRecord({"vector": Array(masked)}), "metrics": metrics})


def _secagg_unmask(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Reveal seed shares of the survivors and key shares of the dropped, once per round."""
    config = config_of(msg)
    secrets = _secrets(context, config)
    survivors = ints(config["secagg.survivors"], "survivors")
    dropped = ints(config.get("secagg.dropped", []), "dropped")
    shares, secrets = reveal_shares(secrets, survivors=survivors, dropped=dropped)
    context.state["secagg"] = secrets.to_record()
    owners = sorted(shares)
    return RecordDict({"secagg": ConfigRecord({"owners": owners, "shares": [shares[o] for o in owners]})})


def _evaluate(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    config = config_of(msg)
    model_cfg, training = decode_settings(config)
    metrics = evaluate_round(
        cfg=cfg,
        model_cfg=model_cfg,
        training=training,
        received=arrays_of(msg),
        server_round=int(config["round"]),
        seed=int(config["seed"]),
    )
    public = {"epsilon": metrics["epsilon"]} if metrics["epsilon"] is not None else {}
    if cfg.share_eval_metrics:
        public.update({k: float(v) for k, v in metrics.items() if k not in ("epsilon", "rows") and v == v})
    return RecordDict({"metrics": MetricRecord(public)})


def _kmeans(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """One DP k-means release: noisy per-prototype sums and counts (charged first)."""
    config = config_of(msg)
    model_cfg, training = decode_settings(config)
    stats = cluster_round(
        cfg=cfg,
        model_cfg=model_cfg,
        training=training,
        received=arrays_of(msg),
        prototypes=msg.content.array_records["prototypes"]["centres"].numpy().astype(np.float64),
        server_round=int(config["round"]),
        seed=int(config["seed"]),
    )
    metrics: dict[str, Any] = {"noise_std": stats.noise_std}
    epsilon = spent_epsilon(cfg)
    if epsilon is not None:
        metrics["epsilon"] = epsilon
    sums = stats.sums.astype(np.float32)
    counts = stats.counts.astype(np.float32)
    return RecordDict(
        {"stats": ArrayRecord({"sums": Array(sums), "counts": Array(counts)}), "metrics": MetricRecord(metrics)}
    )


def _personas(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Assign users to the global personas and write the persona cards locally."""
    config = config_of(msg)
    model_cfg, training = decode_settings(config)
    metrics = persona_round(
        cfg=cfg,
        model_cfg=model_cfg,
        training=training,
        received=arrays_of(msg),
        prototypes=msg.content.array_records["prototypes"]["centres"].numpy().astype(np.float64),
        seed=int(config["seed"]),
    )
    public: dict[str, Any] = {}
    epsilon = spent_epsilon(cfg)
    if epsilon is not None:
        public["epsilon"] = epsilon
    if cfg.share_eval_metrics:
        public.update({k: float(v) for k, v in metrics.items()})
    return RecordDict({"metrics": MetricRecord(public)})


def _final_model(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Verify the signed final model against the federation's key and install it locally."""
    from fedpersona.artifacts import FILES, install_model
    from fedpersona.certs import load_signing_public_key

    key_path = context.node_config.get("model-public-key")
    if not key_path:
        raise ConfigError(
            f"{cfg.name}: no federation model-signing key is configured, so the final model cannot be "
            "verified and was not installed; put model-signing.pub in credentials/ beside client.toml "
            "(or pass --model-key) and restart `fedpersona partner start`"
        )
    record = msg.content.config_records["artifact"]
    files = {name: record[name] for name in FILES if name in record}
    folder = Path(cfg.state_dir) / "model"
    card = install_model(folder, files=files, public_key=load_signing_public_key(str(key_path)))  # type: ignore[arg-type]
    logger.info("installed the federation's final model (%s rounds) in %s", card.get("rounds"), folder)
    return RecordDict()


def build_client_app(run_dir: str | None = None) -> ClientApp:
    """A ClientApp; ``run_dir`` lets a simulation point partitions at its partner configs."""
    client = ClientApp()
    client.query()(_guarded(_query, run_dir))
    client.train()(_guarded(_train, run_dir))
    client.evaluate()(_guarded(_evaluate, run_dir))
    client.query("secagg_setup")(_guarded(_secagg_setup, run_dir))
    client.query("secagg_share_keys")(_guarded(_secagg_share_keys, run_dir))
    client.train("secagg")(_guarded(_secagg_train, run_dir))
    client.query("secagg_unmask")(_guarded(_secagg_unmask, run_dir))
    client.query("kmeans")(_guarded(_kmeans, run_dir))
    client.query("personas")(_guarded(_personas, run_dir))
    client.query("final_model")(_guarded(_final_model, run_dir))
    return client


app = build_client_app()
