"""Feature distillation: the outputs of chosen modules of the student regress the teacher's.

Modules are chosen by name pattern (fnmatch over `named_modules()`, e.g. `blocks.*.attn` for every
attention output of a DiT, or FLUX's single blocks' attention), so any family's layers can be
matched without the family knowing; forward hooks record the outputs during the distillation step
only. CLEAR distils FLUX with 0.5 × output MSE + 0.5 × attention-output MSE on every fourth single
block (`../shared/T2I.md` §7). Works with the teacher sharded by FSDP2 (hooks see the unsharded
activations every rank computes) and with activation checkpointing (a replay overwrites the record
after the loss has used it).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn


def matching_modules(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    patterns = list(patterns)
    return [name for name, _ in model.named_modules() if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


class FeatureTaps:
    """Hooks on the student's and the teacher's modules of the same names; `losses()` per layer."""

    def __init__(self, student: nn.Module, teacher: nn.Module, patterns: list[str]) -> None:
        self.names = matching_modules(student, patterns)
        if not self.names:
            raise ValueError(f"distill.features={patterns} matches no module of the student")
        teacher_modules = dict(teacher.named_modules())
        missing = [n for n in self.names if n not in teacher_modules]
        if missing:
            raise ValueError(f"distill.features: the teacher has no module {missing[0]!r} (matched in the student)")
        self.active = False
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        student_modules = dict(student.named_modules())
        self._handles = []
        for name in self.names:
            self._handles.append(student_modules[name].register_forward_hook(self._hook(self.student_out, name)))
            self._handles.append(teacher_modules[name].register_forward_hook(self._hook(self.teacher_out, name)))

    def _hook(self, store: dict[str, torch.Tensor], name: str):
        def hook(module: nn.Module, args, output) -> None:
            if self.active:
                store[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def losses(self) -> dict[str, torch.Tensor]:
        """Per-sample MSE (B,) of each tapped module's output, in fp32; the records are then cleared."""
        out = {}
        for name in self.names:
            s, t = self.student_out.pop(name, None), self.teacher_out.pop(name, None)
            if s is None or t is None:
                raise RuntimeError(f"distill.features: module {name!r} did not run in the "
                                   f"{'student' if s is None else 'teacher'}'s forward")
            if t.shape[0] == 2 * s.shape[0]:  # guidance distillation ran the teacher on [cond; null]: the cond half
                t = t[: s.shape[0]]
            if s.shape != t.shape:
                raise ValueError(f"distill.features: {name} gives {tuple(s.shape)} in the student and {tuple(t.shape)} "
                                 "in the teacher; match layers of equal width")
            diff = s.float() - t.detach().float()
            out[name] = diff.pow(2).mean(dim=tuple(range(1, diff.ndim)))
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
