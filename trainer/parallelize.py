"""Applied to a model from outside, as torchtitan does: activation checkpointing, then compile,
then sharding. The model definition knows nothing of these."""
from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint

from trainer.config import EngineConfig


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """Every stack's transformer blocks, in order (the family protocol's `all_blocks`)."""
    blocks = getattr(model, "all_blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `all_blocks()`: not a model of a registered family "
                        "(see models/family.py); cannot apply per-block wrapping")
    return list(blocks())


def apply_activation_checkpointing(model: nn.Module, cfg: EngineConfig) -> int:
    """Recompute student blocks in the backward pass (routers and linear attention included).

    The RNG state is preserved across the recompute, so Gumbel router noise is drawn identically
    twice. Returns the number of checkpointed blocks.
    """
    mode = cfg.activation_checkpointing
    if mode == "none":
        return 0
    n = 0
    for i, block in enumerate(blocks_of(model)):
        if mode == "full" or i % cfg.ac_every == 0:
            composable_checkpoint(block, preserve_rng_state=True)
            n += 1
    return n


def apply_compile(model: nn.Module, cfg: EngineConfig) -> None:
    """`torch.compile` each block in place (names and state dicts unchanged)."""
    if cfg.compile:
        for block in blocks_of(model):
            block.compile()
