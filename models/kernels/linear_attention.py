"""Fused non-causal ReLU linear attention: `reference.linear_attention` as Triton forward and backward.

Two phases each way, so q, k, v are read once in their own dtype and the output written once,
with nothing of size (N, d) in fp32 ever reaching memory (the reference makes five such copies):

  forward   1. state:  S = φ(k)ᵀv/N, z = mean φ(k)       split-N reduction → (B·H, D, E) fp32
            2. out:    out = φ(q)S / (φ(q)·z + eps)       per N-tile, division fused; saves den
  backward  1. dq:     dq = [q>0](dO Sᵀ − delta zᵀ)/den   per N-tile; delta = rowsum(dO ⊙ out)
            2. state:  dS = φ(q)ᵀ(dO/den)/N, dz = −φ(q)ᵀ(delta/den)/N   (same kernel as forward 1)
            3. dk, dv: dk = [k>0](v dSᵀ + dz),  dv = φ(k) dS

This is SANA's "pad V with a row of ones" trick with the ones column kept as the separate
vector z, so no head dim is padded to d+1 (which would cost a whole extra tile at d = 256).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from models.kernels import linear_attention_kernels as K
from models.kernels import reference
from models.kernels.tuning import FLOAT_DTYPES, TunedKernel, check_device, precision, prune_blocks, rows_per_program


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


_STATE = TunedKernel(
    K.state_kernel,
    configs=[
        _cfg(4, 3, BLOCK_A=64, BLOCK_C=64, BLOCK_N=64),
        _cfg(4, 3, BLOCK_A=64, BLOCK_C=64, BLOCK_N=128),
        _cfg(8, 3, BLOCK_A=128, BLOCK_C=64, BLOCK_N=64),
        _cfg(8, 3, BLOCK_A=64, BLOCK_C=128, BLOCK_N=64),
        _cfg(8, 3, BLOCK_A=128, BLOCK_C=128, BLOCK_N=64),
        _cfg(4, 4, BLOCK_A=32, BLOCK_C=64, BLOCK_N=128),
    ],
    key=["rows_per_split", "D", "E", "BWD"],
    interpret_meta=dict(BLOCK_A=64, BLOCK_C=64, BLOCK_N=32),
    prune=prune_blocks({"BLOCK_A": "D", "BLOCK_C": "E", "BLOCK_N": "rows_per_split"}),
)
_OUT = TunedKernel(
    K.out_kernel,
    configs=[
        _cfg(4, 3, BLOCK_N=64, BLOCK_C=64, BLOCK_K=64),
        _cfg(4, 3, BLOCK_N=128, BLOCK_C=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_N=128, BLOCK_C=64, BLOCK_K=32),
        _cfg(4, 3, BLOCK_N=64, BLOCK_C=128, BLOCK_K=32),
        _cfg(8, 3, BLOCK_N=128, BLOCK_C=128, BLOCK_K=32),
        _cfg(4, 3, BLOCK_N=64, BLOCK_C=32, BLOCK_K=64),
    ],
    key=["N", "D", "E"],
    interpret_meta=dict(BLOCK_N=32, BLOCK_C=64, BLOCK_K=64),
    prune=prune_blocks({"BLOCK_N": "N", "BLOCK_C": "E", "BLOCK_K": "D"}),
)
_DQ = TunedKernel(
    K.dq_kernel,
    configs=[
        _cfg(4, 3, BLOCK_N=64, BLOCK_A=64, BLOCK_K=64),
        _cfg(4, 3, BLOCK_N=128, BLOCK_A=64, BLOCK_K=32),
        _cfg(8, 3, BLOCK_N=128, BLOCK_A=64, BLOCK_K=64),
        _cfg(4, 3, BLOCK_N=64, BLOCK_A=128, BLOCK_K=32),
        _cfg(4, 3, BLOCK_N=64, BLOCK_A=32, BLOCK_K=64),
    ],
    key=["N", "D", "E"],
    interpret_meta=dict(BLOCK_N=32, BLOCK_A=64, BLOCK_K=64),
    prune=prune_blocks({"BLOCK_N": "N", "BLOCK_A": "D", "BLOCK_K": "E"}),
)
_DKDV = TunedKernel(
    K.dkdv_kernel,
    configs=[
        _cfg(4, 3, BLOCK_N=64, BLOCK_T=64, BLOCK_K=32),
        _cfg(4, 3, BLOCK_N=64, BLOCK_T=64, BLOCK_K=64),
        _cfg(8, 3, BLOCK_N=128, BLOCK_T=64, BLOCK_K=32),
        _cfg(4, 3, BLOCK_N=64, BLOCK_T=32, BLOCK_K=64),
        _cfg(4, 3, BLOCK_N=128, BLOCK_T=32, BLOCK_K=64),
    ],
    key=["N", "D", "E"],
    interpret_meta=dict(BLOCK_N=32, BLOCK_T=64, BLOCK_K=64),
    prune=prune_blocks({"BLOCK_N": "N", "BLOCK_T": "E", "BLOCK_K": "D"}),
)


def _state(
    a: torch.Tensor, b: torch.Tensor, scale: float,
    den: torch.Tensor | None = None, delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, z) = scale·(φ(a)ᵀ(w·b), φ(a)ᵀu) in fp32, reduced over N in splits (see state_kernel)."""
    bsz, heads, n, d = a.shape
    e = b.shape[-1]
    bh = bsz * heads
    tiles = bh * triton.cdiv(d, 64) * triton.cdiv(e, 64)
    rows = min(rows_per_program(n, tiles, a.device, minimum=512), max(n, 1))
    splits = triton.cdiv(n, rows)
    s = torch.empty((splits, bh, d, e), device=a.device, dtype=torch.float32)
    z = torch.empty((splits, bh, d), device=a.device, dtype=torch.float32)
    bwd = den is not None
    grid = lambda m: (triton.cdiv(d, m["BLOCK_A"]) * triton.cdiv(e, m["BLOCK_C"]), splits, bh)  # noqa: E731
    _STATE[grid](
        a, b, den if bwd else s, delta if bwd else s, s, z,
        *a.stride(), *b.stride(),
        heads, n, d, e, rows, scale,
        BWD=bwd, PREC=precision(a.dtype),
    )
    if splits == 1:
        return s[0], z[0]
    return s.sum(0), z.sum(0)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float):
    """out, and what the backward needs: S (B·H, D, E), z (B·H, D) and den (B·H, Nq), all fp32."""
    bsz, heads, n, d = q.shape
    e = v.shape[-1]
    s, z = _state(k, v, 1.0 / k.shape[-2])
    out = torch.empty((bsz, heads, n, e), device=q.device, dtype=q.dtype)
    den = torch.empty((bsz * heads, n), device=q.device, dtype=torch.float32)
    grid = lambda m: (triton.cdiv(e, m["BLOCK_C"]), triton.cdiv(n, m["BLOCK_N"]), bsz * heads)  # noqa: E731
    _OUT[grid](q, s, z, out, den, *q.stride(), *out.stride(), heads, n, d, e, float(eps), PREC=precision(q.dtype))
    return out, s, z, den


