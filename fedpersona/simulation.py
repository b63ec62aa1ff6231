"""``fedpersona simulate``: a whole federation on one machine with Flower's Simulation Engine.

The driver plays the owner of every silo (which is what a simulation is): it writes one
``client.toml`` per partner into ``DIR/partners/<name>/`` (synthetic partners generate their
own rows from a seed; a real dataset is split non-IID into one Parquet file per partner), then
runs the real ServerApp and ClientApp in process with Ray, so nothing touches the network and
nothing is installed per run. Everything is written under ``DIR``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpersona.config.files import dump_toml, load_scenario
from fedpersona.config.settings import Scenario, SiloGroup
from fedpersona.data.schema_reader import load_schema
from fedpersona.errors import ConfigError

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp import Grid

__all__ = [
    "PhaseCallback",
    "SimulationResult",
    "materialize_partners",
    "phase_text",
    "prepare_run_dir",
    "ray_init_args",
    "simulate",
]

logger = logging.getLogger(__name__)

DEFAULT_SCENARIO = "three_silos.toml"

#: ``on_phase(text)``: one line of progress (a stage began or ended, a partner answered).
PhaseCallback = Callable[[str], None]


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    privacy: dict[str, Any]
    seconds: float


def default_scenario_path() -> Path:
    """The packaged default scenario (also shipped as ``simulations/three_silos.toml``)."""
    from importlib.resources import files

    return Path(str(files("fedpersona") / "scenarios" / DEFAULT_SCENARIO))


def prepare_run_dir(out: str | Path | None) -> Path:
    """A fresh run folder; refuses one that already holds a run (nothing is overwritten)."""
    run_dir = Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"{run_dir} already exists and is not empty; choose another --out so that no earlier "
            "run (and no partner's privacy ledger) is overwritten"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _label_skew_split(labels: np.ndarray, parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Split row positions into ``parts`` with Dirichlet(alpha) label proportions (non-IID)."""
    out: list[list[int]] = [[] for _ in range(parts)]
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        shares = rng.dirichlet(np.full(parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for i, chunk in enumerate(np.split(rows, cuts)):
            out[i].extend(chunk.tolist())
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out]


def _partner_doc(
    name: str, kind: str, scenario: Scenario, data: dict[str, Any], privacy: dict[str, Any] | None
) -> dict[str, Any]:
    own = {**scenario.to_dict()["privacy"], **(privacy or {})}
    if scenario.simulation.reproducible_noise:
        # Every partner's DP keys from a seed the driver (here also the coordinator) knows:
        # reproducible, and labelled NOT private against the coordinator everywhere.
        own["noise_seed"] = noise_seed_for(scenario.federation.seed, name)
    return {
        "partner": {"name": name, "kind": kind, "state_dir": "state"},
        "data": {"test_fraction": scenario.simulation.test_fraction, **data},
        "privacy": own,
        "release": {"share_eval_metrics": scenario.simulation.share_eval_metrics},
    }


def noise_seed_for(seed: int, name: str) -> int:
    """The noise seed a ``reproducible_noise`` simulation gives partner ``name``."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:7], "little")


def materialize_partners(scenario: Scenario, run_dir: Path) -> list[str]:
    """Write each partner's client.toml (and data file); returns their paths in order."""
    from fedpersona.data.synthetic import partner_mixes
    from fedpersona.data.tables import read_frame, validate_frame

    paths: list[str] = []
    root = run_dir / "partners"
    for group in scenario.silos:
        rng = np.random.default_rng([scenario.federation.seed, group.seed, len(paths)])
        specs: list[tuple[str, dict[str, Any]]] = []
        if group.source == "synthetic":
            assert group.rows is not None
            mixes = partner_mixes(group.partners, alpha=group.non_iid_alpha, rng=rng)
            per = group.rows // group.partners
            for i in range(group.partners):
                specs.append(
                    (
                        f"{group.name}-{i + 1}",
                        {
                            "synthetic_rows": per,
                            "synthetic_seed": int(rng.integers(0, 2**31)),
                            "synthetic_mix": [float(x) for x in mixes[i]],
                        },
                    )
                )
            if group.small_partner_rows:
                specs.append(
                    (
                        f"{group.name}-small",
                        {
                            "synthetic_rows": group.small_partner_rows,
                            "synthetic_seed": int(rng.integers(0, 2**31)),
                        },
                    )
                )
        else:
            specs = _split_file(group, root, rng, read_frame, validate_frame, scenario.simulation.test_fraction)
        for name, data in specs:
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            doc = _partner_doc(name, group.kind, scenario, data, group.privacy)
            dump_toml(folder / "client.toml", doc)
            paths.append(str((folder / "client.toml").resolve()))
    (root / "index.json").write_text(json.dumps(paths, indent=2))
    return paths


def _split_file(
    group: SiloGroup,
    root: Path,
    rng: np.random.Generator,
    read_frame: Callable[..., Any],
    validate_frame: Callable[..., Any],
    test_fraction: float,
) -> list[tuple[str, dict[str, Any]]]:
    if group.schema_path is None:
        raise ConfigError(f"silo '{group.name}': a file source needs a schema")
    schema = load_schema(group.schema_path)
    frame = read_frame(schema, group.source)
    table = validate_frame(schema, frame, source=group.source)  # fail early, before any run
    n = len(table)
    order = rng.permutation(n)
    if group.rows is not None:
        order = order[: group.rows]
    specs = []
    if group.small_partner_rows:
        small, order = order[: group.small_partner_rows], order[group.small_partner_rows :]
        specs.append((f"{group.name}-small", small))
    if schema.labels:
        labels = table.labels[schema.labels[0].name][order]
        labels = np.nan_to_num(labels, nan=-1.0)
    else:
        labels = np.zeros(len(order))
    parts = _label_skew_split(labels, group.partners, group.non_iid_alpha, rng)
    specs = [(f"{group.name}-{i + 1}", order[p]) for i, p in enumerate(parts)] + specs
    out = []
    for name, rows in specs:
        if len(rows) < schema.min_rows:
            raise ConfigError(
                f"silo '{group.name}': partner {name} would get {len(rows)} rows, fewer than the "
                f"schema's min_rows {schema.min_rows}; raise non_iid_alpha or lower partners"
            )
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        part = frame.iloc[np.sort(rows)].reset_index(drop=True)
        part.to_parquet(folder / "data.parquet", index=False)
        declared = max(2, round(len(rows) * (1.0 - test_fraction)))  # the driver owns the split: its declaration
        out.append(
            (name, {"path": "data.parquet", "schema": str(Path(group.schema_path).resolve()), "public_rows": declared})
        )
    return out


def simulate(
    *,
    scenario_path: str | Path | None = None,
    rounds: int | None = None,
    epsilon: float | None = None,
    out: str | Path | None = None,
    on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
    on_start: Callable[[Scenario, Path, list[str]], None] | None = None,
    reproducible_noise: bool | None = None,
    ray_address: str | None = None,
    on_phase: PhaseCallback | None = None,
) -> SimulationResult:
    """Run a scenario end to end and return the final per-partner rows.

    ``reproducible_noise`` (when given) overrides ``[simulation] reproducible_noise``.
    ``ray_address`` attaches the simulation to a running Ray cluster (``ray start --head`` on
    one machine, ``ray start --address HEAD:6379`` on the others) instead of starting Ray on
    this machine, for federations larger than one machine: the partners' actors then run on
    every node, so fedpersona must be installed on each and the run folder must be on storage
    every node reads and writes at the same path (each partner's state and ledger live there).

    ``on_phase`` receives a line as each stage starts and ends (the engine's start, the
    partners' admission and planning, each round's training and evaluation, the persona
    releases), stamped with the seconds since the call.
    """
    started = time.monotonic()
    from flwr.simulation import run_simulation

    from fedpersona.federation.server_app import ServerSettings

    path = Path(scenario_path) if scenario_path else default_scenario_path()
    scenario = load_scenario(path, rounds=rounds, epsilon=epsilon)
    if reproducible_noise is not None:
        scenario = scenario.replace(simulation=scenario.simulation.replace(reproducible_noise=reproducible_noise))
    if scenario.federation.baseline is None:  # a simulation shows the honest baseline unless told not to
        scenario = scenario.replace(federation=scenario.federation.replace(baseline=True))
    run_dir = prepare_run_dir(out).resolve()
    try:
        dump_toml(run_dir / "config.toml", {"scenario": str(path), **scenario.to_dict()})
        partners = materialize_partners(scenario, run_dir)
    except Exception:
        _clean(run_dir)
        raise
    if on_start is not None:
        on_start(scenario, run_dir, partners)
    settings = ServerSettings(
        federation=scenario.federation,
        model=scenario.model,
        training=scenario.training,
        run_dir=str(run_dir),
        expected_partners=len(partners),
    )
    sim = scenario.simulation
    # Keep Ray's current behaviour explicitly (and quiet its notice about a future change).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend = {
        "client_resources": {"num_cpus": sim.cpus_per_partner, "num_gpus": sim.gpus_per_partner},
        "init_args": ray_init_args(ray_address),
    }
    flwr_logger = logging.getLogger("flwr")
    notice = _DeprecationNoticeFilter()
    flwr_logger.addFilter(notice)
    try:
        run_simulation(
            server_app=_server_app(settings, on_round=on_round, on_phase=on_phase, started=started),
            client_app=_client_app(str(run_dir)),
            num_supernodes=len(partners),
            backend_config=backend,  # type: ignore[arg-type]
        )
    finally:
        flwr_logger.removeFilter(notice)
    _hand_out_model_key(run_dir, partners)
    metrics_path = run_dir / "metrics.jsonl"
    privacy_path = run_dir / "privacy.json"
    if not privacy_path.exists():
        raise RuntimeError(f"the federation did not finish; see the log above ({run_dir})")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    privacy = json.loads(privacy_path.read_text())
    from fedpersona.report import write_report

    write_report(run_dir)
    return SimulationResult(run_dir, rows, privacy, time.monotonic() - started)


