"""Distillation and compute losses. Each returns named terms so the trainer can log every one.

- `HybridDistillLoss` (LiT, METHODS §2.3): λ1·MSE(ε_S, ε_T) + λ2·MSE(Σ_S, Σ_T) on the two halves of a
  learned-σ output, added on top of the diffusion loss.
- `FlopsLoss` (DyDiT, METHODS §1.3): w·(mean_b r(b) − target)² with the target held at 1, then
  annealed linearly to λ (DyDiT's schedule, or a continuous one).
"""
from __future__ import annotations

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean(dim=tuple(range(1, x.ndim)))


class HybridDistillLoss:
    """Per-sample KD terms between student and teacher outputs of shape (B, 2C, H, W) (or (B, C, …)).

    The teacher output is treated as a constant; with a fixed-variance model (C channels) only the
    noise term exists.
    """

    def __init__(self, lambda_noise: float = 0.5, lambda_var: float = 0.05, in_channels: int = 4) -> None:
        for key, val in (("lambda_noise", lambda_noise), ("lambda_var", lambda_var)):
            if val < 0:
                raise ValueError(f"distill.{key}={val} must be >= 0")
        self.lambda_noise = lambda_noise
        self.lambda_var = lambda_var
        self.in_channels = in_channels

    def __call__(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> dict[str, torch.Tensor]:
        if student_out.shape != teacher_out.shape:
            raise ValueError(f"student output {tuple(student_out.shape)} != teacher output {tuple(teacher_out.shape)}")
        c = self.in_channels
        teacher_out = teacher_out.detach()
        kd_noise = mean_flat(student_out[:, :c] - teacher_out[:, :c])
        terms = {"kd_noise": kd_noise}
        kd = self.lambda_noise * kd_noise
        if student_out.shape[1] > c:
            kd_var = mean_flat(student_out[:, c:] - teacher_out[:, c:])
            terms["kd_var"] = kd_var
            kd = kd + self.lambda_var * kd_var
        terms["kd"] = kd
        return terms


WARMUP_SCHEDULES = ("official", "continuous")


def flops_target(step: int, target: float, warmup_steps: int, hold_steps: int = 100, schedule: str = "official") -> float:
    """The FLOPs target at `step`: 1.0 for the first `hold_steps`, then annealed to λ by `warmup_steps`.

    official (DyDiT's `train.py`): 1 − (1−λ)·step/warmup after the hold, so the target jumps from 1 to
    1 − (1−λ)·hold/warmup when the hold ends; continuous: 1 − (1−λ)·(step−hold)/(warmup−hold), which
    starts at 1 where the hold ends.
    """
    if schedule not in WARMUP_SCHEDULES:
        raise ValueError(f"dynamic.warmup_schedule={schedule!r} is not one of {WARMUP_SCHEDULES}")
    if step < hold_steps:
        return 1.0
    if warmup_steps > 0 and step <= warmup_steps:
        if schedule == "official":
            return 1.0 - (1.0 - target) * step / warmup_steps
        return 1.0 - (1.0 - target) * (step - hold_steps) / max(warmup_steps - hold_steps, 1)
    return target


class FlopsLoss:
    """weight·(mean_b r(b) − target(step))²: the batch-mean ratio, not a per-sample error."""

    def __init__(self, target: float, weight: float = 2.0, warmup_steps: int = 1000, hold_steps: int = 100,
                 schedule: str = "official") -> None:
        if not 0.0 < target <= 1.0:
            raise ValueError(f"dynamic.flops_target={target} must be in (0, 1]")
        if schedule not in WARMUP_SCHEDULES:
            raise ValueError(f"dynamic.warmup_schedule={schedule!r} is not one of {WARMUP_SCHEDULES}")
        self.target = target
        self.weight = weight
        self.warmup_steps = warmup_steps
        self.hold_steps = hold_steps
        self.schedule = schedule

    def __call__(self, ratio: torch.Tensor, step: int, mean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`ratio` (B,) per-sample ratios; `mean`: their batch mean if computed elsewhere (the trainer
        passes the mean over every rank's samples, so the loss does not depend on the world size)."""
        tgt = flops_target(step, self.target, self.warmup_steps, self.hold_steps, self.schedule)
        mean = ratio.float().mean() if mean is None else mean
        return {
            "flops": self.weight * (mean - tgt) ** 2,
            "flops_ratio": mean.detach(),
            "flops_target": torch.tensor(tgt),
        }
