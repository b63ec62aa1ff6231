"""Everything a partner does with its own data and disk, independent of the transport.

The Flower ClientApp (:mod:`fedpersona.federation.client_app`) decodes a message and calls one function
here; the same functions run in a simulation, under ``flwr run`` and in a deployment.

On the partner's disk, in ``state_dir``:

- ``ledger.jsonl``: the privacy ledger (source of truth for the epsilon spent);
- ``plan.json``: the noise plan, fixed at the partner's first round;
- ``local.pt``: parameters that never leave (heads, and an unshared adapter);
- ``eval.jsonl``: this partner's evaluation metrics, kept locally.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fedpersona.config.files import load_plan as load_plan_file
from fedpersona.config.files import save_plan
from fedpersona.config.settings import ModelSettings, PartnerConfig, PrivacyPlan, TrainingSettings
from fedpersona.data.dense import DenseViews, dense_views
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.schema import Schema
from fedpersona.data.schema_reader import partner_schema
from fedpersona.data.tables import Table, load_table
from fedpersona.errors import ConfigError, PrivacyBudgetExceeded, PrivacyLedgerError
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.inference import load_parameters
from fedpersona.model.linear import HALF, LABEL_INPUT, LabelModel, halves
from fedpersona.model.scopes import parameter_scope
from fedpersona.model.training import LocalResult, TrainedModel, pick_device, train_locally
from fedpersona.privacy.ledger import PrivacyLedger, spent_epsilon
from fedpersona.privacy.planner import make_plan, sgd_clip
from fedpersona.privacy.randomness import SecretRandomness

__all__ = [
    "PartnerData",
    "build_model",
    "evaluate_round",
    "load_partner_data",
    "load_plan",
    "partner_schema",
    "read_partner_data",
    "train_round",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartnerData:
    """A partner's table split into train and test, featurized."""

    schema: Schema
    train: FeatureTensors
    test: FeatureTensors
    personas_test: np.ndarray | None
    table: Table
    train_index: np.ndarray  # the table's training rows (the keyed split)
    dense: DenseViews  # the public dense views of every row (fedpersona.data.dense)

    @property
    def persona_train(self) -> np.ndarray:
        """The persona view of the training rows (float64): what the persona releases use."""
        return np.asarray(self.dense.persona[self.train_index], dtype=np.float64)


_DATA_CACHE: dict[tuple[object, ...], tuple[PartnerData, int]] = {}  # key -> (data, approximate bytes)
# What one process keeps (a simulation's actor answers for many partners): the least recently
# used partner goes first once the cached arrays pass this size; the newest is always kept.
_DATA_CACHE_BYTES = 1 << 30


def load_partner_data(cfg: PartnerConfig, *, device: torch.device | None = None) -> PartnerData:
    """The partner's featurized, split table, loaded once per process (:func:`read_partner_data`).

    Every Flower message a partner answers needs the table; in one process (a simulation's
    actor, a long-lived SuperNode's ClientApp process) it is read and featurized once and kept
    in memory, keyed by what it is made of: the table file's path, size and modification time
    (or the synthetic recipe), the schema file's, the split key, the test fraction and the
    device. A changed file or setting loads afresh. Each call gets its own tensor dictionaries,
    so whatever a caller adds to them stays with that caller. The cache is the partner's own
    process memory: nothing of it leaves the partner. A process answering for many partners (a
    simulation's actor) keeps as many as fit in ``_DATA_CACHE_BYTES``, least recently used out.
    """
    key = _data_key(cfg, device)
    entry = _DATA_CACHE.pop(key, None)
    if entry is None:
        loaded = read_partner_data(cfg, device=device)
        entry = (loaded, _approximate_bytes(loaded))
    _DATA_CACHE[key] = entry  # the most recently used goes last
    while len(_DATA_CACHE) > 1 and sum(size for _, size in _DATA_CACHE.values()) > _DATA_CACHE_BYTES:
        _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
    cached = entry[0]
    return PartnerData(
        schema=cached.schema,
        train=FeatureTensors(cached.train.layout, dict(cached.train.tensors)),
        test=FeatureTensors(cached.test.layout, dict(cached.test.tensors)),
        personas_test=cached.personas_test,
        table=cached.table,
        train_index=cached.train_index,
        dense=cached.dense,
    )


