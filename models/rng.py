"""Counter-based, per-sample random numbers: a pure function of (seed, …, element index).

Why not torch's generators: a training step's randomness (timesteps, noise, guidance dropout and
values, the routers' Gumbel noise) must depend only on (run seed, step, sample index), never on the
world size, the rank, the batch a sample shares or how often a block is recomputed (activation
checkpointing replays a forward). A stateful stream gives each rank a different sequence and must
be saved and re-seeded at every reshard; a hash of counters needs neither, costs a few integer ops
per number, runs on any device, and gives the same numbers on a CPU and a GPU.

The mixer is a 32-bit integer hash (Wellons' "lowbias32": two multiply-xorshift rounds) evaluated
in int64 with every product kept below 2^63, so it is exact on every backend. A sample's 63-bit seed
is folded in as two 32-bit words; a `salt` separates the uses of one seed (each router of each
block, the noise, the timestep, …).
"""
from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2^27: (x < 2^32) · _MUL < 2^59
_GOLDEN = 0x9E3779B9
_STEP = 0x85EBCA6B

# streams of a training step (salts of `sample_seeds`)
TIMESTEP, NOISE, DROPOUT, GUIDANCE, ROUTERS = range(5)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective avalanche mix of int64 values in [0, 2^32)."""
    x = (((x >> 16) ^ x) * _MUL) & M32
    x = (((x >> 16) ^ x) * _MUL) & M32
    return (x >> 16) ^ x


def _key(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """One 32-bit key per seed and salt."""
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be int64, got {seeds.dtype}")
    lo, hi = seeds & M32, (seeds >> 32) & M32
    return _mix32(lo ^ _mix32((hi + (salt & 0xFFFFF) * _GOLDEN) & M32))


def counter_bits(seeds: torch.Tensor, salt: int, n: int) -> torch.Tensor:
    """(B, n) int64 values in [0, 2^32): element j of row b is a hash of (seeds[b], salt, j) alone."""
    if n >= 2**31:
        raise ValueError(f"{n} numbers per sample is more than one counter stream holds (2^31)")
    k = _key(seeds, salt)[:, None]
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)[None]
    return _mix32(_mix32((k + idx * _STEP) & M32) ^ k)


def counter_uniform(seeds: torch.Tensor, salt: int, n: int) -> torch.Tensor:
    """(B, n) float32 uniform in the open interval (0, 1) (24-bit grid, never 0 or 1)."""
    return ((counter_bits(seeds, salt, n) >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def counter_normal(seeds: torch.Tensor, salt: int, n: int) -> torch.Tensor:
    """(B, n) float32 standard normal (Box-Muller on two counter streams)."""
    u1 = counter_uniform(seeds, salt, n)
    u2 = counter_uniform(seeds, salt ^ 0x5A5A5, n)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def counter_logistic(seeds: torch.Tensor, salt: int, n: int) -> torch.Tensor:
    """(B, n) float32 logistic noise log(u/(1−u)): the difference of two Gumbel(0, 1) draws, which is
    what a Gumbel-sigmoid adds to its logits."""
    u = counter_uniform(seeds, salt, n)
    return torch.log(u) - torch.log1p(-u)


def sample_seeds(seed: int, step: int, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """(B,) 63-bit seeds of the samples at `positions` (their index in the step's global batch) of
    optimizer step `step` in a run seeded `seed`, for one `stream` (TIMESTEP, NOISE, …)."""
    pos = positions.to(torch.int64)
    a = _mix32(torch.full_like(pos, (seed & M32) ^ ((seed >> 32) & M32)) ^ _mix32(torch.full_like(pos, stream)))
    b = _mix32(a ^ ((step & M32) ^ ((step >> 32) & M32)))
    c = _mix32(b ^ (pos & M32))
    d = _mix32(c ^ 0x68E31DA4)
    return ((c & 0x7FFFFFFF) << 32) | d
