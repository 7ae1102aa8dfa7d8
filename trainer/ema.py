"""EMA of the student, sharded exactly like the student (it is a copy wrapped the same way).

The decay warms up as min(decay, (1+t)/(10+t)): with a fixed 0.9999 a run of a few thousand steps
would keep an EMA that is mostly its initial weights.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.config import EMAConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of an FSDP2 DTensor parameter (EMA and student shard identically)."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, student: nn.Module, ema_module: nn.Module, cfg: EMAConfig) -> None:
        self.module = ema_module
        self.student = student
        self.cfg = cfg
        s_names = {n for n, p in student.named_parameters() if p.requires_grad}
        self._pairs: list[tuple[str, str]] = []
        for name, _ in ema_module.named_parameters():
            src = name if name in s_names else f"module.{name}"  # DDP prefixes "module."
            if src in s_names:
                self._pairs.append((name, src))
        missing = s_names - {s for _, s in self._pairs}
        if missing:
            raise KeyError(f"student parameters without an EMA counterpart: {sorted(missing)[:5]}")

    def decay_at(self, step: int) -> float:
        if not self.cfg.warmup:
            return self.cfg.decay
        return min(self.cfg.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.cfg.every:
            return
        e = dict(self.module.named_parameters())
        s = dict(self.student.named_parameters())
        dst = [_local(e[a]) for a, _ in self._pairs]
        src = [_local(s[b]).detach().to(d.dtype) for (_, b), d in zip(self._pairs, dst)]
        torch._foreach_lerp_(dst, src, 1.0 - self.decay_at(step))
