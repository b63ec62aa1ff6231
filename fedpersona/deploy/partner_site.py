"""A partner site on Flower's Deployment Engine: check everything, then run a SuperNode.

``fedpersona partner check`` validates the data against the schema, the declared row count,
the privacy plan and the credentials, and connects to nothing. ``fedpersona partner start``
does the same, then runs::

    flower-supernode --superlink HOST:PORT --root-certificates CA
                     --auth-supernode-private-key KEY --max-wait-time W --port RUNTIME_PORT
                     --node-config 'client-config="/abs/client.toml"'

flower-supernode retries a lost SuperLink itself (for up to ``W`` seconds); if it gives up,
fedpersona restarts it with a bounded exponential backoff and says why it waits (the SuperLink
does not answer). A SuperNode serves runs until it is stopped (Flower has no "federation over"
signal for it), so fedpersona ends it: once the run has finished (the partner received the
final model, ``run finished`` in ``state_dir/logs/activity.log``) and the SuperLink has stopped
answering, flower-supernode is stopped and ``partner start`` exits 0. The partner's activity
log (each message answered, the epsilon after it) is printed as it grows. On SIGINT/SIGTERM
it stops every process it started, waiting a bounded time before killing.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpersona.config.files import load_partner_config, load_plan
from fedpersona.config.settings import FederationSettings, PartnerConfig, TrainingSettings
from fedpersona.deploy.certs import load_node_private_key
from fedpersona.deploy.processes import ProcessSupervisor, Stopped, StopSignals, flower_tool
from fedpersona.errors import ConfigError
from fedpersona.federation.run_log import ACTIVITY_LOG, RUN_FINISHED, LogFollower

__all__ = [
    "PartnerCheck",
    "check_partner",
    "start_partner",
    "superlink_reachable",
    "supernode_command",
    "supervise_supernode",
]

logger = logging.getLogger(__name__)

Report = Callable[[str], None]


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
    epsilon_spent: float | None = None  # from the ledger; None: no ledger yet (or not private)
    rounds_spent: int = 0  # DP-SGD rounds the ledger holds
    next_round_epsilon: float | None = None  # what one more planned round would bring the ledger to

    def budget_text(self) -> str | None:
        """One line on the budget spent and whether another training round fits; None when
        nothing has been spent yet."""
        target = self.config.privacy.target_epsilon
        if self.epsilon_spent is None:
            return None
        line = (
            f"budget: epsilon {self.epsilon_spent:.4f} of {target:g} spent ({target - self.epsilon_spent:.4f} left) "
            f"over {self.rounds_spent} training round(s)"
            + (f" of {self.planned_rounds} planned" if self.planned_rounds else "")
        )
        if self.next_round_epsilon is not None and self.next_round_epsilon > target * (1 + 1e-9):
            why = (
                f"all {self.planned_rounds} planned round(s) are done"
                if math.isinf(self.next_round_epsilon)
                else f"it would reach epsilon {self.next_round_epsilon:.4f}"
            )
            line += (
                f"; ANOTHER TRAINING ROUND DOES NOT FIT ({why}): "
                "this partner will refuse to train in any further run. The budget is for the partner's "
                "lifetime; rehearse with `--rehearsal` (synthetic rows, a separate state folder), never with this one"
            )
        elif self.next_round_epsilon is not None:
            line += f"; the next training round would bring it to {self.next_round_epsilon:.4f}"
        return line


def check_partner(
    config: str | Path,
    *,
    ca: str | Path,
    key: str | Path,
    rounds: int | None = None,
    training: TrainingSettings | None = None,
    persona_releases: int | None = None,
) -> PartnerCheck:
    """Validate everything a partner will use before anything connects; raise once with all problems.

    The privacy plan is the one :func:`fedpersona.privacy.planner.plan_rows` computes: ``rounds`` DP-SGD
    rounds, then ``persona_releases`` persona releases (default: the federation default;
    0 = none), whose share of the budget the noise is planned around; the last epsilon is after them.
    """
    from fedpersona.federation.partner import load_partner_data, public_rows_of
    from fedpersona.privacy.ledger import PrivacyLedger
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
        load_node_private_key(key)
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
            releases = fed.persona_releases if persona_releases is None else persona_releases
            plan = make_plan(
                privacy=cfg.privacy, training=training, public_rows=declared, rounds=planned,
                persona_releases=releases, persona_share=fed.persona_share,
            )  # fmt: skip
            sigma, eps = plan.noise_multiplier, epsilon_schedule(plan)
    spent: float | None = None
    done, following = 0, None
    if cfg.privacy.private and fixed is not None and (state / PrivacyLedger.FILE).exists():
        ledger = PrivacyLedger(state, settings=cfg.privacy)
        spent = ledger.epsilon()
        done = sum(1 for e in ledger.entries if e.mechanism == "dp-sgd")
        if fixed.noise_multiplier is not None:
            over = done >= fixed.planned_rounds
            following = (
                math.inf
                if over
                else ledger.would_reach(fixed.noise_multiplier, fixed.sample_rate, fixed.steps_per_round)
            )
    return PartnerCheck(
        epsilon_spent=spent,
        rounds_spent=done,
        next_round_epsilon=following,
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
    keep_running: bool = False,
    report: Report = logger.info,
) -> int:
    """Check, then run flower-supernode, restarting it (bounded backoff) when it gives up;
    it stops after the run unless ``keep_running`` (see :func:`supervise_supernode`).

    ``model_key`` (the federation's ``model-signing.pub``) lets the partner verify and install
    the final model the server sends at the end of the run; without it the partner refuses it.
    """
    check = check_partner(config, ca=ca, key=key)
    cfg = check.config
    budget = check.budget_text()
    if budget is not None:
        report(f"partner {cfg.name}: {budget}")
    if model_key is not None:
        from fedpersona.model.artifacts import load_signing_public_key

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
    with StopSignals() as signals:
        return supervise_supernode(
            cmd, log=log, activity=Path(cfg.state_dir) / ACTIVITY_LOG, superlink=superlink, name=cfg.name,
            env={"FLWR_HOME": str(Path(cfg.state_dir) / "flwr-home")},  # app bundles stay in the state folder
            max_wait_time=max_wait_time, max_restarts=max_restarts, report=report, wait=signals.sleep,
            stop_after_run=not keep_running,
        )  # fmt: skip


def superlink_reachable(address: str, *, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the SuperLink's ``HOST:PORT`` opens (nothing is sent)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def supervise_supernode(
    cmd: list[str],
    *,
    log: Path,
    activity: Path,
    superlink: str,
    name: str,
    env: dict[str, str] | None = None,
    max_wait_time: float = 600.0,
    max_restarts: int = 10,
    stop_after_run: bool = True,
    linger: float = 30.0,
    report: Report = logger.info,
    wait: Callable[[float], None] = time.sleep,
    reachable: Callable[[str], bool] = superlink_reachable,
    poll: float = 1.0,
    probe_every: float = 15.0,
) -> int:
    """Run flower-supernode until the federation is over; returns the exit code.

    Prints each line of the partner's activity log as it is written (each message answered,
    the epsilon after it, ``run finished``). Once the run has finished (the final model
    arrived), a SuperLink that stays unreachable for ``linger`` seconds means the coordinator
    has stopped: flower-supernode is stopped instead of retrying, and the exit code is 0.
    Before that, a flower-supernode that gave up reconnecting (after ``max_wait_time``) is
    restarted with a bounded backoff, and each restart says why it waits. With
    ``stop_after_run=False`` the SuperNode is kept (and restarted) for later runs.
    """
    supervisor = ProcessSupervisor()
    follower = LogFollower(activity)
    finished = False

    def relay() -> None:
        nonlocal finished
        for line in follower.new_lines():
            report(line)
            finished = finished or RUN_FINISHED in line

    try:
        for attempt in range(max_restarts + 1):
            proc = supervisor.start(cmd, log=log, env=env)
            report(f"partner {name}: flower-supernode pid {proc.pid} -> {superlink}; log {log}")
            gone_since: float | None = None
            waited, probed, was_up = 0.0, -math.inf, True
            while proc.poll() is None:
                wait(poll)
                waited += poll
                relay()
                if not (finished and stop_after_run):
                    if waited - probed >= probe_every:  # say why the SuperNode waits, when it changes
                        probed, up = waited, reachable(superlink)
                        if up != was_up:
                            report(
                                f"partner {name}: the SuperLink at {superlink} is reachable again" if up
                                else f"partner {name}: waiting for the SuperLink at {superlink}: it does not answer "
                                "(the coordinator has not started or has stopped, or a firewall or the address is "
                                f"wrong); flower-supernode keeps trying for up to {max_wait_time:g}s"
                            )  # fmt: skip
                        was_up = up
                    continue
                if reachable(superlink):
                    gone_since = None
                    continue
                gone_since = waited if gone_since is None else gone_since
                if waited - gone_since >= linger:
                    supervisor.stop_all()
                    report(
                        f"partner {name}: the run finished and the SuperLink at {superlink} has been unreachable "
                        f"for {linger:.0f}s (the coordinator stopped); flower-supernode stopped. Start "
                        "`fedpersona partner start` again for the next run"
                    )
                    return 0
            relay()
            supervisor.stop(proc)
            supervisor.procs = [(p, h) for p, h in supervisor.procs if p is not proc]
            if finished and stop_after_run:
                report(
                    f"partner {name}: the run finished and flower-supernode exited (code {proc.returncode}); "
                    "not restarting it. Start `fedpersona partner start` again for the next run"
                )
                return 0
            if attempt == max_restarts:
                break
            delay = min(300.0, 5.0 * 2**attempt)
            why = (
                f"the SuperLink at {superlink} is unreachable (the coordinator is not running yet, or a firewall "
                "or the address is wrong)"
                if not reachable(superlink)
                else f"see {log} for why"
            )
            report(
                f"partner {name}: flower-supernode exited with code {proc.returncode} after about "
                f"{waited:.0f}s; {why}; restarting in {delay:.0f}s (start {attempt + 2} of {max_restarts + 1}; "
                f"each start keeps trying for up to {max_wait_time:g}s)"
            )
            wait(delay)
        report(f"partner {name}: giving up after {max_restarts + 1} start(s); see {log}")
        return 1
    except Stopped as stop:
        report(f"received {stop}; stopping flower-supernode")
        return 130
    finally:
        supervisor.stop_all()
