"""FLUX's rectified flow: the resolution-shifted schedule against diffusers' FlowMatchEulerDiscreteScheduler
(as FluxPipeline sets it up), Euler sampling step for step, and the shifted training-time laws."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from models.diffusion.flow import RectifiedFlow, shift_time
from models.diffusion.samplers import sample

# FLUX.1-dev's scheduler_config.json
DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def flux_flow(**kw) -> RectifiedFlow:
    return RectifiedFlow(dynamic_shift=True, **kw)


def diffusers_schedule(steps: int, seq_len: int | None):
    """FluxPipeline.__call__: sigmas = linspace(1, 1/N, N), mu = calculate_shift(seq_len)."""
    if seq_len is None:  # schnell: no dynamic shift, shift 1
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    else:
        sched = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    return sched


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_28_step_schedule_matches_diffusers_dynamic_shifting(seq_len):
    sched = diffusers_schedule(28, seq_len)
    flow = flux_flow()
    # float32 in diffusers, float64 here: they agree to fp32 rounding
    torch.testing.assert_close(flow.time_grid(28, seq_len=seq_len).float(), sched.sigmas, rtol=0, atol=2e-7)
    torch.testing.assert_close(flow.sampling_timesteps(28, "euler", seq_len=seq_len), sched.timesteps, rtol=0, atol=2e-4)
    mu = math.log(flow.shift_factor(seq_len))
    assert mu == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    assert {256: 0.5, 4096: 1.15}.get(seq_len, mu) == pytest.approx(mu)


def test_schnell_four_steps_no_shift_matches_diffusers():
    sched = diffusers_schedule(4, None)
    flow = RectifiedFlow()  # schnell: no shift
    torch.testing.assert_close(flow.time_grid(4).float(), sched.sigmas, rtol=0, atol=2e-7)
    assert flow.sampling_timesteps(4, "euler").tolist() == pytest.approx([1000.0, 750.0, 500.0, 250.0])


@pytest.mark.parametrize("seq_len", [256, 4096])
def test_euler_sampling_follows_the_diffusers_scheduler_step_for_step(seq_len):
    """Our sampler on the shifted grid vs diffusers' scheduler.step loop, same velocity field."""

    def velocity(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        return 0.7 * x * (t_model / 1000).view(-1, 1, 1, 1) - 0.3 * torch.tanh(x)

    noise = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    ours = sample(lambda x, t: velocity(x, t), flux_flow(), noise, {}, steps=28, method="euler", seq_len=seq_len)
    sched = diffusers_schedule(28, seq_len)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(velocity(x, t.expand(2)), t, x, return_dict=False)[0]
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("law", ["uniform", "logit_normal"])
@pytest.mark.parametrize("seq_len", [256, 4096])
def test_training_times_are_the_shifted_law(law, seq_len):
    """Empirical CDF of drawn t against the closed form: P(t' ≤ a) = F(s⁻¹(a)), s = e^mu, where F is the
    uniform or logit-normal(0, 1) CDF and s⁻¹(a) = a / (s − (s − 1)·a)."""
    flow = flux_flow(timestep_sampling=law, logit_mean=0.0, logit_std=1.0)
    n = 40_000
    t = flow.sample_timesteps(n, "cpu", torch.Generator().manual_seed(3), seq_len=seq_len).double()
    s = flow.shift_factor(seq_len)
    a = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    inv = a / (s - (s - 1) * a)
    torch.testing.assert_close(shift_time(inv, s), a)  # s⁻¹ is the inverse of the shift
    if law == "uniform":
        cdf = inv
    else:
        cdf = 0.5 * (1 + torch.erf(torch.log(inv / (1 - inv)) / math.sqrt(2)))
    empirical = (t[:, None] <= a[None]).double().mean(0)
    assert (empirical - cdf).abs().max() < 0.012  # DKW: P(sup gap > 0.012) < 2e-5 at n = 40k
    with pytest.raises(ValueError, match="seq_len"):
        flow.sample_timesteps(2, "cpu")
