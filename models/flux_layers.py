"""FLUX's layers under BFL's parameter names (`src/flux/modules/layers.py`), with the student parts.

MLPEmbedder (`in_layer`, `out_layer`), Modulation (`lin`), the double blocks' self-attention
(`qkv`, `norm.{query,key}_norm.scale`, `proj`), the final layer (`adaLN_modulation.1` ordered
shift, scale; `linear`), the joint token mixing of either attention kind, and DyFLUX's token router
(`token_selection.{linear_t,norm,router}`, the released router's names).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from models.attention import QKNorm, grid_dwc, rope_linear_attention
from models.dynamic import SlicedWeights, UnitSelection, gumbel_sigmoid_ste, sliced_linear
from models.kernels.dispatch import get_ops
from models.rope import RopeTable, apply_rope

LN_EPS = 1e-6


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear: the timestep, guidance and pooled-text embedders."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x.to(self.in_layer.weight.dtype))))


class Modulation(nn.Module):
    """`lin(SiLU(vec))` chunked into (shift, scale, gate) once (single) or twice (double), each (B, D)."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec)).chunk(self.multiplier, dim=-1)


class SelfAttention(nn.Module):
    """One stream's attention projections in a double block: fused `qkv` ("B L (K H D)" layout),
    per-head QK norm, output `proj`. The token mixing itself is joint over both streams (`mix_tokens`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)
        self._qkv_slices = SlicedWeights()
        self._proj_slices = SlicedWeights()

    def project(self, x: torch.Tensor, heads: UnitSelection | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed q, k and v (B, h, L, d) of every head, or of the selected heads only."""
        if heads is None or heads.full:
            qkv, h = self.qkv(x), self.num_heads
        else:
            params = tuple(p for p in (self.qkv.weight, self.qkv.bias) if p is not None)
            w, b = self._qkv_slices.get(heads, params, lambda: self._slice_qkv(heads))
            rows = heads.rows(self.head_dim, copies=3, stride=self.dim)
            qkv, h = sliced_linear(self.qkv, x, w, b, rows=rows), heads.index.numel()  # + an adapter's rows
        return split_heads(qkv, h, self.head_dim, self.norm)

    def _slice_qkv(self, heads: UnitSelection) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = heads.rows(self.head_dim, copies=3, stride=self.dim)
        bias = None if self.qkv.bias is None else self.qkv.bias.index_select(0, rows)
        return self.qkv.weight.index_select(0, rows), bias

    def output(self, o: torch.Tensor, heads: UnitSelection | None) -> torch.Tensor:
        """`proj` of merged heads o (B, L, h, d), of the selected heads' columns when slicing."""
        o = o.flatten(2)
        if heads is None or heads.full:
            return self.proj(o)
        cols = heads.rows(self.head_dim)
        (w,) = self._proj_slices.get(heads, (self.proj.weight,), lambda: (self.proj.weight.index_select(1, cols),))
        return sliced_linear(self.proj, o, w, self.proj.bias, cols=cols)


def split_heads(qkv: torch.Tensor, h: int, d: int, norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3·h·d) in the "(K H D)" layout → QK-normed q, k and v, each (B, h, L, d)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, h, d).unbind(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = norm(q, k, v)
    return q, k, v


class TokenMixer(nn.Module):
    """Joint attention over [text; image] tokens: softmax with RoPE (FLUX), or LiT's ReLU linear
    attention (RoPE in the numerator, or none) plus its depth-wise conv on the image tokens' grid.

    Holds only the DWC weights (`dwc`, LiT); q, k and v come from the block's own projections.
    """

    def __init__(self, kind: str, head_dim: int, dwc_kernel: int, eps: float, linear_rope: bool, kernels: str) -> None:
        super().__init__()
        self.kind, self.eps, self.linear_rope, self.kernels = kind, eps, linear_rope, kernels
        self.dwc = (nn.Conv2d(head_dim, head_dim, dwc_kernel, padding=dwc_kernel // 2, groups=head_dim)
                    if kind == "linear" and dwc_kernel else None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeTable, n_txt: int,
                grid_hw: tuple[int, int]) -> torch.Tensor:
        """q, k, v (B, h, L, d) → (B, L, h, d), token-major."""
        if self.kind == "softmax":
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        if self.linear_rope:
            o = rope_linear_attention(q, k, v, rope, self.eps)
        else:
            o = get_ops(self.kernels, q.device).linear_attention(q, k, v, self.eps)
        o = o.transpose(1, 2)
        if self.dwc is None:
            return o
        img = grid_dwc(v[:, :, n_txt:], grid_hw, self.dwc).to(o.dtype)
        return torch.cat([o[:, :n_txt], o[:, n_txt:] + img], dim=1)


def full_heads(o: torch.Tensor, heads: UnitSelection | None, num_heads: int) -> torch.Tensor:
    """(B, L, h, d) of the computed heads → (B, L, H·d) with zeros for heads not computed."""
    if heads is None or heads.full:
        return o.flatten(2)
    full = o.new_zeros(*o.shape[:2], num_heads, o.shape[-1])
    return full.index_copy(2, heads.index, o).flatten(2)


class LastLayer(nn.Module):
    """Final adaLN (SiLU → Linear → shift, scale: BFL's order; diffusers stores scale, shift) and the
    projection to packed output channels."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class TokenRouter(nn.Module):
    """DyFLUX's token router as released (`TokenSelect_baesd_on_x_t_text`): its own adaLN from the
    block's conditioning vector modulates LayerNorm'd image and text tokens; the text is mean-pooled and
    added to every image token; `router` gives one logit per image token, made a hard 0/1 decision by
    the straight-through Gumbel-sigmoid. Text tokens are never routed (they are always computed)."""

    def __init__(self, dim: int, tau: float, threshold: float) -> None:
        super().__init__()
        self.linear_t = nn.Linear(dim, 4 * dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.router = nn.Linear(dim, 1, bias=True)
        self.tau, self.threshold = tau, threshold

    def logits(self, img: torch.Tensor, vec: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """img (B, N, D), vec (B, D), txt (B, L, D) → (B, N) routing logits (fp32)."""
        shift, scale, shift_t, scale_t = self.linear_t(F.silu(vec)).chunk(4, dim=1)
        x = self.norm(img) * (1 + scale[:, None]) + shift[:, None]
        t = (self.norm(txt) * (1 + scale_t[:, None]) + shift_t[:, None]).mean(dim=1, keepdim=True)
        return self.router(x + t).squeeze(-1).float()

    def forward(self, img: torch.Tensor, vec: torch.Tensor, txt: torch.Tensor,
                seeds: torch.Tensor | None = None, salt: int = 0) -> torch.Tensor:
        """(B, N) token mask."""
        return gumbel_sigmoid_ste(self.logits(img, vec, txt), self.tau, self.training, self.threshold,
                                  seeds=seeds, salt=salt)


def call_router(router: nn.Module, x: torch.Tensor, seeds: torch.Tensor | None, salt: int) -> torch.Tensor:
    """A width `Router` on the timestep embedding, with this call site's seeds and salt (per-sample noise)."""
    return router(x, seeds, salt)
