"""Secure aggregation: the server sees only sums, and they equal plaintext scoped aggregation."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

import fedpersona.federation.client_app as client_app
import fedpersona.federation.secagg as secagg
import fedpersona.federation.secure_round as secure_round
from fedpersona.config.settings import FederationSettings, ModelSettings, TrainingSettings
from fedpersona.errors import ConfigError
from fedpersona.federation.aggregation import ScopedAggregator
from fedpersona.federation.checkpoint import load_checkpoint
from fedpersona.federation.client_app import build_client_app
from fedpersona.federation.messages import encode_arrays, encode_settings
from fedpersona.federation.secagg import (
    SecAggParams,
    SecureAggregationError,
    encode_update,
    mask_vector,
    quantize,
    receive_shares,
    reveal_shares,
    share_keys,
    start_round,
)
from fedpersona.federation.secure_round import SecureRound, VectorLayout, as_updates
from fedpersona.federation.server_app import NothingTrained, ServerSettings, run_federation
from fedpersona.privacy.manifest import ReleaseError, check_outgoing, parse_error_reason
from tests.fake_grid import FakeGrid, client_app_nodes, partner_context

PARAMS = SecAggParams(threshold=3, clipping_range=4.0, quantization_range=2**16, modulus_bits=32)
TRUNK = {"trunk.w": (30, 40), "trunk.b": (40,)}
ADAPTERS = {"shop:1": {"adapter.e": (5, 2)}, "bank:9": {"adapter.e": (3,), "adapter.f": (2, 2)}}


def _arrays(slot: str | None, rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    shapes = dict(TRUNK) | (ADAPTERS[slot] if slot else {})
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}


def _run_protocol(
    members: list[tuple[str | None, dict[str, np.ndarray], int]],
    *,
    params: SecAggParams = PARAMS,
    lose_masked: Iterable[int] = (),
    seed: int = 0,
) -> tuple[SecureRound, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Play every stage with in-process partners (nodes 100, 101, ...); returns the server's
    round, what each partner would send unmasked, and what the server received."""
    nodes = {100 + i: m for i, m in enumerate(members)}
    sec = SecureRound(server_round=1, params=params, members={n: m[0] for n, m in nodes.items()}, trunk_shapes=TRUNK)
    secrets, public = {}, {}
    for n, (_, arrays, _) in nodes.items():
        secrets[n], public[n] = start_round(server_round=1, index=sec.setup_config(n)["secagg.index"], params=params)
        sec.add_keys(n, public[n]["mask_key"], public[n]["share_key"], {k: v.shape for k, v in arrays.items()})
    bundle = {int(i): (pair[0], pair[1]) for i, pair in sec.key_bundle().items()}
    for n in sec.joined:
        secrets[n], ciphertexts = share_keys(secrets[n], bundle)
        sec.add_ciphertexts(n, sorted(ciphertexts), [ciphertexts[d] for d in sorted(ciphertexts)])
    sec.start_masking()
    plain, received = {}, {}
    rng = np.random.default_rng(seed)
    for n in sec.sharers:
        sources, ciphertexts = sec.forwarded(n)
        secrets[n] = receive_shares(secrets[n], dict(zip(sources, ciphertexts, strict=True)))
        _, arrays, count = nodes[n]
        plain[n] = encode_update(
            arrays, num_examples=count, placement=sec.placement(n), params=params, generator=rng
        )  # fmt: skip
        masked, secrets[n] = mask_vector(secrets[n], plain[n])
        if n in set(lose_masked):
            continue  # the partner trained and masked, but its reply never arrived
        received[n] = masked
        sec.add_masked(n, masked)
    survivors, dropped = sec.unmask_request()
    for i in survivors:
        n = sec.node[i]
        shares, secrets[n] = reveal_shares(secrets[n], survivors=survivors, dropped=dropped)
        sec.add_shares(n, shares)
    return sec, plain, received


