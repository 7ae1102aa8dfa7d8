"""Self-attention of the DiT family: softmax (the teacher) and LiT's linear attention.

Both share DiT's fused `qkv` and `proj` layers (official names), and both can run a subset of
heads by slicing those weights, which is how a dynamic student skips the heads its router turned
off. `head_mask` multiplies per-head outputs (the differentiable training path); `heads` slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.dynamic import SlicedWeights, UnitSelection, sliced_linear
from models.kernels.depthwise_conv import depthwise_conv2d
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
        self._qkv_slices = SlicedWeights()
        self._proj_slices = SlicedWeights()

    def _qkv(self, x: torch.Tensor, heads: UnitSelection | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, h, N, d) for all heads or only the selected ones."""
        b, n, _ = x.shape
        if heads is None or heads.full:
            qkv = self.qkv(x)
            h = self.num_heads
        else:
            params = (self.qkv.weight, self.qkv.bias)
            w, bias = self._qkv_slices.get(heads, params, lambda: self._slice_qkv(heads))
            qkv = sliced_linear(self.qkv, x, w, bias, rows=self._qkv_rows(heads))
            h = heads.index.numel()
        # Split on the (b, n, 3, h, d) view and transpose each: the backward's stack of dq, dk, dv
        # then lands directly in qkv's layout (a permute-then-unbind would add a full copy).
        q, k, v = qkv.view(b, n, 3, h, self.head_dim).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _out(self, o: torch.Tensor, head_mask: torch.Tensor | None, heads: UnitSelection | None) -> torch.Tensor:
        """Merge heads (B, N, h, d) → (B, N, D) through `proj`, masking or slicing heads.

        Heads arrive token-major: SDPA's CPU and CUDA kernels already lay their output out that way,
        and LiT builds it so, so the merge is a view rather than a transposing copy.
        """
        b, n, h, d = o.shape
        if heads is not None and heads.mask is not None:
            o = o * heads.mask[:, None, :, None].to(o.dtype)
        if head_mask is not None:
            o = o * head_mask[:, None, :, None].to(o.dtype)
        o = o.reshape(b, n, h * d)
        if heads is None or heads.full:
            return self.proj(o)
        cols = heads.rows(self.head_dim)
        (w,) = self._proj_slices.get(heads, (self.proj.weight,), lambda: (self.proj.weight.index_select(1, cols),))
        return sliced_linear(self.proj, o, w, self.proj.bias, cols=cols)

    def _qkv_rows(self, heads: UnitSelection) -> torch.Tensor:
        """Rows of the fused qkv layer for the selected heads (their q, k and v parts)."""
        return heads.rows(self.head_dim, copies=3, stride=self.dim)

    def _slice_qkv(self, heads: UnitSelection) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._qkv_rows(heads)
        return self.qkv.weight.index_select(0, rows), self.qkv.bias.index_select(0, rows)


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
        return self._out(o.transpose(1, 2), head_mask, heads)


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
        o = get_ops(self.kernels, x.device).linear_attention(q, k, v, self.eps).transpose(1, 2)  # (B, N, h, d)
        if self.dwc is not None:
            b, h, n, d = v.shape
            gh, gw = grid_hw
            # The heads share one d-channel kernel, so the conv runs once over all h·d channels with
            # the kernel tiled per head, on V's own token-major (channels-last) layout: no transposes.
            v_img = v.transpose(1, 2).reshape(b, gh, gw, h * d).permute(0, 3, 1, 2)
            bias = None if self.dwc.bias is None else self.dwc.bias.repeat(h)
            c = depthwise_conv2d(v_img, self.dwc.weight.repeat(h, 1, 1, 1), bias)
            o = c.permute(0, 2, 3, 1).reshape(b, n, h, d).to(o.dtype) + o
        return self._out(o, head_mask, heads)


def build_attention(kind: str, dim: int, num_heads: int, dwc_kernel: int, eps: float, kernels: str) -> nn.Module:
    if kind == "softmax":
        return SoftmaxAttention(dim, num_heads)
    if kind == "linear":
        return LinearAttention(dim, num_heads, dwc_kernel=dwc_kernel, eps=eps, kernels=kernels)
    raise ValueError(f"attention kind {kind!r} is not one of ('softmax', 'linear')")
