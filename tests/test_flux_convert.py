"""FLUX against diffusers' FluxTransformer2DModel on tiny random weights, both public formats.

Oracles: diffusers' own BFL → diffusers converter (it swaps the final adaLN halves and splits the
fused `qkv` / `linear1`) applied to our state dict must load strictly into diffusers and give our
output; a diffusers directory (sharded safetensors + index) read by our converter must give
diffusers' output. fp32 tolerances: the two codes run the same operations in a different order
(separate vs fused projections, RoPE table layout), so they agree to float rounding, ~1e-6.
"""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from launch import convert
from models import load_pretrained
from models.convert import CheckpointError, read_checkpoint, read_config
from models.flux import Flux
from models.flux_convert import Piece, assemble, diffusers_plan
from tests.flux_helpers import (
    DIFFUSERS_TINY, bfl_state_dict, diffusers_converter, diffusers_forward, flux_inputs, tiny_flux,
)

TOL = dict(rtol=1e-5, atol=2e-5)


def _diffusers_from_ours(model: Flux) -> FluxTransformer2DModel:
    guidance = model.config.guidance_embed
    ref = FluxTransformer2DModel(**DIFFUSERS_TINY, guidance_embeds=guidance).eval()
    converted = diffusers_converter(model.config.hidden_size)(bfl_state_dict(model))
    ref.load_state_dict(converted, strict=True)
    return ref


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
@pytest.mark.parametrize("hw", [(8, 8), (8, 12)])
def test_our_bfl_layout_matches_diffusers_through_its_own_converter(name, hw):
    model = tiny_flux(name).eval()
    ref = _diffusers_from_ours(model)
    x, t, te, tp = flux_inputs(hw=hw)
    with torch.no_grad():
        if model.config.guidance_embed:
            g = torch.tensor([3.5, 1.25])
            torch.testing.assert_close(model(x, t, te, tp, guidance=g), diffusers_forward(ref, x, t, te, tp, g), **TOL)
            # no guidance given: the config's default (3.5), as diffusers' pipeline passes
            torch.testing.assert_close(model(x, t, te, tp), diffusers_forward(ref, x, t, te, tp, torch.full((2,), 3.5)), **TOL)
        else:
            torch.testing.assert_close(model(x, t, te, tp), diffusers_forward(ref, x, t, te, tp), **TOL)
            with pytest.raises(ValueError, match="no guidance input"):
                model(x, t, te, tp, guidance=torch.ones(2))


def test_final_layer_swap_is_what_makes_them_agree():
    """Without the swap of the final adaLN halves the weights still load, but the output is wrong
    (T2I trap 6): the test above would catch a missing or doubled swap."""
    model = tiny_flux().eval()
    ref = _diffusers_from_ours(model)
    sd = ref.state_dict()
    for kind in ("weight", "bias"):
        w = sd[f"norm_out.linear.{kind}"]
        sd[f"norm_out.linear.{kind}"] = torch.cat(w.chunk(2)[::-1])
    ref.load_state_dict(sd)
    x, t, te, tp = flux_inputs()
    with torch.no_grad():
        assert (model(x, t, te, tp) - diffusers_forward(ref, x, t, te, tp, torch.full((2,), 3.5))).abs().max() > 1e-2


