"""The final model reaches every partner: verified against the federation's key, installed in
``state_dir/model``, usable by ``fedpersona infer`` without the registry; anything else is
refused with an error reply and leaves the installed model alone."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from typer.testing import CliRunner

from fedpersona.cli import app as cli
from fedpersona.config.files import dump_toml
from fedpersona.config.settings import ModelSettings, TrainingSettings
from fedpersona.data.dense import dense_views
from fedpersona.data.features import layout_of
from fedpersona.data.schema import Schema, slot_id
from fedpersona.data.synthetic import generate_frame, synthetic_schema
from fedpersona.data.tables import validate_frame
from fedpersona.federation.client_app import build_client_app
from fedpersona.model.artifacts import artifact_files, generate_signing_key, save_model, verify_model
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.personas.mixture import Mixture
from fedpersona.personas.protocol import PersonaResult, result_to_json
from fedpersona.personas.space import fit_space, gram_release
from fedpersona.privacy.manifest import ERROR_CODES

TRAINING = TrainingSettings(batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)
MODEL = {"architecture": "encoder", "token_dim": 8, "embed_dim": 8, "hidden": 8, "blocks": 1}


def _publish(
    folder: Path, key_path: Path, *, created: float | None = None, rounds: int = 2, personas: bool = True
) -> Path:
    """A signed global model as the server publishes it, for the synthetic e-commerce schema."""
    schema = synthetic_schema("ecommerce")
    torch.manual_seed(0)
    model = PersonaEncoder(layout_of(schema), ModelSettings(**MODEL))
    slot = slot_id(schema.kind, schema.fingerprint())
    arrays = {}
    for name, value in model.state_dict().items():
        if name.startswith("trunk."):
            arrays[name] = value.numpy().copy()
        elif name.startswith("adapter."):
            arrays[f"{slot}/{name}"] = value.numpy().copy()
    key = (
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if key_path.exists()
        else generate_signing_key(key_path)
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path.with_suffix(".pub").write_bytes(public)
    card = {
        "version": 1, "created": created or time.time(), "rounds": rounds, "model": dict(MODEL), "slots": [slot],
        "personas": {"k": 4, "method": "test", "slots": {slot: _personas(schema)}} if personas else None,
    }  # fmt: skip
    save_model(folder, arrays=arrays, card=card, key=key)  # type: ignore[arg-type]
    return folder


def _personas(schema: Schema) -> dict[str, Any]:
    """Released personas for ``schema``'s slot: a space from an exact Gram matrix of generated
    rows and four random centres, as the model card carries them."""
    table = validate_frame(schema, generate_frame(schema.kind, 300, rng=np.random.default_rng(5))[0], source="x")
    x = dense_views(table).persona.astype(np.float64)
    space = fit_space(
        gram_release(x, clip=5.0, offset=5.0, noise_multiplier=0.0, randomness=None),
        dim=x.shape[1], dims=4, row_clip=5.0, offset=5.0,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    mixture = Mixture(centres=rng.normal(0, 0.5, (4, 4)), weights=np.full(4, 0.25), covariance=np.eye(4))
    return result_to_json(PersonaResult(space=space, mixture=mixture, shares=np.full(4, 0.25)))


def _client(tmp_path: Path) -> Path:
    path = tmp_path / "partner" / "client.toml"
    path.parent.mkdir()
    dump_toml(
        path,
        {
            "partner": {"name": "shop-9", "kind": "ecommerce", "state_dir": "state"},
            "data": {"synthetic_rows": 100, "synthetic_seed": 2},
            "privacy": {"target_epsilon": 3.0, "delta": 1e-3, "accountant": "rdp"},
        },
    )
    return path


def _delivery(folder: Path) -> Message:
    content = RecordDict({"artifact": ConfigRecord(artifact_files(folder)), "config": ConfigRecord({"round": 2})})  # type: ignore[arg-type]
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id="final", created_at=time.time(), ttl=3600.0, message_type="query.final_model",
    )  # fmt: skip
    return make_message(metadata, content)


def _context(client: Path, key: Path | None) -> Context:
    node = {"client-config": str(client)}
    if key is not None:
        node["model-public-key"] = str(key)
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})  # type: ignore[arg-type]


def test_the_partner_installs_the_signed_final_model_and_infers_with_it(tmp_path: Path) -> None:
    federation_key = tmp_path / "server" / "model-signing.key"
    published = _publish(tmp_path / "server" / "model", federation_key)
    client = _client(tmp_path)
    reply = build_client_app()(_delivery(published), _context(client, federation_key.with_suffix(".pub")))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # Nothing leaves the partner for it but its ledger's epsilon (which every reply carries).
    assert set(reply.content.keys()) == {"metrics"} and set(reply.content["metrics"]) == {"epsilon"}
    installed = client.parent / "state" / "model"
    public = serialization.load_pem_public_key(federation_key.with_suffix(".pub").read_bytes())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    arrays, card = verify_model(installed, public_key=raw)
    assert card["rounds"] == 2 and arrays.keys() == verify_model(published)[0].keys()

    users = tmp_path / "users.csv"
    generate_frame("ecommerce", 50, rng=np.random.default_rng(0))[0].to_csv(users, index=False)
    out = tmp_path / "personas.csv"
    done = CliRunner().invoke(
        cli,
        ["infer", "--model", str(installed), "--config", str(client), "--data", str(users), "--out", str(out),
         "--public-key", str(federation_key.with_suffix(".pub"))],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert len(out.read_text().splitlines()) == 51


def test_a_model_signed_by_another_key_or_modified_is_refused_and_the_old_one_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    federation_key = tmp_path / "server" / "model-signing.key"
    client = _client(tmp_path)
    context = _context(client, federation_key.with_suffix(".pub"))
    app = build_client_app()
    good = _publish(tmp_path / "server" / "model", federation_key, created=1000.0)
    assert not app(_delivery(good), context).has_error()
    installed = client.parent / "state" / "model"
    before = {name: (installed / name).read_bytes() for name in ("weights.npz", "card.json", "signature.json")}

    forged = _publish(tmp_path / "elsewhere" / "model", tmp_path / "elsewhere" / "other.key", created=2000.0)
    reply = app(_delivery(forged), context)
    assert reply.has_error() and reply.error.code == ERROR_CODES["model"]
    assert "does not verify against the federation's model-signing key" in caplog.text

    modified = _publish(tmp_path / "server" / "model2", federation_key, created=3000.0)
    weights = bytearray((modified / "weights.npz").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (modified / "weights.npz").write_bytes(bytes(weights))
    assert app(_delivery(modified), context).has_error()

    older = _publish(tmp_path / "server" / "model3", federation_key, created=500.0)
    reply = app(_delivery(older), context)
    assert reply.has_error() and "older than the one in" in caplog.text

    assert {name: (installed / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in installed.parent.iterdir() if p.name.startswith("model")) == ["model"]


def test_without_the_federation_key_the_partner_says_how_to_give_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    published = _publish(tmp_path / "server" / "model", tmp_path / "server" / "model-signing.key")
    client = _client(tmp_path)
    reply = build_client_app()(_delivery(published), _context(client, None))
    assert reply.has_error() and reply.error.code == ERROR_CODES["config"]
    assert "model-signing.pub" in caplog.text and "--model-key" in caplog.text
    assert not (client.parent / "state" / "model").exists()


def test_a_round_the_partner_already_paid_for_is_charged_again_when_sent_again(tmp_path: Path) -> None:
    """Partner side of a resume: a round that was sent but never aggregated before the server
    crashed is sent again; the partner trains it again and its ledger charges it again (a new
    release with fresh noise). Rounds the checkpoint holds are never sent again."""
    from fedpersona.config.settings import PrivacySettings
    from fedpersona.federation.messages import encode_arrays, encode_settings
    from fedpersona.model.encoder import PersonaTrunk
    from fedpersona.privacy.ledger import PrivacyLedger

    model_cfg = ModelSettings(**MODEL)
    client = _client(tmp_path)
    torch.manual_seed(0)
    trunk = {f"trunk.{k}": v.numpy() for k, v in PersonaTrunk(model_cfg).state_dict().items()}
    app = build_client_app()
    context = _context(client, None)

    def train(rnd: int) -> Message:
        content = RecordDict(
            {
                "config": encode_settings(
                    model_cfg, TRAINING, num_rounds=2, seed=0, round=rnd, adapter_shared=True,
                ),
                "arrays": encode_arrays(trunk),
            }
        )  # fmt: skip
        metadata = Metadata(
            run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=7, reply_to_message_id="",
            group_id=str(rnd), created_at=time.time(), ttl=3600.0, message_type="train",
        )  # fmt: skip
        return app(make_message(metadata, content), context)

    first = train(1)
    again = train(1)
    assert not first.has_error() and not again.has_error()
    ledger = PrivacyLedger(client.parent / "state", settings=PrivacySettings())
    assert [e.round for e in ledger.entries] == [1, 1]
    assert again.content["metrics"]["epsilon"] > first.content["metrics"]["epsilon"]


def test_a_model_with_no_rounds_fewer_rounds_or_no_personas_never_replaces_a_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedpersona.model.artifacts import model_versions

    key = tmp_path / "server" / "model-signing.key"
    client = _client(tmp_path)
    app, context = build_client_app(), _context(client, key.with_suffix(".pub"))
    installed = client.parent / "state" / "model"
    good = _publish(tmp_path / "server" / "good", key, created=1000.0, rounds=5)
    assert not app(_delivery(good), context).has_error()
    before = (installed / "card.json").read_bytes()
    for name, rounds, personas, why in (
        ("empty", 0, False, "trained no round"),
        ("short", 2, True, "fewer than the 5"),
        ("faceless", 5, False, "carries no personas"),
    ):
        caplog.clear()
        reply = app(
            _delivery(_publish(tmp_path / "server" / name, key, created=2000.0, rounds=rounds, personas=personas)),
            context,
        )
        assert reply.has_error() and reply.error.code == ERROR_CODES["model"], name
        assert why in caplog.text, name
        assert (installed / "card.json").read_bytes() == before, name
    # A better model replaces it; the replaced one is kept and can be reinstalled.
    better = _publish(tmp_path / "server" / "better", key, created=3000.0, rounds=6)
    assert not app(_delivery(better), context).has_error()
    versions = model_versions(installed)
    assert [(v["version"].startswith("v001"), v["rounds"]) for v in versions] == [(False, 6), (True, 5)]
    done = CliRunner().invoke(
        cli, ["partner", "rollback", "--config", str(client), "--model-key", str(key.with_suffix(".pub"))]
    )
    assert done.exit_code == 0, done.output
    assert (installed / "card.json").read_bytes() == before
    assert [v["rounds"] for v in model_versions(installed)] == [5, 6]
    listed = CliRunner().invoke(cli, ["partner", "models", "--config", str(client)])
    assert listed.exit_code == 0 and "v002" in listed.output


def test_infer_refuses_a_forged_model_with_the_default_arguments(tmp_path: Path) -> None:
    key = tmp_path / "server" / "model-signing.key"
    _publish(tmp_path / "server" / "model", key)
    client = _client(tmp_path)
    users = tmp_path / "users.csv"
    generate_frame("ecommerce", 20, rng=np.random.default_rng(0))[0].to_csv(users, index=False)
    forged = _publish(tmp_path / "elsewhere" / "model", tmp_path / "elsewhere" / "other.key")
    args = ["infer", "--model", str(forged), "--config", str(client), "--data", str(users)]
    runner = CliRunner()
    # Without the federation's key anywhere, infer refuses to run an unverifiable model.
    done = runner.invoke(cli, [*args, "--out", str(tmp_path / "a.csv")])
    assert done.exit_code != 0 and "cannot check who made the model" in str(done.exception or done.output)
    # With credentials/model-signing.pub beside client.toml (as a partner kit has it), the
    # forged model is refused by default.
    (client.parent / "credentials").mkdir()
    (client.parent / "credentials" / "model-signing.pub").write_bytes(key.with_suffix(".pub").read_bytes())
    done = runner.invoke(cli, [*args, "--out", str(tmp_path / "b.csv")])
    assert done.exit_code != 0 and "signature does not verify" in str(done.exception or done.output)
    assert not (tmp_path / "b.csv").exists()
    # --no-verify runs a model folder the user made, loudly.
    done = runner.invoke(cli, [*args, "--out", str(tmp_path / "c.csv"), "--no-verify"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "c.csv").exists()
