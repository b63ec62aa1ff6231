"""The public surface is deliberate: pinned here."""

import fedpersona


def test_exported_members() -> None:
    assert sorted(fedpersona.__all__) == sorted(
        [
            "ConfigError",
            "DataError",
            "ModelSettings",
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
    )
    for name in fedpersona.__all__:
        assert hasattr(fedpersona, name), name
