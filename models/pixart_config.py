"""The one configuration of the PixArt-Σ family: teacher and students are the same classes.

`pixart-sigma-xl/2` is PixArt-alpha/PixArt-sigma's `PixArtMS_XL_2` (28 blocks, hidden 1152, 16 heads,
patch 2, 4 → 8 channels with learned σ, T5-XXL captions of 300 tokens, 4096 channels). A LiT student
flips `attention="linear"` with `attn_heads=2` self-attention heads (its cross-attention keeps the
teacher's `num_heads`, so those weights are inherited as they are); a DyDiT student flips
`dynamic=True`; DyLiT both (`StudentOptions`, shared by every family).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, List, Optional

from models.student import StudentOptions

VAE_DOWNSAMPLE = 8  # the SDXL VAE PixArt-Σ uses
PE_BASE_RESOLUTION = 512  # pe_interpolation = resolution / 512 (PixArt-Σ's lewei scale)
# registry sizes: (depth, hidden, heads)
SIZES = {"xl": (28, 1152, 16)}
LIT_HEADS = 2  # LiT's self-attention heads for PixArt-Σ (cross-attention keeps the teacher's)


@dataclass
class PixArtConfig(StudentOptions):
    family: ClassVar[str] = "pixart"

    input_size: int = 128  # latent side of the training resolution (1024 px); sets the position grid
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16  # cross-attention heads, and self-attention heads unless `attn_heads` is set
    attn_heads: Optional[int] = None  # self-attention heads (LiT: 2); None = num_heads
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    caption_channels: int = 4096  # T5-XXL width
    model_max_length: int = 300  # caption tokens (rows of the null caption `y_embedding`)
    pe_interpolation: Optional[float] = None  # None: input_size·8 / 512 (0.5, 1, 2, 4 at 256 … 2048 px)
    # PixArt-Σ's KV-token compression (softmax self-attention of these blocks only)
    kv_compress_layers: Optional[List[int]] = None
    kv_compress_scale: int = 2
    # DyDiT: also route the cross-attention heads (a router per block on the timestep embedding). Off by
    # default: cross-attention is 12 % of a teacher block's FLOPs at 1024² (6 % at 2048², 17 % in LiT),
    # so λ = 0.6 is reachable without it, and it is the only path from the caption to the image; the
    # measurement of both variants on the captioned-digits test bed is `launch.benchmark pixart-routing`.
    cross_attn_routing: bool = False
    # a guidance input (as DiT's and FLUX-dev's): the model is told the guidance scale g (a `g_embedder`
    # fed g·1000 added to the timestep embedding that drives adaLN-single and the final layer) and,
    # guidance-distilled from a teacher's classifier-free-guided output, samples with one forward per step
    guidance_embed: bool = False

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def self_heads(self) -> int:
        return self.attn_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.self_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def groups(self) -> int:
        return self.mlp_groups or self.num_heads

    @property
    def grid_size(self) -> int:
        """The position grid's base side: the training latent over the patch (PixArt's `base_size`)."""
        return self.input_size // self.patch_size

    @property
    def pe_scale(self) -> float:
        if self.pe_interpolation is not None:
            return float(self.pe_interpolation)
        return self.input_size * VAE_DOWNSAMPLE / PE_BASE_RESOLUTION

    @property
    def kv_layers(self) -> tuple[int, ...]:
        return tuple(self.kv_compress_layers or ())

    def validate(self) -> "PixArtConfig":
        """Raise ValueError naming the field, its value and what is allowed."""

        def bad(key: str, allowed: str) -> None:
            raise ValueError(f"model.{key}={getattr(self, key)!r} is invalid: {allowed}")

        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                    "model_max_length"):
            if getattr(self, key) <= 0:
                bad(key, "must be a positive integer")
        if self.input_size % self.patch_size:
            bad("input_size", f"must be divisible by patch_size={self.patch_size}")
        if self.hidden_size % 4:
            bad("hidden_size", "must be a multiple of 4 (the 2-D sin-cos position embedding has four equal parts)")
        if self.hidden_size % self.num_heads:
            bad("num_heads", f"must divide hidden_size={self.hidden_size} (pass num_heads=... with hidden_size)")
        if self.attn_heads is not None and (self.attn_heads <= 0 or self.hidden_size % self.attn_heads):
            bad("attn_heads", f"a positive divisor of hidden_size={self.hidden_size}, or None (= num_heads)")
        if self.pe_interpolation is not None and self.pe_interpolation <= 0:
            bad("pe_interpolation", "must be > 0 (resolution / 512), or None to derive it from input_size")
        if self.kv_compress_layers:
            self.kv_compress_layers = sorted(set(int(i) for i in self.kv_compress_layers))
            if not all(0 <= i < self.depth for i in self.kv_compress_layers):
                bad("kv_compress_layers", f"block indices in [0, {self.depth})")
            if self.kv_compress_scale < 2:
                bad("kv_compress_scale", "an integer >= 2 (PixArt-Σ uses 2)")
            if self.attention != "softmax" or self.dynamic:
                bad("kv_compress_layers", "KV compression is a softmax-teacher option: LiT's linear attention is already "
                    "linear in the tokens, and its LayerNorm spans every head, so DyDiT could not slice heads there; "
                    "remove it for students")
        if self.cross_attn_routing and not self.dynamic:
            bad("cross_attn_routing", "routes heads with DyDiT's routers: set dynamic=true as well")
        self.validate_student(self.hidden_size, self.mlp_hidden, self.groups)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
