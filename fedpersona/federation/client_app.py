"""The Flower ClientApp: decode a message, call :mod:`fedpersona.federation.partner`, encode the reply.

How a partner finds its own configuration (``Context.node_config``):

- deployment: ``client-config = "/path/to/client.toml"`` (set by ``fedpersona partner start``);
- simulation: ``partition-id`` picks an entry of ``<run-dir>/partners/index.json``.

A problem at the partner (an exhausted privacy budget, a bad data file, a refused policy, an
unexpected failure) is sent back as an error reply carrying only a fixed code and category and
the ledger's epsilon (:func:`fedpersona.privacy.manifest.error_reason`); the full message, which may
quote a cell of the partner's table, goes to the partner's own log only. Every other reply
carries the ledger's epsilon too (``epsilon`` in its info or metrics), so the coordinator's
view of a partner's spending is never behind its last message.

At the end of a deployed run the server sends the signed final model (``query.final_model``);
the partner verifies it against the federation's model-signing key named in its node config
(``model-public-key``, set by ``fedpersona partner start --model-key``), installs it in
``state_dir/model`` and replies with nothing.

With secure aggregation the ``query.secagg_*`` and ``train.secagg`` handlers run the partner's
side of :mod:`fedpersona.federation.secagg`; its secrets live in ``Context.state["secagg"]`` (kept by the
SuperNode between messages, never sent).

In deployment every message starts a fresh process that imports this module, so it imports
only Flower and fedpersona's light modules; a handler that reads the table or trains imports
the learning stack (PyTorch, Opacus, scikit-learn: seconds of CPU) itself. The status, final
model and secure-aggregation key messages start without it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpersona.config.files import load_partner_config
from fedpersona.config.settings import PartnerConfig
from fedpersona.errors import ConfigError, FedPersonaError, PolicyRefusal, PrivacyBudgetExceeded, PrivacyLedgerError
from fedpersona.federation import run_log
from fedpersona.federation.messages import arrays_of, config_of, decode_arrays, decode_settings, encode_arrays
from fedpersona.federation.secagg import (
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
from fedpersona.privacy.ledger import PrivacyLedger, spent_epsilon
from fedpersona.privacy.manifest import ERROR_CODES, audit_entry, check_outgoing, error_reason, write_audit

if TYPE_CHECKING:
    from fedpersona.federation.partner import RoundOutcome

__all__ = ["app", "build_client_app"]

logger = logging.getLogger(__name__)


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
        cfg: PartnerConfig | None = None
        try:
            cfg = _partner_config(context, run_dir)
            content = handler(msg, context, cfg)
            message_type = msg.metadata.message_type
            _add_epsilon(content, cfg)
            check_outgoing(message_type, content, share_eval_metrics=cfg.share_eval_metrics)
            if cfg.audit_log:
                rnd = config_of(msg).get("round")
                seq = _last_ledger_seq(cfg) if message_type.startswith("train") else None
                write_audit(cfg.state_dir, audit_entry(message_type, rnd, content, seq))
            _log_answer(cfg, msg, _reply_epsilon(content), "")
            return Message(content, reply_to=msg)
        except PrivacyBudgetExceeded as exc:
            logger.warning("refusing work: %s", exc)
            _log_answer(cfg, msg, None, f"refused ({exc.category})")
            return _error_reply(msg, exc.category, cfg)
        except FedPersonaError as exc:
            logger.error("%s", exc)
            _log_answer(cfg, msg, None, f"failed ({exc.category}: {exc})")
            return _error_reply(msg, exc.category, cfg)
        except Exception:
            # Unexpected: the traceback may hold row values, so it stays in this log.
            logger.exception("%s failed at this partner", msg.metadata.message_type)
            _log_answer(cfg, msg, None, "failed (internal error; see the SuperNode's log)")
            return _error_reply(msg, "internal", cfg)

    wrapped.__name__ = handler.__name__
    return wrapped


def _reply_epsilon(content: RecordDict) -> float | None:
    for records, name in ((content.config_records, "info"), (content.metric_records, "metrics")):
        if name in records and "epsilon" in records[name]:
            return float(records[name]["epsilon"])  # type: ignore[arg-type]
    return None


def _log_answer(cfg: PartnerConfig | None, msg: Message, epsilon: float | None, failure: str) -> None:
    """One line in ``state_dir/logs/activity.log`` (and this log) per message answered: its
    type, round, the cumulative epsilon after it; ``run finished`` for the final model. The
    line is the partner's own (nothing in it is sent)."""
    if cfg is None:
        return
    kind = msg.metadata.message_type
    rnd = config_of(msg).get("round") if "config" in msg.content.config_records else None
    what = f"{kind} (round {rnd})" if rnd is not None else kind
    target = cfg.privacy.target_epsilon
    budget = (
        f"; epsilon {epsilon:.4f} of {target:g} spent" if epsilon is not None
        else "; NOT PRIVATE" if not cfg.privacy.private else ""
    )  # fmt: skip
    line = f"{'answered ' + what + budget if not failure else what + ': ' + failure}"
    if kind == "query.final_model":
        line = f"{run_log.RUN_FINISHED}: " + (
            "installed the federation's final model" + budget if not failure else "the final model " + failure
        )
    elif kind == "query.status" and "config" in msg.content.config_records and config_of(msg).get("run.ended"):
        line = f"{run_log.RUN_FINISHED}: {config_of(msg)['run.ended']}{budget}"
    logger.info("%s", line)
    try:
        run_log.note(Path(cfg.state_dir) / run_log.ACTIVITY_LOG, f"{cfg.name}: {line}")
    except OSError as exc:
        logger.warning("cannot write %s: %s", Path(cfg.state_dir) / run_log.ACTIVITY_LOG, exc)


