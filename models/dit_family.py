"""The DiT family on the family protocol: class-conditional DiT (facebookresearch/DiT) and its LiT,
DyDiT and DyLiT students.

Registry: `{dit,lit,dydit,dylit}-{s,b,l,xl}/{2,4,8}` — `dit-xl/2` *is* its configuration, as in DiT's
`DiT_models` table; keyword overrides build small configs (`depth=2, hidden_size=64, input_size=8`).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Mapping

import torch

from models.config import PATCHES, SIZES, DiTConfig
from models.dit import DiT
from models.convert_diffusers import diffusers_linear_names
from models.dit_convert import describe, dit_checkpoint, looks_like_dit
from models.family import CLASS_LABELS, Checkpoint, ConditionSpec, ModelFamily, register_family
from models.flops import block_cost, embed_cost, realised_parts, static_flops
from models.inherit import attention_exclude
from models.weights_io import RawWeights

KINDS = ("dit", "lit", "dydit", "dylit")
_NAME = re.compile(r"^(dit|lit|dydit|dylit)-(s|b|l|xl)/(2|4|8)$")
VAE_DOWNSAMPLE = 8  # the SD VAE DiT trains on


def kind_defaults(kind: str, size: str) -> dict[str, Any]:
    depth, hidden, heads, lit_heads = SIZES[size]
    base: dict[str, Any] = {"depth": depth, "hidden_size": hidden, "num_heads": heads}
    if kind in ("lit", "dylit"):
        base.update(attention="linear", num_heads=lit_heads, dwc_kernel=5)
    if kind in ("dydit", "dylit"):
        # DyLiT keeps LiT's few heads (so a trained LiT becomes a DyLiT exactly) but routes the MLP
        # in DiT's number of channel groups, where most of the FLOPs are.
        base.update(dynamic=True, mlp_groups=heads)
    return base


class DiTFamily(ModelFamily):
    name = "dit"
    config_cls = DiTConfig

    def names(self) -> list[str]:
        return [f"{k}-{s}/{p}" for k in KINDS for s in SIZES for p in PATCHES]

    def config(self, name: str, **overrides: Any) -> DiTConfig | None:
        m = _NAME.match(name.lower())
        if not m:
            return None
        kind, size, patch = m.group(1), m.group(2), int(m.group(3))
        known = set(DiTConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model override(s) {unknown} for {name}; allowed: {sorted(known)}")
        return DiTConfig(**{"patch_size": patch, **kind_defaults(kind, size), **overrides}).validate()

    def build(self, cfg: DiTConfig) -> DiT:
        return DiT(cfg)

    def conditioning(self, cfg: DiTConfig) -> ConditionSpec:
        return replace(CLASS_LABELS, guidance=True) if cfg.guidance_embed else CLASS_LABELS

    def eval_condition(self, model: DiT, n: int, batch: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """Classes 0, 1, … in turn, so a grid shows every class."""
        return model.condition({"y": torch.arange(n) % model.config.num_classes})

    def latent_shape(self, cfg: DiTConfig, resolution: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        if resolution is not None:
            h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
            if (h, w) != (cfg.input_size * VAE_DOWNSAMPLE,) * 2:
                raise ValueError(f"DiT's position embedding is fixed to a {cfg.input_size}² latent "
                                 f"({cfg.input_size * VAE_DOWNSAMPLE}px); got {h}×{w}px")
        return (cfg.in_channels, cfg.input_size, cfg.input_size)

    def image_tokens(self, cfg: DiTConfig, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)

    def recognises(self, raw: RawWeights) -> bool:
        return looks_like_dit(raw)

    def from_raw(self, raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
        return dit_checkpoint(raw, overrides)

    def describe(self, cfg: DiTConfig) -> str:
        return describe(cfg)

    def inherit_exclude(self, teacher_cfg: DiTConfig, student_cfg: DiTConfig) -> list[str]:
        return attention_exclude(teacher_cfg, student_cfg, ("blocks.*.attn.qkv.*", "blocks.*.attn.proj.*"))

    def diffusers_linear_names(self, cfg: DiTConfig) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
        return diffusers_linear_names(cfg.depth, cfg.hidden_size)

    def check_pair(self, student_cfg: DiTConfig, teacher_cfg: DiTConfig) -> None:
        for key in ("input_size", "in_channels", "learn_sigma", "num_classes", "patch_size"):
            if getattr(student_cfg, key) != getattr(teacher_cfg, key):
                raise ValueError(
                    f"student/teacher shape mismatch: student.args.{key}={getattr(student_cfg, key)!r} but the "
                    f"teacher has {key}={getattr(teacher_cfg, key)!r}; set student.args.{key} to match"
                )

    def flops(self, cfg: DiTConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None) -> dict[str, float]:
        n = None if latent_hw is None else self.image_tokens(cfg, latent_hw)
        b, e = block_cost(cfg, n), embed_cost(cfg, n)
        return {"attention": cfg.depth * b.attn, "mlp": cfg.depth * b.mlp, "adaLN": cfg.depth * b.adaln,
                "routers": cfg.depth * b.routers, "embeddings": e["patch_embed"] + e["t_embedder"],
                "final_layer": e["final_layer"], "total": static_flops(cfg, n)}

    def realised_parts(self, cfg: DiTConfig, aux: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                       text_len: int | None = None) -> dict[str, torch.Tensor]:
        return realised_parts(cfg, dict(aux))


DIT = register_family(DiTFamily())
