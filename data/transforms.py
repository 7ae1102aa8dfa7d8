"""Image tensors: uint8 pixels → float32 (C, H, W) in [-1, 1] at a target size.

One function for every format, so `format: digits` and digits read back from shards give the same
tensors. Resizing covers the target and centre-crops (PixArt-Σ's bucket recipe; a square target
is the usual shorter-side resize + centre crop).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 → (C, H, W) uint8 tensor (no copy for contiguous input)."""
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def prepare_image(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) uint8 → (C, h, w) float32 in [-1, 1]: resize to cover (h, w), centre-crop."""
    x = pixels.to(torch.float32)
    h, w = size
    H, W = x.shape[-2:]
    if (H, W) != (h, w):
        scale = max(h / H, w / W)
        rh, rw = max(h, round(H * scale)), max(w, round(W * scale))
        if (rh, rw) != (H, W):
            x = F.interpolate(x.unsqueeze(0), size=(rh, rw), mode="bilinear", align_corners=False,
                              antialias=scale < 1).squeeze(0)
        top, left = (rh - h) // 2, (rw - w) // 2
        x = x[:, top:top + h, left:left + w]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
