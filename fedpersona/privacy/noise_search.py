"""The search behind every planned noise: the smallest noise whose epsilon stays within a target.

A :class:`NoiseSearch` names one search by its public inputs. :func:`smallest_noise` returns
its answer, and only a noise it has checked with
:func:`~fedpersona.privacy.accounting.compute_epsilon`, the function the ledger charges with:
the answer's epsilon lies in ``[target * (1 - tightness), target]``, so a plan never
overshoots and wastes at most ``tightness`` (relative) of the budget.

**The search** is a secant method on log(noise) against log(epsilon), which is close to a
straight line: first on :func:`~fedpersona.privacy.accounting.estimate_epsilon` (a coarse
mesh, ~1 ms), then on the exact epsilon starting from that answer, so most searches take one
or two exact evaluations.

**The cache.** Answers are kept in memory for the life of the process, keyed by every public
input of the search (:meth:`NoiseSearch.key`: kind, target, delta, accountant, the fixed
releases, sample rate, steps, tightness) and by :data:`SEARCH_VERSION` and
:data:`~fedpersona.privacy.accounting.ACCOUNTANT_VERSION`, so a repeated plan (the CLI's view,
then the partner's fixed plan, then every round's re-check) costs a dictionary look-up. The
inputs are public numbers and so is the noise planned from them: the cache holds nothing about
any user, and nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from fedpersona.errors import ConfigError
from fedpersona.privacy.accounting import ACCOUNTANT_VERSION, compute_epsilon, estimate_epsilon

__all__ = [
    "SEARCH_VERSION",
    "TIGHTNESS",
    "NoiseSearch",
    "clear_memory_cache",
    "smallest_noise",
]

logger = logging.getLogger(__name__)

History = list[tuple[float, float, int]]

#: Changes whenever a search may return a different noise for the same inputs.
SEARCH_VERSION = "fedpersona-noise-search-1"
#: A planned noise's epsilon lies in [target * (1 - TIGHTNESS), target].
TIGHTNESS = 1e-3
NOISE_MAX = 1e4


@dataclass(frozen=True)
class NoiseSearch:
    """One search's public inputs. ``sgd``: the smallest DP-SGD noise ``x`` such that ``fixed +
    [(x, q, steps)]`` is within the target; ``scale``: the smallest factor ``x >= 1`` such that
    ``fixed`` with every noise times ``x`` is."""

    kind: str
    target: float
    delta: float
    accountant: str
    fixed: tuple[tuple[float, float, int], ...]
    q: float
    steps: int
    tightness: float

    def history(self, x: float) -> History:
        if self.kind == "scale":
            return [(x * sigma, q, n) for sigma, q, n in self.fixed]
        return [*self.fixed, (x, self.q, self.steps)]

    def key(self) -> str:
        fields = [self.kind, self.target, self.delta, self.accountant, sorted(self.fixed), self.q, self.steps]
        versions = [SEARCH_VERSION, ACCOUNTANT_VERSION]
        return json.dumps([*fields, self.tightness, *versions], separators=(",", ":"))

    def accepts(self, epsilon: float) -> bool:
        return self.target * (1 - self.tightness) <= epsilon <= self.target


_MEMORY: dict[str, float] = {}


def clear_memory_cache() -> None:
    """Forget the remembered answers (for cold-start measurements)."""
    _MEMORY.clear()


def smallest_noise(search: NoiseSearch) -> float:
    """The search's answer: from memory, or searched (and remembered)."""
    key = search.key()
    if key not in _MEMORY:
        _MEMORY[key] = _search(search)
        logger.debug("planned noise %r for %s", _MEMORY[key], key)
    return _MEMORY[key]


def _epsilon(function: Callable[..., float], search: NoiseSearch, x: float) -> float:
    try:
        return float(function(search.history(x), delta=search.delta, accountant=search.accountant))
    except (ArithmeticError, ValueError):  # a noise so small the accountant cannot resolve it
        return math.inf


def _search(search: NoiseSearch) -> float:
    """Secant steps on u = log(x) against log(epsilon), first on the estimate, then exact."""
    aim = math.log(search.target * (1 - search.tightness / 2))
    floor = search.kind == "scale"

    def on(function: Callable[..., float]) -> Callable[[float], float]:
        return lambda u: _epsilon(function, search, math.exp(u))

    def near(epsilon: float) -> bool:
        return 0 < epsilon < math.inf and abs(math.log(epsilon) - aim) <= search.tightness / 8

    u, _, slope, _ = _secant(on(estimate_epsilon), 0.0, -1.0, aim, near, floor=floor)
    u, epsilon, _, _ = _secant(on(compute_epsilon), u, slope, aim, search.accepts, floor=floor)
    if not epsilon <= search.target:
        raise ConfigError(
            f"no noise up to {NOISE_MAX:g} keeps epsilon within {search.target:g} (delta {search.delta:g}, "
            f"accountant {search.accountant}): raise the target or lower the fixed releases"
        )
    return math.exp(u)


def _secant(
    epsilon_of: Callable[[float], float],
    u: float,
    slope: float,
    aim: float,
    accepts: Callable[[float], bool],
    *,
    floor: bool,
) -> tuple[float, float, float, bool]:
    """Move u until ``accepts(epsilon_of(u))``. Returns ``(u, epsilon, slope, accepted)``: the
    accepted point, or else the smallest u seen with epsilon <= e^aim (the last u if none).

    Steps: Newton on log(epsilon) - aim with the secant slope of the last two points, at most
    a factor e^2 in the noise at a time, kept strictly inside the bracket of the largest u
    above the aim and the smallest below it (bisection when a step would leave it). ``floor``:
    u stays >= 0 (a scale factor >= 1); u stays <= log(NOISE_MAX).
    """
    low, high = (0.0 if floor else -math.inf), math.log(NOISE_MAX)
    bad, good, good_epsilon = -math.inf, math.inf, math.inf
    last: tuple[float, float] | None = None
    epsilon = math.inf
    for _ in range(60):
        epsilon = epsilon_of(u)
        if accepts(epsilon):
            return u, epsilon, slope, True
        y = math.log(epsilon) - aim if 0 < epsilon < math.inf else (math.inf if epsilon > 0 else -math.inf)
        if y > 0:
            bad = max(bad, u)
        elif u < good:
            good, good_epsilon = u, epsilon
        if last is not None and math.isfinite(y) and math.isfinite(last[1]) and u != last[0]:
            secant = (y - last[1]) / (u - last[0])
            if secant < 0:
                slope = secant
        last = (u, y)
        if (good - bad < 1e-12) or (y > 0 and u >= high):
            break
        step = max(-2.0, min(2.0, -y / slope)) if math.isfinite(y) else (2.0 if y > 0 else -2.0)
        nxt = min(max(u + step, low), high)
        if not bad < nxt < good:
            if math.isfinite(bad) and math.isfinite(good):
                nxt = (bad + good) / 2
            elif nxt <= bad:
                nxt = min(bad + 2.0, high)
            else:
                nxt = max(good - 2.0, low)
        if nxt == u:
            break
        u = nxt
    if math.isfinite(good):
        return good, good_epsilon, slope, False
    return u, epsilon, slope, False
