"""AdamW and the LR schedule (linear warm-up, then constant, cosine or linear decay)."""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping

import torch

from trainer.config import OptimConfig


def _apex_fused_adam():
    """NVIDIA apex's FusedAdam when it is already importable (never installed by us)."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except ImportError:
        return None
    return FusedAdam


ROUTER_KEYS = ("attn_rate.", "mlp_rate.", "token_selection.")


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], router_lr_mult: float,
                 lr_mult: Mapping[str, float] | None = None) -> list[dict]:
    """Trainable parameters grouped by LR multiplier: the routers' (`dynamic.router_lr_mult`) times that
    of the first `optim.lr_mult` pattern naming them (fnmatch over parameter names, wrapper prefixes
    such as DDP's `module.` ignored). A pattern that names no trainable parameter is an error: a typo
    would otherwise train everything at one LR without a word."""
    patterns = dict(lr_mult or {})
    used: set[str] = set()
    by_mult: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        mult = router_lr_mult if router_lr_mult != 1.0 and any(k in name for k in ROUTER_KEYS) else 1.0
        for pat, m in patterns.items():
            if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, f"*.{pat}"):
                used.add(pat)
                mult *= float(m)
                break
        by_mult.setdefault(mult, []).append(p)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ValueError(f"optim.lr_mult pattern {unused[0]!r} names no trainable parameter; patterns are fnmatch over "
                         "parameter names, such as 'y_embedder.*' or 'blocks.*.cross_attn.*'")
    groups = [{"params": by_mult.pop(1.0, []), "lr_mult": 1.0}]
    return groups + [{"params": ps, "lr_mult": m} for m, ps in sorted(by_mult.items())]


def _has_dtensors(groups: list[dict]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for g in groups for p in g["params"])


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: apex's FusedAdam where it is known to work (plain tensors on CUDA, apex importable),
    else torch's fused (CUDA) or foreach implementation. FSDP2's parameters are DTensors, which apex
    does not handle: there `auto` takes torch's fused AdamW and an explicit `apex` is an error."""
    params = [{**g, "lr": cfg.lr * g.get("lr_mult", 1.0)} for g in groups]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if _has_dtensors(groups):
        if cfg.fused == "apex":
            raise RuntimeError("optim.fused=apex cannot drive FSDP2's sharded (DTensor) parameters; use optim.fused=auto "
                               "(torch's fused AdamW) with engine.kind=fsdp")
    elif cfg.fused == "apex" or (cfg.fused == "auto" and device.type == "cuda"):
        fused_adam = _apex_fused_adam()
        if fused_adam is not None:
            return fused_adam(params, adam_w_mode=True, **kwargs)
        if cfg.fused == "apex":
            raise RuntimeError("optim.fused=apex but NVIDIA apex is not importable; use optim.fused=auto")
    if cfg.fused in ("auto", "torch") and device.type == "cuda":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, foreach=cfg.fused != "none", **kwargs)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