_STAGES = {
    "query": "admission: {n} partners load their data and fix their privacy plans",
    "train": "round {group}: {n} partners train",
    "train.secagg": "round {group}: {n} partners send masked updates",
    "evaluate": "round {group}: {n} partners evaluate",
    "query.persona_release": "personas: release {release} at {n} partners",
    "query.persona_release_secagg": "personas: masked release {release} at {n} partners",
    "query.personas": "personas: {n} partners assign their users and write their persona cards",
    "query.status": "{n} partners report their final epsilon",
}


def phase_text(kind: str, group: str, n: int, *, rounds: int) -> str:
    """The progress line of one exchange: ``kind`` is the Flower message type, ``group`` its
    group id (the round; persona release ``k`` goes out as round ``rounds + k``), ``n`` the
    partners asked, ``rounds`` the federation's training rounds."""
    template = _STAGES.get(kind)
    release = str(int(group) - rounds) if group.isdigit() else group
    if template is None:
        stage = kind.split(".", 1)[-1].replace("_", " ")
        template = "round {group}: {stage} at {n} partners" if group.isdigit() else "{stage}: {n} partners"
        return template.format(group=group, stage=stage, n=n)
    return template.format(group=group, release=release, n=n)


def _observed(grid: Grid, on_phase: PhaseCallback, started: float, *, rounds: int, every: float = 5.0) -> Grid:
    """``grid`` reporting each exchange as it happens: when it is sent, its first reply, how many
    have answered at most every ``every`` seconds, and when the last one is in.

    Only message types, round numbers and counts are reported: what the coordinator sees anyway.
    """
    from flwr.serverapp import Grid

    def stamp(text: str) -> None:
        on_phase(f"[{time.monotonic() - started:6.1f}s] {text}")

    class Observed(Grid):
        def set_run(self, run: Any) -> None:
            grid.set_run(run)

        @property
        def run(self) -> Any:
            return grid.run

        def create_message(self, *args: Any, **kwargs: Any) -> Message:
            return grid.create_message(*args, **kwargs)

        def get_node_ids(self) -> Iterable[int]:
            return grid.get_node_ids()

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            return grid.push_messages(messages)

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            return grid.pull_messages(message_ids)

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            sent = list(messages)
            if not sent:
                return []
            head = phase_text(sent[0].metadata.message_type, sent[0].metadata.group_id, len(sent), rounds=rounds)
            stamp(head + "...")
            asked = time.monotonic()
            waiting = set(grid.push_messages(sent))
            del sent
            replies: list[Message] = []
            end = None if timeout is None else asked + timeout
            told = asked
            while waiting and (end is None or time.monotonic() < end):
                got = list(grid.pull_messages(waiting))
                if got and not replies:
                    stamp(f"{head}: first answer after {time.monotonic() - asked:.1f}s")
                    told = time.monotonic()
                replies.extend(got)
                waiting.difference_update(m.metadata.reply_to_message_id for m in got)
                if waiting and replies and time.monotonic() - told >= every:
                    stamp(f"{head}: {len(replies)} answered, {len(waiting)} to go")
                    told = time.monotonic()
                if waiting:
                    # An in-memory poll: cheap, so five times as often as Flower's own grid (0.1 s),
                    # which would add up to 0.1 s to every phase of every round.
                    time.sleep(0.02)
            stamp(f"{head}: {len(replies)} answered in {time.monotonic() - asked:.1f}s")
            return replies

    return Observed()


