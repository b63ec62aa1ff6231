"""Accounting: the epsilon of a composition of Gaussian mechanisms, from one accountant.

A partner's releases are Poisson-subsampled Gaussian steps (DP-SGD, entries ``(sigma, q,
steps)``) and plain Gaussian releases (``(sigma, 1.0, 1)``: DP k-means rounds). They are
composed in one accountant: ``prv`` (default; Gopi et al. 2021; above Google's PLD by at most
its absolute ``eps_error`` of 0.01 plus ~0.2%) or ``rdp`` (looser, an upper bound). Opacus'
``gdp`` accountant under-reports epsilon for DP-SGD and is refused by the settings.
Neighbouring tables differ by adding or removing one user (see ``docs/privacy.md``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["compute_epsilon", "merge_history", "rdp_order_notice_silenced"]


def compute_epsilon(history: list[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of subsampled-Gaussian runs ``(sigma, q, steps)``."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # here: the coordinator never needs Opacus or torch

    acc = create_accountant(accountant)
    acc.history = merge_history(history)
    with rdp_order_notice_silenced():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def rdp_order_notice_silenced() -> Iterator[None]:
    """Opacus' RDP analysis (also used by PRV to size its domain) warns when the best order
    is the largest one it tried; the bound is still valid, only possibly looser than PRV's
    own result, so the notice carries no information for the caller.

    Also silenced: NumPy's "divide by zero encountered in log" from Opacus' PRV at sample
    rate 1 (a partner with no more rows than the batch size): it evaluates ``log(1 - q)`` =
    -inf on purpose inside an ``np.where`` and the epsilon is right (tests pin it to PLD)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings(
            "ignore",
            message="divide by zero encountered in log",
            category=RuntimeWarning,
            module=r"opacus\.accountants\.analysis\.prv\.prvs",
        )
        yield


def merge_history(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Group runs with the same (sigma, q), summing their steps.

    Composition is commutative, so this changes no epsilon; it keeps the PRV accountant fast
    (it composes one distribution per distinct entry).
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]
