"""The coordinator's checkpoint: where a federation stands, so that a restarted server continues it.

One file, ``RUN_DIR/state/checkpoint.npz``, rewritten after every aggregation (each training
round, each persona release) and at each later stage. It holds the global arrays and the
server optimizer's moments (:meth:`fedpersona.federation.aggregation.ScopedAggregator.get_state`) and
a JSON document (the ``__meta__``
entry) with the stage, the last completed round, the per-partner facts the server keeps
(slot, epsilon, steps, why a partner was dropped), the state of each slot's persona protocol
(:meth:`fedpersona.personas.protocol.PersonaRun.state`) and the settings that define the run.

Writes are atomic: a temporary file in the same folder, fsync'd, ``os.replace``'d over the
old one, then the folder fsync'd; a crash leaves the old checkpoint or the new one, never a
mix. :func:`load_checkpoint` refuses a checkpoint of other settings (naming each setting that
differs; a setting a newer fedpersona added is accepted at its default) and a damaged file
with a :class:`CheckpointError` that says what to do, never a traceback.

Stages, in order: ``train`` (``round`` training rounds aggregated; ``evaluated`` says whether
the last one's evaluation rows are in metrics.jsonl), ``personas`` (``persona_done`` persona
releases absorbed), ``clustered`` (the personas are final), ``done`` (model published and
delivered).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpersona.config.files import write_durably
from fedpersona.errors import ConfigError

__all__ = [
    "CHECKPOINT",
    "STAGES",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "run_settings",
    "save_checkpoint",
    "settings_differences",
    "settings_fingerprint",
]

CHECKPOINT = Path("state") / "checkpoint.npz"  # relative to the run folder
STAGES = ("train", "personas", "clustered", "done")
VERSION = 2
_META = "__meta__"
# Operational settings that may change between a crash and its resume without changing the run.
_OPERATIONAL = {"federation": ("round_timeout", "evaluate_every"), "training": ("device",)}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed: damaged, of another version, or of other settings."""


def run_settings(federation: Any, model: Any, training: Any) -> dict[str, Any]:
    """The settings that define the run, flat (``federation.rounds``, ...), as JSON values;
    timeouts and the device are left out (they may change between a crash and its resume)."""
    out: dict[str, Any] = {}
    for name, obj in (("federation", federation), ("model", model), ("training", training)):
        for key, value in obj.model_dump().items():
            if key not in _OPERATIONAL.get(name, ()):
                out[f"{name}.{key}"] = value
    return dict(json.loads(json.dumps(out, default=str)))


def _defaults(federation: Any, model: Any, training: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, obj in (("federation", federation), ("model", model), ("training", training)):
        for key, spec in type(obj).model_fields.items():
            if not spec.is_required():
                out[f"{name}.{key}"] = json.loads(json.dumps(spec.default, default=str))
    return out


def settings_fingerprint(federation: Any, model: Any, training: Any) -> str:
    """A short hash of :func:`run_settings`, for logs."""
    blob = json.dumps(run_settings(federation, model, training), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def settings_differences(saved: dict[str, Any], federation: Any, model: Any, training: Any) -> list[str]:
    """Each run-defining setting whose value now differs from the checkpoint's. A setting the
    checkpoint does not know (added by a newer fedpersona) must be at its default."""
    now = run_settings(federation, model, training)
    defaults = _defaults(federation, model, training)
    out = []
    for key, value in sorted(now.items()):
        if key in saved:
            if saved[key] != value:
                out.append(f"{key} was {saved[key]!r}, now {value!r}")
        elif key in defaults and value != defaults[key]:
            out.append(f"{key} is {value!r}, but the run used a version without it (default {defaults[key]!r})")
    return out


@dataclass
class Checkpoint:
    """Where the federation stands (see the module docstring for the stages)."""

    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)  # run_settings() of the run
    stage: str = "train"
    round: int = 0
    evaluated: bool = True
    persona_done: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # ScopedAggregator.get_state()
    persona_runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # slot -> PersonaRun state (JSON)
    personas: dict[str, Any] | None = None  # the final personas, from stage "clustered" on
    partners: dict[str, dict[str, Any]] = field(default_factory=dict)  # by partner name
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise CheckpointError(f"checkpoint stage must be one of {', '.join(STAGES)}, got {self.stage!r}")


def save_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``RUN_DIR/state/checkpoint.npz`` atomically and durably; returns its path."""
    path = Path(run_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(checkpoint.arrays)
    meta: dict[str, Any] = {
        "version": VERSION,
        "fingerprint": checkpoint.fingerprint,
        "settings": checkpoint.settings,
        "stage": checkpoint.stage,
        "round": checkpoint.round,
        "evaluated": checkpoint.evaluated,
        "persona_done": checkpoint.persona_done,
        "persona_runs": checkpoint.persona_runs,
        "personas": checkpoint.personas,
        "partners": checkpoint.partners,
        "extra": checkpoint.extra,
        "arrays": names,
    }
    entries: dict[str, np.ndarray] = {f"a{i}": checkpoint.arrays[k] for i, k in enumerate(names)}
    entries[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **entries)  # type: ignore[arg-type]
    return write_durably(path, buffer.getvalue())


def load_checkpoint(run_dir: str | Path, *, settings: tuple[Any, Any, Any] | None = None) -> Checkpoint | None:
    """The run folder's checkpoint, or None when it has none.

    Raises :class:`CheckpointError` when the file is damaged or was written for other
    ``settings`` (``(federation, model, training)``; see :func:`settings_differences`).
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    damaged = (
        f"{path} is damaged and cannot be resumed ({{}}); move it away to start the federation "
        "from round 1 (partners' ledgers keep what they already spent), or restore a backup"
    )
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
            meta = json.loads(bytes(npz[_META]).decode())
            names = list(meta["arrays"])
            arrays = {name: npz[f"a{i}"] for i, name in enumerate(names)}
        checkpoint = Checkpoint(
            fingerprint=str(meta["fingerprint"]),
            settings=dict(meta["settings"]),
            stage=str(meta["stage"]),
            round=int(meta["round"]),
            evaluated=bool(meta["evaluated"]),
            persona_done=int(meta["persona_done"]),
            arrays=arrays,
            persona_runs=dict(meta.get("persona_runs") or {}),
            personas=meta.get("personas"),
            partners=dict(meta.get("partners") or {}),
            extra=dict(meta.get("extra") or {}),
        )
        version = meta.get("version")
    except CheckpointError as exc:
        raise CheckpointError(damaged.format(exc)) from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(damaged.format(f"{type(exc).__name__}: {exc}")) from None
    if version != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this fedpersona reads version {VERSION}")
    if settings is not None:
        differences = settings_differences(checkpoint.settings, *settings)
        if differences:
            raise CheckpointError(
                f"{path} was written by a federation with other settings: {'; '.join(differences)}. The "
                "federation, model and training settings must be unchanged to resume (only "
                "federation.round_timeout, federation.evaluate_every and training.device may differ); "
                "restore the configuration of the run or start a new run folder"
            )
    return checkpoint
