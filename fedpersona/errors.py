"""The exceptions fedpersona raises for problems a user can fix.

::

    FedPersonaError                 anything fedpersona reports as a user problem (exit code 2)
     +-- ConfigError                a scenario, client, federation or run-config file is wrong
     +-- SchemaError                a schema file is wrong, or a data table does not match it
     +-- DataError                  a data file cannot be read at all
     +-- PrivacyBudgetExceeded      the work asked for would spend more than the partner's budget
     +-- PrivacyLedgerError         a privacy ledger is unreadable or was tampered with
     +-- PolicyRefusal              the partner's own policy refuses what it was asked to do

Every message is one paragraph that names the file, the key/column/row and what was expected,
so the CLI can print it as it is.

Each class has a ``category``: a fixed word that is all a partner's error reply to the
coordinator says about the problem (with its code, see :data:`fedpersona.privacy.manifest.ERROR_CODES`).
The message itself may quote a cell of the partner's table, so it stays in the partner's own
log and never leaves.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "FedPersonaError",
    "PolicyRefusal",
    "PrivacyBudgetExceeded",
    "PrivacyLedgerError",
    "SchemaError",
]


class FedPersonaError(Exception):
    """Base class of every error caused by user input or a user decision."""

    category = "error"


class ConfigError(FedPersonaError):
    """A configuration file or option is invalid."""

    category = "config"


class SchemaError(FedPersonaError):
    """A schema is invalid, or a table does not match its schema.

    ``problems`` lists every individual problem found, so that an operator can fix a file in
    one pass; ``str(error)`` joins them into one paragraph.
    """

    category = "data"

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

    category = "data"


class PrivacyBudgetExceeded(FedPersonaError):
    """Running the requested mechanism would push epsilon above the partner's target."""

    category = "privacy-budget"


class PrivacyLedgerError(FedPersonaError):
    """A privacy ledger cannot be read, or its hash chain does not verify."""

    category = "ledger"


class PolicyRefusal(FedPersonaError):
    """The partner's configured policy refuses the request (e.g. a plain, non-secure release)."""

    category = "policy"
