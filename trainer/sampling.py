"""Sampling whose sample i is the same image whatever the batch, the rank or the world size.

What a sample is made of is a function of (seed, sample index) alone: its initial noise, its class
label when labels are drawn, and each DDPM/DDIM step's noise are counter-based draws
(`models/rng.py`) keyed on the sample's index, so a sample does not depend on which other samples
share its batch. What the arithmetic does still depends on the batch *shape* (BLAS picks GEMM
blockings by size), so samplers work in chunks of a fixed size, numbered the same whatever the
world size; a rank takes chunks r, r+W, …, and a chunk is computed identically wherever it runs.

Used by `launch.sample` (`trainer.sample_job`), the in-training evaluation (`trainer.evaluate`) and
`launch.benchmark sample`, so all three sample the same images from the same seed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from models import family_of
from models.diffusion.samplers import sample
from models.rng import counter_normal, counter_uniform, sample_seeds

# counter streams of `models.rng.sample_seeds` for sampling (training uses 0-4)
INITIAL_NOISE, STEP_NOISE, LABELS = 16, 17, 18

Observer = Callable[[int, torch.Tensor, Mapping[str, torch.Tensor]], None]  # (step, t_model, aux)


@dataclass(frozen=True)
class Sampler:
    """How a batch is denoised: the same for every model compared (teacher and students)."""

    method: str = "ddpm"  # ddpm | ddim | euler
    steps: int = 250
    cfg_scale: float = 1.0  # guidance scale; a guidance-distilled model is told it instead
    seed: int = 0
    eta: float = 0.0  # DDIM's stochasticity
    cfg_channels: Optional[int] = None  # guide only the first k prediction channels (DiT's forward_with_cfg: 3)


def seeds_of(seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """(B,) int64 per-sample seeds of samples `indices` for one stream."""
    return sample_seeds(seed, 0, indices.to(torch.int64), stream)


def initial_noise(seed: int, indices: torch.Tensor, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, *shape) standard normal noise; row b depends only on (seed, indices[b])."""
    idx = indices.to(device=device, dtype=torch.int64)
    n = int(np.prod(shape))
    return counter_normal(seeds_of(seed, idx, INITIAL_NOISE), 0, n).view(len(idx), *shape)