def _error_reply(msg: Message, category: str, cfg: PartnerConfig | None) -> Message:
    """An error reply with a fixed code, its category and the ledger's epsilon, nothing else."""
    category = category if category in ERROR_CODES else "error"
    epsilon = None
    if cfg is not None:
        try:
            epsilon = spent_epsilon(cfg)
        except FedPersonaError:  # an unreadable ledger: the category says so already
            epsilon = None
    return Message(Error(code=ERROR_CODES[category], reason=error_reason(category, epsilon)), reply_to=msg)


def _add_epsilon(content: RecordDict, cfg: PartnerConfig) -> None:
    """Every reply of a private partner carries its cumulative epsilon (from its ledger)."""
    epsilon = spent_epsilon(cfg)
    if epsilon is None:
        return
    if "info" in content.config_records:
        content.config_records["info"]["epsilon"] = float(epsilon)
    elif "metrics" in content.metric_records:
        content.metric_records["metrics"]["epsilon"] = float(epsilon)
    else:
        content["metrics"] = MetricRecord({"epsilon": float(epsilon)})


def _last_ledger_seq(cfg: PartnerConfig) -> int | None:
    if not cfg.privacy.private:
        return None
    entries = PrivacyLedger(cfg.state_dir, settings=cfg.privacy).entries
    return entries[-1].seq if entries else None


