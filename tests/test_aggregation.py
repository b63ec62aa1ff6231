"""Scoped aggregation against np.average, per scope."""

from __future__ import annotations

import numpy as np
import pytest

from fedpersona.errors import ConfigError
from fedpersona.federation.aggregation import PartnerUpdate, ScopedAggregator


def _update(name: str, slot: str | None, value: float, n: int, adapter: bool = True) -> PartnerUpdate:
    arrays = {"trunk.w": np.full((2, 3), value, dtype=np.float32)}
    if adapter:
        arrays["adapter.e"] = np.full(4, 10 * value, dtype=np.float32)
    return PartnerUpdate(name, slot, arrays, n)


def test_each_scope_is_the_weighted_average_of_its_members() -> None:
    agg = ScopedAggregator(global_weighting="examples")
    ups = [
        _update("a", "shop:1", 1.0, 100),
        _update("b", "shop:1", 2.0, 300),
        _update("c", "bank:9", 5.0, 50),
        _update("d", None, 7.0, 25, adapter=False),
    ]
    agg.aggregate(ups)
    expected_trunk = np.average([1.0, 2.0, 5.0, 7.0], weights=[100, 300, 50, 25])
    np.testing.assert_allclose(agg.trunk["trunk.w"], expected_trunk, rtol=1e-6)
    np.testing.assert_allclose(agg.adapters["shop:1"]["adapter.e"], np.average([10, 20], weights=[100, 300]), rtol=1e-6)
    np.testing.assert_allclose(agg.adapters["bank:9"]["adapter.e"], 50.0, rtol=1e-6)
    assert set(agg.arrays_for("shop:1")) == {"trunk.w", "adapter.e"}
    assert set(agg.arrays_for(None)) == {"trunk.w"}


def test_local_parameters_and_unshared_adapters_are_rejected() -> None:
    agg = ScopedAggregator()
    bad = PartnerUpdate("x", "shop:1", {"recon_head.0.weight": np.zeros(2)}, 10)
    with pytest.raises(ValueError, match="local parameter"):
        agg.aggregate([bad])
    with pytest.raises(ValueError, match="adapter is local"):
        agg.aggregate([_update("y", None, 1.0, 10)])


def test_fedavg_with_server_lr_and_fedadam_move_toward_the_mean() -> None:
    agg = ScopedAggregator(optimizer="fedavg", lr=0.5)
    agg.trunk = {"trunk.w": np.zeros((2, 3), dtype=np.float32)}
    agg.aggregate([_update("a", None, 2.0, 1, adapter=False)])
    np.testing.assert_allclose(agg.trunk["trunk.w"], 1.0)
    adam = ScopedAggregator(optimizer="fedadam", lr=0.1)
    adam.trunk = {"trunk.w": np.zeros((2, 3), dtype=np.float32)}
    adam.aggregate([_update("a", None, 2.0, 1, adapter=False)])
    # first Adam step: m = 0.1*2, v = 0.01*4 -> 0.1 * 0.2 / (0.2 + 1e-3)
    np.testing.assert_allclose(adam.trunk["trunk.w"], 0.1 * 0.2 / (0.2 + 1e-3), rtol=1e-5)
    with pytest.raises(ConfigError, match="server_optimizer"):
        ScopedAggregator(optimizer="sgd")


def test_kind_balanced_global_weights_give_each_kind_equal_weight() -> None:
    ups = [
        _update("a", "shop:1", 1.0, 100),
        _update("b", "shop:1", 2.0, 300),
        _update("c", "clinic:9", 5.0, 9000),
    ]
    balanced = ScopedAggregator(global_weighting="kind_balanced")
    balanced.aggregate(ups)
    # shops: (1*100 + 2*300)/400 = 1.75 with total weight 1; clinic: 5 with weight 1
    np.testing.assert_allclose(balanced.trunk["trunk.w"], (1.75 + 5.0) / 2, rtol=1e-6)
    by_examples = ScopedAggregator(global_weighting="examples")
    by_examples.aggregate(ups)
    np.testing.assert_allclose(
        by_examples.trunk["trunk.w"], np.average([1.0, 2.0, 5.0], weights=[100, 300, 9000]), rtol=1e-6
    )
    # the adapter average is by examples within the slot either way
    np.testing.assert_allclose(balanced.adapters["shop:1"]["adapter.e"], 17.5, rtol=1e-6)
    with pytest.raises(ConfigError, match="global_weighting"):
        ScopedAggregator(global_weighting="votes")


