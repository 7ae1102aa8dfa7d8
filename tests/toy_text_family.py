"""A tiny text-conditioned family defined only here: the text-to-image paths (prompts, T5 embeddings and
their mask, the null caption, a guidance input) exercised through the family protocol.

Conditioning is PixArt-Σ's kind ("text": `text_emb` (B, L, D) + `text_mask` (B, L)), consumed by a
masked mean of the projected tokens added to the timestep embedding; the null caption lives in
buffers that `set_null_condition` fills with T5("") and, as PixArt does, the unconditional half keeps
the prompt's mask. `guidance_embed=True` gives a guidance-distilled variant (told g, one forward per
step). Registered as `tests.toy_text_family:text-toy`; names `tests.toy_text_family:text-toy[-g]`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from models.embeddings import TimestepEmbedder
from models.family import Checkpoint, ConditionSpec, ModelFamily, register_family
from models.flops import mlp_cost, self_attention_cost
from models.student import StudentOptions
from models.weights_io import CheckpointError, RawWeights, few
from tests.toy_family import ToyBlock

NAME = "tests.toy_text_family:text-toy"
TEXT = ConditionSpec("text", ("text_emb", "text_mask"), "text_emb")


@dataclass
class TextToyConfig(StudentOptions):
    family: ClassVar[str] = NAME

    size: int = 8
    in_channels: int = 1
    hidden: int = 32
    heads: int = 2
    depth: int = 2
    text_dim: int = 32
    text_len: int = 16
    guidance_embed: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def num_heads(self) -> int:
        return self.heads

    def validate(self) -> "TextToyConfig":
        if self.hidden % self.heads:
            raise ValueError(f"model.heads={self.heads} must divide model.hidden={self.hidden}")
        self.validate_student(self.hidden, 4 * self.hidden, self.mlp_groups or self.heads)
        if self.dynamic:
            raise ValueError("model.dynamic=True: the text toy has no routers")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        self.blocks = nn.ModuleList([ToyBlock(cfg) for _ in range(cfg.depth)])
        self.out = nn.Linear(cfg.hidden, cfg.out_channels)
        self.register_buffer("null_emb", torch.zeros(cfg.text_len, cfg.text_dim))  # T5("") once set

    def all_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

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
        text = (self.text_proj(text_emb) * m).sum(1) / m.sum(1).clamp(min=1)
        cond = self.time(t) + text
        if self.guidance is not None:
            if guidance is None:
                raise ValueError("this model has a guidance input: pass guidance=(B,) scales")
            cond = cond + self.guidance(guidance.float() * 1000.0)
        elif guidance is not None:
            raise ValueError("guidance given to a model without a guidance input")
        for block in self.blocks:
            tokens = block(tokens, cond, (h, w))
        out = self.out(tokens).transpose(1, 2).reshape(b, c, h, w)
        return (out, {}) if return_aux else out


class TextToyFamily(ModelFamily):
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
        return ConditionSpec(TEXT.kind, TEXT.batch_keys, TEXT.data_cond, guidance=cfg.guidance_embed)

    def latent_shape(self, cfg: TextToyConfig, resolution=None) -> tuple[int, int, int]:
        return (cfg.in_channels, cfg.size, cfg.size)

    def image_tokens(self, cfg: TextToyConfig, latent_hw: tuple[int, int]) -> int:
        return latent_hw[0] * latent_hw[1]

    def recognises(self, raw: RawWeights) -> bool:
        return "text_proj.weight" in raw.state_dict

    def from_raw(self, raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
        if raw.ours is None:
            raise CheckpointError(f"{raw.source}: text-toy weights need our metadata")
        cfg = self.config_from_dict({**raw.ours, **overrides})
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in TextToy(cfg).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in raw.state_dict.items()}
        if got != expected:
            raise CheckpointError(f"{raw.source}: does not fit {cfg}: {few(sorted(set(got) ^ set(expected)))}")
        return Checkpoint(dict(raw.state_dict), cfg, raw.format, raw.source)

    def check_pair(self, student_cfg: TextToyConfig, teacher_cfg: TextToyConfig) -> None:
        for key in ("size", "in_channels", "text_dim", "text_len"):
            if getattr(student_cfg, key) != getattr(teacher_cfg, key):
                raise ValueError(f"student/teacher shape mismatch: student.args.{key}; set it to {getattr(teacher_cfg, key)!r}")

    def flops(self, cfg: TextToyConfig, latent_hw=None, text_len=None) -> dict[str, float]:
        n = cfg.size * cfg.size if latent_hw is None else latent_hw[0] * latent_hw[1]
        attn = cfg.depth * self_attention_cost(cfg.attention, n, cfg.hidden, cfg.hidden // cfg.heads, cfg.dwc_kernel)
        mlp = cfg.depth * mlp_cost(n, cfg.hidden, 4 * cfg.hidden)
        embed = n * cfg.in_channels * cfg.hidden + (text_len or cfg.text_len) * cfg.text_dim * cfg.hidden
        final = n * cfg.hidden * cfg.out_channels
        return {"attention": attn, "mlp": mlp, "embeddings": embed, "final_layer": final, "total": attn + mlp + embed + final}

    def realised_flops(self, cfg: TextToyConfig, aux, latent_hw, text_len=None) -> torch.Tensor:
        raise ValueError("the text toy has no dynamic students")


TEXT_TOY = register_family(TextToyFamily())
