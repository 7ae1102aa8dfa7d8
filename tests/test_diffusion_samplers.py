"""Classifier-free guidance, the sampler loops and the objective factory."""
from __future__ import annotations

import pytest
import torch

from models.diffusion import GaussianDiffusion, Objective, RectifiedFlow, build_objective, noisy_inputs
from models.diffusion.samplers import batch_conditions, classifier_free_guidance, guided_model, sample


class ToyModel:
    """Affine in the label y, so guidance with scale s equals no guidance with y_null + s·(y − y_null).

    Prediction channels: 0.2·x + y·w + 1e-4·t. Learned-σ channels (if any) depend on x only, so the
    conditional and the effective-label runs agree on them too. Records every call.
    """

    def __init__(self, channels: int, learned_sigma: bool):
        self.w = torch.linspace(-1.0, 1.0, channels).view(1, channels, 1, 1)
        self.learned_sigma = learned_sigma
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone()))
        pred = 0.2 * x + y.view(-1, 1, 1, 1) * self.w + 1e-4 * t.to(x.dtype).view(-1, 1, 1, 1)
        return torch.cat([pred, 0.5 * torch.tanh(x)], 1) if self.learned_sigma else pred


def test_batch_conditions():
    cond = {"y": torch.tensor([1, 2]), "mask": torch.ones(2, 3), "flag": True}
    null = {"y": torch.tensor([9, 9]), "mask": torch.zeros(2, 3), "flag": True}
    both = batch_conditions(cond, null)
    assert both["y"].tolist() == [1, 2, 9, 9] and both["mask"].shape == (4, 3) and both["flag"] is True
    with pytest.raises(ValueError):
        batch_conditions(cond, {"y": null["y"]})
    with pytest.raises(ValueError):
        batch_conditions({"y": torch.ones(1)}, {"y": None})


def test_guidance_combination_math():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 8, 2, 2, generator=gen)  # 4 prediction + 4 variance channels
    out = classifier_free_guidance(torch.cat([cond, uncond]), 2.5, pred_channels=4)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 2.5 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])
    dit = classifier_free_guidance(torch.cat([cond, uncond]), 2.5, pred_channels=4, cfg_channels=3)
    torch.testing.assert_close(dit[:, :3], out[:, :3])
    torch.testing.assert_close(dit[:, 3:], cond[:, 3:])  # DiT's quirk: the 4th channel is unguided
    torch.testing.assert_close(classifier_free_guidance(torch.cat([cond, uncond]), 1.0, 4), cond)
    with pytest.raises(ValueError):
        classifier_free_guidance(torch.cat([cond, uncond]), 2.0, 4, cfg_channels=5)


def test_scale_one_is_a_single_conditional_pass():
    model = ToyModel(2, learned_sigma=True)
    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([5, 5, 5]), torch.tensor([1.0, 2.0, 3.0])
    fn = guided_model(model, {"y": y}, {"y": torch.zeros(3)}, 1.0, pred_channels=2)
    torch.testing.assert_close(fn(x, t), model(x, t, y))
    assert [b for b, _ in model.calls] == [3, 3]
    with pytest.raises(ValueError):
        guided_model(model, {"y": y}, None, 4.0, pred_channels=2)


@pytest.mark.parametrize(
    "objective, method",
    [(GaussianDiffusion(), "ddpm"), (GaussianDiffusion(), "ddim"), (GaussianDiffusion(variance="fixed_small"), "ddpm"),
     (RectifiedFlow(shift=3.0), "euler")],
    ids=["ddpm", "ddim", "ddpm-fixed", "euler"],
)
def test_guided_sampling_equals_effective_label_and_calls_once_per_step(objective, method):
    steps, scale = 6, 3.0
    learned = objective.out_channels(2) == 4
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    y, y_null = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.2])
    guided_model_ = ToyModel(2, learned)
    guided = sample(
        guided_model_, objective, noise, {"y": y}, null_cond={"y": y_null}, cfg_scale=scale,
        steps=steps, method=method, eta=0.5, generator=torch.Generator().manual_seed(2),
    )
    plain_model = ToyModel(2, learned)
    effective = sample(
        plain_model, objective, noise, {"y": y_null + scale * (y - y_null)},
        steps=steps, method=method, eta=0.5, generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(guided, effective, rtol=1e-5, atol=1e-5)
    assert [b for b, _ in guided_model_.calls] == [4] * steps  # one doubled call per step
    assert [b for b, _ in plain_model.calls] == [2] * steps
    fed = torch.stack([t[0] for _, t in plain_model.calls])
    expected = objective.sampling_timesteps(steps, method)
    assert fed.dtype == expected.dtype and torch.equal(fed, expected)
    assert all(torch.equal(t[:2], t[2:]) for _, t in guided_model_.calls)


def test_sampler_rejects_mismatches():
    noise = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError):
        sample(ToyModel(2, True), RectifiedFlow(), noise, {"y": torch.ones(1)}, steps=2, method="ddpm")
    with pytest.raises(ValueError):
        sample(ToyModel(2, False), GaussianDiffusion(), noise, {"y": torch.ones(1)}, steps=2, method="euler")
    with pytest.raises(ValueError, match="channels"):
        sample(ToyModel(2, False), GaussianDiffusion(), noise, {"y": torch.ones(1)}, steps=2, method="ddpm")
    with pytest.raises(ValueError):
        sample(ToyModel(2, True), GaussianDiffusion(), noise, {"y": torch.ones(1)}, steps=2, method="heun")


