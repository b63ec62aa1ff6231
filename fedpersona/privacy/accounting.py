"""Accounting: the epsilon of a composition of Gaussian mechanisms, from one accountant.

A partner's releases are Poisson-subsampled Gaussian steps (DP-SGD, entries ``(sigma, q,
steps)``) and plain Gaussian releases (``(sigma, 1.0, 1)``: the Gram release, EM steps, DP
k-means rounds). They are composed in one accountant: ``prv`` (default; Gopi et al. 2021;
above Google's PLD by at most its absolute ``eps_error`` of 0.01 plus ~0.2%) or ``rdp``
(looser, an upper bound). Opacus' ``gdp`` accountant under-reports epsilon for DP-SGD and is
refused by the settings. Neighbouring tables differ by adding or removing one user (see
``docs/privacy.md``).

**The numerics are Opacus' (1.6) accountants', computed faster.** :func:`compute_epsilon`
runs the same algorithms with the same parameters, vectorised, and agrees with Opacus'
``PRVAccountant`` / ``RDPAccountant`` to ~1e-10 relative (``tests/test_planning.py`` pins
this on a grid, and the cross-check tests compare it with Google's PLD):

- ``rdp``: Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019,
  arXiv:1908.10530, section 3.3) at Opacus' 151 default orders, the integer-order sum and the
  fractional-order series summed as arrays (the series cut where Opacus cuts it: after the
  first term below e^-30), converted to (epsilon, delta) with Balle et al. 2020 (arXiv:1905.09982,
  theorem 21) and minimised over the orders.
- ``prv``: the privacy-loss random variable of each entry, truncated to ``[-L, L]`` and
  discretised on a mesh, composed by FFT and read off at ``delta`` (Gopi, Lee & Wutschitz 2021,
  "Numerical composition of differential privacy", NeurIPS; arXiv:2106.02848). As in Opacus:
  ``eps_error = 0.01``, ``delta_error = delta / 1000``, ``L = max(L_rdp, eps_error) + 3`` with
  ``L_rdp`` the RDP epsilon of the whole history at ``delta_error / 4`` and of each single step at
  ``delta_error / (8 * steps)`` (remark 5.6 of the paper), mesh ``eps_error / sqrt(steps
  * log(12 / delta_error) / 2)``; each discretised PRV is shifted to keep its continuous mean;
  the answer is the upper end, ``epsilon(delta - delta_error) + eps_error``. Differences from
  Opacus' code, none of which changes the analysis: the domain's RDP bound is the vectorised
  one above (Opacus' scalar loops take ~90% of its time), each CDF is evaluated once per cell
  edge, the mean by Simpson's rule on those edges instead of adaptive quadrature, and all
  entries are composed in one FFT of a fast length (Opacus composes each entry circularly on
  the domain's own length, often a slow one, then convolves entries pairwise).

:data:`ACCOUNTANT_VERSION` names these numerics: caches of epsilons or planned noise (the
planner's) are keyed by it and must be dropped when it changes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator

import numpy as np
from scipy import special
from scipy.fft import irfft, next_fast_len, rfft

__all__ = [
    "ACCOUNTANT_VERSION",
    "analytic_gaussian_delta",
    "analytic_gaussian_epsilon",
    "analytic_gaussian_noise",
    "clear_caches",
    "compute_epsilon",
    "estimate_epsilon",
    "merge_history",
    "rdp_order_notice_silenced",
]

#: Changes whenever the numbers :func:`compute_epsilon` returns may change.
ACCOUNTANT_VERSION = "fedpersona-accounting-1 (Opacus 1.6 PRV/RDP numerics)"

#: Opacus' default RDP orders: 1.1, 1.2, ..., 10.9 and 12, ..., 63.
ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=np.float64)
_INTEGER = ORDERS == np.round(ORDERS)
EPS_ERROR = 0.01
ESTIMATE_EPS_ERROR = 0.1  # the coarse mesh of :func:`estimate_epsilon`
MAX_DOMAIN = 1 << 24  # PRV grid points; a wider domain means an epsilon in the hundreds: reported as inf
_SERIES_CUT = -30.0  # the fractional-order series stops after its first term below exp(-30)

History = list[tuple[float, float, int]]


def compute_epsilon(history: History, *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of subsampled-Gaussian runs ``(sigma, q, steps)``.

    The result depends on the multiset of runs only (they are merged first), and repeated
    questions are answered from an in-memory cache.
    """
    entries = _checked(history, delta, accountant)
    if entries is None:
        return 0.0
    if accountant not in ("prv", "rdp"):
        from opacus.accountants import create_accountant  # here: the coordinator never needs Opacus or torch

        acc = create_accountant(accountant)
        acc.history = merge_history(history)
        with rdp_order_notice_silenced():
            return float(acc.get_epsilon(delta=delta))
    return _cached_epsilon(entries, float(delta), accountant)


