"""Aspect-ratio buckets, PixArt-Σ style: keyed by the ratio h/w, each a (height, width) in pixels.

PixArt-Σ's tables (`ASPECT_RATIO_{256,512,1024,2048}`) are one table at 1024 scaled by
resolution/1024. We generate that table instead of copying it: every (h, w) on a 64-pixel grid with
512 ≤ h, w ≤ 2048 whose area lies in [0.9, 1.0]·1024², keyed by `str(round(h/w, 2))`. This yields
the 40 published buckets plus '1.91' (1344×704), the transpose of '0.52' that the published table
omits, so the set is symmetric. A sample goes to the bucket whose key is nearest to its h/w.
"""
from __future__ import annotations

from functools import lru_cache

BASE = 1024
GRID = 64  # pixels at BASE; resolution R gives multiples of 64·R/1024


@lru_cache(maxsize=None)
def bucket_table(resolution: int) -> dict[str, tuple[int, int]]:
    """Bucket key → (h, w) in pixels at `resolution` (a multiple of 16, so sizes stay integers)."""
    if resolution < 16 or resolution % 16:
        raise ValueError(f"bucket resolution {resolution} is not allowed: a multiple of 16 (e.g. 256, 512, 1024)")
    table: dict[str, tuple[int, int]] = {}
    for h in range(BASE // 2, 2 * BASE + 1, GRID):
        for w in range(BASE // 2, 2 * BASE + 1, GRID):
            if 0.9 * BASE * BASE <= h * w <= BASE * BASE:
                table[str(round(h / w, 2))] = (h * resolution // BASE, w * resolution // BASE)
    return dict(sorted(table.items(), key=lambda kv: float(kv[0])))


def nearest_bucket(height: int, width: int) -> str:
    """The key nearest to h/w (the keys do not depend on the resolution)."""
    ratio = height / width
    return min(bucket_table(BASE), key=lambda k: abs(float(k) - ratio))


def bucket_size(key: str, resolution: int) -> tuple[int, int]:
    table = bucket_table(resolution)
    if key not in table:
        raise KeyError(f"{key!r} is not an aspect-ratio bucket; the keys are {list(table)}")
    return table[key]
