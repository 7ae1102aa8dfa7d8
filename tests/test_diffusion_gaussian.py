"""Gaussian diffusion against closed forms computed independently (numpy/scipy/torch.distributions)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from models.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)

T = 1000


def np_schedule(num_timesteps: int = T) -> tuple[np.ndarray, np.ndarray]:
    """β and ᾱ straight from the definition, in numpy float64."""
    scale = 1000 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)
    return betas, np.cumprod(1 - betas)


def np_approx_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_decoder_log_prob(x: np.ndarray, mean: np.ndarray, std: np.ndarray, cdf=np_approx_cdf) -> np.ndarray:
    """log of the probability mass of the 1/255-half-width bin around x, edge bins open-ended."""
    upper = np.where(x > 0.999, np.inf, (x - mean + 1 / 255) / std)
    lower = np.where(x < -0.999, -np.inf, (x - mean - 1 / 255) / std)
    return np.log(cdf(upper) - cdf(lower))


def test_linear_betas_follow_dit_named_schedule():
    b = linear_betas(1000)
    assert b.dtype == torch.float64
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b250 = linear_betas(250)
    assert b250[0].item() == pytest.approx(4e-4) and b250[-1].item() == pytest.approx(0.08)
    np.testing.assert_allclose(b.numpy(), np_schedule()[0], rtol=1e-12)


def test_forward_process_moments_exact_and_empirical():
    diff = GaussianDiffusion()
    _, ac = np_schedule()
    t = torch.tensor([0, 300, 999])
    x0 = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64).view(3, 1)
    mean, var, log_var = diff.q_mean_variance(x0, t)
    np.testing.assert_allclose(mean.squeeze(1).numpy(), np.sqrt(ac[[0, 300, 999]]) * x0.squeeze(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(var.squeeze(1).numpy(), 1 - ac[[0, 300, 999]], rtol=1e-12)
    np.testing.assert_allclose(log_var.exp().numpy(), var.numpy(), rtol=1e-12)

    n = 200_000
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, n, generator=gen, dtype=torch.float64)
    x_t = diff.add_noise(x0.expand(3, n), t, noise)
    m_exp = np.sqrt(ac[[0, 300, 999]]) * x0.squeeze(1).numpy()
    v_exp = 1 - ac[[0, 300, 999]]
    assert np.all(np.abs(x_t.mean(1).numpy() - m_exp) < 5 * np.sqrt(v_exp / n))
    assert np.all(np.abs(x_t.var(1).numpy() / v_exp - 1) < 5 * np.sqrt(2 / n))


def test_q_posterior_matches_gaussian_conditioning():
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1})·q(x_{t-1}|x0): precision and mean from Bayes' rule."""
    diff = GaussianDiffusion()
    betas, ac = np_schedule()
    t = torch.tensor([1, 10, 500, 999])
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    x_t = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    mean, var, log_var = diff.q_posterior(x0, x_t, t)
    tn = t.numpy()
    beta, ac_prev = betas[tn][:, None], ac[tn - 1][:, None]
    precision = 1 / (1 - ac_prev) + (1 - beta) / beta
    exp_var = 1 / precision
    exp_mean = exp_var * (np.sqrt(ac_prev) * x0.numpy() / (1 - ac_prev) + np.sqrt(1 - beta) * x_t.numpy() / beta)
    np.testing.assert_allclose(var.expand_as(x0).numpy(), np.broadcast_to(exp_var, (4, 3)), rtol=1e-10)
    np.testing.assert_allclose(mean.numpy(), exp_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(log_var.exp().expand_as(x0).numpy(), np.broadcast_to(exp_var, (4, 3)), rtol=1e-10)
    # t = 0: the posterior is the point mass at x0; its log-variance is clipped to step 1's
    mean0, var0, log_var0 = diff.q_posterior(x0[:1], x_t[:1], torch.tensor([0]))
    np.testing.assert_allclose(mean0.numpy(), x0[:1].numpy(), rtol=1e-12)
    assert var0.item() == 0.0
    assert log_var0.item() == pytest.approx(math.log(betas[1] * (1 - ac[0]) / (1 - ac[1])), rel=1e-12)


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_discretized_log_likelihood_against_independent_computation():
    levels = np.linspace(-1, 1, 256)  # the 8-bit values rescaled to [-1, 1]
    rng = np.random.default_rng(3)
    x = rng.choice(levels, 400)
    x[:4] = [-1.0, 1.0, levels[1], levels[-2]]  # both edge bins and their neighbours
    mean = x + rng.normal(0, 0.03, 400)
    std = np.exp(rng.uniform(np.log(0.01), np.log(0.2), 400))
    ours = discretized_gaussian_log_likelihood(
        torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(np.log(std))
    ).numpy()
    # the same tanh-approximated CDF written independently: tight agreement
    np.testing.assert_allclose(ours, np_decoder_log_prob(x, mean, std), rtol=1e-7, atol=1e-10)
    # the exact normal CDF: DiT's tanh approximation is close within two standard deviations
    # (it drifts in the far tails, where DiT's loss uses it all the same)
    exact = np_decoder_log_prob(x, mean, std, cdf=norm.cdf)
    bulk = np.abs(x - mean) / std < 2
    assert bulk.sum() > 300
    np.testing.assert_allclose(ours[bulk], exact[bulk], atol=1e-2)


def test_discretized_likelihood_is_a_distribution_over_the_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mu, sigma in [(0.3, 0.05), (-0.95, 0.2), (0.0, 0.004)]:
        logp = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mu), torch.full_like(levels, math.log(sigma))
        )
        assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-9)