def test_plan_is_the_exact_inverse_of_diffusers_converter():
    model = tiny_flux()
    ours = bfl_state_dict(model)
    theirs = diffusers_converter(32)(dict(ours))
    plan = diffusers_plan({k: tuple(v.shape) for k, v in theirs.items()}, "test")
    back = assemble(plan, theirs.__getitem__)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # the surgery is dim-0 pieces only: fused qkv / linear1 concatenated, final adaLN halves swapped
    assert plan["single_blocks.0.linear1.weight"] == [Piece(f"single_transformer_blocks.0.{s}.weight")
                                                      for s in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert plan["final_layer.adaLN_modulation.1.weight"] == [Piece("norm_out.linear.weight", 32, 64),
                                                             Piece("norm_out.linear.weight", 0, 32)]
    with pytest.raises(CheckpointError, match="no place in BFL's layout.*extra"):
        diffusers_plan({**{k: tuple(v.shape) for k, v in theirs.items()}, "extra.weight": (1,)}, "test")


@pytest.mark.parametrize("guidance", [True, False])
def test_diffusers_directory_sharded_loads_and_converts(tmp_path, guidance):
    torch.manual_seed(1)
    ref = FluxTransformer2DModel(**DIFFUSERS_TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # diffusers zero-initialises nothing here, but shift everything
    ref.save_pretrained(tmp_path / "dir", max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "dir" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path / "dir", text_len=6)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.depth_single, cfg.in_channels, cfg.axes_dim,
            cfg.guidance_embed) == (32, 2, 1, 2, 4, [4, 6, 6], guidance)
    g = torch.tensor([3.5, 2.0]) if guidance else None
    for hw in ((8, 8), (6, 10)):
        x, t, te, tp = flux_inputs(hw=hw)
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, te, tp, guidance=g), diffusers_forward(ref, x, t, te, tp, g), **TOL)
    # launch.convert writes our layout with the config in the metadata; it reloads without guessing
    out = tmp_path / "flux.safetensors"
    assert convert.main([str(tmp_path / "dir"), str(out), "--set", "text_len=6"]) == 0
    assert read_config(out).to_dict() == cfg.to_dict()
    again = load_pretrained(out)
    x, t, te, tp = flux_inputs()
    with torch.no_grad():
        assert torch.equal(again(x, t, te, tp, guidance=g), model(x, t, te, tp, guidance=g))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_official_bfl_file_loads_with_inferred_config(tmp_path, prefix):
    model = tiny_flux().eval()
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in bfl_state_dict(model).items()}, str(path))
    with pytest.raises(CheckpointError, match="axes_dim"):
        read_checkpoint(path)  # 16-channel heads: FLUX's RoPE split cannot be guessed
    ckpt = read_checkpoint(path, axes_dim=[4, 6, 6], text_len=6, input_size=8)
    assert ckpt.format == "official" and ckpt.config.to_dict() == model.config.to_dict()
    loaded = load_pretrained(path, axes_dim=[4, 6, 6], text_len=6)
    x, t, te, tp = flux_inputs(hw=(10, 6))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, te, tp), model(x, t, te, tp))
    assert not loaded.null_text_emb.any()  # no public format holds the null text: zeros until set
    out = tmp_path / "ours.safetensors"
    assert convert.main([str(path), str(out), "--set", "axes_dim=[4,6,6]", "--set", "text_len=6"]) == 0
    assert read_config(out).axes_dim == [4, 6, 6]


def test_mismatched_official_file_is_a_clear_error(tmp_path):
    sd = bfl_state_dict(tiny_flux())
    sd.pop("single_blocks.1.linear2.bias")
    sd["single_blocks.0.linear1.weight"] = sd["single_blocks.0.linear1.weight"][:-1]
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing \(1\): single_blocks.1.linear2.bias[\s\S]*shape mismatch"):
        read_checkpoint(path, axes_dim=[4, 6, 6])


def test_parameter_count_of_flux_dev_on_the_meta_device():
    from launch.info import count_params
    from models import model_config

    p = count_params(model_config("flux-dev"))
    assert p["total"] == 11_901_408_320  # BFL's flux1-dev (T2I.md §2.1)
    assert count_params(model_config("flux-schnell"))["total"] == 11_891_178_560
    assert sum(v for k, v in p.items() if k != "total") == p["total"]
    with torch.device("meta"):
        model = Flux(model_config("flux-dev"))
    assert len(model.double_blocks) == 19 and len(model.single_blocks) == 38
    assert model.single_blocks[0].linear1.weight.shape == (3 * 3072 + 12288, 3072)
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.shape == (128,)


def test_diffusers_config_with_unsupported_fields_is_refused(tmp_path):
    ref = FluxTransformer2DModel(**DIFFUSERS_TINY)
    ref.save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["in_channels"] = 18
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="packed channels"):
        read_checkpoint(tmp_path / "d")
