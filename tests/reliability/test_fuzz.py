"""Fuzzing with hypothesis: the loader, the featurizer, the TOML config parsers and the model
registry, fed generated input. The only allowed outcomes are success (with its invariants) or
one of the documented errors (:class:`~fedpersona.errors.FedPersonaError` subclasses, and for
the registry a 4xx answer): never another exception, never a 5xx, never a file from outside the
artifacts folder.

The profile is bounded (``max_examples``), has no deadline (a shared CI machine has slow
moments) and is derandomized, so that CI runs the same examples every time.

Each fuzzer counts its outcomes (:func:`tallied`): a generator whose inputs are all refused
early would test only the first check, and one whose inputs are all accepted would test no
error path, so each must reach both, with at least the share of accepted inputs it states.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gzip
import io
import json
import math
import tempfile
import tomllib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pandas as pd
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpersona.config.files import load_federation_config, load_partner_config, load_scenario
from fedpersona.data.features import featurize, layout_of
from fedpersona.data.schema import KINDS
from fedpersona.data.schema_reader import load_schema, parse_schema
from fedpersona.data.tables import load_table, read_frame, validate_frame
from fedpersona.errors import FedPersonaError
from fedpersona.federation.aggregation import ScopedAggregator

settings.register_profile(
    "fedpersona-reliability",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Applied per test rather than loaded globally, so other test modules keep their own settings.
FUZZ = settings.get_profile("fedpersona-reliability")
FAST = settings(FUZZ, max_examples=250)

REPO = Path(__file__).resolve().parents[2]

TALLY: dict[str, Counter[str]] = {}


def tally(test: str, outcome: str) -> None:
    """Count one generated input of ``test`` as "accepted" or "refused"."""
    TALLY.setdefault(test, Counter())[outcome] += 1


def tallied(min_accepted: float) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run a fuzzer, then require that its inputs reached both outcomes, with at least
    ``min_accepted`` of them accepted."""

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            TALLY[test.__name__] = Counter()
            test(*args, **kwargs)
            counts = TALLY[test.__name__]
            total = counts["accepted"] + counts["refused"]
            assert total > 0 and counts["refused"] > 0, f"{test.__name__}: {dict(counts)}"
            assert counts["accepted"] >= min_accepted * total, f"{test.__name__}: {dict(counts)}"

        return run

    return wrap


# --------------------------------------------------------------------------- tables and schemas

NAMES = st.sampled_from(["a", "b", "c", "d", "ID", "x y", "Ü", "label"])
CELL = st.one_of(
    st.sampled_from(["", " ", "NA", "nan", "None", "1", "0", "-0", "1.0", "yes", "no", "TRUE", "oslo", "rome"]),
    st.sampled_from(["1e30", "-1e30", "1e309", "inf", "-inf", "0x10", "1_000", "3,5", "12 ", "\t7", "1e-320"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=12),
)


@st.composite
def feature_specs(draw: st.DrawFn, column: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["numeric", "categorical", "boolean", "text", "sequence"]))
    spec: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        spec["missing"] = draw(st.sampled_from(["drop", "reject"]))
    if kind in ("numeric", "sequence"):
        lo = draw(st.floats(-1e12, 1e12, allow_nan=False))
        span = draw(st.floats(1e-6, 1e12, allow_nan=False))
        spec["bounds"] = [lo, lo + span] if lo + span > lo else [lo, lo + 1.0]
        spec["log"] = draw(st.booleans())
    if kind == "categorical" or (kind == "sequence" and draw(st.booleans())):
        if kind == "sequence":
            spec.update({"element": "categorical"})
            spec.pop("bounds", None)
            spec.pop("log", None)
        if draw(st.booleans()):
            spec["vocabulary"] = draw(st.lists(CELL, min_size=1, max_size=4))
        else:
            spec["buckets"] = draw(st.integers(2, 64))
        spec["unseen"] = draw(st.sampled_from(["other", "reject"]))
    if kind == "text":
        spec["buckets"] = draw(st.integers(2, 64))
        low = draw(st.integers(1, 3))
        spec["ngrams"] = [low, draw(st.integers(low, 3))]
        spec["max_tokens"] = draw(st.integers(1, 8))
    if kind == "sequence":
        spec["columns"] = [f"{column}_1", f"{column}_2"]
    elif draw(st.booleans()):
        spec["column"] = column
    return spec


