"""Bad data at a partner: every class of malformed input is a typed error that names the file,
the column and the rows, raised before any training; an empty or too-small silo makes the
partner answer with an error and the round goes on; an extreme value cannot raise the
sensitivity of DP-SGD (the clipped per-sample gradient stays within max_grad_norm)."""

from __future__ import annotations

import gzip
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedpersona.config.files import dump_toml
from fedpersona.config.settings import FederationSettings, ModelSettings, TrainingSettings
from fedpersona.data.features import featurize
from fedpersona.data.schema_reader import parse_schema
from fedpersona.data.tables import Table, load_table
from fedpersona.errors import DataError, FedPersonaError, SchemaError
from fedpersona.federation.client_app import build_client_app
from fedpersona.federation.messages import encode_arrays, encode_settings
from fedpersona.federation.server_app import ServerSettings, run_federation
from fedpersona.model.encoder import PersonaEncoder, PersonaTrunk, random_keep, token_presence
from fedpersona.privacy.manifest import ERROR_CODES, parse_error_reason
from tests.fake_grid import FakeGrid, client_app_nodes

SCHEMA_DOC: dict[str, Any] = {
    "table": {"kind": "finance", "id": "ID", "min_rows": 3, "out_of_bounds": "reject"},
    "features": {
        "AGE": {"type": "numeric", "bounds": [18, 100]},
        "INCOME": {"type": "numeric", "bounds": [0, 1e6], "log": True},
        "city": {"type": "categorical", "vocabulary": ["oslo", "rome"], "unseen": "reject"},
        "member": {"type": "boolean"},
        "note": {"type": "text", "buckets": 32},
    },
    "labels": {"churn": {"positive": ["1"]}},
}
HEADER = "ID,AGE,INCOME,city,member,note,churn"
ROWS = ["1,30,1000,oslo,1,hello there,0", "2,40,25000,rome,0,,1", "3,55,0,oslo,yes,a b c,0", "4,61,99,rome,no,x,1"]


def _schema(**table: Any) -> Any:
    doc = json.loads(json.dumps(SCHEMA_DOC))
    doc["table"].update(table)
    return parse_schema(doc, source="schema.toml")


def _csv(rows: list[str], header: str = HEADER) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def _with(row: int, column: str, value: str) -> list[str]:
    """ROWS with one cell replaced (row counted from 1, like the error messages)."""
    names = HEADER.split(",")
    out = [r.split(",") for r in ROWS]
    out[row - 1][names.index(column)] = value
    return [",".join(r) for r in out]


def _parquet(path: Path, **columns: pa.Array | list[Any]) -> None:
    base: dict[str, Any] = {
        "ID": [1, 2, 3],
        "AGE": [30.0, 40.0, 50.0],
        "INCOME": [1.0, 2.0, 3.0],
        "city": ["oslo", "rome", "oslo"],
        "member": [True, False, True],
        "note": ["a", "b", "c"],
        "churn": [0, 1, 0],
    }
    base.update(columns)
    pq.write_table(pa.table(base), path)


_full_gzip = gzip.compress(_csv(ROWS * 200))

