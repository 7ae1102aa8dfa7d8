"""Token routing for DyDiT's MLP: gather the routed rows of a flattened batch, scatter-add the gated output back.

`scatter_add_tokens` is where fusion pays. PyTorch's reference gathers the gate rows (M×D written),
multiplies (M×D read twice, written once), then index_adds into a clone of x; its backward gathers
dout, multiplies twice and index_adds the gate gradient into B rows, so M·D atomics collide on B·D
addresses. Here the forward is a clone of x plus one kernel that reads y and the gate and
atomically adds gate·y at the routed rows (atomics keep index_add's semantics for repeated
indices), and the backward is one kernel that gathers dout, writes dy = gate·dout and reduces
dgate = Σ dout·y within a block of rows before a single atomic add per column (per row only when
the block straddles two samples).

`gather_tokens` has nothing to fuse: index_select already reads M rows and writes them once, and
its backward (zeros + index_add) is what any kernel must do. `gather_tokens` below is kept so the
benchmark can measure it against index_select; `TRITON_OPS` uses the reference for it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.kernels import reference
from models.kernels.tuning import FLOAT_DTYPES, check_device


@triton.jit
def _gather_kernel(X, INDEX, OUT, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[j] = X[INDEX[j]] for one (row block, column block); X is (B·N, D) contiguous."""
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_j = j < M
    mask = mask_j[:, None] & (cols < D)[None, :]
    idx = tl.load(INDEX + j, mask=mask_j, other=0).to(tl.int64)
    v = tl.load(X + idx[:, None] * D + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + j.to(tl.int64)[:, None] * D + cols[None, :], v, mask=mask)