@st.composite
def schema_docs(draw: st.DrawFn) -> dict[str, Any]:
    columns = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    table: dict[str, Any] = {
        "kind": draw(st.sampled_from(KINDS)),
        "min_rows": draw(st.integers(1, 4)),
        "out_of_bounds": draw(st.sampled_from(["clip", "reject"])),
        "missing": draw(st.sampled_from(["drop", "reject"])),
    }
    if draw(st.booleans()):
        table["id"] = "ID"
    features = {c: draw(feature_specs(c)) for c in columns if c not in ("ID", "label")}
    doc: dict[str, Any] = {"table": table, "features": features or {"a": {"type": "boolean"}}}
    if draw(st.booleans()):
        doc["labels"] = {"label": {"positive": draw(st.lists(CELL, min_size=1, max_size=2))}}
    return doc


def _columns_of(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """Every column the schema reads, with the spec of the feature (None for the id and labels)."""
    out: list[tuple[str, dict[str, Any] | None]] = [("ID", {"type": "id"})] if doc["table"].get("id") else []
    for name, spec in doc["features"].items():
        out.extend((column, spec) for column in spec.get("columns", [spec.get("column", name)]))
    out.extend((label, {"type": "label", **spec}) for label, spec in doc.get("labels", {}).items())
    return out


@st.composite
def typed_cell(draw: st.DrawFn, spec: dict[str, Any] | None, dirty: bool) -> str:
    """A cell the feature can hold (so the featurizer is reached); in a dirty table, often any cell."""
    if spec is None or (dirty and draw(st.integers(0, 3)) == 0):
        return draw(CELL)
    kind = spec["type"]
    if kind == "id":
        return f"user-{draw(st.integers(0, 10**9))}"  # (a repeated id is a refusal: the test still allows it)
    if kind == "label":
        return str(draw(st.sampled_from([*spec["positive"], "0", "no"])))
    if kind in ("numeric", "sequence") and "bounds" in spec:
        lo, hi = spec["bounds"]
        return repr(draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False)))
    if kind == "boolean":
        return draw(st.sampled_from(["yes", "no", "1", "0", "true", "False"]))
    if spec.get("vocabulary"):
        return str(draw(st.sampled_from(spec["vocabulary"])))
    return draw(st.text(min_size=1, max_size=12).filter(str.strip))


@st.composite
def frames(draw: st.DrawFn, doc: dict[str, Any]) -> pd.DataFrame:
    columns = _columns_of(doc)
    if draw(st.integers(0, 9)) == 0 and columns:  # now and then a column is missing
        columns.remove(draw(st.sampled_from(columns)))
    if draw(st.integers(0, 9)) == 0:  # and now and then an extra (or repeated) one
        columns.append((draw(NAMES), None))
    rows = draw(st.integers(0, 8))
    dirty = draw(st.booleans())
    data = {}
    for i, (_, spec) in enumerate(columns):
        cells = draw(st.lists(typed_cell(spec, dirty), min_size=rows, max_size=rows))
        data[f"{i}"] = pd.Series(cells, dtype=object)
    frame = pd.DataFrame(data)
    frame.columns = [name for name, _ in columns]
    return frame


def _check_features(table: Any) -> None:
    """Featurized values are finite, scaled into [0, 1], and codes stay inside their tables."""
    tensors = featurize(table).tensors
    layout = layout_of(table.schema)
    assert tensors["scalar"].shape == (len(table), len(layout.scalar_names))
    for key, value in tensors.items():
        if value.numel() and value.is_floating_point() and key != "labels":
            assert bool(value.isfinite().all()), key
            assert 0.0 <= float(value.min()) and float(value.max()) <= 1.0, key
    if layout.cat_names and len(table):
        assert 0 <= int(tensors["cat"].min()) and int(tensors["cat"].max()) < sum(layout.cat_cardinalities)
    for i, buckets in enumerate(layout.text_buckets):
        if tensors[f"text{i}"].numel():
            assert int(tensors[f"text{i}"].max()) <= buckets


