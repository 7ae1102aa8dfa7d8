"""Engines behind one interface; `build_engine` picks one from the config and the world size."""
from __future__ import annotations

from trainer.config import RunConfig
from trainer.distributed import DistEnv
from trainer.engines.base import Engine


def resolve_kind(cfg: RunConfig, world_size: int) -> str:
    kind = cfg.engine.kind
    if kind == "auto":
        return "single" if world_size == 1 else "fsdp"
    return kind


def build_engine(cfg: RunConfig, env: DistEnv) -> Engine:
    kind = resolve_kind(cfg, env.world_size)
    if kind == "single":
        if env.world_size > 1:
            raise ValueError(f"engine.kind=single cannot run on {env.world_size} ranks; use ddp, fsdp or deepspeed")
        from trainer.engines.single import SingleEngine

        return SingleEngine(cfg, env)
    if kind == "ddp":
        from trainer.engines.ddp import DDPEngine

        return DDPEngine(cfg, env)
    if kind == "fsdp":
        from trainer.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg, env)
    if kind == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine  # type: ignore[import-not-found]

        return DeepSpeedEngine(cfg, env)
    raise ValueError(f"engine.kind={kind!r} is not one of auto | single | ddp | fsdp | deepspeed")


__all__ = ["Engine", "build_engine", "resolve_kind"]
