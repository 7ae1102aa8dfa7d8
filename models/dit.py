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
    Router, TokenSelect, WidthPlan, WidthPlanCache, clear_inference_caches, exec_mode, plan_key,
    token_masked_residual, token_routed_residual,
)
from models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """mode: "static" (every unit), "masked" (train path) or "sliced" (inference path).

        `plan_key` names the shared timestep of a sliced, no-grad forward (see `DiT.plan_key`): the
        width plan is then looked up per timestep instead of running the routers.
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
            plan = self.width_plan(t_emb, sliced=mode == "sliced")
        h = ops.modulate_layernorm(x, shift_msa, scale_msa, LN_EPS)
        if mode == "masked":
            x = ops.gated_residual(x, gate_msa, self.attn(h, grid_hw, head_mask=plan.head_mask))
        else:
            x = ops.gated_residual(x, gate_msa, self.attn(h, grid_hw, heads=plan.heads))

        b, n, _ = x.shape
        token_mask = self.token_selection(x) if self.token_routing else x.new_ones(b, n, dtype=torch.float32)
        h = ops.modulate_layernorm(x, shift_mlp, scale_mlp, LN_EPS)
        if mode == "masked":
            x = token_masked_residual(x, self.mlp(h, unit_mask=plan.group_mask.unsqueeze(1)), gate_mlp, token_mask)
        else:
            x = token_routed_residual(x, h, gate_mlp, token_mask, self.mlp, plan.groups, ops)
        return x, {"head": plan.head_mask, "channel": plan.group_mask, "token": token_mask}

    def width_plan(self, t_emb: torch.Tensor, sliced: bool) -> WidthPlan:
        """The head and channel-group routers' decision for timestep embeddings `t_emb` (B, D)."""
        return WidthPlan.build(self.attn_rate(t_emb), self.mlp_rate(t_emb), sliced)

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


class DiT(nn.Module):
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
        self.dynamic_exec = "auto"  # eval of a dynamic model: "sliced" unless set to "masked"
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        pos = sincos_pos_embed_2d(d, cfg.grid_size)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels, cfg.kernels)
        self.initialize_weights()

    # --- initialisation (DiT's, plus DyDiT's "all on" routers) -----------------------------------
    def initialize_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            self._init_routers(block)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _init_routers(self, block: DiTBlock) -> None:
        if not block.dynamic:
            return
        for router in (block.attn_rate.router, block.mlp_rate.router):
            if router is not None:
                nn.init.constant_(router.bias, self.config.width_router_bias)
        if block.token_routing:
            nn.init.constant_(block.token_selection.mlp_head[2].bias, self.config.token_router_bias)

    def reset_routers(self) -> None:
        """Re-initialise every router "all on" (after inheriting weights from a static teacher)."""
        for block in self.blocks:
            if block.dynamic:
                for router in (block.attn_rate, block.mlp_rate):
                    if router.router is not None:
                        nn.init.xavier_uniform_(router.router.weight)
                if block.token_routing:
                    for lin in (block.token_selection.mlp_head[0], block.token_selection.mlp_head[2]):
                        nn.init.xavier_uniform_(lin.weight)
                        nn.init.zeros_(lin.bias)
                self._init_routers(block)

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
        return {"y": torch.full_like(cond["y"], self.num_classes)}

    def drop_condition(self, cond: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Guidance dropout: labels where `drop` is True become the null class."""
        if not self.y_embedder.has_null_class:
            return cond
        return {"y": torch.where(drop, torch.full_like(cond["y"], self.num_classes), cond["y"])}

    # --- forward ----------------------------------------------------------------------------------
    def _exec_mode(self, complete: bool) -> str:
        return exec_mode(self.config.dynamic, self.training, self.dynamic_exec, complete)

    def train(self, mode: bool = True) -> "DiT":
        """Leaving inference drops its caches (width plans, sliced weight copies)."""
        if mode:
            clear_inference_caches(self)
        return super().train(mode)

    def plan_key(self, t: torch.Tensor, t_emb: torch.Tensor, mode: str) -> tuple | None:
        """The key under which blocks cache width plans for this forward (see `models.dynamic.plan_key`)."""
        return plan_key(t, t_emb, mode, self.t_embedder.parameters())

    def unpatchify(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        b = x.shape[0]
        p, c = self.patch_size, self.out_channels
        gh, gw = grid_hw
        x = x.reshape(b, gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, c, gh * p, gw * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        return_aux: bool = False,
        complete: bool = False,
    ):
        """x: (B, C, H, W); t: (B,) diffusion timesteps as the embedder expects them; y: (B,) labels.

        `complete=True` runs a dynamic model with every unit on (DyDiT's complete-model warm-up).
        """
        grid_hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = x.to(self.x_embedder.proj.weight.dtype)  # bf16 under an FSDP mixed-precision policy
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y)
        mode = self._exec_mode(complete)
        key = self.plan_key(t, t_emb, mode)
        masks = []
        for block in self.blocks:
            h, block_masks = block(h, c, t_emb, grid_hw, mode, plan_key=key)
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
