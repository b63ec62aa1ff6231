"""Configuration files, parsed in one place; unknown keys are rejected with the valid ones.

Three files share the sections ``[model]``, ``[training]`` and ``[privacy]``:

- a **scenario** (``simulations/*.toml``): a whole local federation, with ``[[silos]]``;
- a **partner config** (``clients/<kind>/client.toml``): one partner's data, schema, state
  folder and its own ``[privacy]`` budget, which always wins over federation defaults;
- a **federation config** (``server/federation.toml``): the coordinator's settings.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from fedpersona.data.schema import KINDS
from fedpersona.errors import ConfigError
from fedpersona.model.encoder import EncoderConfig
from fedpersona.model.training import TrainingSettings
from fedpersona.privacy.accounting import PrivacySettings

__all__ = [
    "FederationSettings",
    "PartnerConfig",
    "Scenario",
    "SiloGroup",
    "SimulationSettings",
    "dump_toml",
    "load_partner_config",
    "load_scenario",
    "read_toml",
]

T = TypeVar("T")


@dataclass(frozen=True)
class FederationSettings:
    """Round structure, server optimizer and secure aggregation (see :mod:`fedpersona.federation.secagg`).

    ``secagg_threshold`` partners (by default a strict majority of the round's partners, the
    least partners accept) must survive every stage of a securely aggregated round (and
    reveal their shares) or the round aborts; update values are clipped to
    +-``secagg_clipping_range`` and quantized to ``secagg_quantization_range`` + 1 levels.
    """

    rounds: int = 5
    min_partners: int = 2
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    global_weighting: str = "kind_balanced"
    robust_aggregation: str = "mean"
    trim_fraction: float = 0.2
    max_update_norm: float | None = None
    personas: int = 8
    persona_candidates: tuple[int, ...] = ()
    kmeans_rounds: int = 6
    kmeans_noise: float = 10.0
    seed: int = 0
    round_timeout: float = 600.0
    evaluate_every: int = 1
    secure_aggregation: bool = False
    secagg_threshold: int | None = None  # None: a strict majority of each round's partners
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2**16

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"federation.rounds must be an integer >= 1, got {self.rounds!r}")
        if not isinstance(self.min_partners, int) or self.min_partners < 1:
            raise ConfigError(f"federation.min_partners must be an integer >= 1, got {self.min_partners!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"federation.seed must be an integer, got {self.seed!r}")
        if isinstance(self.evaluate_every, bool) or not isinstance(self.evaluate_every, int) or self.evaluate_every < 1:
            raise ConfigError(
                f"federation.evaluate_every must be an integer >= 1 (the last round is always evaluated), "
                f"got {self.evaluate_every!r}"
            )
        if isinstance(self.personas, bool) or not isinstance(self.personas, int) or self.personas < 0:
            raise ConfigError(f"federation.personas must be an integer >= 0 (0 = no clustering), got {self.personas!r}")
        if isinstance(self.kmeans_rounds, bool) or not isinstance(self.kmeans_rounds, int) or self.kmeans_rounds < 1:
            raise ConfigError(f"federation.kmeans_rounds must be an integer >= 1, got {self.kmeans_rounds!r}")
        candidates = self.persona_candidates
        if not isinstance(candidates, list | tuple) or any(
            isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in candidates
        ):
            raise ConfigError(
                "federation.persona_candidates must be a list of integers >= 2 (the numbers of personas "
                f"to choose from, e.g. [4, 6, 8]; [] = use federation.personas), got {candidates!r}"
            )
        if candidates and (len(set(candidates)) != len(candidates) or len(candidates) < 2):
            raise ConfigError(
                f"federation.persona_candidates needs at least two different numbers, got {list(candidates)!r}"
            )
        object.__setattr__(self, "persona_candidates", tuple(sorted(candidates)))
        if not isinstance(self.kmeans_noise, int | float) or not (
            math.isfinite(self.kmeans_noise) and self.kmeans_noise > 0
        ):
            raise ConfigError(f"federation.kmeans_noise must be a finite number > 0, got {self.kmeans_noise!r}")
        problems = _aggregation_problems(self)
        if not isinstance(self.secure_aggregation, bool):
            problems.append(f"federation.secure_aggregation must be true or false, got {self.secure_aggregation!r}")
        t = self.secagg_threshold
        if t is None:
            pass  # a strict majority of each round's partners
        elif isinstance(t, bool) or not isinstance(t, int) or t < 2:
            problems.append(
                "federation.secagg_threshold must be an integer >= 2, or absent for a strict majority of each "
                f"round's partners, got {t!r}"
            )
        elif self.secure_aggregation is True and self.min_partners < t:
            problems.append(
                f"federation.min_partners ({self.min_partners}) must be >= federation.secagg_threshold "
                f"({self.secagg_threshold}): a round with fewer partners would always abort"
            )
        clip = self.secagg_clipping_range
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not (math.isfinite(clip) and clip > 0):
            problems.append(f"federation.secagg_clipping_range must be a finite number > 0, got {clip!r}")
        levels = self.secagg_quantization_range
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 2**32:
            problems.append(f"federation.secagg_quantization_range must be an integer in [2, 2**32], got {levels!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def kmeans_releases(self) -> int:
        """Noisy k-means releases each partner makes (and plans for): the Lloyd rounds plus,
        when K is chosen among ``persona_candidates``, one round per candidate; 0 when
        ``personas = 0`` turns clustering off."""
        if self.personas == 0:
            return 0
        return self.kmeans_rounds + len(self.persona_candidates)


def _is_number(value: Any) -> bool:
    """A real, finite TOML number (not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _aggregation_problems(fed: FederationSettings) -> list[str]:
    """The server's aggregation settings, checked when the file is read rather than when the
    server builds its aggregator (where a wrong type would be a crash, not a message)."""
    from fedpersona.federation.aggregation import GLOBAL_WEIGHTINGS, ROBUST_AGGREGATORS, SERVER_OPTIMIZERS

    problems = []
    for key, valid in (
        ("server_optimizer", SERVER_OPTIMIZERS),
        ("global_weighting", GLOBAL_WEIGHTINGS),
        ("robust_aggregation", ROBUST_AGGREGATORS),
    ):
        value = getattr(fed, key)
        if not isinstance(value, str) or value not in valid:
            problems.append(f"federation.{key} must be one of {', '.join(valid)}, got {value!r}")
    if not _is_number(fed.server_lr) or not fed.server_lr > 0:
        problems.append(f"federation.server_lr must be a finite number > 0, got {fed.server_lr!r}")
    if not _is_number(fed.trim_fraction) or not 0 <= fed.trim_fraction < 0.5:
        problems.append(f"federation.trim_fraction must be in [0, 0.5), got {fed.trim_fraction!r}")
    norm = fed.max_update_norm
    if norm is not None and (not _is_number(norm) or not norm > 0):
        problems.append(f"federation.max_update_norm must be a finite number > 0, got {norm!r}")
    if not _is_number(fed.round_timeout) or not fed.round_timeout > 0:
        problems.append(f"federation.round_timeout must be a number of seconds > 0, got {fed.round_timeout!r}")
    return problems


@dataclass(frozen=True)
class SimulationSettings:
    """How a local simulation runs its partners."""

    cpus_per_partner: float = 1.0
    gpus_per_partner: float = 0.0
    test_fraction: float = 0.2
    share_eval_metrics: bool = True
    # Derive every partner's DP noise keys from the federation seed: reproducible runs, NOT
    # private against the coordinator (labelled so in the console, privacy.json and report).
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        if not self.cpus_per_partner > 0:
            raise ConfigError(f"simulation.cpus_per_partner must be > 0, got {self.cpus_per_partner!r}")
        if not 0 <= self.gpus_per_partner <= 1:
            raise ConfigError(f"simulation.gpus_per_partner must be in [0, 1], got {self.gpus_per_partner!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"simulation.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if not isinstance(self.reproducible_noise, bool):
            raise ConfigError(f"simulation.reproducible_noise must be true or false, got {self.reproducible_noise!r}")


@dataclass(frozen=True)
class SiloGroup:
    """Several partners of one kind: synthetic, or one real file split between them."""

    kind: str
    name: str
    partners: int = 3
    source: str = "synthetic"
    schema: str | None = None
    rows: int | None = None
    non_iid_alpha: float = 0.5
    small_partner_rows: int = 0
    seed: int = 0
    privacy: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ConfigError(f"silos.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for key in ("name", "source", "schema"):
            value = getattr(self, key)
            if not isinstance(value, str) and not (key == "schema" and value is None):
                raise ConfigError(f"silos.{key} must be a string, got {value!r}")
        for key in ("seed", "rows"):
            value = getattr(self, key)
            if isinstance(value, bool) or (not isinstance(value, int) and not (key == "rows" and value is None)):
                raise ConfigError(f"silo '{self.name}': {key} must be an integer, got {value!r}")
        if isinstance(self.partners, bool) or not isinstance(self.partners, int) or self.partners < 1:
            raise ConfigError(f"silos.partners must be an integer >= 1, got {self.partners!r}")
        if self.source == "synthetic":
            if not isinstance(self.rows, int) or self.rows < 10 * self.partners:
                raise ConfigError(
                    f"silo '{self.name}': synthetic rows must be an integer >= 10 per partner, got {self.rows!r}"
                )
        elif self.schema is None:
            raise ConfigError(f"silo '{self.name}': a file source needs a schema")
        if not self.non_iid_alpha > 0:
            raise ConfigError(f"silos.non_iid_alpha must be > 0, got {self.non_iid_alpha!r}")
        if not isinstance(self.small_partner_rows, int) or self.small_partner_rows < 0:
            raise ConfigError("silos.small_partner_rows must be an integer >= 0")
        if self.privacy is not None and not isinstance(self.privacy, dict):
            raise ConfigError(f"silo '{self.name}': privacy must be a table of [privacy] keys")


@dataclass(frozen=True)
class Scenario:
    """A whole local federation."""

    federation: FederationSettings
    model: EncoderConfig
    training: TrainingSettings
    privacy: PrivacySettings
    simulation: SimulationSettings
    silos: tuple[SiloGroup, ...]
    source: str = "<scenario>"

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, as written to ``DIR/config.toml``."""
        out: dict[str, Any] = {}
        for key in ("federation", "model", "training", "privacy", "simulation"):
            out[key] = _as_dict(getattr(self, key))
        out["silos"] = [{k: v for k, v in _as_dict(s).items() if v is not None} for s in self.silos]
        return out


@dataclass(frozen=True)
class PartnerConfig:
    """One partner's own settings (``client.toml``)."""

    name: str
    kind: str
    schema: str | None
    data: str | None
    state_dir: str
    privacy: PrivacySettings
    synthetic_rows: int | None = None
    synthetic_seed: int = 0
    synthetic_mix: tuple[float, ...] | None = None
    test_fraction: float = 0.2
    public_rows: int | None = None
    share_eval_metrics: bool = False
    audit_log: bool = False
    require_secure_aggregation: bool = False
    source: str = "<client.toml>"

    def declared_rows(self) -> int | None:
        """The partner's public row count: ``data.public_rows``, or for a synthetic table the
        training share of its configured ``synthetic_rows`` (both are configuration, public);
        ``None`` for a table file without a declaration."""
        if self.public_rows is not None:
            return self.public_rows
        if self.data is None and self.synthetic_rows:
            return max(2, round(self.synthetic_rows * (1.0 - self.test_fraction)))
        return None


def _as_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and math.isinf(value):
            value = "inf"
        if isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into a :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: the configuration file does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None


def dump_toml(path: str | Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as TOML (atomically: a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(tomli_w.dumps(_toml_safe(doc)), encoding="utf-8")
    tmp.replace(path)


def _toml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_safe(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def _section(cls: type[T], data: Any, where: str, source: str, base: T | None = None) -> T:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys."""
    if data is None:
        return base if base is not None else cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"valid keys in [{where}]: {', '.join(valid)}"
        )
    values = dict(data)
    for key, value in values.items():
        if value in ("inf", "infinity", "Infinity"):
            values[key] = math.inf
    try:
        if base is not None:
            return replace(base, **values)  # type: ignore[type-var]
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [{where}] {exc}") from None


_SCENARIO_KEYS = ("federation", "model", "training", "privacy", "simulation", "silos")


def load_scenario(
    path: str | Path,
    *,
    rounds: int | None = None,
    epsilon: float | None = None,
) -> Scenario:
    """Read a scenario; ``rounds``/``epsilon`` override the file (CLI options)."""
    path = Path(path)
    doc = read_toml(path)
    source = str(path)
    unknown = sorted(set(doc) - set(_SCENARIO_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(_SCENARIO_KEYS)}")
    federation = _section(FederationSettings, doc.get("federation"), "federation", source)
    if rounds is not None:
        federation = _section(FederationSettings, {"rounds": rounds}, "federation", "--rounds", federation)
    privacy = _section(PrivacySettings, doc.get("privacy"), "privacy", source)
    if epsilon is not None:
        privacy = _section(PrivacySettings, {"target_epsilon": epsilon}, "privacy", "--epsilon", privacy)
    silos_raw = doc.get("silos")
    if not isinstance(silos_raw, list) or not silos_raw:
        raise ConfigError(f"{source}: the scenario needs at least one [[silos]] entry")
    silos = []
    for i, raw in enumerate(silos_raw, start=1):
        group = _section(SiloGroup, raw, f"silos #{i}", source)
        if group.source != "synthetic":
            group = replace(group, source=str((path.parent / group.source).resolve()))
        if group.schema is not None:
            group = replace(group, schema=str((path.parent / group.schema).resolve()))
        if group.privacy is not None:  # validate the override against the scenario default
            _section(PrivacySettings, group.privacy, f"silos #{i}.privacy", source, privacy)
        silos.append(group)
    names = [s.name for s in silos]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: silo names must be unique, got {names}")
    return Scenario(
        federation=federation,
        model=_section(EncoderConfig, doc.get("model"), "model", source),
        training=_section(TrainingSettings, doc.get("training"), "training", source),
        privacy=privacy,
        simulation=_section(SimulationSettings, doc.get("simulation"), "simulation", source),
        silos=tuple(silos),
        source=source,
    )


_PARTNER_SECTIONS = {
    "partner": ("name", "kind", "state_dir"),
    "data": (
        "path", "schema", "public_rows", "synthetic_rows", "synthetic_seed", "synthetic_mix", "test_fraction",
    ),
    "privacy": tuple(f.name for f in fields(PrivacySettings)),
    "release": ("share_eval_metrics", "audit_log", "require_secure_aggregation"),
}  # fmt: skip


def load_partner_config(path: str | Path) -> PartnerConfig:
    """Read a partner's ``client.toml``; relative paths are relative to the file."""
    path = Path(path)
    doc = read_toml(path)
    source = str(path)
    unknown = sorted(set(doc) - set(_PARTNER_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(_PARTNER_SECTIONS)}")
    for section, valid in _PARTNER_SECTIONS.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        bad = sorted(set(table) - set(valid))
        if bad:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in bad)}; "
                f"valid keys in [{section}]: {', '.join(valid)}"
            )
    partner = doc.get("partner", {})
    data = doc.get("data", {})
    release = doc.get("release", {})
    name = partner.get("name")
    kind = partner.get("kind")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: partner.name must be a non-empty string")
    if kind not in KINDS:
        raise ConfigError(f"{source}: partner.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    base = path.parent

    def resolve(value: Any, key: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a path string, got {value!r}")
        return str((base / value).resolve())

    data_path = resolve(data.get("path"), "data.path")
    synthetic_rows = data.get("synthetic_rows")
    if data_path is None and synthetic_rows is None:
        raise ConfigError(f"{source}: [data] needs either path (a CSV/Parquet file) or synthetic_rows")
    if data_path is not None and data.get("schema") is None:
        raise ConfigError(f"{source}: data.schema must name the schema file of data.path")
    test_fraction = data.get("test_fraction", 0.2)
    if not isinstance(test_fraction, int | float) or not 0 < test_fraction < 1:
        raise ConfigError(f"{source}: data.test_fraction must be in (0, 1), got {test_fraction!r}")
    if synthetic_rows is not None and (
        isinstance(synthetic_rows, bool) or not isinstance(synthetic_rows, int) or synthetic_rows < 1
    ):
        raise ConfigError(f"{source}: data.synthetic_rows must be an integer >= 1, got {synthetic_rows!r}")
    value = data.get("synthetic_seed", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: data.synthetic_seed must be an integer >= 0, got {value!r}")
    public_rows = data.get("public_rows")
    if public_rows is not None and (
        isinstance(public_rows, bool) or not isinstance(public_rows, int) or public_rows < 2
    ):
        raise ConfigError(
            f"{source}: data.public_rows must be an integer >= 2 (a round figure of your table's size, "
            f"public: it sets your sample rate and aggregation weight), got {public_rows!r}"
        )
    mix = data.get("synthetic_mix")
    if mix is not None and (
        not isinstance(mix, list) or not mix or not all(_is_number(x) and x >= 0 for x in mix) or not sum(mix) > 0
    ):
        raise ConfigError(f"{source}: data.synthetic_mix must be numbers >= 0 with a positive sum, got {mix!r}")
    for key in ("share_eval_metrics", "audit_log", "require_secure_aggregation"):
        # A string such as "false" must not switch a release on: only true or false is accepted.
        if not isinstance(release.get(key, False), bool):
            raise ConfigError(f"{source}: release.{key} must be true or false, got {release[key]!r}")
    return PartnerConfig(
        name=name,
        kind=str(kind),
        schema=resolve(data.get("schema"), "data.schema"),
        data=data_path,
        state_dir=resolve(partner.get("state_dir", f"state-{name}"), "partner.state_dir") or "",
        privacy=_section(PrivacySettings, doc.get("privacy"), "privacy", source),
        synthetic_rows=synthetic_rows,
        synthetic_seed=int(data.get("synthetic_seed", 0)),
        synthetic_mix=tuple(float(x) for x in mix) if mix is not None else None,
        test_fraction=float(test_fraction),
        public_rows=public_rows,
        share_eval_metrics=bool(release.get("share_eval_metrics", False)),
        audit_log=bool(release.get("audit_log", False)),
        require_secure_aggregation=bool(release.get("require_secure_aggregation", False)),
        source=source,
    )
