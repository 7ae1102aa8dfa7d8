"""A tiny text-conditioned family defined only here: the text-to-image paths (prompts, T5 embeddings and
their mask, the null caption, a guidance input) exercised through the family protocol.

It is the toy family (`tests/toy_family.py`: two block stacks, flow or Gaussian with C output
channels) conditioned on text instead of a class: PixArt-Σ's kind ("text": `text_emb` (B, L, D) +
`text_mask` (B, L)), consumed by a masked mean of the projected tokens added to the timestep
embedding. The null caption lives in a buffer that `set_null_condition` fills with T5("") and, as
PixArt does, the unconditional half keeps the prompt's mask. `guidance_embed=True` gives a
guidance-distilled variant (told g, one forward per step). Registered as
`tests.toy_text_family:text-toy`; names `tests.toy_text_family:text-toy[-g]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from models.embeddings import TimestepEmbedder
from models.family import Checkpoint, ConditionSpec, register_family
from models.weights_io import CheckpointError, RawWeights, few
from tests.toy_family import ToyBlock, ToyConfig, ToyFamily

NAME = "tests.toy_text_family:text-toy"


@dataclass
class TextToyConfig(ToyConfig):
    family: ClassVar[str] = NAME

    text_dim: int = 32
    text_len: int = 16
    guidance_embed: bool = False


class TextToy(nn.Module):
    def __init__(self, cfg: TextToyConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Linear(cfg.in_channels, cfg.hidden)
        self.pos = nn.Parameter(torch.randn(1, cfg.size * cfg.size, cfg.hidden) * 0.02)
        self.time = TimestepEmbedder(cfg.hidden)
        self.guidance = TimestepEmbedder(cfg.hidden) if cfg.guidance_embed else None
        self.text_proj = nn.Linear(cfg.text_dim, cfg.hidden)
        self.encoder = nn.ModuleList([ToyBlock(cfg) for _ in range(cfg.encoder_depth)])
        self.decoder = nn.ModuleList([ToyBlock(cfg) for _ in range(cfg.decoder_depth)])
        self.out = nn.Linear(cfg.hidden, cfg.out_channels)
        self.register_buffer("null_emb", torch.zeros(cfg.text_len, cfg.text_dim))  # T5("") once set

    def all_blocks(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    def condition(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"text_emb": batch["text_emb"], "text_mask": batch["text_mask"]}

    def null_condition(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        emb = self.null_emb.to(cond["text_emb"].dtype).expand_as(cond["text_emb"])
        return {**cond, "text_emb": emb}  # PixArt: the null half keeps the prompt's mask

    def drop_condition(self, cond: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        null = self.null_condition(cond)
        return {**cond, "text_emb": torch.where(drop[:, None, None], null["text_emb"], cond["text_emb"])}

    def set_null_condition(self, null: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.null_emb.copy_(null["text_emb"].to(self.null_emb))

    def reset_routers(self) -> None:
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor, *,
                return_aux: bool = False, complete: bool = False, guidance: torch.Tensor | None = None):
        b, c, h, w = x.shape
        tokens = self.embed(x.flatten(2).transpose(1, 2)) + self.pos
        m = text_mask.to(text_emb.dtype).unsqueeze(-1)
        cond = self.time(t) + (self.text_proj(text_emb) * m).sum(1) / m.sum(1).clamp(min=1)
        if (guidance is None) != (self.guidance is None):
            raise ValueError("a model with a guidance input needs guidance=(B,) scales, and only such a model takes them")
        if self.guidance is not None:
            cond = cond + self.guidance(guidance.float() * 1000.0)
        for block in self.all_blocks():
            tokens = block(tokens, cond, (h, w))
        out = self.out(tokens).transpose(1, 2).reshape(b, c, h, w)
        return (out, {}) if return_aux else out


class TextToyFamily(ToyFamily):
    name = NAME
    config_cls = TextToyConfig

    def names(self) -> list[str]:
        return [f"{NAME.split(':')[0]}:text-toy", f"{NAME.split(':')[0]}:text-toy-g"]

    def config(self, name: str, **overrides: Any) -> TextToyConfig | None:
        if name not in ("text-toy", "text-toy-g"):
            return None
        return TextToyConfig(**{"guidance_embed": name.endswith("-g"), **overrides}).validate()

    def build(self, cfg: TextToyConfig) -> TextToy:
        return TextToy(cfg)

    def conditioning(self, cfg: TextToyConfig) -> ConditionSpec:
        return ConditionSpec("text", ("text_emb", "text_mask"), "text_emb", guidance=cfg.guidance_embed)

    def recognises(self, raw: RawWeights) -> bool:
        return "text_proj.weight" in raw.state_dict

    def from_raw(self, raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
        if raw.ours is None:
            raise CheckpointError(f"{raw.source}: text-toy weights need our metadata")
        cfg = self.config_from_dict({**raw.ours, **overrides})
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in TextToy(cfg).state_dict().items()}
        if {k: tuple(v.shape) for k, v in raw.state_dict.items()} != expected:
            raise CheckpointError(f"{raw.source}: does not fit {cfg}: {few(sorted(set(raw.state_dict) ^ set(expected)))}")
        return Checkpoint(dict(raw.state_dict), cfg, raw.format, raw.source)

    def check_pair(self, student_cfg: TextToyConfig, teacher_cfg: TextToyConfig) -> None:
        for key in ("text_dim", "text_len"):
            if getattr(student_cfg, key) != getattr(teacher_cfg, key):
                raise ValueError(f"student/teacher shape mismatch: student.args.{key}; set it to {getattr(teacher_cfg, key)!r}")
        super().check_pair(student_cfg, teacher_cfg)

    def flops(self, cfg: TextToyConfig, latent_hw=None, text_len=None) -> dict[str, float]:
        out = super().flops(cfg, latent_hw)
        text = (text_len or cfg.text_len) * cfg.text_dim * cfg.hidden  # the caption projection
        return {**out, "embeddings": out["embeddings"] + text, "total": out["total"] + text}


TEXT_TOY = register_family(TextToyFamily())
