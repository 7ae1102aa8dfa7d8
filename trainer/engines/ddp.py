"""DistributedDataParallel: a full student replica per rank, gradients all-reduced."""
from __future__ import annotations

import contextlib
import inspect

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from models.family import Checkpoint
from models.inherit import InheritPlan
from trainer.engines.base import TorchEngine
from trainer.engines.placement import inherit_into, place_teacher
from trainer.parallelize import apply_activation_checkpointing, apply_compile


def wrap_ddp(module: nn.Module, device_ids: list[int] | None) -> DDP:
    """DDP without a buffer sync every forward (the buffers are constants such as pos_embed), through
    `forward_sync_buffers` where torch has it (2.14 deprecates `broadcast_buffers` with a warning)."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(module, device_ids=device_ids, forward_sync_buffers=False)
    return DDP(module, device_ids=device_ids, broadcast_buffers=False)


class DDPEngine(TorchEngine):
    name = "ddp"

    def setup(self, student: nn.Module, teacher: Checkpoint | None, inherit: InheritPlan | None = None) -> None:
        device = self.env.device
        self.raw_student = student.to(device)
        inherit_into(self.raw_student, inherit)  # a replica: every inherited tensor whole
        ema = self.make_ema_copy(self.raw_student)
        apply_activation_checkpointing(self.raw_student, self.cfg.engine)
        apply_compile(self.raw_student, self.cfg.engine)
        device_ids = [device.index] if device.type == "cuda" else None
        self.student = wrap_ddp(self.raw_student, device_ids)
        if teacher is not None:
            self.teacher = place_teacher(teacher, self.cfg, self.env, shard=self.cfg.teacher.shard)
        self._finish_setup(ema)

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_batch else self.student.no_sync()
