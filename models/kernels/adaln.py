"""Fused adaLN: `modulate_layernorm` (LayerNorm, no affine, then ·(1+scale)+shift) and `gated_residual`.

PyTorch runs each as 3–4 elementwise/normalisation kernels with full-size temporaries; here each is
one pass over the rows forward and one backward. A program owns BLOCK_M rows of one sample, so
that sample's shift/scale/gate row is loaded once; the whole feature dim sits in one tile
(BLOCK_D = next power of two ≥ D, masked). The per-sample parameter gradients (dshift, dscale,
dgate: sums over N) are accumulated in fp32 registers over a chunk of rows per program and
written as one partial per program, then summed by torch: deterministic, and no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.kernels import reference
from models.kernels.tuning import FLOAT_DTYPES, check_device, rows_per_program


@triton.jit
def _modulate_fwd_kernel(
    X, SHIFT, SCALE, Y, MEAN, RSTD,
    stride_xb, stride_xn, stride_hb, stride_cb,
    N, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows < N)[:, None] & mask_d[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    shift = tl.load(SHIFT + b * stride_hb + cols, mask=mask_d, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_cb + cols, mask=mask_d, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(Y + (b * N + rows[:, None]) * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + b * N + rows, mean, mask=rows < N)
    tl.store(RSTD + b * N + rows, rstd, mask=rows < N)


@triton.jit
def _modulate_bwd_kernel(
    X, SCALE, DY, MEAN, RSTD, DX, DSHIFT, DSCALE,
    stride_xb, stride_xn, stride_cb, stride_gb, stride_gn,
    N, D, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·(1+scale); dshift = Σdy, dscale = Σdy·x̂."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    scale1 = 1.0 + tl.load(SCALE + b * stride_cb + cols, mask=mask_d, other=0.0).to(tl.float32)
    dshift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid_p * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        mask = mask_m[:, None] & mask_d[None, :]
        x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + b * stride_gb + rows[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        mean = tl.load(MEAN + b * N + rows, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD + b * N + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dshift += tl.sum(dy, axis=0)
        dscale += tl.sum(dy * xhat, axis=0)
        g = dy * scale1[None, :]
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + (b * N + rows[:, None]) * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    part = (pid_p * tl.num_programs(1) + b) * D
    tl.store(DSHIFT + part + cols, dshift, mask=mask_d)
    tl.store(DSCALE + part + cols, dscale, mask=mask_d)


@triton.jit
def _gated_fwd_kernel(
    X, GATE, Y, OUT,
    stride_xb, stride_xn, stride_gb, stride_yb, stride_yn,
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows < N)[:, None] & mask_d[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * stride_gb + cols, mask=mask_d, other=0.0).to(tl.float32)
    out = x + gate[None, :] * y
    tl.store(OUT + (b * N + rows[:, None]) * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DOUT, GATE, Y, DY, DGATE,
    stride_ob, stride_on, stride_gb, stride_yb, stride_yn,
    N, D, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dy = gate·dout, dgate = Σ_n dout·y (dx = dout needs no kernel)."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    gate = tl.load(GATE + b * stride_gb + cols, mask=mask_d, other=0.0).to(tl.float32)
    dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid_p * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & mask_d[None, :]
        do = tl.load(DOUT + b * stride_ob + rows[:, None] * stride_on + cols[None, :], mask=mask, other=0.0)
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0)
        do = do.to(tl.float32)
        dgate += tl.sum(do * y.to(tl.float32), axis=0)
        tl.store(DY + (b * N + rows[:, None]) * D + cols[None, :], (do * gate[None, :]).to(DY.dtype.element_ty),
                 mask=mask)
    tl.store(DGATE + (pid_p * tl.num_programs(1) + b) * D + cols, dgate, mask=mask_d)


def _row_blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): ~4K elements a program, so D = 384 gets 8 rows and 1152 gets 2."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(16, 4096 // block_d))
    return block_m, block_d, 4 if block_m * block_d <= 4096 else 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) with unit stride along D, the layout the row kernels address (copies only if needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _vec(p: torch.Tensor) -> torch.Tensor:
    return p if p.stride(-1) == 1 else p.contiguous()


def _split(n: int, bsz: int, device: torch.device) -> tuple[int, int]:
    rows = min(rows_per_program(n, bsz, device, minimum=256), max(n, 1))
    return rows, triton.cdiv(n, rows)


def _layer_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """F.layer_norm's output dtype: CUDA autocast runs layer_norm in fp32; otherwise x's dtype."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return x.dtype


