"""One process, one device: the reference every parallel engine must reproduce."""
from __future__ import annotations

import contextlib
from torch import nn

from trainer.engines.base import TorchEngine, freeze, teacher_dtype
from trainer.parallelize import apply_activation_checkpointing, apply_compile


class SingleEngine(TorchEngine):
    name = "single"

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        device = self.env.device
        self.raw_student = student.to(device)
        ema = self.make_ema_copy(self.raw_student)
        apply_activation_checkpointing(self.raw_student, self.cfg.engine)
        apply_compile(self.raw_student, self.cfg.engine)
        self.student = self.raw_student
        if teacher is not None:
            self.teacher = freeze(teacher).to(device=device, dtype=teacher_dtype(self.cfg, device))
        self._finish_setup(ema)

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