@tallied(0.15)
@FUZZ
@given(data=st.data())
def test_validate_and_featurize_generated_tables(data: st.DataObject) -> None:
    doc = data.draw(schema_docs())
    try:
        schema = parse_schema(doc, source="fuzz-schema")
    except FedPersonaError:
        tally("test_validate_and_featurize_generated_tables", "refused")
        return
    frame = data.draw(frames(doc))
    try:
        table = validate_frame(schema, frame, source="fuzz.csv")
    except FedPersonaError:
        tally("test_validate_and_featurize_generated_tables", "refused")
        return
    assert len(table) == len(frame)
    _check_features(table)
    tally("test_validate_and_featurize_generated_tables", "accepted")


def _as_file(frame: pd.DataFrame, fmt: str, folder: Path) -> Path:
    if fmt == "parquet":
        path = folder / "t.parquet"
        frame.to_parquet(path, index=False)
    else:
        text = frame.to_csv(index=False)
        path = folder / ("t.csv.gz" if fmt == "gzip" else "t.csv")
        path.write_bytes(gzip.compress(text.encode()) if fmt == "gzip" else text.encode())
    return path


@tallied(0.15)
@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["csv", "gzip", "parquet"]))
def test_load_generated_files(data: st.DataObject, fmt: str) -> None:
    doc = data.draw(schema_docs())
    try:
        schema = parse_schema(doc, source="fuzz-schema")
    except FedPersonaError:
        tally("test_load_generated_files", "refused")
        return
    frame = data.draw(frames(doc))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = _as_file(frame, fmt, Path(tmp))
        except (ValueError, TypeError, UnicodeEncodeError):  # pandas cannot write it: nothing to load
            return
        try:
            table = load_table(schema, path)
        except FedPersonaError:
            tally("test_load_generated_files", "refused")
            return
        _check_features(table)
        tally("test_load_generated_files", "accepted")


@tallied(0.02)
@FAST
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.lists(st.lists(CELL, min_size=1, max_size=4).map(",".join), max_size=6).map(lambda r: "\n".join(r).encode()),
    ),
    suffix=st.sampled_from([".csv", ".txt", ".csv.gz", ".parquet", ".csv.bz2", ".csv.zip", ".csv.xz"]),
    delimiter=st.sampled_from([",", ";", "\\t", "|", "whitespace"]),
    header=st.booleans(),
)
def test_read_arbitrary_bytes(content: bytes, suffix: str, delimiter: str, header: bool) -> None:
    table: dict[str, Any] = {"kind": "finance", "min_rows": 1, "delimiter": delimiter, "header": header}
    if not header:
        table["columns"] = ["a", "b"]
    schema = parse_schema({"table": table, "features": {"a": {"type": "numeric", "bounds": [0, 1]}}}, source="s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(gzip.compress(content) if suffix == ".csv.gz" and content[:1] == b"a" else content)
        try:
            frame = read_frame(schema, path)
            table_ = validate_frame(schema, frame, source=str(path))
        except FedPersonaError:
            tally("test_read_arbitrary_bytes", "refused")
            return
        _check_features(table_)
        tally("test_read_arbitrary_bytes", "accepted")


# --------------------------------------------------------------------------- TOML documents

TOML_SCALAR = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["inf", "-inf", "nan", "", "0", "true", "false", "rdp", "prv", "gdp", "median", "krum"]),
    st.dates(),
)


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


TOML_VALUE = st.recursive(TOML_SCALAR, _nested, max_leaves=6)


def _leaf_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(doc, dict):
        out = [prefix] if prefix else []
        for key, value in doc.items():
            out.extend(_leaf_paths(value, (*prefix, key)))
        return out
    if isinstance(doc, list):
        out = [prefix]
        for i, value in enumerate(doc):
            out.extend(_leaf_paths(value, (*prefix, i)))
        return out
    return [prefix]


