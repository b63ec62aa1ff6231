"""The Flower ClientApp: what leaves a partner, and how it refuses work."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedpersona.client_app import ERROR_BUDGET, ERROR_USER, build_client_app
from fedpersona.config import dump_toml
from fedpersona.encoder import EncoderConfig, PersonaTrunk, parameter_scope
from fedpersona.messages import decode_arrays, encode_arrays, encode_settings
from fedpersona.training import TrainingSettings

MODEL = EncoderConfig(token_dim=8, embed_dim=8, hidden=8, blocks=1)
TRAINING = TrainingSettings(batch_size=32, local_epochs=1)


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
    assert info["kind"] == "health" and info["rows"] == 200 and info["private"]
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
    assert refused.has_error() and refused.error.code == ERROR_BUDGET
    assert "above the target 0.5" in (refused.error.reason or "")

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
    assert reply.has_error() and reply.error.code == ERROR_USER
    assert "age" in (reply.error.reason or "") and "data.csv" in (reply.error.reason or "")


def test_rolled_back_ledger_is_detected(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _context(_client_toml(tmp_path))
    app(_message("query", None), ctx)
    app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
    (tmp_path / "state" / "ledger.jsonl").unlink()
    reply = app(_message("train", _trunk(), round=2, adapter_shared=True), ctx)
    assert reply.has_error() and "rolled back" in (reply.error.reason or "")


def test_every_reply_matches_the_release_manifest_and_is_audited(tmp_path: Path) -> None:
    from fedpersona.manifest import MANIFEST, ReleaseError, check_outgoing

    path = _client_toml(tmp_path)
    text = path.read_text() + "\n[release]\naudit_log = true\n"
    path.write_text(text)
    app = build_client_app()
    ctx = _context(path)
    app(_message("query", None), ctx)
    app(_message("train", _trunk(), round=1, adapter_shared=True), ctx)
    log = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [e["message_type"] for e in log] == ["query", "train"]
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
    docs = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    for item in MANIFEST:
        assert f"`{item.key}`" in docs, item.key
