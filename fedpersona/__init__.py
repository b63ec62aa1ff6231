"""fedpersona: federated, differentially private user personas from data that never leaves."""

from fedpersona.data.features import featurize
from fedpersona.data.schema import Schema, load_schema
from fedpersona.data.tables import Table, load_table
from fedpersona.errors import (
    ConfigError,
    DataError,
    FedPersonaError,
    PrivacyBudgetExceeded,
    PrivacyLedgerError,
    SchemaError,
)
from fedpersona.model.encoder import EncoderConfig, PersonaEncoder
from fedpersona.model.training import TrainingSettings, train_locally
from fedpersona.privacy.accounting import PrivacyLedger, PrivacySettings
from fedpersona.simulation import simulate

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