def _server_app(
    settings: Any, *, on_round: Callable[[int, list[dict[str, Any]]], None] | None, on_phase: PhaseCallback | None,
    started: float,
) -> Any:  # fmt: skip
    """The federation's ServerApp, its grid observed by ``on_phase`` (when given)."""
    from flwr.serverapp import ServerApp

    from fedpersona.federation.server_app import build_server_app, run_federation

    if on_phase is None:
        return build_server_app(settings, on_round=on_round)
    server = ServerApp()
    phase = on_phase

    @server.main()
    def main(grid: Grid, context: Any) -> None:
        del context
        phase(f"[{time.monotonic() - started:6.1f}s] coordinator up; {settings.expected_partners} partners starting")
        run_federation(_observed(grid, phase, started, rounds=settings.federation.rounds), settings, on_round=on_round)

    return server


def _client_app(run_dir: str) -> Any:
    """The partners' ClientApp, built where it runs: in each Ray actor, at its first message.

    The driver never imports the partner's side (torch, Opacus, scikit-learn: seconds of CPU
    on the cores the actors are starting on); each actor imports it once, then answers every
    message with the app :func:`fedpersona.federation.client_app.build_client_app` builds.
    """
    from flwr.clientapp import ClientApp

    class PartnerApp(ClientApp):
        def __init__(self) -> None:
            super().__init__()
            self.run_dir = run_dir
            self.app: ClientApp | None = None

        def __call__(self, message: Message, context: Any) -> Message:
            if self.app is None:
                from fedpersona.federation.client_app import build_client_app

                self.app = build_client_app(self.run_dir)
            return self.app(message, context)

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "app": None}  # each process builds its own

    return PartnerApp()


