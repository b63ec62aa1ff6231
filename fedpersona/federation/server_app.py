"""The Flower ServerApp: glue between Flower's Grid and one federation run.

Per run: a ``query`` message asks every partner for its kind, schema fingerprint, declared row
count and noise plan (:mod:`fedpersona.federation.roster`); then, per round, ``train`` messages
carry each partner's view of the global model (trunk + its slot's adapter), replies are
screened and aggregated by scope (:mod:`fedpersona.federation.rounds`), and ``evaluate``
messages collect the cumulative epsilon (and, where a partner opted in, its held-out metrics).
A partner that replies with an error (e.g. its budget is spent) is logged and dropped; the run
goes on while ``min_partners`` remain. Persona clustering follows the one schedule of
:class:`~fedpersona.personas.protocol.PersonaRun` per slot; the end of the run writes privacy.json,
run.json and the signed model (:mod:`fedpersona.federation.publishing`). A run that trained
nothing publishes nothing and fails with the reason.

With ``secure_aggregation = true`` each round's ``train`` exchange (and each persona
release) becomes the four exchanges of :mod:`fedpersona.federation.secagg`, and the server
sees only sums. A round that loses too many partners to unmask aborts: the server logs why,
stops, and publishes no model of it.

**Checkpoint and resume.** After every aggregation (each training round, each persona
round) and at each later stage the server writes ``RUN_DIR/state/checkpoint.npz``
(:mod:`fedpersona.federation.checkpoint`). With ``resume`` a new run loads it, readmits the
partners of the checkpoint by node id (a node id stands for a registered key) and asks them
for their ledger's epsilon, asks any other node who it is (``query``; a known name keeps its
slot and history) and continues at the *next* round: a round whose aggregate is in the
checkpoint is never sent again, so no partner trains it twice. A round that was sent but not
aggregated before the crash is sent again on resume; the partner trains it again and its
ledger charges it again (a new release with fresh noise is a new mechanism run; the first one
stays charged although the server never used it).

**Partners that drop out and come back.** A partner whose reply is an error the SuperLink made
(its node stopped sending heartbeats, the message expired) or an unexpected failure is left
out and, once its node is online again, asked ``query`` at the start of a later round and
admitted again with its slot, receiving the current global model. A partner that refused (its
budget, its data, its policy) or whose reply was rejected stays out for the rest of the run.
A partner that trained but whose reply never arrived within ``round_timeout`` is not in that
round's aggregate; its ledger counts the round anyway, and the epsilon the server reports for
it comes from the partner's next reply, so it includes that round. Each evaluation row in
metrics.jsonl says whether the partner's update is in that round's aggregate (``aggregated``).

**The final model reaches every partner.** In a deployment (``deliver_model``) the signed
artifact is sent to every connected partner in a ``query.final_model`` message; the partner
verifies it against the federation's model-signing key and installs it in
``state_dir/model`` (:func:`fedpersona.model.artifacts.install_model`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedpersona.config.files import load_scenario
from fedpersona.config.settings import FederationConfig, FederationSettings, ModelSettings, TrainingSettings
from fedpersona.errors import ConfigError
from fedpersona.federation import publishing, roster, rounds, run_log
from fedpersona.federation.aggregation import ScopedAggregator
from fedpersona.federation.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    load_checkpoint,
    run_settings,
    save_checkpoint,
    settings_fingerprint,
)
from fedpersona.federation.messages import encode_settings
from fedpersona.federation.publishing import NothingTrained
from fedpersona.federation.roster import Member
from fedpersona.federation.secagg import SecureAggregationError

__all__ = [
    "FederationResult",
    "NothingTrained",
    "ServerSettings",
    "app",
    "build_server_app",
    "run_federation",
    "server_settings",
]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class ServerSettings:
    """Everything the coordinator needs for one run."""

    federation: FederationSettings
    model: ModelSettings
    training: TrainingSettings
    run_dir: str
    expected_partners: int | None = None
    wait_timeout: float = 120.0  # the admission window (roster.AdmissionWindow) ...
    wait_extension: float = 120.0  # ... extended this long after each partner that arrives ...
    max_wait: float = 3600.0  # ... up to this many seconds in all
    progress_every: float = 30.0  # seconds between "k of n partners connected" lines
    resume: bool = False  # continue from RUN_DIR/state/checkpoint.npz
    deliver_model: bool = False  # send the signed final model to every partner (deployments)
    # The federation's model-signing key (a deployment: CREDENTIALS/model-signing.key, never
    # copied into the run folder); None: the run makes its own in RUN_DIR/keys (a simulation).
    signing_key: str | None = None

    @property
    def admission(self) -> roster.AdmissionWindow:
        return roster.AdmissionWindow(
            initial=self.wait_timeout, extension=self.wait_extension,
            maximum=max(self.max_wait, self.wait_timeout), progress_every=self.progress_every,
        )  # fmt: skip


def server_settings(cfg: FederationConfig, *, run_dir: str | None = None, resume: bool = False) -> ServerSettings:
    """The settings a coordinator's federation.toml describes (a deployment delivers the model)."""
    return ServerSettings(
        federation=cfg.federation,
        model=cfg.model,
        training=cfg.training,
        run_dir=run_dir or str(cfg.run_dir),
        expected_partners=cfg.server.expected_partners,
        wait_timeout=cfg.server.wait_timeout,
        wait_extension=cfg.server.wait_extension,
        max_wait=cfg.server.max_wait,
        progress_every=cfg.server.progress_every,
        resume=resume,
        deliver_model=True,
        signing_key=str(cfg.credentials / "model-signing.key"),
    )


