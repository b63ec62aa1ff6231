"""fedpersona: federated, differentially private user personas from data that never leaves.

The package is layered; a module imports only from its own layer and the ones below it
(``tests/test_layers.py`` enforces this):

============  ===========================================================================
layer         modules
============  ===========================================================================
application   ``cli``, ``simulation``, ``sweep``, ``report``, ``audit``
deploy        coordinator, partner site, credentials, processes, model registry
federation    messages, aggregation, secure aggregation, checkpoint, partner, ClientApp,
              ServerApp (glue, roster, rounds, publishing)
personas      DP-PCA + DP-EM personas per kind (one protocol), persona cards
model         encoder and scopes, DP training, evaluation, inference, signed artifacts
privacy       secret randomness, accounting, ledger, the one planner, release manifest
data          schema, tables, drafting, event logs, features, synthetic silos
config        every setting, declared once (pydantic), and the files that hold them
errors        the exception hierarchy
============  ===========================================================================

The public names below are imported on first use, so ``import fedpersona`` (and every CLI
command that needs no model) starts without importing PyTorch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "ConfigError": "fedpersona.errors",
    "DataError": "fedpersona.errors",
    "FedPersonaError": "fedpersona.errors",
    "PrivacyBudgetExceeded": "fedpersona.errors",
    "PrivacyLedgerError": "fedpersona.errors",
    "SchemaError": "fedpersona.errors",
    "ModelSettings": "fedpersona.config.settings",
    "PrivacySettings": "fedpersona.config.settings",
    "TrainingSettings": "fedpersona.config.settings",
    "Schema": "fedpersona.data.schema",
    "load_schema": "fedpersona.data.schema_reader",
    "Table": "fedpersona.data.tables",
    "load_table": "fedpersona.data.tables",
    "featurize": "fedpersona.data.features",
    "PersonaEncoder": "fedpersona.model.encoder",
    "train_locally": "fedpersona.model.training",
    "PrivacyLedger": "fedpersona.privacy.ledger",
    "simulate": "fedpersona.simulation",
}

__all__ = [
    "ConfigError",
    "DataError",
    "FedPersonaError",
    "ModelSettings",
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

if TYPE_CHECKING:
    from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings
    from fedpersona.data.features import featurize
    from fedpersona.data.schema import Schema
    from fedpersona.data.schema_reader import load_schema
    from fedpersona.data.tables import Table, load_table
    from fedpersona.errors import (
        ConfigError,
        DataError,
        FedPersonaError,
        PrivacyBudgetExceeded,
        PrivacyLedgerError,
        SchemaError,
    )
    from fedpersona.model.encoder import PersonaEncoder
    from fedpersona.model.training import train_locally
    from fedpersona.privacy.ledger import PrivacyLedger
    from fedpersona.simulation import simulate


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedpersona' has no attribute {name!r}")
