"""Build what a run trains from its config: objective, teacher source, student (and what it inherits).

These run on every rank once the process group exists (the config, including the teacher/student
pairing read from the teacher file's header, was validated before it). Nothing here reads the
teacher's weights: `open_teacher` maps the file lazily and `build_student` only plans what the
student inherits; the engine reads each rank's rows when it places the models.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models import build_model, family_of, model_config
from models.convert import Checkpoint, read_checkpoint, weights_digest
from models.diffusion import build_objective as _build_objective
from models.inherit import InheritPlan, default_exclude, plan_inheritance
from models.weights_io import cached_digest
from trainer.config import ConfigError, RunConfig


def build_objective(cfg: RunConfig):
    d = cfg.diffusion
    if d.objective == "gaussian":
        return _build_objective("gaussian", num_timesteps=d.num_timesteps, timestep_sampling=d.timestep_sampling)
    return _build_objective(
        "flow", timestep_sampling=d.timestep_sampling, logit_mean=d.logit_mean, logit_std=d.logit_std, shift=d.shift,
        dynamic_shift=d.dynamic_shift, base_shift=d.base_shift, max_shift=d.max_shift, base_seq_len=d.base_seq_len,
        max_seq_len=d.max_seq_len,
    )


def student_config(cfg: RunConfig) -> Any:
    try:
        return model_config(cfg.student.model, **dict(cfg.student.args))
    except ValueError as e:
        raise ConfigError(f"config student.model={cfg.student.model!r} / student.args: {e}") from e


def check_pair(student: Any, teacher: Any) -> None:
    """Teacher and student must be of one family, read the same inputs and write the same outputs."""
    fs, ft = family_of(student), family_of(teacher)
    if fs is not ft:
        raise ConfigError(f"student {cfg_name(student)} is of the {fs.name} family but the teacher is of the "
                          f"{ft.name} family; distil within one family")
    try:
        fs.check_pair(student, teacher)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def cfg_name(cfg: Any) -> str:
    return f"{type(cfg).__name__}({family_of(cfg).student_kind(cfg)})"


def teacher_identity(path: str, teacher_cfg: Any) -> dict[str, Any]:
    """Path, content hash and architecture of the teacher, stored in every checkpoint manifest.

    safetensors files are hashed by their tensors and metadata (`weights_digest`), not their bytes:
    the same weights exported twice are the same teacher. The hash is cached per teacher path and
    recomputed only when a file's path, size, mtime or inode changed (`models.weights_io.cached_digest`,
    under `$DITILL_CACHE_DIR`)."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    arch = hashlib.sha256(json.dumps(teacher_cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(p), "sha256": cached_digest(str(p), "teacher", files, lambda: _identity_hash(files)),
            "config_hash": arch}


def _identity_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        if f.suffix == ".safetensors":
            h.update(weights_digest(f).encode())
            continue
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def shared_teacher_identity(path: str, teacher_cfg: Any) -> dict[str, Any]:
    """`teacher_identity` computed (or read from the cache) by rank 0 only; the other ranks wait for it
    and receive it (no shared cache directory needed between nodes)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return teacher_identity(path, teacher_cfg)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = teacher_identity(path, teacher_cfg)
        except Exception as e:  # the others must not wait forever for a broadcast that never comes
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


@dataclass
class TeacherSource:
    """A run's teacher before any rank holds it: its weights, mapped lazily, and its identity."""

    checkpoint: Checkpoint  # lazy tensors: each rank reads its own rows when the engine places it
    identity: dict[str, Any]


def open_teacher(cfg: RunConfig) -> TeacherSource | None:
    """The teacher's lazy weights and identity (None with `teacher: null`); nothing is read but headers."""
    if cfg.teacher is None:
        return None
    ckpt = read_checkpoint(cfg.teacher.path, prefer=cfg.teacher.prefer, lazy=True)
    check_pair(student_config(cfg), ckpt.config)
    return TeacherSource(ckpt, shared_teacher_identity(cfg.teacher.path, ckpt.config))


def build_student(cfg: RunConfig, teacher: Checkpoint | None) -> tuple[nn.Module, InheritPlan | None]:
    """The student, randomly initialised on the CPU with the current RNG (the same on every rank and at
    every world size), and the plan of what it inherits (`student.init`: from the teacher's weights, or
    from `student.init_path`), checked by shape but not yet copied: the engine fills it after placing
    the student, each rank its own rows. With `peft`, the adapters are in and the inherited base is
    frozen (trainer/peft.py); the adapted layers keep the base's names, so the plan fills them alike."""
    from trainer.peft import apply_peft

    model = build_model(student_config(cfg))
    init = cfg.student.init
    if init == "random":
        return model, None
    if init == "path":
        source = read_checkpoint(cfg.student.init_path, lazy=True)
    else:
        assert teacher is not None  # validated: inherit needs a teacher
        source = teacher
    exclude = cfg.student.inherit_exclude
    if exclude is None:
        exclude = default_exclude(source.config, model.config)
    plan = plan_inheritance(model, source.state_dict, exclude)
    apply_peft(cfg, model, plan)  # adapters and a frozen base with `peft`; nothing without
    return model, plan


def teacher_placement(teacher: nn.Module) -> str:
    """"sharded, 50.0% on this rank, bf16" or "replicated, fp32": where the placed teacher lives (the log)."""
    from models.sharded_load import local_numel

    held = [(n, f) for _, n, f in local_numel(teacher)]
    share = sum(n for n, _ in held) / max(1, sum(f for _, f in held))
    dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in teacher.parameters()}))
    return f"sharded, {100 * share:.1f}% on this rank, {dtypes}" if share < 1 else f"replicated, {dtypes}"


def attach_null_condition(cfg: RunConfig, *models: nn.Module | None) -> bool:
    """Copy the data's null caption (`null_text.safetensors` beside the shards) into each text model's
    buffers — teacher and student get the same one; returns whether there was one."""
    from data import load_null_text

    if not cfg.data.path or cfg.data.cond != "text_emb":
        return False
    null = load_null_text(cfg.data.path)
    if null is None:
        return False
    for model in models:
        if model is not None:
            family_of(model).set_null_condition(model, null)
    return True


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model (their full size even where ZeRO-3 left each rank only a partition)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank streams: ranks draw different noise, and a rank's stream is reproducible."""
    import random

    import numpy as np

    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
