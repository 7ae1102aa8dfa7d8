"""Analytic FLOPs, in the DiT paper's unit (one multiply-add = 1 FLOP): shared unit costs that every
family composes (self/cross attention of either kind, MLP, DyDiT's realised ratio of routed units),
and the DiT family's whole-model counts built from them.

Two uses, kept apart:
- the FLOPs *loss* convention of DyDiT (METHODS §1.3): only attention and MLP blocks count,
  attention cost scales with the fraction of active heads, MLP cost with the fraction of active
  channel groups times the fraction of routed tokens;
- whole-model GFLOPs for reporting (embeddings, adaLN, routers and the final layer included).
Linear attention is counted as what it computes (φ(K)ᵀV, φ(Q)·KV, the normaliser, the DWC).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from models.config import DiTConfig


@dataclass(frozen=True)
class BlockCost:
    """Multiply-adds of one block for one sample at full width."""

    attn: float  # qkv + scores/state + output projection
    mlp: float
    adaln: float
    routers: float  # head + channel routers (per sample) and the token router (per token)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def self_attention_cost(kind: str, n: int, d_model: int, d_head: int, dwc_kernel: int = 0,
                        kv_tokens: int | None = None, kv_compress: int = 1) -> float:
    """One attention layer over n tokens: q, k, v and out projections, plus the token mixing.

    softmax: QKᵀ and AV (2·n·n_kv·d, n_kv = n unless `kv_tokens` says how many keys PixArt's KV
    compression left, in which case its s×s depth-wise conv on K and V adds 2·n_kv·s²·d).
    linear: φ(K)ᵀV and φ(Q)·(KV) per head (n·d_head·d_model each), φ(Q)·mean φ(K) (n·d_model),
    and the k×k depth-wise conv on V (k²·n·d_model).
    """
    proj = 4 * n * d_model * d_model
    if kind == "softmax":
        if kv_tokens is None or kv_compress <= 1:
            return proj + 2 * n * n * d_model
        return proj + 2 * n * kv_tokens * d_model + 2 * kv_tokens * kv_compress**2 * d_model
    state = 2 * n * d_model * d_head + n * d_model
    return proj + state + dwc_kernel**2 * n * d_model


def cross_attention_cost(n_q: int, n_kv: int, d_model: int, d_kv: int | None = None) -> float:
    """Softmax cross-attention: q and out projections over n_q tokens, k and v over n_kv (from d_kv
    input channels), and QKᵀ, AV."""
    d_kv = d_model if d_kv is None else d_kv
    return 2 * n_q * d_model * d_model + 2 * n_kv * d_kv * d_model + 2 * n_q * n_kv * d_model


def mlp_cost(n: int, d_model: int, hidden: int) -> float:
    """fc1 and fc2 over n tokens."""
    return 2 * n * d_model * hidden


def routed_ratio(parts: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Per-sample realised / static cost of routed units over L identical blocks.

    `parts`: (fraction of the unit executed per sample and block (B, L), one block's static cost of
    that unit); a unit that is never routed enters with fraction 1. Differentiable through the
    fractions (straight-through masks), which is how the FLOPs loss reaches the routers.
    """
    depth = parts[0][0].shape[1]
    realised = sum(frac * cost for frac, cost in parts)
    return realised.sum(dim=1) / (depth * sum(cost for _, cost in parts))


def dydit_ratio(head_masks: torch.Tensor, channel_masks: torch.Tensor, token_masks: torch.Tensor,
                attn: float, mlp: float) -> torch.Tensor:
    """DyDiT's per-sample ratio of realised to static attention+MLP FLOPs over L identical blocks.

    head_masks (B, L, H), channel_masks (B, L, G), token_masks (B, L, N); `attn` and `mlp` are one
    block's static costs. Attention scales with the active-head fraction, the MLP with the active-group
    fraction times the routed-token fraction. Differentiable through the straight-through masks,
    which is how the FLOPs loss reaches the routers.
    """
    a = head_masks.float().mean(dim=2)
    m = channel_masks.float().mean(dim=2) * token_masks.float().mean(dim=2)
    return routed_ratio([(a, attn), (m, mlp)])


def attention_cost(cfg: DiTConfig, n: int) -> float:
    return self_attention_cost(cfg.attention, n, cfg.hidden_size, cfg.head_dim, cfg.dwc_kernel)


