"""Choose between the Triton kernels and their PyTorch references.

Models call `get_ops(mode, device)` and use what it returns; they never import a kernel directly.
`auto` takes Triton only on CUDA with Triton importable, the reference everywhere else; `triton`
asks for it explicitly (on the CPU that needs TRITON_INTERPRET=1, which is how the tests run it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from models.kernels import reference

KERNEL_MODES = ("auto", "triton", "reference")


@dataclass(frozen=True)
class KernelOps:
    name: str
    linear_attention: Callable[..., torch.Tensor]
    modulate_layernorm: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]
    gather_tokens: Callable[..., torch.Tensor]
    scatter_add_tokens: Callable[..., torch.Tensor]


REFERENCE_OPS = KernelOps(
    name="reference",
    linear_attention=reference.linear_attention,
    modulate_layernorm=reference.modulate_layernorm,
    gated_residual=reference.gated_residual,
    gather_tokens=reference.gather_tokens,
    scatter_add_tokens=reference.scatter_add_tokens,
)


def _triton_ops() -> KernelOps:
    from models.kernels import triton_ops  # imported lazily: importing Triton is slow and optional

    return triton_ops.TRITON_OPS


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_ops(mode: str = "auto", device: torch.device | str | None = None) -> KernelOps:
    """The op set for `mode` on `device` (see the module docstring for the rule).

    Called per forward with the activations' device, so a model built on the CPU and moved to a GPU
    picks up the kernels. Not memoised: the choice is a few comparisons (Triton's import is cached
    by Python), and torch.compile traces it as plain code (an lru_cache it would only warn about).
    """
    dev_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return _resolve(mode, dev_type)


def _resolve(mode: str, dev_type: str) -> KernelOps:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not one of {KERNEL_MODES}")
    if mode == "reference":
        return REFERENCE_OPS
    if mode == "auto":
        return _triton_ops() if dev_type == "cuda" and triton_available() else REFERENCE_OPS
    if not triton_available():
        raise RuntimeError("kernels=triton but Triton is not importable; use kernels=reference or install triton")
    return _triton_ops()
