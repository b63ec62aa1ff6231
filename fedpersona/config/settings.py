"""Every setting fedpersona reads, declared once: types, ranges and defaults (pydantic v2).

The four files a user writes or keeps share these blocks:

- a **scenario** (``simulations/*.toml``): :class:`Scenario`;
- a **partner config** (``clients/<kind>/client.toml``): :class:`PartnerConfig`;
- a **federation config** (``server/federation.toml``): :class:`FederationConfig`;
- a partner's **fixed plan** (``state/plan.json``): :class:`PrivacyPlan`.

Each block is a frozen pydantic model that forbids unknown keys and validates strictly (a
string ``"false"`` never switches a release on, ``true`` is no number); every problem of a
file is collected and reported at once by :mod:`fedpersona.config.files`, with a
did-you-mean for misspelt keys. ``replace(**changes)`` returns a validated copy.

Nothing here imports another fedpersona module but :mod:`fedpersona.errors`: every layer may
read its settings from here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedpersona.config.problems import problems_of
from fedpersona.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "GLOBAL_WEIGHTINGS",
    "GRAD_SAMPLE_MODES",
    "KIND_PATTERN",
    "ROBUST_AGGREGATORS",
    "SERVER_OPTIMIZERS",
    "SHIPPED_KINDS",
    "FederationConfig",
    "FederationSettings",
    "ModelSettings",
    "PartnerConfig",
    "PartnerEntry",
    "PrivacyPlan",
    "PrivacySettings",
    "Scenario",
    "ServerNetwork",
    "Settings",
    "SiloGroup",
    "SimulationSettings",
    "TrainingSettings",
    "sample_rate_for",
    "valid_kind",
]

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("ghost", "hooks")
SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedprox")
GLOBAL_WEIGHTINGS = ("kind_balanced", "examples")
ROBUST_AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
SHIPPED_KINDS = ("ecommerce", "finance", "health")
KIND_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
"""A silo kind: the three shipped ones, or a partner's own (``insurance``), lower case."""

_INF = ("inf", "infinity", "Infinity")


