"""Where a run's models live: the teacher placed from its (lazy) weights file, FSDP2 units, and the
student's inherited weights filled once the student is placed.

The teacher is never built whole: it is built with its parameters on the meta device, given its
dtype (the stored one unless `teacher.dtype` says otherwise: `set_dtypes`), then either replicated
(allocated on the device, every tensor filled from the file) or sharded in its own FSDP2 units
(`fully_shard` per block from `all_blocks()`, then the root, then allocated) with each rank filling
only the rows of its shards (`Shard(0)`). Every engine uses these, DeepSpeed included: a frozen
teacher needs no optimizer partition, so its own FSDP2 units give ZeRO-3's memory saving with
row-shaped shards that a lazy read serves directly, and nothing of it enters DeepSpeed's engine,
checkpoints or EMA.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models import family_of
from models.family import Checkpoint
from models.inherit import InheritPlan
from models.sharded_load import build_meta, copy_local, fill, set_dtypes, to_empty_keeping_buffers, unfilled
from trainer.config import RunConfig
from trainer.distributed import DistEnv
from trainer.parallelize import blocks_of


def device_mesh(env: DistEnv):
    return init_device_mesh(env.device.type, (env.world_size,))


def shard_model(module: nn.Module, mesh, param_dtype: torch.dtype | None, frozen: bool = False) -> nn.Module:
    """`fully_shard` the blocks, then the root. Block inputs (embeddings) are cast to the compute dtype;
    the root's are not, because the timestep values must reach the sinusoid in fp32. A `frozen` model
    (the teacher: no backward follows its forward) also reshards its root after each forward, which
    FSDP2 otherwise keeps gathered for the backward."""
    mp_block = mp_root = None
    if param_dtype is not None and param_dtype != torch.float32:
        mp_block = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        mp_root = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    kw_b = {"mesh": mesh, **({"mp_policy": mp_block} if mp_block else {})}
    kw_r = {"mesh": mesh, **({"mp_policy": mp_root} if mp_root else {}), **({"reshard_after_forward": True} if frozen else {})}
    for block in blocks_of(module):
        fully_shard(block, **kw_b)
    fully_shard(module, **kw_r)
    return module


def teacher_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """The dtype the teacher's weights are placed in; None keeps each tensor's stored dtype.

    `teacher.dtype`: stored (default: a bf16 file stays bf16, an fp32 one fp32), fp32, bf16, or auto
    (the first wave's rule: bf16 on a GPU, fp32 on the CPU, whatever the file holds)."""
    td = cfg.teacher.dtype if cfg.teacher is not None else "stored"
    if td == "stored":
        return None
    if td == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if td == "bf16" else torch.float32


def _frozen_meta(ckpt: Checkpoint, dtype: torch.dtype | None) -> nn.Module:
    family = family_of(ckpt.config)
    model = build_meta(lambda: family.build(ckpt.config))
    model.eval().requires_grad_(False)
    set_dtypes(model, ckpt.state_dict, dtype)
    return model


def _filled(model: nn.Module, ckpt: Checkpoint) -> nn.Module:
    left = unfilled(model, fill(model, ckpt.state_dict))
    if left:
        raise RuntimeError(f"{ckpt.source}: the weights do not fill the model's tensors {left[:5]}")
    return model.eval()


def replicate_teacher(ckpt: Checkpoint, cfg: RunConfig, env: DistEnv) -> nn.Module:
    """The whole frozen teacher on this rank's device, in its placed dtype (no fp32 copy on the way)."""
    model = _frozen_meta(ckpt, teacher_dtype(cfg, env.device))
    to_empty_keeping_buffers(model, env.device)
    return _filled(model, ckpt)


def shard_teacher(ckpt: Checkpoint, cfg: RunConfig, env: DistEnv) -> nn.Module:
    """The frozen teacher in its own FSDP2 units; this rank allocates and reads only its rows."""
    model = _frozen_meta(ckpt, teacher_dtype(cfg, env.device))
    shard_model(model, device_mesh(env), None, frozen=True)  # already in its compute dtype: no cast policy
    to_empty_keeping_buffers(model, env.device)
    return _filled(model, ckpt)


def place_teacher(ckpt: Checkpoint, cfg: RunConfig, env: DistEnv, shard: bool) -> nn.Module:
    return shard_teacher(ckpt, cfg, env) if shard else replicate_teacher(ckpt, cfg, env)


def inherit_into(student: nn.Module, plan: InheritPlan | None, ema: nn.Module | None = None) -> None:
    """Fill the student's planned keys from the source, each rank its local rows (a sharded student) or
    whole tensors; then give the EMA copy (sharded alike) the same values."""
    if plan is None:
        return
    plan.apply(student)
    if ema is not None:
        copy_local(ema, student, plan.inherited)
