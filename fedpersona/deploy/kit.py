"""A partner kit: the one folder a coordinator hands to a partner's IT.

``make_partner_kit(config=federation.toml, partner=NAME, out=DIR)`` writes ``DIR/NAME/``::

    INSTALL.md                   the exact commands: CPU-only PyTorch pinned, then the fedpersona
                                 version (or wheel) the coordinator names, the node key, check,
                                 rehearsal, start
    client.toml                  the partner's configuration, filled in (name, kind, the
                                 federation's planned rounds); the partner fills in its data path
    schema.toml                  the shared schema of the partner's kind (when the coordinator gives one)
    credentials/ca.pem           the federation's CA certificate (public)
    credentials/model-signing.pub  the key that verifies the federation's models (public)
    credentials/registry.token   the registry's bearer token (0600; only when the coordinator gives one)
    <wheel>.whl                  the fedpersona wheel (only when the coordinator gives one)

What a kit never holds: any private key of the coordinator (``ca.key``, ``server.key``,
``model-signing.key``) and the partner's own node key, which the partner creates at its site
(``fedpersona certs partner NAME``) so that its private half never leaves it. A kit is public
except for the registry token; it carries nothing about any partner's rows.

The kit is assembled in a temporary folder beside ``DIR/NAME`` and renamed into place only
when every file is written, so a failure leaves no half-written kit; an existing kit is never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedpersona.config.files import load_federation_config
from fedpersona.config.settings import KIND_PATTERN, FederationConfig, PartnerEntry, PrivacySettings
from fedpersona.errors import ConfigError

__all__ = ["CPU_TORCH", "TORCH_CPU_INDEX", "PartnerKit", "installed_version", "make_partner_kit"]

CPU_TORCH = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_PRIVATE_MARKERS = (b"PRIVATE KEY",)


@dataclass(frozen=True)
class PartnerKit:
    """What :func:`make_partner_kit` wrote: the kit folder and its files (relative paths)."""

    folder: Path
    files: tuple[str, ...]
    key_registered: bool  # the partner's node public key is already listed in federation.toml

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("a partner kit holds at least one file")


def installed_version() -> str | None:
    """The installed fedpersona's version (package metadata; None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedpersona")
    except PackageNotFoundError:
        return None


