"""The DP persona protocol: the Gram release and the projection, the EM statistics, the
M-step, and the one schedule, each against an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from fedpersona.personas.mixture import Mixture, StepStats, m_step, stats_release
from fedpersona.personas.protocol import PersonaProtocol, PersonaRun, federated_personas, partner_release
from fedpersona.personas.space import clip_rows, fit_space, gram_release, gram_sensitivity, unpack_gram
from fedpersona.privacy.randomness import SecretRandomness


def _rows(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * np.linspace(3.0, 0.2, d)


def test_the_noise_free_gram_is_the_gram_of_the_clipped_rows_with_the_offset() -> None:
    x = _rows(50, 4, 0)
    packed = gram_release(x, clip=2.0, offset=3.0, noise_multiplier=0.0, randomness=None)
    a = np.hstack([clip_rows(x, 2.0), np.full((50, 1), 3.0)])
    np.testing.assert_allclose(unpack_gram(packed, 4), a.T @ a, rtol=1e-12)
    assert np.linalg.norm(clip_rows(x, 2.0), axis=1).max() == pytest.approx(2.0)


def test_one_user_moves_the_gram_release_by_at_most_its_sensitivity() -> None:
    x = _rows(30, 5, 1)
    extreme = np.full((1, 5), 1e6)
    base = gram_release(x, clip=2.0, offset=3.0, noise_multiplier=0.0, randomness=None)
    added = gram_release(np.vstack([x, extreme]), clip=2.0, offset=3.0, noise_multiplier=0.0, randomness=None)
    shift = float(np.linalg.norm(added - base))
    bound = gram_sensitivity(clip=2.0, offset=3.0)
    assert bound == 13.0
    # The upper triangle of a a^T for ||a||^2 = 13: strictly below the Frobenius bound, above half of it.
    assert bound / 2 < shift <= bound


def test_gram_noise_has_the_planned_standard_deviation() -> None:
    x = np.zeros((0, 9))
    packed = gram_release(x, clip=1.0, offset=1.0, noise_multiplier=0.5, randomness=SecretRandomness(b"k" * 32))
    # 55 noise values of std 0.5 * 2 = 1: the chi-square test of their variance (false failure 1e-4).
    statistic = float((packed**2).sum())
    assert stats.chi2.ppf(5e-5, packed.size) < statistic < stats.chi2.ppf(1 - 5e-5, packed.size)


def test_the_space_is_the_principal_components_of_the_clipped_rows() -> None:
    x = _rows(400, 6, 2)
    space = fit_space(
        gram_release(x, clip=4.0, offset=5.0, noise_multiplier=0.0, randomness=None),
        dim=6, dims=3, row_clip=4.0, offset=5.0,
    )  # fmt: skip
    clipped = clip_rows(x, 4.0)
    reference = np.cov(clipped, rowvar=False, bias=True)
    np.testing.assert_allclose(space.mean, clipped.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(space.spectrum, np.sort(np.linalg.eigvalsh(reference))[::-1][:3], rtol=1e-9)
    assert space.rows == pytest.approx(400)
    projected = (clipped - clipped.mean(axis=0)) @ space.basis
    np.testing.assert_allclose(projected.var(axis=0), space.spectrum, rtol=1e-9)
    z = space.embed(x)
    assert np.linalg.norm(z, axis=1).max() <= space.z_clip * (1 + 1e-12)
    assert space.z_clip == pytest.approx(1.2 * math.sqrt(space.spectrum.sum()))


def test_tied_assignment_equals_a_gaussian_mixture_with_the_same_parameters() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 3)) * 2
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    a = rng.normal(size=(3, 3))
    covariance = a @ a.T + np.eye(3)
    mixture = Mixture(centres=centres, weights=weights, covariance=covariance)
    reference = GaussianMixture(n_components=4, covariance_type="tied")
    reference.weights_, reference.means_, reference.covariances_ = weights, centres, covariance
    reference.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(covariance))
    z = rng.normal(size=(500, 3)) * 3
    np.testing.assert_array_equal(mixture.assign(z), reference.predict(z))
    np.testing.assert_allclose(mixture.responsibilities(z, soft=True), reference.predict_proba(z), atol=1e-10)


def _mixture(k: int = 3, p: int = 2) -> Mixture:
    centres = np.arange(k * p, dtype=float).reshape(k, p)
    return Mixture(centres=centres, weights=np.full(k, 1 / k), covariance=np.eye(p), metric="euclid")


def test_noise_free_statistics_are_the_counts_and_sums_of_the_assigned_rows() -> None:
    z = np.array([[0.1, 0.9], [2.2, 2.8], [1.9, 3.1], [4.0, 5.2]])
    out = stats_release(z, _mixture(), soft=False, z_clip=10.0, noise_multiplier=0.0, count_noise=3.0, randomness=None)
    np.testing.assert_array_equal(out.counts, [1, 2, 1])
    np.testing.assert_allclose(out.sums, [[0.1, 0.9], [4.1, 5.9], [4.0, 5.2]])
    with pytest.raises(ValueError, match="clipped to norm"):
        stats_release(z, _mixture(), soft=False, z_clip=1.0, noise_multiplier=0.0, count_noise=3.0, randomness=None)


def test_one_user_moves_the_scaled_statistics_by_at_most_one_over_the_noise_multiplier() -> None:
    rng = np.random.default_rng(4)
    z = clip_rows(rng.normal(size=(40, 2)) * 5, 3.0)
    extra = np.array([[3.0, 0.0]])
    mix = Mixture(centres=rng.normal(size=(3, 2)), weights=np.full(3, 1 / 3), covariance=np.eye(2))
    noise, m = 0.7, 3.0
    se = noise * math.sqrt(1 + 1 / m**2)
    for soft in (False, True):
        a = stats_release(z, mix, soft=soft, z_clip=3.0, noise_multiplier=0, count_noise=m, randomness=None)
        b = stats_release(np.vstack([z, extra]), mix, soft=soft, z_clip=3.0, noise_multiplier=0, count_noise=m,
                          randomness=None)  # fmt: skip
        scaled = np.concatenate([(b.counts - a.counts) / (m * se), ((b.sums - a.sums) / (se * 3.0)).ravel()])
        assert np.linalg.norm(scaled) <= 1 / noise + 1e-12


def test_statistics_noise_has_the_planned_standard_deviations() -> None:
    z = np.zeros((0, 4))
    mix = Mixture(centres=np.zeros((200, 4)), weights=np.full(200, 1 / 200), covariance=np.eye(4))
    out = stats_release(z, mix, soft=True, z_clip=2.0, noise_multiplier=1.5, count_noise=3.0,
                        randomness=SecretRandomness(b"s" * 32))  # fmt: skip
    se = 1.5 * math.sqrt(1 + 1 / 9)
    for values, std in ((out.counts, 3.0 * se), (out.sums.ravel(), 2.0 * se)):
        statistic = float(((values / std) ** 2).sum())
        assert stats.chi2.ppf(5e-5, values.size) < statistic < stats.chi2.ppf(1 - 5e-5, values.size)


def test_the_m_step_moves_centres_keeps_empty_ones_and_keeps_the_covariance_well_conditioned() -> None:
    spectrum = np.array([4.0, 1.0])
    previous = np.array([[9.0, 9.0], [0.0, 0.0], [-9.0, -9.0]])
    released = StepStats(counts=np.array([50.0, 2.0, 150.0]), sums=np.array([[50.0, 0.0], [1.0, 1.0], [-150.0, 0.0]]))
    mixture = m_step(released, previous=previous, spectrum=spectrum, min_count=5.0, floor=0.0, shrink=0.0)
    np.testing.assert_allclose(mixture.centres, [[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(mixture.weights, np.array([50, 2, 150]) / 202)
    between = sum(w * np.outer(c, c) for w, c in zip(mixture.weights, mixture.centres, strict=True))
    np.testing.assert_allclose(mixture.covariance, np.diag(spectrum) - between, atol=1e-12)
    # With the floor: the smallest eigenvalue is at least floor x the mean variance (2.5).
    singular = StepStats(counts=np.array([100.0, 100.0]), sums=np.array([[200.0, 0.0], [-200.0, 0.0]]))
    floored = m_step(singular, previous=np.zeros((2, 2)), spectrum=spectrum, min_count=5, floor=0.1, shrink=0.0)
    assert np.linalg.eigvalsh(floored.covariance).min() == pytest.approx(0.25)


def _blobs(seed: int, partners: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 12)) * 3
    xs, truth = [], []
    for _ in range(partners):
        mix = rng.dirichlet(np.ones(4))
        labels = rng.choice(4, size=600, p=mix)
        xs.append(centres[labels] + rng.normal(size=(600, 12)) * 0.6)
        truth.append(labels)
    return xs, truth


def test_the_schedule_finds_separated_personas_with_and_without_noise() -> None:
    xs, truth = _blobs(5)
    protocol = PersonaProtocol(k=4, dims=4, row_clip=12.0, offset=5.0)
    for gram_noise, step_noise in ((0.0, 0.0), (1.0, 2.0)):
        result = federated_personas(
            xs, protocol=protocol, gram_noise=gram_noise, step_noise=step_noise,
            randomness=lambda i, r: SecretRandomness.from_seed(7, i, r), seed=1,
        )  # fmt: skip
        for x, labels in zip(xs, truth, strict=True):
            assert adjusted_rand_score(labels, result.mixture.assign(result.space.embed(x))) > 0.9
        assert result.shares.sum() == pytest.approx(1.0)


def test_a_resumed_schedule_ends_where_an_uninterrupted_one_does() -> None:
    xs, _ = _blobs(6)
    protocol = PersonaProtocol(k=4, dims=4, row_clip=12.0)
    whole = federated_personas(xs, protocol=protocol, gram_noise=0, step_noise=0, randomness=lambda i, r: None, seed=3)
    run = PersonaRun(protocol=protocol, dim=12, seed=3)
    while run.position < 4:
        request = run.request()
        total = sum((partner_release(x, request, protocol=protocol, gram_noise=0, step_noise=0, randomness=None)
                     for x in xs[1:]), partner_release(xs[0], request, protocol=protocol, gram_noise=0, step_noise=0,
                                                      randomness=None))  # fmt: skip
        run.absorb(total)
    resumed = PersonaRun(protocol=protocol, dim=12, seed=3)
    resumed.restore(run.state())
    while not resumed.done:
        request = resumed.request()
        outs = [partner_release(x, request, protocol=protocol, gram_noise=0, step_noise=0, randomness=None) for x in xs]
        total = outs[0]
        for out in outs[1:]:
            total = total + out  # type: ignore[operator]
        resumed.absorb(total)
    np.testing.assert_array_equal(resumed.result().mixture.centres, whole.mixture.centres)
    np.testing.assert_array_equal(resumed.result().mixture.covariance, whole.mixture.covariance)


def test_protocol_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="k must be >= 2"):
        PersonaProtocol(k=1)
    with pytest.raises(ValueError, match="candidates"):
        PersonaProtocol(k=8, candidates=4)
    assert PersonaProtocol().releases == 7 and PersonaProtocol().step_releases == 6
