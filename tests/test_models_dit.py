"""The DiT family: official structure and names, registry, LiT attention against its naive formula."""
import pytest
import torch
import torch.nn.functional as F

from models import build_model, model_config, model_names
from models.attention import LinearAttention, SoftmaxAttention
from models.embeddings import TimestepEmbedder, sincos_pos_embed_2d
from tests.helpers import randomize_, tiny, tiny_inputs

OFFICIAL_KEYS = {
    "x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}
BLOCK_KEYS = {
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
}


def test_state_dict_names_and_shapes_match_official_dit():
    m = build_model("dit-s/2", depth=2)
    sd = m.state_dict()
    expected = OFFICIAL_KEYS | {f"blocks.{i}.{k}" for i in range(2) for k in BLOCK_KEYS}
    assert set(sd) == expected
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 384)  # + the guidance null class
    assert sd["pos_embed"].shape == (1, 256, 384)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 384)  # learned sigma: 2x4 channels


@pytest.mark.parametrize(
    "name,depth,hidden,heads",
    [("dit-s/2", 12, 384, 6), ("dit-b/4", 12, 768, 12), ("dit-l/8", 24, 1024, 16), ("dit-xl/2", 28, 1152, 16),
     ("lit-s/2", 12, 384, 2), ("lit-b/2", 12, 768, 3), ("lit-l/2", 24, 1024, 4), ("lit-xl/2", 28, 1152, 4)],
)
def test_registry_sizes(name, depth, hidden, heads):
    cfg = model_config(name)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, int(name[-1]))


def test_registry_lists_every_family_size_patch_and_rejects_bad_names():
    from models.family import get_family

    names = get_family("dit").names()
    assert len(names) == 4 * 4 * 3 and "dylit-xl/8" in names and set(names) <= set(model_names())
    with pytest.raises(ValueError, match="unknown model"):
        model_config("dit-m/2")
    with pytest.raises(ValueError, match="hidden_sz"):
        model_config("dit-s/2", hidden_sz=64)
    with pytest.raises(ValueError, match="num_heads"):
        model_config("dit-s/2", hidden_size=64)  # 64 is not divisible by S's 6 heads


def test_dit_xl2_parameter_count_matches_official():
    # DiT's train.py reports 675,129,632 for DiT-XL/2, counting its frozen pos_embed Parameter,
    # which is a buffer here.
    with torch.device("meta"):
        m = build_model("dit-xl/2")
    assert sum(p.numel() for p in m.parameters()) + m.pos_embed.numel() == 675_129_632


def test_timestep_embedding_divides_by_half():
    t = torch.tensor([0.0, 1.0, 500.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    assert torch.allclose(emb[:, :128], torch.cos(t[:, None] * freqs))
    assert torch.allclose(emb[:, 128:], torch.sin(t[:, None] * freqs))


def test_pos_embed_layout_w_major_sin_then_cos():
    pe = sincos_pos_embed_2d(8, 3)  # D/4 = 2 frequencies per half
    assert pe.shape == (9, 8)
    # token index r*3+c: first half encodes the column (w), second the row (h); each half = [sin, cos]
    import numpy as np
    r, c = 1, 2
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    assert np.allclose(pe[r * 3 + c, :4], np.concatenate([np.sin(c * omega), np.cos(c * omega)]))
    assert np.allclose(pe[r * 3 + c, 4:], np.concatenate([np.sin(r * omega), np.cos(r * omega)]))


def test_forward_shapes_and_initial_output_is_zero():
    for name in ("dit-s/2", "lit-s/2", "dydit-s/2", "dylit-s/2"):
        m = tiny(name)
        x, t, y = tiny_inputs()
        out = m(x, t, y)
        assert out.shape == (3, 8, 8, 8)
        assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final layer starts at zero


def test_softmax_attention_matches_naive():
    torch.manual_seed(0)
    attn = SoftmaxAttention(24, 3)
    x = torch.randn(2, 10, 24)
    q, k, v = attn.qkv(x).reshape(2, 10, 3, 3, 8).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    ref = attn.proj((a @ v).transpose(1, 2).reshape(2, 10, 24))
    torch.testing.assert_close(attn(x, (2, 5)), ref, rtol=1e-5, atol=1e-5)


def test_linear_attention_matches_naive_formula_with_dwc():
    torch.manual_seed(0)
    attn = LinearAttention(24, 2, dwc_kernel=5, kernels="reference").double()
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 12, 3, 2, 12).permute(2, 0, 3, 1, 4)
    a = F.relu(q) @ F.relu(k).transpose(-1, -2)  # (B, h, N, N) kernel matrix
    lin = (a @ v / 12) / (a.sum(-1, keepdim=True) / 12 + 1e-6)
    # DWC on the (3, 4) token grid, weights shared by the heads
    v_img = v.reshape(4, 12, 12).transpose(1, 2).reshape(4, 12, 3, 4)
    conv = F.conv2d(v_img, attn.dwc.weight, attn.dwc.bias, padding=2, groups=12).reshape(2, 2, 12, 12).transpose(2, 3)
    ref = attn.proj((lin + conv).transpose(1, 2).reshape(2, 12, 24))
    torch.testing.assert_close(attn(x, (3, 4)), ref, rtol=1e-9, atol=1e-9)


def test_linear_attention_runs_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    attn = LinearAttention(32, 2, kernels="reference")
    x = torch.randn(2, 16, 32) * 30  # large activations: a bf16 K^T V state would lose the sum
    ref = attn(x, (4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, (4, 4))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 2e-2  # bf16 projections only


def test_gradients_flow_to_every_trainable_parameter():
    for name in ("dit-s/2", "lit-s/2", "dylit-s/2"):
        m = randomize_(tiny(name))
        m.train()
        x, t, y = tiny_inputs()
        out, aux = m(x, t, y, return_aux=True)
        loss = out.pow(2).mean() + (aux["flops_ratio"].mean() if aux else 0)
        loss.backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, missing
