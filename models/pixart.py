"""PixArt-Σ (PixArt-alpha/PixArt-sigma `PixArtMS`) and its LiT, DyDiT and DyLiT students: one class.

Parameter names are the official ones, so an official `.pth` loads by name:
`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `t_block.1` (adaLN-single: one shared Linear giving six
modulations), `y_embedder.y_proj.fc{1,2}` (caption projection) and the buffer `y_embedder.y_embedding`
(the null caption), `blocks.i.{scale_shift_table, attn.qkv, attn.proj, cross_attn.q_linear,
cross_attn.kv_linear, cross_attn.proj, mlp.fc1, mlp.fc2}` (+ `attn.sr`, `attn.norm` in KV-compressed
blocks), `final_layer.{linear, scale_shift_table}`.

A block is `x += gate·SelfAttn(modulate(LN(x)))`, `x += CrossAttn(x, caption, mask)` (no norm, no
gate), `x += gate·MLP(modulate(LN(x)))`, with the six modulations `scale_shift_table + t_block(t)`.
The final layer modulates with the timestep embedding t itself (not t_block's). Positions are fixed
2-D sin-cos embeddings recomputed for each token grid (`pe_interpolation`), so any aspect-ratio bucket
and resolution runs through the same weights.

A model with `guidance_embed` also takes the guidance scale g: `g_embedder` (a timestep embedder fed
g·1000, zero-initialised output, so a student given one starts as its teacher) adds to the timestep
embedding that adaLN-single and the final layer read; the routers keep reading t's embedding alone, so
the width stays a function of t (cached per sampling step).

The null caption `y_embedding` is a buffer, never trained: `set_null_condition` fills it with T5("")
of the encoder that made the data (PixArt's loader does the same); guidance dropout and the
unconditional half of classifier-free guidance swap it in for the caption and **keep the caption's
own mask** (official PixArt, `../shared/T2I.md` §5 trap 1), identically for teacher and student.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from models.attention import CrossAttention, build_attention
from models.dynamic import (
    DynamicExecution, Router, TokenSelect, WidthPlan, WidthPlanCache, init_router_biases_, plan_key, reset_routers_,
    token_masked_residual, token_routed_residual,
)
from models.embeddings import PatchEmbed, TimestepEmbedder, init_linear_and_patch_, sincos_pos_embed_2d, unpatchify
from models.kernels.dispatch import get_ops
from models.mlp import Mlp
from models.pixart_config import PixArtConfig
from models.pixart_flops import realised_ratio

LN_EPS = 1e-6
TEXT_KEYS = ("text_emb", "text_mask")
ROUTER_SALTS = 8  # salts per block: attn_rate 0, mlp_rate 1, cross_attn_rate 2, token_selection 3


class CaptionEmbedder(nn.Module):
    """T5 features → hidden width (`y_proj`, GELU-tanh MLP), and the null caption buffer."""

    def __init__(self, caption_channels: int, hidden_size: int, max_length: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, out_dim=hidden_size)
        self.register_buffer("y_embedding", torch.randn(max_length, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption.to(self.y_proj.fc1.weight.dtype))


class PixArtBlock(nn.Module):
    """adaLN-single block; a dynamic one also owns DyDiT's head, channel-group, token (and
    optionally cross-attention head) routers."""

    def __init__(self, cfg: PixArtConfig, index: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.index = index
        self.kernels = cfg.kernels
        kv = cfg.kv_compress_scale if index in cfg.kv_layers else 1
        self.attn = build_attention(cfg.attention, d, cfg.self_heads, cfg.dwc_kernel, cfg.linear_eps, cfg.kernels, kv_compress=kv)
        self.cross_attn = CrossAttention(d, cfg.num_heads)
        self.mlp = Mlp(d, cfg.mlp_hidden, cfg.groups)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)
        self.dynamic = cfg.dynamic
        self.token_routing = cfg.dynamic and cfg.token_routing
        self.cross_routing = cfg.dynamic and cfg.cross_attn_routing
        if cfg.dynamic:
            self.attn_rate = Router(d, cfg.self_heads, cfg.router_tau, cfg.router_threshold)
            self.mlp_rate = Router(d, cfg.groups, cfg.router_tau, cfg.router_threshold)
            if self.cross_routing:
                self.cross_attn_rate = Router(d, cfg.num_heads, cfg.router_tau, cfg.router_threshold)
            if self.token_routing:
                self.token_selection = TokenSelect(d, cfg.token_router_reduction, cfg.router_tau, cfg.router_threshold)
            self.plans = WidthPlanCache()

    def width_routers(self) -> list[Router]:
        return [self.attn_rate, self.mlp_rate] + ([self.cross_attn_rate] if self.cross_routing else [])

    def salt(self, k: int) -> int:
        """A distinct salt per router call site of the model (block index × ROUTER_SALTS + k)."""
        return self.index * ROUTER_SALTS + k

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        t0: torch.Tensor,
        t_emb: torch.Tensor,
        grid_hw: tuple[int, int],
        mode: str,
        plan_key: tuple | None = None,
        seeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """x (B, N, D) image tokens; y (B, L, D) projected caption, `mask` (B, L) its real tokens; t0
        (B, 6D) t_block's output, t_emb (B, D) the timestep embedding (the routers' input).

        mode: "static" (every unit), "masked" (train path) or "sliced" (inference path); `plan_key`
        names the shared timestep of a sliced, no-grad forward (width plans are then cached)."""
        ops = get_ops(self.kernels, x.device)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.view(x.shape[0], 6, -1)).unbind(1)
        h = ops.modulate_layernorm(x, shift_msa, scale_msa, LN_EPS)
        if mode == "static":
            x = ops.gated_residual(x, gate_msa, self.attn(h, grid_hw))
            x = x + self.cross_attn(x, y, mask)
            return ops.gated_residual(x, gate_mlp, self.mlp(ops.modulate_layernorm(x, shift_mlp, scale_mlp, LN_EPS))), None

        if plan_key is not None:
            plan = self.cached_width_plan(t_emb, plan_key)
        else:
            plan = self.width_plan(t_emb, sliced=mode == "sliced", seeds=seeds)
        masked = mode == "masked"
        if masked:
            x = ops.gated_residual(x, gate_msa, self.attn(h, grid_hw, head_mask=plan.head_mask))
        else:
            x = ops.gated_residual(x, gate_msa, self.attn(h, grid_hw, heads=plan.heads))
        if not self.cross_routing:
            x = x + self.cross_attn(x, y, mask)
        elif masked:
            x = x + self.cross_attn(x, y, mask, head_mask=plan.extra_masks["cross"])
        else:
            x = x + self.cross_attn(x, y, mask, heads=plan.extra["cross"])

        b, n, _ = x.shape
        if self.token_routing:
            token_mask = self.token_selection(x, seeds=seeds, salt=self.salt(3))
        else:
            token_mask = x.new_ones(b, n, dtype=torch.float32)
        h = ops.modulate_layernorm(x, shift_mlp, scale_mlp, LN_EPS)
        if masked:
            x = token_masked_residual(x, self.mlp(h, unit_mask=plan.group_mask.unsqueeze(1)), gate_mlp, token_mask)
        else:
            x = token_routed_residual(x, h, gate_mlp, token_mask, self.mlp, plan.groups, ops)
        masks = {"head": plan.head_mask, "channel": plan.group_mask, "token": token_mask}
        if self.cross_routing:
            masks["cross"] = plan.extra_masks["cross"]
        return x, masks

    def width_plan(self, t_emb: torch.Tensor, sliced: bool, seeds: torch.Tensor | None = None) -> WidthPlan:
        """The width routers' decision for timestep embeddings `t_emb` (B, D)."""
        extra = {"cross": self.cross_attn_rate(t_emb, seeds=seeds, salt=self.salt(2))} if self.cross_routing else {}
        return WidthPlan.build(self.attn_rate(t_emb, seeds=seeds, salt=self.salt(0)),
                               self.mlp_rate(t_emb, seeds=seeds, salt=self.salt(1)), sliced, **extra)

    def cached_width_plan(self, t_emb: torch.Tensor, key: tuple) -> WidthPlan:
        """`width_plan` for a batch sharing one timestep, computed once per `key` (see WidthPlanCache)."""
        params = [p for r in self.width_routers() for p in r.parameters()]
        return self.plans.get(key, params, t_emb.shape[0], lambda: self.width_plan(t_emb, sliced=True))