def make_partner_kit(
    *,
    config: str | Path,
    partner: str,
    out: str | Path,
    superlink: str | None = None,
    kind: str | None = None,
    schema: str | Path | None = None,
    package: str | None = None,
    wheel: str | Path | None = None,
    registry_url: str | None = None,
    registry_token: str | Path | None = None,
) -> PartnerKit:
    """Write ``out/partner/``: everything one partner's IT needs, nothing private of the coordinator.

    ``superlink`` is the HOST:PORT partners reach the SuperLink at (default: ``[server]`` host and
    port of ``config``, unless it listens on every address); ``package`` the pip requirement to
    install (default ``fedpersona==<the installed version>``), or ``wheel`` a wheel file copied into
    the kit; ``registry_url`` and ``registry_token`` (a 0600 token file as ``fedpersona serve
    --token-file`` reads it) the coordinator's model registry, when it runs one.
    """
    cfg = load_federation_config(config)
    entry = _entry(cfg, partner)
    kind = _kind(entry, kind, cfg)
    address = _superlink(cfg, superlink)
    files: dict[str, tuple[bytes, int]] = {}
    problems: list[str] = []
    for name in ("ca.pem", "model-signing.pub"):
        source = cfg.credentials / name
        try:
            payload = source.read_bytes()
        except OSError as exc:
            problems.append(f"{source}: cannot read it ({exc.strerror}); create it with `fedpersona certs init`")
            continue
        if any(marker in payload for marker in _PRIVATE_MARKERS):
            problems.append(f"{source} holds a private key; a kit carries only public files")
            continue
        files[f"credentials/{name}"] = (payload, 0o644)
    if schema is not None:
        files["schema.toml"] = (_schema_bytes(Path(schema), kind, problems), 0o644)
    wheel_name = None
    if wheel is not None:
        wheel = Path(wheel)
        if wheel.suffix != ".whl" or not wheel.name.startswith("fedpersona-") or not wheel.is_file():
            problems.append(f"--wheel {wheel}: not a fedpersona wheel file (fedpersona-<version>-...whl)")
        else:
            wheel_name = wheel.name
            files[wheel_name] = (wheel.read_bytes(), 0o644)
    if registry_token is not None:
        from fedpersona.deploy.registry import read_token_file

        try:
            token = read_token_file(registry_token)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            files["credentials/registry.token"] = ((token + "\n").encode(), 0o600)
    requirement = _requirement(package, wheel_name, problems)
    if problems:
        raise ConfigError(f"cannot make the kit of partner {partner!r}: " + "; ".join(problems))
    key_registered = Path(entry.public_key).is_file()
    fingerprint = hashlib.sha256(Path(entry.public_key).read_bytes()).hexdigest() if key_registered else None
    files["client.toml"] = (
        client_toml(cfg, name=entry.name, kind=kind, schema=schema is not None).encode(),
        0o644,
    )
    files["INSTALL.md"] = (
        install_text(
            name=entry.name, kind=kind, superlink=address, requirement=requirement, fingerprint=fingerprint,
            has_schema=schema is not None, registry_url=registry_url, has_token=registry_token is not None,
            rounds=cfg.federation.rounds,
        ).encode(),
        0o644,
    )  # fmt: skip
    folder = _write_kit(Path(out), entry.name, files)
    return PartnerKit(folder=folder, files=tuple(sorted(files)), key_registered=key_registered)


def _entry(cfg: FederationConfig, partner: str) -> PartnerEntry:
    for entry in cfg.partners:
        if entry.name == partner:
            return entry
    names = ", ".join(p.name for p in cfg.partners) or "none"
    raise ConfigError(
        f"{cfg.source}: no [[partners]] entry named {partner!r} (listed: {names}); add the partner "
        "(name, kind, public_key) to federation.toml first, then make its kit"
    )


def _kind(entry: PartnerEntry, kind: str | None, cfg: FederationConfig) -> str:
    import re

    if kind is not None and entry.kind is not None and kind != entry.kind:
        raise ConfigError(f"--kind {kind!r} contradicts partner {entry.name}'s kind {entry.kind!r} in {cfg.source}")
    chosen = kind or entry.kind
    if chosen is None:
        raise ConfigError(f"{cfg.source}: partner {entry.name} has no kind; set it there or pass --kind")
    if not re.fullmatch(KIND_PATTERN, chosen):
        raise ConfigError(f"--kind must match {KIND_PATTERN}, got {chosen!r}")
    return chosen


def _superlink(cfg: FederationConfig, superlink: str | None) -> str:
    if superlink is None:
        if cfg.server.host in ("0.0.0.0", "::", ""):
            raise ConfigError(
                f"{cfg.source}: server.host {cfg.server.host!r} listens on every address, which is not an address "
                "partners can dial; pass --superlink HOST:PORT (the name or address partners reach the SuperLink "
                "at, one of the hosts of `fedpersona certs init --host`)"
            )
        superlink = f"{cfg.server.host}:{cfg.server.port}"
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in superlink):
        raise ConfigError(f"--superlink must be HOST:PORT (e.g. coordinator.example.org:9093), got {superlink!r}")
    return superlink


def _schema_bytes(path: Path, kind: str, problems: list[str]) -> bytes:
    from fedpersona.data.schema_reader import load_schema

    try:
        shared = load_schema(path)
    except (ConfigError, OSError) as exc:
        problems.append(f"--schema {path}: {exc}")
        return b""
    if shared.kind != kind:
        problems.append(f"--schema {path} is a {shared.kind!r} schema; partner's kind is {kind!r}")
    return path.read_bytes()


