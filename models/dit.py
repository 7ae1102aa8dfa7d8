"""The DiT family: the teacher (softmax, static) and its LiT / DyDiT / DyLiT students.

Structure and parameter names are those of facebookresearch/DiT (adaLN-Zero blocks, learned-σ
output); LiT swaps the attention module, DyDiT adds routers. One class, flipped by `DiTConfig`.
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention import build_attention
from models.config import DiTConfig
from models.dynamic import (
    DynamicExecution, Router, TokenSelect, WidthPlan, WidthPlanCache, init_router_biases_, plan_key, reset_routers_,
    token_masked_residual, token_routed_residual,
)
from models.embeddings import (
    LabelEmbedder, PatchEmbed, TimestepEmbedder, init_linear_and_patch_, sincos_pos_embed_2d, unpatchify,
)
from models.flops import realised_ratio
from models.kernels.dispatch import get_ops
from models.mlp import Mlp

LN_EPS = 1e-6


class DiTBlock(nn.Module):
    """adaLN-Zero block. A dynamic block also owns DyDiT's head, channel and token routers."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.kernels = cfg.kernels
        self.attn = build_attention(cfg.attention, d, cfg.num_heads, cfg.dwc_kernel, cfg.linear_eps, cfg.kernels)
        self.mlp = Mlp(d, cfg.mlp_hidden, cfg.groups)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))
        self.dynamic = cfg.dynamic
        self.token_routing = cfg.dynamic and cfg.token_routing
        if cfg.dynamic:
            self.attn_rate = Router(d, cfg.num_heads, cfg.router_tau, cfg.router_threshold)
            self.mlp_rate = Router(d, cfg.groups, cfg.router_tau, cfg.router_threshold)
            if self.token_routing:
                self.token_selection = TokenSelect(d, cfg.token_router_reduction, cfg.router_tau, cfg.router_threshold)
            self.plans = WidthPlanCache()  # inference width plans per sampling timestep

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        t_emb: torch.Tensor,
        grid_hw: tuple[int, int],
        mode: str,
        plan_key: tuple | None = None,
        seeds: torch.Tensor | None = None,
        salt: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """mode: "static" (every unit), "masked" (train path) or "sliced" (inference path).

        `plan_key` names the shared timestep of a sliced, no-grad forward (see `DiT.plan_key`): the
        width plan is then looked up per timestep instead of running the routers. `seeds` (B,) and
        `salt` (distinct per block) make the routers' training noise per-sample (models/rng.py).
        """
        ops = get_ops(self.kernels, x.device)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if mode == "static":
            x = ops.gated_residual(x, gate_msa, self.attn(ops.modulate_layernorm(x, shift_msa, scale_msa, LN_EPS), grid_hw))
            y = self.mlp(ops.modulate_layernorm(x, shift_mlp, scale_mlp, LN_EPS))
            return ops.gated_residual(x, gate_mlp, y), None

        if plan_key is not None:
            plan = self.cached_width_plan(t_emb, plan_key)
        else:
            plan = self.width_plan(t_emb, sliced=mode == "sliced", seeds=seeds, salt=salt)
        h = ops.modulate_layernorm(x, shift_msa, scale_msa, LN_EPS)
        if mode == "masked":
            x = ops.gated_residual(x, gate_msa, self.attn(h, grid_hw, head_mask=plan.head_mask))
        else:
            x = ops.gated_residual(x, gate_msa, self.attn(h, grid_hw, heads=plan.heads))

        b, n, _ = x.shape
        token_mask = self.token_selection(x, seeds, salt + 2) if self.token_routing else x.new_ones(b, n, dtype=torch.float32)
        h = ops.modulate_layernorm(x, shift_mlp, scale_mlp, LN_EPS)
        if mode == "masked":
            x = token_masked_residual(x, self.mlp(h, unit_mask=plan.group_mask.unsqueeze(1)), gate_mlp, token_mask)
        else:
            x = token_routed_residual(x, h, gate_mlp, token_mask, self.mlp, plan.groups, ops)
        return x, {"head": plan.head_mask, "channel": plan.group_mask, "token": token_mask}

    def width_plan(self, t_emb: torch.Tensor, sliced: bool, seeds: torch.Tensor | None = None, salt: int = 0) -> WidthPlan:
        """The head and channel-group routers' decision for timestep embeddings `t_emb` (B, D)."""
        return WidthPlan.build(self.attn_rate(t_emb, seeds, salt), self.mlp_rate(t_emb, seeds, salt + 1), sliced)

    def cached_width_plan(self, t_emb: torch.Tensor, key: tuple) -> WidthPlan:
        """`width_plan` for a batch sharing one timestep, computed once per `key` (see WidthPlanCache)."""
        params = [*self.attn_rate.parameters(), *self.mlp_rate.parameters()]
        return self.plans.get(key, params, t_emb.shape[0], lambda: self.width_plan(t_emb, sliced=True))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, kernels: str) -> None:
        super().__init__()
        self.kernels = kernels
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(get_ops(self.kernels, x.device).modulate_layernorm(x, shift, scale, LN_EPS))


