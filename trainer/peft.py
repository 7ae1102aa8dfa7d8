"""The run's side of parameter-efficient distillation: which parameters train, and the frozen base's identity.

A PEFT student is the inherited model with adapters (`models/lora`): the parameters it did not inherit
(LiT's attention and DWC, DyDiT's routers: newly initialised, they have nothing to adapt) and those
`peft.train` names train fully, the adapters train, everything else is frozen — no gradient, no
optimizer state, and no place in the checkpoints, which hold the trainable tensors plus the base's
identity. The base is a pure function of the weights file it was inherited from, the student's
architecture and the set of frozen names, so its digest is computed from those (the file's content
hash is the teacher identity the run computes anyway), not by hashing billions of frozen values.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from models.inherit import InheritReport
from models.lora import LoraReport, LoraSpec, apply_lora
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, RunConfig


def enabled(cfg: RunConfig) -> bool:
    return cfg.peft.method != "none"


def lora_spec(cfg: RunConfig) -> LoraSpec:
    p = cfg.peft
    return LoraSpec(method=p.method, rank=p.rank, alpha=p.alpha, experts=p.experts, targets=tuple(p.targets),
                    modules=tuple(p.modules), exclude=tuple(p.exclude))


def fully_trained(cfg: RunConfig, model: nn.Module, report: InheritReport | None) -> list[str]:
    """Parameters that train fully: those the student did not inherit, and those `peft.train` names."""
    params = dict(model.named_parameters())
    new = set(report.initialised) | set(report.skipped) if report is not None else set(params)
    full = {k for k in params if k in new}
    for pattern in cfg.peft.train:
        hits = [k for k in params if fnmatch.fnmatchcase(k, pattern)]
        if not hits:
            raise ConfigError(f"config peft.train: {pattern!r} matches no parameter of {cfg.student.model} "
                              f"(names look like {list(params)[:4]})")
        full.update(hits)
    return sorted(full)


def apply_peft(cfg: RunConfig, model: nn.Module, report: InheritReport | None) -> LoraReport | None:
    """Adapters into the freshly inherited student and its base frozen (no-op without `peft`)."""
    if not enabled(cfg):
        return None
    try:
        return apply_lora(model, lora_spec(cfg), fully_trained(cfg, model, report))
    except ValueError as e:
        raise ConfigError(f"config peft: {e}") from e


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def base_identity(cfg: RunConfig, model: nn.Module, teacher_id: dict[str, Any] | None) -> dict[str, Any]:
    """What the frozen base is: the source file's content hash, the student architecture, the frozen
    names. Recorded in every checkpoint's manifest; resume and export rebuild the base and compare."""
    if cfg.student.init == "path":
        from models.convert import read_config
        from trainer.build import teacher_identity

        source = teacher_identity(cfg.student.init_path, read_config(cfg.student.init_path))
    else:
        source = teacher_id or {}
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    body = {
        "source_sha256": source.get("sha256"),
        "student": json.dumps(model.config.to_dict(), sort_keys=True),
        "frozen": frozen,
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"method": cfg.peft.method, "base_digest": digest, "source": source.get("path"),
            "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def check_base(manifest: dict[str, Any], now: dict[str, Any] | None, path: Path) -> None:
    """A PEFT checkpoint holds deltas on one base: resuming (or exporting) on another is an error."""
    saved = manifest.get("peft") if isinstance(manifest.get("peft"), dict) else None
    if not saved and not now:
        return
    if not saved or not now:
        raise CheckpointError(
            f"{path} was written {'with' if saved else 'without'} peft (peft.method="
            f"{saved['method'] if saved else 'none'}) but this run has peft.method={now['method'] if now else 'none'}: "
            "its tensors do not fit; resume with the same peft settings, or start a new run_dir")
    if saved.get("method") != now.get("method"):
        raise CheckpointError(f"{path} holds peft.method={saved.get('method')} adapters, this run asks for "
                              f"{now.get('method')}; resume with the same peft settings, or start a new run_dir")
    if saved.get("base_digest") != now.get("base_digest"):
        raise CheckpointError(
            f"the frozen base changed since {path} was written (base digest {str(saved.get('base_digest'))[:12]} from "
            f"{saved.get('source')}, now {str(now.get('base_digest'))[:12]} from {now.get('source')}): its adapters "
            "are deltas on that exact base; resume with the same weights file, student architecture and peft "
            "targets (a changed teacher file, student.args or peft.targets/modules/train change the base)")


def peft_summary(model: nn.Module) -> str:
    """One log line: adapted layers, trainable and frozen parameters."""
    from models.lora import lora_layers

    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"{len(lora_layers(model))} layers adapted, trainable {train / 1e6:.3f}M of {total / 1e6:.2f}M "
            f"({100 * train / max(total, 1):.2f}%)")
