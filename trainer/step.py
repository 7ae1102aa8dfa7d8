"""One distillation micro-step: batch → noisy inputs → teacher and student → named losses.

Teacher and student see the same x_t, t and condition, including the same guidance-dropout draw
(the dropout is drawn here, once, instead of inside each model). All randomness comes from the
global RNG, whose state every checkpoint saves per rank, so a resumed run redraws the same noise.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

from models import family_of
from models.losses import FlopsLoss, HybridDistillLoss
from trainer.config import RunConfig
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


class DistillStep:
    """Noise, timesteps and guidance dropout are drawn for the whole global micro-batch from a
    generator every rank holds in the same state, and each rank keeps its contiguous slice. The data
    layer gives rank r the r-th slice of each global batch, so a sample meets the same noise whatever
    the world size: a multi-rank run reproduces the single-process run."""

    def __init__(self, cfg: RunConfig, objective, engine: Engine) -> None:
        self.cfg = cfg
        self.objective = objective
        self.engine = engine
        self.model = engine.raw_student
        self.family = family_of(self.model)
        self.shared = torch.Generator(device=engine.env.device).manual_seed(cfg.train.seed)
        mcfg = self.model.config
        self.kd = HybridDistillLoss(cfg.distill.lambda_noise, cfg.distill.lambda_var, mcfg.in_channels)
        self.flops = None
        if mcfg.dynamic:
            d = cfg.dynamic
            self.flops = FlopsLoss(d.flops_target, d.flops_weight, d.warmup_steps, d.hold_steps)

    def __call__(self, batch: dict, step: int, watch: Stopwatch, scale: float) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; returns detached per-term means for logging.

        `scale` divides the loss for gradient accumulation.
        """
        engine, obj = self.engine, self.objective
        x0 = batch["x"].to(engine.env.device, non_blocking=True)
        cond = {k: v.to(engine.env.device, non_blocking=True) for k, v in self.model.condition(batch).items()}
        x_t, t, noise, drop = self._draw(x0)
        cond = self.model.drop_condition(cond, drop)
        t_model = obj.model_timestep(t)

        teacher_out = None
        if engine.teacher is not None:
            with watch.section("teacher"), torch.no_grad(), engine.autocast():
                teacher_out = engine.teacher(x_t, t_model, **cond)

        with watch.section("student"):
            with engine.autocast():
                out, aux = engine.student(x_t, t_model, **cond, return_aux=True)
            terms = self._losses(out, aux, x0, x_t, t, noise, teacher_out, step, cond, t_model)
            engine.backward(terms["loss"] * scale)
        return {k: v.detach() for k, v in terms.items()}

    def _draw(self, x0: torch.Tensor):
        env, b = self.engine.env, x0.shape[0]
        world = env.world_size
        shape = (b * world, *x0.shape[1:])
        seq_len = self.family.image_tokens(self.model.config, tuple(x0.shape[-2:]))
        t = self.objective.sample_timesteps(b * world, x0.device, self.shared, seq_len=seq_len)
        noise = torch.randn(shape, generator=self.shared, device=x0.device, dtype=x0.dtype)
        drop = torch.rand(b * world, generator=self.shared, device=x0.device) < self.cfg.diffusion.cfg_dropout
        mine = slice(env.rank * b, (env.rank + 1) * b)
        t, noise, drop = t[mine], noise[mine], drop[mine]
        return self.objective.add_noise(x0, t, noise), t, noise, drop

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
            fl = self.flops(aux["flops_ratio"], step)
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