def _approximate_bytes(data: PartnerData) -> int:
    """The memory a cached partner holds: its tensors, dense views and the table's columns
    (object columns counted by their pointers: a lower bound for text)."""
    tensors = [*data.train.tensors.values(), *data.test.tensors.values()]
    arrays = [data.dense.persona, data.dense.label, *data.table.columns.values()]
    return sum(t.element_size() * t.nelement() for t in tensors) + sum(np.asarray(a).nbytes for a in arrays)


def _data_key(cfg: PartnerConfig, device: torch.device | None) -> tuple[object, ...]:
    def stamp(path: str | None) -> tuple[object, ...]:
        if path is None:
            return (None,)
        try:
            info = Path(path).stat()
        except OSError:
            return (path, None)  # reading it will raise the user-facing error
        return (str(Path(path).resolve()), info.st_size, info.st_mtime_ns)

    mix = tuple(cfg.synthetic_mix) if cfg.synthetic_mix is not None else None
    synthetic = (cfg.kind, cfg.synthetic_rows, cfg.synthetic_seed, mix) if cfg.data is None else None
    secret = hashlib.sha256(split_key(cfg)).hexdigest()
    return (stamp(cfg.data), stamp(cfg.schema_path), synthetic, secret, cfg.test_fraction, str(device))


def read_partner_data(cfg: PartnerConfig, *, device: torch.device | None = None) -> PartnerData:
    """Load, validate and featurize the partner's table, then split it row by row.

    Each user goes to the test rows when a keyed hash of its id falls below
    ``test_fraction`` (:func:`train_mask`): adding or removing one user changes only that
    user's side, so neighbouring tables differ in at most one training row.
    """
    schema = partner_schema(cfg)
    personas: np.ndarray | None = None
    if cfg.data is not None:
        table = load_table(schema, cfg.data)
    else:
        from fedpersona.data.synthetic import generate_silo

        mix = np.asarray(cfg.synthetic_mix) if cfg.synthetic_mix is not None else None
        silo = generate_silo(cfg.kind, int(cfg.synthetic_rows or 0), seed=cfg.synthetic_seed, mix=mix)
        table, personas = silo.table, silo.persona
    n = len(table)
    keys, secret = row_keys(table), split_key(cfg)
    in_train = train_mask(keys, secret, cfg.test_fraction)
    train_idx, test_idx = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    if len(train_idx) < 2:
        raise ConfigError(f"{cfg.source}: the table has {n} rows, too few to split for training")
    features = featurize(table)
    dense = dense_views(table)
    # The label model's inputs ride with the other tensors, so one index gathers a batch.
    features.tensors[LABEL_INPUT] = torch.from_numpy(np.ascontiguousarray(dense.label, dtype=np.float32))
    features.tensors[HALF] = torch.from_numpy(halves(keys, secret))
    if device is not None:
        features = features.to(device)
    index_train = torch.from_numpy(train_idx).to(features.tensors["scalar"].device)
    index_test = torch.from_numpy(test_idx).to(features.tensors["scalar"].device)
    train = FeatureTensors(features.layout, features.batch(index_train))
    test = FeatureTensors(features.layout, features.batch(index_test))
    return PartnerData(
        schema=schema,
        train=train,
        test=test,
        personas_test=personas[test_idx] if personas is not None else None,
        table=table,
        train_index=train_idx,
        dense=dense,
    )


SPLIT_KEY = "split.key"


