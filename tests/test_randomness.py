"""The partner's secret randomness: Gaussians, uniforms and Poisson samples against their
distributions, fresh keys per instance, reproducible only from an explicit seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedpersona.privacy.randomness import SecretRandomness


def test_gaussians_follow_the_normal_distribution() -> None:
    draws = SecretRandomness.from_seed(11).normal((200, 1000), std=2.5)
    assert draws.shape == (200, 1000) and draws.dtype == np.float64
    flat = draws.ravel() / 2.5
    # Kolmogorov-Smirnov against N(0, 1); a correct generator fails this once in a million runs.
    assert stats.kstest(flat, "norm").pvalue > 1e-6
    assert abs(flat.mean()) < 5 / math.sqrt(flat.size)
    assert abs(flat.std() - 1.0) < 5 * math.sqrt(0.5 / flat.size)
    assert abs(stats.kurtosis(flat)) < 5 * math.sqrt(24 / flat.size)
    # Neighbouring coordinates (the two halves of one Box-Muller pair feed different sums) are independent.
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5 / math.sqrt(flat.size)


def test_uniforms_and_poisson_samples_follow_their_distributions() -> None:
    randomness = SecretRandomness.from_seed(3)
    u = randomness.uniform(200_000)
    assert 0 < u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-6
    sizes = [len(randomness.poisson_sample(10_000, 0.03)) for _ in range(400)]
    # Binomial(10000, 0.03): mean 300, variance 291.
    assert abs(np.mean(sizes) - 300) < 5 * math.sqrt(291 / 400)
    assert abs(np.var(sizes) / 291 - 1) < 0.35
    picked = randomness.poisson_sample(50, 1.0)
    assert picked.tolist() == list(range(50))


def test_fresh_instances_differ_and_only_a_seed_reproduces() -> None:
    assert not np.array_equal(SecretRandomness().normal(8), SecretRandomness().normal(8))
    assert not SecretRandomness().seeded and SecretRandomness.from_seed(1).seeded
    one = SecretRandomness.from_seed(5, "shop", "train", 1).normal(16)
    assert np.array_equal(one, SecretRandomness.from_seed(5, "shop", "train", 1).normal(16))
    assert not np.array_equal(one, SecretRandomness.from_seed(5, "shop", "train", 2).normal(16))
    with pytest.raises(ValueError, match="32 bytes"):
        SecretRandomness(b"short")
