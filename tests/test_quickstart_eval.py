"""The digit scorer the quickstart relies on: a classifier that knows real digits, and a Fréchet
distance that is zero for identical sets and grows as they drift apart."""
import numpy as np
import pytest
import torch

from trainer.digits_eval import (
    GaussianStats,
    feature_stats,
    frechet_distance,
    real_floor,
    real_stats,
    score,
    split_digits,
    train_classifier,
)


@pytest.fixture(scope="module")
def classifier():
    model, info = train_classifier()
    return model, info


def test_classifier_recognises_held_out_real_digits(classifier):
    model, info = classifier
    assert info["held_out_accuracy"] >= 0.9
    _, _, x_te, y_te = split_digits()
    assert score(model, x_te, y_te, real_stats(model))["accuracy"] == pytest.approx(info["held_out_accuracy"])
    wrong = (y_te + 1) % 10
    assert score(model, x_te, wrong, real_stats(model))["accuracy"] < 0.1  # accuracy is against the asked class


def test_frechet_distance_of_gaussians_is_exact():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    cov = a.T @ a / 200
    same = GaussianStats(np.zeros(8), cov, 200)
    assert frechet_distance(same, same) == pytest.approx(0.0, abs=1e-8)
    shift = np.full(8, 0.5)
    moved = GaussianStats(shift, cov, 200)
    assert frechet_distance(same, moved) == pytest.approx(float(shift @ shift), rel=1e-6)
    # isotropic covariances: FD = d·(σ1 − σ2)²
    s1, s2 = GaussianStats(np.zeros(8), np.eye(8), 1), GaussianStats(np.zeros(8), 4 * np.eye(8), 1)
    assert frechet_distance(s1, s2) == pytest.approx(8 * (1 - 2) ** 2, rel=1e-6)
    # covariances that do not commute: the closed form with the matrix square root of their product
    from scipy.linalg import sqrtm

    b = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    ca, cb = cov, b.T @ b / 200
    mu_a, mu_b = rng.normal(size=8), rng.normal(size=8)
    exact = float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real))
    assert frechet_distance(GaussianStats(mu_a, ca, 200), GaussianStats(mu_b, cb, 200)) == pytest.approx(exact, rel=1e-6)


def test_fd_is_zero_for_the_real_set_and_grows_with_a_shift(classifier):
    model, _ = classifier
    ref = real_stats(model)
    from data import digits_arrays

    x, y = digits_arrays()
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    assert score(model, x, y, ref)["fd"] == pytest.approx(0.0, abs=1e-4)  # float64 round-off of traces ~1e2
    fds = []
    for shift in (0.1, 0.3, 0.6):  # brighten every pixel: the feature distribution drifts further each time
        fds.append(score(model, (x + shift).clamp(-1, 1), y, ref)["fd"])
    assert 0 < fds[0] < fds[1] < fds[2]
    g = torch.Generator().manual_seed(0)
    noisy = score(model, (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1), y, ref)
    assert noisy["fd"] > 10 * real_floor(model, len(y))  # noise is far above the resampling floor


def test_feature_stats_shape(classifier):
    model, _ = classifier
    from data import digits_arrays

    x, _ = digits_arrays()
    s = feature_stats(model, torch.from_numpy(x[:300]))
    assert s.mu.shape == (128,) and s.sigma.shape == (128, 128) and s.n == 300
