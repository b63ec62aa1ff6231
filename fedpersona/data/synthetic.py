"""Synthetic silos: the embedded default data, drawn from shared persona archetypes.

Three partner kinds (a shop, a bank, a hospital) each hold a user table of their own shape,
but every user in every table is drawn the same way:

1. pick one of the six :data:`ARCHETYPES` (the ground-truth persona) from a mix vector;
2. draw the user's latent traits = the archetype's means + individual noise, in a
   standardised latent space (one unit = one between-person standard deviation);
3. write the observable columns of the table from the traits plus column noise, with the
   look of a real export: mixed types, right-skewed amounts, a few missing cells (written
   as ``""``), categorical codes, sequences, short free text and a binary label whose base
   rate is close to the public dataset the kind imitates.

Because the same archetypes drive all three kinds, a federated encoder can be scored against
the known personas (``ari`` in the benchmarks). Each table is described by a packaged schema
(``fedpersona/schemas/synthetic_<kind>.toml``) whose bounds and vocabularies are public
domain knowledge, not fitted to a sample.

Randomness is always injected: :func:`generate_frame` takes a ``numpy.random.Generator``,
:func:`generate_silo` a seed.
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedpersona.data.schema import KINDS, Schema
from fedpersona.data.schema_reader import parse_schema

if TYPE_CHECKING:
    from fedpersona.data.tables import Table

__all__ = [
    "ARCHETYPES",
    "TARGET_LABEL_RATES",
    "TRAITS",
    "Archetype",
    "SyntheticSilo",
    "generate_frame",
    "generate_silo",
    "partner_mixes",
    "synthetic_schema",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archetype:
    """A latent persona: mean traits in a standardised latent space (0 = population centre)."""

    name: str
    description: str
    age: float
    income: float
    digital: float
    spending: float
    financial_risk: float
    health_risk: float
    activity: float

    @property
    def traits(self) -> tuple[float, ...]:
        """The trait means, in the order of :data:`TRAITS`."""
        return astuple(self)[2:]


TRAITS: tuple[str, ...] = tuple(f.name for f in fields(Archetype))[2:]

# fmt: off
ARCHETYPES: tuple[Archetype, ...] = (
    Archetype("young_bargain_hunter",
              "young, very online, low income, hunts discounts; healthy, moderate credit risk",
              age=-1.6, income=-1.0, digital=1.6, spending=-0.6, financial_risk=0.6,
              health_risk=-1.2, activity=0.6),
    Archetype("affluent_professional",
              "mid-career, high income and spending, online, pays in full, fairly healthy",
              age=0.0, income=1.8, digital=1.0, spending=1.6, financial_risk=-1.2,
              health_risk=-0.4, activity=0.0),
    Archetype("family_provider",
              "thirty-something household shopper, average income, revolves credit, sedentary",
              age=-0.4, income=0.0, digital=-0.8, spending=1.2, financial_risk=0.5,
              health_risk=0.6, activity=-1.2),
    Archetype("traditional_retiree",
              "older, offline, modest spending, careful with credit, higher health risk",
              age=1.8, income=-0.2, digital=-1.8, spending=-0.8, financial_risk=-1.0,
              health_risk=1.4, activity=-0.4),
    Archetype("stretched_borrower",
              "low income, heavy credit use and late payments, poorer health",
              age=-0.6, income=-1.6, digital=-0.4, spending=-1.4, financial_risk=2.0,
              health_risk=1.0, activity=-0.8),
    Archetype("wellness_enthusiast",
              "active, health-conscious, fifty-something, above-average income, spends little",
              age=1.0, income=1.0, digital=0.4, spending=-0.4, financial_risk=-0.6,
              health_risk=-1.6, activity=1.8),
)
# fmt: on

TARGET_LABEL_RATES: dict[str, float] = {"ecommerce": 0.15, "finance": 0.22, "health": 0.30}
"""Positive rate of each kind's label under the uniform mix (the public datasets' rates)."""

TRAIT_NOISE = 0.3
"""Within-archetype standard deviation of every latent trait."""

_MEANS = np.array([a.traits for a in ARCHETYPES], dtype=np.float64)  # (n_archetypes, n_traits)
_T = {name: i for i, name in enumerate(TRAITS)}
_MIX_TOLERANCE = 0.01  # hand-written mixes such as thirds are accepted, then renormalised
_ID_PREFIX = {"ecommerce": "E", "finance": "F", "health": "H"}

# Label intercepts, calibrated so that the uniform mix reaches TARGET_LABEL_RATES.
_INTERCEPT = {"ecommerce": -2.39, "finance": -2.36, "health": -1.53}

CATEGORIES: tuple[str, ...] = (
    "electronics", "fashion", "beauty", "home", "garden", "groceries",
    "books", "toys", "sports", "health", "travel", "gaming",
)  # fmt: skip
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet", "app")
PAYMENT_METHODS: tuple[str, ...] = ("card", "paypal", "bnpl", "cash_on_delivery", "bank_transfer")
EDUCATION: tuple[str, ...] = ("graduate", "university", "high_school", "other")
MARITAL: tuple[str, ...] = ("single", "married", "divorced", "widowed")
PAY_STATUS: tuple[str, ...] = ("no_use", "paid_full", "revolving", "late_1m", "late_2m", "late_3m+")
CARD_TIERS: tuple[str, ...] = ("standard", "gold", "platinum")
INSURANCE: tuple[str, ...] = ("private", "public", "uninsured")
N_REGIONS = 400
_REGION_P = 1.0 / np.arange(1, N_REGIONS + 1) ** 0.9  # Zipf-shaped region sizes
_REGION_P /= _REGION_P.sum()

# Preferred shop categories per archetype (log-odds added to a flat prior), CATEGORIES order.
# fmt: off
_CATEGORY_PREF = np.array([
    [2.0, 2.0, 1.2, 0.0, -1.0, 0.0, 0.0, -1.0, 0.5, -1.0, 0.0, 2.2],   # bargain hunter
    [1.6, 1.5, 0.6, 1.0, 0.0, -0.5, 0.5, -0.5, 0.3, 0.0, 2.4, 0.0],    # professional
    [0.0, 0.5, 0.0, 1.5, 0.6, 2.4, 0.0, 2.4, 0.0, 0.3, -0.5, 0.4],     # family
    [-0.5, 0.0, 0.0, 1.4, 2.3, 1.2, 2.0, 0.0, -1.0, 1.5, 0.3, -1.5],   # retiree
    [0.8, 0.8, 0.0, 0.5, -0.5, 2.0, -0.5, 0.5, -0.5, 0.0, -1.5, 1.2],  # borrower
    [0.0, 0.8, 0.5, 0.0, 0.5, 0.5, 0.5, -0.5, 2.6, 2.2, 1.0, -1.0],    # wellness
])
# fmt: on

_SEARCH_WORDS: tuple[tuple[str, ...], ...] = (
    ("cheap", "sale", "deal", "sneakers", "earbuds", "gaming", "headset", "phone", "case",
     "hoodie", "coupon", "discount", "student", "charger", "skin", "console"),
    ("premium", "leather", "laptop", "espresso", "machine", "luggage", "designer", "watch",
     "noise", "cancelling", "business", "linen", "wine", "hotel", "suit", "monitor"),
    ("kids", "lunchbox", "diapers", "family", "pack", "school", "shoes", "lego", "bulk",
     "detergent", "stroller", "toys", "snacks", "bedding", "blender", "board"),
    ("reading", "glasses", "garden", "hose", "large", "print", "books", "tea", "slippers",
     "seeds", "cardigan", "radio", "pruning", "shears", "blood", "pressure"),
    ("budget", "refurbished", "used", "instalments", "low", "price", "second", "hand",
     "clearance", "payday", "rice", "energy", "drink", "prepaid", "sim", "offer"),
    ("yoga", "mat", "protein", "powder", "running", "trail", "vitamins", "organic",
     "fitness", "tracker", "smoothie", "resistance", "bands", "cycling", "helmet", "hiking"),
)  # fmt: skip
_COMMON_WORDS: tuple[str, ...] = (
    "new", "best", "black", "white", "set", "gift", "mini", "pro", "2", "xl", "free", "delivery",
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticSilo:
    """A generated silo: the validated table, the ground-truth persona per row, the raw frame."""

    table: Table
    persona: np.ndarray  # (rows,) int64 index into ARCHETYPES
    frame: pd.DataFrame


def synthetic_schema(kind: str) -> Schema:
    """The packaged schema of the synthetic ``kind`` table (``schemas/synthetic_<kind>.toml``)."""
    _check_kind(kind)
    name = f"synthetic_{kind}.toml"
    text = resources.files("fedpersona").joinpath("schemas", name).read_text(encoding="utf-8")
    return parse_schema(tomllib.loads(text), source=f"fedpersona/schemas/{name}")


def partner_mixes(n_partners: int, *, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Non-IID archetype mixes for ``n_partners`` partners, one Dirichlet(alpha) draw each.

    Small ``alpha`` (e.g. 0.3) gives each partner a few dominant personas; large ``alpha``
    approaches the uniform mix. Returns shape ``(n_partners, len(ARCHETYPES))``, rows sum to 1.
    """
    if isinstance(n_partners, bool) or not isinstance(n_partners, int | np.integer):
        raise ValueError(f"n_partners must be an integer, got {n_partners!r}")
    if n_partners < 1:
        raise ValueError(f"n_partners must be >= 1, got {n_partners}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_rng(rng)
    mixes = rng.dirichlet(np.full(len(ARCHETYPES), float(alpha)), size=int(n_partners))
    return mixes / mixes.sum(axis=1, keepdims=True)


def generate_frame(
    kind: str, rows: int, *, rng: np.random.Generator, mix: np.ndarray | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """Draw a raw ``kind`` table of ``rows`` users and their ground-truth archetype indices.

    The frame looks as if read from a partner's CSV export: numbers, strings, categorical
    codes, and ``""`` for missing cells. ``mix`` is the archetype probability vector
    (default: uniform). Returns ``(frame, persona)`` with ``persona`` of shape ``(rows,)``,
    dtype int64, indexing :data:`ARCHETYPES`.
    """
    _check_kind(kind)
    if isinstance(rows, bool) or not isinstance(rows, int | np.integer):
        raise ValueError(f"rows must be an integer, got {rows!r}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    _check_rng(rng)
    p = _check_mix(mix)
    n = int(rows)
    persona = rng.choice(len(ARCHETYPES), size=n, p=p).astype(np.int64)
    traits = _MEANS[persona] + rng.normal(0.0, TRAIT_NOISE, size=(n, len(TRAITS)))  # (n, 7)
    columns = _BUILDERS[kind](traits, persona, rng)
    ids = np.char.add(_ID_PREFIX[kind], np.char.zfill(np.arange(1, n + 1).astype(str), 6))
    frame = pd.DataFrame({"user_id": ids.astype(object), **columns})
    logger.debug("generated %d synthetic %s rows", n, kind)
    return frame, persona


def generate_silo(kind: str, rows: int, *, seed: int, mix: np.ndarray | None = None) -> SyntheticSilo:
    """Generate a synthetic ``kind`` silo from ``seed`` and validate it against its schema."""
    from fedpersona.data.tables import validate_frame

    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    frame, persona = generate_frame(kind, rows, rng=np.random.default_rng(int(seed)), mix=mix)
    table = validate_frame(synthetic_schema(kind), frame, source=f"synthetic:{kind}")
    return SyntheticSilo(table=table, persona=persona, frame=frame)


# --- argument checks --------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _check_rng(rng: Any) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _check_mix(mix: np.ndarray | None) -> np.ndarray:
    k = len(ARCHETYPES)
    if mix is None:
        return np.full(k, 1.0 / k)
    p = np.asarray(mix, dtype=np.float64)
    if p.shape != (k,):
        raise ValueError(f"mix must have shape ({k},), one probability per archetype, got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"mix must hold finite probabilities >= 0, got {p.tolist()}")
    if abs(p.sum() - 1.0) > _MIX_TOLERANCE:
        raise ValueError(f"mix must sum to 1 (within {_MIX_TOLERANCE}), got {p.sum():.6g}")
    return p / p.sum()


# --- sampling helpers -------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _bernoulli(logit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.random(logit.shape) < _sigmoid(logit)


def _categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(``logits``); ``logits`` is (n, k), returns (n,) int."""
    z = logits - logits.max(axis=1, keepdims=True)
    cdf = np.cumsum(np.exp(z), axis=1)
    u = rng.random(len(logits))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=1), logits.shape[1] - 1)


def _noise(rng: np.random.Generator, n: int, sd: float) -> np.ndarray:
    return rng.normal(0.0, sd, size=n)


def _ints(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.rint(values), lo, hi).astype(np.int64)


def _floats(values: np.ndarray, lo: float, hi: float, decimals: int) -> np.ndarray:
    return np.round(np.clip(values, lo, hi), decimals)


def _with_missing(values: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Numbers as CSV strings, with about ``rate`` of the cells blank (``""``)."""
    text = values.astype(str).astype(object)
    text[rng.random(len(values)) < rate] = ""
    return text


def _pick(vocab: tuple[str, ...], codes: np.ndarray) -> np.ndarray:
    return np.asarray(vocab, dtype=object)[codes]


# --- the three kinds --------------------------------------------------------------------------


def _ecommerce(t: np.ndarray, persona: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """A web shop's customer table (after Online Shoppers Intention / Customer Personality)."""
    n = len(t)
    age, inc, dig, spend = (
        t[:, _T["age"]],
        t[:, _T["income"]],
        t[:, _T["digital"]],
        t[:, _T["spending"]],
    )
    risk = t[:, _T["financial_risk"]]
    out: dict[str, Any] = {}
    out["age"] = _with_missing(_ints(44 + 14 * age + _noise(rng, n, 5), 18, 95), 0.08, rng)
    sessions = rng.poisson(np.exp(1.9 + 0.8 * dig + 0.2 * spend + _noise(rng, n, 0.3)))
    out["sessions_30d"] = np.minimum(sessions, 500).astype(np.int64)
    minutes = np.exp(1.8 + 0.35 * dig - 0.15 * age + 0.2 * spend + _noise(rng, n, 0.4))
    out["avg_session_minutes"] = _with_missing(_floats(minutes, 0, 600, 1), 0.05, rng)
    views = rng.poisson((sessions + 1) * np.exp(1.4 + 0.35 * spend + _noise(rng, n, 0.3)))
    out["product_views_30d"] = np.minimum(views, 10_000).astype(np.int64)
    orders = 1 + rng.poisson(np.exp(0.7 + 0.55 * spend + 0.3 * dig + _noise(rng, n, 0.3)))
    out["orders_12m"] = np.minimum(orders, 365).astype(np.int64)
    basket = np.exp(3.6 + 0.5 * inc + 0.35 * spend + _noise(rng, n, 0.35))
    out["avg_basket_value"] = _with_missing(_floats(basket, 0, 10_000, 2), 0.06, rng)
    recency = np.exp(np.log(300 / (orders + 1)) + _noise(rng, n, 0.4))
    out["days_since_last_order"] = _ints(recency, 0, 730)
    tenure = np.exp(6.3 + 0.5 * age + 0.2 * spend + _noise(rng, n, 0.3))
    out["account_age_days"] = _ints(tenure, 0, 9000)
    wishlist = rng.poisson(np.exp(1.1 + 0.6 * dig - 0.6 * inc + _noise(rng, n, 0.3)))
    out["wishlist_items"] = np.minimum(wishlist, 1000).astype(np.int64)
    reviews = rng.poisson(np.exp(0.2 + 0.5 * age + 0.3 * dig + 0.4 * spend + _noise(rng, n, 0.3)))
    out["reviews_12m"] = np.minimum(reviews, 365).astype(np.int64)
    discount = _bernoulli(0.2 - 1.1 * inc - 0.5 * spend + 0.4 * dig, rng)
    out["discount_used"] = np.where(discount, "yes", "no").astype(object)
    device_logits = np.stack(
        [0.8 * dig - 0.9 * age, 0.6 * inc + 0.3 * age - 0.5 * dig, 0.9 * age - 1.0,
         1.3 * dig + 0.4 * spend - 0.3],
        axis=1,
    )  # fmt: skip
    out["device"] = _pick(DEVICES, _categorical(device_logits, rng))
    pay_logits = np.stack(
        [0.8 * inc, 0.8 * dig, 1.1 * risk - 0.6 * age - 0.8, 0.9 * age - 1.0 * dig - 1.0,
         0.6 * age - 0.5],
        axis=1,
    )  # fmt: skip
    out["payment_method"] = _pick(PAYMENT_METHODS, _categorical(pay_logits, rng))
    # Region: a high-cardinality postcode-like code with Zipf-shaped sizes; the young and
    # the very online live in the 20 big metro areas (codes R000-R019) more often.
    metro = _bernoulli(-1.2 + 0.7 * dig - 0.5 * age, rng)
    region = np.where(metro, rng.integers(0, 20, size=n), rng.choice(N_REGIONS, size=n, p=_REGION_P))
    out["region"] = np.char.add("R", np.char.zfill(region.astype(str), 3)).astype(object)
    out["last_search"] = _search_text(persona, rng)
    # Archetype taste, plus the active (sports, health) and the well-off (travel).
    cat_logits = 1.5 * _CATEGORY_PREF[persona]
    cat_logits[:, CATEGORIES.index("sports")] += 0.9 * t[:, _T["activity"]]
    cat_logits[:, CATEGORIES.index("health")] += 0.6 * t[:, _T["activity"]]
    cat_logits[:, CATEGORIES.index("travel")] += 0.6 * inc
    seen = np.minimum(orders, 5)
    for k in range(5):
        cats = _pick(CATEGORIES, _categorical(cat_logits, rng))
        cats[seen <= k] = ""
        out[f"cat_{k + 1}"] = cats
    logit = _INTERCEPT["ecommerce"] + 0.8 * dig + 0.6 * spend + 0.3 * inc + _noise(rng, n, 0.5)
    out["purchased"] = np.where(_bernoulli(logit, rng), "TRUE", "FALSE").astype(object)
    return out


def _search_text(persona: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Last search query, 1-4 words: mostly the archetype's words, some common ones."""
    n = len(persona)
    own = np.array(_SEARCH_WORDS, dtype=object)  # (n_archetypes, words)
    common = np.array(_COMMON_WORDS, dtype=object)
    n_words = rng.integers(1, 5, size=n)
    text = np.full(n, "", dtype=object)
    for k in range(4):
        word = np.where(
            rng.random(n) < 0.8,
            own[persona, rng.integers(0, own.shape[1], size=n)],
            common[rng.integers(0, len(common), size=n)],
        )
        sep = "" if k == 0 else " "
        text = np.where(n_words > k, text + sep + word, text)
    return text


def _finance(t: np.ndarray, persona: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """A card issuer's client table (after the Taiwan credit-card default dataset)."""
    n = len(t)
    age, inc, dig, spend = (
        t[:, _T["age"]],
        t[:, _T["income"]],
        t[:, _T["digital"]],
        t[:, _T["spending"]],
    )
    risk = t[:, _T["financial_risk"]]
    out: dict[str, Any] = {}
    out["age"] = _ints(42 + 13 * age + _noise(rng, n, 4), 18, 99)
    income = np.exp(10.4 + 0.55 * inc + _noise(rng, n, 0.3))
    out["annual_income"] = _with_missing(_floats(np.round(income, -2), 0, 2_000_000, 0).astype(np.int64), 0.09, rng)
    limit = np.exp(8.7 + 0.6 * inc + 0.2 * spend - 0.1 * risk + _noise(rng, n, 0.2))
    limit = np.clip(np.round(limit / 500) * 500, 500, 200_000)
    out["credit_limit"] = limit.astype(np.int64)
    edu_logits = np.stack(
        [1.5 * inc - 1.0, 1.0 * inc - 0.4 * age, -0.8 * inc + 0.3 * age, -0.4 * inc - 2.2],
        axis=1,
    )
    out["education"] = _pick(EDUCATION, _categorical(edu_logits, rng))
    mar_logits = np.stack(
        [-1.4 * age, 0.8 * age + 0.3 * inc + 0.5 * spend, 0.6 * risk - 1.5, 1.8 * age - 3.5],
        axis=1,
    )
    out["marital_status"] = _pick(MARITAL, _categorical(mar_logits, rng))
    tier_logits = np.stack([np.zeros(n), 1.0 * inc + 0.8 * spend - 1.0, 1.8 * inc + spend - 3.0], 1)
    out["card_tier"] = _pick(CARD_TIERS, _categorical(tier_logits, rng))
    tenure = np.exp(3.6 + 0.6 * age + 0.1 * inc + _noise(rng, n, 0.3))
    out["months_on_book"] = _ints(tenure, 0, 600)
    logins = rng.poisson(np.exp(1.7 + 0.9 * dig + _noise(rng, n, 0.35)))
    out["online_logins_30d"] = np.minimum(logins, 1000).astype(np.int64)
    app = _bernoulli(0.3 + 1.8 * dig - 0.3 * age, rng)
    out["mobile_app"] = np.where(app, "yes", "no").astype(object)
    status_base = np.stack(
        [-0.6 * spend - 0.4 * dig - 2.6, 0.9 * inc - 1.3 * risk + 0.3, np.full(n, 0.6),
         1.4 * risk - 1.3, 1.6 * risk - 2.4, 1.8 * risk - 3.4],
        axis=1,
    )  # fmt: skip
    util = _sigmoid(-0.6 + 0.9 * risk + 0.5 * spend + _noise(rng, n, 0.15))
    # Month 1 is the most recent, as in the Taiwan data (PAY_0/BILL_AMT1 = September).
    for m in range(1, 7):
        status = _categorical(status_base + rng.normal(0, 0.3, size=(n, 1)), rng)
        bill = limit * util * np.exp(_noise(rng, n, 0.25))
        bill = np.where(status == 0, 0.0, bill)
        paid_frac = np.select(
            [status == 1, status == 2],
            [np.ones(n), np.clip(np.exp(np.log(0.12) + _noise(rng, n, 0.6)), 0.0, 1.0)],
            default=np.where(rng.random(n) < 0.2, 0.0, 0.03),
        )
        payment = bill * paid_frac
        out[f"pay_status_{m}"] = _pick(PAY_STATUS, status)
        out[f"bill_amt_{m}"] = _floats(bill, 0, 500_000, 0).astype(np.int64)
        out[f"pay_amt_{m}"] = _with_missing(_floats(payment, 0, 500_000, 0).astype(np.int64), 0.04, rng)
    logit = _INTERCEPT["finance"] + 1.3 * risk - 0.5 * inc - 0.2 * age + _noise(rng, n, 0.5)
    out["default_next_month"] = _bernoulli(logit, rng).astype(np.int64)
    return out


def _health(t: np.ndarray, persona: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """A hospital's patient table (after CDC BRFSS diabetes, Framingham and stroke data)."""
    n = len(t)
    age, inc, dig = t[:, _T["age"]], t[:, _T["income"]], t[:, _T["digital"]]
    risk, hr, act = t[:, _T["financial_risk"]], t[:, _T["health_risk"]], t[:, _T["activity"]]
    out: dict[str, Any] = {}
    out["age"] = _ints(47 + 14 * age + _noise(rng, n, 5), 18, 100)
    out["sex"] = np.where(rng.random(n) < 0.52, "F", "M").astype(object)
    bmi = 26.5 + 3.0 * hr - 1.8 * act + rng.gamma(2.0, 1.2, size=n) - 2.4
    out["bmi"] = _with_missing(_floats(bmi, 12, 80, 1), 0.04, rng)
    systolic = 124 + 9 * hr + 7 * age + _noise(rng, n, 10)
    out["systolic_bp"] = _ints(systolic, 70, 260)
    out["diastolic_bp"] = _ints(0.45 * systolic + 22 + 2 * hr + _noise(rng, n, 6), 40, 160)
    logit = _INTERCEPT["health"] + 1.2 * hr + 0.5 * age - 0.5 * act + _noise(rng, n, 0.5)
    diabetes = _bernoulli(logit, rng)
    # Fasting glucose: near normal for most, a long right tail for diabetics whose glucose is
    # not under control (about half of them).
    glucose = np.exp(np.log(92) + 0.09 * hr + 0.03 * age - 0.04 * act + _noise(rng, n, 0.1))
    uncontrolled = diabetes & (rng.random(n) < 0.5)
    glucose = glucose + uncontrolled * np.exp(np.log(30) + _noise(rng, n, 0.6))
    out["glucose"] = _with_missing(_floats(glucose, 40, 500, 0).astype(np.int64), 0.09, rng)
    chol = 205 + 16 * hr + 9 * age + _noise(rng, n, 28)
    out["cholesterol"] = _with_missing(_ints(chol, 80, 600), 0.05, rng)
    out["heart_rate"] = _ints(74 + 3 * hr - 6 * act + _noise(rng, n, 8), 30, 220)
    out["hypertension"] = _bernoulli(-1.3 + 1.2 * hr + 0.8 * age, rng).astype(np.int64)
    out["heart_disease"] = _bernoulli(-3.0 + 1.0 * hr + 0.9 * age, rng).astype(np.int64)
    out["smoker"] = _bernoulli(-1.0 + 0.6 * risk + 0.5 * hr - 0.6 * act, rng).astype(np.int64)
    out["physically_active"] = _bernoulli(0.4 + 1.6 * act, rng).astype(np.int64)
    out["heavy_alcohol"] = _bernoulli(-2.6 + 0.6 * risk - 0.4 * age, rng).astype(np.int64)
    general = 2.8 + 0.9 * hr - 0.4 * act + 0.2 * age - 0.2 * inc + _noise(rng, n, 0.6)
    out["general_health"] = _ints(general, 1, 5)
    out["income_bracket"] = _ints(4.6 + 1.9 * inc + _noise(rng, n, 0.9), 1, 8)
    out["education_level"] = _ints(4.4 + 0.8 * inc - 0.2 * age + _noise(rng, n, 0.7), 1, 6)
    visits = rng.poisson(np.exp(0.9 + 0.5 * hr + 0.3 * age + _noise(rng, n, 0.4)))
    out["doctor_visits_12m"] = np.minimum(visits, 365).astype(np.int64)
    ins_logits = np.stack([1.2 * inc - 0.5 * risk + 0.5, 0.8 * age, 1.0 * risk - 0.8 * inc - 2.0], 1)
    out["insurance"] = _pick(INSURANCE, _categorical(ins_logits, rng))
    missed = rng.poisson(np.exp(-0.8 + 0.8 * risk - 0.2 * age + _noise(rng, n, 0.3)))
    out["missed_appointments_12m"] = np.minimum(missed, 50).astype(np.int64)
    portal = _bernoulli(-0.2 + 1.5 * dig, rng)
    out["patient_portal"] = np.where(portal, "yes", "no").astype(object)
    steps = np.exp(8.6 + 0.45 * act - 0.1 * age + _noise(rng, n, 0.35))
    out["daily_steps"] = _with_missing(_ints(steps, 0, 60_000), 0.08, rng)
    out["diabetes"] = diabetes.astype(np.int64)
    return out


_BUILDERS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], dict[str, Any]]] = {
    "ecommerce": _ecommerce,
    "finance": _finance,
    "health": _health,
}
