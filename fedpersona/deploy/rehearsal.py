"""A partner's rehearsal: a trial run that never touches its real data or its real budget.

``prepare_rehearsal(client.toml)`` writes, beside the partner's ``client.toml``::

    rehearsal/client.toml    the partner's configuration with two changes: the rows and the state
    rehearsal/synthetic.csv  synthetic users drawn from the partner's schema alone
    rehearsal/state/         the rehearsal's own plan, ledger, models and logs

``fedpersona partner check|start --rehearsal`` run on that configuration. The SuperNode then
trains, releases and installs models exactly as in a real run, and charges the rehearsal's
own ledger.

Why a separate ledger is honest here: the synthetic rows are drawn from the schema (public by
declaration) and an injected generator, never from the partner's table, so nothing a rehearsal
releases depends on any real user; an auditor cannot call it a leak, and the real lifetime
budget (``state_dir/ledger.jsonl``) owes nothing for it. A rehearsal on the real rows with a
separate ledger would under-count what was released about real users, so there is none: the
real rows are read only by ``partner check`` without ``--rehearsal`` (which releases nothing)
and by a real run, which charges the real ledger.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpersona.config.files import load_partner_config, write_durably
from fedpersona.config.settings import PartnerConfig
from fedpersona.errors import ConfigError

__all__ = ["FOLDER", "Rehearsal", "prepare_rehearsal", "synthetic_rows_from_schema"]

FOLDER = "rehearsal"
_WORDS = ("alpha", "bravo", "delta", "echo", "golf", "hotel", "kilo", "lima", "oscar", "papa", "romeo", "tango")


@dataclass(frozen=True)
class Rehearsal:
    """What :func:`prepare_rehearsal` wrote: the rehearsal's client.toml, rows and state folder,
    and the real state folder it never touches."""

    config: Path
    data: Path | None  # None: the partner's configuration already uses a built-in synthetic table
    state_dir: Path
    real_state_dir: Path
    rows: int

    def __post_init__(self) -> None:
        if self.state_dir.resolve() == self.real_state_dir.resolve():
            raise ValueError("a rehearsal's state folder must not be the real one")
        if self.rows < 2:
            raise ValueError(f"a rehearsal needs at least 2 rows, got {self.rows}")

    def text(self) -> str:
        rows = f"{self.rows} synthetic users drawn from the schema ({self.data})" if self.data else "synthetic rows"
        return (
            f"REHEARSAL: {rows}, never your data; its own state folder and ledger {self.state_dir}; "
            f"the real state folder {self.real_state_dir} is not touched"
        )


def prepare_rehearsal(config: str | Path, *, rows: int = 600, seed: int = 0) -> Rehearsal:
    """Write (or rewrite) ``rehearsal/`` beside ``config`` and return where it is.

    ``rows`` synthetic users are drawn from the partner's schema with ``numpy.random.default_rng(seed)``
    (the same rows at every rehearsal, so the rehearsal's fixed plan stays valid). The privacy
    settings are the partner's own, so the rehearsal plans its noise as the real run would.
    """
    import tomli_w

    config = Path(config)
    cfg = load_partner_config(config)
    if rows < 20:
        raise ConfigError(f"a rehearsal needs at least 20 synthetic rows, got {rows}")
    folder = config.resolve().parent / FOLDER
    state = folder / "state"
    real_state = Path(cfg.state_dir).resolve()
    if real_state == state or real_state.is_relative_to(folder) or state.is_relative_to(real_state):
        raise ConfigError(
            f"{config}: partner.state_dir {real_state} overlaps the rehearsal folder {folder}; move the real "
            "state folder elsewhere (a rehearsal must never share the real ledger)"
        )
    data_path: Path | None = None
    data: dict[str, object] = {"test_fraction": cfg.test_fraction}
    if cfg.data is None:  # already a built-in synthetic table: only the state folder changes
        data.update(synthetic_rows=cfg.synthetic_rows, synthetic_seed=cfg.synthetic_seed)
        if cfg.synthetic_mix is not None:
            data["synthetic_mix"] = list(cfg.synthetic_mix)
        if cfg.public_rows is not None:
            data["public_rows"] = cfg.public_rows
        count = int(cfg.synthetic_rows or 0)
    else:
        from fedpersona.data.schema_reader import load_schema

        if cfg.schema_path is None:  # not reached: [data] path requires a schema
            raise ConfigError(f"{config}: data.schema must name the schema file of data.path")
        schema = load_schema(cfg.schema_path)
        rows = max(rows, schema.min_rows)
        data_path = folder / "synthetic.csv"
        table = synthetic_rows_from_schema(schema, rows=rows, generator=np.random.default_rng(seed))
        folder.mkdir(parents=True, exist_ok=True)
        write_durably(data_path, table.encode("utf-8"))
        declared = max(2, round(rows * (1 - cfg.test_fraction)))  # the training share: public, as configured
        data.update(path=data_path.name, schema=cfg.schema_path, public_rows=declared)
        count = rows
    doc = {
        "partner": {"name": cfg.name, "kind": cfg.kind, "state_dir": "state"},
        "data": data,
        "privacy": _privacy(cfg),
        "release": cfg.release.model_dump(),
    }
    head = (
        f"# REHEARSAL configuration of partner {cfg.name}, rewritten from {config.resolve()} by\n"
        "# `fedpersona partner check|start --rehearsal`: synthetic rows drawn from the schema, never your data;\n"
        "# its own state folder and ledger (state/ here). Edit the real client.toml, not this file.\n\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "client.toml"
    write_durably(path, (head + tomli_w.dumps(doc)).encode("utf-8"))
    load_partner_config(path)  # what the SuperNode will read must load
    return Rehearsal(config=path, data=data_path, state_dir=state, real_state_dir=real_state, rows=count)


def _privacy(cfg: PartnerConfig) -> dict[str, object]:
    settings = cfg.privacy.model_dump()
    return {key: value for key, value in settings.items() if value is not None}


def synthetic_rows_from_schema(schema: object, *, rows: int, generator: np.random.Generator) -> str:
    """A CSV text of ``rows`` users drawn from ``schema`` alone (a :class:`fedpersona.data.schema.Schema`).

    Numbers are uniform within the declared ``typical`` range when there is one, else within the
    bounds (log-uniform for a log-scaled feature); categories from the declared vocabulary (or
    ``value-<k>`` for a hashed one); booleans from the declared spellings; labels positive for
    about one user in four. No value comes from any table: the rows are as public as the schema.
    """
    from fedpersona.data.schema import (
        BooleanFeature,
        CategoricalFeature,
        NumericFeature,
        Schema,
        SequenceFeature,
        TextFeature,
    )

    if not isinstance(schema, Schema):
        raise TypeError(f"schema must be a fedpersona Schema, got {type(schema).__name__}")
    if schema.events is not None:
        raise ConfigError(
            f"{schema.source}: a rehearsal cannot draw event logs ([events]); set data.synthetic_rows in a copy "
            "of client.toml with its own state_dir for a rehearsal on a built-in synthetic table"
        )
    columns: dict[str, list[str]] = {}

    def numbers(lo: float, hi: float, *, log: bool, typical: tuple[float, float] | None) -> list[str]:
        low, high = typical if typical is not None else (lo, hi)
        if log and low >= 0:
            values = np.expm1(generator.uniform(np.log1p(low), np.log1p(high), rows))
        else:
            values = generator.uniform(low, high, rows)
        return [f"{v:.6g}" for v in values]

    def categories(vocabulary: tuple[str, ...] | None) -> list[str]:
        choices = list(vocabulary) if vocabulary else [f"value-{k}" for k in range(8)]
        return [choices[i] for i in generator.integers(0, len(choices), rows)]

    for feat in schema.features:
        if isinstance(feat, NumericFeature):
            columns[feat.column] = numbers(feat.lo, feat.hi, log=feat.log, typical=feat.typical)
        elif isinstance(feat, CategoricalFeature):
            columns[feat.column] = categories(feat.vocabulary)
        elif isinstance(feat, BooleanFeature):
            pair = [feat.true_values[0], feat.false_values[0]]
            columns[feat.column] = [pair[i] for i in generator.integers(0, 2, rows)]
        elif isinstance(feat, TextFeature):
            columns[feat.column] = [
                " ".join(_WORDS[i] for i in generator.integers(0, len(_WORDS), generator.integers(3, 9)))
                for _ in range(rows)
            ]
        elif isinstance(feat, SequenceFeature):
            for column in feat.columns:
                if feat.element == "numeric":
                    columns[column] = numbers(feat.lo, feat.hi, log=feat.log, typical=feat.typical)
                else:
                    columns[column] = categories(feat.vocabulary)
    for label in schema.labels:
        negative = next((v for v in ("0", "no", "false", "N", "negative") if v not in label.positive), "negative")
        columns[label.column] = [label.positive[0] if u < 0.25 else negative for u in generator.uniform(0, 1, rows)]
    if schema.id_column:
        columns[schema.id_column] = [str(i) for i in range(1, rows + 1)]
    names = list(schema.column_names or schema.input_columns)
    for name in schema.input_columns:
        if name not in names:
            names.append(name)
    separator = " " if schema.delimiter == r"\s+" else schema.delimiter
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=separator, lineterminator="\n")
    if schema.header:
        writer.writerow(names)
    empty = [""] * rows
    for i in range(rows):
        writer.writerow([columns.get(name, empty)[i] for name in names])
    return buffer.getvalue()
