"""Sample grids and router maps during training. Every rank runs them (sharded models need all
ranks in the forward); only rank 0 writes what they produce. Family-agnostic: shapes come from the
family (`latent_shape`), conditions from the family and a batch of the run's data (`eval_condition`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from models import family_of
from models.diffusion.samplers import sample
from trainer.config import SampleConfig


def fixed_inputs(model, cfg: SampleConfig, device: torch.device, batch: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, dict]:
    """The same noise and condition at every evaluation, so grids are comparable across steps."""
    g = torch.Generator().manual_seed(cfg.seed)
    family = family_of(model)
    shape = family.latent_shape(model.config)
    noise = torch.randn(cfg.num, *shape, generator=g).to(device)
    cond = family.eval_condition(model, cfg.num, batch)
    return noise, {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}


@torch.no_grad()
def sample_images(module, raw_model, objective, cfg: SampleConfig, device: torch.device, autocast,
                  batch: Mapping[str, Any] | None = None) -> torch.Tensor:
    """`cfg.num` samples of `module` from fixed inputs. A model with a guidance input (guidance-
    distilled) is told g = cfg.cfg_scale and runs once per step; others use classifier-free guidance."""
    was_training = module.training
    module.eval()
    noise, cond = fixed_inputs(raw_model, cfg, device, batch)
    own = getattr(module, "module", module)  # DDP's wrapper
    cfg_scale = cfg.cfg_scale
    if family_of(own).conditioning(own.config).guidance:
        cond, cfg_scale = {**cond, "guidance": torch.full((cfg.num,), cfg.cfg_scale, device=device)}, 1.0
    null = raw_model.null_condition(cond) if cfg_scale != 1.0 else None
    with autocast:
        x = sample(
            lambda x, t, **c: module(x, t, **c),
            objective,
            noise,
            cond,
            null_cond=null,
            cfg_scale=cfg_scale,
            steps=cfg.steps,
            method=cfg.method,
            seq_len=family_of(raw_model).image_tokens(raw_model.config, tuple(noise.shape[-2:])),
        )
    module.train(was_training)
    return x.float()


@torch.no_grad()
def router_map(module, raw_model, objective, device: torch.device, points: int = 32,
               batch: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Active-unit fraction per (layer, unit) against timestep: {"heads": (L·H, T), "channels": (L·G, T)}.

    Width masks depend on t alone, so one forward over a batch of `points` timesteps (with any
    input, the null condition) reads them all; the same forward runs on every rank.
    """
    family = family_of(raw_model)
    was_training = module.training
    module.eval()
    shape = family.latent_shape(raw_model.config)
    seq_len = family.image_tokens(raw_model.config, tuple(shape[-2:]))  # a resolution-shifted flow needs it
    t = objective.sampling_timesteps(points, "ddim" if objective.kind == "gaussian" else "euler", seq_len=seq_len).to(device)
    x = torch.zeros(len(t), *shape, device=device)
    cond = family.eval_condition(raw_model, len(t), batch)
    cond = raw_model.null_condition({k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()})
    _, aux = module(x, t, **cond, return_aux=True)
    module.train(was_training)
    heads = aux["head_masks"].float()  # (T, L, H)
    chans = aux["channel_masks"].float()
    return {
        "heads": heads.permute(1, 2, 0).reshape(-1, len(t)),
        "channels": chans.permute(1, 2, 0).reshape(-1, len(t)),
    }
