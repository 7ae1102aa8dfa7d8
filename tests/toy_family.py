"""A model family defined only here, outside `models/`: the proof that a new family touches no loop code.

"Toy" is deliberately unlike DiT where the protocol matters: two block stacks with their own names
(`encoder.i`, `decoder.i`, so `all_blocks()` spans stacks and no `blocks` attribute exists), flow
matching (C output channels, no learned σ), additive conditioning instead of adaLN, and the shared
student parts composed in (`attention: linear` gives a LiT-toy that inherits from a toy teacher).
It is registered as `tests.toy_family:toy`; its registry names are `tests.toy_family:toy-{s,m}` and
`tests.toy_family:lit-toy-s`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from models.attention import build_attention
from models.embeddings import TimestepEmbedder
from models.family import CLASS_LABELS, Checkpoint, ConditionSpec, ModelFamily, register_family
from models.flops import mlp_cost, self_attention_cost
from models.mlp import Mlp
from models.student import StudentOptions
from models.weights_io import CheckpointError, RawWeights, few

NAME = "tests.toy_family:toy"


@dataclass
class ToyConfig(StudentOptions):
    family: ClassVar[str] = NAME

    size: int = 8
    in_channels: int = 1
    hidden: int = 32
    heads: int = 2
    encoder_depth: int = 1
    decoder_depth: int = 1
    num_classes: int = 10

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def num_heads(self) -> int:
        return self.heads

    def validate(self) -> "ToyConfig":
        if self.hidden % self.heads:
            raise ValueError(f"model.heads={self.heads} must divide model.hidden={self.hidden}")
        self.validate_student(self.hidden, 4 * self.hidden, self.mlp_groups or self.heads)
        if self.dynamic:
            raise ValueError("model.dynamic=True: the toy family has no routers")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.attn = build_attention(cfg.attention, cfg.hidden, cfg.heads, cfg.dwc_kernel, cfg.linear_eps, cfg.kernels)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.mlp = Mlp(cfg.hidden, 4 * cfg.hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        x = x + c[:, None]
        x = x + self.attn(self.norm1(x), grid_hw)
        return x + self.mlp(self.norm2(x))


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Linear(cfg.in_channels, cfg.hidden)
        self.pos = nn.Parameter(torch.randn(1, cfg.size * cfg.size, cfg.hidden) * 0.02)
        self.time = TimestepEmbedder(cfg.hidden)
        self.label = nn.Embedding(cfg.num_classes + 1, cfg.hidden)  # last row: the null class
        self.encoder = nn.ModuleList([ToyBlock(cfg) for _ in range(cfg.encoder_depth)])
        self.decoder = nn.ModuleList([ToyBlock(cfg) for _ in range(cfg.decoder_depth)])
        self.out = nn.Linear(cfg.hidden, cfg.out_channels)

    def all_blocks(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    def condition(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"y": batch["y"]}

    def null_condition(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": torch.full_like(cond["y"], self.config.num_classes)}

    def drop_condition(self, cond: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": torch.where(drop, torch.full_like(cond["y"], self.config.num_classes), cond["y"])}

    def reset_routers(self) -> None:
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, return_aux: bool = False,
                complete: bool = False):
        b, c, h, w = x.shape
        tokens = self.embed(x.flatten(2).transpose(1, 2)) + self.pos
        cond = self.time(t) + self.label(y)
        for block in self.all_blocks():
            tokens = block(tokens, cond, (h, w))
        out = self.out(tokens).transpose(1, 2).reshape(b, c, h, w)
        return (out, {}) if return_aux else out


_NAME = re.compile(r"^(lit-)?toy-(s|m)$")
SIZES = {"s": dict(hidden=32, heads=2), "m": dict(hidden=48, heads=4)}


class ToyFamily(ModelFamily):
    name = NAME
    config_cls = ToyConfig
    block_prefixes = ("encoder.", "decoder.")
    timestep_module = "time"

    def names(self) -> list[str]:
        return [f"{NAME.split(':')[0]}:{p}toy-{s}" for p in ("", "lit-") for s in SIZES]

    def config(self, name: str, **overrides: Any) -> ToyConfig | None:
        m = _NAME.match(name)
        if not m:
            return None
        base = {**SIZES[m.group(2)], **({"attention": "linear"} if m.group(1) else {})}
        return ToyConfig(**{**base, **overrides}).validate()

    def build(self, cfg: ToyConfig) -> Toy:
        return Toy(cfg)

    def conditioning(self, cfg: ToyConfig) -> ConditionSpec:
        return CLASS_LABELS

    def latent_shape(self, cfg: ToyConfig, resolution=None) -> tuple[int, int, int]:
        return (cfg.in_channels, cfg.size, cfg.size)

    def image_tokens(self, cfg: ToyConfig, latent_hw: tuple[int, int]) -> int:
        return latent_hw[0] * latent_hw[1]

    def recognises(self, raw: RawWeights) -> bool:
        return "embed.weight" in raw.state_dict and any(k.startswith("decoder.") for k in raw.state_dict)

    def from_raw(self, raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
        if raw.ours is None:
            raise CheckpointError(f"{raw.source}: toy weights need our metadata")
        cfg = self.config_from_dict({**raw.ours, **overrides})
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in Toy(cfg).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in raw.state_dict.items()}
        if got != expected:
            raise CheckpointError(f"{raw.source}: does not fit {cfg}: {few(sorted(set(got) ^ set(expected)))}")
        return Checkpoint(dict(raw.state_dict), cfg, raw.format, raw.source)

    def inherit_exclude(self, teacher_cfg: ToyConfig, student_cfg: ToyConfig) -> list[str]:
        if teacher_cfg.attention != student_cfg.attention:
            return ["*.attn.qkv.*", "*.attn.proj.*"]
        return []

    def check_pair(self, student_cfg: ToyConfig, teacher_cfg: ToyConfig) -> None:
        for key in ("size", "in_channels", "num_classes"):
            if getattr(student_cfg, key) != getattr(teacher_cfg, key):
                raise ValueError(f"student/teacher shape mismatch: student.args.{key}; set it to {getattr(teacher_cfg, key)!r}")

    def flops(self, cfg: ToyConfig, latent_hw=None, text_len=None) -> dict[str, float]:
        n = cfg.size * cfg.size if latent_hw is None else latent_hw[0] * latent_hw[1]
        depth = cfg.encoder_depth + cfg.decoder_depth
        attn = depth * self_attention_cost(cfg.attention, n, cfg.hidden, cfg.hidden // cfg.heads, cfg.dwc_kernel)
        mlp = depth * mlp_cost(n, cfg.hidden, 4 * cfg.hidden)
        embed = n * cfg.in_channels * cfg.hidden + 256 * cfg.hidden + cfg.hidden**2
        final = n * cfg.hidden * cfg.out_channels
        return {"attention": attn, "mlp": mlp, "embeddings": embed, "final_layer": final,
                "total": attn + mlp + embed + final}

    def realised_flops(self, cfg: ToyConfig, aux, latent_hw, text_len=None) -> torch.Tensor:
        raise ValueError("the toy family has no dynamic students")


TOY = register_family(ToyFamily())