def _plaintext(members: list[tuple[str | None, dict[str, np.ndarray], int]]) -> ScopedAggregator:
    """The oracle: per scope, np.average over its members weighted by their example counts."""
    oracle = ScopedAggregator()
    counts = [n for _, _, n in members]
    oracle.trunk = {k: np.average([a[k] for _, a, _ in members], axis=0, weights=counts) for k in TRUNK}
    for slot in {s for s, _, _ in members if s}:
        mine = [(a, n) for s, a, n in members if s == slot]
        names = ADAPTERS[slot]
        weights = [n for _, n in mine]
        oracle.adapters[slot] = {k: np.average([a[k] for a, _ in mine], axis=0, weights=weights) for k in names}
    return oracle


def _secure(sec: SecureRound) -> ScopedAggregator:
    """What the server applies: the unmasked means, through the scoped aggregator."""
    agg = ScopedAggregator()
    agg.aggregate(as_updates(*sec.result()))
    return agg


def _max_error(a: ScopedAggregator, b: ScopedAggregator) -> float:
    assert set(a.trunk) == set(b.trunk) and set(a.adapters) == set(b.adapters)
    errors = [np.abs(a.trunk[k] - b.trunk[k]).max() for k in a.trunk]
    for slot, adapter in a.adapters.items():
        assert set(adapter) == set(b.adapters[slot])
        errors += [np.abs(adapter[k] - b.adapters[slot][k]).max() for k in adapter]
    return float(max(errors))


