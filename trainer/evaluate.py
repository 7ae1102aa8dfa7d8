"""Sample grids and router maps during training. Every rank runs them (sharded models need all
ranks in the forward); only rank 0 writes what they produce."""
from __future__ import annotations

import torch

from models.diffusion.samplers import sample
from trainer.config import SampleConfig


def fixed_inputs(model, cfg: SampleConfig, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The same noise and labels at every evaluation, so grids are comparable across steps."""
    g = torch.Generator().manual_seed(cfg.seed)
    mc = model.config
    noise = torch.randn(cfg.num, mc.in_channels, mc.input_size, mc.input_size, generator=g).to(device)
    labels = (torch.arange(cfg.num) % mc.num_classes).to(device)
    return noise, model.condition({"y": labels})


@torch.no_grad()
def sample_images(module, raw_model, objective, cfg: SampleConfig, device: torch.device, autocast) -> torch.Tensor:
    was_training = module.training
    module.eval()
    noise, cond = fixed_inputs(raw_model, cfg, device)
    null = raw_model.null_condition(cond) if cfg.cfg_scale != 1.0 else None
    with autocast:
        x = sample(
            lambda x, t, **c: module(x, t, **c),
            objective,
            noise,
            cond,
            null_cond=null,
            cfg_scale=cfg.cfg_scale,
            steps=cfg.steps,
            method=cfg.method,
            seq_len=raw_model.config.num_tokens,
        )
    module.train(was_training)
    return x.float()


@torch.no_grad()
def router_map(module, raw_model, objective, device: torch.device, points: int = 32) -> dict[str, torch.Tensor]:
    """Active-unit fraction per (layer, unit) against timestep: {"heads": (L·H, T), "channels": (L·G, T)}.

    Width masks depend on t alone, so one forward over a batch of `points` timesteps (with any
    input) reads them all; the same forward runs on every rank.
    """
    mc = raw_model.config
    was_training = module.training
    module.eval()
    t = objective.sampling_timesteps(points, "ddim" if objective.kind == "gaussian" else "euler").to(device)
    x = torch.zeros(len(t), mc.in_channels, mc.input_size, mc.input_size, device=device)
    y = raw_model.null_condition(raw_model.condition({"y": torch.zeros(len(t), dtype=torch.long, device=device)}))
    _, aux = module(x, t, **y, return_aux=True)
    module.train(was_training)
    heads = aux["head_masks"].float()  # (T, L, H)
    chans = aux["channel_masks"].float()
    return {
        "heads": heads.permute(1, 2, 0).reshape(-1, len(t)),
        "channels": chans.permute(1, 2, 0).reshape(-1, len(t)),
    }
