"""The PyTorch references of the fused ops, checked against naive formulas in float64, and the dispatcher.

Nothing here imports Triton; the Triton kernels are compared against these references in
tests/test_kernels_triton.py.
"""
import pytest
import torch

from models.kernels import dispatch, reference

torch.manual_seed(0)


def _naive_linear_attention(q, k, v, eps):
    """Through the explicit Nq×Nk matrix A = φ(Q)φ(K)ᵀ: out = A V / (A·1 + Nk·eps), all float64.

    The reference divides the state and the normaliser by Nk, so its eps sits at Nk·eps here.
    """
    q, k, v = (t.double() for t in (q, k, v))
    a = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    return (a @ v) / (a.sum(-1, keepdim=True) + k.shape[-2] * eps)


@pytest.mark.parametrize("shape", [(2, 1, 7, 64), (1, 2, 33, 192), (1, 4, 19, 288), (1, 3, 40, 256)])
def test_linear_attention_matches_explicit_attention_matrix(shape):
    q, k, v = (torch.randn(*shape, dtype=torch.float64) for _ in range(3))
    out = reference.linear_attention(q, k, v)
    torch.testing.assert_close(out, _naive_linear_attention(q, k, v, 1e-6), rtol=1e-10, atol=1e-12)


def test_linear_attention_cross_lengths_and_value_dim():
    q = torch.randn(2, 2, 11, 24, dtype=torch.float64)
    k = torch.randn(2, 2, 29, 24, dtype=torch.float64)
    v = torch.randn(2, 2, 29, 40, dtype=torch.float64)
    out = reference.linear_attention(q, k, v, eps=1e-3)
    assert out.shape == (2, 2, 11, 40)
    torch.testing.assert_close(out, _naive_linear_attention(q, k, v, 1e-3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_attention_low_precision_accumulates_in_fp32(dtype):
    """Inputs in dtype, result in dtype, error no worse than rounding the fp64 answer to dtype (×2)."""
    q, k, v = (torch.randn(2, 2, 300, 64).to(dtype) for _ in range(3))
    out = reference.linear_attention(q, k, v)
    assert out.dtype == dtype
    exact = _naive_linear_attention(q, k, v, 1e-6)
    rounding = (exact.to(dtype).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * rounding + 1e-6


def test_linear_attention_gradcheck():
    q, k, v = (torch.randn(1, 2, 9, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: reference.linear_attention(a, b, c, eps=1e-3), (q, k, v))


def test_modulate_layernorm_matches_formula():
    x = torch.randn(3, 17, 72, dtype=torch.float64)
    shift, scale = torch.randn(3, 72, dtype=torch.float64), torch.randn(3, 72, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    expected = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(reference.modulate_layernorm(x, shift, scale), expected, rtol=1e-10, atol=1e-12)


def test_modulate_layernorm_gradcheck():
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.modulate_layernorm, (x, shift, scale), fast_mode=True)


def test_gated_residual_matches_per_sample_loop():
    x, y = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    gate = torch.randn(3, 16)
    out = reference.gated_residual(x, gate, y)
    for b in range(3):
        torch.testing.assert_close(out[b], x[b] + gate[b] * y[b])


def test_gather_tokens_matches_loop():
    x = torch.randn(3, 10, 8)
    index = torch.tensor([0, 9, 10, 29, 15, 15])
    out = reference.gather_tokens(x, index)
    for j, i in enumerate(index.tolist()):
        torch.testing.assert_close(out[j], x[i // 10, i % 10])


@pytest.mark.parametrize("with_gate", [True, False])
def test_scatter_add_tokens_matches_loop_with_repeats(with_gate):
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    index = torch.tensor([3, 12, 12, 29, 0, 12])
    y = torch.randn(6, 8, dtype=torch.float64)
    gate = torch.randn(3, 8, dtype=torch.float64) if with_gate else None
    x_before = x.clone()
    out = reference.scatter_add_tokens(x, index, y, gate)
    expected = x.clone()
    for j, i in enumerate(index.tolist()):
        g = gate[i // 10] if with_gate else 1.0
        expected[i // 10, i % 10] += g * y[j]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, x_before), "scatter_add_tokens must be out of place"


def test_dispatch_auto_is_reference_on_cpu():
    assert dispatch.get_ops("auto", "cpu") is dispatch.REFERENCE_OPS
    assert dispatch.get_ops("reference", torch.device("cpu")).name == "reference"


def test_dispatch_rejects_unknown_mode():
    with pytest.raises(ValueError, match="not one of"):
        dispatch.get_ops("fast", "cpu")
