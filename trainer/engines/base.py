"""The engine interface: wrapping, backward, optimizer step, and the engine's own state.

The loop talks to an `Engine` and never asks which one it has. `TorchEngine` holds what the
single-process, DDP and FSDP2 engines share (a torch optimizer, LR schedule, clipping, EMA,
non-finite skipping); DeepSpeed implements the same methods over its own engine.
"""
from __future__ import annotations

import contextlib
import copy
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.checkpoint import CheckpointState, DCPState
from trainer.config import RunConfig
from trainer.distributed import DistEnv
from trainer.ema import EMA
from trainer.optim import build_optimizer, build_scheduler, param_groups

if TYPE_CHECKING:
    from models.family import Checkpoint
    from models.inherit import InheritPlan


def compute_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    mp = cfg.engine.mixed_precision
    if mp == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if mp == "bf16" else torch.float32


class Engine(ABC):
    """What the loop needs from a parallelism strategy."""

    name: str = "base"

    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.student: nn.Module  # what to call for the forward (possibly wrapped)
        self.raw_student: nn.Module  # the unwrapped module (config, conditioning helpers)
        self.teacher: nn.Module | None = None
        self.ema: EMA | None = None

    @abstractmethod
    def setup(self, student: nn.Module, teacher: "Checkpoint | None", inherit: "InheritPlan | None" = None) -> None:
        """Wrap the student, fill what it inherits (`inherit`, after wrapping, so a sharded student reads
        only its rows), place the teacher from its lazy weights (`trainer.engines.placement`) and build
        the optimizer."""

    @abstractmethod
    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; gradient sync only on the last."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, step: int, skip: bool = False) -> dict[str, float]:
        """Clip, check for non-finite gradients, update, schedule. Returns grad_norm, lr, skipped.

        `skip`: the ranks agreed that a loss was non-finite; the update (and EMA) must not happen.
        A non-finite global gradient norm skips it too; `skipped` reports either."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Student, EMA, optimizer and scheduler state, sharded where the engine shards."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def checkpoint_state(self) -> CheckpointState:
        """How the Checkpointer saves and loads this engine: DCP over `state_dict` by default."""
        return DCPState(self.state_dict, self.load_state_dict)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def eval_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """The modules to sample from: EMA student, then the teacher if any."""
        if self.ema is not None:
            yield "ema", self.ema.module
        else:
            yield "student", self.student
        if self.teacher is not None:
            yield "teacher", self.teacher


class TorchEngine(Engine):
    """Shared logic of the engines that drive a torch optimizer themselves."""

    def _finish_setup(self, ema_module: nn.Module | None) -> None:
        # with `peft` the frozen base is in no optimizer and no checkpoint: only these tensors are
        self.trainable: set[str] | None = None
        if self.cfg.peft.method != "none":
            self.trainable = {n for n, p in self.raw_student.named_parameters() if p.requires_grad}
        groups = param_groups(self.student.named_parameters(), self.cfg.dynamic.router_lr_mult, self.cfg.optim.lr_mult)
        self.optimizer = build_optimizer(groups, self.cfg.optim, self.env.device)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.steps)
        if ema_module is not None:
            self.ema = EMA(self.student, ema_module, self.cfg.ema)

    def make_ema_copy(self, raw: nn.Module) -> nn.Module:
        """A copy of the student for the EMA. Frozen parameters (a PEFT student's base) never move, so the
        copy shares them instead of holding a second base (FSDP2 still shards each module's own copy)."""
        frozen = {id(p): p for p in raw.parameters() if not p.requires_grad}
        ema = copy.deepcopy(raw, memo=frozen)
        ema.requires_grad_(False)
        ema.eval()
        return ema

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_norm(self) -> torch.Tensor:
        params = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm

    def step(self, step: int, skip: bool = False) -> dict[str, float]:
        norm = self.clip_and_norm()
        finite = bool(torch.isfinite(norm).item()) and not skip  # the norm is global, so every rank agrees
        if finite:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"grad_norm": float(norm.item()), "lr": self.scheduler.get_last_lr()[0], "skipped": float(not finite)}

    def state_dict(self) -> dict[str, Any]:
        """FQN-keyed state (sharded DTensors under FSDP2), so a checkpoint reshards on load."""
        sd: dict[str, Any] = {
            "student": self._trainable_only(get_model_state_dict(self.student)),
            "optim": get_optimizer_state_dict(self.student, self.optimizer),
            "sched": self.scheduler.state_dict(),
        }
        if self.ema is not None:
            sd["ema"] = self._trainable_only(get_model_state_dict(self.ema.module))
        return sd

    def _trainable_only(self, sd: dict[str, Any]) -> dict[str, Any]:
        """With `peft`: the trainable tensors alone (the manifest names the frozen base they adapt)."""
        return sd if self.trainable is None else {k: v for k, v in sd.items() if k in self.trainable}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opts = StateDictOptions(strict=self.trainable is None)  # PEFT: the base stays as rebuilt
        set_model_state_dict(self.student, state["student"], options=opts)
        set_optimizer_state_dict(self.student, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(state["sched"])
        if self.ema is not None:
            set_model_state_dict(self.ema.module, state["ema"], options=opts)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = compute_dtype(self.cfg, self.env.device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=dtype)
