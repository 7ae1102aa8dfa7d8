"""One process, one device: the reference every parallel engine must reproduce."""
from __future__ import annotations

import contextlib

from torch import nn

from models.family import Checkpoint
from models.inherit import InheritPlan
from trainer.engines.base import TorchEngine
from trainer.engines.placement import inherit_into, replicate_teacher
from trainer.parallelize import apply_activation_checkpointing, apply_compile


class SingleEngine(TorchEngine):
    name = "single"

    def setup(self, student: nn.Module, teacher: Checkpoint | None, inherit: InheritPlan | None = None) -> None:
        self.raw_student = student.to(self.env.device)
        inherit_into(self.raw_student, inherit)
        ema = self.make_ema_copy(self.raw_student)
        apply_activation_checkpointing(self.raw_student, self.cfg.engine)
        apply_compile(self.raw_student, self.cfg.engine)
        self.student = self.raw_student
        if teacher is not None:
            self.teacher = replicate_teacher(teacher, self.cfg, self.env)
        self._finish_setup(ema)

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