def split_key(cfg: PartnerConfig) -> bytes:
    """The partner's secret key of the train/test split (32 bytes).

    Kept in ``state_dir/split.key`` (mode 0600, made on first use from ``os.urandom``), or
    derived from ``privacy.noise_seed`` in a reproducible run. It never leaves the partner.
    """
    if cfg.privacy.noise_seed is not None:
        return hashlib.sha256(f"fedpersona-split/{cfg.privacy.noise_seed}".encode()).digest()
    path = Path(cfg.state_dir) / SPLIT_KEY
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this partner made it meanwhile
        return _read_key(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(32))
        handle.flush()
        os.fsync(handle.fileno())
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != 32:
        raise ConfigError(f"{path} is not a 32-byte key; restore it from a backup or remove the whole state folder")
    return key


def row_keys(table: Table) -> list[str]:
    """What identifies each row for the split: its user id, or without an id column the row's
    own values (so the split of a row never depends on where it sits in the file)."""
    if table.schema.id_column or table.schema.events:
        return [str(i) for i in table.ids]
    names = sorted(table.columns)
    columns = [table.columns[c] for c in names] + [table.labels[k] for k in sorted(table.labels)]
    return ["\x1f".join(str(col[i]) for col in columns) for i in range(len(table))]


def train_mask(keys: list[str], key: bytes, test_fraction: float) -> np.ndarray:
    """``True`` for training rows: BLAKE2b(row key, keyed) read as a number in [0, 1) is at
    least ``test_fraction``. Row-local: one row's side depends on that row alone."""
    threshold = int(test_fraction * 2**64)
    out = np.empty(len(keys), dtype=bool)
    for i, k in enumerate(keys):
        digest = hashlib.blake2b(k.encode("utf-8"), digest_size=8, key=key).digest()
        out[i] = int.from_bytes(digest, "little") >= threshold
    return out