class T2IFinalLayer(nn.Module):
    """LN, modulation by `scale_shift_table + t` (the timestep embedding, no Linear), output linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, kernels: str) -> None:
        super().__init__()
        self.kernels = kernels
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)
        return self.linear(get_ops(self.kernels, x.device).modulate_layernorm(x, shift, scale, LN_EPS))


class PixArt(DynamicExecution, nn.Module):
    """Text-conditioned diffusion transformer on latents of any bucket's shape.

    `forward(x, t, text_emb, text_mask)` returns the (B, out_channels, H, W) prediction: ε and, with
    learned σ, the variance interpolation. `t` is the integer DDPM step (PixArt's convention).
    `text_emb` (B, L, caption_channels) in any float dtype, `text_mask` (B, L) bool (True = token);
    padded positions have no influence. A dynamic student also takes `seeds` ((B,) int64) for its
    routers' per-sample noise, and with `return_aux=True` returns its masks and `flops_ratio`.
    """

    POS_CACHE = 8  # token grids whose position embedding is kept (buckets in use)

    def __init__(self, cfg: PixArtConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))
        self.g_embedder = TimestepEmbedder(d) if cfg.guidance_embed else None  # fed g·1000, as DiT's
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, d, cfg.model_max_length)
        self.blocks = nn.ModuleList([PixArtBlock(cfg, i) for i in range(cfg.depth)])
        self.final_layer = T2IFinalLayer(d, cfg.patch_size, cfg.out_channels, cfg.kernels)
        self._pos: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.initialize_weights()

    # --- initialisation (PixArt's, plus DyDiT's "all on" routers) --------------------------------
    def initialize_weights(self) -> None:
        init_linear_and_patch_(self, self.x_embedder)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.y_embedder.y_proj.fc1,
                    self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        if self.g_embedder is not None:  # zero output: a student given one starts as its teacher
            nn.init.normal_(self.g_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.g_embedder.mlp[2].weight)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            if block.dynamic:
                init_router_biases_(*self._routers(block))
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _routers(self, block: PixArtBlock) -> tuple:
        token = block.token_selection if block.token_routing else None
        return block.width_routers(), token, self.config.width_router_bias, self.config.token_router_bias

    def reset_routers(self) -> None:
        """Re-initialise every router "all on" (after inheriting weights from a static teacher)."""
        for block in self.blocks:
            if block.dynamic:
                reset_routers_(*self._routers(block))

    def all_blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order (FSDP units, checkpoint and compile targets)."""
        return list(self.blocks)

    # --- conditioning: what the trainer and samplers pass as `**cond` -----------------------------
    def condition(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        missing = [k for k in TEXT_KEYS if k not in batch]
        if missing:
            raise KeyError(f"PixArt needs {missing} in the batch: train on precomputed T5 shards (data.cond=text_emb, "
                           "written by launch.precompute)")
        return {"text_emb": batch["text_emb"], "text_mask": batch["text_mask"].bool()}

    def null_condition(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional branch of guidance: the null caption, with each prompt's own mask kept."""
        emb = cond["text_emb"]
        return {**cond, "text_emb": self._null_like(emb).expand(emb.shape[0], -1, -1)}

    def drop_condition(self, cond: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Guidance dropout: the captions of rows where `drop` is True become the null caption; the mask
        stays the prompt's (official PixArt). `drop` is drawn once by the step, so teacher and student
        see the same rows dropped. Other keys (a guidance value) pass through."""
        emb = cond["text_emb"]
        null = self._null_like(emb)
        return {**cond, "text_emb": torch.where(drop.to(emb.device)[:, None, None], null[None], emb)}

    def _null_like(self, emb: torch.Tensor) -> torch.Tensor:
        null = self.y_embedder.y_embedding
        if tuple(emb.shape[1:]) != tuple(null.shape):
            raise ValueError(f"text_emb rows are {tuple(emb.shape[1:])} but the model's null caption is {tuple(null.shape)} "
                             "(model_max_length, caption_channels): set student.args.model_max_length and caption_channels "
                             "to the text encoder's max_length and width")
        return null.to(device=emb.device, dtype=emb.dtype)

    @torch.no_grad()
    def set_null_condition(self, null: Mapping[str, torch.Tensor]) -> None:
        """Copy T5("") (`text_emb` (L, D), full length, padding included) into the null caption buffer.

        Its own `text_mask` is not kept: the unconditional branch uses each prompt's mask (see the
        module docstring). Call it on teacher and student before training, from the shards'
        `null_text.safetensors`, so both drop to the null caption of the encoder that made the data."""
        emb = null["text_emb"]
        if emb.ndim == 3 and emb.shape[0] == 1:
            emb = emb[0]
        buf = self.y_embedder.y_embedding
        if tuple(emb.shape) != tuple(buf.shape):
            raise ValueError(f"null caption text_emb has shape {tuple(emb.shape)}, the model's y_embedding is "
                             f"{tuple(buf.shape)} (model_max_length, caption_channels); the shards' text encoder "
                             "does not fit this model")
        buf.copy_(emb.to(device=buf.device, dtype=buf.dtype))

    # --- forward ----------------------------------------------------------------------------------
    def pos_embed(self, grid_hw: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, h·w, D) sin-cos positions of a token grid, computed once per grid (PixArt-Σ's rescaling)."""
        key = (grid_hw, device, dtype)
        pe = self._pos.get(key)
        if pe is None:
            cfg = self.config
            arr = sincos_pos_embed_2d(cfg.hidden_size, grid_hw[0], grid_hw[1], base_size=cfg.grid_size,
                                      interpolation=cfg.pe_scale)
            pe = torch.from_numpy(arr).to(device=device, dtype=dtype).unsqueeze(0)
            if len(self._pos) >= self.POS_CACHE:
                self._pos.popitem(last=False)
            self._pos[key] = pe
        return pe

    def plan_key(self, t: torch.Tensor, t_emb: torch.Tensor, mode: str) -> tuple | None:
        return plan_key(t, t_emb, mode, self.t_embedder.parameters())

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        return_aux: bool = False,
        complete: bool = False,
        seeds: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ):
        """`guidance` (B,): the guidance scales of a model with a guidance input (`guidance_embed`)."""
        cfg = self.config
        p = cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        grid_hw = (x.shape[-2] // p, x.shape[-1] // p)
        x = x.to(self.x_embedder.proj.weight.dtype)  # bf16 under an FSDP mixed-precision policy
        h = self.x_embedder(x) + self.pos_embed(grid_hw, x.device, x.dtype)
        t_emb = self.t_embedder(t)
        c = t_emb  # what adaLN-single and the final layer read: t's embedding (+ g's)
        if self.g_embedder is not None:
            if guidance is None:
                raise ValueError("this model has a guidance input (guidance_embed=True): pass guidance=(B,) scales")
            c = t_emb + self.g_embedder(guidance.float() * 1000.0)
        elif guidance is not None:
            raise ValueError("guidance given to a model without a guidance input (guidance_embed=False)")
        t0 = self.t_block(c)
        y = self.y_embedder(text_emb)
        mask = None if text_mask is None else text_mask.to(torch.bool)
        mode = self.exec_mode(complete)
        key = self.plan_key(t, t_emb, mode)
        masks = []
        for block in self.blocks:
            h, block_masks = block(h, y, mask, t0, t_emb, grid_hw, mode, plan_key=key, seeds=seeds)
            if block_masks is not None:
                masks.append(block_masks)
        out = unpatchify(self.final_layer(h, c), grid_hw, p, cfg.out_channels)
        if not return_aux:
            return out
        aux: dict[str, torch.Tensor] = {}
        if masks:
            aux = {f"{k}_masks": torch.stack([m[k] for m in masks], dim=1) for k in masks[0]}
            aux["flops_ratio"] = realised_ratio(cfg, aux, grid_hw, y.shape[1])
        return out, aux
