"""Self-attention of the DiT family: softmax (the teacher) and LiT's linear attention.

Both share DiT's fused `qkv` and `proj` layers (official names), and both can run a subset of
heads by slicing those weights, which is how a dynamic student skips the heads its router turned
off. `head_mask` multiplies per-head outputs (the differentiable training path); `heads` slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.dynamic import UnitSelection, unit_rows
from models.kernels.dispatch import get_ops


class _MultiHeadProjections(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def _qkv(self, x: torch.Tensor, heads: UnitSelection | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, h, N, d) for all heads or only the selected ones."""
        b, n, _ = x.shape
        if heads is None or heads.full:
            qkv = self.qkv(x)
            h = self.num_heads
        else:
            rows = unit_rows(heads.index, self.head_dim)
            rows = torch.cat([rows, rows + self.dim, rows + 2 * self.dim])
            qkv = F.linear(x, self.qkv.weight.index_select(0, rows), self.qkv.bias.index_select(0, rows))
            h = heads.index.numel()
        q, k, v = qkv.reshape(b, n, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _out(self, o: torch.Tensor, head_mask: torch.Tensor | None, heads: UnitSelection | None) -> torch.Tensor:
        """Merge heads (B, h, N, d) → (B, N, D) through `proj`, masking or slicing heads."""
        b, h, n, d = o.shape
        if heads is not None and heads.mask is not None:
            o = o * heads.mask[:, :, None, None].to(o.dtype)
        if head_mask is not None:
            o = o * head_mask[:, :, None, None].to(o.dtype)
        o = o.transpose(1, 2).reshape(b, n, h * d)
        if heads is None or heads.full:
            return self.proj(o)
        cols = unit_rows(heads.index, self.head_dim)
        return F.linear(o, self.proj.weight.index_select(1, cols), self.proj.bias)


class SoftmaxAttention(_MultiHeadProjections):
    """DiT's attention (timm layout: qkv → (3, B, H, N, d)), computed with SDPA."""

    def forward(
        self,
        x: torch.Tensor,
        grid_hw: tuple[int, int],
        head_mask: torch.Tensor | None = None,
        heads: UnitSelection | None = None,
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return self._out(o, head_mask, heads)


class LinearAttention(_MultiHeadProjections):
    """LiT's simplified linear attention: ReLU kernel, eps-normaliser, plus a depth-wise conv on V.

    `out = LinAttn(Q, K, V) + DWC(V)` per head, then `proj`; the 5×5 DWC weights are shared across
    heads (LiT/LINA) and act on the token grid, restoring the locality linear attention lacks.
    The matrix products run in fp32 with autocast off (see the kernel reference).
    """

    def __init__(self, dim: int, num_heads: int, dwc_kernel: int = 5, eps: float = 1e-6, kernels: str = "auto") -> None:
        super().__init__(dim, num_heads)
        self.eps = eps
        self.kernels = kernels
        self.dwc = (
            nn.Conv2d(self.head_dim, self.head_dim, dwc_kernel, padding=dwc_kernel // 2, groups=self.head_dim)
            if dwc_kernel
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        grid_hw: tuple[int, int],
        head_mask: torch.Tensor | None = None,
        heads: UnitSelection | None = None,
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, heads)
        o = get_ops(self.kernels, x.device).linear_attention(q, k, v, self.eps)
        if self.dwc is not None:
            b, h, n, d = v.shape
            gh, gw = grid_hw
            v_img = v.reshape(b * h, n, d).transpose(1, 2).reshape(b * h, d, gh, gw)
            o = o + self.dwc(v_img).reshape(b, h, d, n).transpose(2, 3).to(o.dtype)
        return self._out(o, head_mask, heads)


def build_attention(kind: str, dim: int, num_heads: int, dwc_kernel: int, eps: float, kernels: str) -> nn.Module:
    if kind == "softmax":
        return SoftmaxAttention(dim, num_heads)
    if kind == "linear":
        return LinearAttention(dim, num_heads, dwc_kernel=dwc_kernel, eps=eps, kernels=kernels)
    raise ValueError(f"attention kind {kind!r} is not one of ('softmax', 'linear')")
