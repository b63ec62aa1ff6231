"""Flower glue and the partner"s work: message encoding, scoped aggregation, secure
aggregation, the coordinator"s checkpoint, the partner"s round functions, the ClientApp and the
ServerApp."""

__all__ = [
    "aggregation",
    "checkpoint",
    "client_app",
    "messages",
    "partner",
    "partner_personas",
    "publishing",
    "roster",
    "rounds",
    "run_log",
    "secagg",
    "secure_round",
    "server_app",
]
