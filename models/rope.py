"""Multi-axis rotary position embedding (RoPE) as FLUX uses it, for any family with position ids.

Each token carries integer ids on A axes (FLUX: (0, row, col) for image tokens, zeros for text);
axis a owns `axes_dim[a]` channels of every head, rotated in adjacent pairs (2j, 2j+1) by the
angle `id_a · θ^(−2j/axes_dim[a])`. Tables are built in float64 and kept in fp32, and rotations run
in fp32 and cast back, as BFL's `apply_rope` and diffusers' `FluxPosEmbed` do. When a head is wider
than `sum(axes_dim)` (a student with fewer, wider heads) only its first `sum(axes_dim)` channels
rotate and the rest pass unchanged (partial RoPE).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Sequence

import torch


class RopeTable(NamedTuple):
    """cos and sin of every (token, channel pair): (L, R/2) fp32 each, R = sum(axes_dim)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_table(ids: torch.Tensor, axes_dim: Sequence[int], theta: float, dtype: torch.dtype = torch.float32) -> RopeTable:
    """Angles of ids (L, A) on A axes of `axes_dim` channels each (every entry even), computed in float64
    and kept in `dtype` (fp32 as FLUX; float64 for references)."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dim={list(axes_dim)} names {len(axes_dim)}")
    angles = []
    for a, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"axes_dim={list(axes_dim)}: every axis needs an even number of channels")
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(torch.outer(ids[:, a].double(), freqs))
    ang = torch.cat(angles, dim=-1)
    return RopeTable(ang.cos().to(dtype), ang.sin().to(dtype))


def image_text_ids(n_txt: int, grid_hw: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """FLUX's ids, text first: text tokens (0, 0, 0), image tokens (0, row, col) in row-major order."""
    h, w = grid_hw
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return torch.cat([torch.zeros(n_txt, 3, dtype=img.dtype, device=device), img]).float()


@lru_cache(maxsize=16)
def _flux_table(n_txt: int, grid_hw: tuple[int, int], axes_dim: tuple[int, ...], theta: float, device: str) -> RopeTable:
    return rope_table(image_text_ids(n_txt, grid_hw, device), axes_dim, theta)


def flux_rope(n_txt: int, grid_hw: tuple[int, int], axes_dim: Sequence[int], theta: float,
              device: torch.device) -> RopeTable:
    """The table of a [text; image] sequence, built once per shape and device (every block of every
    forward at that size shares it). Blocks build it themselves from integers, so no fp32 table passes
    through a mixed-precision policy that would cast block inputs to bf16."""
    return _flux_table(n_txt, tuple(grid_hw), tuple(axes_dim), float(theta), str(device))


def apply_rope(x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, H, L, d) in (at least) fp32; returns x's dtype.

    `rope` covers the first R ≤ d channels; the rest are returned unchanged. Each pair (x0, x1) is
    multiplied as the complex number x0 + i·x1 by cos + i·sin: one fused product instead of the
    four multiplies, two adds and a stack of the real form (the same arithmetic).
    """
    r = 2 * rope.cos.shape[-1]
    if r > x.shape[-1]:
        raise ValueError(f"RoPE covers {r} channels but heads have only {x.shape[-1]}")
    acc = torch.promote_types(x.dtype, torch.float32)
    head = x[..., :r].to(acc).contiguous()
    cis = torch.complex(rope.cos.to(device=x.device, dtype=acc), rope.sin.to(device=x.device, dtype=acc))
    rotated = torch.view_as_real(torch.view_as_complex(head.unflatten(-1, (-1, 2))) * cis).flatten(-2).to(x.dtype)
    return rotated if r == x.shape[-1] else torch.cat([rotated, x[..., r:]], dim=-1)
