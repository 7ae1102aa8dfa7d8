"""Run under torchrun (2 ranks, gloo) by tests/test_teacher_load.py; saves what each rank saw.

`python -m tests.teacher_load_worker OUT_DIR TEACHER...`: for each teacher file, the teacher placed
replicated and sharded (outputs on fixed inputs, dtypes, the share of elements this rank holds); an
FSDP2 engine whose LiT student inherits from the first teacher's file (its student and EMA gathered);
and the teacher identity as rank 1 receives it while its own digest cache holds a wrong value.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def _cfg(teacher: str, dtype: str = "stored", shard: bool = True):
    from trainer.config import RunConfig

    cfg = RunConfig()
    cfg.teacher.path, cfg.teacher.dtype, cfg.teacher.shard = teacher, dtype, shard
    cfg.student.model, cfg.student.init = "lit-s/2", "inherit"
    cfg.student.args = {"depth": 2, "hidden_size": 384, "num_heads": 2, "input_size": 8, "in_channels": 4, "num_classes": 10}
    cfg.train.micro_batch, cfg.train.steps = 2, 10
    return cfg


def _gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}


def main(out: str, *teachers: str) -> None:
    from models.convert import read_checkpoint
    from models.sharded_load import local_numel
    from tests.helpers import tiny_inputs
    from trainer.build import build_student, shared_teacher_identity
    from trainer.distributed import destroy_distributed, init_distributed
    from trainer.engines.fsdp import FSDPEngine
    from trainer.engines.placement import replicate_teacher, shard_teacher
    from models.weights_io import cached_digest

    env = init_distributed(120)
    x, t, y = tiny_inputs(batch=3, channels=4)
    result: dict = {"teachers": {}}
    for path in teachers:
        ckpt = read_checkpoint(path, lazy=True)
        seen = {}
        for dtype in ("stored", "fp32"):
            cfg = _cfg(path, dtype)
            rep, sh = replicate_teacher(ckpt, cfg, env), shard_teacher(ckpt, cfg, env)
            with torch.no_grad():
                seen[dtype] = {
                    "replicated": rep(x, t, y), "sharded": sh(x, t, y), "again": sh(x, t, y),
                    "dtypes": sorted({str(p.dtype) for p in [*sh.parameters(), *rep.parameters()]}),
                    "share": sum(n for _, n, _ in local_numel(sh)) / sum(f for _, _, f in local_numel(sh)),
                }
        result["teachers"][path] = seen

    cfg = _cfg(teachers[0])
    ckpt = read_checkpoint(teachers[0], lazy=True)
    torch.manual_seed(0)
    student, plan = build_student(cfg, ckpt)
    engine = FSDPEngine(cfg, env)
    engine.setup(student, ckpt, plan)
    result["student"] = _gathered(engine.raw_student)
    result["ema"] = _gathered(engine.ema.module)
    result["inherited"] = list(plan.inherited)

    path = Path(teachers[0]).resolve()
    os.environ["DITILL_CACHE_DIR"] = str(Path(out) / f"cache{env.rank}")
    if env.rank == 1:  # a stale entry that matches the file's stamps: read it and rank 1 would disagree
        cached_digest(str(path), "teacher", [path], lambda: "0" * 64)
    result["identity"] = shared_teacher_identity(str(path), ckpt.config)
    torch.save(result, Path(out) / f"rank{env.rank}.pt")
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
