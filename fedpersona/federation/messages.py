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
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedpersona.model.encoder import EncoderConfig
from fedpersona.model.training import TrainingSettings

__all__ = [
    "arrays_of",
    "config_of",
    "decode_arrays",
    "decode_settings",
    "encode_arrays",
    "encode_settings",
    "metrics_of",
]


def encode_settings(model: EncoderConfig, training: TrainingSettings, **extra: Any) -> ConfigRecord:
    values: dict[str, Any] = {}
    for prefix, obj in (("model", model), ("training", training)):
        for f in fields(obj):
            values[f"{prefix}.{f.name}"] = getattr(obj, f.name)
    values.update(extra)
    return ConfigRecord(values)


def decode_settings(config: ConfigRecord | dict[str, Any]) -> tuple[EncoderConfig, TrainingSettings]:
    model: dict[str, Any] = {f.name: config[f"model.{f.name}"] for f in fields(EncoderConfig)}
    training: dict[str, Any] = {f.name: config[f"training.{f.name}"] for f in fields(TrainingSettings)}
    return EncoderConfig(**model), TrainingSettings(**training)


def config_of(message: Message) -> dict[str, Any]:
    """The message's ``config`` record as a plain dict."""
    return dict(message.content.config_records["config"])


def metrics_of(message: Message) -> dict[str, Any]:
    """The message's ``metrics`` record as a plain dict."""
    return dict(message.content.metric_records["metrics"])


def arrays_of(message: Message) -> dict[str, np.ndarray]:
    """The message's ``arrays`` record as numpy arrays by name."""
    return decode_arrays(message.content.array_records["arrays"])


def encode_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def finite_or_none(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)
