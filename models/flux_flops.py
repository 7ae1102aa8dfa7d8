"""Analytic multiply-adds of the FLUX family per sample (one multiply-add = 1 FLOP, DiT's unit).

Block parts (n = L text + N image tokens, D hidden, Dm = 4D MLP width):
- double block: attention = both streams' q, k, v and output projections + the joint token mixing;
  image MLP 2·N·D·Dm, text MLP 2·L·D·Dm; modulation 2 · D·6D.
- single block: attention in = linear1's q, k, v rows + the token mixing; attention out = linear2's
  attention columns (n·D²); MLP = linear1's MLP rows + linear2's MLP columns (2·n·D·Dm); modulation D·3D.
- token mixing: softmax 2·n²·D; linear (LiT) φ(K)ᵀV and φ(Q)·KV (2·n·d_head·D), the normaliser n·D
  and the k×k DWC on the image tokens only (k²·N·D).
Outside the blocks: `img_in`, `txt_in` (T5 → D, per text token), the time / guidance / pooled-text
embedders, the final layer. The T5 and CLIP encoders are not counted (their outputs are precomputed).

DyFLUX's FLOPs-loss ratio follows DyDiT (METHODS §1.3): realised / static attention + MLP of all
blocks; attention scales with the active-head fraction (a head is off for both streams), an MLP with
its active-group fraction times the fraction of tokens it runs on — image tokens routed in a double
block's image MLP; text + routed image tokens in a single block's MLP and, with
`single_token_skip: output`, in its attention output columns too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from models.flops import with_total
from models.flux_config import FluxConfig

FREQ_DIM = 256


@dataclass(frozen=True)
class FluxCosts:
    """One block's static multiply-adds per sample, by part, at given token counts."""

    double_attn: float
    double_img_mlp: float
    double_txt_mlp: float
    single_attn_in: float
    single_attn_out: float
    single_mlp: float
    double_adaln: float
    single_adaln: float
    double_routers: float
    single_routers: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def mixing_cost(cfg: FluxConfig, n: int, n_img: int) -> float:
    """Token mixing over n tokens (n_img of them image tokens), projections excluded."""
    d = cfg.hidden_size
    if cfg.attention == "softmax":
        return 2 * n * n * d
    return 2 * n * d * cfg.head_dim + n * d + cfg.dwc_kernel**2 * n_img * d


def block_costs(cfg: FluxConfig, n_img: int, n_txt: int) -> FluxCosts:
    d, dm, n = cfg.hidden_size, cfg.mlp_hidden, n_img + n_txt
    mix = mixing_cost(cfg, n, n_img)
    double_r = single_r = 0.0
    if cfg.dynamic:
        width = d * (cfg.num_heads - 1)
        token = 4 * d * d + n_img * d if cfg.token_routing else 0.0  # linear_t per sample, router per image token
        double_r = width + 2 * d * (cfg.groups - 1) + token
        single_r = width + d * (cfg.groups - 1) + token
    return FluxCosts(
        double_attn=4 * n * d * d + mix, double_img_mlp=2 * n_img * d * dm, double_txt_mlp=2 * n_txt * d * dm,
        single_attn_in=3 * n * d * d + mix, single_attn_out=n * d * d, single_mlp=2 * n * d * dm,
        double_adaln=12 * d * d, single_adaln=3 * d * d, double_routers=double_r, single_routers=single_r,
    )


def outside_costs(cfg: FluxConfig, n_img: int, n_txt: int) -> dict[str, float]:
    d = cfg.hidden_size
    emb = n_img * cfg.packed_channels * d + n_txt * cfg.context_in_dim * d + (FREQ_DIM * d + d * d)
    emb += cfg.vec_in_dim * d + d * d
    if cfg.guidance_embed:
        emb += FREQ_DIM * d + d * d
    final = 2 * d * d + n_img * d * cfg.packed_channels
    return {"embeddings": emb, "final_layer": final}


