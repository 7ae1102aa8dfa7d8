"""Attention of every family: softmax self-attention (the teacher, optionally with PixArt-Σ's KV-token
compression), LiT's linear attention, softmax cross-attention to a padded text sequence, and the parts
MMDiT families (FLUX) add: per-head QK RMS norm, the LiT depth-wise conv on a token grid as a function
(`grid_dwc`), and linear attention that keeps RoPE (`rope_linear_attention`).

Self-attention shares DiT's fused `qkv` and `proj` layers (official names); cross-attention has
PixArt's `q_linear`, `kv_linear` (K then V) and `proj`. All can run a subset of heads by slicing
those weights, which is how a dynamic student skips the heads its router turned off. `head_mask`
multiplies per-head outputs (the differentiable training path); `heads` slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from models.dynamic import SlicedWeights, UnitSelection, sliced_linear
from models.kernels.depthwise_conv import depthwise_conv2d
from models.kernels.dispatch import get_ops
from models.kernels.reference import autocast_off
from models.rope import RopeTable, apply_rope


# torch.utils.flop_counter has formulas for SDPA's CUDA kernels but not for its CPU flash kernel, which
# every softmax attention here runs on the CPU: without these, measured FLOPs (FlopCounterMode, the
# benchmarks' FLOPs clock) miss all of QKᵀ and AV there. Same count as torch's CUDA formulas.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
if _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

if _CPU_SDPA_BWD not in flop_registry:
    @register_flop_formula(_CPU_SDPA_BWD)
    def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


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
        return merge_heads(o, self.proj, self._proj_slices, head_mask, heads)

    def _qkv_rows(self, heads: UnitSelection) -> torch.Tensor:
        """Rows of the fused qkv layer for the selected heads (their q, k and v parts)."""
        return heads.rows(self.head_dim, copies=3, stride=self.dim)

    def _slice_qkv(self, heads: UnitSelection) -> tuple[torch.Tensor, torch.Tensor]:
        return _rows(self.qkv, self._qkv_rows(heads))


def merge_heads(o: torch.Tensor, proj: nn.Linear, slices: SlicedWeights, head_mask: torch.Tensor | None,
                heads: UnitSelection | None) -> torch.Tensor:
    """Merge heads (B, N, h, d) → (B, N, D) through `proj`, masking or slicing heads (and an adapter's
    columns with them: `sliced_linear`).

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
        return proj(o)
    cols = heads.rows(d)
    (w,) = slices.get(heads, (proj.weight,), lambda: (proj.weight.index_select(1, cols),))
    return sliced_linear(proj, o, w, proj.bias, cols=cols)


