"""The one configuration of the DiT family: teacher and students are the same classes.

A teacher is the static softmax configuration; a LiT student flips `attention="linear"`, a DyDiT
student flips `dynamic=True`, a DyLiT student flips both (the switches are `StudentOptions`, shared by
every family). Everything else (sizes, names) is shared, which is what makes weight inheritance a
name-for-name copy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from models.student import ATTENTION_KINDS, StudentOptions, TransformerWidths

__all__ = ["ATTENTION_KINDS", "DiTConfig", "PATCHES", "SIZES"]

# DiT's sizes: (depth, hidden, DiT heads, LiT heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "s": (12, 384, 6, 2),
    "b": (12, 768, 12, 3),
    "l": (24, 1024, 16, 4),
    "xl": (28, 1152, 16, 4),
}
PATCHES = (2, 4, 8)


@dataclass
class DiTConfig(StudentOptions, TransformerWidths):
    family: ClassVar[str] = "dit"

    input_size: int = 32  # latent side (256px images with an 8x VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    # Only sizes the extra "null" class row used for classifier-free guidance; the trainer draws the
    # dropout itself so that teacher and student see the same labels.
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    # a guidance input (as FLUX-dev's): the model is told the guidance scale g and, guidance-distilled
    # from a teacher's classifier-free-guided output, samples with one forward per step instead of two
    guidance_embed: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def validate(self) -> "DiTConfig":
        """Raise ValueError naming the field, its value and what is allowed."""

        def bad(key: str, allowed: str) -> None:
            raise ValueError(f"model.{key}={getattr(self, key)!r} is invalid: {allowed}")

        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, key) <= 0:
                bad(key, "must be a positive integer")
        if self.input_size % self.patch_size:
            bad("input_size", f"must be divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            bad("num_heads", f"must divide hidden_size={self.hidden_size} (pass num_heads=... with hidden_size)")
        if self.hidden_size % 2:
            bad("hidden_size", "must be even (2-D sin-cos position embedding)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            bad("class_dropout_prob", "in [0, 1)")
        self.validate_student(self.hidden_size, self.mlp_hidden, self.groups)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**d).validate()