def _modulate_forward(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, n, d = x.shape
    x, shift, scale = _rows(x), _vec(shift), _vec(scale)
    y = torch.empty((bsz, n, d), device=x.device, dtype=out_dtype)
    mean = torch.empty((bsz, n), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_m, block_d, warps = _row_blocks(d)
    _modulate_fwd_kernel[(triton.cdiv(n, block_m), bsz)](
        x, shift, scale, y, mean, rstd, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        n, d, float(eps), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return y, mean, rstd


def _modulate_backward(
    x: Tensor, scale: Tensor, dy: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """dx in x's dtype; dshift, dscale as fp32 sums of the per-program partials."""
    bsz, n, d = x.shape
    x, scale, dy = _rows(x), _vec(scale), _rows(dy)
    rows, parts = _split(n, bsz, x.device)
    dx = torch.empty((bsz, n, d), device=x.device, dtype=x.dtype)
    dshift = torch.empty((parts, bsz, d), device=x.device, dtype=torch.float32)
    dscale = torch.empty_like(dshift)
    block_m, block_d, warps = _row_blocks(d)
    _modulate_bwd_kernel[(parts, bsz)](
        x, scale, dy, mean, rstd, dx, dshift, dscale,
        x.stride(0), x.stride(1), scale.stride(0), dy.stride(0), dy.stride(1),
        n, d, rows, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return dx, dshift.sum(0), dscale.sum(0)


def _gated_forward(x: Tensor, gate: Tensor, y: Tensor, out_dtype: torch.dtype) -> Tensor:
    bsz, n, d = x.shape
    x, gate, y = _rows(x), _vec(gate), _rows(y)
    out = torch.empty((bsz, n, d), device=x.device, dtype=out_dtype)
    block_m, block_d, warps = _row_blocks(d)
    _gated_fwd_kernel[(triton.cdiv(n, block_m), bsz)](
        x, gate, y, out, x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        n, d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def _gated_backward(dout: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """dy in y's dtype and dgate as the fp32 sum of the per-program partials (dx = dout needs no kernel)."""
    bsz, n, d = y.shape
    dout, gate, y = _rows(dout), _vec(gate), _rows(y)
    rows, parts = _split(n, bsz, y.device)
    dy = torch.empty((bsz, n, d), device=y.device, dtype=y.dtype)
    dgate = torch.empty((parts, bsz, d), device=y.device, dtype=torch.float32)
    block_m, block_d, warps = _row_blocks(d)
    _gated_bwd_kernel[(parts, bsz)](
        dout, gate, y, dy, dgate, dout.stride(0), dout.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        n, d, rows, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return dy, dgate.sum(0)


# The launchers as torch.library custom ops: torch.compile compiles the model around them (no graph
# break) and calls them as they are. Forward and backward are separate ops, tied by register_autograd.
_modulate_fwd_op = torch.library.custom_op("ditill::modulate_layernorm_fwd", _modulate_forward, mutates_args=())
_modulate_bwd_op = torch.library.custom_op("ditill::modulate_layernorm_bwd", _modulate_backward, mutates_args=())
_gated_fwd_op = torch.library.custom_op("ditill::gated_residual_fwd", _gated_forward, mutates_args=())
_gated_bwd_op = torch.library.custom_op("ditill::gated_residual_bwd", _gated_backward, mutates_args=())


@_modulate_fwd_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    rows = x.shape[:2]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@_modulate_bwd_op.register_fake
def _(x, scale, dy, mean, rstd):
    params = (x.shape[0], x.shape[-1])
    return x.new_empty(x.shape), x.new_empty(params, dtype=torch.float32), x.new_empty(params, dtype=torch.float32)


@_gated_fwd_op.register_fake
def _(x, gate, y, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@_gated_bwd_op.register_fake
def _(dout, gate, y):
    return y.new_empty(y.shape), y.new_empty((y.shape[0], y.shape[-1]), dtype=torch.float32)


def _modulate_setup(ctx, inputs, output) -> None:
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.param_dtypes = (shift.dtype, scale.dtype)


def _modulate_grad(ctx, dy, *_):  # first order only
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _modulate_bwd_op(x, scale, dy, mean, rstd)
    return dx, dshift.to(ctx.param_dtypes[0]), dscale.to(ctx.param_dtypes[1]), None, None


def _gated_setup(ctx, inputs, output) -> None:
    x, gate, y, _ = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gated_grad(ctx, dout):  # first order only
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_bwd_op(dout, gate, y)
    return dout.to(ctx.x_dtype), dgate.to(gate.dtype), dy, None


_modulate_fwd_op.register_autograd(_modulate_grad, setup_context=_modulate_setup)
_gated_fwd_op.register_autograd(_gated_grad, setup_context=_gated_setup)


def _covered(x: torch.Tensor, *rows: torch.Tensor, params: tuple[torch.Tensor, ...]) -> bool:
    """Shapes/dtypes the kernels handle: x (B, N, D) and rows like it, params (B, D), float16/bf16/fp32."""
    if x.dim() != 3 or x.shape[-1] == 0 or any(r.shape != x.shape for r in rows):
        return False
    if any(p.shape != (x.shape[0], x.shape[-1]) for p in params):
        return False
    return all(t.dtype in FLOAT_DTYPES for t in (x, *rows, *params))


def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Same contract and output dtype as `reference.modulate_layernorm` (x (B,N,D), shift/scale (B,D))."""
    if not _covered(x, params=(shift, scale)):
        return reference.modulate_layernorm(x, shift, scale, eps)
    check_device(x, shift, scale)
    out_dtype = torch.promote_types(torch.promote_types(_layer_norm_dtype(x), scale.dtype), shift.dtype)
    return _modulate_fwd_op(x, shift, scale, eps, out_dtype)[0]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.gated_residual`: `x + gate[:, None]·y`, in the promoted dtype.

    The product and sum are formed in fp32 and rounded once (the reference rounds gate·y first).
    """
    if not _covered(x, y, params=(gate,)):
        return reference.gated_residual(x, gate, y)
    check_device(x, gate, y)
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
    return _gated_fwd_op(x, gate, y, out_dtype)
