"""Encoding of fedpersona's settings into Flower records, and back.

The server sends the federation-wide settings (model sizes, training settings, round
numbers) in each message's ``config`` record, flattened as ``model.<key>`` and
``training.<key>``. Partners never receive another partner's data or settings.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpersona.encoder import EncoderConfig
from fedpersona.training import TrainingSettings

__all__ = ["decode_arrays", "decode_settings", "encode_arrays", "encode_settings"]


def encode_settings(model: EncoderConfig, training: TrainingSettings, **extra: Any) -> ConfigRecord:
    values: dict[str, Any] = {}
    for prefix, obj in (("model", model), ("training", training)):
        for f in fields(obj):
            values[f"{prefix}.{f.name}"] = getattr(obj, f.name)
    values.update(extra)
    return ConfigRecord(values)


def decode_settings(config: ConfigRecord) -> tuple[EncoderConfig, TrainingSettings]:
    model = {f.name: config[f"model.{f.name}"] for f in fields(EncoderConfig)}
    training = {f.name: config[f"training.{f.name}"] for f in fields(TrainingSettings)}
    return EncoderConfig(**model), TrainingSettings(**training)


def encode_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def finite_or_none(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)
