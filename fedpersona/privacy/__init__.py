"""The guarantee: the secret randomness every release draws from, accounting (PRV/RDP), the
partner"s append-only ledger, the one privacy planner (the plan a user reads is the plan that
runs), and the release manifest that lists everything a partner may send."""

__all__ = ["accounting", "ledger", "manifest", "planner", "randomness"]
