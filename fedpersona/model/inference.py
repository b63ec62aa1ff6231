"""Persona inference at a partner: the released personas applied to its own users.

:func:`infer_file` streams a CSV or Parquet file of any size in chunks, validates each chunk
against the schema, assigns every user with the partner's assignment function (the released
persona space and mixture applied to each row's public persona view:
:func:`fedpersona.federation.partner_personas.assign_rows`), and writes one row per user (id, persona,
the posterior probabilities, optionally the persona embedding) to CSV or Parquet through a
temporary file renamed at the end, so a failed run leaves nothing half-written.

**Probabilities.** ``p_j`` is the posterior of persona ``j`` under the released mixture (a
tied-covariance Gaussian mixture in the persona space); the hard assignment is its arg-max
(ties: the lowest index).

**Reproducibility.** Rows are assigned in blocks of exactly :data:`BLOCK_ROWS` rows aligned to
the global row number, so the output is the same for any ``chunk_rows``.

:func:`load_encoder` builds the partner's encoder from a verified model artifact (the shared
trunk plus the adapter of the partner's slot ``<kind>:<schema fingerprint>``) for the label
heads and the audit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from fedpersona.config.settings import ModelSettings
from fedpersona.data.schema import Schema, slot_id
from fedpersona.data.tables import Table, check_file, read_frame, validate_frame
from fedpersona.errors import ConfigError, DataError, SchemaError
from fedpersona.model.scopes import parameter_scope

if TYPE_CHECKING:
    import torch

    from fedpersona.model.encoder import PersonaEncoder

__all__ = [
    "BLOCK_ROWS",
    "Assigner",
    "InferenceSummary",
    "RowView",
    "infer_file",
    "load_encoder",
    "load_parameters",
]

logger = logging.getLogger(__name__)

_PARQUET = (".parquet", ".pq")


@dataclass(frozen=True)
class InferenceSummary:
    """What :func:`infer_file` wrote (local numbers; nothing here leaves the partner)."""

    path: str
    rows: int
    chunks: int
    counts: tuple[int, ...]  # users per persona


_Model = TypeVar("_Model", bound="torch.nn.Module")


def load_parameters(
    model: _Model,
    shared: Mapping[str, Any],
    *,
    local: Mapping[str, Any] | None = None,
    source: str = "the model",
    require_shared: bool = False,
) -> _Model:
    """Load ``local`` parameters (the partner's own: heads, an unshared adapter) and then the
    ``shared`` ones (trunk, the slot's adapter) into ``model``: the one way any fedpersona
    code loads weights into an encoder. Names are checked against the model, shared ones
    against their scope (a local parameter never arrives from ``source``), shapes against the
    configuration; with ``require_shared`` every shared parameter must be present. Every problem
    is listed in one :class:`~fedpersona.errors.ConfigError`.
    """
    import torch

    state = model.state_dict()
    problems = []
    unknown = sorted(name for name in [*shared, *(local or {})] if name not in state)
    if unknown:
        problems.append(f"{source} holds parameter(s) this encoder does not have: {', '.join(unknown[:5])}")
    private = sorted(name for name in shared if name in state and parameter_scope(name) == "local")
    if private:
        problems.append(f"{source} sent local parameter(s) {', '.join(private[:5])}")
    if require_shared:
        wanted = [n for n in state if parameter_scope(n) != "local" and n not in shared and n not in (local or {})]
        if wanted:
            problems.append(f"{source} lacks parameter(s) {', '.join(wanted[:5])}")
    for name, value in [*(local or {}).items(), *shared.items()]:
        if name in state and tuple(np.shape(value)) != tuple(state[name].shape):
            problems.append(
                f"parameter '{name}' has shape {tuple(np.shape(value))} in {source} but {tuple(state[name].shape)} "
                "here: the model configurations differ"
            )
    if problems:
        raise ConfigError("cannot load the persona model: " + "; ".join(problems))
    for name, value in [*(local or {}).items(), *shared.items()]:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        state[name] = tensor.to(device=state[name].device, dtype=state[name].dtype).clone()
    model.load_state_dict(state)
    return model


def load_encoder(
    *,
    arrays: Mapping[str, np.ndarray],
    card: Mapping[str, Any],
    schema: Schema,
    local_adapter: Mapping[str, np.ndarray] | None = None,
) -> PersonaEncoder:
    """The partner's encoder from a model artifact (``arrays, card = verify_model(folder)``).

    Builds ``PersonaEncoder(layout_of(schema), ModelSettings(**card["model"]))`` and loads the
    trunk (keys ``trunk.*``) and the adapter of the schema's slot
    (:func:`~fedpersona.data.schema.slot_id`, keys ``<slot>/adapter.*``) with
    :func:`load_parameters`. A partner whose adapter was never shared (its schema differs from
    its kind's) passes its own as ``local_adapter`` (keys ``adapter.*``).
    """
    import torch

    from fedpersona.data.features import layout_of
    from fedpersona.model.encoder import PersonaEncoder

    section = card.get("model")
    if not isinstance(section, Mapping):
        raise ConfigError("the model card has no 'model' section with the encoder sizes")
    config = ModelSettings.checked(**section)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG as it was
        model = PersonaEncoder(layout_of(schema), config)
    slot = slot_id(schema.kind, schema.fingerprint())
    shared = {name: value for name, value in arrays.items() if name.startswith("trunk.")}
    shared.update({name[len(slot) + 1 :]: value for name, value in arrays.items() if name.startswith(slot + "/")})
    bad = [name for name in local_adapter or {} if not name.startswith("adapter.")]
    if bad:
        raise ConfigError(f"local_adapter holds '{bad[0]}', which is not an adapter parameter")
    if not any(n.startswith("adapter.") for n in shared) and not local_adapter:
        slots = sorted({name.split("/", 1)[0] for name in arrays if "/" in name})
        raise ConfigError(
            f"cannot load the persona model: the model holds no adapter for this schema's slot '{slot}' (slots in "
            f"the model: {', '.join(slots) or 'none'}): the schema differs from the one trained with, or this "
            "partner's adapter stayed local (pass it as local_adapter)"
        )
    load_parameters(model, shared, local=local_adapter, require_shared=True)
    return model.eval()


RowView = Callable[[Table], np.ndarray]
"""The rows a partner assigns from: a validated table in, one float row per user out, each row a
function of that user's row alone (e.g. the public persona view, :func:`fedpersona.data.dense.dense_views`)."""

Assigner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""A partner's persona assignment of rows of its :data:`RowView`: ``(hard (n,) int, probabilities
(n, K), embedding (n, p))``, each row a function of that row alone (e.g.
:func:`fedpersona.federation.partner_personas.assign_rows` with the released personas)."""


def infer_file(
    *,
    schema: Schema,
    view: RowView,
    assign: Assigner,
    k: int,
    dim: int,
    data_path: str | Path,
    out_path: str | Path,
    chunk_rows: int = 100_000,
    include_embedding: bool = False,
    progress: Callable[[int], None] | None = None,
) -> InferenceSummary:
    """Assign a persona to every user of ``data_path`` and write them to ``out_path``.

    The input (CSV, optionally compressed, or Parquet; read as the schema says) is streamed
    ``chunk_rows`` rows at a time as Arrow columns (``pyarrow.csv`` / ``pyarrow.parquet``; a
    ``.zip``, ``.xz`` or ``.tar`` archive, or a delimiter longer than one character, is read
    with pandas); each chunk is validated with :func:`~fedpersona.data.tables.validate_frame`
    (label columns are not needed; an error names the chunk's data rows, and row numbers inside
    it count from the chunk's first row), turned into rows by ``view`` once per chunk, then
    assigned by ``assign`` in blocks of
    :data:`BLOCK_ROWS` rows aligned to the global row number, so every row is computed in the
    same position of a block of the same shape whatever the chunking (the output is the same
    for any ``chunk_rows``). An event log is aggregated to one row per user first, which needs
    the whole file in memory. Output columns: the id column (or ``row``), then ``persona``,
    ``p_0 .. p_{k-1}`` and with ``include_embedding`` ``z_0 .. z_{dim-1}``; the format follows
    the suffix of ``out_path`` (``.csv``, ``.parquet`` or ``.pq``). A chunk is written on a
    second thread while the next one is read and assigned.

    **The CSV format.** UTF-8, ``,`` between fields, ``\\n`` after each line, a header line
    with the column names; every string (the column names, the ids) is quoted with ``"`` (a
    ``"`` inside doubled), numbers never; ``persona`` is a decimal integer; every ``p_j`` and ``z_j`` is a
    float32 written as the shortest decimal that reads back as the same float32, with an
    exponent where that is shorter (``0``, ``1``, ``0.1859035``, ``1e-7``, ``3.4e+38``). The
    bytes depend only on the input rows and the model (the same for any ``chunk_rows`` and on
    every run). Parquet: a string id column, int64 ``persona``, float32 probabilities and
    embedding.

    The file is written under a temporary name in the same folder and renamed when complete;
    on any error the temporary file is removed and ``out_path`` is left as it was.
    ``progress`` is called with the number of rows done after each chunk.
    """
    data_path, out_path = Path(data_path), Path(out_path)
    _check_int("chunk_rows", chunk_rows)
    _check_int("k", k)
    _check_int("dim", dim)
    suffix = out_path.suffix.lower()
    if suffix not in (".csv", *_PARQUET):
        raise ConfigError(f"{out_path}: the output must end in .csv, .parquet or .pq")
    if not out_path.parent.is_dir():
        raise ConfigError(f"{out_path}: the folder {out_path.parent} does not exist")
    id_name = schema.id_column or (schema.events.user if schema.events else None) or "row"
    columns = [id_name, "persona", *(f"p_{j}" for j in range(k))]
    columns += [f"z_{j}" for j in range(dim)] if include_embedding else []
    out_schema = pa.schema(
        [(id_name, pa.string()), ("persona", pa.int64())] + [(name, pa.float32()) for name in columns[2:]]
    )
    reading = dataclasses.replace(schema, labels=(), min_rows=1)  # labels are not needed to infer
    track = bool(schema.id_column or schema.events)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    rows = chunks = 0
    counts = np.zeros(k, dtype=np.int64)
    seen = SeenIds()
    try:
        with contextlib.ExitStack() as stack:
            writer: pacsv.CSVWriter | pq.ParquetWriter
            if suffix == ".csv":
                writer = stack.enter_context(pacsv.CSVWriter(tmp, out_schema, write_options=_CSV_OPTIONS))
            else:
                writer = stack.enter_context(pq.ParquetWriter(tmp, out_schema))
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer-writer"))
            workers = stack.enter_context(ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="infer-chunk"))
            pending: Future[None] | None = None
            # Blocks of a few thousand rows are too small for a threaded BLAS: its threads would
            # only wait for each other (and for the writer thread).
            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))

            def assigned(frame: Any, offset: int, source: str) -> _Assigned:
                table = validate_frame(reading, frame, source=source)
                hashes = SeenIds.hashes(table.ids) if track else None  # here, in parallel with other chunks
                return (table, hashes, *_aligned(assign, view(table), offset=offset, k=k, dim=dim))

            # Up to WORKERS chunks are validated and assigned at once (numpy and Arrow release the
            # GIL); their results are taken in file order, so ids are checked, errors raised and
            # chunks written in order, and memory stays bounded.
            queued: deque[tuple[Future[_Assigned], str]] = deque()
            read = 0

            def take_one() -> None:
                nonlocal pending, rows, chunks
                future, source = queued.popleft()
                table, hashes, hard, probs, z = future.result()
                if hashes is not None:
                    _check_repeated(table.ids, hashes, seen, source, id_name)
                out = _output(out_schema, table.ids if track else _row_ids(rows, len(table)), hard, probs, z, k=k)
                if pending is not None:
                    pending.result()  # one chunk being written: re-raises a write error
                pending = pool.submit(writer.write_table, out)
                counts[:] += np.bincount(hard, minlength=k)[:k]
                rows += len(table)
                chunks += 1
                logger.info("%s: %d rows assigned", data_path, rows)
                if progress is not None:
                    progress(rows)

            for frame in _chunks(schema, data_path, chunk_rows):
                source = f"{data_path} (data rows {read + 1}-{read + len(frame)})"
                queued.append((workers.submit(assigned, frame, read, source), source))
                read += len(frame)
                while len(queued) > WORKERS:
                    take_one()
            while queued:
                take_one()
            if pending is not None:
                pending.result()
            if rows == 0:
                raise SchemaError(str(data_path), ["the table has no data rows"])
        _fsync(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %d users in %d chunk(s) to %s", rows, chunks, out_path)
    return InferenceSummary(path=str(out_path), rows=rows, chunks=chunks, counts=tuple(int(c) for c in counts))


BLOCK_ROWS = 4096
WORKERS = 2  # chunks validated and assigned at once (2 cores)


def _aligned(
    assign: Assigner, rows_in: np.ndarray, *, offset: int, k: int, dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``assign`` over a chunk's rows in blocks of :data:`BLOCK_ROWS` rows aligned to the global
    row number (partial blocks padded with copies of their own rows), checked for shape."""
    n = len(rows_in)
    hard = np.zeros(n, dtype=np.int64)
    probs = np.zeros((n, k), dtype=np.float32)
    z_out = np.zeros((n, dim), dtype=np.float32)
    start = 0
    while start < n:
        slot = (offset + start) % BLOCK_ROWS
        take = min(BLOCK_ROWS - slot, n - start)
        rows = np.arange(start, start + take)
        index = np.concatenate([np.repeat(rows[:1], slot), rows, np.repeat(rows[-1:], BLOCK_ROWS - slot - take)])
        h, p, z = assign(rows_in[index])
        if h.shape != (BLOCK_ROWS,) or p.shape != (BLOCK_ROWS, k) or z.shape != (BLOCK_ROWS, dim):
            raise ValueError(f"the assignment returned shapes {h.shape}, {p.shape}, {z.shape} for {BLOCK_ROWS} rows")
        window = slice(slot, slot + take)
        hard[start : start + take] = h[window]
        probs[start : start + take] = p[window]
        z_out[start : start + take] = z[window]
        start += take
    return hard, probs, z_out


# --- reading and writing ----------------------------------------------------------------------

_CSV_OPTIONS = pacsv.WriteOptions(include_header=True, delimiter=",", quoting_style="needed", batch_size=65_536)
_READ_BLOCK = 1 << 22  # bytes of CSV parsed at a time (a few 10k rows)
_ARROW_SUFFIXES = ("", ".csv", ".txt", ".tsv", ".dat", ".gz", ".bz2", ".zst", ".lz4")


def _chunks(schema: Schema, path: Path, chunk_rows: int) -> Iterator[pa.Table | pd.DataFrame]:
    """The file in chunks of ``chunk_rows`` rows, cells as written (validate_frame strips them),
    column names stripped and, without a header, taken from the schema."""
    if schema.events is not None:
        frame = read_frame(schema, path)  # one row per user needs every event of the user
        for start in range(0, len(frame), chunk_rows):
            yield frame.iloc[start : start + chunk_rows].reset_index(drop=True)
        return
    check_file(path)
    try:
        if path.suffix.lower() in _PARQUET:
            batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
        elif len(schema.delimiter) == 1 and path.suffix.lower() in _ARROW_SUFFIXES:
            batches = _csv_batches(schema, path)
        else:
            yield from _pandas_chunks(schema, path, chunk_rows)
            return
        for table in _rebatched(batches, chunk_rows):
            yield _named(table, schema)
    except pd.errors.EmptyDataError:
        raise DataError(f"cannot read data file {path}: the file is empty") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read data file {path}: it is not UTF-8 text ({exc})") from None
    except (OSError, ValueError, EOFError, zlib.error, pa.ArrowException) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if reason == "Empty CSV file":
            reason = "the file is empty"
        elif "invalid UTF8" in reason:
            reason = f"it is not UTF-8 text ({reason})"
        raise DataError(f"cannot read data file {path}: {reason}") from None


def _csv_batches(schema: Schema, path: Path) -> Iterator[pa.RecordBatch]:
    """Every cell of a CSV file as a string (empty cells as ``""``), in record batches."""
    parse = pacsv.ParseOptions(delimiter=schema.delimiter)
    header = pacsv.open_csv(  # the column names: the first block, read once more below
        path, read_options=pacsv.ReadOptions(autogenerate_column_names=not schema.header), parse_options=parse
    )
    names = header.schema.names
    header.close()
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )
    read = pacsv.ReadOptions(autogenerate_column_names=not schema.header, block_size=_READ_BLOCK, use_threads=True)
    with pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert) as reader:
        yield from reader


def _rebatched(batches: Iterator[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    """Record batches regrouped into tables of exactly ``chunk_rows`` rows (the last may be
    shorter); nothing for a file without rows."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while len(batch):
            take = min(chunk_rows - count, len(batch))
            held.append(batch.slice(0, take))
            batch = batch.slice(take)
            count += take
            if count == chunk_rows:
                yield pa.Table.from_batches(held)
                held, count = [], 0
    if held:
        yield pa.Table.from_batches(held)


def _named(table: pa.Table, schema: Schema) -> pa.Table:
    names = [str(c).strip() for c in table.column_names]
    if not schema.header and schema.column_names is not None:
        if len(names) != len(schema.column_names):
            raise SchemaError(
                schema.source,
                [f"the file has {len(names)} columns but table.columns names {len(schema.column_names)}"],
            )
        names = list(schema.column_names)
    return table.rename_columns(names)


def _pandas_chunks(schema: Schema, path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    reader = pd.read_csv(
        path,
        sep=schema.delimiter,
        header=0 if schema.header else None,
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        compression="infer",
        encoding="utf-8-sig",
        chunksize=chunk_rows,
    )
    with reader:
        for frame in reader:
            frame.columns = [str(c).strip() for c in frame.columns]
            if not schema.header and schema.column_names is not None:
                if frame.shape[1] != len(schema.column_names):
                    raise SchemaError(
                        schema.source,
                        [f"the file has {frame.shape[1]} columns but table.columns names {len(schema.column_names)}"],
                    )
                frame.columns = list(schema.column_names)
            yield frame.reset_index(drop=True)


def _row_ids(done: int, n: int) -> pa.Array:
    numbers = pc.cast(pa.array(np.arange(done + 1, done + n + 1, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar("row-"), numbers, "")


_Assigned = tuple[Table, tuple[np.ndarray, np.ndarray] | None, np.ndarray, np.ndarray, np.ndarray]
"""A chunk validated and assigned: the table, its ids' hashes (when ids are tracked), the hard
assignments, the posteriors and the embeddings."""


class SeenIds:
    """The ids of the chunks read so far, kept as two 64-bit keyed hashes each (SipHash under two
    fixed keys, ``pandas.util.hash_array``): 16 bytes an id in sorted numpy runs instead of a
    Python string in a set (about 90 bytes), so a file of 100M users needs 1.6 GB for the check,
    not 9 GB. Two different ids count as the same only if both hashes agree (about 1 in 2^128 a
    pair; for 10^9 ids a false "repeated id" has probability about 10^-21). The runs are merged
    when the newest grows as long as the one before, so a lookup searches O(log n) runs."""

    KEYS = ("fedpersona-id-h1", "fedpersona-id-h2")  # 16 characters each, as hash_array needs

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (first hash sorted, second hash aligned)

    @classmethod
    def hashes(cls, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(ids, dtype=object)
        first, second = (pd.util.hash_array(values, hash_key=key, categorize=False) for key in cls.KEYS)
        return first, second

    def seen(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Which of the given ids (as their hashes) an earlier :meth:`add` held."""
        hit = np.zeros(len(first), dtype=bool)
        for run_first, run_second in self._runs:
            left = np.searchsorted(run_first, first, side="left")
            right = np.searchsorted(run_first, first, side="right")
            one = right - left == 1  # the first hash matched once: compare the second
            hit[one] |= run_second[left[one]] == second[one]
            for i in np.flatnonzero(right - left > 1):  # several earlier ids share a first hash (rare)
                hit[i] |= bool((run_second[left[i] : right[i]] == second[i]).any())
        return hit

    def add(self, first: np.ndarray, second: np.ndarray) -> None:
        order = np.argsort(first, kind="stable")
        self._runs.append((first[order], second[order]))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= len(self._runs[-1][0]):
            (a1, a2), (b1, b2) = self._runs.pop(), self._runs.pop()
            both1, both2 = np.concatenate([b1, a1]), np.concatenate([b2, a2])
            order = np.argsort(both1, kind="stable")
            self._runs.append((both1[order], both2[order]))


def _check_repeated(
    ids: np.ndarray, hashes: tuple[np.ndarray, np.ndarray], seen: SeenIds, source: str, id_name: str
) -> None:
    """Ids must be unique across chunks too (validate_frame checks within one chunk)."""
    first, second = hashes
    again = np.asarray(ids, dtype=object)[seen.seen(first, second)]
    if len(again):
        raise SchemaError(
            source,
            [f"id column '{id_name}': {len(again)} id(s) already occurred in an earlier chunk, e.g. {again[0]!r}"],
        )
    seen.add(first, second)


def _output(
    schema: pa.Schema, ids: np.ndarray | pa.Array, hard: np.ndarray, probs: np.ndarray, z: np.ndarray, *, k: int
) -> pa.Table:
    arrays: list[pa.Array] = [pa.array(ids, type=pa.string()), pa.array(hard, type=pa.int64())]
    arrays += [pa.array(probs[:, j], type=pa.float32()) for j in range(k)]
    arrays += [pa.array(z[:, j], type=pa.float32()) for j in range(len(schema) - 2 - k)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