def test_learned_range_endpoints_and_fixed_variances():
    betas, ac = np_schedule()
    post_var = betas[1:] * (1 - ac[:-1]) / (1 - ac[1:])
    t = torch.tensor([1, 200, 999])
    like = torch.zeros(3, 2, dtype=torch.float64)
    learned = GaussianDiffusion()
    lo = learned.model_log_variance(torch.full_like(like, -1.0), t, like)
    hi = learned.model_log_variance(torch.full_like(like, 1.0), t, like)
    mid = learned.model_log_variance(torch.zeros_like(like), t, like)
    np.testing.assert_allclose(lo[:, 0].numpy(), np.log(post_var[[0, 199, 998]]), rtol=1e-12)
    np.testing.assert_allclose(hi[:, 0].numpy(), np.log(betas[[1, 200, 999]]), rtol=1e-12)
    np.testing.assert_allclose(mid.numpy(), ((lo + hi) / 2).numpy(), rtol=1e-12)
    large = GaussianDiffusion(variance="fixed_large").model_log_variance(None, t, like)
    small = GaussianDiffusion(variance="fixed_small").model_log_variance(None, t, like)
    torch.testing.assert_close(large, hi)
    torch.testing.assert_close(small, lo)
    # at t = 0 both fixed choices use β̃_1 (β̃_0 is 0)
    t0 = torch.tensor([0])
    l0 = GaussianDiffusion(variance="fixed_large").model_log_variance(None, t0, like[:1])
    assert l0[0, 0].item() == pytest.approx(math.log(post_var[0]), rel=1e-12)