def _set_path(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    if value is _DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


_DELETE = object()


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], extra_keys: list[tuple[str, ...]]) -> dict[str, Any]:
    """``base`` with one to three leaves replaced, deleted or added (known and unknown keys)."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _leaf_paths(doc) + extra_keys
        path = draw(st.sampled_from(paths))
        try:
            if draw(st.integers(0, 5)) == 0 and path and path in _leaf_paths(doc):
                _set_path(doc, path, _DELETE)
            else:
                _set_path(doc, path, draw(TOML_VALUE))
        except (KeyError, IndexError, TypeError):
            continue  # the path's parent was replaced by an earlier mutation
    return doc


def _write_toml(folder: Path, doc: dict[str, Any], name: str) -> Path | None:
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return None  # not representable in TOML (e.g. a list mixing tables and values)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _field_paths(section: str, names: list[str]) -> list[tuple[str, ...]]:
    return [(section, n) for n in names]


SCENARIO = tomllib.loads((REPO / "simulations" / "three_silos.toml").read_text())
SCENARIO_EXTRA = [
    *_field_paths("federation", ["server_lr", "global_weighting", "robust_aggregation", "trim_fraction",
                                 "max_update_norm", "round_timeout", "personas", "secure_aggregation"]),
    *_field_paths("privacy", ["planned_rounds", "accountant"]),
    *_field_paths("training", ["fedprox_mu", "device"]),
    ("silos", 0, "privacy"), ("silos", 0, "schema"), ("silos", 0, "source"), ("silos", 0, "small_partner_rows"),
    ("silos", 0, "seed"), ("silos", 0, "non_iid_alpha"), ("silos", 0, "typo"), ("bogus",),
]  # fmt: skip


def _usable_federation(fed: Any) -> None:
    """What the server does first with the federation settings: build its aggregator."""
    ScopedAggregator(
        optimizer=fed.server_optimizer,
        lr=fed.server_lr,
        global_weighting=fed.global_weighting,
        robust=fed.robust_aggregation,
        trim_fraction=fed.trim_fraction,
        max_update_norm=fed.max_update_norm,
    )
    assert isinstance(fed.round_timeout, int | float) and fed.round_timeout > 0


@tallied(0.12)
@FAST
@given(doc=mutated(SCENARIO, SCENARIO_EXTRA))
def test_scenario_loader_on_generated_documents(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_toml(Path(tmp), doc, "scenario.toml")
        if path is None:
            return
        try:
            scenario = load_scenario(path)
        except FedPersonaError:
            tally("test_scenario_loader_on_generated_documents", "refused")
            return
        _usable_federation(scenario.federation)
        for silo in scenario.silos:
            assert isinstance(silo.seed, int) and isinstance(silo.name, str)
            tally("test_scenario_loader_on_generated_documents", "accepted")


PARTNER = {
    "partner": {"name": "bank-1", "kind": "finance", "state_dir": "state"},
    "data": {"synthetic_rows": 100, "synthetic_seed": 1, "synthetic_mix": [0.5, 0.5], "test_fraction": 0.2},
    "privacy": {"target_epsilon": 3.0, "delta": 1e-6, "max_grad_norm": 1.0, "accountant": "rdp"},
    "release": {"share_eval_metrics": False, "audit_log": True},
}
PARTNER_EXTRA = [("data", "path"), ("data", "schema"), ("data", "public_rows"), ("privacy", "planned_rounds"),
                 ("release", "typo"), ("extra",)]  # fmt: skip


@tallied(0.04)
@FAST
@given(doc=mutated(PARTNER, PARTNER_EXTRA))
def test_partner_config_loader_on_generated_documents(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_toml(Path(tmp), doc, "client.toml")
        if path is None:
            return
        try:
            cfg = load_partner_config(path)
        except FedPersonaError:
            tally("test_partner_config_loader_on_generated_documents", "refused")
            return
        # What the partner then relies on: typed values, and release switches that are real booleans.
        assert isinstance(cfg.share_eval_metrics, bool) and isinstance(cfg.audit_log, bool)
        assert cfg.synthetic_rows is None or (isinstance(cfg.synthetic_rows, int) and cfg.synthetic_rows >= 1)
        assert isinstance(cfg.synthetic_seed, int) and (cfg.public_rows is None or isinstance(cfg.public_rows, int))
        if cfg.synthetic_mix is not None:
            assert all(math.isfinite(x) and x >= 0 for x in cfg.synthetic_mix) and sum(cfg.synthetic_mix) > 0
            tally("test_partner_config_loader_on_generated_documents", "accepted")


FEDERATION = tomllib.loads((REPO / "server" / "federation.toml").read_text())
FEDERATION_EXTRA = [("server", "expected_partners"), ("federation", "robust_aggregation"),
                    ("federation", "max_update_norm"), ("partners", 0, "typo"), ("partners",)]  # fmt: skip


@tallied(0.08)
@settings(FAST, report_multiple_bugs=False)
@given(doc=mutated(FEDERATION, FEDERATION_EXTRA))
def test_federation_config_loader_on_generated_documents(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_toml(Path(tmp), doc, "federation.toml")
        if path is None:
            return
        try:
            cfg = load_federation_config(path)
        except FedPersonaError:
            tally("test_federation_config_loader_on_generated_documents", "refused")
            return
        _usable_federation(cfg.federation)
        tally("test_federation_config_loader_on_generated_documents", "accepted")


SCHEMA = tomllib.loads((REPO / "clients" / "finance" / "schema.toml").read_text())
SCHEMA_EXTRA = [("table", "delimiter"), ("table", "columns"), ("table", "header"), ("table", "id"),
                ("events",), ("events", "user"), ("features", "new"), ("labels", "new")]  # fmt: skip


# The finance schema labels its codes (value_labels), and a label must name a code of the
# vocabulary: a mutated vocabulary is refused more often than before, hence 4% accepted.
@tallied(0.04)
@FAST
@given(doc=mutated(SCHEMA, SCHEMA_EXTRA))
def test_schema_loader_on_generated_documents(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_toml(Path(tmp), doc, "schema.toml")
        if path is None:
            return
        try:
            schema = load_schema(path)
        except FedPersonaError:
            tally("test_schema_loader_on_generated_documents", "refused")
            return
        layout = layout_of(schema)
        assert layout.n_tokens == len(schema.features)
        for feat in schema.features:
            if hasattr(feat, "lo"):
                assert math.isfinite(feat.lo) and math.isfinite(feat.hi) and math.isfinite(feat.hi - feat.lo)
        tally("test_schema_loader_on_generated_documents", "accepted")


@tallied(0.001)
@FAST
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_config_loaders_on_arbitrary_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file.toml"
        path.write_bytes(content)
        for loader in (load_scenario, load_partner_config, load_federation_config, load_schema):
            try:
                loader(path)
            except FedPersonaError:
                tally("test_config_loaders_on_arbitrary_bytes", "refused")
            else:
                tally("test_config_loaders_on_arbitrary_bytes", "accepted")


# --------------------------------------------------------------------------- the model registry

TOKEN = "fuzzing-token-0123456789"
SECRET = "TOP-SECRET-OUTSIDE-THE-ARTIFACTS-FOLDER"


def _request(app: Any, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    """One request to the ASGI app in process (httpx's ASGI transport: no socket, no server)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
            raw = {k.encode("latin-1"): v.encode("latin-1") for k, v in headers.items()}  # any byte 32-255
            response = await client.request(method, "http://registry" + path, headers=raw)
            await response.aread()
            return response

    return asyncio.run(go())


def _publish(root: Path, created: float) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedpersona.model.artifacts import save_model

    card = save_model(root, arrays={"trunk.w": np.ones((2, 2))}, card={"version": 1, "created": created},
                      key=Ed25519PrivateKey.generate())  # fmt: skip
    return f"{int(created)}-{card['weights_sha256'][:12]}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fedpersona.deploy.registry import build_registry_app

    base = tmp_path_factory.mktemp("registry")
    (base / "secret.txt").write_text(SECRET)
    (base / "card.json").write_text(json.dumps({"created": 1, "weights_sha256": "0" * 64, "secret": SECRET}))
    root = base / "artifacts"
    version = _publish(root / "v1", 1.7e9)
    return build_registry_app(root, token=TOKEN), version


SEGMENT = st.one_of(
    st.sampled_from(["..", ".", "%2e%2e", "%2E%2E%2F", "..%2f..%2fsecret.txt", "secret.txt", "card", "archive",
                     "latest", "v1", "models", "%00", "~", "//", "%2F", "card.json", "weights.npz", "....//"]),
    st.text(st.characters(codec="utf-8", exclude_characters="/?#"), max_size=12),
    st.just("{version}"),  # the one real version, so that some requests reach a file
)  # fmt: skip


def _check_answer(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:200])
    assert SECRET.encode() not in response.content
    if response.headers.get("content-type") == "application/gzip" and response.content:  # (empty for HEAD)
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            assert sorted(m.name for m in tar.getmembers()) == ["card.json", "signature.json", "weights.npz"]
            for member in tar.getmembers():
                assert SECRET.encode() not in tar.extractfile(member).read()  # type: ignore[union-attr]