def block_cost(cfg: DiTConfig, n: int | None = None) -> BlockCost:
    n = cfg.num_tokens if n is None else n
    d = cfg.hidden_size
    routers = 0.0
    if cfg.dynamic:
        routers = d * (cfg.num_heads - 1) + d * (cfg.groups - 1)
        if cfg.token_routing:
            hid = max(1, d // cfg.token_router_reduction)
            routers += n * (d * hid + hid)
    return BlockCost(attn=attention_cost(cfg, n), mlp=mlp_cost(n, d, cfg.mlp_hidden), adaln=6 * d * d, routers=routers)


def embed_cost(cfg: DiTConfig, n: int | None = None) -> dict[str, float]:
    """Everything outside the blocks, per sample."""
    n = cfg.num_tokens if n is None else n
    d, p = cfg.hidden_size, cfg.patch_size
    return {
        "patch_embed": n * p * p * cfg.in_channels * d,
        "t_embedder": (256 * d + d * d) * (2 if getattr(cfg, "guidance_embed", False) else 1),  # + the guidance embedder
        "final_layer": 2 * d * d + n * d * p * p * cfg.out_channels,
    }


def static_flops(cfg: DiTConfig, n: int | None = None) -> float:
    """Whole-model multiply-adds per sample with every unit on."""
    b = block_cost(cfg, n)
    return cfg.depth * (b.attn + b.mlp + b.adaln + b.routers) + sum(embed_cost(cfg, n).values())


def static_gflops(cfg: DiTConfig, n: int | None = None) -> float:
    return static_flops(cfg, n) / 1e9


def realised_ratio(
    cfg: DiTConfig, head_masks: torch.Tensor, channel_masks: torch.Tensor, token_masks: torch.Tensor
) -> torch.Tensor:
    """Per-sample dynamic/static ratio of attention+MLP FLOPs (DyDiT's loss convention).

    head_masks (B, L, H), channel_masks (B, L, G), token_masks (B, L, N). Differentiable through the
    straight-through masks, which is how the FLOPs loss reaches the routers.
    """
    cost = block_cost(cfg, token_masks.shape[-1])
    return dydit_ratio(head_masks, channel_masks, token_masks, cost.attn, cost.mlp)


def realised_parts(cfg: DiTConfig, aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample multiply-adds the sliced path executed, by part (the keys of the family's `flops`):
    attention scaled by the active-head fraction, the MLP by active groups × routed tokens, the rest fixed."""
    n = aux["token_masks"].shape[-1]
    cost = block_cost(cfg, n)
    heads = aux["head_masks"].float().mean(dim=2)
    mlp = aux["channel_masks"].float().mean(dim=2) * aux["token_masks"].float().mean(dim=2)
    e = embed_cost(cfg, n)
    fixed = {"adaLN": cfg.depth * cost.adaln, "routers": cfg.depth * cost.routers,
             "embeddings": e["patch_embed"] + e["t_embedder"], "final_layer": e["final_layer"]}
    return with_total({"attention": (heads * cost.attn).sum(dim=1), "mlp": (mlp * cost.mlp).sum(dim=1), **fixed})


def with_total(parts: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """Per-sample parts (tensors or constants) as (B,) tensors, plus their "total"."""
    batch = next(v for v in parts.values() if isinstance(v, torch.Tensor))
    out = {k: v if isinstance(v, torch.Tensor) else torch.full_like(batch, float(v)) for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def realised_flops(cfg: DiTConfig, aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample whole-model multiply-adds actually executed on the sliced path."""
    return realised_parts(cfg, aux)["total"]


def model_report(cfg: DiTConfig) -> dict:
    """Numbers `launch.info` prints: parameters are counted by the caller from the module."""
    n = cfg.num_tokens
    b = block_cost(cfg, n)
    return {
        "tokens": n,
        "gflops": static_gflops(cfg),
        "block": {k: v / 1e9 for k, v in b.as_dict().items()},
        "embed": {k: v / 1e9 for k, v in embed_cost(cfg, n).items()},
        "blocks_total_gflops": cfg.depth * (b.attn + b.mlp + b.adaln + b.routers) / 1e9,
    }