def _seed_for(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def build_model(data: PartnerData, model_cfg: ModelSettings, *, seed: int, device: torch.device) -> TrainedModel:
    """A fresh model: the label model (zeros), or an encoder whose adapter init depends only on
    (seed, kind, schema fingerprint).

    Partners that share a slot therefore start from identical adapters, and every partner
    starts from the same trunk (the server overwrites it with the global one anyway).
    """
    if model_cfg.architecture == "linear":
        width = int(data.train.tensors[LABEL_INPUT].shape[1])
        return LabelModel(width, len(data.train.layout.label_names), model_cfg).to(device)
    torch.manual_seed(_seed_for(seed, data.schema.kind, data.schema.fingerprint()))
    model = PersonaEncoder(data.train.layout, model_cfg)
    return model.to(device)


def public_rows_of(cfg: PartnerConfig, data: PartnerData) -> int:
    """The row count every mechanism parameter is derived from: the partner's declaration.

    A private partner with a table file must declare ``data.public_rows`` (a round figure of
    its size, public like the schema): its exact count is never used, so adding or removing
    one user changes no sample rate, step count, noise or weight. An explicitly non-private
    partner (which releases its updates without noise anyway) falls back to its count.
    """
    declared = cfg.declared_rows()
    if declared is not None:
        return declared
    if cfg.privacy.private:
        raise ConfigError(
            f"{cfg.source}: data.public_rows is not set. A private partner declares a round figure of its "
            f"table's size (about {len(data.train)} training rows here; e.g. public_rows = "
            f"{_round_figure(len(data.train))}): it is public, sets the sample rate and the aggregation "
            "weight, and keeps the exact count of users private"
        )
    return len(data.train)


def _round_figure(n: int) -> int:
    """``n`` rounded to two significant figures (a suggestion for ``data.public_rows``)."""
    if n < 100:
        return max(2, n)
    digits = len(str(n)) - 2
    return int(round(n, -digits))


def load_plan(
    cfg: PartnerConfig,
    data: PartnerData,
    training: TrainingSettings,
    rounds: int,
    *,
    persona_releases: int = 0,
    persona_share: float = 0.0,
) -> PrivacyPlan:
    """The partner's plan: fixed in ``state/plan.json`` at its first round, made now otherwise.

    The plan comes from the one planner (:func:`fedpersona.privacy.planner.make_plan`) and
    covers ALL planned rounds x local epochs x steps and the persona releases; it is never
    re-made. ``plan.json`` is then the one source of truth for the partner's budget: when
    ``client.toml`` (or the federation's training settings) no longer say what the plan
    fixed, the partner refuses to work and names each key that changed, rather than account
    with two different budgets.
    """
    state = Path(cfg.state_dir)
    plan = load_plan_file(state)
    if plan is not None:
        if plan.private and not (state / PrivacyLedger.FILE).exists():
            raise PrivacyLedgerError(
                f"{state / PrivacyLedger.FILE} is missing but {state / 'plan.json'} holds this partner's plan from "
                "earlier rounds: the ledger was deleted; refusing to start a fresh budget (restore the "
                "ledger from a backup, or remove the whole state folder to start over as a new partner)"
            )
        drift = plan.drift(privacy=cfg.privacy, public_rows=cfg.declared_rows(), training=training)
        if drift:
            raise ConfigError(
                f"{cfg.source}: the settings differ from the plan fixed at this partner's first round "
                f"({state / 'plan.json'}): " + "; ".join(drift) + ". Restore them: a partner's budget is planned "
                "once, for its whole lifetime"
            )
        return plan
    plan = make_plan(
        privacy=cfg.privacy, training=training, public_rows=public_rows_of(cfg, data), rounds=rounds,
        persona_releases=persona_releases, persona_share=persona_share,
    )  # fmt: skip
    if plan.private and plan.delta >= 1.0 / plan.public_rows:
        logger.warning(
            "%s: delta %.3g is not below 1/n = %.3g; a guarantee with such a delta is weak",
            cfg.name, plan.delta, 1.0 / plan.public_rows,
        )  # fmt: skip
    if plan.private:
        # The ledger exists from the moment the plan does (empty until the first charge), so a
        # ledger deleted later is told apart from one never written.
        _atomic_write(state / PrivacyLedger.FILE, b"", replace=False)
    save_plan(state, plan)
    return plan


def _atomic_write(path: Path, payload: bytes, *, replace: bool = True) -> None:
    """Write ``path`` through a fsync'd temporary file; with ``replace=False`` an existing
    file is left as it is."""
    if not replace and path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _local_state(model: TrainedModel, state_dir: str) -> dict[str, torch.Tensor]:
    """The partner's own parameters kept in ``state_dir/local.pt`` (none before its first round)."""
    path = Path(state_dir) / "local.pt"
    if not path.exists():
        return {}
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    return dict(state)


def _save_local(model: TrainedModel, state_dir: str, shared: set[str]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in shared}
    path = Path(state_dir) / "local.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("local.pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def shared_names(model: TrainedModel, *, adapter_shared: bool) -> list[str]:
    """State-dict names this partner sends: the trunk, plus the adapter when its slot shares."""
    names = []
    for name in model.state_dict():
        scope = parameter_scope(name)
        if scope == "global" or (scope == "kind" and adapter_shared):
            names.append(name)
    return names


def _with_received(model: TrainedModel, cfg: PartnerConfig, received: dict[str, np.ndarray]) -> TrainedModel:
    """The partner's model: its own local parameters, then what the server sent (one loader,
    :func:`fedpersona.model.inference.load_parameters`, checks names, scopes and shapes)."""
    return load_parameters(model, received, local=_local_state(model, cfg.state_dir), source="the server's message")


@dataclass(frozen=True)
class RoundOutcome:
    """What a train round produced: the arrays to send and public metrics."""

    arrays: dict[str, np.ndarray]
    result: LocalResult
    epsilon: float | None
    train_rows: int


def train_round(
    *,
    cfg: PartnerConfig,
    model_cfg: ModelSettings,
    training: TrainingSettings,
    received: dict[str, np.ndarray],
    server_round: int,
    num_rounds: int,
    adapter_shared: bool,
    seed: int,
    instrument: Callable[[TrainedModel, PartnerData], torch.nn.Module] | None = None,
) -> RoundOutcome:
    """One local round: load data and state, check the budget, train with DP-SGD, save.

    ``instrument`` is for the privacy audit (:mod:`fedpersona.audit`) only: it wraps the model
    that DP-SGD trains (to add canary gradients) and returns the module to train; everything
    else - the data, plan, ledger, secret randomness, clipping and noise - is this round's own.
    """
    device = pick_device(training.device)
    data = load_partner_data(cfg, device=device)
    plan = load_plan(cfg, data, training, num_rounds)
    model = build_model(data, model_cfg, seed=seed, device=device)
    _with_received(model, cfg, received)
    ledger = PrivacyLedger(cfg.state_dir, settings=cfg.privacy) if plan.private else None
    if ledger is not None and plan.persona_releases:
        done = sum(1 for e in ledger.entries if e.mechanism == "dp-sgd")
        if done >= plan.planned_rounds:
            # The plan keeps the rest of the budget for the persona releases: a training round
            # past the planned ones would spend it, and the personas would then be refused.
            raise PrivacyBudgetExceeded(
                f"round {server_round}: this partner planned {plan.planned_rounds} DP-SGD round(s) and has run "
                f"{done}; the rest of its budget is kept for the {plan.persona_releases} persona releases "
                f"({Path(cfg.state_dir) / 'plan.json'})"
            )
    anchor = {k: torch.from_numpy(np.array(v)) for k, v in received.items()}
    # Secret randomness for the batches, the noise and the masks (never from the message).
    attempt = len(ledger.entries) if ledger is not None else 0
    randomness = SecretRandomness.for_mechanism(cfg.privacy.noise_seed, cfg.name, "train", server_round, attempt)
    with warnings.catch_warnings():
        # PyTorch notes that a backward hook fires on a module whose inputs need no gradient
        # (the first Embedding); it is expected with integer inputs and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        trained = model if instrument is None else cast(TrainedModel, instrument(model, data))
        result = train_locally(
            model=trained,
            data=data.train,
            settings=training,
            privacy=cfg.privacy.replace(max_grad_norm=sgd_clip(plan)),  # the plan's clip (public)
            noise_multiplier=plan.noise_multiplier,
            ledger=ledger,
            round=server_round,
            randomness=randomness,
            public_rows=plan.public_rows,
            anchor=anchor,
        )
    names = shared_names(model, adapter_shared=adapter_shared)
    _save_local(model, cfg.state_dir, set(names))
    state = model.state_dict()
    arrays = {n: state[n].detach().cpu().numpy() for n in names}
    return RoundOutcome(arrays=arrays, result=result, epsilon=result.epsilon, train_rows=plan.public_rows)


def evaluate_round(
    *,
    cfg: PartnerConfig,
    model_cfg: ModelSettings,
    training: TrainingSettings,
    received: dict[str, np.ndarray],
    server_round: int,
    seed: int,
    baseline: bool = False,
) -> dict[str, Any]:
    """Evaluate the received global model with this partner's local heads; log locally.

    ``baseline``: also what the partner gets alone from its own columns, beside its local
    model with the federation (:mod:`fedpersona.model.evaluation`).
    """
    device = pick_device(training.device)
    data = load_partner_data(cfg, device=device)
    model = build_model(data, model_cfg, seed=seed, device=device)
    _with_received(model, cfg, received)
    from fedpersona.model.evaluation import evaluate  # scikit-learn: only the messages that evaluate pay for it

    metrics: dict[str, Any] = evaluate(
        model=model, train=data.train, test=data.test, personas=data.personas_test, seed=seed, baseline=baseline
    )
    metrics["epsilon"] = spent_epsilon(cfg)
    record = {"round": server_round, "partner": cfg.name, "kind": cfg.kind, **metrics}
    path = Path(cfg.state_dir) / "eval.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return metrics