def step_noise_fn(seed: int, indices: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """`(step i, x) → noise like x`: DDPM's ancestral noise per sample and per step (salt = step)."""

    def draw(i: int, x: torch.Tensor) -> torch.Tensor:
        idx = indices.to(device=x.device, dtype=torch.int64)
        return counter_normal(seeds_of(seed, idx, STEP_NOISE), i, x[0].numel()).view_as(x)

    return draw


def class_labels(seed: int, indices: torch.Tensor, num_classes: int, balanced: bool = False) -> torch.Tensor:
    """(B,) labels: drawn uniformly per sample from its seed (as DiT's `sample_ddp.py` draws them, but
    per sample instead of per rank), or `index mod num_classes` (every class equally often)."""
    idx = indices.to(torch.int64)
    if balanced:
        return idx % num_classes
    u = counter_uniform(seeds_of(seed, idx, LABELS), 0, 1)[:, 0].double()
    return (u * num_classes).long().clamp_(max=num_classes - 1)


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of `chunk` samples (the last may be shorter)."""
    if n < 1 or chunk < 1:
        raise ValueError(f"need at least one sample and a chunk size ≥ 1, got {n} samples in chunks of {chunk}")
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def guidance_inputs(model: nn.Module, cond: Mapping[str, Any], cfg_scale: float
                    ) -> tuple[dict[str, Any], Optional[dict[str, Any]], float]:
    """(cond, null_cond, cfg_scale) for the sampler. A guidance-distilled model (its family takes a
    guidance value) is told g = cfg_scale and runs once per step; any other model gets classifier-free
    guidance against its null condition (none when cfg_scale = 1)."""
    cond = dict(cond)
    if family_of(model).conditioning(model.config).guidance:
        ref = next(v for v in cond.values() if torch.is_tensor(v))
        return {**cond, "guidance": torch.full((len(ref),), float(cfg_scale), device=ref.device)}, None, 1.0
    if not uses_cfg(model, cfg_scale):
        return cond, None, 1.0
    return cond, model.null_condition(cond), cfg_scale


def uses_cfg(model: nn.Module, cfg_scale: float) -> bool:
    """Whether sampling runs a doubled (conditional + null) batch: classifier-free guidance of a model
    without a guidance input."""
    return cfg_scale != 1.0 and not family_of(model).conditioning(model.config).guidance


def forwards_per_sample(model: nn.Module, sampler: "Sampler") -> int:
    """Network rows one sample costs over a sampling loop (× 2 under classifier-free guidance)."""
    return sampler.steps * (2 if uses_cfg(model, sampler.cfg_scale) else 1)


def text_length(cond: Mapping[str, Any]) -> Optional[int]:
    emb = cond.get("text_emb")
    return int(emb.shape[1]) if torch.is_tensor(emb) else None


@torch.no_grad()
def sample_latents(model: nn.Module, objective, sampler: Sampler, indices: torch.Tensor, cond: Mapping[str, Any], *,
                   shape: tuple[int, int, int], device: torch.device, module: Optional[nn.Module] = None,
                   autocast: Optional[contextlib.AbstractContextManager] = None,
                   observe: Optional[Observer] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (B, C, H, W) float32 on the CPU, multiply-adds per sample (B,) float64) of samples
    `indices` under condition `cond` (rows in the same order).

    `model` is the raw model (config, null condition); `module` what to call (a DDP/FSDP wrapper of
    it; default `model`). A dynamic model runs its inference path and its FLOPs are what its routers
    switched on (`family.realised_flops`, both halves of a guided batch counted); a static model's
    are its static count per forward. `observe(step, t_model, aux)` sees every network call's aux.
    """
    module = model if module is None else module
    family = family_of(model)
    cfg = model.config
    idx = indices.to(torch.int64)
    cond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}
    cond, null, cfg_scale = guidance_inputs(model, cond, sampler.cfg_scale)
    noise = initial_noise(sampler.seed, idx, shape, device)
    hw = tuple(shape[-2:])
    text_len = text_length(cond)
    flops = torch.zeros(len(idx), dtype=torch.float64)
    static = float(family.flops(cfg, hw, text_len)["total"])
    rows = 2 if null is not None else 1
    dynamic = bool(getattr(cfg, "dynamic", False))
    step = [0]

    def call(x: torch.Tensor, t: torch.Tensor, **c: Any) -> torch.Tensor:
        nonlocal flops
        if dynamic or observe is not None:
            out, aux = module(x, t, **c, return_aux=True)
            if dynamic:
                f = family.realised_flops(cfg, aux, hw, text_len).double().cpu()
                flops += f.view(rows, len(idx)).sum(0)
            if observe is not None:
                observe(step[0], t, aux)
        else:
            out = module(x, t, **c)
        step[0] += 1
        return out

    was_training = module.training
    module.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            x = sample(call, objective, noise, cond, null_cond=null, cfg_scale=cfg_scale, steps=sampler.steps,
                       method=sampler.method, eta=sampler.eta, cfg_channels=sampler.cfg_channels,
                       seq_len=family.image_tokens(cfg, hw), step_noise=step_noise_fn(sampler.seed, idx))
    finally:
        module.train(was_training)
    if not dynamic:
        flops += static * rows * step[0]  # every call ran `rows` rows per sample at full width
    return x.float().cpu(), flops


class Decoder:
    """Model-space latents (B, C, h, w) → uint8 images (B, H, W, C): through a local diffusers
    `AutoencoderKL` (`latents / scaling + shift` is what it decodes), or as pixels for a pixel-space
    model. Pixels in [-1, 1] become `clamp(127.5·x + 128, 0, 255)` as DiT's `sample_ddp.py` does."""

    def __init__(self, vae: Optional[str] = None, device: torch.device | str = "cpu", scaling: Optional[float] = None,
                 shift: Optional[float] = None, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype, self.vae, self.path = torch.device(device), dtype, None, vae
        self.scaling, self.shift = 1.0, 0.0
        if vae is not None:
            from diffusers import AutoencoderKL

            from data.text_encoders import local_dir

            self.vae = AutoencoderKL.from_pretrained(local_dir(vae, "--vae"), local_files_only=True).to(self.device, dtype).eval()
            self.scaling = float(scaling if scaling is not None else self.vae.config.scaling_factor)
            config_shift = getattr(self.vae.config, "shift_factor", None)
            self.shift = float(shift if shift is not None else (config_shift or 0.0))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        x = latents
        if self.vae is not None:
            z = latents.to(self.device, self.dtype) / self.scaling + self.shift
            x = self.vae.decode(z).sample.float()
        return to_uint8(x)

    def describe(self) -> dict[str, Any]:
        return {"vae": self.path, "scaling_factor": self.scaling if self.vae is not None else None,
                "shift_factor": self.shift if self.vae is not None else None}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] → uint8 (B, H, W, C), DiT's rounding (`+128`, then truncation)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def rgb(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 1|3) → (B, H, W, 3): grey repeated, as ADM's batches hold three channels."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