class DiT(DynamicExecution, nn.Module):
    """Class-conditional diffusion transformer on latents (or pixels).

    `forward(x, t, y)` returns the (B, out_channels, H, W) prediction — ε and, with learned σ, the
    variance interpolation. With `return_aux=True` it returns `(prediction, aux)` where aux holds
    what dynamic students' losses and logs need (masks, realised FLOPs ratio per sample); a static
    model returns an empty dict and computes nothing extra.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.num_classes = cfg.num_classes
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        self.g_embedder = TimestepEmbedder(d) if cfg.guidance_embed else None  # fed g·1000, FLUX's convention
        pos = sincos_pos_embed_2d(d, cfg.grid_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels, cfg.kernels)
        self.initialize_weights()

    # --- initialisation (DiT's, plus DyDiT's "all on" routers) -----------------------------------
    def initialize_weights(self) -> None:
        init_linear_and_patch_(self, self.x_embedder)
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.g_embedder is not None:  # zero output: a student given one starts as its teacher
            nn.init.normal_(self.g_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.g_embedder.mlp[2].weight)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            self._init_routers(block)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _init_routers(self, block: DiTBlock) -> None:
        if block.dynamic:
            init_router_biases_([block.attn_rate, block.mlp_rate], block.token_selection if block.token_routing else None,
                                self.config.width_router_bias, self.config.token_router_bias)

    def reset_routers(self) -> None:
        """Re-initialise every router "all on" (after inheriting weights from a static teacher)."""
        for block in self.blocks:
            if block.dynamic:
                reset_routers_([block.attn_rate, block.mlp_rate], block.token_selection if block.token_routing else None,
                               self.config.width_router_bias, self.config.token_router_bias)

    def all_blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order (FSDP units, checkpoint and compile targets)."""
        return list(self.blocks)

    # --- conditioning: what the trainer and samplers pass as `**cond` -----------------------------
    # A text-conditioned family (PixArt, FLUX) implements the same three methods over its own keys,
    # so the training step and the samplers never ask which family they drive.
    def condition(self, batch: dict) -> dict[str, torch.Tensor]:
        if "y" not in batch:
            raise KeyError("a class-conditional DiT needs class labels 'y' in the batch")
        return {"y": batch["y"]}

    def null_condition(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional branch of classifier-free guidance: every label → the null class."""
        if not self.y_embedder.has_null_class:
            raise ValueError("this model has no null class (class_dropout_prob=0); it cannot use guidance")
        return {**cond, "y": torch.full_like(cond["y"], self.num_classes)}

    def drop_condition(self, cond: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Guidance dropout: labels where `drop` is True become the null class."""
        if not self.y_embedder.has_null_class:
            return cond
        return {**cond, "y": torch.where(drop, torch.full_like(cond["y"], self.num_classes), cond["y"])}

    # --- forward ----------------------------------------------------------------------------------
    def plan_key(self, t: torch.Tensor, t_emb: torch.Tensor, mode: str) -> tuple | None:
        """The key under which blocks cache width plans for this forward (see `models.dynamic.plan_key`)."""
        return plan_key(t, t_emb, mode, self.t_embedder.parameters())

    def unpatchify(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        return unpatchify(x, grid_hw, self.patch_size, self.out_channels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        return_aux: bool = False,
        complete: bool = False,
        seeds: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ):
        """x: (B, C, H, W); t: (B,) diffusion timesteps as the embedder expects them; y: (B,) labels;
        guidance: (B,) guidance scales, for a model with a guidance input (`guidance_embed`).

        `complete=True` runs a dynamic model with every unit on (DyDiT's complete-model warm-up).
        `seeds` (B,) int64: per-sample seeds of the routers' training noise (block i uses salts 8i…8i+2).
        """
        grid_hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = x.to(self.x_embedder.proj.weight.dtype)  # bf16 under an FSDP mixed-precision policy
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y)
        if self.g_embedder is not None:
            if guidance is None:
                raise ValueError("this model has a guidance input (guidance_embed=True): pass guidance=(B,) scales")
            c = c + self.g_embedder(guidance.float() * 1000.0)
        elif guidance is not None:
            raise ValueError("guidance given to a model without a guidance input (guidance_embed=False)")
        mode = self.exec_mode(complete)
        key = self.plan_key(t, t_emb, mode)
        masks = []
        for i, block in enumerate(self.blocks):
            h, block_masks = block(h, c, t_emb, grid_hw, mode, plan_key=key, seeds=seeds, salt=8 * i)
            if block_masks is not None:
                masks.append(block_masks)
        out = self.unpatchify(self.final_layer(h, c), grid_hw)
        if not return_aux:
            return out
        aux: dict[str, torch.Tensor] = {}
        if masks:
            aux = {f"{k}_masks": torch.stack([m[k] for m in masks], dim=1) for k in ("head", "channel", "token")}
            aux["flops_ratio"] = realised_ratio(self.config, aux["head_masks"], aux["channel_masks"], aux["token_masks"])
        return out, aux
