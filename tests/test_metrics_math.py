"""The metric math on synthetic features, against pytorch-fid and hand-computed cases.

No network weights are involved: these tests pin the formulas (Fréchet distance, running moments,
sFID's spatial tap, Inception Score, precision/recall) that `launch.evaluate` applies to features.
"""
import numpy as np
import pytest
import torch

from trainer.metrics.frechet import GaussianStats, RunningMoments, frechet_distance, stats_of
from trainer.metrics.inception import SPATIAL_DIM, spatial_features
from trainer.metrics.manifold import inception_score, precision_recall


def _feature_sets(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two non-negative, correlated feature sets (ReLU of linear maps, like pool_3) whose
    covariances do not commute, so tr√(Σ1Σ2) is not a sum of per-axis terms."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d, d)) / np.sqrt(d)
    w2 = w1 + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    a = np.maximum(rng.standard_normal((n, d)) @ w1, 0)
    b = np.maximum(rng.standard_normal((n, d)) @ w2 + 0.05, 0)
    return a, b


def _check_against_pytorch_fid(n: int, d: int) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = _feature_sets(n, d)
    sa, sb = stats_of(a), stats_of(b)
    ours = frechet_distance(sa, sb)
    ref = calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    # Both are float64 throughout; scipy's Schur-based sqrtm and our eigh route differ by rounding
    # only (measured 2.7e-14 relative at d=2048): 1e-9 leaves room for BLAS differences, and any
    # formula error (a missing factor 2, Σ1Σ2 vs Σ1+Σ2, a biased covariance) is ≥ 1e-3.
    assert ours == pytest.approx(float(ref), rel=1e-9)
    assert ours > 1.0  # the sets differ: a distance stuck at 0 would pass the comparison above only by luck


def test_frechet_distance_matches_pytorch_fid_with_n_much_larger_than_d():
    _check_against_pytorch_fid(n=8192, d=512)


@pytest.mark.slow
def test_frechet_distance_matches_pytorch_fid_at_pool3_size():
    """The pool_3 size, 2048 features from 10,000 samples (scipy's sqrtm takes ~20 s here)."""
    _check_against_pytorch_fid(n=10000, d=2048)


def test_running_moments_match_numpy_over_uneven_chunks():
    rng = np.random.default_rng(1)
    x = 1000.0 + rng.standard_normal((503, 6)) @ rng.standard_normal((6, 6))  # large mean, small spread
    acc = RunningMoments()
    for lo, hi in [(0, 1), (1, 8), (8, 300), (300, 303), (303, 503)]:
        acc.update(x[lo:hi].astype(np.float32) if lo == 300 else x[lo:hi])
    got = acc.stats()
    x32 = x.copy()
    x32[300:303] = x32[300:303].astype(np.float32)
    assert got.n == 503
    np.testing.assert_allclose(got.mu, x32.mean(0), rtol=1e-12)
    # covariance entries are O(1) beside a mean of 1000: without the shift the cancellation would cost ~1e-10
    np.testing.assert_allclose(got.sigma, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)


def test_sfid_takes_the_first_seven_channels_in_nhwc_order_hand_computed():
    """Two sets of two feature maps (N, 192, 17, 17). Only channel 5 at (h=3, w=11) differs within
    the first seven: set A holds 0 and 2 there (mean 1, unbiased variance 2), set B 3 and 5 (mean 4,
    variance 2). sFID = (4−1)² + 2 + 2 − 2·√(2·2) = 9. Channel 8 differs wildly between the sets: it
    must not count (ADM keeps `spatial[..., :7]`)."""
    a = torch.zeros(2, 192, 17, 17)
    b = torch.zeros(2, 192, 17, 17)
    a[:, 5, 3, 11] = torch.tensor([0.0, 2.0])
    b[:, 5, 3, 11] = torch.tensor([3.0, 5.0])
    b[:, 8] = 100.0 * torch.randn(2, 17, 17, generator=torch.Generator().manual_seed(0))
    fa, fb = spatial_features(a).numpy(), spatial_features(b).numpy()
    assert fa.shape == (2, SPATIAL_DIM) == (2, 2023)
    where = (3 * 17 + 11) * 7 + 5  # NHWC flattening: ((h·W) + w)·C + c
    assert np.flatnonzero(fa.any(0)).tolist() == [where]
    assert frechet_distance(stats_of(fa), stats_of(fb)) == pytest.approx(9.0, abs=1e-9)


def test_frechet_distance_refuses_statistics_of_different_layers():
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(GaussianStats(np.zeros(3), np.eye(3), 2), GaussianStats(np.zeros(4), np.eye(4), 2))


def test_inception_score_hand_computed():
    """Confident predictions (logit margin 50 over 1008 classes: softmax is one-hot to 1e-18).
    Split 1 spreads 10 samples evenly over 5 classes → exp(KL) = 5; split 2 puts all 10 in one class →
    1. Mean 3, std 2, only if the splits follow the sample order (no shuffling)."""
    logits = np.zeros((20, 1008), np.float32)
    logits[np.arange(10), np.arange(10) % 5] = 50.0
    logits[np.arange(10, 20), 7] = 50.0
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(3.0, rel=1e-9)
    assert std == pytest.approx(2.0, rel=1e-9)
    assert inception_score(np.zeros((6, 1008), np.float32), splits=3) == pytest.approx((1.0, 0.0))  # uniform: 1
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(logits[:5], splits=10)


def _col(values):
    return np.asarray(values, np.float32)[:, None]


def test_precision_recall_hand_computed_k3():
    """1-D points (exact in binary, so distances are exact). Radii are the distance to the 3rd nearest
    other point of the same set.
    samples S = 0, .25, .5, .75, 1, 2.25 → radii .75, .5, .5, .5, .75, 1.75 → manifold [−.75, 4].
    reference R = 1.75, 2, 2.25, 2.5, 6 → radii .75, .5, .5, .75, 4 → manifold [1, 10].
    precision = samples in R's manifold = {1 (on the surface of 1.75's ball), 2.25} = 2/6;
    recall = references in S's manifold = {1.75, 2, 2.25, 2.5} = 4/5.
    A strict `<` gives 1/6; the 2nd instead of the 3rd neighbour gives other radii; swapped roles give (0.8, 1/3)."""
    s = _col([0, 0.25, 0.5, 0.75, 1.0, 2.25])
    r = _col([1.75, 2.0, 2.25, 2.5, 6.0])
    precision, recall = precision_recall(r, s, k=3)
    assert precision == pytest.approx(2 / 6)
    assert recall == pytest.approx(4 / 5)


def _naive_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    cross = np.sqrt(((smp[:, None] - ref[None]) ** 2).sum(-1))  # (samples, refs)
    precision = (cross <= radii(ref)[None]).any(1).mean()
    recall = (cross <= radii(smp)[:, None]).any(0).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_a_full_matrix_reference_in_small_row_batches(k):
    rng = np.random.default_rng(k)
    ref = rng.standard_normal((50, 5)).astype(np.float32)
    smp = (rng.standard_normal((40, 5)) * 1.3 + 0.4).astype(np.float32)
    want = _naive_pr(ref.astype(np.float64), smp.astype(np.float64), k)
    assert 0 < want[0] < 1 and 0 < want[1] < 1  # a case where both bite
    assert precision_recall(ref, smp, k=k, batch=7) == pytest.approx(want)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(ref[:3], smp, k=3)
