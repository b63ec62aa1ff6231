"""The exceptions fedpersona raises for problems a user can fix.

::

    FedPersonaError                 anything fedpersona reports as a user problem (exit code 2)
     +-- ConfigError                a scenario, client, federation or run-config file is wrong
     +-- SchemaError                a schema file is wrong, or a data table does not match it
     +-- DataError                  a data file cannot be read at all
     +-- PrivacyBudgetExceeded      the work asked for would spend more than the partner's budget
     +-- PrivacyLedgerError         a privacy ledger is unreadable or was tampered with

Every message is one paragraph that names the file, the key/column/row and what was expected,
so the CLI can print it as it is.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "FedPersonaError",
    "PrivacyBudgetExceeded",
    "PrivacyLedgerError",
    "SchemaError",
]


class FedPersonaError(Exception):
    """Base class of every error caused by user input or a user decision."""


class ConfigError(FedPersonaError):
    """A configuration file or option is invalid."""


class SchemaError(FedPersonaError):
    """A schema is invalid, or a table does not match its schema.

    ``problems`` lists every individual problem found, so that an operator can fix a file in
    one pass; ``str(error)`` joins them into one paragraph.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        shown = self.problems[:25]
        more = len(self.problems) - len(shown)
        text = f"{source}: {len(self.problems)} problem(s): " + "; ".join(shown)
        if more:
            text += f"; and {more} more"
        super().__init__(text)


class DataError(FedPersonaError):
    """A data file is missing, unreadable or not in the declared format."""


class PrivacyBudgetExceeded(FedPersonaError):
    """Running the requested mechanism would push epsilon above the partner's target."""


class PrivacyLedgerError(FedPersonaError):
    """A privacy ledger cannot be read, or its hash chain does not verify."""
