"""The workloads the benchmarks share: a synthetic silo featurized, a fresh default encoder,
one timed local epoch with :func:`fedpersona.training.train_locally`."""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fedpersona.encoder import EncoderConfig, PersonaEncoder
from fedpersona.features import FeatureTensors, featurize
from fedpersona.privacy import PrivacyLedger, PrivacySettings
from fedpersona.synthetic import generate_silo
from fedpersona.training import TrainingSettings, train_locally

#: Modes compared by the DP speed benchmarks: a non-private epoch and Opacus' two modes.
MODES = ("non-private", "ghost", "hooks")


def synthetic_features(kind: str, rows: int, *, seed: int = 0) -> FeatureTensors:
    """A synthetic ``kind`` silo of ``rows`` users, validated and featurized."""
    return featurize(generate_silo(kind, rows, seed=seed).table)


def fresh_encoder(data: FeatureTensors, *, seed: int = 0, device: str = "cpu") -> PersonaEncoder:
    """The default encoder for ``data``'s layout, initialised from ``seed``."""
    torch.manual_seed(seed)
    return PersonaEncoder(data.layout, EncoderConfig()).to(device)


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
        local_epochs=1, batch_size=batch_size, grad_sample_mode=mode if private else "ghost", device=device
    )
    # A generous target: the benchmark times steps, it does not spend a real budget.
    privacy = PrivacySettings(target_epsilon=1e3 if private else float("inf"))
    model = fresh_encoder(data, seed=seed, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with tempfile.TemporaryDirectory() as state, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ledger = PrivacyLedger(state, settings=privacy) if private else None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_locally(
            model=model, data=data, settings=settings, privacy=privacy,
            noise_multiplier=1.0 if private else None, ledger=ledger, round=1, generator=generator,
        )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return EpochTiming(mode, batch_size, len(data), result.steps, seconds)


def median(values: list[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))
