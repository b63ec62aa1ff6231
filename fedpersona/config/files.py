"""Configuration files: read, validated whole, every problem reported at once.

``load_scenario``, ``load_partner_config``, ``load_federation_config`` and ``load_plan`` read
TOML (or JSON for a plan), resolve relative paths against the file's folder and validate the
document with the models of :mod:`fedpersona.config.settings`. A document with problems
raises one :class:`~fedpersona.errors.ConfigError` that names the file and lists every
problem (``privacy.target_epsilon: must be greater than 0, got -1``), with a did-you-mean for
a misspelt key or section (``unknown key federation.round: did you mean rounds?``).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import ValidationError

from fedpersona.config.problems import problems_of
from fedpersona.config.settings import FederationConfig, PartnerConfig, PrivacyPlan, Scenario, Settings
from fedpersona.errors import ConfigError

S = TypeVar("S", bound=Settings)

__all__ = [
    "dump_toml",
    "load_federation_config",
    "load_partner_config",
    "load_plan",
    "load_scenario",
    "read_toml",
    "save_plan",
    "validated",
    "write_durably",
]


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


def validated(model: type[S], doc: Any, source: str) -> S:
    """``model`` from ``doc``, or one :class:`ConfigError` listing every problem of ``source``."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = problems_of(exc, model)
        raise ConfigError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems)) from None


def load_scenario(path: str | Path, *, rounds: int | None = None, epsilon: float | None = None) -> Scenario:
    """Read a scenario; ``rounds``/``epsilon`` override the file (CLI options)."""
    path = Path(path)
    doc = dict(read_toml(path))
    if rounds is not None:
        doc["federation"] = {**doc.get("federation", {}), "rounds": rounds}
    if epsilon is not None:
        doc["privacy"] = {**doc.get("privacy", {}), "target_epsilon": epsilon}
    silos = doc.get("silos")
    if isinstance(silos, list):
        doc["silos"] = [_resolve_silo(s, path.parent) if isinstance(s, dict) else s for s in silos]
    doc["source"] = str(path)
    return validated(Scenario, doc, str(path))


def _resolve_silo(silo: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(silo)
    if isinstance(out.get("source"), str) and out["source"] != "synthetic":
        out["source"] = str((base / out["source"]).resolve())
    if isinstance(out.get("schema"), str):
        out["schema"] = str((base / out["schema"]).resolve())
    return out


def load_partner_config(path: str | Path) -> PartnerConfig:
    """Read a partner's ``client.toml``; relative paths are relative to the file."""
    path = Path(path)
    doc = dict(read_toml(path))
    base = path.parent
    partner, data = doc.get("partner"), doc.get("data")
    if isinstance(partner, dict):
        partner = dict(partner)
        state = partner.get("state_dir", f"state-{partner.get('name', 'partner')}")
        if isinstance(state, str):
            partner["state_dir"] = str((base / state).resolve())
        doc["partner"] = partner
    if isinstance(data, dict):
        data = dict(data)
        for key in ("path", "schema"):
            if isinstance(data.get(key), str):
                data[key] = str((base / data[key]).resolve())
        doc["data"] = data
    doc["source"] = str(path)
    return validated(PartnerConfig, doc, str(path))


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read ``federation.toml``; paths in ``[server]`` and ``[[partners]]`` become absolute."""
    path = Path(path).resolve()
    doc = dict(read_toml(path))
    base = path.parent
    server = doc.get("server")
    if isinstance(server, dict):
        server = dict(server)
        defaults = {"run_dir": "../runs/federation", "credentials": "credentials", "app": ".."}
        for key, default in defaults.items():
            value = server.get(key, default)
            if isinstance(value, str) and value.strip():
                server[key] = str((base / value).resolve())
        doc["server"] = server
    partners = doc.get("partners")
    if isinstance(partners, list):
        doc["partners"] = [
            {**p, "public_key": str((base / p["public_key"]).resolve())}
            if isinstance(p, dict) and isinstance(p.get("public_key"), str) and p["public_key"].strip()
            else p
            for p in partners
        ]
    doc["source"] = str(path)
    return validated(FederationConfig, doc, str(path))


PLAN = "plan.json"


def load_plan(state_dir: str | Path) -> PrivacyPlan | None:
    """The plan fixed in ``state_dir/plan.json``, validated; None when there is none yet."""
    path = Path(state_dir) / PLAN
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable plan ({exc}); restore it from a backup") from None
    return validated(PrivacyPlan, doc, str(path))


def save_plan(state_dir: str | Path, plan: PrivacyPlan) -> None:
    """Write ``state_dir/plan.json`` through a fsync'd temporary file."""
    path = Path(state_dir) / PLAN
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps(plan.model_dump(mode="json"), indent=2).encode("utf-8"))


def write_durably(path: str | Path, payload: bytes) -> Path:
    """Replace ``path`` with ``payload`` so that a crash leaves the old file or the new one:
    an fsync'd temporary file beside it, renamed over it, then the folder fsync'd."""
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