@tallied(0.004)
@FAST
@given(
    segments=st.lists(SEGMENT, min_size=1, max_size=5),
    prefix=st.sampled_from(["/v1/models/", "/", "/v1/", "/healthz/", "/v1/models/{version}/"]),
    auth=st.one_of(
        st.just(f"Bearer {TOKEN}"),
        st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
        st.just("Bearer " + "x" * 70_000),
        st.just(f"bearer {TOKEN}"),
        st.just(f"Bearer {TOKEN} "),
    ),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]),
)
def test_registry_answers_generated_requests_with_4xx_never_5xx_or_outside_files(
    registry: Any, segments: list[str], prefix: str, auth: str, method: str
) -> None:
    app, version = registry
    # Raw characters are percent-encoded (as any client must); "%2e%2e"-style segments stay as written.
    path = prefix.replace("{version}", version) + "/".join(
        version if s == "{version}" else quote(s, safe="%~.") for s in segments
    )
    response = _request(app, method, path, {"Authorization": auth})
    _check_answer(response)
    if response.status_code == 200:
        assert (method in ("GET", "HEAD") and auth == f"Bearer {TOKEN}") or path.rstrip("/") == "/healthz"
    tally(
        "test_registry_answers_generated_requests_with_4xx_never_5xx_or_outside_files",
        "accepted" if response.status_code == 200 else "refused",
    )