# name, file bytes (or a writer), error type, fragments the message must contain
CSV_CASES: list[tuple[str, bytes, type[FedPersonaError], list[str]]] = [
    ("missing-column.csv", _csv([r.rsplit(",", 1)[0] for r in ROWS], HEADER.rsplit(",", 1)[0]), SchemaError,
     ["missing column(s) 'churn'", "columns found: 'ID', 'AGE'"]),
    ("wrong-type.csv", _csv(_with(3, "AGE", "fifty")), SchemaError,
     ["column 'AGE'", "are not numbers", "'fifty' at rows 3"]),
    ("infinite.csv", _csv(_with(2, "INCOME", "1e309")), SchemaError, ["column 'INCOME'", "'1e309' at rows 2"]),
    ("inf-word.csv", _csv(_with(4, "INCOME", "-inf")), SchemaError, ["column 'INCOME'", "at rows 4"]),
    ("out-of-bounds.csv", _csv(_with(2, "AGE", "1e30")), SchemaError,
     ["column 'AGE'", "outside the bounds [18, 100]", "'1e30' at rows 2"]),
    ("duplicate-ids.csv", _csv(_with(4, "ID", "2")), SchemaError,
     ["id column 'ID'", "occur more than once", "'2' at rows 2, 4"]),
    ("missing-id.csv", _csv(_with(1, "ID", "")), SchemaError, ["id column 'ID'", "have no id, at rows 1"]),
    ("unseen-category.csv", _csv(_with(3, "city", "paris")), SchemaError,
     ["column 'city'", "not in the vocabulary of feature 'city'", "'paris' at rows 3"]),
    ("bad-boolean.csv", _csv(_with(2, "member", "maybe")), SchemaError, ["column 'member'", "'maybe' at rows 2"]),
    ("bad-label.csv", _csv(_with(1, "churn", "perhaps")[:1] + _with(2, "churn", "unsure")[1:]), SchemaError,
     ["column 'churn'", "neither positive"]),
    ("nul-byte.csv", _csv(_with(2, "AGE", "4\x000")), SchemaError, ["column 'AGE'", "at rows 2"]),
    ("too-small.csv", _csv(ROWS[:2]), SchemaError, ["2 row(s), fewer than table.min_rows = 3"]),
    ("empty.csv", b"", DataError, ["the file is empty"]),
    ("blank-lines.csv", b"\n\n  \n", DataError, ["the file is empty"]),
    ("header-only.csv", (HEADER + "\n").encode(), SchemaError, ["the table has no data rows"]),
    ("header-no-newline.csv", HEADER.encode(), SchemaError, ["the table has no data rows"]),
    ("garbage.csv", np.random.default_rng(0).bytes(4096), DataError, ["not UTF-8 text"]),
    ("latin-1.csv", _csv(_with(1, "note", "Zürich")).decode().encode("latin-1"), DataError, ["not UTF-8 text"]),
    ("utf-16.csv", _csv(ROWS).decode().encode("utf-16"), DataError, ["not UTF-8 text"]),
    ("semicolons.csv", _csv(ROWS).replace(b",", b";"), SchemaError,
     ["missing column(s) 'ID'", "looks delimited by ';', not by table.delimiter ','"]),
    ("tabs.csv", _csv(ROWS).replace(b",", b"\t"), SchemaError, ["looks delimited by '\\t'"]),
    ("repeated-header.csv", _csv([r + ",31" for r in ROWS], HEADER + ",AGE"), SchemaError,
     ["column name(s) 'AGE' occur more than once in the header"]),
    ("long-row.csv", _csv([ROWS[0], "9," + ROWS[1], *ROWS[2:]]), DataError, ["Expected 7 fields in line 3, saw 8"]),
    ("open-quote.csv", _csv([ROWS[0], '2,40,25000,rome,0,"never closed,1', *ROWS[2:]]), DataError,
     ["EOF inside string"]),
    ("truncated.csv.gz", _full_gzip[: len(_full_gzip) // 2], DataError, ["end-of-stream marker"]),
    ("plain.csv.gz", _csv(ROWS), DataError, ["Not a gzipped file"]),
    ("corrupt.csv.zip", b"PK\x03\x04 not a zip archive", DataError, ["not a zip file"]),
    ("corrupt.csv.xz", b"\xfd7zXZ\x00 not xz", DataError, ["Corrupt input data"]),
    ("corrupt.csv.bz2", b"BZh9 not bzip2", DataError, ["Invalid data stream"]),
    ("corrupt.parquet", b"PAR1 this is not parquet PAR1", DataError, ["cannot read data file"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "error", "fragments"), CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_malformed_file_is_a_typed_error_naming_file_column_and_rows(
    tmp_path: Path, name: str, content: bytes, error: type[FedPersonaError], fragments: list[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error) as caught:
        load_table(_schema(), path)
    text = str(caught.value)
    assert str(path) in text
    for fragment in fragments:
        assert fragment in text, text


PARQUET_CASES: list[tuple[str, dict[str, Any], type[FedPersonaError], list[str]]] = [
    ("bool-for-number", {"AGE": [True, False, True]}, SchemaError, ["column 'AGE'", "are not numbers", "rows 1, 2, 3"]),
    ("dates-for-number", {"INCOME": pa.array([0, 1, 2], pa.timestamp("s"))}, SchemaError,
     ["column 'INCOME'", "are not numbers"]),
    ("list-for-number", {"AGE": [[30], [40, 41], [50]]}, SchemaError, ["column 'AGE'", "are not numbers"]),
    ("struct-for-category", {"city": [{"x": 1}, {"x": 2}, {"x": 3}]}, SchemaError,
     ["column 'city'", "not in the vocabulary"]),
    ("float-ids-colliding", {"ID": [1.0, 1.0, 2.0]}, SchemaError, ["id column 'ID'", "rows 1, 2"]),
    ("bytes-not-utf8", {"note": [b"\xff\xfe", b"ok", b"x"]}, DataError, ["not UTF-8 text"]),
    ("int-column-names", {"0": [1, 2, 3]}, SchemaError, ["columns found: 'ID', 'AGE'"]),
    ("number-for-boolean", {"member": [2.5, 0.0, 1.0]}, SchemaError, ["column 'member'", "'2.5' at rows 1"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "columns", "error", "fragments"), PARQUET_CASES, ids=[c[0] for c in PARQUET_CASES])
def test_parquet_with_wrong_dtypes_is_a_typed_error(
    tmp_path: Path, name: str, columns: dict[str, Any], error: type[FedPersonaError], fragments: list[str]
) -> None:
    path = tmp_path / f"{name}.parquet"
    if name == "int-column-names":
        _parquet(path, **columns)
        table = pq.read_table(path).drop(["churn"])
        pq.write_table(table, path)
        fragments = ["missing column(s) 'churn'", *fragments]
    else:
        _parquet(path, **columns)
    with pytest.raises(error) as caught:
        load_table(_schema(), path)
    text = str(caught.value)
    assert str(path) in text
    for fragment in fragments:
        assert fragment in text, text


def test_every_problem_of_a_file_is_listed_in_one_error(tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    rows = _with(1, "AGE", "old")
    rows[1] = rows[1].replace("rome", "lima")
    rows[3] = rows[3].replace("4,", "1,", 1)
    path.write_bytes(_csv(rows))
    with pytest.raises(SchemaError) as caught:
        load_table(_schema(), path)
    assert len(caught.value.problems) == 3
    assert [p.split(":")[0] for p in caught.value.problems] == ["id column 'ID'", "column 'AGE'", "column 'city'"]


def test_out_of_bounds_is_clipped_when_the_policy_says_clip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "clip.csv"
    path.write_bytes(_csv(_with(2, "AGE", "1e30")[:2] + _with(3, "AGE", "-1e30")[2:]))
    caplog.set_level(logging.INFO, logger="fedpersona.data.tables")
    table = load_table(_schema(out_of_bounds="clip"), path)
    np.testing.assert_array_equal(table.columns["AGE"], [30.0, 100.0, 18.0, 61.0])
    assert "clipped 2 value(s) of column 'AGE' into [18, 100]" in caplog.text


# --------------------------------------------------------------------------- at the partner

MODEL = ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1)
TRAINING = TrainingSettings(batch_size=16, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)


def _message(kind: str, **config: object) -> Message:
    content = RecordDict({"config": encode_settings(MODEL, TRAINING, num_rounds=1, seed=0, **config)})
    if kind == "train":
        torch.manual_seed(0)
        trunk = {f"trunk.{k}": v.numpy() for k, v in PersonaTrunk(MODEL).state_dict().items()}
        content["arrays"] = encode_arrays(trunk)
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=7,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind,
    )  # fmt: skip
    return make_message(metadata, content)


def _file_partner(folder: Path, data: bytes, *, min_rows: int = 3, suffix: str = ".csv") -> Path:
    folder.mkdir(parents=True)
    (folder / f"data{suffix}").write_bytes(data)
    doc = json.loads(json.dumps(SCHEMA_DOC))
    doc["table"]["min_rows"] = min_rows
    dump_toml(folder / "schema.toml", doc)
    dump_toml(
        folder / "client.toml",
        {
            "partner": {"name": folder.name, "kind": "finance", "state_dir": "state"},
            "data": {"path": f"data{suffix}", "schema": "schema.toml", "public_rows": 10},
            "privacy": {"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
        },
    )
    return folder / "client.toml"


def _context(path: Path, node: int = 7) -> Context:
    return Context(run_id=1, node_id=node, node_config={"client-config": str(path)}, state=RecordDict(), run_config={})


@pytest.mark.parametrize(
    ("data", "min_rows", "fragment", "file"),
    [
        (b"", 3, "the file is empty", "data.csv"),
        ((HEADER + "\n").encode(), 3, "the table has no data rows", "data.csv"),
        (_csv(ROWS[:2]), 3, "fewer than table.min_rows = 3", "data.csv"),
        (_csv(ROWS[:1]), 1, "too few to split for training", "client.toml"),  # at most 1 training row
        (_csv(_with(2, "AGE", "1e30")), 3, "outside the bounds", "data.csv"),
    ],
    ids=["empty", "header-only", "below-min-rows", "too-small-to-split", "bad-value"],
)
def test_partner_replies_with_an_error_and_charges_nothing(
    tmp_path: Path, data: bytes, min_rows: int, fragment: str, file: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = _file_partner(tmp_path / "bank-x", data, min_rows=min_rows)
    app = build_client_app()
    ctx = _context(config)
    for kind, extra in (("query", {}), ("train", {"round": 1, "adapter_shared": True})):
        caplog.clear()
        reply = app(_message(kind, **extra), ctx)
        # The reply names the category only; the partner's log says what and where.
        assert reply.has_error() and reply.error.code in (ERROR_CODES["data"], ERROR_CODES["config"]), kind
        assert parse_error_reason(reply.error.reason)[0] in ("data", "config")
        assert fragment not in (reply.error.reason or "") and file not in (reply.error.reason or "")
        assert fragment in caplog.text and file in caplog.text, caplog.text
    state = tmp_path / "bank-x" / "state"
    assert not (state / "ledger.jsonl").exists() and not (state / "plan.json").exists()  # nothing was spent


@pytest.fixture
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has: Flower's task identity, which Message() reads."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.mark.slow
@pytest.mark.usefixtures("_server_identity")
def test_a_round_goes_on_without_partners_whose_silo_is_empty_or_too_small(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    contexts = {}
    for node, name in ((11, "clinic-1"), (12, "clinic-2")):
        folder = tmp_path / name
        folder.mkdir()
        dump_toml(
            folder / "client.toml",
            {
                "partner": {"name": name, "kind": "health", "state_dir": "state"},
                "data": {"synthetic_rows": 100, "synthetic_seed": node},
                "privacy": {"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
            },
        )
        contexts[node] = _context(folder / "client.toml", node)
    contexts[13] = _context(_file_partner(tmp_path / "bank-empty", (HEADER + "\n").encode()), 13)
    contexts[14] = _context(_file_partner(tmp_path / "bank-tiny", _csv(ROWS[:1]), min_rows=1), 14)
    caplog.set_level(logging.ERROR, logger="fedpersona.federation.server_app")
    fed = FederationSettings(rounds=1, personas=0, min_partners=2)
    settings = ServerSettings(federation=fed, model=MODEL, training=TRAINING, run_dir=str(tmp_path / "run"))
    result = run_federation(FakeGrid(client_app_nodes(contexts)), settings)
    assert result.rounds_completed == 1
    assert set(result.partners) == {"clinic-1", "clinic-2"}
    # The server learns the category of each refusal; what exactly is wrong stays at the partner.
    joined = [r.getMessage() for r in caplog.records if "cannot join" in r.getMessage()]
    assert len(joined) == 2
    assert any("node 13" in m and "refused (data)" in m for m in joined)
    assert any("node 14" in m and "refused (config)" in m for m in joined)
    weights = np.load(tmp_path / "run" / "model" / "weights.npz")
    assert all(np.all(np.isfinite(weights[k])) for k in weights.files)


# --------------------------------------------------------------------------- sensitivity


EXTREME = [1e30, -1e30, 1e300]


@pytest.mark.parametrize("log", [False, True])
def test_an_extreme_value_featurizes_exactly_like_the_bound(tmp_path: Path, log: bool) -> None:
    """With ``clip`` the loader clips; featurization clips again (a table built without the
    loader), so a 1e30 row is the same tensor as a row at the bound: it carries no more
    information and no larger input than any in-bounds row."""
    doc = {
        "table": {"kind": "finance", "min_rows": 1},
        "features": {
            "INCOME": {"type": "numeric", "bounds": [0, 1e6], "log": log},
            "bills": {"type": "sequence", "columns": ["B1", "B2"], "element": "numeric", "bounds": [-10, 10]},
        },
    }
    schema = parse_schema(doc, source="t")
    path = tmp_path / "t.csv"
    path.write_text("INCOME,B1,B2\n1e30,1e30,-1e30\n1000000,10,-10\n-1e30,3,4\n0,3,4\n")
    loaded = featurize(load_table(schema, path)).tensors
    assert torch.equal(loaded["scalar"][0], loaded["scalar"][1])
    assert torch.equal(loaded["scalar"][2], loaded["scalar"][3])
    assert torch.equal(loaded["seqnum0"][0], loaded["seqnum0"][1])
    raw = Table(
        schema=schema,
        source="unvalidated",
        ids=np.array(["a", "b", "c"], dtype=object),
        columns={"INCOME": np.array(EXTREME), "B1": np.array(EXTREME), "B2": np.array(EXTREME)},
        labels={},
    )
    tensors = featurize(raw).tensors
    expected = torch.tensor([[1.0], [0.0], [1.0]])
    assert torch.equal(tensors["scalar"], expected)
    assert torch.equal(tensors["seqnum0"], torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))


def _extreme_batch(tmp_path: Path) -> tuple[PersonaEncoder, dict[str, torch.Tensor], torch.Tensor]:
    path = tmp_path / "extreme.csv"
    rows = [f"{i},{20 + i},{1000 * i},{'oslo' if i % 2 else 'rome'},{i % 2},word {i},{i % 2}" for i in range(1, 31)]
    rows[0] = "1,1e30,1e30,oslo,1,huge,1"
    path.write_bytes(_csv(rows))
    table = load_table(_schema(out_of_bounds="clip"), path)
    data = featurize(table)
    torch.manual_seed(0)
    model = PersonaEncoder(data.layout, MODEL)
    batch = data.batch(torch.arange(len(data)))
    generator = torch.Generator().manual_seed(0)
    keep = random_keep(token_presence(data.layout, batch), MODEL.mask_rate, generator)
    return model, batch, keep


def _per_sample_norms(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient norms by definition: one backward pass per row (no BatchNorm, so a
    row's loss depends on that row alone)."""
    norms = []
    for i in range(len(keep)):
        model.zero_grad()
        row = {k: v[i : i + 1] for k, v in batch.items()}
        model(row, keep[i : i + 1]).sum().backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        norms.append(torch.cat(grads).norm())
    model.zero_grad()
    return torch.stack(norms)


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.1, 1.0])
def test_an_extreme_value_cannot_raise_the_clipped_per_sample_gradient_above_max_grad_norm(
    tmp_path: Path, max_grad_norm: float
) -> None:
    model, batch, keep = _extreme_batch(tmp_path)
    reference = _per_sample_norms(model, batch, keep)
    assert torch.all(torch.isfinite(reference))

    # Opacus' per-sample gradients (the ones DP-SGD clips) agree with the definition ...
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(batch, keep).sum().backward()
    grad_samples = [p.grad_sample.reshape(len(keep), -1) for p in model.parameters() if p.grad_sample is not None]
    opacus_norms = torch.cat(grad_samples, 1).norm(dim=1)
    torch.testing.assert_close(opacus_norms, reference, rtol=1e-4, atol=1e-6)
    gsm.zero_grad(set_to_none=True)

    # ... and after Opacus clips them, the 1e30 row alone contributes at most max_grad_norm.
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=1,
        loss_reduction="sum",
    )
    row = {k: v[:1] for k, v in batch.items()}
    gsm(row, keep[:1]).sum().backward()
    optimizer.clip_and_accumulate()
    clipped = torch.cat([p.summed_grad.flatten() for p in model.parameters() if p.summed_grad is not None]).norm()
    assert float(clipped) <= max_grad_norm * (1 + 1e-5)
    if float(reference[0]) > max_grad_norm:  # the clip was active: the norm is C, not less
        assert float(clipped) == pytest.approx(max_grad_norm, rel=1e-4)
    gsm._close()
