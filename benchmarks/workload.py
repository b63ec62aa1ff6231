"""The workloads the benchmarks share: a synthetic silo featurized, a fresh default encoder,
one timed local epoch with :func:`fedpersona.model.training.train_locally`, a plain-loop
federation (:func:`federate`: FedAvg with the parameter scopes, no Flower) and the featurized
columns as one standardised matrix (:func:`standardised_columns`, the no-encoder baseline)."""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings, sample_rate_for
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.synthetic import generate_silo
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.scopes import parameter_scope
from fedpersona.model.training import train_locally
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.planner import plan_noise
from fedpersona.privacy.randomness import SecretRandomness

#: Modes compared by the DP speed benchmarks: a non-private epoch and Opacus' two modes.
MODES = ("non-private", "ghost", "hooks")
ENCODER_CLIP = 1.0  # the encoder benchmarks clip at 1, as their published results (the label model clips at 2)


def synthetic_features(kind: str, rows: int, *, seed: int = 0) -> FeatureTensors:
    """A synthetic ``kind`` silo of ``rows`` users, validated and featurized."""
    return featurize(generate_silo(kind, rows, seed=seed).table)


def fresh_encoder(data: FeatureTensors, *, seed: int = 0, device: str = "cpu") -> PersonaEncoder:
    """The default encoder for ``data``'s layout, initialised from ``seed``."""
    torch.manual_seed(seed)
    return PersonaEncoder(data.layout, ModelSettings()).to(device)


@dataclass(frozen=True)
class EpochTiming:
    mode: str
    batch_size: int
    rows: int
    steps: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.rows / self.seconds


def time_epoch(data: FeatureTensors, *, mode: str, batch_size: int, device: str = "cpu", seed: int = 0) -> EpochTiming:
    """Wall time of one local epoch (Poisson batches, as in a federation) of a fresh encoder.

    ``mode`` is ``non-private`` or an Opacus ``grad_sample_mode``; a private epoch uses noise
    multiplier 1.0 (the noise level does not change the cost) and a throw-away ledger.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    private = mode != "non-private"
    settings = TrainingSettings(
        sample_rate=None,
        optimizer="adam",
        local_epochs=1,
        batch_size=batch_size,
        grad_sample_mode=mode if private else "ghost",
        device=device,
    )
    # A generous target: the benchmark times steps, it does not spend a real budget.
    privacy = PrivacySettings(target_epsilon=1e3 if private else float("inf"), max_grad_norm=ENCODER_CLIP)
    model = fresh_encoder(data, seed=seed, device=device)
    generator = SecretRandomness.from_seed(seed)  # benchmark: reproducible on purpose
    with tempfile.TemporaryDirectory() as state, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ledger = PrivacyLedger(state, settings=privacy) if private else None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_locally(
            model=model, data=data, settings=settings, privacy=privacy,
            noise_multiplier=1.0 if private else None, ledger=ledger, round=1, randomness=generator,
        )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return EpochTiming(mode, batch_size, len(data), result.steps, seconds)


def best_time(work: Callable[[], object], repeats: int) -> float:
    """The shortest wall time of ``repeats`` runs (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def median(values: list[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def federate(
    parts: list[FeatureTensors],
    *,
    slots: list[str],
    model: ModelSettings,
    training: TrainingSettings,
    epsilon: float,
    rounds: int,
    delta: float = 1e-5,
    seed: int = 0,
) -> list[PersonaEncoder]:
    """FedAvg over ``parts`` for ``rounds`` rounds (0: the models as initialised), one
    ``<kind>:<name>`` slot per partner (partners of one slot share their adapter, every
    partner the trunk), DP-SGD planned per partner for ``epsilon`` over all the rounds.
    Returns each partner's final model: the global trunk and its slot's adapter, its own heads.
    """
    privacy = PrivacySettings(target_epsilon=epsilon, delta=delta, accountant="prv", max_grad_norm=ENCODER_CLIP)
    models = []
    for part in parts:
        torch.manual_seed(seed)
        models.append(PersonaEncoder(part.layout, model))
    sigmas: list[float | None] = []
    for part in parts:
        q, steps = sample_rate_for(len(part), training.batch_size), training.steps_per_round(len(part)) * rounds
        sigmas.append(planned_sigma(epsilon, delta, q, steps) if privacy.private and rounds else None)
    aggregator = ScopedAggregator(optimizer="fedavg")
    with tempfile.TemporaryDirectory() as state, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ledgers = [
            PrivacyLedger(Path(state) / str(i), settings=privacy) if privacy.private else None
            for i in range(len(parts))
        ]
        for r in range(1, rounds + 1):
            updates = []
            for i, (encoder, part) in enumerate(zip(models, parts, strict=True)):
                load_shared(encoder, aggregator.arrays_for(slots[i]))
                train_locally(
                    model=encoder, data=part, settings=training, privacy=privacy, noise_multiplier=sigmas[i],
                    ledger=ledgers[i], round=r, randomness=SecretRandomness.from_seed(seed * 10_000 + r * 100 + i),
                )  # fmt: skip
                weights = encoder.state_dict()
                shared = {n: weights[n].detach().numpy().copy() for n in weights if parameter_scope(n) != "local"}
                kind = slots[i].split(":")[0]
                updates.append(PartnerUpdate(f"p{i}", slots[i], shared, len(part), kind=kind))
            aggregator.aggregate(updates)
    for encoder, slot in zip(models, slots, strict=True):
        load_shared(encoder, aggregator.arrays_for(slot))
    return models


@functools.cache
def planned_sigma(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The planned DP-SGD noise multiplier (cached: a partner alone and federated plan the same)."""
    return plan_noise(target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant="prv")


def load_shared(model: PersonaEncoder, arrays: dict[str, np.ndarray]) -> None:
    """Load the aggregator's arrays (trunk and adapter) into ``model``; its heads stay."""
    if arrays:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=False)


def standardised_columns(features: FeatureTensors) -> np.ndarray:
    """The featurized columns as one matrix for baselines without an encoder: scalars, their
    presence flags, one-hot categorical codes and numeric sequence steps (categorical
    sequences and text left out), constant columns dropped, each standardised."""
    t = {name: tensor.numpy() for name, tensor in features.tensors.items()}
    blocks = [t["scalar"], t["scalar_present"].astype(np.float64)]
    if t["cat"].size:  # codes carry global offsets, so one one-hot block covers every feature
        codes = t["cat"]
        onehot = np.zeros((len(codes), int(codes.max()) + 1))
        onehot[np.arange(len(codes))[:, None], codes] = 1.0
        blocks.append(onehot)
    blocks += [v for name, v in t.items() if name.startswith("seqnum") and not name.endswith("_present")]
    x = np.hstack(blocks)
    return StandardScaler().fit_transform(x[:, x.std(axis=0) > 0])