@tallied(0.3)
@FUZZ
@given(
    headers=st.tuples(
        st.dictionaries(
            st.text(
                st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=20
            ),
            st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=2000),
            max_size=20,
        ),
        st.booleans(),  # half of the requests also carry the right token (other headers must not matter)
    ).map(lambda drawn: {**drawn[0], "Authorization": f"Bearer {TOKEN}"} if drawn[1] else drawn[0]),
    route=st.sampled_from(
        ["/v1/models", "/v1/models/latest", "/v1/models/{version}/card", "/v1/models/{version}/archive"]
    ),
)
def test_registry_with_generated_headers(registry: Any, headers: dict[str, str], route: str) -> None:
    app, version = registry
    response = _request(app, "GET", route.replace("{version}", version), headers)
    _check_answer(response)
    authorized = any(k.lower() == "authorization" and v == f"Bearer {TOKEN}" for k, v in headers.items())
    assert response.status_code == (200 if authorized else 401)
    tally("test_registry_with_generated_headers", "accepted" if response.status_code == 200 else "refused")


# --------------------------------------------------------------------------- regressions (one per bug found)


def _registry_listing(root: Path) -> httpx.Response:
    from fedpersona.deploy.registry import build_registry_app

    return _request(build_registry_app(root), "GET", "/v1/models", {})


@pytest.mark.parametrize("created", ["NaN", "1e999", "-1e999"])
def test_regression_a_card_with_a_non_finite_time_is_skipped_not_a_500(tmp_path: Path, created: str) -> None:
    """json.loads accepts NaN and 1e999; int(created) then raised and every request got a 500."""
    good = _publish(tmp_path / "good", 1.7e9)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("weights.npz", "signature.json"):
        (bad / name).write_bytes(b"x")
    (bad / "card.json").write_text(f'{{"created": {created}, "weights_sha256": "{"a" * 64}"}}')
    response = _registry_listing(tmp_path)
    assert response.status_code == 200
    assert [v["version"] for v in response.json()["versions"]] == [good]


