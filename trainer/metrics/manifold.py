"""Inception Score and precision/recall, on features already extracted.

Both are torch-fidelity's implementations, called with ADM's evaluator's conventions:
- IS: the softmax of the bias-free logits (pool_3 · W, 1008 classes), exp of the mean KL between
  each sample's class distribution and its split's marginal, averaged over splits (10 by default;
  ADM cuts splits of 5,000, which is the same 10 splits for 50,000 samples). No shuffling, so the
  splits are the sample order's.
- Precision/recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its
  points with radius the distance to the k-th nearest other point of the same set (k = 3);
  precision is the fraction of samples inside the reference manifold, recall the fraction of
  references inside the sample manifold (a point on a ball's surface is inside). ADM computes the
  distances in float16 when they are finite; here they are float32, so a point within float16
  rounding of a radius may land on the other side.
Distances are computed `batch` rows at a time: memory is batch × N distances, not N².
"""
from __future__ import annotations

import numpy as np
import torch


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive splits of the samples."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if not 1 <= splits <= len(logits):
        raise ValueError(f"the Inception Score with {splits} splits needs at least {splits} samples, got {len(logits)}; "
                         "lower --is-splits or give more samples")
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=splits, shuffle=False)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, batch: int = 10000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference`, both (N, d) features."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    for name, f in (("reference", reference), ("sample", samples)):
        if len(f) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} features, got {len(f)}")
    gen = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).to(device)
    real = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32)).to(device)
    precision, recall = calculate_precision_recall_part(gen, real, neighborhood=k, batch_size=batch)
    return float(precision), float(recall)
