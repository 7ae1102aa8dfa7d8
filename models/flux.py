"""FLUX.1 (black-forest-labs/flux `src/flux/model.py`) and its DyFLUX / LiT-FLUX students: one class.

Parameter names are BFL's (`img_in`, `time_in`, `guidance_in`, `vector_in`, `txt_in`,
`double_blocks.i.*`, `single_blocks.i.*`, `final_layer.*`), so a `flux1-*.safetensors` file loads
by name; `models/flux_convert.py` maps diffusers' layout onto them.

Calling convention (the family protocol's): `model(x, t, text_emb=..., text_pooled=..., guidance=...)`
with the latent x (B, 16, H, W) — 2×2 patches are packed into 64 channels here and the output is
unpacked to (B, 16, H, W) — and `t` the flow time ×1000 (what `RectifiedFlow.model_timestep` gives;
embedded as given, no further ×1000). `guidance` is the distilled guidance scale g (e.g. 3.5),
embedded as g·1000 as BFL does; a guidance-embedded model called without one uses
`config.guidance_default`. No attention mask anywhere: FLUX's T5 padding is encoded and attended.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import torch
from torch import nn

from models.dynamic import DynamicExecution, plan_key
from models.embeddings import TimestepEmbedder
from models.flux_blocks import DoubleStreamBlock, SingleStreamBlock
from models.flux_config import FluxConfig
from models.flux_flops import realised_ratio
from models.flux_layers import LastLayer, MLPEmbedder

FREQ_DIM = 256  # sinusoid width of the timestep and guidance embedders


def pack(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, (H/p)(W/p), C·p·p): "b c (h ph) (w pw) -> b (h w) (c ph pw)", as BFL."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    return x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)


def unpack(x: torch.Tensor, grid_hw: tuple[int, int], p: int) -> torch.Tensor:
    """The inverse of `pack`."""
    b, _, cpp = x.shape
    h, w = grid_hw
    c = cpp // (p * p)
    return x.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)


def bfl_embedding_input(value: torch.Tensor, dtype: torch.dtype, scaled: bool = False) -> torch.Tensor:
    """What BFL's `timestep_embedding(v, 256)` sinusoid sees for a time t ∈ [0, 1] or a guidance g.

    `value` is v·1000 when `scaled` (the model's timestep input), else v (guidance). BFL and diffusers
    hold v in the model's dtype and multiply by 1000 in it, so in bf16 both v and v·1000 are rounded
    (T2I trap 7) and this rounds alike; in fp32 the sinusoid gets v·1000 as given.
    """
    if dtype in (torch.bfloat16, torch.float16):
        v = value / 1000 if scaled else value
        return (v.to(dtype) * 1000).float()
    return value.float() if scaled else value.float() * 1000


class Flux(DynamicExecution, nn.Module):
    """FLUX.1 transformer: `depth` double-stream blocks on (image, text), then `depth_single`
    single-stream blocks on [text; image], then the final adaLN layer on the image tokens."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.packed_channels, d, bias=True)
        self.time_in = MLPEmbedder(FREQ_DIM, d)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        self.guidance_in = MLPEmbedder(FREQ_DIM, d) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, d, bias=True)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(cfg, i) for i in range(cfg.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(cfg, cfg.depth + i) for i in range(cfg.depth_single)])
        self.final_layer = LastLayer(d, cfg.patch_size, cfg.out_channels)
        # The unconditional branch: T5("") and CLIP("") pooled, copied in by `set_null_condition`
        # (zeros until then). Buffers, so checkpoints, exports and the EMA carry them.
        self.register_buffer("null_text_emb", torch.zeros(cfg.text_len, cfg.context_in_dim))
        self.register_buffer("null_text_pooled", torch.zeros(cfg.vec_in_dim))
        self._null_checked = False
        self.initialize_weights()

    # --- initialisation (random teachers in tests, students' new parts) ---------------------------
    def initialize_weights(self) -> None:
        """Xavier linears, small embedders, zero modulation and output (adaLN-Zero, as DiT), routers on."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in (self.time_in, self.vector_in, self.guidance_in):
            if emb is not None:
                nn.init.normal_(emb.in_layer.weight, std=0.02)
                nn.init.normal_(emb.out_layer.weight, std=0.02)
        if self.guidance_in is not None:  # zero output: a student given one starts as its unguided teacher
            nn.init.zeros_(self.guidance_in.out_layer.weight)
        for block in self.all_blocks():
            for mod in (getattr(block, "img_mod", None), getattr(block, "txt_mod", None), getattr(block, "modulation", None)):
                if mod is not None:
                    nn.init.zeros_(mod.lin.weight)
                    nn.init.zeros_(mod.lin.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self.reset_routers()

    def reset_routers(self) -> None:
        """Every router "all on" (after inheriting a static teacher's weights): width routers at
        DyDiT's bias, the token router as the released DyFLUX initialises it (xavier, bias 5)."""
        cfg = self.config
        for block in self.all_blocks():
            if not block.dynamic:
                continue
            for router in (block.attn_rate, *(getattr(block, n) for n in block.mlp_routers)):
                if router.router is not None:
                    nn.init.xavier_uniform_(router.router.weight)
                    nn.init.constant_(router.router.bias, cfg.width_router_bias)
            if block.token_routing:
                sel = block.token_selection
                for lin in (sel.linear_t, sel.router):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
                nn.init.constant_(sel.router.bias, cfg.token_router_bias)
                nn.init.ones_(sel.norm.weight)
                nn.init.zeros_(sel.norm.bias)

    def all_blocks(self) -> list[nn.Module]:
        """Double then single blocks (FSDP units, activation-checkpoint and compile targets)."""
        return [*self.double_blocks, *self.single_blocks]

    def block_names(self) -> list[str]:
        """Names `forward(features=...)` accepts, in execution order."""
        return [f"double_blocks.{i}" for i in range(len(self.double_blocks))] + [
            f"single_blocks.{i}" for i in range(len(self.single_blocks))]

    # --- conditioning ------------------------------------------------------------------------------
    def condition(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """T5 embeddings (B, L, 4096) and the CLIP pooled vector (B, 768); FLUX uses no text mask."""
        if "text_emb" not in batch:
            raise KeyError("FLUX needs T5 embeddings 'text_emb' in the batch: set data.cond=text_emb and point "
                           "data.path at shards with precomputed text embeddings (launch.precompute)")
        if "text_pooled" not in batch:
            raise KeyError("FLUX needs the CLIP pooled vector 'text_pooled' in the batch, and these shards have none: "
                           "precompute them with a CLIP text encoder (launch.precompute) — shards written before "
                           "text_pooled existed hold only text_emb and text_mask")
        return {"text_emb": batch["text_emb"], "text_pooled": batch["text_pooled"]}

    def set_null_condition(self, null: Mapping[str, torch.Tensor]) -> None:
        """Copy T5("") (L, 4096) and CLIP("") pooled (768,) into the null buffers (a mask, if given, is
        ignored: FLUX attends to every T5 position). L is the data's T5 length: the buffer takes it when it
        differs from `config.text_len` (the data, not the config, decides how long a caption is)."""
        for key in ("text_emb", "text_pooled"):
            if key not in null:
                raise KeyError(f"set_null_condition needs {key!r} (T5('') and CLIP('') pooled outputs)")
        emb, pooled = torch.as_tensor(null["text_emb"]), torch.as_tensor(null["text_pooled"])
        want = (self.config.context_in_dim, self.config.vec_in_dim)
        if emb.ndim != 2 or emb.shape[1] != want[0] or tuple(pooled.shape) != (want[1],):
            raise ValueError(f"null text_emb {tuple(emb.shape)} / text_pooled {tuple(pooled.shape)}: the model takes "
                             f"(L, {want[0]}) T5 and ({want[1]},) CLIP pooled vectors")
        buf = self.null_text_emb
        if emb.shape[0] != buf.shape[0]:
            self.register_buffer("null_text_emb", buf.new_empty(emb.shape[0], buf.shape[1]))
        with torch.no_grad():
            self.null_text_emb.copy_(emb.to(self.null_text_emb.dtype))
            self.null_text_pooled.copy_(pooled.to(self.null_text_pooled.dtype))
        self._null_checked = True

    def _check_null(self) -> None:
        if not self._null_checked:
            self._null_checked = True
            if not bool(self.null_text_emb.any()) and not bool(self.null_text_pooled.any()):
                warnings.warn("FLUX null condition is still zeros: call set_null_condition with T5('') and CLIP('') "
                              "pooled outputs (null_text.safetensors beside the shards)", stacklevel=3)

    def null_condition(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional branch: every row's text becomes T5("") / CLIP("") (other keys kept)."""
        self._check_null()
        emb, pooled = cond["text_emb"], cond["text_pooled"]
        self._check_len(emb)
        return {**cond, "text_emb": self.null_text_emb.to(emb.dtype).expand_as(emb),
                "text_pooled": self.null_text_pooled.to(pooled.dtype).expand_as(pooled)}

    def drop_condition(self, cond: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Guidance dropout: rows where `drop` is True get the null text (no mask to keep, trap 5)."""
        if not bool(drop.any()):
            return dict(cond)
        null = self.null_condition(cond)
        d = drop.to(cond["text_emb"].device)
        return {**cond, "text_emb": torch.where(d[:, None, None], null["text_emb"], cond["text_emb"]),
                "text_pooled": torch.where(d[:, None], null["text_pooled"], cond["text_pooled"])}

    def _check_len(self, emb: torch.Tensor) -> None:
        if emb.shape[1] != self.null_text_emb.shape[0]:
            raise ValueError(f"text_emb has {emb.shape[1]} tokens but the model's null condition has "
                             f"{self.null_text_emb.shape[0]}: attach the data's null text (set_null_condition, from "
                             "null_text.safetensors beside the shards) or set student.args.text_len to the shards' T5 length")

    # --- forward ------------------------------------------------------------------------------------
    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if device.type != "meta" and torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.img_in.weight.dtype

    def _plan_key(self, t: torch.Tensor, g: torch.Tensor | None, t_emb: torch.Tensor, mode: str) -> tuple | None:
        """Width plans are functions of (t, g): cached per sampling step when the batch shares both."""
        params = [*self.time_in.parameters(), *(self.guidance_in.parameters() if self.guidance_in is not None else ())]
        key = plan_key(t, t_emb, mode, params)
        if key is None or g is None:
            return key
        values = g.tolist()
        return None if any(v != values[0] for v in values) else (*key, values[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_pooled: torch.Tensor,
                guidance: torch.Tensor | None = None, *, return_aux: bool = False, complete: bool = False,
                seeds: torch.Tensor | None = None, features: Iterable[str] | None = None):
        """x (B, C, H, W) → velocity (B, C, H, W); see the module docstring for the inputs.

        `complete=True` runs a dynamic model with every unit on. `seeds` ((B,) int64) are the routers'
        per-sample Gumbel seeds, each router adding its own salt. `features` names blocks
        (`block_names()`) whose attention output (merged heads before any output projection, text
        tokens first) is returned in `aux["features"]` — feature distillation's hook.
        """
        cfg = self.config
        b, c, hh, ww = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels or hh % p or ww % p:
            raise ValueError(f"FLUX takes latents (B, {cfg.in_channels}, H, W) with H and W divisible by {p}; "
                             f"got {tuple(x.shape)}")
        if text_emb.ndim != 3 or text_emb.shape[-1] != cfg.context_in_dim or text_pooled.shape != (b, cfg.vec_in_dim):
            raise ValueError(f"FLUX takes text_emb (B, L, {cfg.context_in_dim}) and text_pooled (B, {cfg.vec_in_dim}); "
                             f"got {tuple(text_emb.shape)} and {tuple(text_pooled.shape)}")
        wanted = list(features or [])
        if wanted and not return_aux:
            raise ValueError("features= needs return_aux=True (they are returned in aux['features'])")
        unknown = sorted(set(wanted) - set(self.block_names()))
        if unknown:
            raise ValueError(f"unknown feature blocks {unknown}; choose from double_blocks.0.. and single_blocks.0.. "
                             f"(this model has {cfg.depth} and {cfg.depth_single})")
        grid = (hh // p, ww // p)
        dtype = self._compute_dtype(x.device)
        # the (t, g) embedding first: every layer after it may be gated on it (TD-LoRA adapters, models/lora)
        t_emb = self.time_in(TimestepEmbedder.timestep_embedding(bfl_embedding_input(t, dtype, scaled=True), FREQ_DIM))
        g = None
        if self.guidance_in is not None:
            g = torch.full((b,), cfg.guidance_default, device=x.device) if guidance is None else guidance.to(x.device)
            t_emb = t_emb + self.guidance_in(TimestepEmbedder.timestep_embedding(bfl_embedding_input(g, dtype), FREQ_DIM))
        elif guidance is not None:
            raise ValueError("this FLUX model has no guidance input (guidance_embed=false, e.g. schnell): pass no guidance")
        img = self.img_in(pack(x.to(self.img_in.weight.dtype), p))
        vec = t_emb + self.vector_in(text_pooled)
        txt = self.txt_in(text_emb.to(self.txt_in.weight.dtype))
        mode = self.exec_mode(complete)
        key = self._plan_key(t, g, t_emb, mode)
        extras: dict[str, dict[str, torch.Tensor]] = {}
        names = iter(self.block_names())
        for block in self.double_blocks:
            name = next(names)
            img, txt, extras[name] = block(img, txt, vec, t_emb, grid, mode, key, seeds, name in wanted)
        n_txt = txt.shape[1]
        h = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            name = next(names)
            h, extras[name] = block(h, vec, t_emb, n_txt, grid, mode, key, seeds, name in wanted)
        out = unpack(self.final_layer(h[:, n_txt:], vec), grid, p)
        if not return_aux:
            return out
        aux: dict = {}
        if mode != "static":
            aux = self._mask_aux(extras, n_txt)
        if wanted:
            aux["features"] = {name: extras[name]["features"] for name in wanted}
        return out, aux

    def _mask_aux(self, extras: dict[str, dict[str, torch.Tensor]], n_txt: int) -> dict[str, torch.Tensor]:
        """Masks stacked over blocks (double then single): head (B, L, H), token (B, L, N), channel
        (B, M, G) over the M = 2·depth + depth_single MLPs (each double block's image MLP, then its
        text MLP, then each single block's) — and DyDiT's realised FLOPs ratio."""
        blocks = list(extras.values())
        double, single = blocks[: self.config.depth], blocks[self.config.depth:]
        channels = [m for e in double for m in (e["img_channel"], e["txt_channel"])] + [e["channel"] for e in single]
        aux = {"head_masks": torch.stack([e["head"] for e in blocks], dim=1),
               "channel_masks": torch.stack(channels, dim=1),
               "token_masks": torch.stack([e["token"] for e in blocks], dim=1)}
        aux["flops_ratio"] = realised_ratio(self.config, aux["head_masks"], aux["channel_masks"], aux["token_masks"], n_txt)
        return aux
