"""One distillation micro-step: batch → noisy inputs → teacher and student → named losses.

Teacher and student see the same x_t, t and condition, including the same guidance-dropout draw
(the dropout is drawn here, once, instead of inside each model). Every random number of a step —
timestep, noise, guidance dropout, guidance value, the routers' Gumbel noise — is a pure function
of (run seed, step, the sample's position in the global batch) (`models/rng.py`): each rank draws
only its own samples, nothing needs saving, and a run continues exactly on another world size.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

from models import family_of
from models import rng
from models.losses import FlopsLoss, HybridDistillLoss
from trainer.config import RunConfig
from trainer.distributed import global_batch_mean
from trainer.engines.base import Engine


class Stopwatch:
    """Wall-clock sections; synchronises CUDA only when asked to measure precisely (log steps)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.precise = False
        self.times: dict[str, float] = {}

    def reset(self, precise: bool) -> None:
        self.precise = precise
        self.times = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.precise and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.precise and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def teacher_needed(cfg: RunConfig) -> bool:
    """Whether any loss reads the teacher's output (else it serves inheritance only and never runs)."""
    return cfg.distill.lambda_noise > 0 or cfg.distill.lambda_var > 0


class DistillStep:
    """Sample p of optimizer step s (p: its position in the step's global batch, counted over the
    micro-batches of gradient accumulation and the ranks, as the data layer deals them out: rank r
    holds positions [r·B, (r+1)·B) of each micro-batch) draws from seeds (seed, s, p, stream), so a
    sample meets the same noise whatever the world size: a multi-rank run reproduces the
    single-process run, and a run resumed on another world size continues it."""

    def __init__(self, cfg: RunConfig, objective, engine: Engine) -> None:
        self.cfg = cfg
        self.objective = objective
        self.engine = engine
        self.model = engine.raw_student
        self.family = family_of(self.model)
        mcfg = self.model.config
        self.guidance = self.family.conditioning(mcfg).guidance
        self.kd = HybridDistillLoss(cfg.distill.lambda_noise, cfg.distill.lambda_var, mcfg.in_channels)
        self.flops = None
        if mcfg.dynamic:
            d = cfg.dynamic
            self.flops = FlopsLoss(d.flops_target, d.flops_weight, d.warmup_steps, d.hold_steps, d.warmup_schedule)

    def __call__(self, batch: dict, step: int, watch: Stopwatch, scale: float, micro: int = 0) -> dict[str, torch.Tensor]:
        """Forward and backward of micro-batch `micro` of optimizer step `step`; returns detached
        per-term means for logging. `scale` divides the loss for gradient accumulation."""
        engine, obj = self.engine, self.objective
        x0 = batch["x"].to(engine.env.device, non_blocking=True)
        cond = {k: v.to(engine.env.device, non_blocking=True) for k, v in self.model.condition(batch).items()}
        draw = self.draw(x0, step, micro)
        x_t, t, noise = draw["x_t"], draw["t"], draw["noise"]
        cond = self.model.drop_condition(cond, draw["drop"])
        if self.guidance:
            cond["guidance"] = draw["guidance"]
        t_model = obj.model_timestep(t)
        seeds = draw["router_seeds"] if self.model.config.dynamic else None

        teacher_out = None
        if engine.teacher is not None:
            with watch.section("teacher"), torch.no_grad(), engine.autocast():
                teacher_out = engine.teacher(x_t, t_model, **cond)

        with watch.section("student"):
            extra = {"seeds": seeds} if seeds is not None else {}
            with engine.autocast():
                out, aux = engine.student(x_t, t_model, **cond, return_aux=True, **extra)
            terms = self._losses(out, aux, x0, x_t, t, noise, teacher_out, step, cond, t_model)
            engine.backward(terms["loss"] * scale)
        return {k: v.detach() for k, v in terms.items()}

    def positions(self, batch_size: int, micro: int) -> torch.Tensor:
        env = self.engine.env
        first = micro * env.world_size * batch_size + env.rank * batch_size
        return torch.arange(first, first + batch_size, dtype=torch.int64)

    def draw(self, x0: torch.Tensor, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        """This rank's samples' timesteps, noise, x_t, guidance dropout (and value), router seeds."""
        b, dev, seed = x0.shape[0], x0.device, self.cfg.train.seed
        pos = self.positions(b, micro)

        def seeds(stream: int) -> torch.Tensor:
            return rng.sample_seeds(seed, step, pos, stream).to(dev)

        seq_len = self.family.image_tokens(self.model.config, tuple(x0.shape[-2:]))
        u_t = rng.counter_uniform(seeds(rng.TIMESTEP), 0, 1)[:, 0]
        t = self.objective.timesteps_from_uniform(u_t, pos.to(dev), seq_len=seq_len)
        noise = rng.counter_normal(seeds(rng.NOISE), 0, x0[0].numel()).view_as(x0).to(x0.dtype)
        drop = rng.counter_uniform(seeds(rng.DROPOUT), 0, 1)[:, 0] < self.cfg.diffusion.cfg_dropout
        out = {"t": t, "noise": noise, "drop": drop, "x_t": self.objective.add_noise(x0, t, noise),
               "router_seeds": seeds(rng.ROUTERS)}
        if self.guidance:
            lo, hi = self.cfg.diffusion.guidance_range
            out["guidance"] = lo + (hi - lo) * rng.counter_uniform(seeds(rng.GUIDANCE), 0, 1)[:, 0]
        return out

    def _losses(self, out, aux, x0, x_t, t, noise, teacher_out, step, cond, t_model) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        diff = self.objective.training_losses(out.float(), x0, x_t, t, noise)
        terms = {f"loss/{k}": v.mean() for k, v in diff.items() if k != "loss"}
        terms["loss/diffusion"] = diff["loss"].mean()
        total = cfg.distill.diffusion_weight * terms["loss/diffusion"]
        if teacher_out is not None:
            kd = self.kd(out.float(), teacher_out.float())
            terms.update({f"loss/{k}": v.mean() for k, v in kd.items()})
            total = total + terms["loss/kd"]
        if self.flops is not None and "flops_ratio" in aux:
            fl = self.flops(aux["flops_ratio"], step, mean=global_batch_mean(aux["flops_ratio"]))
            terms["loss/flops"] = fl["flops"]
            terms["flops/ratio"] = fl["flops_ratio"]
            terms["flops/target"] = fl["flops_target"].to(out.device)
            total = total + fl["flops"]
            if cfg.dynamic.complete_model_loss:
                with self.engine.autocast():
                    full = self.engine.student(x_t, t_model, **cond, complete=True)
                complete = self.objective.training_losses(full.float(), x0, x_t, t, noise)["loss"].mean()
                terms["loss/complete"] = complete
                total = total + complete
        terms["loss"] = total
        return terms
