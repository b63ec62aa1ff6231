"""fedpersona: federated, differentially private user personas from data that never leaves."""

from fedpersona.encoder import EncoderConfig, PersonaEncoder
from fedpersona.errors import (
    ConfigError,
    DataError,
    FedPersonaError,
    PrivacyBudgetExceeded,
    PrivacyLedgerError,
    SchemaError,
)
from fedpersona.features import featurize
from fedpersona.privacy import PrivacyLedger, PrivacySettings
from fedpersona.schema import Schema, load_schema
from fedpersona.simulation import simulate
from fedpersona.tables import Table, load_table
from fedpersona.training import TrainingSettings, train_locally

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "EncoderConfig",
    "FedPersonaError",
    "PersonaEncoder",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "PrivacyLedgerError",
    "PrivacySettings",
    "Schema",
    "SchemaError",
    "Table",
    "TrainingSettings",
    "__version__",
    "featurize",
    "load_schema",
    "load_table",
    "simulate",
    "train_locally",
]
