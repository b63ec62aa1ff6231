"""The coordinator on Flower's Deployment Engine: a SuperLink, registered partners, one run.

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

The partner's side is :mod:`fedpersona.deploy.partner_site`. The coordinator logs to files,
and on SIGINT/SIGTERM terminates every process it started (and those processes' children),
waiting a bounded time before killing.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedpersona.config.files import load_federation_config
from fedpersona.config.settings import FederationConfig
from fedpersona.deploy.certs import load_node_public_key
from fedpersona.deploy.processes import (
    ProcessSupervisor,
    Stopped,
    StopSignals,
    child_env,
    descendants,
    flower_tool,
    signal_all,
    strip_ansi,
    wait_port,
)
from fedpersona.errors import ConfigError, FedPersonaError
from fedpersona.federation.run_log import FEDERATION_LOG, LogFollower

__all__ = ["check_resume", "stage_app", "start_server", "superlink_command"]

logger = logging.getLogger(__name__)

CONNECTION = "fedpersona"  # the SuperLink connection name in RUN_DIR/flwr-home/config.toml
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
    return f"training done; the personas continue ({checkpoint.stage}, {checkpoint.persona_done} persona releases done)"


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


def _install_public_key(credentials: Path, run_dir: Path) -> Path:
    """Put the federation's model-signing *public* key in RUN_DIR/keys/model-signing.pub, the
    key the run's models verify against. The private key stays in the credentials folder: the
    ServerApp signs with it there (``federation-config`` names that folder), so no run folder
    holds a copy of it."""
    from cryptography.hazmat.primitives import serialization

    source = credentials / "model-signing.key"
    try:
        key = serialization.load_pem_private_key(source.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"{source} does not exist; create the credentials with `fedpersona certs init`") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: not the federation's model-signing key ({exc})") from None
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    target = run_dir / "keys" / "model-signing.pub"
    if target.exists():
        if target.read_bytes() != public:
            raise ConfigError(
                f"{target} is not the public half of the federation's signing key {source}; models of this "
                "run folder would not verify against the key partners hold. Use another server.run_dir."
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(public)
    return target


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
        key = Path(p.public_key)
        if not key.exists():
            # The folder the keys go in is made here, so the operator only copies the file.
            key.parent.mkdir(parents=True, exist_ok=True)
            problems.append(
                f"partner {p.name}: {key} does not exist; copy the {key.name} the partner made with "
                f"`fedpersona certs partner {p.name}` into {key.parent}"
            )
            continue
        try:
            load_node_public_key(key)
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
    _install_public_key(cfg.credentials, run_dir)
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
            progress = LogFollower(run_dir / FEDERATION_LOG)  # from its end: a resumed run's old lines stay
            run_id = _start_run(cfg, home=home, config=Path(cfg.source), report=report, resume=resume)
            return _watch_run(
                run_id, home=home, superlink=superlink, signals=signals, report=report, run_dir=run_dir,
                progress=progress,
            )  # fmt: skip
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
        plain = strip_ansi(done.stdout.encode()).decode("utf-8", "replace")  # Flower colours its levels
        handle.write(f"# run {run_id}\n{plain.rstrip()}\n")
    return path


def _watch_run(
    run_id: str,
    *,
    home: Path,
    superlink: subprocess.Popen[bytes],
    signals: StopSignals,
    report: Report,
    run_dir: Path,
    progress: LogFollower | None = None,
    poll: float = 5.0,
) -> int:
    """Wait for the run to finish, printing the ServerApp's progress (RUN_DIR/logs/federation.log:
    each round, who replied, the end) as it comes; the exit code says how the run ended."""
    family: list[int] = []
    while True:
        for line in progress.new_lines() if progress is not None else []:
            report(line)
        if superlink.poll() is not None:
            # What the SuperLink had started (flower-superexec, the ServerApp) is orphaned now:
            # stop it, so that no ServerApp of this run writes to the run folder after a resume.
            signal_all(family, signal.SIGKILL)
            report(f"flower-superlink exited with code {superlink.returncode}; restart with --resume")
            return 1
        family = descendants(superlink.pid)
        status = _run_status(run_id, home)
        if status.startswith("finished"):
            for line in progress.new_lines() if progress is not None else []:
                report(line)
            saved = _save_serverapp_log(run_id, home=home, run_dir=run_dir)
            if saved is not None:
                report(f"ServerApp log: {saved}")
            ok = status == "finished:completed" and (run_dir / "model" / "signature.json").exists()
            report(f"run {run_id} {status}; model: {run_dir / 'model'}" if ok else f"run {run_id} {status}")
            return 0 if ok else 1
        signals.sleep(poll)


# --------------------------------------------------------------------------- partner
