"""FSDP2: `fully_shard` per block, then the root; a bf16 mixed-precision policy on GPU.

The teacher never joins the student's FSDP units: it is replicated, or sharded in its own units
(`teacher.shard: true`) so a teacher larger than one device fits.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from trainer.config import RunConfig
from trainer.distributed import DistEnv
from trainer.engines.base import TorchEngine, compute_dtype, freeze, teacher_dtype
from trainer.parallelize import apply_activation_checkpointing, apply_compile, blocks_of


def _mesh(env: DistEnv):
    return init_device_mesh(env.device.type, (env.world_size,))


def _shard(module: nn.Module, mesh, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard blocks then the root. Block inputs (embeddings) are cast to the compute dtype; the root's
    are not, because the timestep values must reach the sinusoid in fp32."""
    mp_block = mp_root = None
    if param_dtype is not None and param_dtype != torch.float32:
        mp_block = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        mp_root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    kw_b = {"mesh": mesh, **({"mp_policy": mp_block} if mp_block else {})}
    kw_r = {"mesh": mesh, **({"mp_policy": mp_root} if mp_root else {})}
    for block in blocks_of(module):
        fully_shard(block, **kw_b)
    fully_shard(module, **kw_r)
    return module


def shard_teacher(teacher: nn.Module, cfg: RunConfig, env: DistEnv) -> nn.Module:
    """The frozen teacher in its own FSDP units (no optimizer ever sees it)."""
    freeze(teacher)
    teacher.to(env.device)
    return _shard(teacher, _mesh(env), teacher_dtype(cfg, env.device))


class FSDPEngine(TorchEngine):
    name = "fsdp"

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        device = self.env.device
        mesh = _mesh(self.env)
        dtype = compute_dtype(self.cfg, device)
        self.raw_student = student.to(device)
        ema = self.make_ema_copy(self.raw_student)
        apply_activation_checkpointing(self.raw_student, self.cfg.engine)
        apply_compile(self.raw_student, self.cfg.engine)
        self.student = _shard(self.raw_student, mesh, dtype)
        _shard(ema, mesh, dtype)
        if teacher is not None:
            freeze(teacher)
            if self.cfg.teacher.shard:
                self.teacher = _shard(teacher.to(device), mesh, teacher_dtype(self.cfg, device))
            else:
                self.teacher = teacher.to(device=device, dtype=teacher_dtype(self.cfg, device))
        self._finish_setup(ema)

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        self.student.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters instead
