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
from models.diffusion.samplers import batch_conditions
from models.losses import FlopsLoss, HybridDistillLoss
from trainer.config import RunConfig
from trainer.distributed import global_batch_mean
from trainer.features import FeatureTaps
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
    d = cfg.distill
    return d.lambda_noise > 0 or d.lambda_var > 0 or (bool(d.features) and d.feature_weight > 0)


def guided(cond_out: torch.Tensor, uncond_out: torch.Tensor, g: torch.Tensor, channels: int) -> torch.Tensor:
    """Classifier-free guidance with a scale per sample: uncond + g·(cond − uncond) on the first
    `channels` (the ε/velocity prediction); the rest (learned σ) from the conditional output."""
    gs = g.to(cond_out.dtype).view(-1, *([1] * (cond_out.ndim - 1)))
    c, u = cond_out[:, :channels], uncond_out[:, :channels]
    return torch.cat([u + gs * (c - u), cond_out[:, channels:]], dim=1)


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
        teacher = engine.teacher
        # who takes a guidance value: the student (guidance-distilled, FLUX-dev-like) and/or the teacher
        self.student_guided = self.family.conditioning(mcfg).guidance
        self.teacher_guided = teacher is not None and family_of(teacher).conditioning(teacher.config).guidance
        self.guidance_distill = teacher is not None and cfg.distill.guidance_distill
        self.kd = HybridDistillLoss(cfg.distill.lambda_noise, cfg.distill.lambda_var, mcfg.in_channels)
        self.features = None
        if teacher is not None and cfg.distill.features and cfg.distill.feature_weight > 0:
            self.features = FeatureTaps(self.model, teacher, list(cfg.distill.features))
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
        g = draw.get("guidance")
        student_cond = {**cond, "guidance": g} if self.student_guided else cond
        t_model = obj.model_timestep(t)
        seeds = draw["router_seeds"] if self.model.config.dynamic else None
        if self.features is not None:
            self.features.active = True

        teacher_out = None
        if engine.teacher is not None:
            teacher_cond = {**cond, "guidance": g} if self.teacher_guided else cond
            with watch.section("teacher"), torch.no_grad(), engine.autocast():
                teacher_out = self._teacher(x_t, t_model, teacher_cond, g)

        with watch.section("student"):
            extra = {"seeds": seeds} if seeds is not None else {}
            with engine.autocast():
                out, aux = engine.student(x_t, t_model, **student_cond, return_aux=True, **extra)
            if self.features is not None:
                self.features.active = False
            terms = self._losses(out, aux, x0, x_t, t, noise, teacher_out, step, student_cond, t_model)
            engine.backward(terms["loss"] * scale)
        return {k: v.detach() for k, v in terms.items()}

    def _teacher(self, x_t: torch.Tensor, t_model: torch.Tensor, cond: dict, g: torch.Tensor | None) -> torch.Tensor:
        """The teacher's output, or with guidance distillation its guided output at each sample's g: the
        conditional and the null condition as one doubled batch (the null from the family's convention,
        e.g. PixArt's null caption under the prompt's mask)."""
        teacher = self.engine.teacher
        if not self.guidance_distill:
            return teacher(x_t, t_model, **cond)
        both = batch_conditions(cond, teacher.null_condition(cond))
        out = teacher(torch.cat([x_t, x_t]), torch.cat([t_model, t_model]), **both)
        cond_out, uncond_out = out.chunk(2)
        return guided(cond_out, uncond_out, g, x_t.shape[1])

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
        if self.student_guided or self.teacher_guided:
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
        if self.features is not None:
            per_layer = {name: v.mean() for name, v in self.features.losses().items()}
            terms.update({f"loss/feature/{name}": v for name, v in per_layer.items()})
            terms["loss/feature"] = torch.stack(list(per_layer.values())).mean()
            total = total + cfg.distill.feature_weight * terms["loss/feature"]
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
