"""LiT-PixArt-Σ's linear attention in 16-bit at 1024² and 2048² token counts (4,096 and 16,384 tokens).

ReLU linear attention sums N products per output; with 16-bit state that overflows at high
resolution (Sana issue 267: inf, fixed there with QK-norm). Our PyTorch path keeps φ(K)ᵀV and the
normaliser in fp32 with autocast off, so bf16 and fp16 inputs give finite outputs within rounding of
the fp32 reference; a 16-bit state on the same inputs overflows (the test bites). The Triton
interpreter casts bf16 to fp32, so the kernel's own bf16 is checked only on a GPU (last test).
"""
from __future__ import annotations

import os

import pytest
import torch

from models.attention import LinearAttention
from models.kernels.reference import linear_attention

HEAD = 576  # LiT-PixArt-Σ: 2 heads of 1152 / 2 channels
# bf16 keeps 8 significant bits: rounding q, k, v and the output costs ~2^-8 relative; measured ~2e-3
REL_TOL = 1e-2


def qkv(tokens: int, heads: int = 1, std: float = 4.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, tokens, HEAD, generator=g) * std for _ in range(3)]


def sixteen_bit_state(q, k, v, eps=1e-6):
    """What the fp32 state avoids: φ(K)ᵀV and Σφ(K) accumulated and stored in the inputs' dtype."""
    qf, kf = torch.relu(q), torch.relu(k)
    return (qf @ (kf.transpose(-1, -2) @ v)) / ((qf * kf.sum(-2, keepdim=True)).sum(-1, keepdim=True) + eps)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("tokens", [4096, 16384])
def test_16bit_inputs_stay_finite_and_close_to_fp32(tokens):
    q, k, v = qkv(tokens)
    ref = linear_attention(q, k, v)
    for dtype in (torch.bfloat16, torch.float16):
        out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all(), dtype
        assert rel_err(out, ref) < REL_TOL, (dtype, rel_err(out, ref))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not pull the state back to bf16
        assert rel_err(linear_attention(q, k, v), ref) < 1e-5
    half = [t.half() for t in (q, k, v)]
    assert not torch.isfinite(sixteen_bit_state(*half)).all()  # the overflow the fp32 state prevents


def test_lit_attention_layer_under_bf16_autocast_at_4096_tokens():
    torch.manual_seed(0)
    layer = LinearAttention(2 * HEAD, 2, dwc_kernel=5)
    x = torch.randn(1, 4096, 2 * HEAD) * 2
    with torch.no_grad():
        ref = layer(x, (64, 64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, (64, 64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2  # qkv/proj GEMMs and the DWC in bf16 as well


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter's bf16 is fp32")
@pytest.mark.parametrize("tokens", [4096, 16384])
def test_triton_kernel_bf16_on_gpu(tokens):
    from models.kernels.dispatch import get_ops

    q, k, v = (t.cuda() for t in qkv(tokens, heads=2))
    ref = linear_attention(q, k, v)
    out = get_ops("triton", "cuda").linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1e-6)
    assert torch.isfinite(out).all() and rel_err(out, ref) < REL_TOL