def estimate_epsilon(history: History, *, delta: float, accountant: str) -> float:
    """A fast estimate of :func:`compute_epsilon`, to steer a search, never to certify a plan.

    ``prv``: the same PRV estimate on a mesh ten times coarser (``eps_error`` 0.1), plus the
    0.01 the exact accountant adds (within ~1e-4 relative of :func:`compute_epsilon` for
    epsilons above ~0.5, within ~1% below). ``rdp``: the RDP bound over the integer orders
    only, at least :func:`compute_epsilon`'s.
    """
    entries = _checked(history, delta, accountant)
    if entries is None:
        return 0.0
    if accountant == "prv":
        return _prv_epsilon(entries, float(delta), ESTIMATE_EPS_ERROR) - ESTIMATE_EPS_ERROR + EPS_ERROR
    if accountant == "rdp":
        whole = sum((_rdp_integer_orders(s, q) * n for s, q, n in entries), np.zeros(_INTEGER.sum()))
        return _rdp_to_dp(whole, float(delta), ORDERS[_INTEGER])
    return compute_epsilon(history, delta=delta, accountant=accountant)


def _checked(history: History, delta: float, accountant: str) -> tuple[tuple[float, float, int], ...] | None:
    """The merged history in a canonical order (None when empty), or ValueError."""
    if not history:
        return None
    entries = tuple(sorted(merge_history(history)))
    for sigma, q, steps in entries:
        if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1 and steps >= 1):
            raise ValueError(f"cannot account a run with noise {sigma!r}, sample rate {q!r} and {steps!r} steps")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return entries


def clear_caches() -> None:
    """Forget every cached epsilon and RDP curve (for cold-start measurements)."""
    for cached in (_cached_epsilon, _rdp_per_step, _rdp_integer_orders):
        cached.cache_clear()


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if accountant == "rdp":
        return _rdp_epsilon(entries, delta)
    return _prv_epsilon(entries, delta)


@contextlib.contextmanager
def rdp_order_notice_silenced() -> Iterator[None]:
    """Opacus' RDP analysis (also used by its PRV to size its domain) warns when the best order
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


def merge_history(history: History) -> History:
    """Group runs with the same (sigma, q), summing their steps.

    Composition is commutative, so this changes no epsilon; it keeps the PRV accountant fast
    (it composes one distribution per distinct entry).
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