class SoftmaxAttention(_MultiHeadProjections):
    """DiT's attention (timm layout: qkv → (3, B, H, N, d)), computed with SDPA.

    `kv_compress=s > 1` is PixArt-Σ's KV-token compression (`AttentionKVCompress`, sampling "conv"):
    K and V, as (B, C, H, W) maps of the token grid, pass one shared depth-wise conv with kernel =
    stride = s (initialised to the average) and then one affine LayerNorm over C (`sr`, `norm`), so
    the queries attend to s² times fewer keys. The norm mixes every head's channels, so a compressed
    layer cannot slice heads (a dynamic student routes heads only by masking there).
    """

    def __init__(self, dim: int, num_heads: int, kv_compress: int = 1) -> None:
        super().__init__(dim, num_heads)
        self.kv_compress = kv_compress
        if kv_compress > 1:
            self.sr = nn.Conv2d(dim, dim, kv_compress, stride=kv_compress, groups=dim)
            nn.init.constant_(self.sr.weight, 1.0 / kv_compress**2)
            nn.init.zeros_(self.sr.bias)
            self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        grid_hw: tuple[int, int],
        head_mask: torch.Tensor | None = None,
        heads: UnitSelection | None = None,
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, heads)
        if self.kv_compress > 1:
            if heads is not None and not heads.full:
                raise ValueError("a KV-compressed attention layer cannot slice heads (its LayerNorm spans every head)")
            k, v = self._compress(k, grid_hw), self._compress(v, grid_hw)
        o = F.scaled_dot_product_attention(q, k, v)
        return self._out(o.transpose(1, 2), head_mask, heads)

    def _compress(self, t: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """(B, h, N, d) keys or values → (B, h, N', d) on the grid downsampled by `kv_compress`."""
        b, h, n, d = t.shape
        gh, gw = grid_hw
        img = t.transpose(1, 2).reshape(b, gh, gw, h * d).permute(0, 3, 1, 2)
        small = self.norm(self.sr(img).flatten(2).transpose(1, 2))  # (B, N', C)
        return small.view(b, -1, h, d).transpose(1, 2)


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
        # q contiguous once: both matmuls below read it without a copy of their own (saved for backward)
        qf, kf, vf = F.relu(q.to(acc).contiguous()), F.relu(k.to(acc)), v.to(acc)
        n = kf.shape[-2]
        kv = torch.matmul(apply_rope(kf, rope).transpose(-1, -2), vf) / n  # (B, H, d, d)
        num = torch.matmul(apply_rope(qf, rope), kv)
        den = torch.matmul(qf, kf.mean(dim=-2).unsqueeze(-1)) + eps  # a matmul: counted FLOPs, as the reference
        out = num / den
    return out.to(v.dtype)


class CrossAttention(nn.Module):
    """Softmax cross-attention of image tokens to a padded text sequence (PixArt's
    `MultiHeadCrossAttention`: `q_linear`, `kv_linear` giving K then V, `proj`; no norm, no gate).

    `mask` (B, L) bool marks real tokens: padding gets exactly zero attention weight (a boolean
    SDPA mask, the same function as the official code's packed sequences). A row with no real token
    (which T5 never produces: it always emits EOS) attends to every position instead of giving NaN.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim, bias=True)
        self.kv_linear = nn.Linear(dim if context_dim is None else context_dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self._q_slices, self._kv_slices, self._proj_slices = SlicedWeights(), SlicedWeights(), SlicedWeights()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        heads: UnitSelection | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        sliced = heads is not None and not heads.full
        if sliced:
            d, h = self.head_dim, heads.index.numel()
            wq, bq = self._q_slices.get(heads, (self.q_linear.weight, self.q_linear.bias), lambda: _rows(self.q_linear, heads.rows(d)))
            wkv, bkv = self._kv_slices.get(heads, (self.kv_linear.weight, self.kv_linear.bias),
                                           lambda: _rows(self.kv_linear, heads.rows(d, copies=2, stride=self.dim)))
            q = sliced_linear(self.q_linear, x, wq, bq, rows=heads.rows(d))
            kv = sliced_linear(self.kv_linear, context, wkv, bkv, rows=heads.rows(d, copies=2, stride=self.dim))
        else:
            h = self.num_heads
            q, kv = self.q_linear(x), self.kv_linear(context)
        q = q.view(b, n, h, self.head_dim).transpose(1, 2)
        k, v = kv.view(b, context.shape[1], 2, h, self.head_dim).unbind(2)
        attn_mask = None
        if mask is not None:
            mask = mask.bool()
            attn_mask = (mask | ~mask.any(dim=-1, keepdim=True))[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
        return merge_heads(o.transpose(1, 2), self.proj, self._proj_slices, head_mask, heads)


def _rows(linear: nn.Linear, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.weight.index_select(0, rows), linear.bias.index_select(0, rows)


def build_attention(kind: str, dim: int, num_heads: int, dwc_kernel: int, eps: float, kernels: str,
                    kv_compress: int = 1) -> nn.Module:
    if kind == "softmax":
        return SoftmaxAttention(dim, num_heads, kv_compress=kv_compress)
    if kind == "linear":
        if kv_compress > 1:
            raise ValueError("KV-token compression applies to softmax attention; linear attention is already linear in the tokens")
        return LinearAttention(dim, num_heads, dwc_kernel=dwc_kernel, eps=eps, kernels=kernels)
    raise ValueError(f"attention kind {kind!r} is not one of ('softmax', 'linear')")
