"""The guarantee: the secret randomness every release draws from, per-sample clipping (the
DP-SGD release), accounting (PRV/RDP), the partner's append-only ledger, the one privacy
planner (the plan a user reads is the plan that runs) and the noise search behind it, and the
release manifest that lists everything a partner may send."""

__all__ = ["accounting", "clipping", "ledger", "manifest", "noise_search", "planner", "randomness"]