# --- RDP ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each of :data:`ORDERS`."""
    if q == 1.0:
        return ORDERS / (2 * sigma**2)
    out = np.empty_like(ORDERS)
    out[_INTEGER] = _log_a_integer(q, sigma, ORDERS[_INTEGER].astype(np.int64))
    out[~_INTEGER] = _log_a_fractional(q, sigma, ORDERS[~_INTEGER])
    out /= ORDERS - 1
    out.flags.writeable = False
    return out


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha = log sum_k C(alpha, k) q^k (1 - q)^(alpha - k) exp((k^2 - k) / (2 sigma^2))."""
    k = np.arange(int(alphas.max()) + 1, dtype=np.float64)[None, :]
    a = alphas.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        log_binom = special.gammaln(a + 1) - special.gammaln(k + 1) - special.gammaln(a - k + 1)
    terms = log_binom + k * math.log(q) + (a - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    terms = np.where(k <= a, terms, -np.inf)
    return np.asarray(special.logsumexp(terms, axis=1))


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for non-integer alpha: the two alternating series of MTZ19 section 3.3,
    each order's terms summed up to and including its first term whose two parts are both
    below e^-30 (where Opacus stops), in blocks of terms, the signs summed apart."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_pos = np.full(len(alphas), -np.inf)
    log_neg = np.full(len(alphas), -np.inf)
    active = np.ones(len(alphas), dtype=bool)
    start, block = 0, 256
    while active.any():
        if start > 1 << 22:
            raise ArithmeticError(f"the RDP series for noise {sigma!r} and sample rate {q!r} does not converge")
        i = np.arange(start, start + block, dtype=np.float64)[None, :]
        a = alphas[active][:, None]
        j = a - i
        coef = special.binom(a, i)
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        log_s0 = (log_coef + i * math.log(q) + j * math.log(1 - q) + (i * i - i) / (2 * sigma**2)) + special.log_ndtr(
            (z0 - i) / sigma
        )
        log_s1 = (log_coef + j * math.log(q) + i * math.log(1 - q) + (j * j - j) / (2 * sigma**2)) + special.log_ndtr(
            (j - z0) / sigma
        )
        small = np.maximum(log_s0, log_s1) < _SERIES_CUT
        ends = small.any(axis=1)
        last = np.where(ends, np.argmax(small, axis=1), block)[:, None]  # the first small term is included
        keep = np.arange(block)[None, :] <= last
        terms = np.logaddexp(log_s0, log_s1)
        log_pos[active] = np.logaddexp(log_pos[active], _masked_logsumexp(terms, keep & (coef > 0)))
        log_neg[active] = np.logaddexp(log_neg[active], _masked_logsumexp(terms, keep & (coef < 0)))
        active[np.flatnonzero(active)[ends]] = False
        start, block = start + block, min(block * 2, 8192)
    with np.errstate(divide="ignore"):
        return np.asarray(log_pos + np.log1p(-np.exp(log_neg - log_pos)))


def _masked_logsumexp(terms: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(special.logsumexp(np.where(mask, terms, -np.inf), axis=1))


def _rdp_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float) -> float:
    rdp = sum((_rdp_per_step(sigma, q) * steps for sigma, q, steps in entries), np.zeros_like(ORDERS))
    return _rdp_to_dp(rdp, delta)


def _rdp_to_dp(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> float:
    """Balle et al. 2020, theorem 21: the best (epsilon, delta) over the orders."""
    eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    if np.isnan(eps).all():
        return math.inf
    return float(np.nanmin(eps))


# --- PRV ------------------------------------------------------------------------------------


def _prv_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, eps_error: float = EPS_ERROR) -> float:
    """The PRV accountant's epsilon; a larger ``eps_error`` gives a coarser mesh (faster, and
    a looser bound: the answer carries ``eps_error`` on top of the estimate)."""
    delta_error = delta / 1000
    total = sum(steps for _, _, steps in entries)
    half_width = _domain_half_width(entries, delta_error)
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    low, high = math.floor(-half_width / mesh), math.ceil(half_width / mesh)
    size = high - low + 1
    if size % 2:
        size, high = size + 1, high + 1
    if size > MAX_DOMAIN:
        return math.inf  # epsilon in the hundreds: as good as no guarantee, and too costly to resolve
    t_min, t_max = low * mesh, high * mesh
    if np.finfo(np.longdouble).eps * size > delta - delta_error:
        raise ValueError(f"delta {delta:g} is too small for this accountant's floating-point precision")
    grid = np.linspace(t_min, t_max, size)
    step = (t_max - t_min) / (size - 1)
    edges = np.linspace(t_min - step / 2, t_max + step / 2, size + 1)
    length = next_fast_len(size, real=True)
    spectrum = np.ones(length // 2 + 1, dtype=np.complex128)
    shift = 0.0
    for sigma, q, steps in entries:
        pmf, mean_shift = _discretise(sigma, q, grid, edges, step)
        spectrum *= _power(rfft(pmf, length), steps)
        shift += steps * mean_shift
    composed = irfft(spectrum, length)
    # The sum of ``total`` grid values low + i_k lands at index sum(i_k): grid index j is at (j - (total - 1) low).
    start = (-(total - 1) * low) % length
    pmf = np.take(composed, np.arange(start, start + size) % length)
    t = grid + shift
    return _epsilon_at(pmf, t, delta - delta_error) + eps_error


def _domain_half_width(entries: tuple[tuple[float, float, int], ...], delta_error: float) -> float:
    """Gopi et al.'s remark 5.6 as Opacus applies it, with the RDP bounds over the integer orders
    only (the fractional orders' series are the slow part of RDP): the minimum over fewer
    orders is at least Opacus' bound, so the domain is at least as wide and the truncation
    error at most Opacus'."""
    total = sum(steps for _, _, steps in entries)
    whole = sum((_rdp_integer_orders(sigma, q) * steps for sigma, q, steps in entries), np.zeros(_INTEGER.sum()))
    bound = _rdp_to_dp(whole, delta_error / 4, ORDERS[_INTEGER])
    for sigma, q, _ in entries:
        bound = max(bound, _rdp_to_dp(_rdp_integer_orders(sigma, q), delta_error / (8 * total), ORDERS[_INTEGER]))
    return max(bound, EPS_ERROR) + 3  # Opacus: max(bound, eps_error) + 3, with its eps_error 0.01


@functools.lru_cache(maxsize=1024)
def _rdp_integer_orders(sigma: float, q: float) -> np.ndarray:
    orders = ORDERS[_INTEGER]
    out = orders / (2 * sigma**2) if q == 1.0 else _log_a_integer(q, sigma, orders.astype(np.int64)) / (orders - 1)
    out.flags.writeable = False
    return out


def _prv_cdf(sigma: float, q: float, t: np.ndarray) -> np.ndarray:
    """CDF of the privacy loss of the Poisson-subsampled Gaussian mechanism (Gopi et al. 2021,
    propositions B1 and B4); for q = 1 the Gaussian N(1 / (2 sigma^2), 1 / sigma^2)."""
    root2 = math.sqrt(2.0)
    if q == 1.0:
        return np.asarray(special.ndtr((t - 1 / (2 * sigma**2)) * sigma))
    above = t > math.log1p(-q)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # exp(t) = inf far right: the CDF is 1 there
        z = np.log(np.where(above, (np.exp(t) + q - 1) / q, 1.0))
    cdf = (
        1.0
        - q * special.erfc((2 * z * sigma**2 - 1) / (2 * root2 * sigma)) / 2
        - (1 - q) * special.erfc((2 * z * sigma**2 + 1) / (2 * root2 * sigma)) / 2
    )
    return np.where(above, cdf, 0.0)


def _discretise(sigma: float, q: float, grid: np.ndarray, edges: np.ndarray, step: float) -> tuple[np.ndarray, float]:
    """The PRV truncated to the grid's range as a pmf on the grid cells, and the shift that
    gives the discrete variable the continuous (truncated) one's mean."""
    t_min, t_max = float(grid[0]), float(grid[-1])
    ends = _prv_cdf(sigma, q, np.array([t_min, t_max]))
    mass = ends[1] - ends[0]
    cdf = np.clip((_prv_cdf(sigma, q, edges) - ends[0]) / mass, 0.0, 1.0)
    cdf[0], cdf[-1] = 0.0, 1.0  # the first edge lies below t_min, the last above t_max
    pmf = np.diff(cdf)
    mean_shift = _truncated_mean(sigma, q, t_min, t_max) / mass - float(np.dot(grid, pmf))
    if abs(mean_shift) >= step / 2:
        raise ArithmeticError(f"the discretised PRV (noise {sigma:g}, sample rate {q:g}) lost its mean")
    return pmf, mean_shift


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)


