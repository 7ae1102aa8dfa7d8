"""FSDP2: `fully_shard` per block, then the root; a bf16 mixed-precision policy on GPU.

The teacher never joins the student's FSDP units: it is replicated, or sharded in its own units
(`teacher.shard: true`) so a teacher larger than one device fits (`trainer.engines.placement`).
The student is sharded first and then filled with what it inherits, so each rank reads only the
rows of the teacher's tensors that its own shards hold.
"""
from __future__ import annotations

import contextlib

from torch import nn

from models.family import Checkpoint
from models.inherit import InheritPlan
from trainer.engines.base import TorchEngine, compute_dtype
from trainer.engines.placement import device_mesh, inherit_into, place_teacher, shard_model
from trainer.parallelize import apply_activation_checkpointing, apply_compile


class FSDPEngine(TorchEngine):
    name = "fsdp"

    def setup(self, student: nn.Module, teacher: Checkpoint | None, inherit: InheritPlan | None = None) -> None:
        device = self.env.device
        mesh = device_mesh(self.env)
        dtype = compute_dtype(self.cfg, device)
        self.raw_student = student.to(device)
        ema = self.make_ema_copy(self.raw_student)
        apply_activation_checkpointing(self.raw_student, self.cfg.engine)
        apply_compile(self.raw_student, self.cfg.engine)
        self.student = shard_model(self.raw_student, mesh, dtype)
        shard_model(ema, mesh, dtype)
        inherit_into(self.raw_student, inherit, ema)  # local rows only, student and EMA alike
        if teacher is not None:
            self.teacher = place_teacher(teacher, self.cfg, self.env, shard=self.cfg.teacher.shard)
        self._finish_setup(ema)

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        self.student.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters instead
