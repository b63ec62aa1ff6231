"""Hostile or broken replies never reach the global model; robust trunk aggregation.

Three levels: :meth:`ScopedAggregator.screen` on one reply at a time (every class of bad
reply, each named in the problem it reports), whole federation rounds through the real
ServerApp loop and ClientApp (a wrapper tampers with some partners' replies; the server must
log each offender, drop it and publish a finite model equal to the honest partners' average),
and the robust aggregators (median, trimmed mean, Krum) against independent numpy references.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
from flwr.app import Context, Message, RecordDict

from fedpersona.config.settings import FederationSettings, ModelSettings, TrainingSettings
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.federation.messages import decode_arrays, encode_arrays
from fedpersona.federation.server_app import ServerSettings, run_federation
from fedpersona.model.encoder import PersonaTrunk
from tests.fake_grid import FakeGrid, client_app_nodes, partner_context

MODEL = ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1)
TRAINING = TrainingSettings(batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)


def _trunk(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {f"trunk.{k}": v.numpy().copy() for k, v in PersonaTrunk(MODEL).state_dict().items()}


def _near(trunk: dict[str, np.ndarray], rng: np.random.Generator, scale: float = 0.01) -> dict[str, np.ndarray]:
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in trunk.items()}


# --------------------------------------------------------------------------- screen()


def _screening_aggregator(max_update_norm: float | None = 5.0) -> ScopedAggregator:
    agg = ScopedAggregator(max_update_norm=max_update_norm)
    agg.trunk = _trunk()
    agg.adapters = {"health:abc": {"adapter.scalar_proj.weight": np.zeros((8, 3), np.float32)}}
    return agg


def _reply(agg: ScopedAggregator, change: Callable[[dict[str, np.ndarray]], None], slot: str | None) -> PartnerUpdate:
    arrays = {k: v.copy() for k, v in agg.arrays_for(slot).items()}
    change(arrays)
    return PartnerUpdate("mallory", slot, arrays, 100, kind="health")


FIRST = "trunk.mix.weight"  # (8, 16): transposing it changes its shape


def _set(key: str, value: Any) -> Callable[[dict[str, np.ndarray]], None]:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = value(arrays[key]) if callable(value) else value

    return change


def _drop(key: str) -> Callable[[dict[str, np.ndarray]], None]:
    def change(arrays: dict[str, np.ndarray]) -> None:
        del arrays[key]

    return change


BAD_REPLIES: list[tuple[str, Callable[[dict[str, np.ndarray]], None], str | None, str]] = [
    ("nan", _set(FIRST, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a)), None, "1 non-finite"),
    ("inf", _set(FIRST, lambda a: np.full_like(a, np.inf)), None, "non-finite"),
    ("-inf in an adapter", _set("adapter.scalar_proj.weight", lambda a: a - np.inf), "health:abc", "non-finite"),
    ("transposed", _set(FIRST, lambda a: np.ascontiguousarray(a.T)), None, "has shape"),
    ("flattened", _set(FIRST, lambda a: a.ravel()), None, "has shape"),
    ("adapter shape", _set("adapter.scalar_proj.weight", np.zeros((8, 4), np.float32)), "health:abc", "has shape"),
    ("int64", _set(FIRST, lambda a: a.astype(np.int64)), None, "dtype int64"),
    ("bool", _set(FIRST, lambda a: a > 0), None, "dtype bool"),
    ("complex", _set(FIRST, lambda a: a.astype(np.complex64)), None, "dtype complex64"),
    ("float64 where float32", _set(FIRST, lambda a: a.astype(np.float64)), None, "expected float32"),
    ("float16 where float32", _set(FIRST, lambda a: a.astype(np.float16)), None, "expected float32"),
    ("unknown prefix", _set("evil.backdoor", np.zeros(3, np.float32)), None, "unknown key 'evil.backdoor'"),
    ("unknown trunk key", _set("trunk.backdoor", np.zeros(3, np.float32)), None, "unknown key 'trunk.backdoor'"),
    ("unknown adapter key", _set("adapter.extra", np.zeros(3, np.float32)), "health:abc", "unknown key 'adapter."),
    ("local head", _set("recon_head.0.weight", np.zeros(3, np.float32)), None, "local parameter"),
    ("adapter without a slot", _set("adapter.x", np.zeros(3, np.float32)), None, "adapter is local"),
    ("missing trunk key", _drop(FIRST), None, "missing trunk keys"),
    ("missing adapter key", _drop("adapter.scalar_proj.weight"), "health:abc", "missing adapter keys"),
    ("norm above bound", _set(FIRST, lambda a: a + 1.0), None, "above federation.max_update_norm"),
    ("finite but huge", _set(FIRST, lambda a: np.full_like(a, 3e38)), None, "above federation.max_update_norm"),
]


@pytest.mark.parametrize(("change", "slot", "expected"), [c[1:] for c in BAD_REPLIES], ids=[c[0] for c in BAD_REPLIES])
def test_screen_names_each_broken_or_hostile_reply(
    change: Callable[[dict[str, np.ndarray]], None], slot: str | None, expected: str
) -> None:
    agg = _screening_aggregator()
    assert agg.screen(_reply(agg, lambda arrays: None, slot)) == []  # the untouched reply passes
    problems = agg.screen(_reply(agg, change, slot))
    assert any(expected in p for p in problems), problems


def test_update_norm_bound_is_the_l2_norm_of_reply_minus_global() -> None:
    agg = _screening_aggregator(max_update_norm=5.0)
    size = sum(v.size for v in agg.trunk.values())
    # The same per-value shift spread over every trunk value: norm = shift * sqrt(size).
    just_below, just_above = 4.99 / np.sqrt(size), 5.01 / np.sqrt(size)
    below = {k: (v + np.float32(just_below)).astype(np.float32) for k, v in agg.trunk.items()}
    above = {k: (v + np.float32(just_above)).astype(np.float32) for k, v in agg.trunk.items()}
    assert agg.screen(PartnerUpdate("a", None, below, 10)) == []
    assert "above federation.max_update_norm 5" in agg.screen(PartnerUpdate("b", None, above, 10))[0]


def test_regression_float64_reply_cannot_overflow_the_float32_global_model() -> None:
    """Regression: a float64 reply of 1e200 is finite, so it used to pass screen() without a
    norm bound and turned the float32 global model into inf when cast back."""
    agg = _screening_aggregator(max_update_norm=None)
    hostile = {k: np.full(v.shape, 1e200, dtype=np.float64) for k, v in agg.trunk.items()}
    assert any("expected float32" in p for p in agg.screen(PartnerUpdate("m", None, hostile, 10)))


def test_regression_extra_trunk_key_is_rejected_instead_of_crashing_the_round() -> None:
    """Regression: a reply with one extra ``trunk.*`` key passed screen() and then made
    aggregate() raise (replies carry different keys), which stopped the whole federation."""
    agg = _screening_aggregator(max_update_norm=None)
    honest = PartnerUpdate("h", None, dict(agg.trunk), 10)
    extra = PartnerUpdate("m", None, {**agg.trunk, "trunk.backdoor": np.zeros(2, np.float32)}, 10)
    assert agg.screen(honest) == [] and agg.screen(extra) != []
    with pytest.raises(ValueError, match="different keys"):
        agg.aggregate([honest, extra])  # what happened when the reply got through


def _first_round_slot(hostile_adapter: np.ndarray) -> tuple[ScopedAggregator, list[PartnerUpdate]]:
    agg = ScopedAggregator(max_update_norm=5.0)
    agg.trunk = _trunk()
    honest = np.zeros((8, 3), np.float32)
    updates = [
        PartnerUpdate(name, "health:abc", {**agg.trunk, "adapter.scalar_proj.weight": adapter}, 100)
        for name, adapter in (("a", honest), ("b", honest + 0.01), ("mallory", hostile_adapter))
    ]
    return agg, updates


def test_first_round_wrong_shaped_adapter_is_rejected() -> None:
    agg, updates = _first_round_slot(np.zeros((3, 8), np.float32))
    honest_a, honest_b, mallory = agg.screen_round(updates)
    assert honest_a == [] and honest_b == []
    assert mallory == ["'adapter.scalar_proj.weight' has shape (3, 8), the global model (8, 3)"]
    agg.aggregate(updates[:2])  # the survivors aggregate; no crash
    np.testing.assert_allclose(agg.adapters["health:abc"]["adapter.scalar_proj.weight"], 0.005, rtol=1e-6)


def test_first_round_huge_adapter_is_rejected() -> None:
    agg, updates = _first_round_slot(np.full((8, 3), 1e30, np.float32))
    honest_a, honest_b, mallory = agg.screen_round(updates)
    assert honest_a == [] and honest_b == []
    assert len(mallory) == 1 and "above federation.max_update_norm 5" in mallory[0]


def test_first_round_without_a_majority_refuses_the_slot() -> None:
    agg, updates = _first_round_slot(np.zeros((3, 8), np.float32))
    results = agg.screen_round(updates[1:])  # one honest, one wrong-shaped: no majority
    assert all(r == ["no majority of slot health:abc's first replies agrees on the adapter's shapes"] for r in results)


# --------------------------------------------------------------------------- the server loop


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has: Flower's task identity, which Message() reads."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


Tamper = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class TamperingGrid(FakeGrid):
    """The shared in-process grid with the real ClientApp at every node; rewrites the train
    replies of the nodes in ``tamper`` and keeps what every partner really sent, by node."""

    def __init__(self, contexts: dict[int, Context], tamper: dict[int, Tamper]) -> None:
        super().__init__(client_app_nodes(contexts), rewrite=self._tampered)
        self.tamper = tamper
        self.sent_arrays: dict[int, dict[str, np.ndarray]] = {}

    def _tampered(self, msg: Message, reply: Message) -> Message:
        node = msg.metadata.dst_node_id
        has_arrays = not reply.has_error() and "arrays" in list(reply.content.array_records.keys())
        if msg.metadata.message_type != "train" or not has_arrays:
            return reply
        arrays = decode_arrays(reply.content["arrays"])
        if node in self.tamper:
            arrays = self.tamper[node](arrays)
            content = RecordDict({"arrays": encode_arrays(arrays), "metrics": reply.content["metrics"]})
            reply = Message(content, reply_to=msg)
        self.sent_arrays[node] = arrays
        return reply


def _partners(tmp_path: Path, names: list[str]) -> dict[int, Context]:
    contexts = {}
    for node, name in enumerate(names, start=11):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        contexts[node] = partner_context(
            folder,
            node,
            {
                "partner": {"name": name, "kind": "health", "state_dir": "state"},
                "data": {"synthetic_rows": 100, "synthetic_seed": node},
                # Not private: DP is not what these rounds test, and noise planning is the slow part.
                "privacy": {"target_epsilon": "inf"},
            },
        )
    return contexts


def _settings(run_dir: Path, **federation: Any) -> ServerSettings:
    fed = FederationSettings(rounds=1, personas=0, global_weighting="examples", **federation)
    return ServerSettings(federation=fed, model=MODEL, training=TRAINING, run_dir=str(run_dir), wait_timeout=1.0)


def _poison(key_change: Callable[[dict[str, np.ndarray]], None]) -> Tamper:
    def tamper(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: v.copy() for k, v in arrays.items()}
        key_change(arrays)
        return arrays

    return tamper


def _first_trunk_key(arrays: dict[str, np.ndarray]) -> str:
    return sorted(k for k in arrays if k.startswith("trunk."))[0]


def _nan(arrays: dict[str, np.ndarray]) -> None:
    key = _first_trunk_key(arrays)
    arrays[key] = np.full_like(arrays[key], np.nan)


def _transpose(arrays: dict[str, np.ndarray]) -> None:
    key = "trunk.mix.weight"  # (8, 16)
    arrays[key] = np.ascontiguousarray(arrays[key].T)


def _as_int(arrays: dict[str, np.ndarray]) -> None:
    key = _first_trunk_key(arrays)
    arrays[key] = arrays[key].astype(np.int32)


def _backdoor(arrays: dict[str, np.ndarray]) -> None:
    arrays["trunk.backdoor"] = np.ones(4, np.float32)


def _scaled(arrays: dict[str, np.ndarray]) -> None:
    for key in [k for k in arrays if k.startswith("trunk.")]:
        arrays[key] = (arrays[key] * 1000.0).astype(np.float32)


HOSTILE: dict[str, tuple[Tamper, str]] = {
    "nan": (_poison(_nan), "non-finite"),
    "shape": (_poison(_transpose), "has shape"),
    "dtype": (_poison(_as_int), "dtype int32"),
    "backdoor": (_poison(_backdoor), "unknown key 'trunk.backdoor'"),
    "boost": (_poison(_scaled), "above federation.max_update_norm"),
}


@pytest.mark.slow
def test_server_drops_every_hostile_reply_logs_it_and_publishes_the_honest_mean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["clinic-a", "clinic-b", *HOSTILE]
    contexts = _partners(tmp_path, names)
    node_of = {name: node for node, name in zip(contexts, names, strict=True)}
    grid = TamperingGrid(contexts, {node_of[n]: tamper for n, (tamper, _) in HOSTILE.items()})
    caplog.set_level(logging.WARNING, logger="fedpersona.federation.server_app")
    result = run_federation(grid, _settings(tmp_path / "run", max_update_norm=50.0))
    assert result.rounds_completed == 1

    for name, (_, reason) in HOSTILE.items():
        logged = [r.getMessage() for r in caplog.records if f"rejected the reply of {name}:" in r.getMessage()]
        assert len(logged) == 1 and reason in logged[0], (name, logged)
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())["partners"]
    assert {n for n, p in privacy.items() if "reply rejected" in p.get("dropped", "")} == set(HOSTILE)
    assert not any("dropped" in privacy[n] for n in ("clinic-a", "clinic-b"))

    # The published model is finite and is exactly the honest partners' example-weighted mean
    # (FedAvg with server lr 1 replaces the trunk and the adapter by it).
    model = np.load(tmp_path / "run" / "model" / "weights.npz")
    honest = [grid.sent_arrays[node_of[n]] for n in ("clinic-a", "clinic-b")]
    rows = [80, 80]  # 100 synthetic rows, 20 % held out at each partner
    for name in model.files:
        assert np.all(np.isfinite(model[name])), name
        key = name.split("/", 1)[1] if "/" in name else name
        expected = np.average([h[key].astype(np.float64) for h in honest], axis=0, weights=rows)
        np.testing.assert_allclose(model[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert {n.split("/", 1)[-1] for n in model.files} == set(honest[0])


@pytest.mark.slow
def test_median_in_the_server_loop_resists_a_partner_sending_huge_finite_values(tmp_path: Path) -> None:
    """No norm bound: the attacker's reply passes screening, and robust_aggregation does the work."""
    names = ["clinic-1", "clinic-2", "clinic-3", "clinic-4", "attacker"]
    contexts = _partners(tmp_path, names)

    def attack(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.full_like(v, 1e6) if k.startswith("trunk.") else v for k, v in arrays.items()}

    grid = TamperingGrid(contexts, {15: attack})
    run_federation(grid, _settings(tmp_path / "run", robust_aggregation="median"))
    model = np.load(tmp_path / "run" / "model" / "weights.npz")
    replies = [grid.sent_arrays[node] for node in sorted(contexts)]
    honest = replies[:4]
    for name in (n for n in model.files if n.startswith("trunk.")):
        stacked = np.stack([r[name].astype(np.float64) for r in replies])
        np.testing.assert_allclose(model[name], np.median(stacked, axis=0), rtol=1e-6, atol=1e-7, err_msg=name)
        honest_mean = np.mean([h[name] for h in honest], axis=0)
        spread = np.ptp(np.stack([h[name] for h in honest]), axis=0)
        assert np.all(np.abs(model[name] - honest_mean) <= spread + 1e-6), name


