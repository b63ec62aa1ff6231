"""Personas: federated DP k-means on the persona embeddings (one schedule, used by the
coordinator and by every transport-free caller) and the persona cards a partner writes for its
own users."""

__all__ = ["cards", "clustering", "columns", "schedule", "surrogate"]
