"""The CPU fast paths of the attention layers compute the same function and gradients as the
plain PyTorch formulation they replace (the speed is measured by `launch.benchmark models`)."""
import pytest
import torch
import torch.nn.functional as F

from models.attention import LinearAttention, depthwise_conv2d


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (1, 4, 8, 8)])
def test_depthwise_conv_matches_conv2d_autograd(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], 1, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    fast = torch.autograd.grad(depthwise_conv2d(x, w, b), (x, w, b), g)
    ref_out = F.conv2d(x, w, b, padding=2, groups=shape[1])
    ref = torch.autograd.grad(ref_out, (x, w, b), g)
    torch.testing.assert_close(depthwise_conv2d(x, w, b), ref_out)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r)


def _naive_lit(attn: LinearAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LiT with per-head DWC through nn.Conv2d autograd (the formulation the fast path replaces)."""
    b, n, dim = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    qf, kf = F.relu(q), F.relu(k)
    num = qf @ (kf.transpose(-1, -2) @ v / n)
    den = (qf * kf.mean(dim=-2, keepdim=True)).sum(-1, keepdim=True) + attn.eps
    v_img = v.reshape(b * h, n, d).transpose(1, 2).reshape(b * h, d, *grid)
    conv = attn.dwc(v_img).reshape(b, h, d, n).transpose(2, 3)
    return attn.proj((num / den + conv).transpose(1, 2).reshape(b, n, dim))


def test_linear_attention_gradients_match_naive():
    torch.manual_seed(0)
    attn = LinearAttention(24, 2, dwc_kernel=5)
    x = torch.randn(2, 12, 24, requires_grad=True)
    g = torch.randn(2, 12, 24)
    grads = []
    for fn in (lambda: attn(x, (3, 4)), lambda: _naive_lit(attn, x, (3, 4))):
        attn.zero_grad()
        x.grad = None
        fn().backward(g)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_linear_attention_backward_under_bf16_autocast():
    torch.manual_seed(0)
    attn = LinearAttention(32, 2)
    x = torch.randn(2, 16, 32, requires_grad=True)
    attn(x, (4, 4)).sum().backward()
    ref = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, (4, 4))
    out.float().sum().backward()
    for p, r in zip(attn.parameters(), ref):
        assert p.grad.dtype == torch.float32
        assert (p.grad - r).norm() <= 3e-2 * r.norm() + 1e-6
