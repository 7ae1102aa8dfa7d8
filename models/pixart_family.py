"""The PixArt-Σ family on the family protocol: the T2I teacher and its LiT, DyDiT and DyLiT students.

Registry: `pixart-sigma-xl/2` (the teacher), `lit-pixart-sigma-xl/2` (linear self-attention with 2
heads and the 5×5 DWC; cross-attention stays softmax with the teacher's 16 heads),
`dydit-pixart-sigma-xl/2` (head and channel-group routers on the timestep embedding, a token router
before the MLP; `cross_attn_routing=True` also routes the cross-attention heads) and
`dylit-pixart-sigma-xl/2` (both). Keyword overrides build small configs (`depth=2, hidden_size=32,
num_heads=2, input_size=8, caption_channels=16, model_max_length=6`).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Mapping

import torch

from models.family import Checkpoint, ConditionSpec, ModelFamily, register_family
from models.pixart import PixArt
from models.pixart_config import LIT_HEADS, SIZES, VAE_DOWNSAMPLE, PixArtConfig
from models.pixart_convert import describe, diffusers_linear_names, looks_like_pixart, pixart_checkpoint
from models.pixart_flops import realised_parts, static_flops
from models.weights_io import RawWeights

KINDS = ("pixart", "lit", "dydit", "dylit")
_NAME = re.compile(r"^(?:(lit|dydit|dylit)-)?pixart-sigma-(xl)/2$")
TEXT = ConditionSpec("text", ("text_emb", "text_mask"), "text_emb")
SELF_ATTENTION = ("blocks.*.attn.qkv.*", "blocks.*.attn.proj.*", "blocks.*.attn.sr.*", "blocks.*.attn.norm.*")
# what student and teacher must share: inputs, outputs, the caption, and the position function (the
# training grid and pe_interpolation), or the student would be distilled at shifted positions
PAIR_KEYS = ("in_channels", "patch_size", "learn_sigma", "caption_channels", "model_max_length", "input_size")


def kind_defaults(kind: str, size: str) -> dict[str, Any]:
    depth, hidden, heads = SIZES[size]
    base: dict[str, Any] = {"depth": depth, "hidden_size": hidden, "num_heads": heads}
    if kind in ("lit", "dylit"):
        base.update(attention="linear", attn_heads=LIT_HEADS, dwc_kernel=5)
    if kind in ("dydit", "dylit"):
        base.update(dynamic=True)  # MLP channel groups: the teacher's head count (mlp_groups=None)
    return base


class PixArtFamily(ModelFamily):
    name = "pixart"
    config_cls = PixArtConfig
    report_resolutions = (512, 1024, 2048)
    timestep_module = "t_embedder"  # what the width routers and TD-LoRA's gates read (not t_block's 6·D)

    def names(self) -> list[str]:
        return [f"{k}-pixart-sigma-{s}/2" if k != "pixart" else f"pixart-sigma-{s}/2" for k in KINDS for s in SIZES]

    def config(self, name: str, **overrides: Any) -> PixArtConfig | None:
        m = _NAME.match(name.lower())
        if not m:
            return None
        known = set(PixArtConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model override(s) {unknown} for {name}; allowed: {sorted(known)}")
        return PixArtConfig(**{**kind_defaults(m.group(1) or "pixart", m.group(2)), **overrides}).validate()

    def build(self, cfg: PixArtConfig) -> PixArt:
        return PixArt(cfg)

    def conditioning(self, cfg: PixArtConfig) -> ConditionSpec:
        return replace(TEXT, guidance=True) if cfg.guidance_embed else TEXT

    def example_batch(self, cfg: PixArtConfig, n: int, text_len: int | None = None,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        length = cfg.model_max_length if text_len is None else text_len
        return {"text_emb": torch.zeros(n, length, cfg.caption_channels, device=device),
                "text_mask": torch.ones(n, length, dtype=torch.bool, device=device)}

    def latent_shape(self, cfg: PixArtConfig, resolution: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        if resolution is None:
            return (cfg.in_channels, cfg.input_size, cfg.input_size)
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        step = VAE_DOWNSAMPLE * cfg.patch_size
        if h % step or w % step:
            raise ValueError(f"resolution {h}×{w} px is not a multiple of {step} (VAE ×{VAE_DOWNSAMPLE}, patch {cfg.patch_size})")
        return (cfg.in_channels, h // VAE_DOWNSAMPLE, w // VAE_DOWNSAMPLE)

    def image_tokens(self, cfg: PixArtConfig, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)

    def recognises(self, raw: RawWeights) -> bool:
        return looks_like_pixart(raw)

    def from_raw(self, raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
        return pixart_checkpoint(raw, overrides)

    def describe(self, cfg: PixArtConfig) -> str:
        return describe(cfg)

    def inherit_exclude(self, teacher_cfg: PixArtConfig, student_cfg: PixArtConfig) -> list[str]:
        """LiT: the self-attention projections (and a teacher's KV compression) when the attention kind or
        the self-attention heads change; cross-attention, MLP, embeddings and adaLN are inherited."""
        if teacher_cfg.attention != student_cfg.attention or teacher_cfg.self_heads != student_cfg.self_heads:
            return list(SELF_ATTENTION)
        return []

    def diffusers_linear_names(self, cfg: PixArtConfig) -> dict[str, list[tuple[str, Any]]]:
        return diffusers_linear_names(cfg)

    def check_pair(self, student_cfg: PixArtConfig, teacher_cfg: PixArtConfig) -> None:
        pairs = [(key, getattr(student_cfg, key), getattr(teacher_cfg, key)) for key in PAIR_KEYS]
        pairs.append(("pe_interpolation", student_cfg.pe_scale, teacher_cfg.pe_scale))
        for key, mine, theirs in pairs:
            if mine != theirs:
                raise ValueError(f"student/teacher mismatch: student.args.{key}={mine!r} but the teacher has {key}={theirs!r}; "
                                 f"set student.args.{key} to match")

    def flops(self, cfg: PixArtConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None) -> dict[str, float]:
        return static_flops(cfg, latent_hw, text_len)

    def realised_parts(self, cfg: PixArtConfig, aux: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                       text_len: int | None = None) -> dict[str, torch.Tensor]:
        return realised_parts(cfg, dict(aux), latent_hw, text_len)

    def param_group(self, name: str) -> str:
        """adaLN-single's shared `t_block` counts as adaLN (the base rule would call it an embedding)."""
        return "adaLN" if name.startswith("t_block.") else super().param_group(name)


PIXART = register_family(PixArtFamily())
