"""Self-attention: softmax (the teacher) and LiT's linear attention, and the parts other families add.

DiT's two modules share its fused `qkv` and `proj` layers (official names), and both can run a
subset of heads by slicing those weights, which is how a dynamic student skips the heads its router
turned off. `head_mask` multiplies per-head outputs (the differentiable training path); `heads` slices.
For MMDiT families (FLUX): per-head QK RMS norm, the LiT depth-wise conv on a token grid as a function
(`grid_dwc`), and linear attention that keeps RoPE (`rope_linear_attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from models.dynamic import SlicedWeights, UnitSelection
from models.kernels.dispatch import get_ops
from models.kernels.reference import autocast_off
from models.rope import RopeTable, apply_rope


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
            qkv = F.linear(x, w, bias)
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
        (w,) = self._proj_slices.get(
            heads, (self.proj.weight,), lambda: (self.proj.weight.index_select(1, heads.rows(self.head_dim)),)
        )
        return F.linear(o, w, self.proj.bias)

    def _slice_qkv(self, heads: UnitSelection) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the fused qkv weight and bias for the selected heads (their q, k and v parts)."""
        rows = heads.rows(self.head_dim, copies=3, stride=self.dim)
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
            o = grid_dwc(v, grid_hw, self.dwc).to(o.dtype) + o
        return self._out(o, head_mask, heads)


def grid_dwc(v: torch.Tensor, grid_hw: tuple[int, int], conv: nn.Conv2d) -> torch.Tensor:
    """LiT's depth-wise conv of V (B, h, N, d) over its (H, W) token grid → (B, N, h, d), token-major.

    The heads share one d-channel kernel, so the conv runs once over all h·d channels with the kernel
    tiled per head, on V's own token-major (channels-last) layout: no transposes.
    """
    b, h, n, d = v.shape
    gh, gw = grid_hw
    if gh * gw != n:
        raise ValueError(f"a {gh}x{gw} token grid holds {gh * gw} tokens, V has {n}")
    v_img = v.transpose(1, 2).reshape(b, gh, gw, h * d).permute(0, 3, 1, 2)
    bias = None if conv.bias is None else conv.bias.repeat(h)
    c = depthwise_conv2d(v_img, conv.weight.repeat(h, 1, 1, 1), bias)
    return c.permute(0, 2, 3, 1).reshape(b, n, h, d)


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned `scale` (BFL's name), computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys (FLUX, SD3): one scale per head channel, shared by heads,
    so a dynamic student's head slicing leaves it whole. Returns q, k in v's dtype, as BFL does."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def rope_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeTable, eps: float = 1e-6) -> torch.Tensor:
    """ReLU linear attention that keeps RoPE: the non-negative features are rotated in the numerator
    only, so the normaliser stays rotation-free and positive (a rotated normaliser can reach zero or
    change sign):

        O_i = R_i φ(q_i) · (Σ_j R_j φ(k_j) v_jᵀ / N)  /  (φ(q_i) · mean_j φ(k_j) + eps),   φ = ReLU.

    q, k, v: (B, H, N, d); `rope` covers the N tokens. Products in at least fp32
    with autocast off, as `reference.linear_attention`. Returns (B, H, N, d) in v's dtype.
    """
    acc = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    with autocast_off(q.device.type):
        qf, kf, vf = F.relu(q.to(acc)), F.relu(k.to(acc)), v.to(acc)
        n = kf.shape[-2]
        kv = torch.matmul(apply_rope(kf, rope).transpose(-1, -2), vf) / n  # (B, H, d, d)
        num = torch.matmul(apply_rope(qf, rope), kv)
        den = (qf * kf.mean(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) + eps
        out = num / den
    return out.to(v.dtype)


class _DepthwiseConv2dCPU(torch.autograd.Function):
    """Depthwise k×k conv (stride 1, 'same' padding) in channels-last, with a fast weight gradient.

    On the CPU, oneDNN's depthwise weight gradient is several times slower than its forward (it
    dominated LiT's backward at 4k-16k tokens). The same gradient is a grouped correlation of the
    padded input with the output gradient as the kernel, which oneDNN runs fast in NCHW; the input
    gradient is the forward conv with the flipped kernel. First-order only (no double backward).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        b, c, hh, ww = x.shape
        k = weight.shape[-1]
        p = k // 2
        dx = dw = db = None
        # In the inputs' own dtype with autocast off: under bf16 autocast the forward ran in bf16,
        # but the gradients must match x and weight (and are better in their precision anyway).
        with torch.autocast(device_type="cpu", enabled=False):
            grad = grad.to(x.dtype)
            if need_x:
                g = grad.contiguous(memory_format=torch.channels_last)
                dx = F.conv2d(g, weight.to(x.dtype).flip(-1, -2), None, padding=k - 1 - p, groups=c)
            if need_w:
                xp = x.new_zeros(1, b * c, hh + 2 * p, ww + 2 * p)  # padded NCHW x in one copy
                xp[..., p : p + hh, p : p + ww].view(b, c, hh, ww).copy_(x)
                kern = grad.contiguous().reshape(b * c, 1, hh, ww)
                dw = F.conv2d(xp, kern, groups=b * c).reshape(b, c, k, k).sum(0).unsqueeze(1)
            if ctx.has_bias and need_b:
                db = grad.sum(dim=(0, 2, 3))
        return dx, dw, db


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=k//2, groups=C)`; on the CPU, in channels-last (oneDNN's fast
    depthwise layout) and, with grad, with the fast weight gradient above."""
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return _DepthwiseConv2dCPU.apply(x, weight, bias)  # without autograd, only its forward runs


def build_attention(kind: str, dim: int, num_heads: int, dwc_kernel: int, eps: float, kernels: str) -> nn.Module:
    if kind == "softmax":
        return SoftmaxAttention(dim, num_heads)
    if kind == "linear":
        return LinearAttention(dim, num_heads, dwc_kernel=dwc_kernel, eps=eps, kernels=kernels)
    raise ValueError(f"attention kind {kind!r} is not one of ('softmax', 'linear')")