def hand_hybrid_loss(x0, t, noise, eps_hat, v):
    """DiT's mse + vb for a single sample, in numpy float64 from the definitions."""
    betas, ac = np_schedule()
    a, b = ac[t], betas[t]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    mse = np.mean((noise - eps_hat) ** 2)
    pred_x0 = (x_t - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    a_prev = ac[t - 1] if t > 0 else 1.0
    post_var_1 = betas[1] * (1 - ac[0]) / (1 - ac[1])
    true_var = b * (1 - a_prev) / (1 - a) if t > 0 else post_var_1
    log_var = (v + 1) / 2 * np.log(b) + (1 - v) / 2 * np.log(true_var)

    def posterior_mean(start):
        return np.sqrt(a_prev) * b / (1 - a) * start + np.sqrt(1 - b) * (1 - a_prev) / (1 - a) * x_t

    mu_q, mu_p, var_p = posterior_mean(x0), posterior_mean(pred_x0), np.exp(log_var)
    if t == 0:
        vb = -np.mean(np_decoder_log_prob(x0, mu_p, np.sqrt(var_p))) / np.log(2)
    else:
        kl = 0.5 * np.log(var_p / true_var) + (true_var + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5
        vb = np.mean(kl) / np.log(2)
    return x_t, mse, vb


def test_hybrid_loss_matches_hand_computation_and_stops_mean_gradient():
    diff = GaussianDiffusion()
    rng = np.random.default_rng(4)
    levels = np.linspace(-1, 1, 256)
    x0 = rng.choice(levels, (3, 1, 2, 2))
    noise, eps_hat = rng.normal(size=(2, 3, 1, 2, 2))
    v = rng.uniform(-1, 1, (3, 1, 2, 2))
    t = [0, 37, 999]
    out = torch.tensor(np.concatenate([eps_hat, v], 1), dtype=torch.float32, requires_grad=True)
    x0_t, noise_t = torch.tensor(x0, dtype=torch.float32), torch.tensor(noise, dtype=torch.float32)
    tt = torch.tensor(t)
    x_t = diff.add_noise(x0_t, tt, noise_t)
    terms = diff.training_losses(out, x0_t, x_t, tt, noise_t)
    assert set(terms) == {"mse", "vb", "loss"} and all(v_.shape == (3,) for v_ in terms.values())
    for i in range(3):
        exp_xt, exp_mse, exp_vb = hand_hybrid_loss(x0[i], t[i], noise[i], eps_hat[i], v[i])
        np.testing.assert_allclose(x_t[i].numpy(), exp_xt, rtol=1e-5, atol=1e-6)
        assert terms["mse"][i].item() == pytest.approx(exp_mse, rel=1e-5)
        assert terms["vb"][i].item() == pytest.approx(exp_vb, rel=1e-4)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert torch.all(g_vb[:, :1] == 0) and g_vb[:, 1:].abs().sum() > 0  # vb trains only the variance
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(g_mse[:, 1:] == 0) and g_mse[:, :1].abs().sum() > 0


def test_fixed_variance_loss_is_mse_only_and_losses_are_float32():
    diff = GaussianDiffusion(variance="fixed_large")
    assert diff.out_channels(4) == 4 and GaussianDiffusion().out_channels(4) == 8
    x0, noise = torch.randn(2, 2, 4, 4, 4)
    t = torch.tensor([3, 700])
    out = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    terms = diff.training_losses(out, x0, diff.add_noise(x0, t, noise), t, noise)
    assert set(terms) == {"mse", "loss"} and terms["loss"].dtype == torch.float32
    torch.testing.assert_close(terms["mse"], ((noise - out.float()) ** 2).mean((1, 2, 3)))
    learned = GaussianDiffusion().training_losses(torch.randn(2, 8, 4, 4).bfloat16(), x0, x0, t, noise)
    assert learned["vb"].dtype == torch.float32 and torch.isfinite(learned["loss"]).all()


def test_timestep_sampling_uniform_and_stratified():
    gen = torch.Generator().manual_seed(5)
    uniform = GaussianDiffusion().sample_timesteps(4000, "cpu", gen)
    assert uniform.dtype == torch.long and uniform.min() >= 0 and uniform.max() < T
    assert uniform.min() < 10 and uniform.max() > 990
    strat = GaussianDiffusion(timestep_sampling="stratified")
    for _ in range(20):
        t = strat.sample_timesteps(16, "cpu", gen)
        stratum = torch.arange(16) % 4
        assert torch.all(t >= stratum * 250) and torch.all(t < (stratum + 1) * 250)
    with pytest.raises(ValueError):
        GaussianDiffusion(timestep_sampling="stratified", num_strata=3)
    with pytest.raises(ValueError):
        GaussianDiffusion(variance="learned")


def test_space_timesteps_semantics():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {4, 5}
    assert space_timesteps(1000, "250") == kept
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, 1000) == list(range(1000))
    # sections of 100: 10 steps over [0,100), 15 over [100,200), 20 over [200,300)
    mixed = space_timesteps(300, "10,15,20")
    assert len(mixed) == 45 and mixed[:2] == [0, 11] and mixed[9] == 99 and mixed[10] == 100 and mixed[-1] == 299
    with pytest.raises(ValueError):
        space_timesteps(100, [101])
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


def test_respaced_process_keeps_alphas_cumprod_and_original_timesteps():
    base = GaussianDiffusion()
    spaced = base.respaced(250)
    kept = space_timesteps(1000, 250)
    _, ac = np_schedule()
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), ac[kept], rtol=1e-12)
    exp_betas = 1 - ac[kept] / np.concatenate([[1.0], ac[kept][:-1]])
    np.testing.assert_allclose(spaced.betas.numpy(), exp_betas, rtol=1e-10)
    assert spaced.num_timesteps == 250
    assert spaced.model_timestep(torch.tensor([0, 1, 249])).tolist() == [0, kept[1], 999]
    assert base.sampling_timesteps(250, "ddpm").tolist() == kept[::-1]
    assert base.sampling_timesteps(250, "ddim").tolist() == kept[::-1]
    with pytest.raises(ValueError):
        base.sampling_timesteps(10, "euler")
    # respacing composes: a 50-step process of the 250-step one still maps to original timesteps
    twice = spaced.respaced(50)
    inner = space_timesteps(250, 50)
    assert twice.timestep_map.tolist() == [kept[i] for i in inner]
    # 1000 of 1000 is the base process
    full = base.respaced(1000)
    np.testing.assert_allclose(full.betas.numpy(), base.betas.numpy(), rtol=1e-10)
    for name, table in base._tables.items():
        np.testing.assert_allclose(full._tables[name].numpy(), table.numpy(), rtol=1e-9, err_msg=name)
    assert full.model_timestep(torch.arange(1000)).tolist() == list(range(1000))