def _query(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Describe this partner: kind, schema fingerprint, declared row count and noise plan."""
    from fedpersona.federation.partner import load_partner_data, load_plan, partner_schema
    from fedpersona.federation.partner_personas import persona_width
    from fedpersona.model.training import pick_device

    _, training = decode_settings(config_of(msg))
    config = config_of(msg)
    rounds = int(config["num_rounds"])
    data = load_partner_data(cfg, device=pick_device(training.device))
    plan = load_plan(
        cfg, data, training, rounds,
        persona_releases=int(config.get("persona_releases", 0)),
        persona_share=float(config.get("persona_share", 0.0)),
    )  # fmt: skip
    schema = partner_schema(cfg)
    info: dict[str, Any] = {
        "name": cfg.name,
        "kind": cfg.kind,
        "fingerprint": schema.fingerprint(),
        "schema_version": schema.version,
        "rows": plan.public_rows,
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
        "noise_seeds_known": plan.noise_seeded,
        "require_secure_aggregation": cfg.require_secure_aggregation,
        "persona_width": persona_width(cfg),
        "gram_noise": plan.gram_noise or 0.0,
        "em_noise": plan.em_noise or 0.0,
    }
    return RecordDict({"info": ConfigRecord(info)})


def _status(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Nothing but the ledger's epsilon (added to every reply): the coordinator asks at the end
    of a run so that privacy.json and the model card carry each partner's final spending."""
    return RecordDict()


def _refuse_plain(cfg: PartnerConfig, what: str) -> None:
    """A partner that requires secure aggregation never sends an individual release."""
    if cfg.require_secure_aggregation:
        raise PolicyRefusal(
            f"{cfg.name}: release.require_secure_aggregation is true, and the coordinator asked for a plain "
            f"{what} (the server would see this partner's own release); refused"
        )


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
    from fedpersona.federation.partner import train_round

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
    _refuse_plain(cfg, "training round")
    outcome, metrics = _run_training(msg, context, cfg)
    return RecordDict({"arrays": encode_arrays(outcome.arrays), "metrics": metrics})


def _secrets(context: Context, config: dict[str, Any]) -> PartnerSecrets:
    if "secagg" not in context.state.config_records:
        raise SecureAggregationError("secure aggregation: this node has no round in progress (no setup message)")
    return PartnerSecrets.from_record(context.state.config_records["secagg"], server_round=int(config["round"]))


def _secagg_setup(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Fresh key pairs for this round; reply with the public keys and the shapes of what this
    partner will sum: its shared parameters, or (``secagg.purpose = "personas"``) its persona
    release (the Gram matrix of its slot's persona view, or the EM statistics)."""
    from fedpersona.federation.partner import build_model, load_partner_data, shared_names
    from fedpersona.federation.partner_personas import persona_width
    from fedpersona.model.training import pick_device
    from fedpersona.personas.space import packed_size

    config = config_of(msg)
    if config.get("secagg.purpose") == "personas":
        shapes: dict[str, tuple[int, ...]] = {"persona_total.ones": (1,)}
        if config["persona.kind"] == "gram":
            shapes["persona_kind.gram"] = (packed_size(persona_width(cfg)),)
        else:
            k, dims = int(config["persona.k"]), int(config["persona.dims"])
            shapes.update({"persona_kind.counts": (k,), "persona_kind.sums": (k, dims)})
    else:
        model_cfg, training = decode_settings(config)
        data = load_partner_data(cfg, device=pick_device(training.device))
        model = build_model(data, model_cfg, seed=int(config["seed"]), device=pick_device(training.device))
        state = model.state_dict()
        names = shared_names(model, adapter_shared=bool(config["adapter_shared"]))
        shapes = {n: tuple(state[n].shape) for n in names}
    secrets, public = start_round(
        server_round=int(config["round"]), index=int(config["secagg.index"]), params=SecAggParams.from_config(config)
    )
    context.state["secagg"] = secrets.to_record()
    return RecordDict({"secagg": ConfigRecord(dict(public)), "shapes": ConfigRecord(dict(encode_shapes(shapes)))})


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


def _secagg_receive(msg: Message, context: Context) -> PartnerSecrets:
    """Stage 3's first half: decrypt the shares the other partners sent this one."""
    secrets = _secrets(context, config_of(msg))
    relayed = msg.content.config_records["shares"]
    sources, ciphertexts = ints(relayed["sources"], "sources"), blobs(relayed["ciphertexts"], "ciphertexts")
    if len(sources) != len(ciphertexts):
        raise SecureAggregationError("secure aggregation: relayed sources and ciphertexts differ in number")
    return receive_shares(secrets, dict(zip(sources, ciphertexts, strict=True)))


def _secagg_masked(
    context: Context, secrets: PartnerSecrets, config: dict[str, Any], arrays: dict[str, np.ndarray], weight: int
) -> np.ndarray:
    """Stage 3's second half: encode ``arrays`` at weight ``weight`` and mask them."""
    vector = encode_update(
        arrays,
        num_examples=weight,
        placement=Placement.from_config(config),
        params=secrets.params,
        generator=np.random.default_rng(),
        trunk_weight=int(config["secagg.trunk_weight"]) if "secagg.trunk_weight" in config else None,
    )
    masked, secrets = mask_vector(secrets, vector)
    context.state["secagg"] = secrets.to_record()
    return masked


def _secagg_train(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Train as usual, then send only the masked, quantized, count-weighted update."""
    secrets = _secagg_receive(msg, context)
    outcome, metrics = _run_training(msg, context, cfg)
    masked = _secagg_masked(context, secrets, config_of(msg), outcome.arrays, outcome.train_rows)
    return RecordDict({"masked": ArrayRecord({"vector": Array(masked)}), "metrics": metrics})


def _release(msg: Message, cfg: PartnerConfig) -> dict[str, np.ndarray]:
    from fedpersona.federation.partner_personas import persona_release

    config = config_of(msg)
    _, training = decode_settings(config)
    persona = msg.content.array_records["persona"] if "persona" in msg.content.array_records else None
    return persona_release(
        cfg=cfg, training=training, config=config, arrays=decode_arrays(persona) if persona is not None else {},
        server_round=int(config["round"]),
    )  # fmt: skip


def _secagg_persona_release(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """One persona release (charged first), sent only as a masked share of its slot's sum."""
    secrets = _secagg_receive(msg, context)
    released = _release(msg, cfg)
    arrays = {"persona_total.ones": np.ones(1), **{f"persona_kind.{k}": v for k, v in released.items()}}
    masked = _secagg_masked(context, secrets, config_of(msg), arrays, 1)
    return RecordDict({"masked": ArrayRecord({"vector": Array(masked)}), "metrics": MetricRecord({})})


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
    from fedpersona.federation.partner import evaluate_round

    config = config_of(msg)
    model_cfg, training = decode_settings(config)
    metrics = evaluate_round(
        cfg=cfg,
        model_cfg=model_cfg,
        training=training,
        received=arrays_of(msg),
        server_round=int(config["round"]),
        seed=int(config["seed"]),
        baseline=bool(config.get("baseline", False)) and int(config["round"]) >= int(config["num_rounds"]),
    )
    public: dict[str, Any] = {}
    if cfg.share_eval_metrics:
        public.update({k: float(v) for k, v in metrics.items() if k != "epsilon" and v == v})
    return RecordDict({"metrics": MetricRecord(public)})


def _persona_release(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """One persona release: a noisy Gram matrix or noisy EM statistics (charged first)."""
    _refuse_plain(cfg, "persona release")
    released = _release(msg, cfg)
    return RecordDict(
        {
            "release": ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64)) for k, v in released.items()}),
            "metrics": MetricRecord({}),
        }
    )


def _personas(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Assign users to the slot's released personas and write the persona cards locally."""
    from fedpersona.federation.partner_personas import persona_round

    config = config_of(msg)
    metrics = persona_round(
        cfg=cfg,
        config=config,
        arrays=decode_arrays(msg.content.array_records["persona"]),
        seed=int(config["seed"]),
    )
    public: dict[str, Any] = {}
    if cfg.share_eval_metrics:
        public.update({k: float(v) for k, v in metrics.items()})
    return RecordDict({"metrics": MetricRecord(public)})


def _final_model(msg: Message, context: Context, cfg: PartnerConfig) -> RecordDict:
    """Verify the signed final model against the federation's key and install it locally."""
    from fedpersona.model.artifacts import FILES, install_model, load_signing_public_key

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
    client.query("persona_release")(_guarded(_persona_release, run_dir))
    client.query("persona_release_secagg")(_guarded(_secagg_persona_release, run_dir))
    client.query("personas")(_guarded(_personas, run_dir))
    client.query("final_model")(_guarded(_final_model, run_dir))
    client.query("status")(_guarded(_status, run_dir))
    return client


app = build_client_app()