@triton.jit
def _scatter_add_kernel(
    OUT, INDEX, Y, GATE, M, N, D, stride_gb,
    HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[INDEX[j]] += GATE[INDEX[j] // N]·Y[j], atomically (OUT already holds x, or zeros)."""
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_j = j < M
    mask_d = cols < D
    mask = mask_j[:, None] & mask_d[None, :]
    idx = tl.load(INDEX + j, mask=mask_j, other=0).to(tl.int64)
    y = tl.load(Y + j.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        b = idx // N
        g = tl.load(GATE + b[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * g
    tl.atomic_add(OUT + idx[:, None] * D + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _scatter_add_bwd_kernel(
    DOUT, INDEX, Y, GATE, DY, DGATE, M, N, D, stride_gb,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dy[j] = gate[b_j]·dout[idx_j];  dgate[b] += Σ_{j: b_j = b} dout[idx_j]·y[j] (fp32 atomics)."""
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_j = j < M
    mask_d = cols < D
    mask = mask_j[:, None] & mask_d[None, :]
    idx = tl.load(INDEX + j, mask=mask_j, other=0).to(tl.int64)
    b = idx // N
    do = tl.load(DOUT + idx[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DY + j.to(tl.int64)[:, None] * D + cols[None, :], (do * g).to(DY.dtype.element_ty), mask=mask)
    y = tl.load(Y + j.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    prod = do * y
    b_lo = tl.min(tl.where(mask_j, b, 2**62), axis=0)
    b_hi = tl.max(tl.where(mask_j, b, -1), axis=0)
    if b_lo == b_hi:
        tl.atomic_add(DGATE + b_lo * D + cols, tl.sum(prod, axis=0), mask=mask_d, sem="relaxed")
    else:
        tl.atomic_add(DGATE + b[:, None] * D + cols[None, :], prod, mask=mask, sem="relaxed")


def _blocks(d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): column tiles of ≤256, ~4K elements a program."""
    block_d = min(256, triton.next_power_of_2(d))
    return max(1, 4096 // block_d), block_d


def _scatter_into(out: torch.Tensor, index: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, n: int) -> None:
    m, d = y.shape
    block_m, block_d = _blocks(d)
    grid = (triton.cdiv(m, block_m), triton.cdiv(d, block_d))
    _scatter_add_kernel[grid](
        out, index, y, gate if gate is not None else y, m, n, d, gate.stride(0) if gate is not None else 0,
        HAS_GATE=gate is not None, BLOCK_M=block_m, BLOCK_D=block_d,
    )


def _gather_forward(x: Tensor, index: Tensor) -> Tensor:
    b, n, d = x.shape
    flat = x.reshape(b * n, d).contiguous()
    m = index.numel()
    out = torch.empty((m, d), device=x.device, dtype=x.dtype)
    block_m, block_d = _blocks(d)
    _gather_kernel[(triton.cdiv(m, block_m), triton.cdiv(d, block_d))](
        flat, index, out, m, d, BLOCK_M=block_m, BLOCK_D=block_d
    )
    return out


def _gather_backward(dout: Tensor, index: Tensor, b: int, n: int) -> Tensor:
    """dx (B, N, D): dout scattered (added) back to the rows it was gathered from."""
    d = dout.shape[-1]
    dx = torch.zeros((b * n, d), device=dout.device, dtype=dout.dtype)
    _scatter_into(dx, index, dout.contiguous(), None, n)
    return dx.view(b, n, d)


def _scatter_forward(x: Tensor, index: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    b, n, d = x.shape
    out = x.reshape(b * n, d).clone(memory_format=torch.contiguous_format)
    _scatter_into(out, index, y.contiguous(), gate, n)
    return out.view(b, n, d)


def _scatter_backward(dout: Tensor, index: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """dy in y's dtype and dgate (B, D) in fp32, in one kernel (the gated case)."""
    b, n, d = dout.shape
    dflat = dout.reshape(b * n, d).contiguous()
    y = y.contiguous()
    m = y.shape[0]
    dy = torch.empty_like(y)
    dgate = torch.zeros((b, d), device=y.device, dtype=torch.float32)
    block_m, block_d = _blocks(d)
    _scatter_add_bwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(d, block_d))](
        dflat, index, y, gate, dy, dgate, m, n, d, gate.stride(0), BLOCK_M=block_m, BLOCK_D=block_d
    )
    return dy, dgate


# torch.library custom ops (see adaln.py): compiled around, never traced into.
_gather_op = torch.library.custom_op("ditill::gather_tokens", _gather_forward, mutates_args=())
_gather_bwd_op = torch.library.custom_op("ditill::gather_tokens_bwd", _gather_backward, mutates_args=())
_scatter_op = torch.library.custom_op("ditill::scatter_add_tokens", _scatter_forward, mutates_args=())
_scatter_bwd_op = torch.library.custom_op("ditill::scatter_add_tokens_bwd", _scatter_backward, mutates_args=())


@_gather_op.register_fake
def _(x, index):
    return x.new_empty((index.shape[0], x.shape[-1]))


@_gather_bwd_op.register_fake
def _(dout, index, b, n):
    return dout.new_empty((b, n, dout.shape[-1]))


@_scatter_op.register_fake
def _(x, index, y, gate):
    return x.new_empty(x.shape)


@_scatter_bwd_op.register_fake
def _(dout, index, y, gate):
    return y.new_empty(y.shape), y.new_empty((dout.shape[0], dout.shape[-1]), dtype=torch.float32)


def _gather_setup(ctx, inputs, output) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.rows = x.shape[:2]


def _gather_grad(ctx, dout):  # first order only
    (index,) = ctx.saved_tensors
    return _gather_bwd_op(dout, index, *ctx.rows), None


def _scatter_setup(ctx, inputs, output) -> None:
    _, index, y, gate = inputs
    ctx.save_for_backward(index, y, gate)


def _scatter_grad(ctx, dout):  # first order only
    index, y, gate = ctx.saved_tensors
    if gate is None:
        b, n, d = dout.shape
        return dout, None, dout.reshape(b * n, d).index_select(0, index).to(y.dtype), None
    dy, dgate = _scatter_bwd_op(dout, index, y, gate)
    return dout, None, dy, dgate.to(gate.dtype)


_gather_op.register_autograd(_gather_grad, setup_context=_gather_setup)
_scatter_op.register_autograd(_scatter_grad, setup_context=_scatter_setup)


def _index_ok(x: torch.Tensor, index: torch.Tensor) -> bool:
    return x.dim() == 3 and index.dim() == 1 and not index.is_floating_point() and x.dtype in FLOAT_DTYPES


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.gather_tokens`; a Triton gather, for measurement (see module doc)."""
    if not _index_ok(x, index) or index.numel() == 0:
        return reference.gather_tokens(x, index)
    check_device(x, index)
    return _gather_op(x, index)


def scatter_add_tokens(
    x: torch.Tensor, index: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """Same contract as `reference.scatter_add_tokens`: x with gate[index // N]·y added at rows index.

    As in the reference, the sum is accumulated in x's dtype (gate·y is formed in fp32 first).
    """
    covered = (
        _index_ok(x, index) and index.numel() > 0 and y.dim() == 2 and y.shape == (index.numel(), x.shape[-1])
        and y.dtype in FLOAT_DTYPES
        and (gate is None or (gate.shape == (x.shape[0], x.shape[-1]) and gate.dtype in FLOAT_DTYPES))
    )
    if not covered:
        return reference.scatter_add_tokens(x, index, y, gate)
    check_device(x, index, y)
    if gate is not None and gate.stride(-1) != 1:
        gate = gate.contiguous()
    return _scatter_op(x, index, y, gate)