def ray_init_args(address: str | None) -> dict[str, Any]:
    """``ray.init`` arguments: a local Ray sized to this machine, or an existing cluster.

    Connecting to a cluster takes its resources as they are (Ray refuses ``num_cpus`` then),
    and its session files stay where the cluster keeps them.
    """
    common = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
    if address is not None:
        if not address.strip():
            raise ConfigError("--ray-address is empty; give HOST:PORT of the Ray head (or 'auto')")
        return {"address": address.strip(), **common}
    # Ray's session files go to fedpersona's cache, not /tmp (a short path: Ray's sockets live
    # there and Unix socket paths are limited to about 100 bytes).
    return {"_temp_dir": str(ray_cache_dir()), "num_cpus": os.cpu_count() or 1, **common}


def _hand_out_model_key(run_dir: Path, partners: list[str]) -> None:
    """Give every simulated partner the federation's model-signing public key, in
    ``credentials/model-signing.pub`` beside its client.toml (where a partner kit has it), so
    ``fedpersona infer --config <partner>/client.toml`` verifies the run's model by default."""
    key_path = run_dir / "keys" / "model-signing.key"
    if not key_path.exists():
        return
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (run_dir / "keys" / "model-signing.pub").write_bytes(public)
    for client in partners:
        folder = Path(client).parent / "credentials"
        folder.mkdir(exist_ok=True)
        (folder / "model-signing.pub").write_bytes(public)


class _DeprecationNoticeFilter(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run``:
    fedpersona uses the in-process engine on purpose (no background SuperLink, no per-run
    installs), so the notice would only confuse a user of ``fedpersona simulate``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def ray_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedpersona/ray`` (default ``~/.cache/fedpersona/ray``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "fedpersona" / "ray"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clean(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
