"""The Flower ClientApp: what leaves a partner, and how it refuses work."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedpersona.config.files import dump_toml
from fedpersona.config.settings import ModelSettings, TrainingSettings
from fedpersona.federation.client_app import build_client_app
from fedpersona.federation.messages import decode_arrays, encode_arrays, encode_settings
from fedpersona.model.encoder import PersonaTrunk
from fedpersona.model.scopes import parameter_scope
from fedpersona.privacy.manifest import ERROR_CODES, parse_error_reason

MODEL = ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1)
TRAINING = TrainingSettings(batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)


def _client_toml(tmp_path: Path, *, epsilon: float | str = 2.0, rows: int = 200) -> Path:
    path = tmp_path / "client.toml"
    dump_toml(
        path,
        {
            "partner": {"name": "clinic-x", "kind": "health", "state_dir": "state"},
            "data": {"synthetic_rows": rows, "synthetic_seed": 3},
            "privacy": {"target_epsilon": epsilon, "delta": 1e-5},
        },
    )
    return path


def _trunk() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {f"trunk.{k}": v.numpy() for k, v in PersonaTrunk(MODEL).state_dict().items()}


def _message(kind: str, arrays: dict[str, np.ndarray] | None, **config: object) -> Message:
    content = RecordDict({"config": encode_settings(MODEL, TRAINING, num_rounds=2, seed=0, **config)})
    if arrays is not None:
        content["arrays"] = encode_arrays(arrays)
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=7,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type=kind,
    )  # fmt: skip
    return make_message(metadata, content)


def _context(path: Path) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"client-config": str(path)},
        state=RecordDict(),
        run_config={},
    )


def test_train_reply_carries_only_shared_parameters(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _context(_client_toml(tmp_path))
    info = app(_message("query", None), ctx).content["info"]
    # rows is the declared public count (here the training share of synthetic_rows), and the
    # reply carries the ledger's epsilon.
    assert info["kind"] == "health" and info["rows"] == 160 and info["private"]
    assert "train_rows" not in info and info["epsilon"] == 0.0
    reply = app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = decode_arrays(reply.content["arrays"])
    scopes = {parameter_scope(name) for name in sent}
    assert scopes == {"global", "kind"}
    assert 0 < reply.content["metrics"]["epsilon"] <= 2.0
    assert reply.content["metrics"]["num-examples"] == 160
    # An unshared adapter stays home too: only the trunk leaves.
    reply = app(_message("train", _trunk(), round=2, adapter_shared=False), ctx)
    assert {parameter_scope(n) for n in decode_arrays(reply.content["arrays"])} == {"global"}
    local = torch.load(tmp_path / "state" / "local.pt", weights_only=True)
    assert any(k.startswith("recon_head.") for k in local)
    assert any(k.startswith("adapter.") for k in local)
    assert not any(k.startswith("trunk.") for k in local)


def test_evaluation_metrics_stay_local_unless_shared(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _context(_client_toml(tmp_path))
    app(_message("query", None), ctx)
    app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
    reply = app(_message("evaluate", _trunk(), round=1, adapter_shared=True), ctx)
    assert set(reply.content["metrics"]) == {"epsilon"}  # share_eval_metrics defaults to false
    log = (tmp_path / "state" / "eval.jsonl").read_text()
    assert "label_auc" in log and "probe_auc" in log


def test_budget_refusal_and_bad_data_are_error_replies(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _context(_client_toml(tmp_path, epsilon=0.5))
    app(_message("query", None), ctx)
    for rnd in (1, 2):
        assert not app(_message("train", _trunk(), round=rnd, adapter_shared=True), ctx).has_error()
    refused = app(_message("train", _trunk(), round=3, adapter_shared=True), ctx)
    assert refused.has_error() and refused.error.code == ERROR_CODES["privacy-budget"]
    # The refusal says why in one word and carries the ledger's epsilon, nothing else.
    category, epsilon = parse_error_reason(refused.error.reason)
    ledger = [json.loads(line) for line in (tmp_path / "state" / "ledger.jsonl").read_text().splitlines()]
    assert category == "privacy-budget" and epsilon == pytest.approx(ledger[-1]["epsilon_after"])
    assert set(json.loads(refused.error.reason or "")) == {"category", "epsilon"}

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "data.csv").write_text("a,b\n1,2\n")
    (broken / "schema.toml").write_text(
        '[table]\nkind = "health"\n[features.age]\ntype = "numeric"\nbounds = [0, 120]\n'
    )
    dump_toml(
        broken / "client.toml",
        {
            "partner": {"name": "b", "kind": "health"},
            "data": {"path": "data.csv", "schema": "schema.toml"},
        },
    )
    reply = app(_message("query", None), _context(broken / "client.toml"))
    assert reply.has_error() and reply.error.code == ERROR_CODES["data"]
    assert parse_error_reason(reply.error.reason) == ("data", 0.0)  # nothing spent yet


def test_a_poisoned_cell_never_reaches_the_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A cell holding personal data makes validation fail: the message quoting it is logged at the
    # partner; the error reply carries a fixed code and category only.
    folder = tmp_path / "clinic"
    folder.mkdir()
    rows = ["user_id,bmi"] + [f"u{i},{20 + i % 10}" for i in range(40)]
    rows[8] = "u7,HIV+ (see chart of J. Doe)"
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    (folder / "schema.toml").write_text(
        '[table]\nkind = "health"\nid = "user_id"\n[features.bmi]\ntype = "numeric"\nbounds = [10, 80]\n'
    )
    dump_toml(
        folder / "client.toml",
        {
            "partner": {"name": "c", "kind": "health", "state_dir": "state"},
            "data": {"path": "data.csv", "schema": "schema.toml", "public_rows": 30},
        },
    )
    app = build_client_app()
    with caplog.at_level("ERROR", logger="fedpersona"):
        reply = app(_message("query", None), _context(folder / "client.toml"))
    assert reply.has_error() and reply.error.code == ERROR_CODES["data"]
    sent = f"{reply.error.code} {reply.error.reason}"
    for secret in ("HIV", "Doe", "chart", "bmi", "u7", "row"):
        assert secret not in sent
    assert "HIV+ (see chart of J. Doe)" in caplog.text  # the operator still sees what is wrong


def test_identical_private_rounds_release_different_values(tmp_path: Path) -> None:
    # Two partners with the same data, config and messages: secret randomness makes their
    # releases differ, so nothing the coordinator knows predicts the noise.
    releases = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        app = build_client_app()
        ctx = _context(_client_toml(folder))
        app(_message("query", None), ctx)
        reply = app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
        assert not reply.has_error()
        releases.append(decode_arrays(reply.content["arrays"]))
    differ = [n for n in releases[0] if not np.array_equal(releases[0][n], releases[1][n])]
    assert len(differ) == len(releases[0])


def test_a_retried_round_draws_fresh_noise(tmp_path: Path) -> None:
    import shutil

    app = build_client_app()
    ctx = _context(_client_toml(tmp_path))
    app(_message("query", None), ctx)
    shutil.copytree(tmp_path / "state", tmp_path / "before")
    first = decode_arrays(app(_message("train", _trunk(), round=1, adapter_shared=True), ctx).content["arrays"])
    # Put the partner back exactly where it was (same state, same message): the release differs.
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "before", tmp_path / "state")
    again = decode_arrays(
        app(_message("train", _trunk(), round=1, adapter_shared=True), _context(tmp_path / "client.toml")).content[
            "arrays"
        ]
    )
    assert all(not np.array_equal(first[n], again[n]) for n in first)


def test_the_coordinator_cannot_regenerate_the_persona_noise(tmp_path: Path) -> None:
    # The attack of the audit: seed a generator with what the server knows (federation seed,
    # partner name, round), regenerate the Gram release's noise and subtract it. With public
    # seeding the offset entry would give gamma^2 x the exact row count; with secret randomness
    # the residual stays noise.
    import hashlib
    import json

    app = build_client_app()
    ctx = _context(_client_toml(tmp_path))
    assert not app(_message("query", None, persona_releases=7, persona_share=0.6), ctx).has_error()
    config = {"persona.kind": "gram", "persona.soft": False, "persona.metric": "euclid", "persona.row_clip": 5.0,
              "persona.offset": 5.0, "persona.count_noise": 3.0, "persona.k": 0, "persona.dims": 0}  # fmt: skip
    content = RecordDict(
        {
            "config": encode_settings(MODEL, TRAINING, num_rounds=2, seed=0, round=3, **config),
            "persona": encode_arrays({}),
        }
    )
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=7,
        reply_to_message_id="", group_id="3", created_at=time.time(), ttl=3600.0,
        message_type="query.persona_release",
    )  # fmt: skip
    reply = app(make_message(metadata, content), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    gram = reply.content["release"]["gram"].numpy().astype(np.float64)
    plan = json.loads((tmp_path / "state" / "plan.json").read_text())
    std = float(plan["gram_noise"]) * (5.0**2 + 5.0**2)
    assert std > 0
    entries = [json.loads(line) for line in (tmp_path / "state" / "ledger.jsonl").read_text().splitlines()]
    assert [e["mechanism"] for e in entries] == ["dp-gram"]  # charged before it was computed
    digest = hashlib.sha256("/".join(str(p) for p in (0, "clinic-x", 3, "dp-gram")).encode()).digest()
    public = np.random.default_rng(int.from_bytes(digest[:8], "little") & (2**62 - 1))
    guess = (gram - public.normal(0.0, std, size=gram.shape))[-1] / 25.0  # the offset entry: gamma^2 n
    assert abs(guess - round(guess)) > 1e-3  # not the exact row count


def test_reproducible_noise_is_explicit_and_labelled(tmp_path: Path) -> None:
    releases = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        path = _client_toml(folder)
        path.write_text(path.read_text().replace("[privacy]\n", "[privacy]\nnoise_seed = 11\n"))
        app = build_client_app()
        ctx = _context(path)
        info = app(_message("query", None), ctx).content["info"]
        assert info["noise_seeds_known"] is True
        releases.append(
            decode_arrays(app(_message("train", _trunk(), round=1, adapter_shared=True), ctx).content["arrays"])
        )
    assert all(np.array_equal(releases[0][n], releases[1][n]) for n in releases[0])


def test_a_partner_that_requires_secure_aggregation_refuses_plain_releases(tmp_path: Path) -> None:
    path = _client_toml(tmp_path)
    path.write_text(path.read_text() + "\n[release]\nrequire_secure_aggregation = true\n")
    app = build_client_app()
    ctx = _context(path)
    assert app(_message("query", None), ctx).content["info"]["require_secure_aggregation"] is True
    reply = app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
    assert reply.has_error() and reply.error.code == ERROR_CODES["policy"]
    assert not (tmp_path / "state" / "ledger.jsonl").read_text().count("dp-sgd")  # refused before any charge


def test_rolled_back_ledger_is_detected(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _context(_client_toml(tmp_path))
    app(_message("query", None), ctx)
    app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
    (tmp_path / "state" / "ledger.jsonl").unlink()
    reply = app(_message("train", _trunk(), round=2, adapter_shared=True), ctx)
    assert reply.has_error() and reply.error.code == ERROR_CODES["ledger"]


def test_a_deleted_or_truncated_ledger_is_refused_by_a_fresh_process(tmp_path: Path) -> None:
    # A new node (empty Context.state, as after a restart) still refuses: the state folder
    # remembers what was charged (ledger.head, plan.json).
    path = _client_toml(tmp_path)
    app = build_client_app()
    app(_message("query", None), _context(path))
    for rnd in (1, 2):
        app(_message("train", _trunk(), round=rnd, adapter_shared=True), _context(path))
    ledger = tmp_path / "state" / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[:1]))  # truncated to its first entry
    reply = app(_message("train", _trunk(), round=3, adapter_shared=True), _context(path))
    assert reply.has_error() and reply.error.code == ERROR_CODES["ledger"]
    ledger.unlink()
    (tmp_path / "state" / "ledger.head").unlink()  # both gone; the plan of earlier rounds remains
    reply = app(_message("query", None), _context(path))
    assert reply.has_error() and reply.error.code == ERROR_CODES["ledger"]


def test_every_reply_matches_the_release_manifest_and_is_audited(tmp_path: Path) -> None:
    from fedpersona.privacy.manifest import MANIFEST, ReleaseError, check_outgoing

    path = _client_toml(tmp_path)
    text = path.read_text() + "\n[release]\naudit_log = true\n"
    path.write_text(text)
    app = build_client_app()
    ctx = _context(path)
    app(_message("query", None), ctx)
    app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
    log = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [e["message_type"] for e in log] == ["query", "train"]
    assert log[0]["items"][-1]["key"] in {i["key"] for i in log[0]["items"]}
    train = log[1]
    assert train["ledger_entry"] == 1 and train["round"] == 1
    keys = {i["key"] for i in train["items"] if i["record"] == "arrays"}
    assert keys and all(k.startswith(("trunk.", "adapter.")) for k in keys)
    assert train["bytes"] == sum(i["bytes"] for i in train["items"])

    sneaky = RecordDict({"metrics": MetricRecord({"epsilon": 1.0, "mean_income": 52000.0})})
    with pytest.raises(ReleaseError, match="mean_income"):
        check_outgoing("train", sneaky, share_eval_metrics=True)
    opt_in = RecordDict({"metrics": MetricRecord({"label_auc": 0.8})})
    with pytest.raises(ReleaseError, match="share_eval_metrics is false"):
        check_outgoing("evaluate", opt_in, share_eval_metrics=False)
    assert check_outgoing("evaluate", opt_in, share_eval_metrics=True)[0].status == "opt-in"
    # docs/privacy.md shows the same table: each item's message, record, key and status.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    rows = []
    for line in docs.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5:
            rows.append(cells)
    for item in MANIFEST:
        matches = [
            r
            for r in rows
            if item.message in [m.strip() for m in r[0].split(",")] and r[1] == item.record and f"`{item.key}`" in r[2]
        ]
        assert len(matches) == 1, f"{item.message} {item.record} {item.key}: {len(matches)} rows in docs/privacy.md"
        assert matches[0][3].lower() == item.status, f"{item.key}: docs say {matches[0][3]}, the manifest {item.status}"


def test_the_client_app_module_starts_without_the_learning_stack() -> None:
    """Every deployed message starts a process that imports the ClientApp: the status, final
    model and key-exchange messages must not pay for PyTorch, Opacus and scikit-learn."""
    probe = (
        "import sys, fedpersona.federation.client_app; "
        "print(sorted(m for m in ('torch', 'opacus', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
    # Admission and training need PyTorch, not Opacus (book-keeping clipping) or scikit-learn
    # (evaluation and persona cards import it when they run).
    probe = probe.replace("client_app", "partner, fedpersona.federation.partner_personas, fedpersona.model.training")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "['torch']"
