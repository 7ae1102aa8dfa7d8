"""Rectified flow as FLUX (and SD3) define it: a straight path from data to noise.

`x_t = (1 − t)·x0 + t·ε` for continuous t ∈ [0, 1] (t = 1 is pure noise), and the network regresses
the constant velocity `v = ε − x0`. Training times are drawn uniform or logit-normal and then
shifted towards noise, either by a fixed SD3 factor s (`t' = s·t / (1 + (s − 1)·t)`) or by FLUX's
resolution rule (s = e^mu, mu linear in the image token count), because larger images need more
steps at high noise. Sampling integrates dx/dt = v with Euler steps on the same shifted grid.
"""
from __future__ import annotations

import math

import torch

from models.diffusion.base import check_output_channels, mean_flat

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
METHODS = ("euler",)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift `s·t / (1 + (s − 1)·t)`; fixes 0 and 1, moves mass towards 1 for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(
    seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
) -> float:
    """FLUX's resolution rule: mu linear in the token count, 0.5 at 256 tokens, 1.15 at 4096 (1024²)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


class RectifiedFlow:
    """Velocity-prediction flow matching with optional time shift.

    timestep_sampling: "uniform" on [0, 1) or "logit_normal" (sigmoid of N(logit_mean, logit_std²)).
    shift: a fixed SD3 shift factor s (1 = none). dynamic_shift: FLUX's rule instead, s = e^mu with
    mu from `flux_mu(seq_len, ...)`; it then needs `seq_len` wherever times are drawn or laid out.
    timestep_scale: the network is fed t·timestep_scale (1000 matches diffusers' FLUX transformer
    input convention of sigma·1000; use 1 for a model that scales t itself).
    """

    kind = "flow"

    def __init__(
        self,
        *,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        dynamic_shift: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        timestep_scale: float = 1000.0,
    ) -> None:
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is not one of {TIMESTEP_SAMPLING}")
        if shift <= 0:
            raise ValueError(f"shift={shift} must be positive")
        if dynamic_shift and shift != 1.0:
            raise ValueError("give either a fixed shift or dynamic_shift, not both")
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift
        self.dynamic_shift = dynamic_shift
        self.base_shift = base_shift
        self.max_shift = max_shift
        self.base_seq_len = base_seq_len
        self.max_seq_len = max_seq_len
        self.timestep_scale = timestep_scale

    def shift_factor(self, seq_len: int | None = None) -> float:
        """The s in `shift_time` for an image of `seq_len` tokens."""
        if not self.dynamic_shift:
            return self.shift
        if seq_len is None:
            raise ValueError("dynamic_shift needs the image token count (seq_len)")
        return math.exp(flux_mu(seq_len, self.base_shift, self.max_shift, self.base_seq_len, self.max_seq_len))

    # ------------------------------------------------------------------------- Objective interface
    def out_channels(self, in_channels: int) -> int:
        return in_channels

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        *,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Continuous t (B,) in [0, 1], float32, already shifted."""
        if self.timestep_sampling == "uniform":
            t = torch.rand(batch_size, generator=generator, device=device)
        else:
            z = torch.randn(batch_size, generator=generator, device=device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return shift_time(t, self.shift_factor(seq_len))

    def timesteps_from_uniform(
        self, u: torch.Tensor, positions: torch.Tensor, *, seq_len: int | None = None
    ) -> torch.Tensor:
        """Continuous t (B,) from uniforms: u itself, or sigmoid(mean + std·Φ⁻¹(u)); then shifted."""
        if self.timestep_sampling == "uniform":
            t = u.float()
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(u.double())).float()
        return shift_time(t, self.shift_factor(seq_len))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t)·x0 + t·ε."""
        t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * noise

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.timestep_scale

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model_output, None

    def training_losses(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample "mse" of the velocity against ε − x0, and "loss" (= mse), in at least float32."""
        check_output_channels(self, model_output, x0)
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        target = noise.to(dtype) - x0.to(dtype)
        mse = mean_flat((model_output.to(dtype) - target) ** 2)
        return {"mse": mse, "loss": mse}

    def sampling_timesteps(self, steps: int, method: str, *, seq_len: int | None = None) -> torch.Tensor:
        """Model timesteps (float32, descending) the `steps`-step Euler sampler feeds the network."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not a flow sampler; use one of {METHODS}")
        return (self.time_grid(steps, seq_len=seq_len)[:-1] * self.timestep_scale).float()

    # ----------------------------------------------------------------------------------- sampling
    def time_grid(self, steps: int, *, seq_len: int | None = None) -> torch.Tensor:
        """The `steps + 1` times 1 → 0 an Euler sampler visits: shifted `linspace(1, 0, steps + 1)`, float64."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift_factor(seq_len))

    @staticmethod
    def euler_step(velocity: torch.Tensor, x: torch.Tensor, t_cur: float, t_next: float) -> torch.Tensor:
        """x ← x + (t_next − t_cur)·v, integrating from noise (t = 1) towards data (t = 0)."""
        return x + (t_next - t_cur) * velocity.to(x.dtype)
