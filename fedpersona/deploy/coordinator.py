"""Real deployments on Flower's Deployment Engine: a SuperLink at the coordinator, a SuperNode per partner.

Coordinator (``fedpersona server start --config server/federation.toml``)::

    flower-superlink --ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY
                     --enable-supernode-auth --database RUN_DIR/superlink.db
                     --disable-runtime-dependency-installation --host HOST --port PORT
                     --log-file RUN_DIR/logs/superlink.log
    flwr supernode register PARTNER.pub fedpersona --name NAME --format json    (per partner)
    flwr run APP_DIR fedpersona --format json
        --run-config 'federation-config="/abs/federation.toml" run-dir="/abs/RUN_DIR"'

``flwr`` reads its SuperLink connection from ``$FLWR_HOME/config.toml``; fedpersona writes one
in ``RUN_DIR/flwr-home`` (address and the CA as ``root-certificates``), so nothing in the
operator's home folder is touched. Fleet, Control and Runtime APIs share the one HTTPS port.

Partner (``fedpersona partner start --config clients/<kind>/client.toml``): the data is checked
against the schema and the privacy plan first, then::

    flower-supernode --superlink HOST:PORT --root-certificates CA
                     --auth-supernode-private-key KEY --max-wait-time W --port RUNTIME_PORT
                     --node-config 'client-config="/abs/client.toml"'

flower-supernode retries a lost SuperLink itself (for up to ``W`` seconds); if it gives up,
fedpersona restarts it with a bounded exponential backoff.

Both commands log to files, and on SIGINT/SIGTERM terminate every process they started (and
those processes' children), waiting a bounded time before killing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpersona.config.files import load_federation_config, load_partner_config, load_plan
from fedpersona.config.settings import (
    FederationConfig,
    FederationSettings,
    PartnerConfig,
    TrainingSettings,
)
from fedpersona.deploy.processes import (
    ProcessSupervisor,
    Stopped,
    StopSignals,
    child_env,
    descendants,
    flower_tool,
    signal_all,
    wait_port,
)
from fedpersona.errors import ConfigError, FedPersonaError

__all__ = [
    "PartnerCheck",
    "check_partner",
    "load_node_public_key",
    "stage_app",
    "start_partner",
    "start_server",
    "supernode_command",
]

logger = logging.getLogger(__name__)

CONNECTION = "fedpersona"  # the SuperLink connection name in RUN_DIR/flwr-home/config.toml
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
Report = Callable[[str], None]


# --------------------------------------------------------------------------- federation.toml


def check_resume(cfg: FederationConfig) -> str:
    """What ``--resume`` will continue from, checked before anything starts: the checkpoint
    must be readable and belong to these settings (else :class:`ConfigError`)."""
    from fedpersona.federation.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(cfg.run_dir, settings=(cfg.federation, cfg.model, cfg.training))
    if checkpoint is None:
        return "no checkpoint (no round was aggregated): the run starts at round 1"
    if checkpoint.stage == "done":
        return f"the checkpoint says the run finished ({checkpoint.round} rounds): the model is sent to partners again"
    if checkpoint.stage == "train":
        done, total = checkpoint.round, cfg.federation.rounds
        return f"{done} of {total} rounds aggregated: continuing at round {done + 1}"
    return f"training done; persona clustering continues ({checkpoint.stage}, {checkpoint.kmeans_done} k-means rounds)"


def load_node_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A partner's node key as ``flwr supernode register`` needs it: OpenSSH, EC, NIST curve."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: the partner's public key file does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise ConfigError(
            f"{path}: node keys must be EC keys on a NIST curve (P-256/P-384/P-521); "
            "make one with `fedpersona certs partner NAME --out DIR`"
        )
    return key


def _load_node_private_key(path: Path) -> None:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise ConfigError(f"{path}: the node authentication key does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise ConfigError(f"{path}: the node key must be an EC key on a NIST curve (P-256/P-384/P-521)")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: a private key must be readable by its owner only (chmod 600 {path})")


# --------------------------------------------------------------------------- coordinator


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _flwr_json(args: Sequence[str], *, flwr_home: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ... --format json`` and return its JSON (its exit code is 0 even on failure)."""
    try:
        done = subprocess.run(
            [flower_tool("flwr"), *args, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env({"FLWR_HOME": str(flwr_home)}),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"success": False, "error-message": f"`flwr {' '.join(args)}` took longer than {timeout:.0f}s"}
    text = done.stdout.strip()
    start = text.find("{")
    try:
        return dict(json.loads(text[start:])) if start >= 0 else {}
    except ValueError:
        return {"success": False, "error-message": (text + "\n" + done.stderr).strip()}


def _write_flwr_home(home: Path, *, address: str, ca: Path) -> None:
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    doc = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "root-certificates": str(ca)}}}
    (home / "config.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")