def _requirement(package: str | None, wheel_name: str | None, problems: list[str]) -> str:
    if wheel_name is not None:
        if package is not None:
            problems.append("--package and --wheel exclude each other; give one of them")
        return f"./{wheel_name}"
    if package is None:
        version = installed_version()
        if version is None:
            problems.append("fedpersona's installed version is unknown: name the package with --package or --wheel")
            return ""
        return f"fedpersona=={version}"
    if not package.strip() or any(c in package for c in "\n\r;&|`$"):
        problems.append(f"--package must be one pip requirement (e.g. fedpersona==0.1.0), got {package!r}")
    return package.strip()


def client_toml(cfg: FederationConfig, *, name: str, kind: str, schema: bool) -> str:
    """A partner's client.toml, filled in except for its data path (``data.path`` points at a
    placeholder that ``partner check`` refuses until the partner names its file)."""
    privacy = PrivacySettings()
    schema_line = (
        'schema = "schema.toml"           # the shared schema of your kind (public by declaration)'
        if schema
        else 'schema = "schema.toml"           # the shared schema: ask the coordinator for it (INSTALL.md step 4)'
    )
    return f"""# Partner {name}'s configuration ({kind}), made by the coordinator's `fedpersona server kit`.
# Fill in [data] path (and check [privacy]: the budget is yours), then follow INSTALL.md.
# Relative paths are relative to this file. Unknown keys are errors.

[partner]
name = {json.dumps(name)}                # as the coordinator registered your node key
kind = {json.dumps(kind)}
state_dir = "state"              # privacy ledger, noise plan, models, audit log: back it up, never delete it

[data]
path = "/path/to/your/users.csv"  # FILL IN: your CSV (also .gz) or Parquet file, one row per user
{schema_line}
test_fraction = 0.2
# public_rows = 10000            # FILL IN: your number of users, rounded (public: it sets your weight)

[privacy]                        # your own budget, for the lifetime of state_dir; it always wins
target_epsilon = {float(privacy.target_epsilon)!r}
delta = {float(privacy.delta)!r}                  # below 1 / your number of users
max_grad_norm = {float(privacy.max_grad_norm)!r}
accountant = {json.dumps(privacy.accountant)}
# The federation's rounds: your whole budget is planned over them, and later rounds are refused.
planned_rounds = {cfg.federation.rounds}

[release]
share_eval_metrics = false       # held-out metrics stay on site unless set to true
audit_log = true                 # every outgoing message's keys and shapes, in state/audit.jsonl
"""


