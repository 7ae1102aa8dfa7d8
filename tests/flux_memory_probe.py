"""`torchrun -m tests.flux_memory_probe CONFIG OUT_DIR`: the per-rank bytes the FSDP2 engine really holds.

Builds the run as `trainer.loop` does (teacher, inherited student, engine), takes one distillation
step on a batch of the family's shapes, and writes `OUT_DIR/rank{r}.json` with the bytes of this
rank's local shards: student parameters (+ buffers), gradients (after backward), optimizer state
(after the step), EMA copy and teacher. `tests/test_flux_memory.py` compares them with the plan.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    return local_bytes(module.parameters()) + local_bytes(module.buffers())


def main(config: str, out_dir: str) -> int:
    from models import family_of
    from trainer.build import build_objective, build_student, open_teacher
    from trainer.config import load_config
    from trainer.distributed import destroy_distributed, init_distributed
    from trainer.engines import build_engine
    from trainer.step import DistillStep, Stopwatch

    cfg = load_config(config, [])
    env = init_distributed(cfg.engine.collective_timeout_s)
    try:
        source = open_teacher(cfg)
        teacher = source.checkpoint if source is not None else None
        torch.manual_seed(0)
        student, plan = build_student(cfg, teacher)
        engine = build_engine(cfg, env)
        engine.setup(student, teacher, plan)
        family = family_of(engine.raw_student)
        mcfg = engine.raw_student.config
        n = cfg.train.micro_batch
        g = torch.Generator().manual_seed(env.rank)
        batch = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in family.example_batch(mcfg, n).items()}
        batch["x"] = torch.randn(n, *family.latent_shape(mcfg), generator=g)
        step = DistillStep(cfg, build_objective(cfg), engine)
        step(batch, 0, Stopwatch(env.device), 1.0)
        grads = local_bytes(p.grad for p in engine.student.parameters())
        engine.step(0)
        optim = local_bytes(v for state in engine.optimizer.state.values() for v in state.values()
                            if isinstance(v, torch.Tensor))
        out = {"params": module_bytes(engine.student), "grads": grads, "optimizer": optim,
               "ema": module_bytes(engine.ema.module), "teacher": module_bytes(engine.teacher)}
        Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(out))
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
