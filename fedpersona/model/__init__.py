"""The persona encoder and how it learns and runs: the encoder and its parameter scopes, local
DP-SGD training, held-out evaluation, inference (loading a model, assigning personas), and
the signed model artifact."""

__all__ = ["artifacts", "encoder", "evaluation", "inference", "scopes", "training"]
