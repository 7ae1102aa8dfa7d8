"""DDPM, DDIM and Euler sampling loops with classifier-free guidance, one network call per step.

`model_fn(x, t_model, **cond) -> output` is any callable in the DiT calling convention (channels on
dim 1, 2·C of them with learned σ). It must return a tensor: wrap a model whose forward also returns
extras. Guidance runs the conditional and the null batch as one doubled batch and mixes
`uncond + s·(cond − uncond)` on the prediction channels only; the variance channels (and any
prediction channel left out by `cfg_channels`) are taken from the conditional half.

The timesteps fed to the network are exactly `objective.sampling_timesteps(steps, method)`, so a
dynamic model can precompute its per-timestep masks before the loop.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterator, Mapping

import torch

from models.diffusion import flow, gaussian
from models.diffusion.base import Objective, check_output_channels

ModelFn = Callable[..., torch.Tensor]
METHODS = gaussian.METHODS + flow.METHODS


def batch_conditions(cond: Mapping[str, Any], null_cond: Mapping[str, Any]) -> dict[str, Any]:
    """[cond; null] along dim 0 for every tensor; non-tensor values must agree and pass through once."""
    if set(cond) != set(null_cond):
        raise ValueError(f"cond keys {sorted(cond)} differ from null_cond keys {sorted(null_cond)}")
    merged: dict[str, Any] = {}
    for key, value in cond.items():
        null = null_cond[key]
        if isinstance(value, torch.Tensor) and isinstance(null, torch.Tensor):
            merged[key] = torch.cat([value, null], dim=0)
        elif not isinstance(value, torch.Tensor) and not isinstance(null, torch.Tensor) and value == null:
            merged[key] = value
        else:
            raise ValueError(f"cannot batch cond[{key!r}] with null_cond[{key!r}]: need two tensors or equal values")
    return merged


def classifier_free_guidance(
    output: torch.Tensor, cfg_scale: float, pred_channels: int, cfg_channels: int | None = None
) -> torch.Tensor:
    """Mix a doubled-batch output [cond; uncond] (2B, ...) into the guided output (B, ...).

    Channels [0, cfg_channels) (default: all `pred_channels` of the ε/v prediction) become
    `uncond + cfg_scale·(cond − uncond)`; every other channel is the conditional one. DiT's own
    `forward_with_cfg` guides only 3 of 4 latent channels: `cfg_channels=3` reproduces it.
    """
    guided_channels = pred_channels if cfg_channels is None else cfg_channels
    if not 0 < guided_channels <= pred_channels:
        raise ValueError(f"cfg_channels={cfg_channels} must be in [1, {pred_channels}]")
    cond_out, uncond_out = output.chunk(2, dim=0)
    c, u = cond_out[:, :guided_channels], uncond_out[:, :guided_channels]
    return torch.cat([u + cfg_scale * (c - u), cond_out[:, guided_channels:]], dim=1)


def guided_model(
    model_fn: ModelFn,
    cond: Mapping[str, Any],
    null_cond: Mapping[str, Any] | None,
    cfg_scale: float,
    pred_channels: int,
    cfg_channels: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`(x, t_model) -> output` with guidance folded in; cfg_scale == 1 is a plain conditional call."""
    if cfg_scale == 1.0:
        return lambda x, t: model_fn(x, t, **cond)
    if null_cond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs null_cond")
    both = batch_conditions(cond, null_cond)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both)
        return classifier_free_guidance(out.to(x.dtype), cfg_scale, pred_channels, cfg_channels)

    return call


def _report_progress(total: int, label: str) -> Iterator[int]:
    """range(total), with a one-line step counter and rate on stderr (models/ stays free of tqdm)."""
    start = time.perf_counter()
    for i in range(total):
        yield i
        rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
        end = "\n" if i + 1 == total else ""
        print(f"\r{label}: {i + 1}/{total} ({rate:.2f} steps/s)", end=end, file=sys.stderr, flush=True)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    objective: Objective,
    noise: torch.Tensor,
    cond: Mapping[str, Any],
    *,
    null_cond: Mapping[str, Any] | None = None,
    cfg_scale: float = 1.0,
    steps: int,
    method: str,
    eta: float = 0.0,
    cfg_channels: int | None = None,
    seq_len: int | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    step_noise: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise `noise` (B, C, ...) to x0 with `steps` steps of `method` ("ddpm", "ddim" or "euler").

    DDPM/DDIM need a `GaussianDiffusion` (respaced to `steps`, DiT spacing), Euler a
    `RectifiedFlow`. `eta` is DDIM's stochasticity (0 = deterministic); `seq_len` is the image token
    count for a resolution-shifted flow; `generator` (on noise's device) draws the per-step noise,
    unless `step_noise(i, x)` gives step i's noise shaped like x (per-sample counter-based noise, so
    a sample's trajectory does not depend on the batch it shares: `trainer.sampling`).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method in gaussian.METHODS and not isinstance(objective, gaussian.GaussianDiffusion):
        raise ValueError(f"method={method!r} needs a GaussianDiffusion objective, got {type(objective).__name__}")
    if method in flow.METHODS and not isinstance(objective, flow.RectifiedFlow):
        raise ValueError(f"method={method!r} needs a RectifiedFlow objective, got {type(objective).__name__}")
    channels, batch = noise.shape[1], noise.shape[0]
    denoise = guided_model(model_fn, cond, null_cond, cfg_scale, channels, cfg_channels)
    t_model = objective.sampling_timesteps(steps, method, seq_len=seq_len).to(noise.device)
    order = _report_progress(len(t_model), f"{method} {steps} steps") if progress else range(len(t_model))

    def model_output(x: torch.Tensor, i: int) -> torch.Tensor:
        out = denoise(x, t_model[i].expand(batch)).to(x.dtype)
        check_output_channels(objective, out, x)
        return out

    x = noise
    if method == "euler":
        grid = objective.time_grid(steps, seq_len=seq_len)
        for i in order:
            x = objective.euler_step(model_output(x, i), x, float(grid[i]), float(grid[i + 1]))
        return x
    process = objective.respaced(steps)
    for i in order:
        index = process.num_timesteps - 1 - i  # the respaced step, counting down
        t = torch.full((batch,), index, dtype=torch.long, device=noise.device)
        needs_noise = index > 0 and (method == "ddpm" or eta > 0)
        noise_i = None
        if needs_noise:
            noise_i = (step_noise(i, x).to(x.dtype) if step_noise is not None
                       else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        out = model_output(x, i)
        if method == "ddpm":
            x = process.ddpm_step(out, x, t, noise_i)
        else:
            x = process.ddim_step(out, x, t, noise_i, eta)
    return x
