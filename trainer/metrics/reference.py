"""The reference side of FID, sFID and precision/recall.

ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`, …) hold 10,000 images in `arr_0` and
the statistics of the whole training set: `mu`/`sigma` (pool_3) and `mu_s`/`sigma_s` (spatial).
As ADM's evaluator does, FID and sFID use those stored statistics when present; precision/recall
needs reference features, which come from `arr_0` (or from `pool_3`, the features
`save_reference` stores beside the statistics so a later run need not recompute them). A
reference given as images (an image folder, shards, an `.npz` with only `arr_0`) is computed here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from trainer.metrics.frechet import GaussianStats
from trainer.metrics.images import ImageSet, npz_keys, open_images
from trainer.metrics.inception import FeatureSummary

POOL_FEATURES_KEY = "pool_3"


@dataclass
class Reference:
    path: str
    pool: Optional[GaussianStats] = None
    spatial: Optional[GaussianStats] = None
    pool_features: Optional[np.ndarray] = None
    origin: dict[str, str] = field(default_factory=dict)  # what each part was read or computed from

    def describe(self) -> dict[str, object]:
        return {"path": self.path, "origin": self.origin,
                "features": None if self.pool_features is None else len(self.pool_features)}


def _stored(path: str) -> tuple[Reference, list[str]]:
    """What an `.npz` holds already, and its keys."""
    ref = Reference(path)
    keys = npz_keys(path)
    with np.load(path, allow_pickle=False) as z:
        if "mu" in keys and "sigma" in keys:
            ref.pool = GaussianStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), 0)
            ref.origin["pool"] = "stored mu/sigma"
        if "mu_s" in keys and "sigma_s" in keys:
            ref.spatial = GaussianStats(z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64), 0)
            ref.origin["spatial"] = "stored mu_s/sigma_s"
        if POOL_FEATURES_KEY in keys:
            ref.pool_features = z[POOL_FEATURES_KEY].astype(np.float32)
            ref.origin["features"] = f"stored {POOL_FEATURES_KEY}"
    return ref, keys


def can_give_features(path: str) -> bool:
    """Whether the reference can provide per-image features (precision/recall) without error."""
    return not path.endswith(".npz") or bool({"arr_0", POOL_FEATURES_KEY} & set(npz_keys(path)))


def load_reference(path: str, need: set[str], summarize: Callable[[ImageSet], FeatureSummary],
                   resolution: Optional[int] = None) -> Reference:
    """The reference parts in `need` ({"pool", "spatial", "features"}), read when stored, else computed
    by `summarize` from the reference images (one pass gives every part)."""
    if os.path.isfile(path) and path.endswith(".npz"):
        ref, keys = _stored(path)
    else:
        ref, keys = Reference(path), []
    have = {"pool": ref.pool is not None, "spatial": ref.spatial is not None, "features": ref.pool_features is not None}
    missing = sorted(p for p in need if not have[p])
    if not missing:
        return ref
    if keys and "arr_0" not in keys:
        raise ValueError(f"{path} holds {sorted(keys)}: no images (arr_0) to compute {', '.join(missing)} from; "
                         "use an ADM reference batch with arr_0, or drop the metric that needs it (--metrics)")
    images = open_images(path, resolution)
    summary = summarize(images)
    origin = f"computed from {summary.n} images"
    if ref.pool is None:
        ref.pool, ref.origin["pool"] = summary.pool, origin
    if ref.spatial is None:
        ref.spatial, ref.origin["spatial"] = summary.spatial, origin
    if "features" in missing:
        ref.pool_features, ref.origin["features"] = summary.pool_features, origin
    return ref


def save_reference(path: str, ref: Reference) -> str:
    """ADM's layout (`mu`, `sigma`, `mu_s`, `sigma_s`) plus `pool_3` features when there are any;
    written atomically."""
    if ref.pool is None or ref.spatial is None:
        raise ValueError("the reference statistics were not computed; ask for fid and sfid to save them")
    path = path if path.endswith(".npz") else path + ".npz"
    arrays = {"mu": ref.pool.mu, "sigma": ref.pool.sigma, "mu_s": ref.spatial.mu, "sigma_s": ref.spatial.sigma}
    if ref.pool_features is not None:
        arrays[POOL_FEATURES_KEY] = ref.pool_features.astype(np.float32)
    tmp = f"{path[:-4]}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path
