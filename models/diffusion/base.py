"""The one interface the trainer and the samplers see, whatever the noising process.

Gaussian diffusion (DiT, PixArt-Σ) and rectified flow (FLUX) differ in how t is drawn, how x_t is
formed, what the network is fed as its timestep and what it regresses. Everything else in a
distillation step (teacher and student on the same x_t and t, named per-sample loss terms) is the
same, so the loop talks to an `Objective` and never asks which one it has.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: (B, ...) → (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) reshaped to (B, 1, ..., 1) so they scale a tensor shaped like `like`."""
    return values.view(values.shape[0], *([1] * (like.ndim - 1)))


def check_output_channels(objective: "Objective", model_output: torch.Tensor, x: torch.Tensor) -> None:
    """Fail clearly when a network's output width does not fit the objective (e.g. σ not learned)."""
    expected = objective.out_channels(x.shape[1])
    if model_output.shape[1] != expected:
        raise ValueError(
            f"model output has {model_output.shape[1]} channels; {objective.kind} expects {expected} "
            f"for {x.shape[1]} input channels"
        )


@runtime_checkable
class Objective(Protocol):
    """A noising process plus its training loss and what the samplers need of it.

    Tensors are channel-first (B, C, ...); a learned-variance model returns 2·C channels on dim 1.
    `seq_len` (the image token count) matters only to resolution-dependent schedules (FLUX's
    shift); objectives that do not use it accept and ignore it, so callers may always pass it.
    """

    kind: str

    def out_channels(self, in_channels: int) -> int:
        """Channels the network must output for `in_channels` input channels."""
        ...

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        *,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Training timesteps t, shape (B,), in the objective's own units (see `model_timestep`)."""
        ...

    def timesteps_from_uniform(
        self, u: torch.Tensor, positions: torch.Tensor, *, seq_len: int | None = None
    ) -> torch.Tensor:
        """Training timesteps from per-sample uniforms u (B,) in (0, 1) — the same law as
        `sample_timesteps`, but a pure function of each sample's own number and its position in the
        global batch (stratified sampling), so a run's draws do not depend on its world size."""
        ...

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t from clean x0 and standard normal `noise` at timesteps t (B,)."""
        ...

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the network's timestep embedder is fed for the objective's t."""
        ...

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values or None): ε/v part and, with learned σ, the interpolation part."""
        ...

    def training_losses(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Named per-sample loss terms, each (B,) in float32 or wider, including "loss" (their total)."""
        ...

    def sampling_timesteps(self, steps: int, method: str, *, seq_len: int | None = None) -> torch.Tensor:
        """The model timesteps a `method` sampler with `steps` steps feeds the network, in call order.

        Dynamic students precompute their per-timestep masks from this before sampling.
        """
        ...


def noisy_inputs(
    objective: Objective,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training draw: (x_t, t, noise) for a clean batch x0, with t and noise from `generator`.

    The generator, if given, must live on x0's device.
    """
    t = objective.sample_timesteps(x0.shape[0], x0.device, generator, seq_len=seq_len)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return objective.add_noise(x0, t, noise), t, noise