def _install_signing_key(credentials: Path, run_dir: Path) -> None:
    """The ServerApp signs with RUN_DIR/keys/model-signing.key: make it the federation's key."""
    source = credentials / "model-signing.key"
    target = run_dir / "keys" / "model-signing.key"
    if not source.exists():
        raise ConfigError(f"{source} does not exist; create the credentials with `fedpersona certs init`")
    if target.exists():
        if target.read_bytes() != source.read_bytes():
            raise ConfigError(
                f"{target} is not the federation's signing key {source}; models of this run folder "
                "would not verify against the key partners hold. Use another server.run_dir."
            )
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(source.read_bytes())


def superlink_command(cfg: FederationConfig) -> list[str]:
    creds = cfg.credentials
    return [
        flower_tool("flower-superlink"),
        "--ssl-ca-certfile", str(creds / "ca.pem"),
        "--ssl-certfile", str(creds / "server.pem"),
        "--ssl-keyfile", str(creds / "server.key"),
        "--enable-supernode-auth",
        "--database", str(cfg.run_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--host", cfg.server.host,
        "--port", str(cfg.server.port),
    ]  # fmt: skip


def _check_server_files(cfg: FederationConfig) -> None:
    problems = []
    for name in ("ca.pem", "server.pem", "server.key", "model-signing.key"):
        if not (cfg.credentials / name).exists():
            problems.append(f"{cfg.credentials / name} is missing")
    for p in cfg.partners:
        try:
            load_node_public_key(p.public_key)
        except ConfigError as exc:
            problems.append(f"partner {p.name}: {exc}")
    if not (Path(cfg.server.app) / "pyproject.toml").exists():
        problems.append(f"server.app {cfg.server.app} holds no pyproject.toml (the fedpersona Flower app)")
    if problems:
        raise ConfigError(f"{cfg.source}: " + "; ".join(problems))


def start_server(config: str | Path, *, resume: bool = False, report: Report = logger.info) -> int:
    """Run the coordinator: SuperLink, partner registration, one fedpersona run; returns an exit code."""
    cfg = load_federation_config(config)
    _check_server_files(cfg)
    run_dir = cfg.run_dir
    db = run_dir / "superlink.db"
    if db.exists() and not resume:
        raise ConfigError(
            f"{run_dir} already holds a federation ({db.name}); pass --resume to continue it "
            "(registrations and partners' ledgers are kept) or choose another server.run_dir"
        )
    if resume and not db.exists():
        raise ConfigError(f"--resume: {run_dir} holds no federation to resume ({db.name} is missing)")
    where = check_resume(cfg) if resume else ""
    run_dir.mkdir(parents=True, exist_ok=True)
    _install_signing_key(cfg.credentials, run_dir)
    home = run_dir / "flwr-home"
    host = _connect_host(cfg.server.host)
    _write_flwr_home(home, address=f"{host}:{cfg.server.port}", ca=cfg.credentials / "ca.pem")
    logs = run_dir / "logs"
    supervisor = ProcessSupervisor()
    with StopSignals() as signals:
        try:
            # FLWR_HOME: the bundles flower-superexec installs go to the run folder, not ~/.flwr.
            superlink = supervisor.start(
                superlink_command(cfg), log=logs / "superlink.log", env={"FLWR_HOME": str(home)}
            )
            report(f"flower-superlink pid {superlink.pid} on {cfg.server.host}:{cfg.server.port}; log {logs}")
            wait_port(host, cfg.server.port, timeout=cfg.server.ready_timeout, proc=superlink, signals=signals)
            _register_partners(cfg, home=home, report=report, signals=signals, superlink=superlink, resume=resume)
            if resume:
                _stop_previous_run(cfg.run_dir, home=home, report=report)
                report(f"resuming {run_dir}: {where}")
            run_id = _start_run(cfg, home=home, config=Path(cfg.source), report=report, resume=resume)
            return _watch_run(run_id, home=home, superlink=superlink, signals=signals, report=report, run_dir=run_dir)
        except Stopped as stop:
            report(f"received {stop}; stopping the SuperLink and its children")
            return 130
        finally:
            supervisor.stop_all()


def _register_partners(
    cfg: FederationConfig,
    *,
    home: Path,
    report: Report,
    signals: StopSignals,
    superlink: subprocess.Popen[bytes],
    resume: bool = False,
) -> None:
    """Register every listed key with the SuperLink. Keys this run folder's database already
    holds (``RUN_DIR/registered.json``, by the key's hash) are skipped on a resume."""
    import hashlib

    record = cfg.run_dir / "registered.json"
    done: dict[str, str] = {}
    if resume:  # a fresh database holds no registration, whatever an old record says
        try:
            done = dict(json.loads(record.read_text()))
        except (OSError, ValueError):
            done = {}
    for p in cfg.partners:
        digest = hashlib.sha256(Path(p.public_key).read_bytes()).hexdigest()
        if done.get(p.name) == digest:
            report(f"partner {p.name} is already registered")
            continue
        for attempt in range(5):  # the Control API may lag the open port by a moment
            signals.check()
            out = _flwr_json(["supernode", "register", p.public_key, CONNECTION, "--name", p.name], flwr_home=home)
            message = str(out.get("error-message", ""))
            if out.get("success"):
                report(f"registered partner {p.name} as node {out.get('node-id')}")
                break
            if "already in use" in message:
                report(f"partner {p.name} is already registered")
                break
            if superlink.poll() is not None or attempt == 4:
                raise FedPersonaError(f"cannot register partner {p.name} ({p.public_key}): {message.strip()}")
            signals.sleep(2.0 * (attempt + 1))
        done[p.name] = digest
        record.write_text(json.dumps(done, indent=2))


def stage_app(app: Path, dest: Path) -> Path:
    """Copy the Flower app (pyproject.toml + the fedpersona package) to ``dest`` for ``flwr run``.

    ``flwr run DIR`` rewrites DIR/pyproject.toml when it holds the legacy
    ``[tool.flwr.federations]`` tables (flwr 1.42 moved them to the Flower configuration file);
    building the bundle from a staged copy without them leaves the operator's checkout untouched.
    """
    import tomllib

    import tomli_w

    doc = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    doc.get("tool", {}).get("flwr", {}).pop("federations", None)
    if dest.exists():
        shutil.rmtree(dest)
    package = app / "fedpersona"
    if not (package / "federation" / "server_app.py").exists():  # an installed fedpersona, not a source checkout
        package = Path(__file__).resolve().parent
    shutil.copytree(package, dest / "fedpersona", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    readme = app / "README.md"
    if readme.exists():
        shutil.copy2(readme, dest / "README.md")
    return dest


def _stop_previous_run(run_dir: Path, *, home: Path, report: Report) -> None:
    """Stop the run a crash left behind in the SuperLink's database, so that partners do not
    take up its last messages (and spend budget on them) next to the resumed run."""
    try:
        previous = str(json.loads((run_dir / "run.json").read_text())["run-id"])
    except (OSError, ValueError, KeyError):
        return
    out = _flwr_json(["stop", previous, CONNECTION], flwr_home=home)
    if out.get("success"):
        report(f"stopped the interrupted run {previous}")


def _start_run(cfg: FederationConfig, *, home: Path, config: Path, report: Report, resume: bool = False) -> str:
    for path in (config, cfg.run_dir):
        if '"' in str(path) or "\\" in str(path):
            raise ConfigError(f"paths given to `flwr run` must not contain quotes or backslashes: {path}")
    run_config = f'federation-config="{config}" run-dir="{cfg.run_dir}"' + (" resume=true" if resume else "")
    staged = stage_app(Path(cfg.server.app), cfg.run_dir / "app")
    out = _flwr_json(["run", str(staged), CONNECTION, "--run-config", run_config], flwr_home=home, timeout=300)
    if not out.get("success"):
        raise FedPersonaError(f"`flwr run` failed: {str(out.get('error-message', out)).strip()}")
    run_id = str(out["run-id"])
    (cfg.run_dir / "run.json").write_text(json.dumps({"run-id": run_id, "started": time.time()}, indent=2))
    report(f"started run {run_id} (app {cfg.server.app}); waiting for {cfg.federation.rounds} round(s)")
    return run_id


def _run_status(run_id: str, home: Path) -> str:
    out = _flwr_json(["list", "--run-id", run_id, CONNECTION], flwr_home=home)
    for run in out.get("runs", []) if out.get("success") else []:
        if str(run.get("run-id")) == run_id:
            return str(run.get("status", ""))
    return ""


def _save_serverapp_log(run_id: str, *, home: Path, run_dir: Path, timeout: float = 60.0) -> Path | None:
    """Append the ServerApp's own log (what ``flwr log RUN_ID --show`` prints) to
    ``RUN_DIR/logs/serverapp.log``; None when it could not be read.

    flwr-serverapp sends its output to the SuperLink, not to ``superlink.log``; once ``server
    start`` stops the SuperLink nobody can read it any more, so it is kept while it still can be.
    """
    try:
        done = subprocess.run(
            [flower_tool("flwr"), "log", run_id, CONNECTION, "--show"],
            capture_output=True, text=True, timeout=timeout, env=child_env({"FLWR_HOME": str(home)}), check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    path = run_dir / "logs" / "serverapp.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"# run {run_id}\n{done.stdout.rstrip()}\n")
    return path


def _watch_run(
    run_id: str,
    *,
    home: Path,
    superlink: subprocess.Popen[bytes],
    signals: StopSignals,
    report: Report,
    run_dir: Path,
    poll: float = 5.0,
) -> int:
    family: list[int] = []
    while True:
        if superlink.poll() is not None:
            # What the SuperLink had started (flower-superexec, the ServerApp) is orphaned now:
            # stop it, so that no ServerApp of this run writes to the run folder after a resume.
            signal_all(family, signal.SIGKILL)
            report(f"flower-superlink exited with code {superlink.returncode}; restart with --resume")
            return 1
        family = descendants(superlink.pid)
        status = _run_status(run_id, home)
        if status.startswith("finished"):
            saved = _save_serverapp_log(run_id, home=home, run_dir=run_dir)
            if saved is not None:
                report(f"ServerApp log: {saved}")
            ok = status == "finished:completed" and (run_dir / "model" / "signature.json").exists()
            report(f"run {run_id} {status}; model: {run_dir / 'model'}" if ok else f"run {run_id} {status}")
            return 0 if ok else 1
        signals.sleep(poll)


# --------------------------------------------------------------------------- partner


@dataclass(frozen=True)
class PartnerCheck:
    """What ``fedpersona partner check`` found (everything it printed, as data)."""

    config: PartnerConfig
    rows: int
    train_rows: int
    public_rows: int
    features: int
    noise_multiplier: float | None
    planned_rounds: int | None
    epsilon_per_round: tuple[float, ...]
    plan_source: str


def check_partner(
    config: str | Path,
    *,
    ca: str | Path,
    key: str | Path,
    rounds: int | None = None,
    training: TrainingSettings | None = None,
    kmeans_rounds: int | None = None,
) -> PartnerCheck:
    """Validate everything a partner will use before anything connects; raise once with all problems.

    The privacy plan is the one :func:`fedpersona.privacy.planner.plan_rows` computes: ``rounds`` DP-SGD
    rounds, then ``kmeans_rounds`` persona-clustering rounds (default: the federation default;
    0 = none), whose reserve the noise is planned around; the last epsilon is after clustering.
    """
    from fedpersona.federation.partner import load_partner_data, public_rows_of
    from fedpersona.privacy.planner import epsilon_schedule, make_plan

    cfg = load_partner_config(config)
    problems: list[str] = []
    ca, key = Path(ca), Path(key)
    try:
        from cryptography import x509

        x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError) as exc:
        problems.append(f"{ca}: not the federation's CA certificate (PEM) ({exc})")
    try:
        _load_node_private_key(key)
    except ConfigError as exc:
        problems.append(str(exc))
    state = Path(cfg.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        problems.append(f"partner.state_dir {state} is not writable ({exc})")
    if problems:
        raise ConfigError("; ".join(problems))
    data = load_partner_data(cfg)  # schema validation: raises SchemaError listing every problem
    declared = public_rows_of(cfg, data)  # a private partner with a table must declare public_rows
    training = training or TrainingSettings()
    fixed = load_plan(state)  # the plan is fixed at the first round and never re-made
    planned: int | None
    if fixed is not None:
        planned, sigma, source = fixed.planned_rounds, fixed.noise_multiplier, f"fixed in {state / 'plan.json'}"
        eps: list[float] = epsilon_schedule(fixed)
    else:
        planned = cfg.privacy.planned_rounds or rounds
        source = "planned now (fixed at the first round)"
        sigma, eps = None, []
        if planned is not None:
            fed = FederationSettings()  # the coordinator's defaults unless told otherwise
            releases = fed.kmeans_releases if kmeans_rounds is None else kmeans_rounds
            plan = make_plan(
                privacy=cfg.privacy, training=training, public_rows=declared, rounds=planned,
                kmeans_rounds=releases, kmeans_noise=fed.kmeans_noise if releases else None,
            )  # fmt: skip
            sigma, eps = plan.noise_multiplier, epsilon_schedule(plan)
    return PartnerCheck(
        config=cfg,
        rows=len(data.table),
        train_rows=len(data.train),
        public_rows=declared,
        features=len(data.schema.features),
        noise_multiplier=sigma,
        planned_rounds=planned,
        epsilon_per_round=tuple(eps),
        plan_source=source,
    )


def supernode_command(
    *,
    config: str | Path,
    superlink: str,
    ca: str | Path,
    key: str | Path,
    runtime_port: int = 9094,
    max_wait_time: float = 600.0,
    model_key: str | Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line of a partner (``model_key``: the federation's
    model-signing public key, which verifies the final model the server sends)."""
    paths = {"client-config": str(Path(config).resolve())}
    if model_key is not None:
        paths["model-public-key"] = str(Path(model_key).resolve())
    for path in paths.values():
        if '"' in path or "\\" in path:
            raise ConfigError(f"the paths in the node config must not contain quotes or backslashes: {path}")
    node_config = " ".join(f'{key}="{path}"' for key, path in paths.items())
    return [
        flower_tool("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(Path(ca).resolve()),
        "--auth-supernode-private-key", str(Path(key).resolve()),
        "--max-wait-time", f"{max_wait_time:g}",
        "--port", str(runtime_port),
        "--node-config", node_config,
    ]  # fmt: skip


def start_partner(
    config: str | Path,
    *,
    superlink: str,
    ca: str | Path,
    key: str | Path,
    runtime_port: int = 9094,
    max_wait_time: float = 600.0,
    max_restarts: int = 10,
    model_key: str | Path | None = None,
    report: Report = logger.info,
) -> int:
    """Check, then run flower-supernode, restarting it (bounded backoff) when it gives up.

    ``model_key`` (the federation's ``model-signing.pub``) lets the partner verify and install
    the final model the server sends at the end of the run; without it the partner refuses it.
    """
    check = check_partner(config, ca=ca, key=key)
    cfg = check.config
    if model_key is not None:
        from fedpersona.deploy.certs import load_signing_public_key

        load_signing_public_key(model_key)  # a ConfigError now rather than a refused model later
    else:
        report(
            f"partner {cfg.name}: no model-signing.pub given; the final model the server sends will not be "
            "installed (fetch it from the registry instead)"
        )
    log = Path(cfg.state_dir) / "logs" / "supernode.log"
    cmd = supernode_command(
        config=config, superlink=superlink, ca=ca, key=key, runtime_port=runtime_port,
        max_wait_time=max_wait_time, model_key=model_key,
    )  # fmt: skip
    supervisor = ProcessSupervisor()
    with StopSignals() as signals:
        try:
            for attempt in range(max_restarts + 1):
                # FLWR_HOME: the app bundles the SuperNode installs stay in the partner's state folder.
                proc = supervisor.start(cmd, log=log, env={"FLWR_HOME": str(Path(cfg.state_dir) / "flwr-home")})
                report(f"partner {cfg.name}: flower-supernode pid {proc.pid} -> {superlink}; log {log}")
                while proc.poll() is None:
                    signals.sleep(1.0)
                supervisor.stop(proc)
                supervisor.procs = [(p, h) for p, h in supervisor.procs if p is not proc]
                if attempt == max_restarts:
                    break
                delay = min(300.0, 5.0 * 2**attempt)
                report(f"flower-supernode exited with code {proc.returncode}; restarting in {delay:.0f}s")
                signals.sleep(delay)
            report(f"giving up after {max_restarts + 1} start(s); see {log}")
            return 1
        except Stopped as stop:
            report(f"received {stop}; stopping flower-supernode")
            return 130
        finally:
            supervisor.stop_all()
