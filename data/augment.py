"""Per-sample augmentation: horizontal flip, and a latent drawn from the stored VAE posterior.

Every draw is a function of (data.seed, epoch, shard, index in shard) — the sample's place in the
dataset, never the worker, the rank or the world size — so a resumed, re-sharded or re-workered run
flips and samples exactly as the uninterrupted one, and an epoch redraws (a sample is not flipped
the same way forever). DiT trains ImageNet with random flips and samples its latent from the VAE
posterior at every step; PixArt-Σ does not flip (a caption can say "left"). Hence the defaults:

- `data.flip` unset: on for class-conditional data, off for text; off for the bundled digits, which
  are not mirror-symmetric (a mirrored 2 is no 2). Latents can only be flipped through a stored
  mirrored copy (`latent_flip`: a latent of the flipped image is not the flipped latent).
- `data.sample_latent` unset: on when the shards hold the posterior std (`latent_std`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

MIRROR_UNSAFE_SOURCES = ("digits", "digits-captions")  # handwritten digits change meaning when mirrored


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    sample_latent: bool = False

    @property
    def random(self) -> bool:
        return self.flip or self.sample_latent


def resolve_augment(flip: Optional[bool], sample_latent: Optional[bool], *, input: str, cond: str, fields: set[str],
                    source: str, where: str) -> Augment:
    """The augmentation a task gets from `data.flip` / `data.sample_latent` and what the shards hold."""
    latent = input == "latent"
    if flip is None:
        flip = cond == "class" and source not in MIRROR_UNSAFE_SOURCES and (not latent or "latent_flip" in fields)
    elif flip and latent and "latent_flip" not in fields:
        raise ValueError(f"data.flip=true with data.input='latent' needs a mirrored copy of each latent, but {where} hold "
                         "none; precompute with `--flip-copy`, or set data.flip=false")
    if sample_latent is None:
        sample_latent = latent and "latent_std" in fields
    elif sample_latent and "latent_std" not in fields:
        raise ValueError(f"data.sample_latent=true needs the VAE posterior's std, but {where} hold only its mean; "
                         "precompute with `--posterior`, or set data.sample_latent=false")
    if flip and sample_latent and latent and "latent_flip_std" not in fields:
        raise ValueError(f"{where} hold a mirrored latent without its std, so a flipped sample cannot be drawn from its "
                         "posterior; precompute with both `--flip-copy --posterior`, or set data.sample_latent=false")
    return Augment(bool(flip), bool(sample_latent))


def sample_words(seed: int, epoch: int, shard: int, index: int) -> np.ndarray:
    """Two independent 64-bit words for one sample in one epoch: [0] decides the flip, [1] seeds its noise."""
    return np.random.SeedSequence([seed, epoch, shard, index]).generate_state(2, np.uint64)


def flipped(words: np.ndarray) -> bool:
    return bool(words[0] & np.uint64(1))


def posterior_noise(words: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise of `shape`: latent = mean + std · noise (the VAE's `sample()`)."""
    return np.random.Generator(np.random.PCG64(int(words[1]))).standard_normal(shape, dtype=np.float32)