def oracle_eps_model(x0: torch.Tensor, learned: bool = True):
    """An ε-model that knows x0: ε = (x_t − √ᾱ·x0)/√(1−ᾱ) at the original timestep it is fed."""
    ac = torch.from_numpy(np_schedule()[1])

    def model(x, t_model):
        a = ac[t_model].view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learned else eps

    return model


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_oracle_model_is_recovered_by_respaced_samplers(method):
    from models.diffusion.samplers import sample

    gen = torch.Generator().manual_seed(6)
    x0 = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    out = sample(oracle_eps_model(x0), GaussianDiffusion(), noise, {}, steps=50, method=method, generator=gen)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_ddim_eta0_is_deterministic_and_eta1_step_is_the_ddpm_posterior_step():
    from models.diffusion.samplers import sample

    model = lambda x, t: torch.cat([0.3 * x + 1e-3 * t.view(-1, 1, 1, 1), torch.tanh(x)], 1)  # noqa: E731
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    diff = GaussianDiffusion()
    a = sample(model, diff, noise, {}, steps=20, method="ddim", generator=torch.Generator().manual_seed(1))
    b = sample(model, diff, noise, {}, steps=20, method="ddim", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # one step with eta = 1 is ancestral sampling with the posterior variance β̃
    spaced_small = GaussianDiffusion(variance="fixed_small").respaced(20)
    t = torch.full((2,), 12)
    eps_only = model(noise, spaced_small.model_timestep(t))[:, :2]
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(8))
    ddim = spaced_small.ddim_step(eps_only, noise, t, z, eta=1.0)
    ddpm = spaced_small.ddpm_step(eps_only, noise, t, z)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)
