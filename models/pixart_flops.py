"""PixArt-Σ FLOPs (multiply-adds per sample, the DiT paper's unit), from the shared unit costs.

Where each part goes:
- "attention": self-attention (softmax, KV-compressed softmax or LiT's linear) **and cross-attention**
  (q and out projections over the image tokens, K and V over the caption tokens, QKᵀ and AV);
- "mlp": the block MLPs; "routers": DyDiT's head, channel-group (and cross-head) routers and the
  token router;
- "adaLN": the one shared `t_block` (the per-block `scale_shift_table` is an addition);
- "embeddings": patch embedding, timestep embedder (and the guidance embedder of a model with a
  guidance input) and the **caption projection** (`y_proj` over
  all `text_len` caption tokens, padding included: the model computes it);
- "final_layer": the output linear (its modulation is an addition).
The caption length is the padded one (`model_max_length` unless given): cross-attention runs on it.

DyDiT's FLOPs-loss ratio (`flops_ratio`) counts each block's self-attention, cross-attention and MLP:
realised / static, with self-attention scaled by its active-head fraction, cross-attention by its
active-head fraction when it is routed (else it is a fixed part of both), and the MLP by its
active-group fraction times its routed-token fraction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.flops import cross_attention_cost, mlp_cost, routed_ratio, self_attention_cost, with_total
from models.pixart_config import PixArtConfig


@dataclass(frozen=True)
class PixArtBlockCost:
    self_attn: float
    cross_attn: float
    mlp: float
    routers: float


def grid_of(cfg: PixArtConfig, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    if latent_hw is None:
        return cfg.grid_size, cfg.grid_size
    return latent_hw[0] // cfg.patch_size, latent_hw[1] // cfg.patch_size


def block_cost(cfg: PixArtConfig, index: int, grid: tuple[int, int], text_len: int) -> PixArtBlockCost:
    """One block at full width for one sample on a (gh, gw) token grid."""
    n, d = grid[0] * grid[1], cfg.hidden_size
    kv = None
    scale = 1
    if index in cfg.kv_layers:
        scale = cfg.kv_compress_scale
        kv = (grid[0] // scale) * (grid[1] // scale)
    attn = self_attention_cost(cfg.attention, n, d, cfg.head_dim, cfg.dwc_kernel, kv_tokens=kv, kv_compress=scale)
    routers = 0.0
    if cfg.dynamic:
        routers = d * (cfg.self_heads - 1) + d * (cfg.groups - 1) + (d * (cfg.num_heads - 1) if cfg.cross_attn_routing else 0)
        if cfg.token_routing:
            hid = max(1, d // cfg.token_router_reduction)
            routers += n * (d * hid + hid)
    return PixArtBlockCost(attn, cross_attention_cost(n, text_len, d), mlp_cost(n, d, cfg.mlp_hidden), routers)


def fixed_costs(cfg: PixArtConfig, grid: tuple[int, int], text_len: int) -> dict[str, float]:
    """Everything outside the blocks, per sample."""
    n, d, p = grid[0] * grid[1], cfg.hidden_size, cfg.patch_size
    timestep = (256 * d + d * d) * (2 if cfg.guidance_embed else 1)  # + the guidance embedder
    return {
        "adaLN": 6 * d * d,
        "embeddings": n * p * p * cfg.in_channels * d + timestep + text_len * (cfg.caption_channels * d + d * d),
        "final_layer": n * d * p * p * cfg.out_channels,
    }


def static_flops(cfg: PixArtConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None) -> dict[str, float]:
    """Whole-model multiply-adds per sample by part, every unit on (see the module docstring)."""
    grid, length = grid_of(cfg, latent_hw), text_len or cfg.model_max_length
    costs = [block_cost(cfg, i, grid, length) for i in range(cfg.depth)]
    parts = {"attention": sum(c.self_attn + c.cross_attn for c in costs), "mlp": sum(c.mlp for c in costs),
             "routers": sum(c.routers for c in costs), **fixed_costs(cfg, grid, length)}
    parts["total"] = sum(parts.values())
    return parts


def _fractions(aux: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per sample and block: active self-attention heads, active cross heads (None: not routed), and
    active MLP groups × routed tokens."""
    heads = aux["head_masks"].float().mean(dim=2)
    cross = aux["cross_masks"].float().mean(dim=2) if "cross_masks" in aux else None
    mlp = aux["channel_masks"].float().mean(dim=2) * aux["token_masks"].float().mean(dim=2)
    return heads, cross, mlp


def realised_ratio(cfg: PixArtConfig, aux: dict[str, torch.Tensor], grid: tuple[int, int], text_len: int) -> torch.Tensor:
    """DyDiT's FLOPs-loss ratio per sample (see the module docstring); differentiable through the masks."""
    cost = block_cost(cfg, 0, grid, text_len)  # a dynamic student has no KV compression: blocks are alike
    heads, cross, mlp = _fractions(aux)
    return routed_ratio([(heads, cost.self_attn), (torch.ones_like(heads) if cross is None else cross, cost.cross_attn),
                         (mlp, cost.mlp)])


def realised_parts(cfg: PixArtConfig, aux: dict[str, torch.Tensor], latent_hw: tuple[int, int],
                   text_len: int | None = None) -> dict[str, torch.Tensor]:
    """Per-sample multiply-adds a dynamic forward executed, by part (the keys of `static_flops`:
    cross-attention in "attention", routers and the caption projection included)."""
    grid, length = grid_of(cfg, latent_hw), text_len or cfg.model_max_length
    cost = block_cost(cfg, 0, grid, length)
    heads, cross, mlp = _fractions(aux)
    cross_part = cost.cross_attn * (cfg.depth if cross is None else cross.sum(dim=1))
    return with_total({"attention": (heads * cost.self_attn).sum(dim=1) + cross_part, "mlp": (mlp * cost.mlp).sum(dim=1),
                       "routers": cfg.depth * cost.routers, **fixed_costs(cfg, grid, length)})


def realised_flops(cfg: PixArtConfig, aux: dict[str, torch.Tensor], latent_hw: tuple[int, int],
                   text_len: int | None = None) -> torch.Tensor:
    """Per-sample whole-model multiply-adds a dynamic forward executed."""
    return realised_parts(cfg, aux, latent_hw, text_len)["total"]
