"""Build what a run trains from its config: objective, teacher, student (with inherited weights).

These run before the engine wraps anything; the teacher is loaded on the CPU and checked against
the student before any process group exists.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model, family_of, model_config
from models.convert import weights_digest
from models.diffusion import build_objective as _build_objective
from models.inherit import InheritReport, default_exclude, inherit_weights
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
    the same weights exported twice are the same teacher."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        if f.suffix == ".safetensors":
            h.update(weights_digest(f).encode())
            continue
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    arch = hashlib.sha256(json.dumps(teacher_cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(p), "sha256": h.hexdigest(), "config_hash": arch}


def load_teacher(cfg: RunConfig) -> tuple[nn.Module | None, dict[str, Any]]:
    """The frozen teacher on the CPU (or None with `teacher: null`) and its identity."""
    if cfg.teacher is None:
        return None, {}
    from models.convert import load_pretrained

    teacher = load_pretrained(cfg.teacher.path, prefer=cfg.teacher.prefer)
    check_pair(student_config(cfg), teacher.config)
    teacher.eval().requires_grad_(False)
    return teacher, teacher_identity(cfg.teacher.path, teacher.config)


def build_student(cfg: RunConfig, teacher: nn.Module | None) -> tuple[nn.Module, InheritReport | None]:
    """The student, initialised as `student.init` says (inheritance follows LiT/DyDiT's rules), with
    `peft`'s adapters on its frozen inherited base (trainer/peft.py)."""
    from trainer.peft import apply_peft

    model = build_model(student_config(cfg))
    init = cfg.student.init
    if init == "random":
        return model, None
    if init == "path":
        from models.convert import read_checkpoint

        source = read_checkpoint(cfg.student.init_path)
        state, src_cfg = source.state_dict, source.config
    else:
        assert teacher is not None  # validated: inherit needs a teacher
        state, src_cfg = teacher.state_dict(), teacher.config
    exclude = cfg.student.inherit_exclude
    if exclude is None:
        exclude = default_exclude(src_cfg, model.config)
    report = inherit_weights(model, state, exclude)
    apply_peft(cfg, model, report)  # adapters and a frozen base with `peft`; nothing without
    return model, report


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
