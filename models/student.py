"""The student switches every family shares: LiT's linear attention, DyDiT's routers, the kernels.

A family's config dataclass inherits `StudentOptions`, so a teacher is the static softmax
configuration and a student flips `attention="linear"` and/or `dynamic=True` in any family, with the
same keys, defaults and checks (the machinery they switch on lives once in `models/attention.py`,
`models/dynamic.py` and `models/flops.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ATTENTION_KINDS = ("softmax", "linear")
KERNEL_MODES = ("auto", "triton", "reference")


@dataclass
class StudentOptions:
    # LiT: linear attention (ReLU kernel, eps normaliser) with a depth-wise conv on V over the token grid.
    attention: str = "softmax"
    dwc_kernel: int = 5
    linear_eps: float = 1e-6
    # DyDiT: timestep-wise dynamic width (heads, MLP channel groups) and spatial dynamic tokens.
    dynamic: bool = False
    mlp_groups: Optional[int] = None  # MLP channel groups; None = the number of heads (as DyDiT)
    router_tau: float = 5.0
    router_threshold: float = 0.5
    width_router_bias: float = 15.0
    token_router_bias: float = 35.0
    token_router_reduction: int = 16
    token_routing: bool = True  # SDT on/off (TDW alone when False)
    # Fused kernels: auto | triton | reference (see models/kernels/dispatch.py).
    kernels: str = "auto"

    def validate_student(self, hidden_size: int, mlp_hidden: int, groups: int) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""

        def bad(key: str, allowed: str) -> None:
            raise ValueError(f"model.{key}={getattr(self, key)!r} is invalid: {allowed}")

        if self.attention not in ATTENTION_KINDS:
            bad("attention", f"one of {ATTENTION_KINDS}")
        if self.dwc_kernel < 0 or (self.dwc_kernel and self.dwc_kernel % 2 == 0):
            bad("dwc_kernel", "0 (no DWC) or an odd kernel size such as 5")
        if mlp_hidden % groups:
            bad("mlp_groups", f"must divide the MLP width {mlp_hidden}")
        if self.router_tau <= 0:
            bad("router_tau", "must be > 0")
        if not 0.0 < self.router_threshold < 1.0:
            bad("router_threshold", "in (0, 1)")
        if hidden_size // self.token_router_reduction < 1:
            bad("token_router_reduction", f"must be <= hidden_size={hidden_size}")
        if self.kernels not in KERNEL_MODES:
            bad("kernels", "one of auto | triton | reference")


class TransformerWidths:
    """Derived widths of a config with `hidden_size`, `num_heads`, `mlp_ratio` and `mlp_groups`."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    mlp_groups: Optional[int]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def groups(self) -> int:
        """MLP channel groups of a dynamic student (DyDiT: one per head unless set)."""
        return self.mlp_groups or self.num_heads
