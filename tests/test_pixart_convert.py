"""PixArt-Σ weights: diffusers' `PixArtTransformer2DModel` is the oracle.

A tiny random diffusers model (`../shared/T2I.md` §6, `use_additional_conditions=False` set
explicitly) saved to a directory, and the same weights in the official layout (`.pth` with and
without the `state_dict` wrapper, names mapped by hand here), load through `load_pretrained` and
`launch.convert` and give diffusers' output at a square and a non-square latent with a padded mask.
Tolerance 2e-5: fp32, the same math; diffusers masks padding with a −10000 bias, we with a boolean
mask (exactly zero weight), which differ by e^−10000.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launch import convert
from models import load_pretrained
from models.convert import CheckpointError, read_checkpoint
from models.embeddings import sincos_pos_embed_2d
from models.pixart import PixArt
from models.pixart_convert import config_from_diffusers

TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, attention_bias=True, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=1, use_additional_conditions=False, caption_channels=32)
L = 7


@pytest.fixture(scope="module")
def oracle():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(**TINY).eval()


def inputs(hw=(8, 8), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)
    t = torch.tensor([17, 803])[:batch]
    emb = torch.randn(batch, L, 32, generator=g)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[0, :3] = True  # a short prompt: 4 padding tokens
    mask[1:, :] = True
    return x, t, emb, mask


def reference(oracle, x, t, emb, mask):
    with torch.no_grad():
        return oracle(hidden_states=x, encoder_hidden_states=emb, timestep=t, encoder_attention_mask=mask.float(),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def assert_matches(model: PixArt, oracle) -> None:
    for hw in ((8, 8), (8, 12), (12, 8)):
        x, t, emb, mask = inputs(hw)
        with torch.no_grad():
            out = model(x, t, emb, mask)
        assert out.shape == (2, 8, *hw)
        torch.testing.assert_close(out, reference(oracle, x, t, emb, mask), rtol=2e-5, atol=2e-5, msg=f"latent {hw}")


def official_state_dict(oracle) -> dict[str, torch.Tensor]:
    """The oracle's weights under PixArt-Σ's official names (`../shared/T2I.md` §1.8), mapped by hand."""
    d = oracle.state_dict()
    sd = {
        "x_embedder.proj.weight": d["pos_embed.proj.weight"], "x_embedder.proj.bias": d["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": d["adaln_single.emb.timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": d["adaln_single.emb.timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": d["adaln_single.emb.timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": d["adaln_single.emb.timestep_embedder.linear_2.bias"],
        "t_block.1.weight": d["adaln_single.linear.weight"], "t_block.1.bias": d["adaln_single.linear.bias"],
        "y_embedder.y_proj.fc1.weight": d["caption_projection.linear_1.weight"],
        "y_embedder.y_proj.fc1.bias": d["caption_projection.linear_1.bias"],
        "y_embedder.y_proj.fc2.weight": d["caption_projection.linear_2.weight"],
        "y_embedder.y_proj.fc2.bias": d["caption_projection.linear_2.bias"],
        "y_embedder.y_embedding": torch.randn(L, 32, generator=torch.Generator().manual_seed(3)),
        "pos_embed": torch.from_numpy(sincos_pos_embed_2d(16, 4)).float()[None],  # the official buffer (base grid)
        "final_layer.linear.weight": d["proj_out.weight"], "final_layer.linear.bias": d["proj_out.bias"],
        "final_layer.scale_shift_table": d["scale_shift_table"],
    }
    for i in range(TINY["num_layers"]):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        sd[o + "scale_shift_table"] = d[b + "scale_shift_table"]
        for w in ("weight", "bias"):
            sd[o + f"attn.qkv.{w}"] = torch.cat([d[b + f"attn1.to_{p}.{w}"] for p in "qkv"])
            sd[o + f"attn.proj.{w}"] = d[b + f"attn1.to_out.0.{w}"]
            sd[o + f"cross_attn.q_linear.{w}"] = d[b + f"attn2.to_q.{w}"]
            sd[o + f"cross_attn.kv_linear.{w}"] = torch.cat([d[b + f"attn2.to_{p}.{w}"] for p in "kv"])
            sd[o + f"cross_attn.proj.{w}"] = d[b + f"attn2.to_out.0.{w}"]
            sd[o + f"mlp.fc1.{w}"] = d[b + f"ff.net.0.proj.{w}"]
            sd[o + f"mlp.fc2.{w}"] = d[b + f"ff.net.2.{w}"]
    return sd


def test_diffusers_directory_loads_and_matches(oracle, tmp_path):
    oracle.save_pretrained(tmp_path / "dif")
    model = load_pretrained(tmp_path / "dif", model_max_length=L)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.input_size, cfg.pe_scale, cfg.caption_channels) == (16, 2, 2, 8, 1.0, 32)
    assert cfg.learn_sigma and cfg.attention == "softmax" and not cfg.dynamic
    assert_matches(model, oracle)
    # diffusers has no null caption: zeros until the data's T5("") is copied in
    null = model.y_embedder.y_embedding
    assert null.shape == (L, 32) and not null.any()
    t5_empty = torch.randn(L, 32)
    model.set_null_condition({"text_emb": t5_empty.to(torch.bfloat16), "text_mask": torch.ones(L, dtype=torch.bool)})
    torch.testing.assert_close(model.y_embedder.y_embedding, t5_empty.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="model_max_length"):
        model.set_null_condition({"text_emb": torch.randn(L + 1, 32)})


@pytest.mark.parametrize("wrapped", [True, False])
def test_official_pth_loads_and_matches(oracle, tmp_path, wrapped):
    sd = official_state_dict(oracle)
    path = tmp_path / "PixArt-Sigma-tiny.pth"
    torch.save({"state_dict": sd} if wrapped else sd, path)
    # a tiny width has no registry head count, and the 8-px grid no official pe_interpolation (8·8/512)
    model = load_pretrained(path, pe_interpolation=1.0, num_heads=2)
    assert model.config.input_size == 8 and model.config.model_max_length == L  # from pos_embed and y_embedding
    torch.testing.assert_close(model.y_embedder.y_embedding, sd["y_embedder.y_embedding"], rtol=0, atol=0)
    assert_matches(model, oracle)


def test_official_file_defaults_pe_interpolation_to_resolution_over_512(oracle, tmp_path):
    sd = official_state_dict(oracle)
    sd["pos_embed"] = torch.zeros(1, 64 * 64, 16)  # a 1024-px training grid (128 latent / patch 2)
    torch.save({"state_dict": sd}, tmp_path / "big.pth")
    cfg = read_checkpoint(tmp_path / "big.pth", num_heads=2).config
    assert cfg.input_size == 128 and cfg.pe_scale == 2.0  # PixArt-Σ-1024-MS: pe_interpolation 2


def test_launch_convert_both_formats(oracle, tmp_path, capsys):
    oracle.save_pretrained(tmp_path / "dif")
    torch.save({"state_dict": official_state_dict(oracle)}, tmp_path / "official.pth")
    assert convert.main([str(tmp_path / "dif"), str(tmp_path / "a.safetensors"), "--set", f"model_max_length={L}"]) == 0
    assert convert.main([str(tmp_path / "official.pth"), str(tmp_path / "b.safetensors"), "--num-heads", "2",
                         "--set", "pe_interpolation=1.0"]) == 0
    out = capsys.readouterr().out
    assert "diffusers" in out and "official" in out and "PixArt(hidden=16" in out
    assert f"{sum(p.numel() for p in oracle.parameters()):,} params" in out  # T2I.md §6: 16,464; no buffers
    for name in ("a", "b"):
        model = load_pretrained(tmp_path / f"{name}.safetensors")  # config from the metadata: no overrides
        assert model.config.pe_scale == 1.0 and model.config.model_max_length == L
        assert_matches(model, oracle)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["ditill.config"])["input_size"] == 8 and f.metadata()["ditill.family"] == "pixart"
        assert "pos_embed" not in f.keys()


@pytest.mark.parametrize("change,msg", [
    ({"use_additional_conditions": None, "sample_size": 128}, "micro-conditions"),
    ({"use_additional_conditions": True}, "micro-conditions"),
    ({"caption_channels": None}, "caption_channels"),
    ({"norm_type": "layer_norm"}, "norm_type"),
])
def test_diffusers_configs_we_do_not_build_are_refused(change, msg):
    with pytest.raises(CheckpointError, match=msg):
        config_from_diffusers({**TINY, **change}, "cfg.json")


def test_diffusers_interpolation_scale_default_follows_diffusers():
    cfg = config_from_diffusers({**TINY, "interpolation_scale": None, "sample_size": 256}, "cfg.json")
    assert cfg["pe_interpolation"] == 4.0  # diffusers: max(sample_size // 64, 1)


def test_student_weights_without_metadata_say_how_to_load(tmp_path):
    from models import build_model

    lit = build_model("lit-pixart-sigma-xl/2", depth=1, hidden_size=16, num_heads=2, input_size=8, caption_channels=32,
                      model_max_length=L)
    sd = {k: v for k, v in lit.state_dict().items()}
    sd["pos_embed"] = torch.zeros(1, 16, 16)
    torch.save(sd, tmp_path / "lit.pth")
    with pytest.raises(CheckpointError, match="student weights"):
        read_checkpoint(tmp_path / "lit.pth", num_heads=2)
    cfg = read_checkpoint(tmp_path / "lit.pth", num_heads=2, attention="linear", attn_heads=2).config
    assert cfg.attention == "linear" and np.isclose(cfg.pe_scale, 0.125)
