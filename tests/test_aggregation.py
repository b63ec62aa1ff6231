"""Scoped aggregation against np.average, per scope."""

from __future__ import annotations

import numpy as np
import pytest

from fedpersona.aggregation import PartnerUpdate, ScopedAggregator
from fedpersona.errors import ConfigError


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
