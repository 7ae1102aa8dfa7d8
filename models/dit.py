"""The DiT family: the teacher (softmax, static) and its LiT / DyDiT / DyLiT students.

Structure and parameter names are those of facebookresearch/DiT (adaLN-Zero blocks, learned-σ
output); LiT swaps the attention module, DyDiT adds routers. One class, flipped by `DiTConfig`.
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention import build_attention
from models.config import DiTConfig
from models.dynamic import Router, SlicedWeights, TokenSelect, UnitSelection, WidthPlan, weights_version
from models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from models.flops import realised_ratio
from models.kernels.dispatch import get_ops
from models.mlp import Mlp

LN_EPS = 1e-6
EXEC_MODES = ("auto", "masked", "sliced")


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
            self._plans: dict[tuple, WidthPlan] = {}  # inference width plans per timestep (cached_width_plan)
            self._plan_version: tuple | None = None

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
            y = self.mlp(h, unit_mask=plan.group_mask.unsqueeze(1))
            x = x + (token_mask.unsqueeze(-1).to(y.dtype) * gate_mlp.unsqueeze(1)) * y
        else:
            x = self._sliced_mlp(x, h, gate_mlp, plan.groups, token_mask, ops)
        return x, {"head": plan.head_mask, "channel": plan.group_mask, "token": token_mask}

    def width_plan(self, t_emb: torch.Tensor, sliced: bool) -> WidthPlan:
        """The head and channel-group routers' decision for timestep embeddings `t_emb` (B, D)."""
        return WidthPlan.build(self.attn_rate(t_emb), self.mlp_rate(t_emb), sliced)

    PLAN_CACHE_SIZE = 1024  # distinct sampling timesteps; a plan is a few (1, H) tensors

    def cached_width_plan(self, t_emb: torch.Tensor, key: tuple) -> WidthPlan:
        """`width_plan` for a batch sharing one timestep, computed once per `key` and reused.

        The head and channel masks are a function of t alone (METHODS §1.1), so inference runs the
        routers once per sampling timestep (one mask row kept) and then does no router, mask → index
        work or host syncs at that t. Built here, inside the block, where FSDP has its weights
        gathered; dropped whenever a router weight changes (`key` carries the timestep embedder's).
        """
        version = weights_version([*self.attn_rate.parameters(), *self.mlp_rate.parameters()])
        if version is None:
            return self.width_plan(t_emb, sliced=True)
        if version != self._plan_version:
            self._plans, self._plan_version = {}, version
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
            # On the whole batch, as the uncached and masked paths do (same GEMM, same rounding).
            p = self.width_plan(t_emb, sliced=True)
            plan = self._plans[key] = WidthPlan(p.head_mask[:1].clone(), p.group_mask[:1].clone(), p.heads, p.groups)
        b = t_emb.shape[0]
        return WidthPlan(plan.head_mask.expand(b, -1), plan.group_mask.expand(b, -1), plan.heads, plan.groups)

    def _sliced_mlp(self, x, h, gate, groups: UnitSelection, token_mask: torch.Tensor, ops) -> torch.Tensor:
        """Only the active channel groups, and only for routed tokens (gather → MLP → scatter-add)."""
        b, n, _ = x.shape
        keep = token_mask.reshape(-1) > 0.5
        if bool(keep.all()):
            unit_mask = None if groups.mask is None else groups.mask.unsqueeze(1)
            return ops.gated_residual(x, gate, self.mlp(h, unit_mask=unit_mask, groups=groups))
        index = keep.nonzero().squeeze(1)
        if index.numel() == 0:
            return x
        unit_mask = None
        if groups.mask is not None:
            unit_mask = groups.mask.index_select(0, torch.div(index, n, rounding_mode="floor"))
        y = self.mlp(ops.gather_tokens(h, index), unit_mask=unit_mask, groups=groups)
        return ops.scatter_add_tokens(x, index, y, gate)


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
        if not self.config.dynamic or complete:
            return "static"
        if self.training:
            return "masked"
        if self.dynamic_exec not in EXEC_MODES:
            raise ValueError(f"dynamic_exec={self.dynamic_exec!r} is not one of {EXEC_MODES}")
        return "masked" if self.dynamic_exec == "masked" else "sliced"

    def train(self, mode: bool = True) -> "DiT":
        """Leaving inference drops its caches (width plans, sliced weight copies): they would only
        hold memory through training, where nothing reads them."""
        if mode:
            for module in self.modules():
                if isinstance(module, DiTBlock) and module.dynamic:
                    module._plans, module._plan_version = {}, None
                for cache in vars(module).values():
                    if isinstance(cache, SlicedWeights):
                        cache.clear()
        return super().train(mode)

    def plan_key(self, t: torch.Tensor, t_emb: torch.Tensor, mode: str) -> tuple | None:
        """The key under which blocks cache width plans for this forward, or None (routers run).

        Only at inference (sliced, no autograd) with one timestep shared by the batch, as in every
        sampling step; training, masked eval and per-sample timesteps never cache. The key holds
        the timestep embedder's weight versions, since the plans are functions of its output.
        """
        if mode != "sliced" or torch.is_grad_enabled() or t.ndim != 1 or t.numel() == 0:
            return None
        values = t.tolist()
        if any(v != values[0] for v in values):
            return None
        version = weights_version(self.t_embedder.parameters())
        if version is None:
            return None
        return (values[0], t_emb.dtype, t_emb.device, version)

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