def _truncated_mean(sigma: float, q: float, t_min: float, t_max: float) -> float:
    """E[Y 1{t_min <= Y <= t_max}] for the privacy loss Y = log(1 - q + q exp((2w - 1) / (2 sigma^2)))
    of w ~ (1 - q) N(0, sigma^2) + q N(1, sigma^2), as an integral over w (Y is increasing in w):
    Gauss-Legendre on panels narrower than the integrand's scales, over the range where the
    mixture has mass (40 sigma beyond its two centres)."""
    scale = 2 * sigma**2

    def w_of(t: float) -> float:  # the inverse of Y(w); -inf below Y's infimum log(1 - q)
        inner = math.expm1(t) + q
        return -math.inf if inner <= 0 else sigma**2 * math.log(inner / q) + 0.5

    low = max(w_of(t_min), -40 * sigma)
    high = min(w_of(t_max), 1 + 40 * sigma)
    if not high > low:
        return 0.0
    width = min(sigma, sigma**2) / 4
    panels = int(min(max(math.ceil((high - low) / width), 8), 20_000))
    cuts = np.linspace(low, high, panels + 1)
    half = (cuts[1:] - cuts[:-1])[:, None] / 2
    w = (cuts[:-1, None] + half) + half * _NODES[None, :]
    log_keep = math.log1p(-q) if q < 1 else -math.inf
    loss = np.logaddexp(log_keep, math.log(q) + (2 * w - 1) / scale)
    density = ((1 - q) * np.exp(-(w * w) / scale) + q * np.exp(-((w - 1) ** 2) / scale)) / math.sqrt(math.pi * scale)
    return float(np.sum(half * (loss * density) * _WEIGHTS[None, :]))