def test_screen_rejects_broken_and_hostile_replies() -> None:
    agg = ScopedAggregator(max_update_norm=10.0)
    agg.trunk = {"trunk.w": np.zeros((2, 3), dtype=np.float32)}
    good = _update("a", "shop:1", 1.0, 10)
    assert agg.screen(good) == []
    nan = PartnerUpdate("n", "shop:1", {"trunk.w": np.full((2, 3), np.nan, dtype=np.float32)}, 10)
    assert "non-finite" in agg.screen(nan)[0]
    shape = PartnerUpdate("s", "shop:1", {"trunk.w": np.zeros((3, 2), dtype=np.float32)}, 10)
    assert "shape" in agg.screen(shape)[0]
    ints = PartnerUpdate("i", "shop:1", {"trunk.w": np.zeros((2, 3), dtype=np.int64)}, 10)
    assert "dtype" in agg.screen(ints)[0]
    unknown = PartnerUpdate("u", "shop:1", {"trunk.w": np.zeros((2, 3), np.float32), "evil.x": np.zeros(1)}, 10)
    assert any("unknown key 'evil.x'" in p for p in agg.screen(unknown))
    local = PartnerUpdate(
        "l", "shop:1", {"trunk.w": np.zeros((2, 3), np.float32), "label_head.weight": np.zeros(1)}, 10
    )
    assert any("local parameter" in p for p in agg.screen(local))
    huge = PartnerUpdate("h", "shop:1", {"trunk.w": np.full((2, 3), 5.0, dtype=np.float32)}, 10)
    assert "above federation.max_update_norm" in agg.screen(huge)[0]  # norm sqrt(6 * 25) = 12.2 > 10
    missing = PartnerUpdate("m", None, {}, 10)
    assert "missing trunk keys" in agg.screen(missing)[0]


@pytest.mark.parametrize("robust", ["median", "trimmed_mean", "krum"])
def test_robust_trunk_aggregation_resists_one_hostile_partner(robust: str) -> None:
    honest = [_update(f"p{i}", None, 1.0 + 0.01 * i, 100, adapter=False) for i in range(4)]
    hostile = _update("evil", None, 1e6, 100, adapter=False)
    agg = ScopedAggregator(robust=robust, global_weighting="examples", trim_fraction=0.2)
    agg.aggregate([*honest, hostile])
    assert np.all(np.abs(agg.trunk["trunk.w"] - 1.015) < 0.05)
    plain = ScopedAggregator(global_weighting="examples")
    plain.aggregate([*honest, hostile])
    assert np.all(plain.trunk["trunk.w"] > 1e5)  # the plain mean is dragged away
    with pytest.raises(ConfigError, match="robust_aggregation"):
        ScopedAggregator(robust="mode")


def test_the_model_does_not_depend_on_the_order_the_replies_arrived_in() -> None:
    # Catastrophic cancellation: summed in arrival order, (1e20 + 1) - 1e20 is 0 but
    # (1e20 - 1e20) + 1 is 1, so the order would show in the float32 model.
    ups = [
        PartnerUpdate(name, "shop:1", {"trunk.w": np.array([value, -value], dtype=np.float32)}, 100)
        for name, value in (("a", 1e20), ("b", 1.0), ("c", -1e20))
    ]
    results = []
    for order in ([0, 1, 2], [0, 2, 1], [1, 2, 0], [2, 1, 0]):
        agg = ScopedAggregator(global_weighting="examples")
        agg.aggregate([ups[i] for i in order])
        results.append(agg.trunk["trunk.w"])
    assert all(r.tobytes() == results[0].tobytes() for r in results[1:])
