"""The one configuration of the FLUX family: FLUX.1 teachers and their DyFLUX / LiT-FLUX students.

Sizes are BFL's (`src/flux/util.py`): 19 double-stream then 38 single-stream blocks, hidden 3072,
24 heads of 128, MLP ratio 4, qkv bias, 3-axis RoPE (θ 10000, axes 16/56/56), T5 4096-d and CLIP
768-d inputs. `in_channels` is the latent's (16); the model packs 2×2 patches into 64 channels
itself. A student flips the shared `StudentOptions` (`attention: linear`, `dynamic: true`) and the
two FLUX-specific switches below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, List

from models.student import StudentOptions, TransformerWidths

# base → (double blocks, guidance embedding, T5 tokens). flux-lite is Freepik's FLUX.1-lite-8B, the
# base DyFLUX was built on: FLUX.1-dev with 8 of its 19 double blocks.
BASES: dict[str, tuple[int, bool, int]] = {"dev": (19, True, 512), "schnell": (19, False, 256), "lite": (8, True, 512)}
KINDS = ("flux", "lit-flux", "dyflux", "dylit-flux")
SINGLE_TOKEN_SKIPS = ("output", "mlp")
VAE_DOWNSAMPLE = 8  # FLUX's 16-channel autoencoder


@dataclass
class FluxConfig(StudentOptions, TransformerWidths):
    family: ClassVar[str] = "flux"

    in_channels: int = 16  # latent channels; patch_size² of them are packed per token
    patch_size: int = 2
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream (MMDiT) blocks
    depth_single: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0
    axes_dim: List[int] = field(default_factory=lambda: [16, 56, 56])  # RoPE channels per id axis
    theta: float = 10000.0
    qkv_bias: bool = True
    vec_in_dim: int = 768  # CLIP-L pooled vector
    context_in_dim: int = 4096  # T5-XXL
    guidance_embed: bool = True  # dev, lite: guidance-distilled (a guidance input); schnell: none
    # The guidance value a guidance-embedded model uses when a call passes none (diffusers' pipeline
    # default), so teacher and student agree until the training step draws one per sample.
    guidance_default: float = 3.5
    input_size: int = 128  # native latent side (1024 px): FLOPs and sample grids
    text_len: int = 512  # T5 tokens the model is fed (dev 512, schnell 256): the null condition's length
    # LiT-FLUX: rotate the linear-attention numerator's features by RoPE (False: no RoPE at all).
    linear_rope: bool = True
    # DyFLUX single blocks: what an image token the token router leaves out skips. "output": the whole
    # fused output projection (its attention output discarded too), as released; "mlp": only the MLP share.
    single_token_skip: str = "output"

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def packed_channels(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def num_blocks(self) -> int:
        return self.depth + self.depth_single

    def validate(self) -> "FluxConfig":
        """Raise ValueError naming the field, its value and what is allowed."""

        def bad(key: str, allowed: str) -> None:
            raise ValueError(f"model.{key}={getattr(self, key)!r} is invalid: {allowed}")

        for key in ("in_channels", "patch_size", "hidden_size", "num_heads", "vec_in_dim", "context_in_dim",
                    "input_size", "text_len"):
            if getattr(self, key) <= 0:
                bad(key, "must be a positive integer")
        for key in ("depth", "depth_single"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.depth + self.depth_single == 0:
            bad("depth", "the model needs at least one block (depth + depth_single >= 1)")
        if self.hidden_size % self.num_heads:
            bad("num_heads", f"must divide hidden_size={self.hidden_size} (pass num_heads=... with hidden_size)")
        if self.input_size % self.patch_size:
            bad("input_size", f"must be divisible by patch_size={self.patch_size}")
        if not self.axes_dim or any(int(a) <= 0 or int(a) % 2 for a in self.axes_dim):
            bad("axes_dim", "a list of positive even channel counts, one per position-id axis (FLUX: [16, 56, 56])")
        if sum(self.axes_dim) > self.head_dim:
            bad("axes_dim", f"its sum {sum(self.axes_dim)} exceeds the head width {self.head_dim} "
                            "(hidden_size / num_heads); RoPE rotates at most a whole head")
        if len(self.axes_dim) != 3:
            bad("axes_dim", "three axes: FLUX's position ids are (0, row, col) for image tokens")
        if self.theta <= 0:
            bad("theta", "must be > 0")
        if self.mlp_ratio <= 0:
            bad("mlp_ratio", "must be > 0")
        if self.single_token_skip not in SINGLE_TOKEN_SKIPS:
            bad("single_token_skip", f"one of {SINGLE_TOKEN_SKIPS}")
        self.validate_student(self.hidden_size, self.mlp_hidden, self.groups)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dim"] = [int(a) for a in self.axes_dim]
        return d


def kind_defaults(kind: str, base: str) -> dict[str, Any]:
    """The config fields of registry model `<kind>-<base>` (e.g. `dyflux-lite`)."""
    depth, guidance, text_len = BASES[base]
    out: dict[str, Any] = {"depth": depth, "guidance_embed": guidance, "text_len": text_len}
    if kind in ("lit-flux", "dylit-flux"):
        # LiT: joint linear attention with the 5×5 DWC on image tokens; FLUX's 24 heads are kept by
        # default (RoPE's 128-channel layout stays whole), fewer heads are an override (num_heads=6).
        out.update(attention="linear", dwc_kernel=5)
    if kind in ("dyflux", "dylit-flux"):
        # The released DyFLUX token router starts from bias 5 (nearly every token kept under its
        # Gumbel noise at τ = 5); the width routers use DyDiT's "all on" bias.
        out.update(dynamic=True, token_router_bias=5.0)
    return out
