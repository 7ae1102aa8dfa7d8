"""PixArt-Σ model behaviour: KV compression against a naive reference of the official layer, positions
and LiT's DWC on every aspect-ratio bucket's grid, padding with no influence, and the null caption
(guidance dropout and classifier-free guidance keep the prompt's mask)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model, family_of, model_config
from models.diffusion import build_objective
from models.diffusion.samplers import guided_model, sample
from models.embeddings import sincos_pos_embed_2d
from tests.helpers import randomize_

TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, caption_channels=16, model_max_length=6)
KINDS = ("pixart-sigma-xl/2", "lit-pixart-sigma-xl/2", "dydit-pixart-sigma-xl/2", "dylit-pixart-sigma-xl/2")
BUCKETS = ((8, 16), (12, 16), (16, 8))  # latents of 1:2, 3:4 and 2:1 buckets


def tiny(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return randomize_(build_model(name, **{**TINY, **kw}), seed=seed)


def text(batch: int = 2, seed: int = 1, length: int = 6, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 2:] = False  # a two-token prompt padded to `length`
    return emb, mask


def latents(hw, batch: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *hw, generator=g), torch.tensor([3, 640])[:batch]


# --- KV-token compression ---------------------------------------------------------------------------
def naive_kv_compress_attention(attn, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """PixArt-Σ's `AttentionKVCompress.forward` (sampling "conv"), written out from the official code."""
    b, n, c = x.shape
    heads, s = attn.num_heads, attn.kv_compress
    q, k, v = attn.qkv(x).reshape(b, n, 3, c).unbind(2)

    def down(t):
        t = t.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)
        t = F.conv2d(t, attn.sr.weight, attn.sr.bias, stride=s, groups=c).reshape(b, c, -1).permute(0, 2, 1)
        return F.layer_norm(t, (c,), attn.norm.weight, attn.norm.bias, attn.norm.eps)

    k, v = down(k), down(v)
    n_kv = k.shape[1]
    q = q.reshape(b, n, heads, c // heads).transpose(1, 2)
    k = k.reshape(b, n_kv, heads, c // heads).transpose(1, 2)
    v = v.reshape(b, n_kv, heads, c // heads).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) / (c // heads) ** 0.5).softmax(-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("hw", [(4, 4), (4, 8), (6, 4)])
def test_kv_compression_matches_the_official_layer(hw):
    model = tiny("pixart-sigma-xl/2", kv_compress_layers=[1])
    assert not hasattr(model.blocks[0].attn, "sr")
    attn = model.blocks[1].attn
    assert not torch.equal(attn.sr.weight, torch.full_like(attn.sr.weight, 0.25))  # randomised: the test sees the conv
    x = torch.randn(2, hw[0] * hw[1], 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), naive_kv_compress_attention(attn, x, hw), rtol=1e-5, atol=1e-6)
    fresh = build_model("pixart-sigma-xl/2", **TINY, kv_compress_layers=[1]).blocks[1].attn
    assert torch.equal(fresh.sr.weight, torch.full_like(fresh.sr.weight, 0.25)) and not fresh.sr.bias.any()  # average init


def test_kv_compression_is_a_teacher_option():
    for name in KINDS[1:]:
        with pytest.raises(ValueError, match="kv_compress_layers"):
            model_config(name, **TINY, kv_compress_layers=[0])
    with pytest.raises(ValueError, match="kv_compress_layers"):
        model_config("pixart-sigma-xl/2", **TINY, kv_compress_layers=[5])


# --- positions, DWC and shapes on every bucket --------------------------------------------------------
@pytest.mark.parametrize("grid,base,scale", [((4, 8), 4, 1.0), ((64, 32), 64, 2.0), ((24, 32), 32, 0.5)])
def test_positions_match_diffusers_for_every_grid(grid, base, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = torch.from_numpy(sincos_pos_embed_2d(32, grid[0], grid[1], base_size=base, interpolation=scale))
    ref = get_2d_sincos_pos_embed(32, grid, base_size=base, interpolation_scale=scale, output_type="pt")
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=1e-6)


def naive_lit_attention(attn, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """LiT's attention by the book, one head at a time: ReLU linear attention plus the 5×5 DWC on V
    laid out as the (h, w) image of the tokens."""
    b, n, c = x.shape
    heads = attn.num_heads
    d = c // heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    outs = []
    for i in range(heads):
        qi, ki, vi = F.relu(q[:, i]), F.relu(k[:, i]), v[:, i]
        lin = (qi @ (ki.transpose(1, 2) @ vi / n)) / (qi @ ki.mean(1, keepdim=True).transpose(1, 2) + attn.eps)
        img = vi.transpose(1, 2).reshape(b, d, *hw)
        conv = F.conv2d(img, attn.dwc.weight, attn.dwc.bias, padding=attn.dwc.padding, groups=d)
        outs.append(lin + conv.reshape(b, d, n).transpose(1, 2))
    return attn.proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("hw", [(4, 8), (6, 8), (8, 4)])
def test_lit_dwc_runs_on_the_buckets_grid(hw):
    attn = tiny("lit-pixart-sigma-xl/2").blocks[0].attn
    x = torch.randn(2, hw[0] * hw[1], 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), naive_lit_attention(attn, x, hw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_runs_every_bucket(name):
    model = tiny(name).eval()
    family = family_of(model)
    emb, mask = text()
    for hw in BUCKETS:
        x, t = latents(hw)
        with torch.no_grad():
            out = model(x, t, emb, mask)
        assert out.shape == (2, 8, *hw) and torch.isfinite(out).all()
        assert family.image_tokens(model.config, hw) == hw[0] * hw[1] // 4
        # the positions it adds are this grid's, rescaled to the training grid as diffusers does
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        grid, cfg = (hw[0] // 2, hw[1] // 2), model.config
        ref = get_2d_sincos_pos_embed(32, grid, base_size=cfg.grid_size, interpolation_scale=cfg.pe_scale, output_type="pt")
        torch.testing.assert_close(model.pos_embed(grid, x.device, torch.float32)[0], ref.float(), rtol=0, atol=1e-6)


def test_latent_shape_for_buckets():
    fam, cfg = family_of(model_config("pixart-sigma-xl/2")), model_config("pixart-sigma-xl/2")
    assert fam.latent_shape(cfg) == (4, 128, 128) and cfg.pe_scale == 2.0
    assert fam.latent_shape(cfg, (768, 1024)) == (4, 96, 128) and fam.latent_shape(cfg, 512) == (4, 64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        fam.latent_shape(cfg, (1000, 1024))


# --- text conditioning --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", KINDS)
def test_padding_tokens_have_no_influence(name):
    model = tiny(name)
    x, t = latents((8, 12))
    emb, mask = text()
    other = emb.clone()
    other[0, 2:] = torch.randn(4, 16) * 100  # only the padded positions of the short prompt change
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(7)
        a = model(x, t, emb, mask)
        torch.manual_seed(7)
        b = model(x, t, other, mask)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=mode)
    model.eval()
    with torch.no_grad():  # the test bites: without the mask the same change moves the output
        assert not torch.allclose(model(x, t, emb, None), model(x, t, other, None), atol=1e-3)


def test_guidance_dropout_swaps_in_the_null_caption_and_keeps_the_mask():
    model = tiny("pixart-sigma-xl/2")
    null = torch.randn(6, 16)
    model.set_null_condition({"text_emb": null, "text_mask": torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)})
    emb, mask = text(batch=3)
    cond = model.condition({"text_emb": emb.to(torch.bfloat16), "text_mask": mask.to(torch.uint8)})
    assert cond["text_mask"].dtype == torch.bool
    dropped = model.drop_condition(cond, torch.tensor([True, False, True]))
    assert torch.equal(dropped["text_mask"], mask)  # the prompt's own mask, as official PixArt
    assert torch.equal(dropped["text_emb"][0], null.to(torch.bfloat16)) and torch.equal(dropped["text_emb"][2], null.to(torch.bfloat16))
    assert torch.equal(dropped["text_emb"][1], cond["text_emb"][1])
    uncond = model.null_condition(cond)
    assert torch.equal(uncond["text_mask"], mask) and torch.equal(uncond["text_emb"], null.to(torch.bfloat16).expand(3, -1, -1))
    with pytest.raises(ValueError, match="model_max_length"):
        model.drop_condition({"text_emb": torch.randn(3, 5, 16), "text_mask": mask[:, :5]}, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(KeyError, match="text_emb"):
        model.condition({"y": torch.zeros(3)})


def test_classifier_free_guidance_uses_the_null_caption_with_the_prompt_mask():
    model = tiny("lit-pixart-sigma-xl/2").eval()
    model.set_null_condition({"text_emb": torch.randn(6, 16)})
    emb, mask = text()
    cond = {"text_emb": emb, "text_mask": mask}
    x, t = latents((8, 8))
    guided = guided_model(model, cond, model.null_condition(cond), cfg_scale=4.5, pred_channels=4)
    with torch.no_grad():
        c = model(x, t, emb, mask)
        u = model(x, t, model.y_embedder.y_embedding.expand(2, -1, -1), mask)
        torch.testing.assert_close(guided(x, t), torch.cat([u[:, :4] + 4.5 * (c[:, :4] - u[:, :4]), c[:, 4:]], 1),
                                   rtol=1e-5, atol=1e-5)
    out = sample(model, build_objective("gaussian"), torch.randn(2, 4, 8, 12), cond,
                 null_cond=model.null_condition(cond), cfg_scale=4.5, steps=3, method="ddim")
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()