def install_text(
    *,
    name: str,
    kind: str,
    superlink: str,
    requirement: str,
    fingerprint: str | None,
    has_schema: bool,
    registry_url: str | None,
    has_token: bool,
    rounds: int,
) -> str:
    """INSTALL.md of a kit: the commands a partner's IT types, in order."""
    if fingerprint is not None:
        key_step = (
            f"The coordinator has registered a node key for `{name}` (the SHA-256 of its `{name}.pub` file is\n"
            f"`{fingerprint}`). Put its private half, made at your site, in\n"
            f"`credentials/{name}.key` (mode 0600). If you have none yet, make one and send the coordinator\n"
            "the new `.pub` file (it replaces the listed one):\n"
        )
    else:
        key_step = "Make your node key here; send only the `.pub` file to the coordinator:\n"
    schema_step = (
        "`schema.toml` is the federation's shared schema of your kind. Check that it describes your file:"
        if has_schema
        else "Ask the coordinator for the federation's shared `schema.toml` of your kind and put it here\n"
        "(or draft one for review with `fedpersona schema infer /srv/data/users.csv --kind "
        f"{kind} --out schema.toml`). Check that it describes your file:"
    )
    registry = ""
    if registry_url is not None:
        token = " --token-file credentials/registry.token" if has_token else ""
        registry = (
            "\n## 8. Models from the coordinator's registry\n\n```\n"
            f"fedpersona infer --model {registry_url} --config client.toml --data /srv/data/users.csv \\\n"
            f"    --out personas.csv{token}\n```\n\n"
            "The model is verified against `credentials/model-signing.pub` and the registry's certificate\n"
            "against `credentials/ca.pem`.\n"
        )
    rows = ""
    if has_token:
        rows += "| `credentials/registry.token` | the model registry's access token (0600; keep it secret) |\n"
    if has_schema:
        rows += "| `schema.toml` | the shared schema of your kind (public by declaration) |\n"
    return f"""# Partner kit: {name} ({kind})

Everything partner `{name}` needs to join the federation. Your data never leaves your site:
your SuperNode connects out to the coordinator at `{superlink}` over HTTPS and sends only
differentially private updates and public counts, charged to your own privacy budget.

| file | what |
|---|---|
| `INSTALL.md` | these instructions |
| `client.toml` | your configuration: fill in `[data] path`; `[privacy]` is your budget |
| `credentials/ca.pem` | the federation's CA certificate (public) |
| `credentials/model-signing.pub` | verifies the federation's models (public) |
{rows}
Run every command below from this folder.

## 1. Install (Python 3.11 or newer, CPU only)

```
python3 -m venv venv && . venv/bin/activate
pip install {CPU_TORCH} --index-url {TORCH_CPU_INDEX}
pip install {requirement}
fedpersona --version
```

The first `pip install` takes PyTorch's CPU-only build (no CUDA libraries); install it before
fedpersona, so that pip keeps it. `fedpersona --version` must name the version the coordinator
names (`{requirement}`).

## 2. Your node key (once)

{key_step}
```
fedpersona certs partner {name} --out credentials      # writes {name}.key (0600) and {name}.pub
```

## 3. Fill in client.toml

Set `[data] path` to your file (CSV, also .gz, or Parquet; one row per user) and
`public_rows` to your number of users, rounded. `[privacy]` is your budget for the lifetime of
`state/`: nothing the coordinator sends can raise it.

## 4. Check your data (nothing connects)

{schema_step}

```
fedpersona schema check --schema schema.toml --data /srv/data/users.csv
fedpersona partner check --config client.toml --rounds {rounds}
```

`partner check` validates every row, your credentials and your privacy plan, and says whether
your real budget is untouched.

## 5. Rehearse first (spends nothing of your real budget)

```
fedpersona partner check --config client.toml --rehearsal
fedpersona partner start --config client.toml --rehearsal --superlink {superlink}
```

A rehearsal runs on synthetic rows drawn from the schema (never your data), with its own state
folder and ledger (`rehearsal/state/`): join the coordinator's rehearsal run with it to try the
connection, the credentials and the whole run. Your real `state/` is not touched.

## 6. Start

```
fedpersona partner start --config client.toml --superlink {superlink}
```

This spends your real budget (your ledger is `state/ledger.jsonl`; `fedpersona privacy ledger
state` shows what is spent and left). Ctrl-C stops it.

## 7. The federation's model

At the end of the run your SuperNode verifies the signed model against
`credentials/model-signing.pub` and installs it in `state/model/`:

```
fedpersona infer --model state/model --config client.toml --data /srv/data/users.csv --out personas.csv
```
{registry}"""


def _write_kit(out: Path, name: str, files: dict[str, tuple[bytes, int]]) -> Path:
    """Write ``files`` under ``out/name`` all at once: assembled in a temporary folder, then renamed."""
    target = out / name
    if target.exists() or target.is_symlink():
        raise ConfigError(f"{target} already exists; move it away first (a kit is never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{name}.kit-{os.getpid()}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir(mode=0o700)
        for relative, (payload, mode) in files.items():
            path = staging / relative
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(path, mode)  # whatever the umask
        os.chmod(staging, 0o700)
        try:
            os.rename(staging, target)  # a folder created meanwhile makes this fail: never overwritten
        except OSError:
            raise ConfigError(f"{target} appeared while the kit was written; nothing was changed") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