def _power(values: np.ndarray, exponent: int) -> np.ndarray:
    """``values ** exponent`` for a positive integer exponent, by repeated squaring."""
    result: np.ndarray | None = None
    base = values
    while exponent:
        if exponent & 1:
            result = base.copy() if result is None else result * base
        exponent >>= 1
        if exponent:
            base = base * base
    assert result is not None
    return result


def _epsilon_at(pmf: np.ndarray, t: np.ndarray, delta: float) -> float:
    """The smallest grid epsilon with delta(epsilon) <= ``delta``: delta(eps) = sum over t >= eps
    of p(t) (1 - exp(eps - t)), the hockey-stick divergence of the composed PRV."""
    tail = np.cumsum(pmf[::-1])[::-1]
    weighted = np.cumsum((pmf * np.exp(-t))[::-1])[::-1]
    negative_delta = np.exp(t) * weighted - tail
    i = int(np.searchsorted(negative_delta, -delta, side="left"))
    if i <= 0:
        raise ArithmeticError("the PRV accountant's domain is too small for this delta")
    return float(np.log((tail[i] - delta) / weighted[i]))


# --- the analytic Gaussian mechanism ----------------------------------------------------------


def analytic_gaussian_delta(*, noise: float, epsilon: float) -> float:
    """The exact delta(epsilon) of one Gaussian mechanism with L2 sensitivity 1 and noise std
    ``noise`` (Balle & Wang 2018, "Improving the Gaussian mechanism for differential privacy",
    ICML, theorem 8): Phi(1 / (2 s) - epsilon s) - e^epsilon Phi(-1 / (2 s) - epsilon s)."""
    a, b = 1 / (2 * noise) - epsilon * noise, -1 / (2 * noise) - epsilon * noise
    return max(float(special.ndtr(a)) - math.exp(epsilon + float(special.log_ndtr(b))), 0.0)


def analytic_gaussian_noise(*, epsilon: float, delta: float) -> float:
    """The smallest noise std (sensitivity 1) of one Gaussian mechanism that is (epsilon,
    delta)-DP, by bisection on log(noise) of the closed-form delta (decreasing in the noise);
    the upper end of the final bracket, so delta(epsilon) <= ``delta`` holds."""
    if not (math.isfinite(epsilon) and epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"need epsilon > 0 and delta in (0, 1), got {epsilon!r} and {delta!r}")
    lo, hi = -20.0, 20.0  # log noise: e^-20 .. e^20
    for _ in range(200):
        mid = (lo + hi) / 2
        if analytic_gaussian_delta(noise=math.exp(mid), epsilon=epsilon) <= delta:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-15:
            break
    return math.exp(hi)


def analytic_gaussian_epsilon(*, noise: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism (sensitivity 1, noise std ``noise``) at
    ``delta``, by bisection on the closed-form delta (decreasing in epsilon); the upper end."""
    if not (math.isfinite(noise) and noise > 0 and 0 < delta < 1):
        raise ValueError(f"need noise > 0 and delta in (0, 1), got {noise!r} and {delta!r}")
    if analytic_gaussian_delta(noise=noise, epsilon=0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while analytic_gaussian_delta(noise=noise, epsilon=hi) > delta:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if analytic_gaussian_delta(noise=noise, epsilon=mid) <= delta:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-14 * hi:
            break
    return hi
