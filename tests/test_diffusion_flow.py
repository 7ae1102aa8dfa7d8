"""Rectified flow: the path, the target, the shift formulas and Euler sampling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.diffusion.flow import RectifiedFlow, flux_mu, shift_time
from models.diffusion.samplers import sample


def test_path_endpoints_and_interpolation():
    flow = RectifiedFlow()
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 1.0, 0.25])
    x_t = flow.add_noise(x0, t, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])


def test_velocity_target_and_losses():
    flow = RectifiedFlow()
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 2, 3, 3, generator=gen)
    t = torch.rand(4, generator=gen)
    x_t = flow.add_noise(x0, t, noise)
    exact = flow.training_losses(noise - x0, x0, x_t, t, noise)
    assert set(exact) == {"mse", "loss"} and exact["mse"].shape == (4,)
    assert torch.all(exact["loss"] == 0)
    zero = flow.training_losses(torch.zeros_like(x0).bfloat16(), x0, x_t, t, noise)
    assert zero["loss"].dtype == torch.float32
    torch.testing.assert_close(zero["mse"], ((noise - x0) ** 2).mean((1, 2, 3)))
    assert flow.out_channels(16) == 16
    pred, var = flow.split_output(x0)
    assert pred is x0 and var is None


def test_shift_formulas():
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.63)
    assert flux_mu(256) == pytest.approx(0.5)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert shift_time(t, 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])
    assert shift_time(t, 1.0).tolist() == t.tolist()
    # FLUX writes the shift as e^mu / (e^mu + (1/t − 1)): the same map with s = e^mu
    flow = RectifiedFlow(dynamic_shift=True)
    grid = flow.time_grid(8, seq_len=1024).numpy()
    lin = np.linspace(1, 0, 9)
    with np.errstate(divide="ignore"):
        bfl = math.exp(0.63) / (math.exp(0.63) + (1 / lin - 1))
    np.testing.assert_allclose(grid, bfl, rtol=1e-12, atol=1e-15)
    assert flow.shift_factor(4096) == pytest.approx(math.exp(1.15))


def test_time_grid_and_sampling_timesteps():
    plain = RectifiedFlow()
    np.testing.assert_allclose(plain.time_grid(4).numpy(), [1.0, 0.75, 0.5, 0.25, 0.0])
    assert plain.sampling_timesteps(4, "euler").tolist() == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    unit = RectifiedFlow(timestep_scale=1.0, shift=3.0)
    assert unit.sampling_timesteps(2, "euler").tolist() == pytest.approx([1.0, 0.75])
    assert plain.model_timestep(torch.tensor([0.5])).item() == pytest.approx(500.0)
    with pytest.raises(ValueError):
        plain.sampling_timesteps(4, "ddpm")
    with pytest.raises(ValueError):
        RectifiedFlow(dynamic_shift=True).sampling_timesteps(4, "euler")  # needs seq_len
    with pytest.raises(ValueError):
        RectifiedFlow(dynamic_shift=True, shift=3.0)


def test_training_timestep_distributions():
    n = 100_000
    uniform = RectifiedFlow().sample_timesteps(n, "cpu", torch.Generator().manual_seed(2))
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    ln = RectifiedFlow(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = ln.sample_timesteps(n, "cpu", torch.Generator().manual_seed(3)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    # the shift is applied to the drawn times, with the same draws
    flux = RectifiedFlow(dynamic_shift=True)
    shifted = flux.sample_timesteps(64, "cpu", torch.Generator().manual_seed(4), seq_len=4096)
    base = RectifiedFlow().sample_timesteps(64, "cpu", torch.Generator().manual_seed(4))
    torch.testing.assert_close(shifted, shift_time(base, math.exp(1.15)))


@pytest.mark.parametrize("flow", [RectifiedFlow(), RectifiedFlow(dynamic_shift=True)], ids=["plain", "flux-shift"])
def test_euler_with_oracle_velocity_recovers_x0(flow):
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 2, 3, 4, 4, generator=gen, dtype=torch.float64)

    def oracle(x, t_model):  # knows x0: on the straight path v = (x_t − x0)/t
        t = (t_model / 1000).to(x.dtype).view(-1, 1, 1, 1)
        return (x - x0) / t

    out = sample(oracle, flow, noise, {}, steps=7, method="euler", seq_len=1024)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
