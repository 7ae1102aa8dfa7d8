"""DistributedDataParallel: a full student replica per rank, gradients all-reduced."""
from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.engines.base import TorchEngine, freeze, teacher_dtype
from trainer.engines.fsdp import shard_teacher
from trainer.parallelize import apply_activation_checkpointing, apply_compile


class DDPEngine(TorchEngine):
    name = "ddp"

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        device = self.env.device
        self.raw_student = student.to(device)
        ema = self.make_ema_copy(self.raw_student)
        apply_activation_checkpointing(self.raw_student, self.cfg.engine)
        apply_compile(self.raw_student, self.cfg.engine)
        device_ids = [device.index] if device.type == "cuda" else None
        # pos_embed is a constant buffer: no need to broadcast it every forward
        self.student = DDP(self.raw_student, device_ids=device_ids, broadcast_buffers=False)
        if teacher is not None:
            freeze(teacher)
            if self.cfg.teacher.shard:
                self.teacher = shard_teacher(teacher, self.cfg, self.env)
            else:
                self.teacher = teacher.to(device=device, dtype=teacher_dtype(self.cfg, device))
        self._finish_setup(ema)

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_batch else self.student.no_sync()