def tokens(cfg: FluxConfig, latent_hw: tuple[int, int] | None, text_len: int | None) -> tuple[int, int]:
    """(image tokens, text tokens) of a latent (the config's native size when None)."""
    h, w = (cfg.input_size, cfg.input_size) if latent_hw is None else latent_hw
    return (h // cfg.patch_size) * (w // cfg.patch_size), cfg.text_len if text_len is None else text_len


def static_flops(cfg: FluxConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None) -> dict[str, float]:
    """Whole-model multiply-adds per sample with every unit on, by part."""
    n_img, n_txt = tokens(cfg, latent_hw, text_len)
    c = block_costs(cfg, n_img, n_txt)
    out = {
        "attention": cfg.depth * c.double_attn + cfg.depth_single * (c.single_attn_in + c.single_attn_out),
        "mlp": cfg.depth * (c.double_img_mlp + c.double_txt_mlp) + cfg.depth_single * c.single_mlp,
        "adaLN": cfg.depth * c.double_adaln + cfg.depth_single * c.single_adaln,
        "routers": cfg.depth * c.double_routers + cfg.depth_single * c.single_routers,
        **outside_costs(cfg, n_img, n_txt),
    }
    out["total"] = sum(out.values())
    return out


def fused_share(cfg: FluxConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None,
                aux: dict[str, torch.Tensor] | None = None) -> dict[str, float | torch.Tensor]:
    """Of "attention" and "mlp", what the single blocks' fused `linear1`/`linear2` compute (q, k, v rows
    and attention columns; MLP rows and columns): static, or per sample for the masks in `aux`."""
    n_img, n_txt = tokens(cfg, latent_hw, text_len)
    if aux is not None:
        blocks, _ = _realised_blocks(cfg, aux["head_masks"], aux["channel_masks"], aux["token_masks"], n_txt)
        return {"attention": blocks["fused_attention"], "mlp": blocks["fused_mlp"]}
    c = block_costs(cfg, n_img, n_txt)
    proj = c.single_attn_in - mixing_cost(cfg, n_img + n_txt, n_img) + c.single_attn_out
    return {"attention": cfg.depth_single * proj, "mlp": cfg.depth_single * c.single_mlp}


def _realised_blocks(cfg: FluxConfig, head: torch.Tensor, channel: torch.Tensor, token: torch.Tensor,
                     n_txt: int) -> tuple[dict[str, torch.Tensor], float]:
    """(B,) realised attention and MLP multiply-adds of all blocks — and, of those, the single blocks'
    fused `linear1`/`linear2` share ("fused_attention": q, k, v rows and attention columns; "fused_mlp")
    — and their static attention + MLP total."""
    n_img = token.shape[-1]
    c = block_costs(cfg, n_img, n_txt)
    ld = cfg.depth
    heads = head.float().mean(dim=2)  # (B, L)
    kept = token.float().mean(dim=2)  # fraction of image tokens routed, (B, L)
    groups = channel.float().mean(dim=2)  # (B, 2·ld + ls)
    zero = heads.new_zeros(head.shape[0])
    parts = {"attention": zero, "mlp": zero, "fused_attention": zero, "fused_mlp": zero}
    static = 0.0
    if ld:
        g_img, g_txt = groups[:, : 2 * ld : 2], groups[:, 1 : 2 * ld : 2]
        parts["attention"] = (heads[:, :ld] * c.double_attn).sum(dim=1)
        parts["mlp"] = (g_img * kept[:, :ld] * c.double_img_mlp + g_txt * c.double_txt_mlp).sum(dim=1)
        static += ld * (c.double_attn + c.double_img_mlp + c.double_txt_mlp)
    if cfg.depth_single:
        n = n_img + n_txt
        run = (n_txt + kept[:, ld:] * n_img) / n  # fraction of the joint sequence the MLP share runs on
        out_tokens = run if cfg.single_token_skip == "output" else torch.ones_like(run)
        h = heads[:, ld:]
        mix = mixing_cost(cfg, n, n_img)
        fused_attn = (h * (c.single_attn_in - mix) + h * out_tokens * c.single_attn_out).sum(dim=1)
        parts["fused_attention"], parts["fused_mlp"] = fused_attn, (groups[:, 2 * ld:] * run * c.single_mlp).sum(dim=1)
        parts["attention"] = parts["attention"] + fused_attn + (h * mix).sum(dim=1)
        parts["mlp"] = parts["mlp"] + parts["fused_mlp"]
        static += cfg.depth_single * (c.single_attn_in + c.single_attn_out + c.single_mlp)
    return parts, static


def realised_ratio(cfg: FluxConfig, head: torch.Tensor, channel: torch.Tensor, token: torch.Tensor,
                   n_txt: int) -> torch.Tensor:
    """Per-sample DyDiT ratio (realised / static attention + MLP multiply-adds); differentiable through
    the straight-through masks. head (B, L, H), channel (B, 2·depth + depth_single, G), token (B, L, N)."""
    parts, static = _realised_blocks(cfg, head, channel, token, n_txt)
    return (parts["attention"] + parts["mlp"]) / static


def realised_parts(cfg: FluxConfig, aux: dict[str, torch.Tensor], n_txt: int) -> dict[str, torch.Tensor]:
    """Per-sample multiply-adds a dynamic forward executed, by part (the keys of `static_flops`)."""
    n_img = aux["token_masks"].shape[-1]
    blocks, _ = _realised_blocks(cfg, aux["head_masks"], aux["channel_masks"], aux["token_masks"], n_txt)
    c = block_costs(cfg, n_img, n_txt)
    return with_total({"attention": blocks["attention"], "mlp": blocks["mlp"],
                       "adaLN": cfg.depth * c.double_adaln + cfg.depth_single * c.single_adaln,
                       "routers": cfg.depth * c.double_routers + cfg.depth_single * c.single_routers,
                       **outside_costs(cfg, n_img, n_txt)})


def realised_flops(cfg: FluxConfig, aux: dict[str, torch.Tensor], n_txt: int) -> torch.Tensor:
    """Per-sample whole-model multiply-adds a dynamic forward executed (fixed parts included)."""
    return realised_parts(cfg, aux, n_txt)["total"]