def test_training_losses_reject_a_wrong_output_width():
    x0 = torch.randn(2, 4, 4, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="8"):
        GaussianDiffusion().training_losses(x0, x0, x0, t, x0)  # σ learned: needs 8 channels
    with pytest.raises(ValueError, match="4"):
        RectifiedFlow().training_losses(torch.cat([x0, x0], 1), x0, x0, t.float(), x0)


def test_progress_report_counts_the_steps(capsys):
    out = sample(ToyModel(2, False), RectifiedFlow(), torch.randn(1, 2, 2, 2), {"y": torch.ones(1)},
                 steps=3, method="euler", progress=True)
    assert out.shape == (1, 2, 2, 2) and torch.isfinite(out).all()
    err = capsys.readouterr().err
    assert "euler 3 steps: 3/3" in err and err.endswith("\n")


def test_build_objective_and_noisy_inputs():
    gauss = build_objective("gaussian", timestep_sampling="stratified")
    flow = build_objective("flow", timestep_sampling="logit_normal")
    assert isinstance(gauss, GaussianDiffusion) and isinstance(flow, RectifiedFlow)
    assert isinstance(gauss, Objective) and isinstance(flow, Objective)
    with pytest.raises(ValueError):
        build_objective("edm")
    x0 = torch.randn(8, 4, 4, 4)
    for obj in (gauss, flow):
        x_t, t, noise = noisy_inputs(obj, x0, torch.Generator().manual_seed(3))
        assert t.shape == (8,) and x_t.shape == x0.shape
        torch.testing.assert_close(x_t, obj.add_noise(x0, t, noise))
        assert obj.model_timestep(t).shape == (8,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_objectives_and_samplers_on_cuda_match_cpu():
    """Schedule tables follow the tensors' device; CUDA generators drive every draw."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(9)
    x0, noise = torch.randn(2, 4, 4, 8, 8, generator=gen)
    out = torch.randn(4, 8, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    gauss = GaussianDiffusion()
    for obj, tt, o in ((gauss, t, out), (RectifiedFlow(), torch.rand(4, generator=gen), out[:, :4])):
        cpu = obj.training_losses(o, x0, obj.add_noise(x0, tt, noise), tt, noise)
        x_t = obj.add_noise(x0.to(dev), tt.to(dev), noise.to(dev))
        cuda = obj.training_losses(o.to(dev), x0.to(dev), x_t, tt.to(dev), noise.to(dev))
        for key in cpu:
            assert cuda[key].device.type == "cuda"
            torch.testing.assert_close(cuda[key].cpu(), cpu[key], rtol=1e-4, atol=1e-5)
    cuda_gen = torch.Generator(device=dev).manual_seed(0)
    strat = GaussianDiffusion(timestep_sampling="stratified").sample_timesteps(8, dev, cuda_gen)
    assert strat.device.type == "cuda" and torch.all(strat // 250 == torch.arange(8, device=dev) % 4)
    model = ToyModel(4, learned_sigma=True)
    model.w = model.w.to(dev)
    y, y_null = torch.tensor([1.0, 2.0], device=dev), torch.zeros(2, device=dev)
    z = torch.randn(2, 4, 8, 8, device=dev, generator=cuda_gen)
    sampled = sample(model, gauss, z, {"y": y}, null_cond={"y": y_null}, cfg_scale=4.0, steps=10,
                     method="ddpm", generator=cuda_gen)
    assert sampled.device.type == "cuda" and torch.isfinite(sampled).all()
    flow_model = ToyModel(4, learned_sigma=False)
    flow_model.w = flow_model.w.to(dev)
    flowed = sample(flow_model, RectifiedFlow(dynamic_shift=True), z, {"y": y}, null_cond={"y": y_null},
                    cfg_scale=2.0, steps=5, method="euler", seq_len=1024)
    assert flowed.device.type == "cuda" and torch.isfinite(flowed).all()
