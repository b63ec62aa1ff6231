"""Persona inference: streaming equals one pass, byte-identical reruns, the documented formula, nothing
half-written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from fedpersona.config.settings import ModelSettings
from fedpersona.data.dense import dense_views, persona_view
from fedpersona.data.features import layout_of
from fedpersona.data.schema import Schema, slot_id
from fedpersona.data.synthetic import generate_frame, synthetic_schema
from fedpersona.data.tables import Table, validate_frame
from fedpersona.errors import ConfigError, DataError, SchemaError
from fedpersona.federation.partner_personas import assign_rows
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.inference import infer_file, load_encoder
from fedpersona.personas.mixture import Mixture
from fedpersona.personas.space import fit_space, gram_release

ROWS = 1200
MODEL = {"architecture": "encoder", "token_dim": 16, "embed_dim": 8, "hidden": 16, "blocks": 1, "mask_rate": 0.3}
K, DIMS = 4, 5


class Published:
    """A global model as the server publishes it: trunk.* and <kind>:<fingerprint>/adapter.*,
    and released personas for the schema's slot (a space fitted on an exact Gram matrix of
    other rows, and a mixture with random centres)."""

    def __init__(self, schema: Schema) -> None:
        torch.manual_seed(0)
        model = PersonaEncoder(layout_of(schema), ModelSettings(**MODEL))
        slot = slot_id(schema.kind, schema.fingerprint())
        self.arrays: dict[str, np.ndarray] = {}
        for name, value in model.state_dict().items():
            if name.startswith("trunk."):
                self.arrays[name] = value.numpy().copy()
            elif name.startswith("adapter."):
                self.arrays[f"{slot}/{name}"] = value.numpy().copy()
        self.arrays["finance:0123456789abcdef/adapter.cat.weight"] = np.zeros((3, 16), np.float32)  # another slot
        self.card: dict[str, Any] = {"version": 1, "model": dict(MODEL), "slots": [slot]}
        other = validate_frame(schema, generate_frame("ecommerce", 800, rng=np.random.default_rng(9))[0], source="x")
        x = dense_views(other).persona.astype(np.float64)
        gram = gram_release(x, clip=5.0, offset=5.0, noise_multiplier=0.0, randomness=None)
        self.space = fit_space(gram, dim=x.shape[1], dims=DIMS, row_clip=5.0, offset=5.0)
        rng = np.random.default_rng(1)
        self.mixture = Mixture(
            centres=rng.normal(0, 0.5, (K, DIMS)), weights=np.array([0.1, 0.2, 0.3, 0.4]),
            covariance=np.diag(self.space.spectrum) / 3.0,
        )  # fmt: skip

    @staticmethod
    def view(table: Table) -> np.ndarray:
        return persona_view(table)

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hard, posterior, z = assign_rows(self.space, self.mixture, rows)
        return hard, posterior.astype(np.float32), z.astype(np.float32)


@pytest.fixture(scope="module")
def schema() -> Schema:
    return synthetic_schema("ecommerce")


@pytest.fixture(scope="module")
def published(schema: Schema) -> Published:
    return Published(schema)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate_frame("ecommerce", ROWS, rng=np.random.default_rng(0))[0]


@pytest.fixture
def data(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "users.csv"
    frame.to_csv(path, index=False)
    return path


def run(published: Published, schema: Schema, data: Path, out: Path, **options: Any) -> Path:
    infer_file(
        schema=schema, view=published.view, assign=published.assign, k=K, dim=DIMS, data_path=data,
        out_path=out, **options,
    )  # fmt: skip
    return out


def test_streaming_in_chunks_writes_the_same_bytes_as_one_chunk(
    tmp_path: Path, published: Published, schema: Schema, data: Path
) -> None:
    whole = run(published, schema, data, tmp_path / "whole.csv", chunk_rows=10**6, include_embedding=True)
    for chunk_rows in (97, 500):
        chunked = run(
            published, schema, data, tmp_path / f"c{chunk_rows}.csv", chunk_rows=chunk_rows, include_embedding=True
        )
        assert chunked.read_bytes() == whole.read_bytes()
    written = pd.read_csv(whole)
    assert list(written.columns[:6]) == ["user_id", "persona", "p_0", "p_1", "p_2", "p_3"]
    assert list(written.columns[6:]) == [f"z_{j}" for j in range(DIMS)]
    assert len(written) == ROWS and written["user_id"].is_unique


def test_two_runs_write_identical_bytes(tmp_path: Path, published: Published, schema: Schema, data: Path) -> None:
    for name in ("a.csv", "b.parquet"):
        first = run(published, schema, data, tmp_path / f"1-{name}", chunk_rows=300).read_bytes()
        second = run(published, schema, data, tmp_path / f"2-{name}", chunk_rows=300).read_bytes()
        assert first == second


def test_parquet_input_and_output_hold_the_same_assignments(
    tmp_path: Path, published: Published, schema: Schema, data: Path, frame: pd.DataFrame
) -> None:
    parquet_in = tmp_path / "users.parquet"
    frame.to_parquet(parquet_in)
    csv_out = run(published, schema, data, tmp_path / "from-csv.csv")
    assert run(published, schema, parquet_in, tmp_path / "from-pq.csv", chunk_rows=250).read_bytes() == (
        csv_out.read_bytes()
    )
    one = pd.read_parquet(run(published, schema, data, tmp_path / "one.parquet", chunk_rows=10**6))
    many = pd.read_parquet(run(published, schema, parquet_in, tmp_path / "many.parquet", chunk_rows=111))
    pd.testing.assert_frame_equal(one, many)
    assert one["p_0"].dtype == np.float32


def test_file_output_equals_the_documented_formula(
    tmp_path: Path, published: Published, schema: Schema, data: Path, frame: pd.DataFrame
) -> None:
    out = pd.read_parquet(
        run(published, schema, data, tmp_path / "out.parquet", chunk_rows=333, include_embedding=True)
    )
    table = validate_frame(schema, frame, source="memory")
    x = dense_views(table).persona.astype(np.float64)
    # Independently: z = clip(V^T (clip(x, 5) - mean), z_clip); the posterior of a Gaussian
    # mixture with one shared covariance (scipy's density), hard = its arg-max.
    space, mixture = published.space, published.mixture
    clipped = x * np.minimum(1.0, 5.0 / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300))
    z = (clipped - space.mean) @ space.basis
    z = z * np.minimum(1.0, space.z_clip / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-300))
    log = np.stack(
        [stats.multivariate_normal(c, mixture.covariance).logpdf(z) + np.log(w)
         for c, w in zip(mixture.centres, mixture.weights, strict=True)], axis=1,
    )  # fmt: skip
    expected = np.exp(log - log.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(out[[f"z_{j}" for j in range(DIMS)]].to_numpy(), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[[f"p_{j}" for j in range(K)]].to_numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out["persona"].to_numpy(), np.argmax(log, axis=1))
    assert len(set(out["persona"])) >= 2  # the check means something: several personas are used


def test_csv_output_is_in_the_documented_format(
    tmp_path: Path, published: Published, schema: Schema, data: Path
) -> None:
    text = run(published, schema, data, tmp_path / "out.csv", chunk_rows=500).read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[0] == ",".join(f'"{c}"' for c in ["user_id", "persona", *(f"p_{j}" for j in range(K))])
    assert lines[1].startswith('"E000001",') and lines[-1] == "" and len(lines) == ROWS + 2
    # Each probability is the shortest decimal of its float32: it reads back to the very float32
    # of the Parquet output, and one digit fewer would not.
    exact = pd.read_parquet(run(published, schema, data, tmp_path / "out.parquet"))
    cells = [line.split(",")[2:] for line in lines[1:-1]]
    for row, fields in zip(exact[[f"p_{j}" for j in range(K)]].to_numpy(), cells[:200], strict=False):
        for value, field in zip(row, fields, strict=True):
            assert np.float32(field) == value
            digits = field.split("e")[0].replace(".", "").replace("-", "").lstrip("0")
            if len(digits) > 1:
                shorter = float(f"{float(field):.{len(digits) - 2}e}")
                assert np.float32(shorter) != value


def test_labels_are_not_needed_and_progress_is_reported(
    tmp_path: Path, published: Published, schema: Schema, frame: pd.DataFrame
) -> None:
    path = tmp_path / "no-labels.csv"
    frame.drop(columns=["purchased"]).to_csv(path, index=False)
    seen: list[int] = []
    summary = infer_file(
        schema=schema, view=published.view, assign=published.assign, k=K, dim=DIMS, data_path=path,
        out_path=tmp_path / "out.csv", chunk_rows=500, progress=seen.append,
    )  # fmt: skip
    assert seen == [500, 1000, 1200]
    assert (summary.rows, summary.chunks, sum(summary.counts)) == (ROWS, 3, ROWS)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_bad_row_in_a_late_chunk_leaves_no_output(
    tmp_path: Path, published: Published, schema: Schema, frame: pd.DataFrame
) -> None:
    bad = frame.astype({"sessions_30d": object})
    bad.loc[1100, "sessions_30d"] = "many"
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    out = tmp_path / "out" / "personas.csv"
    out.parent.mkdir()
    with pytest.raises(SchemaError, match=r"data rows 1001-1200.*'sessions_30d'.*are not numbers"):
        run(published, schema, path, out, chunk_rows=500)
    assert not out.exists() and leftovers(out.parent) == []
    # An earlier result stays exactly as it was.
    out.write_text("previous result\n")
    with pytest.raises(SchemaError):
        run(published, schema, path, out, chunk_rows=500)
    assert out.read_text() == "previous result\n" and leftovers(out.parent) == []


def test_unreadable_or_inconsistent_files_are_user_errors(
    tmp_path: Path, published: Published, schema: Schema, frame: pd.DataFrame
) -> None:
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError, match="does not exist"):
        run(published, schema, tmp_path / "missing.csv", out)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        run(published, schema, empty, out)
    header_only = tmp_path / "header.csv"
    frame.head(0).to_csv(header_only, index=False)
    with pytest.raises(SchemaError, match="no data rows"):
        run(published, schema, header_only, out)
    repeated = tmp_path / "repeated.csv"
    pd.concat([frame.head(300), frame.head(10)]).to_csv(repeated, index=False)
    with pytest.raises(SchemaError, match="already occurred in an earlier chunk"):
        run(published, schema, repeated, out, chunk_rows=100)
    no_column = tmp_path / "no-column.csv"
    frame.drop(columns=["device"]).to_csv(no_column, index=False)
    with pytest.raises(SchemaError, match="missing column"):
        run(published, schema, no_column, out)
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(ConfigError, match=r"\.csv, \.parquet or \.pq"):
        run(published, schema, no_column, tmp_path / "out.xlsx")


def test_loading_checks_the_slot_and_the_sizes(published: Published, schema: Schema) -> None:
    other = synthetic_schema("finance")
    with pytest.raises(ConfigError, match=r"no adapter for this schema's slot 'finance:[0-9a-f]{16}'"):
        load_encoder(arrays=published.arrays, card=published.card, schema=other)
    with pytest.raises(ConfigError, match="has shape"):
        load_encoder(arrays=published.arrays, card={"model": {**MODEL, "hidden": 32}}, schema=schema)
    with pytest.raises(ConfigError, match=r"does not have: trunk\.blocks\.0"):
        load_encoder(arrays=published.arrays, card={"model": {**MODEL, "blocks": 0}}, schema=schema)
    with pytest.raises(ConfigError, match=r"unknown key model\.layers"):
        load_encoder(arrays=published.arrays, card={"model": {**MODEL, "layers": 3}}, schema=schema)
    # A partner whose adapter stayed local brings its own.
    slot = slot_id(schema.kind, schema.fingerprint()) + "/"
    trunk_only = {n: v for n, v in published.arrays.items() if n.startswith("trunk.")}
    adapter = {n[len(slot) :]: v for n, v in published.arrays.items() if n.startswith(slot)}
    model = load_encoder(arrays=trunk_only, card=published.card, schema=schema, local_adapter=adapter)
    reference = load_encoder(arrays=published.arrays, card=published.card, schema=schema)
    for name, value in reference.state_dict().items():
        if name.startswith(("trunk.", "adapter.")):
            assert torch.equal(model.state_dict()[name], value)


def test_loading_leaves_the_global_torch_rng_alone(published: Published, schema: Schema) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_encoder(arrays=published.arrays, card=published.card, schema=schema)
    assert torch.equal(torch.rand(3), expected)


def test_seen_ids_find_every_repeat_and_nothing_else_across_many_chunks() -> None:
    from fedpersona.model.inference import SeenIds

    seen = SeenIds()
    ids = np.array([f"user-{i}" for i in range(5000)], dtype=object)
    for start in range(0, 5000, 250):  # 20 chunks: runs are merged as they grow
        chunk = ids[start : start + 250]
        first, second = SeenIds.hashes(chunk)
        assert not seen.seen(first, second).any()
        seen.add(first, second)
    assert len(seen._runs) <= 5  # O(log n) sorted runs, not one per chunk
    probe = np.array(["user-17", "user-4999", "user-5000", "someone-else", "user-2500"], dtype=object)
    assert seen.seen(*SeenIds.hashes(probe)).tolist() == [True, True, False, False, True]


def test_seen_ids_need_both_hashes_to_agree() -> None:
    """Two ids whose first hashes collide are still told apart by the second."""
    from fedpersona.model.inference import SeenIds

    seen = SeenIds()
    seen.add(np.array([7, 7, 9], dtype=np.uint64), np.array([1, 2, 3], dtype=np.uint64))
    got = seen.seen(np.array([7, 7, 7, 9, 9], dtype=np.uint64), np.array([1, 2, 5, 3, 4], dtype=np.uint64))
    assert got.tolist() == [True, True, False, True, False]