def test_regression_links_out_of_the_artifacts_folder_are_never_served(tmp_path: Path) -> None:
    """A linked folder (or a linked weights.npz) pointing outside the artifacts folder was
    listed, and its files went out in the archive."""
    root = tmp_path / "artifacts"
    good = _publish(root / "good", 1.7e9)
    outside = tmp_path / "outside"
    _publish(outside, 1.8e9)
    (outside / "weights.npz").write_text(SECRET)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    for name in ("card.json", "signature.json"):
        (sneaky / name).write_bytes((root / "good" / name).read_bytes())
    (tmp_path / "secret.txt").write_text(SECRET)
    (sneaky / "weights.npz").symlink_to(tmp_path / "secret.txt")  # same version as "good", sorted after it
    response = _registry_listing(root)
    assert [v["version"] for v in response.json()["versions"]] == [good]
    from fedpersona.deploy.registry import build_registry_app

    archive = _request(build_registry_app(root), "GET", f"/v1/models/{good}/archive", {})
    _check_answer(archive)
    assert archive.status_code == 200


def _load(tmp_path: Path, loader: Any, doc: dict[str, Any]) -> Any:
    path = tmp_path / "file.toml"
    path.write_text(tomli_w.dumps(doc))
    return loader(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (("release", "share_eval_metrics"), "false"),  # bool("false") is True: metrics were shared
        (("release", "audit_log"), 1),
        (("data", "synthetic_seed"), [1]),
        (("data", "synthetic_rows"), "100"),
        (("data", "synthetic_mix"), ["a"]),
        (("data", "synthetic_mix"), 5),
        (("data", "public_rows"), -1),
    ],
)
def test_regression_partner_config_types_are_checked_when_read(
    tmp_path: Path, key: tuple[str, str], value: Any
) -> None:
    from fedpersona.errors import ConfigError

    doc = copy.deepcopy(PARTNER)
    doc[key[0]][key[1]] = value
    with pytest.raises(ConfigError, match=f"{key[0]}.{key[1]}"):
        _load(tmp_path, load_partner_config, doc)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server_optimizer", ["fedavg"]),
        ("server_lr", "1"),
        ("global_weighting", 1),
        ("robust_aggregation", "mode"),
        ("trim_fraction", [0.1]),
        ("max_update_norm", "10"),
        ("max_update_norm", math.inf),
        ("round_timeout", "soon"),
    ],
)
def test_regression_federation_settings_are_checked_when_read(tmp_path: Path, key: str, value: Any) -> None:
    """These were only checked (or crashed with TypeError) when the server built its aggregator."""
    from fedpersona.errors import ConfigError

    doc = copy.deepcopy(SCENARIO)
    doc["federation"][key] = value
    with pytest.raises(ConfigError, match=f"federation.{key}"):
        _load(tmp_path, load_scenario, doc)


@pytest.mark.parametrize(("key", "value"), [("source", True), ("schema", ["a.toml"]), ("seed", "1"), ("name", 3)])
def test_regression_silo_types_are_checked_when_read(tmp_path: Path, key: str, value: Any) -> None:
    from fedpersona.errors import ConfigError

    doc = copy.deepcopy(SCENARIO)
    doc["silos"][0][key] = value
    with pytest.raises(ConfigError, match=key):
        _load(tmp_path, load_scenario, doc)


def test_regression_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    from fedpersona.errors import ConfigError

    path = tmp_path / "scenario.toml"
    path.write_bytes(b"[federation]\nrounds = 1 # \xff\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(path)


@pytest.mark.parametrize(
    ("where", "value", "fragment"),
    [
        (("table", "delimiter"), [","], "table.delimiter"),  # a list is unhashable: was a TypeError
        (("features", "AGE", "type"), ["numeric"], "features.AGE.type"),
        (("features", "AGE", "bounds"), [0, math.inf], "finite"),
        (("features", "AGE", "bounds"), [-1e308, 1e308], "finite span"),
    ],
)
def test_regression_schema_values_of_the_wrong_type(
    tmp_path: Path, where: tuple[str, ...], value: Any, fragment: str
) -> None:
    from fedpersona.errors import SchemaError

    doc = copy.deepcopy(SCHEMA)
    _set_path(doc, where, value)
    with pytest.raises(SchemaError, match=fragment):
        _load(tmp_path, load_schema, doc)