def _backward(q, k, v, out, s, z, den, dout):
    """dq, dk, dv in three launches: dq (+delta), then dS/dz (the state kernel again), then dk/dv."""
    bsz, heads, n, d = q.shape
    nk, e = k.shape[-2], v.shape[-1]
    bh = bsz * heads
    prec = precision(q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    delta = torch.empty((bh, n), device=q.device, dtype=torch.float32)
    grid = lambda m: (triton.cdiv(d, m["BLOCK_A"]), triton.cdiv(n, m["BLOCK_N"]), bh)  # noqa: E731
    _DQ[grid](
        q, out, dout, s, z, den, dq, delta,
        *q.stride(), *out.stride(), *dout.stride(), *dq.stride(),
        heads, n, d, e, PREC=prec,
    )
    ds, dz = _state(q, dout, 1.0 / nk, den, delta)  # 1/Nk: the chain rule through S = φ(k)ᵀv/Nk
    dk = torch.empty((bsz, heads, nk, d), device=k.device, dtype=k.dtype)
    dv = torch.empty((bsz, heads, nk, e), device=v.device, dtype=v.dtype)
    grid = lambda m: (triton.cdiv(max(d, e), m["BLOCK_T"]), triton.cdiv(nk, m["BLOCK_N"]), bh)  # noqa: E731
    _DKDV[grid](k, v, ds, dz, dk, dv, *k.stride(), *v.stride(), heads, nk, d, e, PREC=prec)
    return dq, dk, dv


# As torch.library custom ops (opaque to torch.compile, which compiles the model around them): the
# forward returns out with the fp32 S, z, den the backward needs; the backward is a second op.
@torch.library.custom_op("ditill::linear_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(q, k, v, eps)


@_fwd_op.register_fake
def _(q, k, v, eps):
    bsz, heads, n, d = q.shape
    bh, e = bsz * heads, v.shape[-1]
    f32 = dict(dtype=torch.float32)
    return q.new_empty((bsz, heads, n, e)), q.new_empty((bh, d, e), **f32), q.new_empty((bh, d), **f32), q.new_empty((bh, n), **f32)


@torch.library.custom_op("ditill::linear_attention_bwd", mutates_args=())
def _bwd_op(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, s: Tensor, z: Tensor, den: Tensor, dout: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(q, k, v, out, s, z, den, dout)


@_bwd_op.register_fake
def _(q, k, v, out, s, z, den, dout):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    """Saves q, k, v, out and the small fp32 S, z, den.

    out is saved (the backward's delta = rowsum(dO ⊙ out)), so modifying the returned tensor in
    place before backward raises autograd's version-counter error rather than a wrong gradient.
    """
    q, k, v, _ = inputs
    out, s, z, den = output
    ctx.save_for_backward(q, k, v, out, s, z, den)
    ctx.mark_non_differentiable(s, z, den)


def _backward_rule(ctx, dout, *_):  # first order only: the backward op has no autograd of its own
    q, k, v, out, s, z, den = ctx.saved_tensors
    dq, dk, dv = _bwd_op(q, k, v, out, s, z, den, dout)
    return dq, dk, dv, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# FlopCounterMode does not see into custom ops: count what it counts for the reference, its matmuls:
# φ(k)ᵀv, φ(q)S and the normaliser φ(q)·z forward, twice that backward (dq, dS, dk, dv, and both
# sides of the normaliser).
def _matmul_flops(q_shape, k_shape, v_shape) -> int:
    b, h, nq, d = q_shape
    return 2 * b * h * d * (v_shape[-1] * (nq + k_shape[-2]) + nq)


@register_flop_formula(torch.ops.ditill.linear_attention_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, eps, *, out_shape) -> int:
    return _matmul_flops(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.ditill.linear_attention_bwd)
def _bwd_flops(q_shape, k_shape, v_shape, *saved_and_grad, out_shape) -> int:
    return 2 * _matmul_flops(q_shape, k_shape, v_shape)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Same contract as `reference.linear_attention`: q (B,H,Nq,D), k (B,H,Nk,D), v (B,H,Nk,E) → (B,H,Nq,E).

    Mixed input dtypes run in their promoted dtype (the reference upcasts everything to fp32, so
    this loses nothing it keeps); the result is returned in v's dtype like the reference's. Shapes
    or dtypes the kernels do not cover (not 4-D, broadcast batch/heads, float64) go to the reference.
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if (
        dtype not in FLOAT_DTYPES
        or q.dim() != 4 or k.dim() != 4 or v.dim() != 4
        or q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]
        or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]
        or k.shape[-2] == 0 or q.shape[-2] == 0
    ):
        return reference.linear_attention(q, k, v, eps)
    check_device(q, k, v)
    out = _fwd_op(q.to(dtype), k.to(dtype), v.to(dtype), eps)[0]
    return out.to(v.dtype)