# --------------------------------------------------------------------------- robust aggregators


def _krum_reference(flat: np.ndarray, f: int) -> int:
    """Blanchard et al. (2017): score(i) = sum of squared distances to its n - f - 2 nearest
    other vectors; Krum picks the vector with the smallest score."""
    n = len(flat)
    scores = []
    for i in range(n):
        others = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(others[: max(1, n - f - 2)]))
    return int(np.argmin(scores))


def _updates(values: list[dict[str, np.ndarray]]) -> list[PartnerUpdate]:
    # Different example counts and kinds: the robust rules must ignore the weights.
    return [
        PartnerUpdate(f"p{i}", None, arrays, 50 * (i + 1), kind=("health", "finance")[i % 2])
        for i, arrays in enumerate(values)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("robust", ["median", "trimmed_mean", "krum"])
def test_robust_trunk_equals_an_independent_reference(robust: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = _trunk()
    n = int(rng.integers(5, 9))
    replies = [_near(base, rng, scale=float(rng.uniform(0.01, 1.0))) for _ in range(n)]
    agg = ScopedAggregator(robust=robust, trim_fraction=0.2)
    agg.aggregate(_updates(replies))
    names = sorted(base)
    stacked = {k: np.stack([r[k].astype(np.float64) for r in replies]) for k in names}
    if robust == "median":
        expected = {k: np.median(stacked[k], axis=0) for k in names}
    elif robust == "trimmed_mean":
        expected = {k: scipy.stats.trim_mean(stacked[k], 0.2, axis=0) for k in names}
    else:
        flat = np.stack([np.concatenate([r[k].astype(np.float64).ravel() for k in names]) for r in replies])
        expected = {k: replies[_krum_reference(flat, f=1)][k] for k in names}
    for k in names:
        assert agg.trunk[k].dtype == base[k].dtype
        np.testing.assert_allclose(agg.trunk[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("robust", ["median", "trimmed_mean", "krum"])
def test_one_attacker_in_five_moves_robust_aggregates_little_and_fedavg_a_lot(robust: str) -> None:
    rng = np.random.default_rng(7)
    base = _trunk()
    honest = [_near(base, rng, scale=0.05) for _ in range(4)]
    attacker = {k: np.full_like(v, 1e6) for k, v in base.items()}
    honest_mean = {k: np.mean([h[k] for h in honest], axis=0) for k in base}

    def distance(trunk: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(np.sum((trunk[k].astype(np.float64) - honest_mean[k]) ** 2) for k in base)))

    honest_spread = max(distance(h) for h in honest)  # how far any single honest reply is
    robust_agg = ScopedAggregator(robust=robust, trim_fraction=0.2, global_weighting="examples")
    robust_agg.aggregate(_updates([*honest, attacker]))
    plain = ScopedAggregator(global_weighting="examples")
    plain.aggregate(_updates([*honest, attacker]))
    assert distance(robust_agg.trunk) <= honest_spread
    assert distance(plain.trunk) > 1e4 * honest_spread
    for k in base:
        assert np.all(np.isfinite(robust_agg.trunk[k]))


def test_robust_rules_fall_back_to_the_weighted_mean_below_three_replies() -> None:
    rng = np.random.default_rng(3)
    base = _trunk()
    replies = [_near(base, rng), _near(base, rng)]
    agg = ScopedAggregator(robust="median", global_weighting="examples")
    agg.aggregate(_updates(replies))
    for k in base:
        expected = np.average([r[k].astype(np.float64) for r in replies], axis=0, weights=[50, 100])
        np.testing.assert_allclose(agg.trunk[k], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kept", ["metrics", "arrays"])
def test_a_reply_missing_a_record_drops_its_sender_not_the_federation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kept: str
) -> None:
    contexts = _partners(tmp_path, ["clinic-1", "clinic-2", "broken"])
    grid = TamperingGrid(contexts, {})
    deliver = grid.nodes[13]

    def broken(msg: Message) -> Message:
        reply = deliver(msg)
        assert isinstance(reply, Message)
        if msg.metadata.message_type == "train":
            return Message(RecordDict({kept: reply.content[kept]}), reply_to=msg)
        return reply

    grid.nodes[13] = broken
    caplog.set_level(logging.WARNING, logger="fedpersona.federation.server_app")
    result = run_federation(grid, _settings(tmp_path / "run"))
    assert result.rounds_completed == 1
    assert any("broken" in r.getMessage() for r in caplog.records)
