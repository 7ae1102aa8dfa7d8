"""PyTorch references of the fused ops. Every Triton kernel has the same signature as its function here.

These are also what runs on the CPU and wherever Triton is unavailable, so they are written to be
correct first and reasonably fast second (no dense mask products, fp32 accumulation).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F


def autocast_off(device_type: str):
    """Autocast disabled on `device_type`; nothing to disable on the meta device (memory planning
    traces models there, and torch has no autocast state for it)."""
    return nullcontext() if device_type == "meta" else torch.autocast(device_type=device_type, enabled=False)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Non-causal ReLU linear attention, `O_i = φ(q_i)·(Σ_j φ(k_j)ᵀ v_j / N) / (φ(q_i)·mean_j φ(k_j) + eps)`.

    q, k, v: (B, H, N, d). The feature map φ = ReLU is applied here. The K^T V state and the
    normaliser are formed in at least fp32 with autocast off (fp16/bf16 state overflows or loses
    the sum; float64 inputs stay float64, so the reference can be gradchecked); dividing both by N
    keeps them in range without changing the result beyond the eps term.
    Returns (B, H, N, d) in v's dtype.
    """
    out_dtype = v.dtype
    # at least fp32 (fp16/bf16 state overflows or loses the sum); float64 inputs stay float64
    acc = torch.promote_types(torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype), torch.float32)
    with autocast_off(q.device.type):
        qf = F.relu(q.to(acc))
        kf = F.relu(k.to(acc))
        vf = v.to(acc)
        n = kf.shape[-2]
        kv = torch.matmul(kf.transpose(-1, -2), vf) / n  # (B, H, d, d)
        k_mean = kf.mean(dim=-2, keepdim=True)  # (B, H, 1, d)
        num = torch.matmul(qf, kv)  # (B, H, N, d)
        # φ(q)·z as a matmul (not an elementwise product and sum) so FLOP counters see its N·d multiply-adds
        den = torch.matmul(qf, k_mean.transpose(-1, -2)) + eps
        out = num / den
    return out.to(out_dtype)


def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """adaLN: LayerNorm without affine over the last dim, then `x·(1+scale)+shift` per sample.

    x: (B, N, D); shift, scale: (B, D).
    """
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero residual `x + gate·y`; x, y: (B, N, D), gate: (B, D)."""
    return x + gate.unsqueeze(1) * y


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of the flattened batch: x (B, N, D), index (M,) into B·N → (M, D)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def scatter_add_tokens(
    x: torch.Tensor, index: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """`x` with `gate[b]·y` added at the flattened rows `index` (out of place); other rows pass through.

    x: (B, N, D); index: (M,) into B·N; y: (M, D); gate: (B, D) or None.
    """
    b, n, d = x.shape
    if gate is not None:
        y = y * gate.index_select(0, torch.div(index, n, rounding_mode="floor"))
    return x.reshape(b * n, d).index_add(0, index, y.to(x.dtype)).view(b, n, d)
