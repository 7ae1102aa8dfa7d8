"""Tiny FLUX configs, inputs and the diffusers side of the oracle tests (T2I.md §6 sizes)."""
from __future__ import annotations

import inspect

import torch

from models import build_model
from models.flux import pack, unpack

# Our tiny config and diffusers' FLUX_TINY of T2I.md §6 with one more single block: 2 heads of 16
# channels, RoPE axes 4/6/6, T5 width 32, CLIP width 24, 4 latent channels (16 packed).
TINY = dict(hidden_size=32, num_heads=2, depth=1, depth_single=2, axes_dim=[4, 6, 6], context_in_dim=32,
            vec_in_dim=24, in_channels=4, input_size=8, text_len=6)
DIFFUSERS_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))


def tiny_flux(name: str = "flux-dev", seed: int = 0, std: float = 0.2, **kw):
    """A registry model at TINY size with every weight random (no zero-initialised layer), so the
    output depends on each of them; routers keep their own initialisation."""
    torch.manual_seed(seed)
    model = build_model(name, **{**TINY, **kw})
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "_rate." in key or "token_selection" in key:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if key.endswith(".scale") else 0.0))
    return model


def flux_inputs(batch: int = 2, hw: tuple[int, int] = (8, 12), text_len: int = 6, seed: int = 0, channels: int = 4):
    """(x, t·1000, text_emb, text_pooled): t values exact in binary so t/1000 round-trips in fp32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *hw, generator=g)
    t = torch.tensor([250.0, 625.0, 875.0, 500.0][:batch])
    return x, t, torch.randn(batch, text_len, 32, generator=g), torch.randn(batch, 24, generator=g)


def diffusers_converter(inner_dim: int):
    """diffusers' own BFL → diffusers converter (`convert_flux_transformer_checkpoint_to_diffusers`), whose
    source hard-codes FLUX's width 3072, re-made for `inner_dim`: the independent oracle of our names."""
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1, "diffusers' FLUX converter changed; revisit this test helper"
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102 (test oracle)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def diffusers_forward(model, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_pooled: torch.Tensor,
                      guidance: torch.Tensor | None = None) -> torch.Tensor:
    """A diffusers FluxTransformer2DModel in our calling convention: pack, ids, t/1000, unpack."""
    b, _, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    out = model(hidden_states=pack(x, 2), encoder_hidden_states=text_emb, pooled_projections=text_pooled,
                timestep=t / 1000, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text_emb.shape[1], 3),
                guidance=guidance, return_dict=False)[0]
    return unpack(out, (h, w), 2)


def bfl_state_dict(model) -> dict[str, torch.Tensor]:
    """What a BFL `flux1-*.safetensors` holds for this model: our keys without the null-text buffers."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("null_")}