class Settings(BaseModel):
    """Base of every settings block: frozen, unknown keys refused, strict types.

    :meth:`checked` (and :meth:`replace`) raise :class:`~fedpersona.errors.ConfigError` listing
    every problem (``federation.rounds: must be >= 1, got 0``); ``section`` names the block
    as the files spell it. Sequences in a file (TOML arrays) become tuples.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, validate_default=True, ser_json_inf_nan="strings"
    )
    section: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _arrays_are_tuples(cls, data: Any) -> Any:
        """TOML arrays arrive as lists; the frozen settings hold tuples."""
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data

    @classmethod
    def checked(cls, **data: Any) -> Self:
        """Build from user-given values: every problem in one :class:`ConfigError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError("; ".join(problems_of(exc, cls))) from None

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied (:class:`ConfigError` if they are bad)."""
        return type(self).checked(**{**self.model_dump(by_alias=True), **changes})


class ModelSettings(Settings):
    """The model DP-SGD trains (public): ``"linear"``, the label model of :mod:`fedpersona.model.linear`
    (sizes unused), or ``"encoder"`` of these sizes (train it with optimizer "adam", lr 0.01, a batch_size)."""

    section: ClassVar[str] = "model"

    architecture: Literal["linear", "encoder"] = "linear"
    token_dim: int = Field(32, ge=2)
    embed_dim: int = Field(32, ge=2)
    hidden: int = Field(64, ge=2)
    blocks: int = Field(2, ge=0)
    mask_rate: float = Field(0.3, ge=0, lt=1.0)
    # The encoder receives the label gradient x label_weight (its head always at full weight).
    label_weight: float = Field(1.0, ge=0, le=10.0)


class TrainingSettings(Settings):
    """Local optimisation settings (the same at every partner of a federation)."""

    section: ClassVar[str] = "training"

    local_epochs: int = Field(1, ge=1)  # defaults: the label model's recipe (fedpersona.model.linear)
    batch_size: int = Field(64, ge=16)  # very small expected batches drown in DP noise
    sample_rate: float | None = Field(0.2, gt=0, le=1.0, allow_inf_nan=False)  # of the rows; replaces batch_size
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(2.0, gt=0)
    # Per-sample clipping in DP-SGD, all exact: "bookkeeping" (fedpersona.privacy.clipping: one
    # forward, one backward, the cheapest), or Opacus' "ghost" clipping (two backward passes) or
    # "hooks" (materialised per-sample gradients). Accounting is the same in every mode.
    grad_sample_mode: Literal["bookkeeping", "ghost", "hooks"] = "bookkeeping"
    fedprox_mu: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def batch_for(self, rows: int) -> int:
        """The expected batch at ``rows`` declared rows: ``round(rows x sample_rate)`` or ``batch_size``."""
        if self.sample_rate is None:
            return self.batch_size
        return max(1, min(rows, round(rows * self.sample_rate)))

    def steps_per_round(self, rows: int) -> int:
        """Optimizer steps in one round: local epochs x expected batches per epoch."""
        return self.local_epochs * round(1.0 / sample_rate_for(rows, self.batch_for(rows)))


def sample_rate_for(rows: int, batch_size: int) -> float:
    """Poisson sampling rate for an expected batch of ``batch_size`` out of ``rows``.

    Matches Opacus' definition (``1 / len(data_loader)``), so the rate the optimizer's
    accountant hook sees is the rate planned here. ``rows`` is a partner's declared
    ``public_rows``, never its exact count.
    """
    if rows < 1:
        raise ConfigError(f"a partner needs at least one training row, got {rows}")
    return 1.0 / math.ceil(rows / max(1, min(batch_size, rows)))


class PrivacySettings(Settings):
    """A partner's budget. ``target_epsilon = inf`` (or ``"inf"``) means an explicitly
    NON-PRIVATE run."""

    section: ClassVar[str] = "privacy"

    target_epsilon: float = Field(3.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1.0)
    # Infinite = no clipping = unbounded epsilon. 2: the label model's recipe (model/linear.py).
    max_grad_norm: float = Field(2.0, gt=0, allow_inf_nan=False)
    accountant: Literal["prv", "rdp"] = "prv"
    planned_rounds: int | None = Field(None, ge=1)
    # Reproducible noise: every DP key derives from this seed (fedpersona.privacy.randomness).
    # Whoever knows it can remove the noise: such a run is labelled NOT private against the
    # coordinator. Unset (the default), every key comes from os.urandom.
    noise_seed: int | None = Field(None, ge=0)

    @field_validator("target_epsilon", mode="before")
    @classmethod
    def _infinity(cls, value: Any) -> Any:
        return math.inf if value in _INF else value

    @field_validator("target_epsilon")
    @classmethod
    def _not_nan(cls, value: float) -> float:
        if math.isnan(value):
            raise ValueError("must be a number > 0 or inf")
        return value

    @field_validator("accountant", mode="before")
    @classmethod
    def _no_gdp(cls, value: Any) -> Any:
        if value == "gdp":
            raise ValueError(
                "'gdp' is refused: Opacus' GDP accountant under-reports epsilon for DP-SGD; use 'prv' (default) "
                "or 'rdp'"
            )
        return value

    @property
    def private(self) -> bool:
        return math.isfinite(self.target_epsilon)


class FederationSettings(Settings):
    """Round structure, server optimizer, the persona protocol and secure aggregation.

    Personas (:mod:`fedpersona.personas.protocol`): ``personas`` of them per silo kind (0 = no
    personas), found in a ``persona_dims``-dimensional DP-PCA space by ``persona_steps``
    EM-type releases (2 initialisation steps, then EM) after one Gram release; the persona
    releases get ``persona_share`` of each partner's budget (its share of the precision
    ``1 / sigma^2`` of one equivalent Gaussian mechanism, :func:`fedpersona.privacy.planner.plan_split`),
    DP-SGD the rest.

    ``secagg_threshold`` partners (by default a strict majority of each round's partners, the
    least partners accept) must survive every stage of a securely aggregated round or it
    aborts; update values are clipped to +-``secagg_clipping_range`` and quantized to
    ``secagg_quantization_range`` + 1 levels.
    """

    section: ClassVar[str] = "federation"

    rounds: int = Field(5, ge=1)
    min_partners: int = Field(2, ge=1)
    server_optimizer: Literal["fedavg", "fedadam", "fedprox"] = "fedavg"
    server_lr: float = Field(1.0, gt=0, allow_inf_nan=False)
    global_weighting: Literal["kind_balanced", "examples"] = "kind_balanced"
    robust_aggregation: Literal["mean", "median", "trimmed_mean", "krum"] = "mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    max_update_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    personas: int = Field(8, ge=0)  # per kind; 0 = no personas
    persona_dims: int = Field(10, ge=1)
    persona_steps: int = Field(6, ge=3)
    persona_share: float = Field(0.6, gt=0, lt=1, allow_inf_nan=False)
    seed: int = 0
    round_timeout: float = Field(600.0, gt=0, allow_inf_nan=False)
    evaluate_every: int = Field(1, ge=1)  # the last round is always evaluated
    # At the last evaluation each partner also scores what it gets alone from its own columns
    # (fedpersona.model.evaluation, "the honest baseline"). It costs each partner some CPU
    # seconds (cross-validated own models): None = on in a simulation, off in a deployment.
    baseline: bool | None = None
    secure_aggregation: bool = False
    secagg_threshold: int | None = Field(None, ge=2)  # None: a strict majority of each round
    secagg_clipping_range: float = Field(8.0, gt=0, allow_inf_nan=False)
    secagg_quantization_range: int = Field(2**16, ge=2, le=2**32)

    @model_validator(mode="after")
    def _threshold_fits(self) -> Self:
        t = self.secagg_threshold
        if self.secure_aggregation and t is not None and self.min_partners < t:
            raise ValueError(
                f"federation.min_partners ({self.min_partners}) must be >= federation.secagg_threshold ({t}): "
                "a round with fewer partners would always abort"
            )
        return self

    @property
    def persona_releases(self) -> int:
        """Noisy persona releases each partner makes (and plans for): the Gram release and
        ``persona_steps`` EM-type steps; 0 when ``personas = 0`` turns personas off."""
        if self.personas == 0:
            return 0
        return 1 + self.persona_steps


class SimulationSettings(Settings):
    """How a local simulation runs its partners."""

    section: ClassVar[str] = "simulation"

    cpus_per_partner: float = Field(1.0, gt=0)
    gpus_per_partner: float = Field(0.0, ge=0, le=1.0)
    test_fraction: float = Field(0.2, gt=0, lt=1.0)
    share_eval_metrics: bool = True
    # Derive every partner's DP noise keys from the federation seed: reproducible runs, NOT
    # private against the coordinator (labelled so in the console, privacy.json and report).
    reproducible_noise: bool = False


class SiloGroup(Settings):
    """Several partners of one kind: synthetic, or one real file split between them."""

    section: ClassVar[str] = "silos"

    kind: str = Field(pattern=KIND_PATTERN)
    name: str = Field(min_length=1)
    partners: int = Field(3, ge=1)
    source: str = "synthetic"
    schema_path: str | None = Field(None, alias="schema")
    rows: int | None = Field(None, ge=1)
    non_iid_alpha: float = Field(0.5, gt=0)
    small_partner_rows: int = Field(0, ge=0)
    seed: int = 0
    privacy: dict[str, Any] | None = None

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _source(self) -> Self:
        if self.source == "synthetic":
            if self.kind not in SHIPPED_KINDS:
                shipped = ", ".join(SHIPPED_KINDS)
                raise ValueError(f"a synthetic silo's kind must be one of {shipped}, got {self.kind!r}")
            if self.rows is None or self.rows < 10 * self.partners:
                raise ValueError(f"silo '{self.name}': synthetic rows must be an integer >= 10 per partner")
        elif self.schema_path is None:
            raise ValueError(f"silo '{self.name}': a file source needs a schema")
        if self.privacy is not None:
            PrivacySettings.model_validate(self.privacy)  # checked now; applied over the scenario's
        return self


class Scenario(Settings):
    """A whole local federation."""

    federation: FederationSettings = FederationSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    privacy: PrivacySettings = PrivacySettings()
    simulation: SimulationSettings = SimulationSettings()
    silos: tuple[SiloGroup, ...]
    source: str = "<scenario>"

    @field_validator("silos", mode="before")
    @classmethod
    def _some(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or not value:
            raise ValueError("the scenario needs at least one [[silos]] entry")
        return value

    @field_validator("silos")
    @classmethod
    def _unique(cls, silos: tuple[SiloGroup, ...]) -> tuple[SiloGroup, ...]:
        names = [s.name for s in silos]
        if len(set(names)) != len(names):
            raise ValueError(f"silo names must be unique, got {names}")
        return silos

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, as written to ``DIR/config.toml``."""
        out = self.model_dump(mode="json", by_alias=True, exclude={"source"}, exclude_none=True)
        if math.isinf(self.privacy.target_epsilon):
            out["privacy"]["target_epsilon"] = "inf"
        return out


class PartnerSection(Settings):
    """``[partner]`` of a client.toml."""

    section: ClassVar[str] = "partner"
    name: str = Field(min_length=1)
    kind: str = Field(pattern=KIND_PATTERN)
    state_dir: str | None = None


class DataSection(Settings):
    """``[data]`` of a client.toml."""

    section: ClassVar[str] = "data"
    path: str | None = None
    schema_path: str | None = Field(None, alias="schema")
    public_rows: int | None = Field(None, ge=2)
    synthetic_rows: int | None = Field(None, ge=1)
    synthetic_seed: int = Field(0, ge=0)
    synthetic_mix: tuple[float, ...] | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1.0)

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _source(self) -> Self:
        if self.path is None and self.synthetic_rows is None:
            raise ValueError("[data] needs either path (a CSV/Parquet file) or synthetic_rows")
        if self.path is not None and self.schema_path is None:
            raise ValueError("data.schema must name the schema file of data.path")
        mix = self.synthetic_mix
        if mix is not None and (not mix or any(x < 0 or not math.isfinite(x) for x in mix) or not sum(mix) > 0):
            raise ValueError(f"data.synthetic_mix must be numbers >= 0 with a positive sum, got {list(mix)!r}")
        return self


class ReleaseSection(Settings):
    """``[release]`` of a client.toml."""

    section: ClassVar[str] = "release"
    share_eval_metrics: bool = False
    audit_log: bool = False
    require_secure_aggregation: bool = False


class PartnerConfig(Settings):
    """One partner's own settings (``client.toml``): ``[partner]``, ``[data]``, ``[privacy]``
    (its budget, which always wins over a federation's defaults) and ``[release]``. Paths are
    absolute (resolved against the file's folder by :func:`fedpersona.config.files.load_partner_config`)."""

    partner: PartnerSection
    data_section: DataSection = Field(alias="data")
    privacy: PrivacySettings = PrivacySettings()
    release: ReleaseSection = ReleaseSection()
    source: str = "<client.toml>"

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        """Also accept the flat form code uses (``PartnerConfig(name=..., data=path, ...)``)."""
        if not isinstance(data, dict) or "partner" in data or "name" not in data:
            return data
        flat = dict(data)
        partner = {k: flat.pop(k) for k in ("name", "kind", "state_dir") if k in flat}
        section = {"path": flat.pop("data", None), "schema": flat.pop("schema", None)}
        for key in ("public_rows", "synthetic_rows", "synthetic_seed", "synthetic_mix", "test_fraction"):
            if key in flat:
                section[key] = flat.pop(key)
        switches = ("share_eval_metrics", "audit_log", "require_secure_aggregation")
        release = {k: flat.pop(k) for k in switches if k in flat}
        data_section = {k: v for k, v in section.items() if v is not None}
        return {**flat, "partner": partner, "data": data_section, "release": release}

    @model_validator(mode="after")
    def _synthetic_kind(self) -> Self:
        if self.data_section.path is None and self.partner.kind not in SHIPPED_KINDS:
            raise ValueError(
                f"data.synthetic_rows makes a synthetic table, which exists for the kinds {', '.join(SHIPPED_KINDS)} "
                f"only; partner.kind is {self.partner.kind!r}: give data.path (your table) instead"
            )
        return self

    @property
    def name(self) -> str:
        return self.partner.name

    @property
    def kind(self) -> str:
        return self.partner.kind

    @property
    def state_dir(self) -> str:
        return self.partner.state_dir or f"state-{self.partner.name}"

    @property
    def data(self) -> str | None:
        return self.data_section.path

    @property
    def schema_path(self) -> str | None:
        return self.data_section.schema_path

    @property
    def synthetic_rows(self) -> int | None:
        return self.data_section.synthetic_rows

    @property
    def synthetic_seed(self) -> int:
        return self.data_section.synthetic_seed

    @property
    def synthetic_mix(self) -> tuple[float, ...] | None:
        return self.data_section.synthetic_mix

    @property
    def test_fraction(self) -> float:
        return self.data_section.test_fraction

    @property
    def public_rows(self) -> int | None:
        return self.data_section.public_rows

    @property
    def share_eval_metrics(self) -> bool:
        return self.release.share_eval_metrics

    @property
    def audit_log(self) -> bool:
        return self.release.audit_log

    @property
    def require_secure_aggregation(self) -> bool:
        return self.release.require_secure_aggregation

    def declared_rows(self) -> int | None:
        """The partner's public row count: ``data.public_rows``, or for a synthetic table the
        training share of its configured ``synthetic_rows`` (both are configuration, public);
        ``None`` for a table file without a declaration."""
        if self.public_rows is not None:
            return self.public_rows
        if self.data is None and self.synthetic_rows:
            return max(2, round(self.synthetic_rows * (1.0 - self.test_fraction)))
        return None


class ServerNetwork(Settings):
    """``[server]``: where the SuperLink listens, where the coordinator keeps its files, and
    how long it waits for partners.

    ``host`` is loopback by default: a SuperLink reachable from other machines is a choice
    (``host = "0.0.0.0"`` or one interface's address). The coordinator waits for
    ``expected_partners`` (else ``federation.min_partners``) for ``wait_timeout`` seconds;
    each partner that connects extends the wait to at least ``wait_extension`` seconds after
    its arrival, never beyond ``max_wait`` seconds in all; it logs how many are connected
    every ``progress_every`` seconds and whenever one arrives.
    """

    section: ClassVar[str] = "server"

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(9093, ge=1, le=65535)
    run_dir: str = Field("../runs/federation", min_length=1)
    credentials: str = Field("credentials", min_length=1)
    app: str = Field("..", min_length=1)
    expected_partners: int | None = Field(None, ge=1)
    wait_timeout: float = Field(600.0, gt=0, allow_inf_nan=False)
    wait_extension: float = Field(120.0, ge=0, allow_inf_nan=False)
    max_wait: float = Field(3600.0, gt=0, allow_inf_nan=False)
    progress_every: float = Field(30.0, gt=0, allow_inf_nan=False)
    ready_timeout: float = Field(60.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _max_wait_covers_window(self) -> Self:
        if self.max_wait < self.wait_timeout:
            raise ValueError(
                f"server.max_wait ({self.max_wait:g}) must be >= server.wait_timeout ({self.wait_timeout:g}): "
                "it bounds the whole wait, extensions included"
            )
        return self


class PartnerEntry(Settings):
    """One ``[[partners]]`` entry: a partner allowed to join, by its node public key."""

    section: ClassVar[str] = "partners"

    name: str = Field(min_length=1)
    public_key: str = Field(min_length=1)
    kind: str | None = Field(None, pattern=KIND_PATTERN)


class FederationConfig(Settings):
    """A coordinator's ``server/federation.toml`` (paths absolute)."""

    federation: FederationSettings = FederationSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    server: ServerNetwork = ServerNetwork()
    partners: tuple[PartnerEntry, ...] = ()
    source: str = "<federation.toml>"

    @property
    def run_dir(self) -> Path:
        return Path(self.server.run_dir)

    @property
    def credentials(self) -> Path:
        return Path(self.server.credentials)

    @model_validator(mode="after")
    def _partners(self) -> Self:
        names = [p.name for p in self.partners]
        if len(set(names)) != len(names):
            raise ValueError(f"partner names must be unique, got {names}")
        want = self.server.expected_partners or self.federation.min_partners
        if self.partners and want > len(self.partners):
            listed = len(self.partners)
            raise ValueError(f"the run waits for {want} partner(s) but only {listed} [[partners]] are listed")
        return self


class PrivacyPlan(Settings):
    """The noise plan a partner fixed at its first round (``state/plan.json``); public numbers
    only, each a function of the partner's configuration and the federation's settings.

    ``noise_multiplier`` is DP-SGD's; with personas, ``persona_releases`` Gaussian releases
    (q = 1) are reserved: one Gram release at ``gram_noise`` and ``persona_releases - 1``
    EM-type steps at ``em_noise``, together ``persona_share`` of the budget
    (:func:`fedpersona.privacy.planner.plan_split`).
    """

    section: ClassVar[str] = "plan"

    private: bool
    noise_multiplier: float | None = Field(None, gt=0)
    sample_rate: float = Field(gt=0, le=1.0)
    steps_per_round: int = Field(ge=1)
    planned_rounds: int = Field(ge=1)
    target_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1.0)
    accountant: Literal["prv", "rdp"]
    max_grad_norm: float = Field(gt=0)
    persona_releases: int = Field(0, ge=0)  # the Gram release plus the EM-type steps
    persona_share: float = Field(0.0, ge=0, lt=1)
    gram_noise: float | None = Field(None, gt=0)
    em_noise: float | None = Field(None, gt=0)
    public_rows: int = Field(ge=1)
    noise_seeded: bool = False
    batch_size: int = Field(64, ge=1)
    local_epochs: int = Field(2, ge=1)

    @field_validator("target_epsilon", mode="before")
    @classmethod
    def _infinity(cls, value: Any) -> Any:
        return math.inf if value in _INF else value

    @model_validator(mode="before")
    @classmethod
    def _earlier_plan(cls, value: Any) -> Any:
        """A plan fixed by an earlier fedpersona reserved budget for DP k-means releases
        (``kmeans_rounds`` at ``kmeans_noise``), which no federation asks for any more. It
        still holds for DP-SGD; the reserve stays unspent (safe: less is released than
        planned) and the partner makes no persona release under it (no persona noise is
        planned), rather than refusing to load its lifetime plan."""
        if isinstance(value, dict) and ("kmeans_rounds" in value or "kmeans_noise" in value):
            value = {k: v for k, v in value.items() if k not in ("kmeans_rounds", "kmeans_noise")}
        return value

    def drift(self, *, privacy: PrivacySettings, public_rows: int | None, training: TrainingSettings) -> list[str]:
        """The settings that differ now from what this plan fixed, as ``key: was X, now Y``."""
        out = []
        now = {
            "privacy.target_epsilon": privacy.target_epsilon,
            "privacy.delta": privacy.delta,
            "privacy.max_grad_norm": privacy.max_grad_norm,
            "privacy.accountant": privacy.accountant,
            "privacy.noise_seed (set)": privacy.noise_seed is not None,
            "data.public_rows": public_rows,
            "training.batch_size": training.batch_for(public_rows or self.public_rows),
            "training.local_epochs": training.local_epochs,
        }
        fixed = {
            "privacy.target_epsilon": self.target_epsilon,
            "privacy.delta": self.delta,
            "privacy.max_grad_norm": self.max_grad_norm,
            "privacy.accountant": self.accountant,
            "privacy.noise_seed (set)": self.noise_seeded,
            "data.public_rows": self.public_rows,
            "training.batch_size": self.batch_size,
            "training.local_epochs": self.local_epochs,
        }
        if privacy.planned_rounds is not None and privacy.planned_rounds != self.planned_rounds:
            out.append(
                f"privacy.planned_rounds: the plan has {self.planned_rounds}, client.toml {privacy.planned_rounds}"
            )
        for key, value in now.items():
            if key == "data.public_rows" and value is None:
                continue
            if value != fixed[key]:
                out.append(f"{key}: the plan has {fixed[key]!r}, now {value!r}")
        return out


def valid_kind(kind: str) -> bool:
    """A silo kind may be any lower-case word (letters, digits, underscores)."""
    return bool(re.fullmatch(KIND_PATTERN, kind))
