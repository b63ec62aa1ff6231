"""The partner's secret randomness: Gaussians, uniforms and Poisson samples against their
distributions, fresh keys per instance, reproducible only from an explicit seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
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


def test_gaussians_are_a_function_of_the_keystream_alone() -> None:
    """Coordinate i of an n-vector is (r1 cos t1 + r1 sin t1 + r2 cos t2 + r2 sin t2) / 2 from the
    uniforms of stream words i, n + i (the radii) and 2n + i, 3n + i (the angles), each word's top
    53 bits; recomputed here with Python's math on the raw bytes of an identical stream."""
    n, std = 5, 3.0
    got = SecretRandomness(b"k" * 32).normal(n, std=std)
    raw = SecretRandomness(b"k" * 32).bytes(32 * n)
    words = [int.from_bytes(raw[8 * j : 8 * j + 8], "little") for j in range(4 * n)]
    u = [((w >> 11) + 0.5) * 2.0**-53 for w in words]
    for i in range(n):
        r1, r2 = math.sqrt(-2 * math.log(u[i])), math.sqrt(-2 * math.log(u[n + i]))
        t1, t2 = 2 * math.pi * u[2 * n + i], 2 * math.pi * u[3 * n + i]
        expected = 0.5 * std * (r1 * math.cos(t1) + r1 * math.sin(t1) + r2 * math.cos(t2) + r2 * math.sin(t2))
        assert got[i] == pytest.approx(expected, rel=1e-13, abs=1e-13)


def test_noise_like_a_tensor_matches_its_shape_dtype_and_the_normal_distribution() -> None:
    """A DP step's draw: 36,000 coordinates for a float32 (6000, 6) tensor. With z = noise / std,
    sum(z^2) ~ chi2(n) and the KS test against N(0, 1); the bounds fail a correct generator with
    probability about 1e-6 and catch a std off by ~3%. Same key, same values as :meth:`normal`
    (rounded to float32)."""
    reference = torch.empty(6000, 6, dtype=torch.float32)
    noise = SecretRandomness(b"n" * 32).normal_like(reference, 0.7)
    assert noise.shape == reference.shape and noise.dtype == torch.float32
    z = noise.double().flatten().numpy() / 0.7
    squares = float((z * z).sum())
    assert stats.chi2.ppf(1e-7, z.size) < squares < stats.chi2.isf(1e-7, z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-6
    same = SecretRandomness(b"n" * 32).normal((6000, 6), std=0.7)
    assert torch.equal(noise, torch.from_numpy(same).float())
