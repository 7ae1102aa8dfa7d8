"""Gaussian feature statistics and the Fréchet distance between them (FID, sFID, the digits FD).

Statistics are accumulated chunk by chunk in float64 (memory O(d²), not O(N·d)), so 50,000 samples
never need their spatial features in memory at once; the covariance is the unbiased one (ddof 1),
as `np.cov` and ADM's evaluator compute it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class GaussianStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """‖μa−μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½), with symmetric eigen-decompositions (no complex sqrtm).

    tr((Σa Σb)^½) = tr((Σa^½ Σb Σa^½)^½) because the two products are similar and the second is PSD,
    so the result is real by construction where `scipy.linalg.sqrtm` of Σa·Σb may not be.
    """
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different feature sizes: {a.mu.shape[0]} vs {b.mu.shape[0]} "
                         "(were they computed by the same network layer?)")
    sa = _sqrt_psd(a.sigma.astype(np.float64))
    cross = np.linalg.eigvalsh(sa @ b.sigma.astype(np.float64) @ sa)
    tr_cross = float(np.sqrt(np.clip(cross, 0, None)).sum())
    diff = a.mu.astype(np.float64) - b.mu.astype(np.float64)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_cross)


class RunningMoments:
    """Mean and covariance of rows fed in chunks. Sums are taken around the first chunk's mean, so
    the final `Σ y yᵀ − n ȳ ȳᵀ` subtracts small numbers, not two large ones."""

    def __init__(self) -> None:
        self.n = 0
        self._shift: Optional[np.ndarray] = None
        self._sum: Optional[np.ndarray] = None
        self._outer: Optional[np.ndarray] = None

    def update(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        if not len(x):
            return
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        y = x - self._shift
        self._sum += y.sum(0)
        self._outer += y.T @ y
        self.n += len(x)

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mean_y = self._sum / self.n
        cov = (self._outer - self.n * np.outer(mean_y, mean_y)) / (self.n - 1)
        return GaussianStats(mu=self._shift + mean_y, sigma=(cov + cov.T) / 2, n=self.n)


def stats_of(features: np.ndarray) -> GaussianStats:
    """Statistics of a whole (N, d) feature matrix (`np.mean`, `np.cov` in float64)."""
    f = np.asarray(features, dtype=np.float64)
    return GaussianStats(mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=len(f))