@dataclass
class FederationResult:
    rounds_completed: int
    partners: dict[str, dict[str, Any]] = field(default_factory=dict)
    aborted: str = ""  # why a securely aggregated round aborted, if one did
    resumed_after: int | None = None  # the last round of the checkpoint a resumed run started from
    rounds_run: list[int] = field(default_factory=list)  # training rounds this run aggregated
    delivered: list[str] = field(default_factory=list)  # partners that installed the final model


def _initial_trunk(model: ModelSettings, seed: int) -> dict[str, Any]:
    """The global parameters every partner starts from: none for the label model (all of it is
    scoped to a slot), the encoder's trunk otherwise."""
    if model.architecture == "linear":
        return {}
    import torch

    from fedpersona.model.encoder import PersonaTrunk

    torch.manual_seed(seed)
    trunk = PersonaTrunk(model)
    return {f"trunk.{k}": v.detach().cpu().numpy() for k, v in trunk.state_dict().items()}


def _resume_point(run_dir: Path, settings: ServerSettings) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (validated), or None to start at round 1."""
    path = run_dir / CHECKPOINT
    if not settings.resume:
        if path.exists():
            raise ConfigError(
                f"{run_dir} holds the checkpoint of an earlier run ({path}); resume it "
                "(fedpersona server start --resume) or choose another run folder"
            )
        return None
    checkpoint = load_checkpoint(run_dir, settings=(settings.federation, settings.model, settings.training))
    if checkpoint is None:
        logger.warning("resume: %s has no checkpoint (no round was aggregated); starting at round 1", run_dir)
    return checkpoint


class _Run:
    """One federation run's state and its stages (admission, training, clustering, finish)."""

    def __init__(
        self, grid: Grid, settings: ServerSettings, on_round: RoundCallback | None, clock: roster.Clock | None = None
    ) -> None:
        self.grid, self.settings, self.on_round = grid, settings, on_round
        self.clock = clock or roster.Clock()
        self.fed = settings.federation
        self.run_dir = Path(settings.run_dir)
        if settings.signing_key and not Path(settings.signing_key).exists():  # refuse now, not after the rounds
            raise ConfigError(
                f"{settings.signing_key}: the federation's model-signing key does not exist, so no model of this "
                "run could be signed; server.credentials must name the folder `fedpersona certs init` wrote"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.aggregator = ScopedAggregator(
            optimizer=self.fed.server_optimizer, lr=self.fed.server_lr, global_weighting=self.fed.global_weighting,
            robust=self.fed.robust_aggregation, trim_fraction=self.fed.trim_fraction,
            max_update_norm=self.fed.max_update_norm,
        )  # fmt: skip
        self.roster: dict[str, Member] = {}  # every partner of the federation, by name
        self.partners: dict[int, Member] = {}  # the partners connected to this run, by node id
        self.refused: dict[int, str] = {}  # node -> why it stays out of this run
        self.resumed_after: int | None = None
        self.rounds_run: list[int] = []
        self.aborted = ""  # why a securely aggregated round aborted, if one did
        self.stopped = ""  # why the training rounds stopped early, if they did
        self.checkpoint = self._load_or_start(_resume_point(self.run_dir, settings))
        self.completed = self.checkpoint.round

    def config(self, **extra: Any) -> ConfigRecord:
        return encode_settings(
            self.settings.model, self.settings.training, num_rounds=self.fed.rounds, seed=self.fed.seed,
            persona_releases=self.fed.persona_releases, persona_share=float(self.fed.persona_share),
            baseline=bool(self.fed.baseline), **extra,
        )  # fmt: skip

    def _load_or_start(self, checkpoint: Checkpoint | None) -> Checkpoint:
        fed, model, training = self.fed, self.settings.model, self.settings.training
        if checkpoint is None:
            self.aggregator.trunk = _initial_trunk(model, fed.seed)
            return Checkpoint(
                fingerprint=settings_fingerprint(fed, model, training), settings=run_settings(fed, model, training)
            )
        try:
            self.aggregator.set_state(checkpoint.arrays)
            self.roster = {name: Member.from_dict(data) for name, data in checkpoint.partners.items()}
        except (KeyError, TypeError, ValueError) as exc:
            path = self.run_dir / CHECKPOINT
            raise ConfigError(
                f"{path} is damaged and cannot be resumed ({exc}); move it away to start at round 1"
            ) from None
        for p in self.roster.values():
            p.active = False  # until it answers this run
        self.resumed_after = checkpoint.round
        logger.info(
            "resuming %s from its checkpoint: stage %s, %d round(s) aggregated, %d partner(s)",
            self.run_dir, checkpoint.stage, checkpoint.round, len(self.roster),
        )  # fmt: skip
        return checkpoint

    def save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.checkpoint, key, value)
        self.checkpoint.arrays = self.aggregator.get_state()
        self.checkpoint.partners = {name: p.to_dict() for name, p in self.roster.items()}
        save_checkpoint(self.run_dir, self.checkpoint)

    def admit_everyone(self) -> None:
        """Wait for the partners, readmit the checkpoint's by node id, ask the others."""
        want = self.settings.expected_partners or self.fed.min_partners
        window = self.settings.admission
        arrived = roster.wait_for_nodes(self.grid, want, window, clock=self.clock)
        nodes = arrived.nodes
        if len(nodes) < self.fed.min_partners:
            raise ConfigError(
                f"only {len(nodes)} of {want} partner(s) connected after waiting {arrived.waited:.0f}s "
                f"(server.wait_timeout {window.initial:g}s, extended by server.wait_extension "
                f"{window.extension:g}s after each arrival, at most server.max_wait {window.maximum:g}s); "
                f"federation.min_partners is {self.fed.min_partners}. Check that the missing partners run "
                "`fedpersona partner start` (their logs/supernode.log says why they cannot connect), or raise "
                "server.wait_timeout"
            )
        if len(nodes) < want:
            logger.warning(
                "starting with %d of %d expected partner(s) after %.0fs (federation.min_partners is %d)",
                len(nodes), want, arrived.waited, self.fed.min_partners,
            )  # fmt: skip
        fresh, known = not self.roster, set(self.roster)
        # A node id is a registered key, so a node of the checkpoint is that partner; it is
        # readmitted (or kept out) as the checkpoint says. Others are asked who they are.
        by_node = {p.node_id: p for p in self.roster.values()}
        for node in [n for n in nodes if n in by_node]:
            p = by_node[node]
            p.active = p.rejoinable or not p.dropped_reason
            if p.active:
                p.rejoinable, p.dropped_reason = False, ""
            self.partners[node] = p
        if self.partners:  # their epsilon as their ledgers hold it now, not as the checkpoint says
            roster.ask_status(self.grid, self.partners, list(self.partners), self.fed.round_timeout, self.completed)
        unknown = [n for n in nodes if n not in by_node]
        admitted = (
            roster.admit(
                self.grid, unknown, self.partners, self.roster, self.refused, self.config, self.fed.round_timeout, "0"
            )
            if unknown
            else []
        )
        if fresh:
            roster.assign_slots(self.partners)
        else:
            for p in admitted:
                if p.info["name"] not in known:
                    roster.newcomer_slot(p, self.roster)

    def _due(self, rnd: int) -> bool:
        """Evaluation costs every partner a message: every ``evaluate_every``-th round and the last."""
        return rnd == self.fed.rounds or rnd % self.fed.evaluate_every == 0

    def _evaluate(self, rnd: int, used: set[str]) -> None:
        rows = rounds.evaluate(
            self.grid, self.aggregator, self.partners, rnd, self.config, used, self.fed.round_timeout
        )
        self._append_metrics(rows)
        self.save(evaluated=True)
        if self.on_round is not None:
            self.on_round(rnd, rows)

    def _append_metrics(self, rows: list[dict[str, Any]]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    def train(self) -> None:
        """The training rounds not yet in the checkpoint."""
        checkpoint, fed = self.checkpoint, self.fed
        if checkpoint.stage == "train" and self.completed and not checkpoint.evaluated and self._due(self.completed):
            self._evaluate(self.completed, set(checkpoint.extra.get("aggregated", [])))  # the crash came before it
        first = self.completed + 1 if checkpoint.stage == "train" else fed.rounds + 1
        for rnd in range(first, fed.rounds + 1):
            if rnd > first:
                roster.rejoin(self.grid, self.partners, self.roster, self.refused, self.config, fed, rnd)
            active = {n: p for n, p in self.partners.items() if p.active}
            if len(active) < fed.min_partners:
                self.stopped = (
                    f"round {rnd} not started: {len(active)} partner(s) left, federation.min_partners is "
                    f"{fed.min_partners}{roster.refusals(self.roster, self.refused)}"
                )
                logger.error("%s", self.stopped)
                return
            logger.info(
                "round %d of %d: training with %d partner(s): %s",
                rnd, fed.rounds, len(active), ", ".join(roster.names(active)),
            )  # fmt: skip
            try:
                updates = (rounds.train_secure if fed.secure_aggregation else rounds.train_plain)(
                    self.grid, self.aggregator, self.partners, active, rnd, self.config, fed
                )
            except SecureAggregationError as exc:
                self.aborted = str(exc)
                logger.error("round %d: %s; stopping", rnd, self.aborted)
                return
            if not updates:
                self.stopped = f"round {rnd}: no partner replied{roster.refusals(self.roster, self.refused)}"
                logger.error("%s; stopping", self.stopped)
                return
            self.aggregator.aggregate(updates)
            # With secure aggregation the sums name no partner: those still in the round are in them.
            used = {u.partner for u in updates} if not fed.secure_aggregation else set(roster.names(active))
            self.completed = rnd
            self.rounds_run.append(rnd)
            _log_round(rnd, fed.rounds, active, used)
            extra = {**checkpoint.extra, "aggregated": sorted(used)}
            self.save(stage="train", round=rnd, evaluated=False, extra=extra)
            if self._due(rnd):
                self._evaluate(rnd, used)

    def cluster(self) -> dict[str, Any] | None:
        """Persona clustering (when asked for and not yet done), then the partners' cards."""
        personas: dict[str, Any] | None = self.checkpoint.personas
        if self.fed.personas > 0 and self.completed and self.checkpoint.stage in ("train", "personas"):
            personas = rounds.cluster_personas(
                self.grid, self.partners, self.fed, self.config, checkpoint=self.checkpoint, save=self.save
            )
            if personas is not None:
                self.save(stage="clustered", personas=personas)
        if personas is not None and self.checkpoint.stage != "done":
            rows = rounds.persona_metrics(
                self.grid, self.partners, personas, self.completed, self.config, self.fed.round_timeout
            )
            self._append_metrics(rows)
            tmp = self.run_dir / "personas.json.tmp"
            tmp.write_text(json.dumps({k: v for k, v in personas.items() if k != "slots"}, indent=2))
            tmp.replace(self.run_dir / "personas.json")
        return personas

    def finish(self, personas: dict[str, Any] | None) -> list[str]:
        """privacy.json, run.json, the signed model (or nothing, when nothing was trained), and
        the model's delivery to every partner in a deployment."""
        if self.checkpoint.stage != "done":
            online = set(self.grid.get_node_ids())
            reachable = [
                n for n, p in self.partners.items()
                if n in online and not p.dropped_reason.startswith("reply rejected")
            ]  # fmt: skip
            reason = self.aborted or self.stopped or "no training round completed"
            if reachable:
                roster.ask_status(
                    self.grid, self.partners, reachable, self.fed.round_timeout, self.completed,
                    ended=None if self.completed else f"nothing was trained, no model is published: {reason}",
                )  # fmt: skip
            publishing.write_privacy(self.run_dir, self.roster)
            if not self.completed:
                # An empty model would replace a good one wherever it is installed.
                publishing.write_outcome(self.run_dir, status="failed", reason=reason, rounds=0, personas=False)
                logger.error("no round completed (%s); nothing is published", reason)
                raise NothingTrained(f"the federation trained nothing, so no model was published: {reason}")
            signing_key = Path(self.settings.signing_key) if self.settings.signing_key else None
            publishing.publish(
                self.run_dir, self.aggregator, self.roster, self.settings.model, self.completed, personas,
                signing_key=signing_key,
            )  # fmt: skip
            self.save(stage="done")
            publishing.write_outcome(
                self.run_dir, status="completed", reason=self.stopped, rounds=self.completed,
                personas=personas is not None,
            )  # fmt: skip
        if not (self.settings.deliver_model and (self.run_dir / "model" / "signature.json").exists()):
            return []
        roster.rejoin(self.grid, self.partners, self.roster, self.refused, self.config, self.fed, self.completed)
        return publishing.deliver_model(
            self.grid, self.partners, self.run_dir / "model", self.fed.round_timeout, self.completed
        )


def _log_round(rnd: int, total: int, active: dict[int, Member], used: set[str]) -> None:
    """``round 2 of 5 aggregated: 2 of 3 partner(s) replied: shop-1 (epsilon 1.20), ...; no reply: x``."""

    def who(p: Member) -> str:
        name = str(p.info["name"])
        return f"{name} (epsilon {p.epsilon:.4g})" if p.epsilon is not None else name

    replied = [who(p) for p in active.values() if p.info["name"] in used]
    missing = sorted(str(p.info["name"]) for p in active.values() if p.info["name"] not in used)
    logger.info(
        "round %d of %d aggregated: %d of %d partner(s) replied: %s%s",
        rnd, total, len(replied), len(active), ", ".join(replied),
        f"; no reply: {', '.join(missing)}" if missing else "",
    )  # fmt: skip


def _log_end(run: _Run, delivered: list[str]) -> None:
    model = run.run_dir / "model"
    logger.info(
        "run finished: %d of %d round(s) aggregated%s; model %s%s",
        run.completed, run.fed.rounds, f" ({run.stopped})" if run.stopped else "", model,
        f"; installed at {len(delivered)} partner(s): {', '.join(sorted(delivered))}"
        if run.settings.deliver_model else "",
    )  # fmt: skip


def run_federation(
    grid: Grid, settings: ServerSettings, *, on_round: RoundCallback | None = None, clock: roster.Clock | None = None
) -> FederationResult:
    """Run (or, with ``settings.resume``, continue) the federation; writes metrics.jsonl,
    privacy.json, run.json, model/ and state/checkpoint.npz in run_dir. ``clock``: where the
    wait for partners reads the time and sleeps (default: the system's)."""
    run = _Run(grid, settings, on_round, clock)
    run.admit_everyone()
    run.train()
    personas = run.cluster()
    delivered = run.finish(personas)
    _log_end(run, delivered)
    return FederationResult(
        rounds_completed=run.completed,
        partners={name: p.info for name, p in run.roster.items()},
        aborted=run.aborted,
        resumed_after=run.resumed_after,
        rounds_run=run.rounds_run,
        delivered=delivered,
    )


def forward_logs_to_flower() -> None:
    """Write fedpersona's log records (INFO and above) to stderr in a deployed ServerApp.

    flwr-serverapp mirrors what its process writes to stdout/stderr to the SuperLink (shown by
    ``flwr log RUN_ID``; ``server start`` copies it to ``RUN_DIR/logs/serverapp.log`` when the
    run finishes; the SuperExec itself starts the ServerApp with its output suppressed, so
    nothing reaches ``superlink.log``). Without a handler, Python's fallback prints only WARNING
    and above, so the rounds, the chosen K and who installed the final model were never seen.
    Idempotent; the records do not also propagate to the root logger (no duplicates).
    """
    log = logging.getLogger("fedpersona")
    if any(getattr(h, "fedpersona_forward", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.fedpersona_forward = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def build_server_app(settings: ServerSettings | None = None, *, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp; without ``settings`` it reads ``federation-config`` (``fedpersona server
    start``) or ``scenario`` and ``run-dir`` from the run config."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nonlocal settings
        if settings is None and context.run_config.get("federation-config"):  # fedpersona server start
            from fedpersona.config.files import load_federation_config

            forward_logs_to_flower()
            federation = load_federation_config(str(context.run_config["federation-config"]))
            settings = server_settings(
                federation,
                run_dir=str(context.run_config["run-dir"]),
                resume=bool(context.run_config.get("resume", False)),
            )
            # `server start` prints this file's lines as they come (each round, who replied, the end).
            run_log.attach_log_file(Path(settings.run_dir) / run_log.FEDERATION_LOG)
        if settings is None:
            scenario = load_scenario(str(context.run_config["scenario"]))
            settings = ServerSettings(
                federation=scenario.federation,
                model=scenario.model,
                training=scenario.training,
                run_dir=str(context.run_config.get("run-dir", "runs/flwr")),
            )
        run_federation(grid, settings, on_round=on_round)

    return server


app = build_server_app()
