"""Triton kernels of non-causal ReLU linear attention (the launchers and autograd are in linear_attention.py).

Notation per (batch, head): φ = ReLU, q (Nq, D), k (Nk, D), v (Nk, E), S = φ(k)ᵀv/Nk (D, E),
z = mean_n φ(k) (D,), den = φ(q)·z + eps (Nq,), out = φ(q)S / den. Every kernel works on one
(batch·head) at a time, tiles the head dims with masks (so 192, 288 or any d works) and keeps
its accumulators in fp32. Grid axis 0 walks the head-dim tiles so that programs sharing the same
rows run side by side and re-read those rows from L2 rather than from HBM.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def state_kernel(
    A, B, DEN, DELTA, S, Z,
    stride_ab, stride_ah, stride_an, stride_ad,
    stride_bb, stride_bh, stride_bn, stride_bd,
    H, N, D, E, rows_per_split, scale,
    BWD: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (D-tile, E-tile) of S = scale·Σ_n φ(A)ᵀ (w·B) and of z = scale·Σ_n u·φ(A), over one split of N.

    Forward: A = k, B = v, w = u = 1. Backward: A = q, B = dO, w = 1/den, u = -delta/den, which
    gives dS and dz. Each split writes its own fp32 partial (summed by the launcher), so the
    result is deterministic and re-running the kernel (autotuning) is harmless.
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    num_c = tl.cdiv(E, BLOCK_C)
    pid_a = pid_t // num_c
    pid_c = pid_t % num_c
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_a = offs_a < D
    mask_c = offs_c < E
    a_base = A + b * stride_ab + h * stride_ah
    b_base = B + b * stride_bb + h * stride_bh
    row_base = pid_bh.to(tl.int64) * N

    acc = tl.zeros((BLOCK_A, BLOCK_C), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_A,), dtype=tl.float32)
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    # pointers advance by BLOCK_N rows a step (index products once, outside the loop)
    a_ptrs = a_base + offs_n[:, None] * stride_an + offs_a[None, :] * stride_ad
    b_ptrs = b_base + offs_n[:, None] * stride_bn + offs_c[None, :] * stride_bd
    den_ptrs = DEN + row_base + offs_n
    delta_ptrs = DELTA + row_base + offs_n
    for _ in range(n_start, n_end, BLOCK_N):
        mask_n = offs_n < n_end
        a = tl.load(a_ptrs, mask=mask_n[:, None] & mask_a[None, :], other=0.0)
        # ReLU kept in the input dtype: some Triton versions compute bf16 max in fp32 and return fp32
        a = tl.where(a > 0, a, tl.zeros_like(a)).to(A.dtype.element_ty)
        bv = tl.load(b_ptrs, mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        if BWD:
            den = tl.load(den_ptrs, mask=mask_n, other=1.0)
            delta = tl.load(delta_ptrs, mask=mask_n, other=0.0)
            w = 1.0 / den
            af = a.to(tl.float32)
            acc = tl.dot(tl.trans(af), bv.to(tl.float32) * w[:, None], acc, input_precision=PREC)
            zacc += tl.sum(af * (-delta * w)[:, None], axis=0)
        else:
            acc = tl.dot(tl.trans(a), bv, acc, input_precision=PREC)
            zacc += tl.sum(a.to(tl.float32), axis=0)
        offs_n += BLOCK_N
        a_ptrs += BLOCK_N * stride_an
        b_ptrs += BLOCK_N * stride_bn
        den_ptrs += BLOCK_N
        delta_ptrs += BLOCK_N

    part = pid_s.to(tl.int64) * tl.num_programs(2) + pid_bh
    tl.store(S + part * D * E + offs_a[:, None] * E + offs_c[None, :], acc * scale,
             mask=mask_a[:, None] & mask_c[None, :])
    if pid_c == 0:
        tl.store(Z + part * D + offs_a, zacc * scale, mask=mask_a)


@triton.jit
def out_kernel(
    Q, S, Z, O, DEN,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, E, eps,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (N-tile, E-tile) of out = φ(q)S / (φ(q)·z + eps); the E-tile-0 program also stores den.

    The denominator comes from the same φ(q) tiles the matmul loads, so it costs no extra read.
    """
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < E
    q_base = Q + b * stride_qb + h * stride_qh
    s_base = S + pid_bh.to(tl.int64) * D * E
    z_base = Z + pid_bh.to(tl.int64) * D

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    den = tl.zeros((BLOCK_N,), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    q_ptrs = q_base + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qd
    s_ptrs = s_base + offs_k[:, None] * E + offs_c[None, :]
    z_ptrs = z_base + offs_k
    for _ in range(0, D, BLOCK_K):
        mask_k = offs_k < D
        q = tl.load(q_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        q = tl.maximum(q.to(tl.float32), 0.0)
        s = tl.load(s_ptrs, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        z = tl.load(z_ptrs, mask=mask_k, other=0.0)
        acc = tl.dot(q, s, acc, input_precision=PREC)
        den += tl.sum(q * z[None, :], axis=1)
        offs_k += BLOCK_K
        q_ptrs += BLOCK_K * stride_qd
        s_ptrs += BLOCK_K * E
        z_ptrs += BLOCK_K
    den = den + eps
    out = acc / den[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_n[:, None] * stride_on + offs_c[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])
    if pid_c == 0:
        tl.store(DEN + pid_bh.to(tl.int64) * N + offs_n, den, mask=mask_n)


@triton.jit
def dq_kernel(
    Q, O, DO, S, Z, DEN, DQ, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_xb, stride_xh, stride_xn, stride_xd,
    H, N, D, E,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (N-tile, D-tile) of dq = [q>0]·(dO·Sᵀ − delta·z) / den, with delta = rowsum(dO ⊙ out).

    From out = num/den: ∂num = dO/den and ∂den = −(dO·num)/den² = −delta/den, so
    ∂φ(q) = (dO Sᵀ − delta zᵀ)/den. delta is formed here from the saved output (as FlashAttention
    does) and stored by the D-tile-0 program for the dS/dz reduction that runs next. The strides
    `g` are dO's and `x` are dq's.
    """
    pid_a = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_n = offs_n < N
    mask_a = offs_a < D
    o_base = O + b * stride_ob + h * stride_oh
    g_base = DO + b * stride_gb + h * stride_gh
    s_base = S + pid_bh.to(tl.int64) * D * E

    acc = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)
    delta = tl.zeros((BLOCK_N,), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = g_base + offs_n[:, None] * stride_gn + offs_k[None, :] * stride_gd
    o_ptrs = o_base + offs_n[:, None] * stride_on + offs_k[None, :] * stride_od
    s_ptrs = s_base + offs_a[:, None] * E + offs_k[None, :]
    for _ in range(0, E, BLOCK_K):
        mask_k = offs_k < E
        mask_nk = mask_n[:, None] & mask_k[None, :]
        g = tl.load(g_ptrs, mask=mask_nk, other=0.0).to(tl.float32)
        o = tl.load(o_ptrs, mask=mask_nk, other=0.0).to(tl.float32)
        delta += tl.sum(g * o, axis=1)
        s = tl.load(s_ptrs, mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(g, tl.trans(s), acc, input_precision=PREC)
        offs_k += BLOCK_K
        g_ptrs += BLOCK_K * stride_gd
        o_ptrs += BLOCK_K * stride_od
        s_ptrs += BLOCK_K

    row_base = pid_bh.to(tl.int64) * N
    den = tl.load(DEN + row_base + offs_n, mask=mask_n, other=1.0)
    z = tl.load(Z + pid_bh.to(tl.int64) * D + offs_a, mask=mask_a, other=0.0)
    dq = (acc - delta[:, None] * z[None, :]) / den[:, None]
    mask_na = mask_n[:, None] & mask_a[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_a[None, :] * stride_qd,
                mask=mask_na, other=0.0)
    dq = tl.where(q > 0, dq, 0.0)
    tl.store(DQ + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_a[None, :] * stride_xd,
             dq.to(DQ.dtype.element_ty), mask=mask_na)
    if pid_a == 0:
        tl.store(DELTA + row_base + offs_n, delta, mask=mask_n)


@triton.jit
def dkdv_kernel(
    K, V, DS, DZ, DK, DV,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N, D, E,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One N-tile and head-dim tile t of dk = [k>0]·(v·dSᵀ + dz) and of dv = φ(k)·dS.

    dS and dz arrive already divided by Nk (the launcher's reduction scale), since S = φ(k)ᵀv/Nk
    and z = Σφ(k)/Nk. Tile t indexes D for dk and E for dv; when D ≠ E one of the two is masked
    out for the tail tiles. dk and dv are written contiguous, (B, H, N, D) and (B, H, N, E).
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_n = offs_n < N
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    ds_base = DS + pid_bh.to(tl.int64) * D * E
    dk_base = DK + pid_bh.to(tl.int64) * N * D
    dv_base = DV + pid_bh.to(tl.int64) * N * E

    if pid_t * BLOCK_T < D:
        mask_t = offs_t < D
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_k[None, :] * stride_vd
        ds_ptrs = ds_base + offs_t[:, None] * E + offs_k[None, :]
        for _ in range(0, E, BLOCK_K):
            mask_k = offs_k < E
            v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            ds = tl.load(ds_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(v, tl.trans(ds), acc, input_precision=PREC)
            offs_k += BLOCK_K
            v_ptrs += BLOCK_K * stride_vd
            ds_ptrs += BLOCK_K
        dz = tl.load(DZ + pid_bh.to(tl.int64) * D + offs_t, mask=mask_t, other=0.0)
        mask_nt = mask_n[:, None] & mask_t[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_t[None, :] * stride_kd, mask=mask_nt, other=0.0)
        dk = tl.where(k > 0, acc + dz[None, :], 0.0)
        tl.store(dk_base + offs_n[:, None] * D + offs_t[None, :], dk.to(DK.dtype.element_ty), mask=mask_nt)

    if pid_t * BLOCK_T < E:
        mask_t = offs_t < E
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_k[None, :] * stride_kd
        ds_ptrs = ds_base + offs_k[:, None] * E + offs_t[None, :]
        for _ in range(0, D, BLOCK_K):
            mask_k = offs_k < D
            k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            k = tl.maximum(k.to(tl.float32), 0.0)
            ds = tl.load(ds_ptrs, mask=mask_k[:, None] & mask_t[None, :], other=0.0)
            acc = tl.dot(k, ds, acc, input_precision=PREC)
            offs_k += BLOCK_K
            k_ptrs += BLOCK_K * stride_kd
            ds_ptrs += BLOCK_K * E
        tl.store(dv_base + offs_n[:, None] * E + offs_t[None, :], acc.to(DV.dtype.element_ty),
                 mask=mask_n[:, None] & mask_t[None, :])
