"""The FLUX family on the family protocol: FLUX.1 teachers and their DyFLUX / LiT-FLUX students.

Registry: `{flux,lit-flux,dyflux,dylit-flux}-{dev,schnell,lite}` — `flux-dev` *is* its configuration;
keyword overrides build tiny test configs (`hidden_size=32, num_heads=2, depth=1, depth_single=2,
axes_dim=[4, 6, 6], context_in_dim=32, vec_in_dim=24`). Conditioning: T5 embeddings + CLIP pooled
vector (`text_pooled`), no mask; a guidance input for dev and lite (guidance-distilled), none for
schnell. Objective: rectified flow only (C output channels, FLUX's velocity).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from models.family import Checkpoint, ConditionSpec, ModelFamily, register_family
from models.flux import Flux
from models.flux_config import BASES, KINDS, VAE_DOWNSAMPLE, FluxConfig, kind_defaults
from models.flux_convert import describe, diffusers_linear_names, flux_checkpoint, looks_like_flux
from models.flux_flops import block_costs, fused_share, realised_parts, static_flops
from models.weights_io import RawWeights

_NAME = re.compile(rf"^({'|'.join(KINDS)})-({'|'.join(BASES)})$")


class FluxFamily(ModelFamily):
    name = "flux"
    config_cls = FluxConfig
    block_prefixes = ("double_blocks.", "single_blocks.")
    # the embedding the width routers and TD-LoRA's gates read: t's, plus g's in guidance-distilled models
    timestep_module = ("time_in", "guidance_in")

    def names(self) -> list[str]:
        return [f"{k}-{b}" for k in KINDS for b in BASES]

    def config(self, name: str, **overrides: Any) -> FluxConfig | None:
        m = _NAME.match(name.lower())
        if not m:
            return None
        known = set(FluxConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model override(s) {unknown} for {name}; allowed: {sorted(known)}")
        return FluxConfig(**{**kind_defaults(m.group(1), m.group(2)), **overrides}).validate()

    def config_from_dict(self, d: Mapping[str, Any]) -> FluxConfig:
        d = dict(d)
        if "axes_dim" in d:
            d["axes_dim"] = [int(a) for a in d["axes_dim"]]
        return super().config_from_dict(d)

    def build(self, cfg: FluxConfig) -> Flux:
        return Flux(cfg)

    def conditioning(self, cfg: FluxConfig) -> ConditionSpec:
        return ConditionSpec("text_pooled", ("text_emb", "text_pooled"), "text_emb", guidance=cfg.guidance_embed)

    def objectives(self, cfg: FluxConfig) -> tuple[str, ...]:
        return ("flow",)

    def example_batch(self, cfg: FluxConfig, n: int, text_len: int | None = None,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        length = cfg.text_len if text_len is None else text_len
        return {"text_emb": torch.zeros(n, length, cfg.context_in_dim, device=device),
                "text_mask": torch.ones(n, length, dtype=torch.bool, device=device),
                "text_pooled": torch.zeros(n, cfg.vec_in_dim, device=device)}

    def latent_shape(self, cfg: FluxConfig, resolution: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        if resolution is None:
            return (cfg.in_channels, cfg.input_size, cfg.input_size)
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        step = VAE_DOWNSAMPLE * cfg.patch_size
        if h % step or w % step:
            raise ValueError(f"FLUX images need sides divisible by {step} px (8× VAE, 2×2 patches); got {h}×{w}")
        return (cfg.in_channels, h // VAE_DOWNSAMPLE, w // VAE_DOWNSAMPLE)

    def image_tokens(self, cfg: FluxConfig, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)

    def recognises(self, raw: RawWeights) -> bool:
        return looks_like_flux(raw)

    def from_raw(self, raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
        return flux_checkpoint(raw, overrides)

    def describe(self, cfg: FluxConfig) -> str:
        return describe(cfg)

    def inherit_exclude(self, teacher_cfg: FluxConfig, student_cfg: FluxConfig) -> list[str]:
        """The null-text buffers always (the trainer attaches the data's T5("") / CLIP(""), whose length
        the teacher's file cannot know); LiT: every attention projection (and its QK-norm scales) when the
        attention kind or the heads change — in a single block the q, k, v rows of `linear1` and the
        attention columns of `linear2`, partial exclusions of the fused tensors (the MLP rows and columns
        are inherited)."""
        null = ["null_text_emb", "null_text_pooled"]  # the data's null caption, attached by the trainer
        if teacher_cfg.attention == student_cfg.attention and teacher_cfg.num_heads == student_cfg.num_heads:
            return null
        d = student_cfg.hidden_size
        return [*null, "double_blocks.*.img_attn.*", "double_blocks.*.txt_attn.*", "single_blocks.*.norm.*",
                f"single_blocks.*.linear1.weight@rows=0:{3 * d}", f"single_blocks.*.linear1.bias@rows=0:{3 * d}",
                f"single_blocks.*.linear2.weight@cols=0:{d}"]

    def diffusers_linear_names(self, cfg: FluxConfig) -> dict[str, list[tuple[str, Any]]]:
        return diffusers_linear_names(cfg)

    def check_pair(self, student_cfg: FluxConfig, teacher_cfg: FluxConfig) -> None:
        """Same inputs and outputs. A guidance input may differ: a student with one distils a teacher
        without one by guidance distillation (FLUX-dev's making; the trainer validates that pairing)."""
        for key in ("in_channels", "patch_size", "context_in_dim", "vec_in_dim"):
            if getattr(student_cfg, key) != getattr(teacher_cfg, key):
                raise ValueError(
                    f"student/teacher shape mismatch: student.args.{key}={getattr(student_cfg, key)!r} but the "
                    f"teacher has {key}={getattr(teacher_cfg, key)!r}; set student.args.{key} to match"
                )

    def param_group(self, name: str) -> str:
        if any(k in name for k in ("_rate.", "token_selection")):
            return "routers"
        if name.startswith(self.block_prefixes) and any(k in name for k in ("_mod.", "modulation.")):
            return "adaLN"
        if name.startswith("single_blocks.") and ".norm." in name:
            return "attention"
        return super().param_group(name)

    def param_split(self, cfg: FluxConfig, name: str, shape: tuple[int, ...]) -> dict[str, int]:
        """Single blocks' fused `linear1` rows [q | k | v | mlp] and `linear2` columns [attention | mlp]
        split into attention and MLP parameters (the fused output bias counts as attention)."""
        m = re.match(r"^single_blocks\.\d+\.linear([12])\.(weight|bias)$", name)
        if not m:
            return super().param_split(cfg, name, shape)
        d, dm = cfg.hidden_size, cfg.mlp_hidden
        if m.group(1) == "1":
            per_row = shape[1] if len(shape) == 2 else 1
            return {"attention": 3 * d * per_row, "mlp": dm * per_row}
        if len(shape) == 2:
            return {"attention": d * d, "mlp": d * dm}
        return {"attention": d}

    def flops(self, cfg: FluxConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None) -> dict[str, float]:
        return static_flops(cfg, latent_hw, text_len)

    def realised_parts(self, cfg: FluxConfig, aux: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                       text_len: int | None = None) -> dict[str, torch.Tensor]:
        return realised_parts(cfg, dict(aux), cfg.text_len if text_len is None else text_len)

    def fused_share(self, cfg: FluxConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None,
                    aux: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        return fused_share(cfg, latent_hw, text_len, None if aux is None else dict(aux))

    def block_costs(self, cfg: FluxConfig, latent_hw: tuple[int, int] | None = None, text_len: int | None = None):
        """Per-block-type costs (benchmarks and `launch.info`)."""
        n_img = self.image_tokens(cfg, latent_hw or (cfg.input_size, cfg.input_size))
        return block_costs(cfg, n_img, cfg.text_len if text_len is None else text_len)


FLUX = register_family(FluxFamily())
