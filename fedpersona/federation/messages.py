"""Encoding of fedpersona's settings into Flower records, and back.

The server sends the federation-wide settings (model sizes, training settings, round
numbers) in each message's ``config`` record, flattened as ``model.<key>`` and
``training.<key>``. Partners never receive another partner's data or settings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedpersona.config.settings import ModelSettings, TrainingSettings

__all__ = [
    "arrays_of",
    "config_of",
    "decode_arrays",
    "decode_settings",
    "encode_arrays",
    "encode_settings",
    "metrics_of",
]


# A record holds no None: an unset ``training.sample_rate`` travels as 0.0 (never a valid rate).
_UNSET = 0.0
_OPTIONAL = ("training.sample_rate",)


def encode_settings(model: ModelSettings, training: TrainingSettings, **extra: Any) -> ConfigRecord:
    values: dict[str, Any] = {}
    for prefix, obj in (("model", model), ("training", training)):
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            values[f"{prefix}.{name}"] = _UNSET if value is None and f"{prefix}.{name}" in _OPTIONAL else value
    values.update(extra)
    return ConfigRecord(values)


def decode_settings(config: ConfigRecord | dict[str, Any]) -> tuple[ModelSettings, TrainingSettings]:
    def value(key: str) -> Any:
        got = config[key]
        return None if key in _OPTIONAL and got == _UNSET else got

    model: dict[str, Any] = {name: value(f"model.{name}") for name in ModelSettings.model_fields}
    training: dict[str, Any] = {name: value(f"training.{name}") for name in TrainingSettings.model_fields}
    return ModelSettings.model_validate(model), TrainingSettings.model_validate(training)


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