def _members(seed: int = 1) -> list[tuple[str | None, dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    slots: list[str | None] = ["shop:1", "shop:1", "bank:9", "bank:9", None]
    return [(slot, _arrays(slot, rng), n) for slot, n in zip(slots, [120, 300, 45, 80, 999], strict=True)]


def test_secure_sum_equals_plaintext_scoped_aggregation_within_one_quantization_step() -> None:
    members = _members()
    sec, _, _ = _run_protocol(members)
    error = _max_error(_plaintext(members), _secure(sec))
    # Each coordinate is a weighted mean of values each rounded by less than one step.
    assert error <= PARAMS.step, (error, PARAMS.step)
    assert PARAMS.step == pytest.approx(8.0 / 2**16)


def test_one_dropout_is_recovered_two_dropouts_abort_before_any_share_is_asked() -> None:
    rng = np.random.default_rng(2)
    members = [("shop:1", _arrays("shop:1", rng), n) for n in (50, 70, 90)]
    majority = replace(PARAMS, threshold=2)  # a strict majority of three
    sec, _, received = _run_protocol(members, params=majority, lose_masked=[101])
    assert set(received) == {100, 102}
    survivors = [members[0], members[2]]
    assert _max_error(_plaintext(survivors), _secure(sec)) <= PARAMS.step

    with pytest.raises(SecureAggregationError, match=r"only 1 partner\(s\) sent masked vectors, fewer than"):
        _run_protocol(members, params=majority, lose_masked=[100, 101])


def test_partners_refuse_a_threshold_below_a_strict_majority() -> None:
    # With five partners and a threshold of 2, a deviating server could ask two partners for a
    # victim's mask-key shares ("it dropped") and two others for its seed shares ("it
    # survived"), and unmask the victim's own update. Partners refuse such a round.
    low = replace(PARAMS, threshold=2)
    started = [start_round(server_round=1, index=i, params=low) for i in range(1, 6)]
    keys = {i: (pub["mask_key"], pub["share_key"]) for i, (_, pub) in enumerate(started, start=1)}
    with pytest.raises(SecureAggregationError, match="not a strict majority of the 5 partners"):
        share_keys(started[0][0], keys)
    assert secagg.strict_majority(5) == 3 and secagg.strict_majority(4) == 3 and secagg.strict_majority(3) == 2


def test_with_a_majority_threshold_the_split_view_attack_fails() -> None:
    # The attack above against five partners and threshold 3: the server tells partners 1-3
    # that the victim (5) dropped and partner 4 that it survived. It gets 3 shares of the
    # victim's mask key but only 1 of its seed, so it cannot remove the victim's own mask;
    # and a partner asked for both (survivor and dropped) in one request refuses.
    members = [("shop:1", _arrays("shop:1", np.random.default_rng(9)), n) for n in (10, 20, 30, 40, 50)]
    nodes = {100 + i: m for i, m in enumerate(members)}
    sec = SecureRound(server_round=1, params=PARAMS, members={n: m[0] for n, m in nodes.items()}, trunk_shapes=TRUNK)
    secrets, public = {}, {}
    for n, (_, arrays, _) in nodes.items():
        secrets[n], public[n] = start_round(server_round=1, index=sec.setup_config(n)["secagg.index"], params=PARAMS)
        sec.add_keys(n, public[n]["mask_key"], public[n]["share_key"], {k: v.shape for k, v in arrays.items()})
    bundle = {int(i): (pair[0], pair[1]) for i, pair in sec.key_bundle().items()}
    for n in sec.joined:
        secrets[n], ciphertexts = share_keys(secrets[n], bundle)
        sec.add_ciphertexts(n, sorted(ciphertexts), [ciphertexts[d] for d in sorted(ciphertexts)])
    sec.start_masking()
    for n in sec.sharers:
        sources, ciphertexts = sec.forwarded(n)
        secrets[n] = receive_shares(secrets[n], dict(zip(sources, ciphertexts, strict=True)))
        vector = encode_update(
            nodes[n][1], num_examples=nodes[n][2], placement=sec.placement(n), params=PARAMS,
            generator=np.random.default_rng(0),
        )  # fmt: skip
        _, secrets[n] = mask_vector(secrets[n], vector)
    key_shares, seed_shares = [], []
    for index in (1, 2, 3):  # "5 dropped"
        shares, secrets[sec.node[index]] = reveal_shares(secrets[sec.node[index]], survivors=[1, 2, 3, 4], dropped=[5])
        key_shares.append(shares[5])
    shares, secrets[sec.node[4]] = reveal_shares(secrets[sec.node[4]], survivors=[1, 2, 3, 4, 5], dropped=[])
    seed_shares.append(shares[5])
    assert len(key_shares) >= PARAMS.threshold > len(seed_shares)
    for index in (1, 2, 3, 4):  # nobody answers a second request in the same round
        with pytest.raises(SecureAggregationError, match="expected 'masked'"):
            reveal_shares(secrets[sec.node[index]], survivors=[1, 2, 3, 4, 5], dropped=[])
    with pytest.raises(SecureAggregationError, match="both survivor and dropped"):
        reveal_shares(secrets[sec.node[5]], survivors=[1, 2, 3, 4, 5], dropped=[5])


def test_every_masked_vector_is_far_from_its_partners_plain_vector() -> None:
    sec, plain, received = _run_protocol(_members(3))
    modulus = 2.0**PARAMS.modulus_bits

    def quarters(vector: np.ndarray) -> np.ndarray:
        return np.bincount((vector.astype(np.float64) / modulus * 4).astype(int), minlength=4) / vector.size

    assert received and set(received) <= set(plain)
    for node, masked in received.items():
        same = float(np.mean(masked == plain[node]))
        assert same < 0.01, (node, same)
        # Plain vectors are small numbers (count x 2**16 levels at most), all in the lowest
        # quarter of Z/2**32; masked ones fill the four quarters evenly (1280 values each).
        assert quarters(plain[node]).tolist() == [1.0, 0.0, 0.0, 0.0]
        assert np.all(np.abs(quarters(masked) - 0.25) < 0.1), quarters(masked)
    assert sec.total is not None and not any(np.array_equal(sec.total, v) for v in received.values())


def test_the_server_decodes_only_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[np.ndarray] = []
    real = secure_round.dequantize

    def spy(arrays: list[np.ndarray], clipping_range: float, target_range: int) -> list[np.ndarray]:
        decoded.append(np.array(arrays[0]))
        return real(arrays, clipping_range, target_range)

    monkeypatch.setattr(secure_round, "dequantize", spy)
    members = _members(4)
    sec, plain, _ = _run_protocol(members)
    sec.result()
    assert sec.layout is not None
    trunk = sec.layout.segments[0]
    assert len(decoded) == len(sec.layout.segments) == 3  # the trunk and two shared slots
    counts = {n: int(v[trunk.count_index]) for n, v in plain.items()}
    quantized = {n: v[trunk.offset : trunk.offset + trunk.size] / counts[n] for n, v in plain.items()}
    mean = sum(v[trunk.offset : trunk.offset + trunk.size].astype(np.float64) for v in plain.values())
    np.testing.assert_allclose(decoded[0], mean / sum(counts.values()))
    for node, own in quantized.items():
        assert not np.allclose(decoded[0], own), node


def test_partners_refuse_unsafe_requests() -> None:
    params = replace(PARAMS, threshold=2)  # a strict majority of three
    a, pa = start_round(server_round=3, index=1, params=params)
    b, pb = start_round(server_round=3, index=2, params=params)
    c, pc = start_round(server_round=3, index=3, params=params)
    keys = {
        1: (pa["mask_key"], pa["share_key"]),
        2: (pb["mask_key"], pb["share_key"]),
        3: (pc["mask_key"], pc["share_key"]),
    }
    with pytest.raises(SecureAggregationError, match="own keys"):
        share_keys(a, {**keys, 1: keys[2]})
    with pytest.raises(SecureAggregationError, match="same public key"):
        share_keys(c, {**keys, 1: (keys[2][0], keys[1][1])})
    a, to_others = share_keys(a, keys)
    b, _ = share_keys(b, keys)
    # A ciphertext for partner 2 relayed to partner 2 as if it came from partner 3.
    with pytest.raises(SecureAggregationError, match="does not decrypt"):
        receive_shares(b, {3: to_others[2]})
    b = receive_shares(b, {1: to_others[2]})
    layout = VectorLayout.build(TRUNK, {})
    vector = encode_update(
        _arrays(None, np.random.default_rng(0)), num_examples=10, placement=layout.placement(None),
        params=params, generator=np.random.default_rng(0),
    )  # fmt: skip
    _, b = mask_vector(b, vector)
    assert b.mask_private == b"" and b.seed == b""  # wiped once masked
    with pytest.raises(SecureAggregationError, match="both survivor and dropped"):
        reveal_shares(b, survivors=[1, 2], dropped=[1])
    with pytest.raises(SecureAggregationError, match="fewer than the threshold"):
        reveal_shares(b, survivors=[2], dropped=[1])
    shares, done = reveal_shares(b, survivors=[1, 2], dropped=[])
    assert set(shares) == {1, 2} and done.stage == "done" and done.seed_shares == ()
    with pytest.raises(SecureAggregationError, match="expected 'masked'"):
        reveal_shares(done, survivors=[1, 2], dropped=[])


def test_updates_are_checked_and_clipped_before_quantizing(caplog: pytest.LogCaptureFixture) -> None:
    layout = VectorLayout.build(TRUNK, {})
    arrays = _arrays(None, np.random.default_rng(0))
    arrays["trunk.b"][0] = np.nan
    with pytest.raises(SecureAggregationError, match="1 non-finite value"):
        encode_update(
            arrays, num_examples=5, placement=layout.placement(None), params=PARAMS, generator=np.random.default_rng(0)
        )
    arrays["trunk.b"][0] = 100.0
    arrays["trunk.b"][1] = -100.0
    with caplog.at_level(logging.WARNING, logger="fedpersona.federation.secagg"):
        vector = encode_update(
            arrays, num_examples=5, placement=layout.placement(None), params=PARAMS, generator=np.random.default_rng(0)
        )  # fmt: skip
    assert "2 of 1240 update values outside +-4 clipped" in caplog.text
    # trunk.b sorts first: its two clipped values decode to exactly +-clipping_range.
    trunk = layout.segments[0]
    levels = vector[trunk.offset : trunk.offset + 2] / 5
    assert levels.tolist() == [PARAMS.quantization_range, 0]
    with pytest.raises(SecureAggregationError, match="overflows a 32-bit sum"):
        encode_update(
            arrays,
            num_examples=2**16,
            placement=layout.placement(None),
            params=PARAMS,
            generator=np.random.default_rng(0),
        )


def test_quantization_is_seeded_and_unbiased() -> None:
    values = np.full(20_000, 0.123456)
    first = quantize(values, clipping_range=1.0, quantization_range=16, generator=np.random.default_rng(7))
    again = quantize(values, clipping_range=1.0, quantization_range=16, generator=np.random.default_rng(7))
    other = quantize(values, clipping_range=1.0, quantization_range=16, generator=np.random.default_rng(8))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert set(np.unique(first)) == {8, 9}  # (0.123456 + 1) * 8 = 8.99: its two neighbours only
    mean = first.mean() * 2 / 16 - 1
    assert mean == pytest.approx(0.123456, abs=4 * 0.125 / np.sqrt(values.size))


def test_settings_are_validated() -> None:
    assert not FederationSettings().secure_aggregation
    assert FederationSettings().secagg_threshold is None  # a strict majority of each round
    with pytest.raises(ConfigError, match=re.escape("federation.secagg_threshold: must be >= 2, got 1")):
        FederationSettings.checked(secagg_threshold=1)
    with pytest.raises(ConfigError, match=r"min_partners \(2\) must be >= federation.secagg_threshold \(3\)"):
        FederationSettings.checked(secure_aggregation=True, secagg_threshold=3)
    with pytest.raises(ConfigError, match="secagg_clipping_range") as info:
        FederationSettings.checked(secagg_clipping_range=float("inf"), secagg_quantization_range=1)
    assert "federation.secagg_quantization_range: must be >= 2, got 1" in str(info.value)
    with pytest.raises(ConfigError, match=re.escape("federation.secure_aggregation: must be true or false")):
        FederationSettings.checked(secure_aggregation="yes")
    with pytest.raises(SecureAggregationError, match="does not fit in 64 bits"):
        secagg.modulus_bits_for(2**40, 2**32)
    assert secagg.modulus_bits_for(18_000, 2**16) == 32 and secagg.modulus_bits_for(100_000, 2**16) == 64


# --------------------------------------------------------------------------- ClientApp level

MODEL = ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1)
TRAINING = TrainingSettings(batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has: Flower's task identity, which Message() reads."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def grid_of(contexts: dict[int, Context], lose: Iterable[tuple[str, int]] = ()) -> FakeGrid:
    """The shared in-process grid with fedpersona's real ClientApp at every node."""
    return FakeGrid(client_app_nodes(contexts), lose=lose)


def _partners(tmp_path: Path, specs: list[tuple[str, str, int]], *, seeded: bool = False) -> dict[int, Context]:
    """In-process partners; ``seeded`` gives each an explicit ``noise_seed`` (reproducible,
    labelled not private against the coordinator) so that two runs can be compared."""
    contexts = {}
    for node, (name, kind, rows) in enumerate(specs, start=11):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        # RDP plans the noise in milliseconds; PRV (the default) takes seconds per partner.
        privacy: dict[str, Any] = {"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"}
        if seeded:
            privacy["noise_seed"] = node
        contexts[node] = partner_context(
            folder,
            node,
            {
                "partner": {"name": name, "kind": kind, "state_dir": "state"},
                "data": {"synthetic_rows": rows, "synthetic_seed": node},
                "privacy": privacy,
                "release": {"audit_log": True},
            },
        )
    return contexts


def _settings(run_dir: Path, **federation: Any) -> ServerSettings:
    fed = FederationSettings(**{"rounds": 1, "secagg_clipping_range": 8.0, "personas": 0, **federation})
    return ServerSettings(federation=fed, model=MODEL, training=TRAINING, run_dir=str(run_dir), wait_timeout=1.0)


THREE = [("clinic-1", "health", 200), ("clinic-2", "health", 240), ("clinic-3", "health", 160)]


def test_client_app_round_matches_plaintext_and_the_server_sees_only_masked_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain_run = tmp_path / "plain"
    # Seeded noise (an explicit, labelled option) makes the two runs draw the same noise.
    run_federation(grid_of(_partners(plain_run, THREE, seeded=True)), _settings(plain_run))
    plain_model = np.load(plain_run / "model" / "weights.npz")

    sent_plain: dict[int, np.ndarray] = {}
    real_encode = client_app.encode_update

    def spy(arrays: dict[str, np.ndarray], **kwargs: Any) -> np.ndarray:
        vector = real_encode(arrays, **kwargs)
        sent_plain[kwargs["num_examples"]] = vector
        return vector

    monkeypatch.setattr(client_app, "encode_update", spy)
    secure_run = tmp_path / "secure"
    grid = grid_of(_partners(secure_run, THREE, seeded=True))
    result = run_federation(grid, _settings(secure_run, secure_aggregation=True))
    assert result.rounds_completed == 1 and not result.aborted
    types = [m.metadata.message_type for m in grid.messages]
    assert (
        types
        == ["query"] * 3
        + [
            t
            for t in ("query.secagg_setup", "query.secagg_share_keys", "train.secagg", "query.secagg_unmask")
            for _ in range(3)
        ]
        + ["evaluate"] * 3
        + ["query.status"] * 3
    )

    # What reached the server: no plain arrays anywhere, masked vectors unlike the plain ones.
    assert not any("arrays" in r.content for r in grid.replies)
    masked = [r.content["masked"]["vector"].numpy() for r in grid.replies if "masked" in r.content]
    assert len(masked) == 3 == len(sent_plain)
    for vector in masked:
        for plain in sent_plain.values():
            assert np.mean(vector == plain) < 0.01

    secure_model = np.load(secure_run / "model" / "weights.npz")
    assert set(secure_model.files) == set(plain_model.files)
    step = 2 * 8.0 / FederationSettings().secagg_quantization_range
    for name in plain_model.files:
        assert np.abs(secure_model[name] - plain_model[name]).max() <= step, name
    # The same DP training happened: the same epsilon is spent and reported.
    eps = [json.loads((run / "privacy.json").read_text())["partners"] for run in (plain_run, secure_run)]
    assert {k: v["epsilon"] for k, v in eps[0].items()} == {k: v["epsilon"] for k, v in eps[1].items()}
    audit = [json.loads(x) for x in (secure_run / "clinic-1" / "state" / "audit.jsonl").read_text().splitlines()]
    assert [e["message_type"] for e in audit][1:5] == [
        "query.secagg_setup", "query.secagg_share_keys", "train.secagg", "query.secagg_unmask",
    ]  # fmt: skip
    assert audit[3]["ledger_entry"] == 1


def test_persona_releases_are_summed_securely_when_secure_aggregation_is_on(tmp_path: Path) -> None:
    settings = {"personas": 2, "persona_steps": 3}  # the Gram release, 2 initialisation steps, 1 EM step
    plain_run = tmp_path / "plain"
    run_federation(grid_of(_partners(plain_run, THREE, seeded=True)), _settings(plain_run, **settings))
    secure_run = tmp_path / "secure"
    grid = grid_of(_partners(secure_run, THREE, seeded=True))
    result = run_federation(grid, _settings(secure_run, secure_aggregation=True, **settings))
    assert result.rounds_completed == 1 and not result.aborted
    types = [m.metadata.message_type for m in grid.messages]
    assert "query.persona_release" not in types and types.count("query.persona_release_secagg") == 3 * 4
    # No partner's own release reached the server: only masked vectors.
    assert not any("release" in r.content for r in grid.replies)
    plain, secure = load_checkpoint(plain_run), load_checkpoint(secure_run)
    assert plain is not None and secure is not None and plain.personas and secure.personas
    assert sorted(secure.personas["slots"]) == sorted(plain.personas["slots"])
    for slot, released in plain.personas["slots"].items():
        for name, value in released["arrays"].items():
            np.testing.assert_allclose(secure.personas["slots"][slot]["arrays"][name], value, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(
        secure.personas["shares_by_kind"]["health"], plain.personas["shares_by_kind"]["health"], atol=1e-3
    )
    ledger = [json.loads(x) for x in (secure_run / "clinic-2" / "state" / "ledger.jsonl").read_text().splitlines()]
    assert [e["mechanism"] for e in ledger] == ["dp-sgd", "dp-gram", "dp-em", "dp-em", "dp-em"]


def test_client_app_round_survives_one_dropout_and_aborts_on_two(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one = tmp_path / "one"
    grid = grid_of(_partners(one, THREE), lose=[("train.secagg", 12)])
    with caplog.at_level(logging.WARNING):
        result = run_federation(grid, _settings(one, secure_aggregation=True))
    assert result.rounds_completed == 1 and not result.aborted
    assert "1 partner(s) dropped after sharing keys" in caplog.text
    unmask = [m for m in grid.messages if m.metadata.message_type == "query.secagg_unmask"]
    assert sorted(m.metadata.dst_node_id for m in unmask) == [11, 13]
    assert (one / "model" / "weights.npz").exists()

    caplog.clear()
    two = tmp_path / "two"
    grid = grid_of(_partners(two, THREE), lose=[("train.secagg", 11), ("train.secagg", 12)])
    with caplog.at_level(logging.ERROR), pytest.raises(NothingTrained) as failed:
        run_federation(grid, _settings(two, secure_aggregation=True))
    aborted = "only 1 partner(s) sent masked vectors, fewer than federation.secagg_threshold = 2"
    assert aborted in str(failed.value)
    assert aborted in caplog.text and "nothing is published" in caplog.text
    assert not any(m.metadata.message_type in ("query.secagg_unmask", "evaluate") for m in grid.messages)
    assert not (two / "model").exists()
    assert (two / "privacy.json").exists()  # the epsilon spent on the aborted round is still reported


def test_secure_replies_are_declared_in_the_manifest(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _partners(tmp_path, THREE[:1])[11]
    # A train.secagg reply may carry a masked vector, never the plain arrays of a train reply.
    arrays = RecordDict({"arrays": encode_arrays({"trunk.w": np.zeros(2, dtype=np.float32)})})
    with pytest.raises(ReleaseError, match=r"'arrays\.trunk\.w' is not in the release manifest for 'train\.secagg'"):
        check_outgoing("train.secagg", arrays, share_eval_metrics=True)
    # Out-of-order protocol messages are refused with an error reply, not answered.
    msg = Message(
        RecordDict({"config": encode_settings(MODEL, TRAINING, num_rounds=1, seed=0, round=1)}),
        dst_node_id=11, message_type="query.secagg_unmask",
    )  # fmt: skip
    reply = app(msg, ctx)
    assert reply.has_error() and parse_error_reason(reply.error.reason)[0] == "secure-aggregation"


@pytest.mark.slow
def test_simulation_with_secure_aggregation(tmp_path: Path) -> None:
    scenario = tmp_path / "secure.toml"
    scenario.write_text(
        "[federation]\nrounds = 2\nmin_partners = 2\nsecure_aggregation = true\npersonas = 0\n"
        "[model]\ntoken_dim = 16\nembed_dim = 16\nhidden = 32\nblocks = 1\n"
        "[training]\nbatch_size = 32\nlocal_epochs = 1\n"
        "[privacy]\ntarget_epsilon = 2.0\ndelta = 1e-5\n"
        '[[silos]]\nkind = "ecommerce"\nname = "shop"\npartners = 2\nrows = 600\n'
        '[[silos]]\nkind = "health"\nname = "clinic"\npartners = 1\nrows = 300\n'
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "fedpersona.cli", "simulate", "--scenario", str(scenario), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    from fedpersona.model.artifacts import verify_model

    arrays, card = verify_model(out / "model")
    assert card["rounds"] == 2 and any(k.startswith("ecommerce:") for k in arrays)
    ledger = out / "partners" / "shop-1" / "state" / "ledger.jsonl"
    assert len(ledger.read_text().splitlines()) == 2
