"""Discrete Gaussian diffusion as DiT (and PixArt-Σ, DyDiT) trains and samples it.

Settings follow DiT's `create_diffusion`: T = 1000 steps, the "linear" β schedule, ε-prediction,
learned-range variance and the hybrid loss `mse(ε) + vb` (LossType.MSE: vb added unscaled, in
bits per dimension, computed with the ε prediction detached so the VLB only trains the variance).
Respacing keeps a subset of the original timesteps and re-derives β from ᾱ, while the network
still sees the original timestep index, so one trained model samples in 1000, 250 or 50 steps.

Schedule tables are float64 on the CPU; each is copied once per device and cast to the working
dtype only after indexing, as DiT does.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch

from models.diffusion.base import broadcast_to, check_output_channels, mean_flat

VARIANCES = ("learned_range", "fixed_large", "fixed_small")
TIMESTEP_SAMPLING = ("uniform", "stratified")
METHODS = ("ddpm", "ddim")


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DiT's named "linear" schedule: Ho et al.'s 1e-4 → 0.02, scaled by 1000/T so any T matches it."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The original timesteps a respaced process keeps, in DiT/ADM's `space_timesteps` semantics.

    `section_counts` splits [0, T) into equal sections and takes that many evenly strided steps from
    each (an int is one section, so 250 → 0, 4, 8, …, 999). "ddimN" takes the integer stride that
    gives exactly N steps starting at 0, as in the DDIM paper. Returns a sorted list.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps of {num_timesteps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):  # accumulate the stride like the reference so rounding matches it
            kept.append(start + round(pos))
            pos += stride
        start += size
    return sorted(set(kept))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) through the tanh approximation DiT's decoder likelihood uses (kept for loss parity)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) in nats of a Gaussian binned to 256 levels on [-1, 1] (bin half-width 1/255).

    The edge bins extend to ±∞ (x < -0.999 or > 0.999), so the levels' probabilities sum to one.
    This is the t = 0 decoder term of the VLB.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """DDPM with ε-prediction over `num_timesteps` discrete steps (t = 0 is the least noisy).

    variance: "learned_range" (network outputs 2·C channels; the last C, v ∈ [-1, 1], interpolate
    log σ² between log β̃_t and log β_t), "fixed_large" (β_t) or "fixed_small" (β̃_t).
    timestep_sampling: "uniform" over [0, T), or "stratified" (DyDiT's `--t_sample`): sample i of
    the batch draws uniformly from stratum i mod `num_strata` of [0, T).
    """

    kind = "gaussian"

    def __init__(
        self,
        num_timesteps: int = 1000,
        *,
        variance: str = "learned_range",
        timestep_sampling: str = "uniform",
        num_strata: int = 4,
    ) -> None:
        if variance not in VARIANCES:
            raise ValueError(f"variance={variance!r} is not one of {VARIANCES}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is not one of {TIMESTEP_SAMPLING}")
        if timestep_sampling == "stratified" and (num_strata < 1 or num_timesteps % num_strata):
            raise ValueError(f"num_strata={num_strata} must divide num_timesteps={num_timesteps}")
        self.variance = variance
        self.timestep_sampling = timestep_sampling
        self.num_strata = num_strata
        self._set_schedule(linear_betas(num_timesteps), torch.arange(num_timesteps))

    # ----------------------------------------------------------------------------- schedule tables
    def _set_schedule(self, betas: torch.Tensor, timestep_map: torch.Tensor) -> None:
        """Derive every table from β (float64); `timestep_map[i]` is step i's original timestep."""
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.num_timesteps = betas.shape[0]
        self.timestep_map = timestep_map.long()
        ac = torch.cumprod(1.0 - betas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # β̃_0 = 0: its log is clipped to β̃_1, as in the reference
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(betas) > 1 else post_var.log()
        large_var = torch.cat([post_var[1:2], betas[1:]])
        self.betas = betas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.posterior_variance = post_var
        self._tables = {
            "sqrt_ac": ac.sqrt(),
            "sqrt_1m_ac": (1.0 - ac).sqrt(),
            "var_q": 1.0 - ac,
            "logvar_q": torch.log(1.0 - ac),
            "sqrt_recip_ac": (1.0 / ac).sqrt(),
            "sqrt_recipm1_ac": (1.0 / ac - 1.0).sqrt(),
            "ac": ac,
            "ac_prev": ac_prev,
            "post_var": post_var,
            "post_logvar": post_logvar,
            "post_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "post_coef2": (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
            "log_betas": betas.log(),
            "large_var": large_var,
            "large_logvar": large_var.log(),
        }
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at timesteps t (B,), cast to like's dtype and shaped to broadcast against it."""
        tables = self._on_device.get(t.device)
        if tables is None:
            tables = self._on_device[t.device] = {k: v.to(t.device) for k, v in self._tables.items()}
        return broadcast_to(tables[name][t].to(like.dtype), like)

    # ------------------------------------------------------------------------- Objective interface
    @property
    def learn_sigma(self) -> bool:
        return self.variance == "learned_range"

    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels if self.learn_sigma else in_channels

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        *,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Integer t (B,) in [0, T); `seq_len` is unused (the schedule does not depend on resolution)."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)
        width = self.num_timesteps // self.num_strata
        lower = (torch.arange(batch_size, device=device) % self.num_strata) * width
        return lower + torch.randint(0, width, (batch_size,), generator=generator, device=device)

    def timesteps_from_uniform(
        self, u: torch.Tensor, positions: torch.Tensor, *, seq_len: int | None = None
    ) -> torch.Tensor:
        """Integer t (B,): ⌊u·T⌋, or within stratum `position mod num_strata` when stratified."""
        if self.timestep_sampling == "uniform":
            return (u.double() * self.num_timesteps).long().clamp_(max=self.num_timesteps - 1)
        width = self.num_timesteps // self.num_strata
        lower = (positions.to(u.device) % self.num_strata) * width
        return lower + (u.double() * width).long().clamp_(max=width - 1)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        return self._at("sqrt_ac", t, x0) * x0 + self._at("sqrt_1m_ac", t, x0) * noise

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The original (un-respaced) integer timestep, which is what the network was trained on."""
        return self.timestep_map.to(t.device)[t]

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.learn_sigma:
            return model_output, None
        eps, var_values = model_output.chunk(2, dim=1)
        return eps, var_values

    def training_losses(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample "mse" (ε regression), "vb" (learned σ only, bits/dim) and "loss" = mse + vb.

        Computed in at least float32 whatever the network's output dtype. The vb term sees the ε
        prediction detached, so its gradient reaches only the variance channels.
        """
        check_output_channels(self, model_output, x0)
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        eps, var_values = self.split_output(model_output.to(dtype))
        x0, x_t, noise = x0.to(dtype), x_t.to(dtype), noise.to(dtype)
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if var_values is None:
            terms["loss"] = terms["mse"]
            return terms
        mean, log_var, _ = self.p_mean_variance(torch.cat([eps.detach(), var_values], dim=1), x_t, t)
        terms["vb"] = self.vb_bits_per_dim(x0, x_t, t, mean, log_var)
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    def sampling_timesteps(self, steps: int, method: str, *, seq_len: int | None = None) -> torch.Tensor:
        """Original timesteps (long, descending) that `steps`-step DDPM/DDIM feeds the network."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not a Gaussian sampler; use one of {METHODS}")
        return self.respaced(steps).timestep_map.flip(0)

    # ------------------------------------------------------------------------------- the process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x0)."""
        return self._at("sqrt_ac", t, x0) * x0, self._at("var_q", t, x0), self._at("logvar_q", t, x0)

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at("post_coef1", t, x_t) * x0 + self._at("post_coef2", t, x_t) * x_t
        return mean, self._at("post_var", t, x_t), self._at("post_logvar", t, x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 implied by an ε prediction: (x_t − √(1−ᾱ)·ε)/√ᾱ."""
        return self._at("sqrt_recip_ac", t, x_t) * x_t - self._at("sqrt_recipm1_ac", t, x_t) * eps

    def model_log_variance(
        self, var_values: torch.Tensor | None, t: torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """log σ²_t of p(x_{t-1} | x_t): learned range `(v+1)/2·log β + (1−v)/2·log β̃`, or fixed."""
        if self.variance == "fixed_large":
            return self._at("large_logvar", t, like).expand_as(like)
        if self.variance == "fixed_small":
            return self._at("post_logvar", t, like).expand_as(like)
        frac = (var_values + 1) / 2
        return frac * self._at("log_betas", t, like) + (1 - frac) * self._at("post_logvar", t, like)

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, log-variance, predicted x0) of p(x_{t-1} | x_t) from a network output (no clipping)."""
        eps, var_values = self.split_output(model_output)
        pred_x0 = self.predict_x0(x_t, t, eps)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return mean, self.model_log_variance(var_values, t, x_t), pred_x0

    def vb_bits_per_dim(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor
    ) -> torch.Tensor:
        """VLB term per sample in bits/dim: KL(q(x_{t-1}|x_t,x0) ‖ p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def respaced(self, section_counts: int | str | Sequence[int]) -> "GaussianDiffusion":
        """A process over the kept timesteps (see `space_timesteps`), β re-derived so ᾱ is unchanged.

        Its `model_timestep` still returns the original indices.
        """
        keep = space_timesteps(self.num_timesteps, section_counts)
        ac = self.alphas_cumprod[keep]
        ac_before = torch.cat([ac.new_ones(1), ac[:-1]])
        spaced = copy.copy(self)
        spaced._set_schedule(1.0 - ac / ac_before, self.timestep_map[keep])
        return spaced

    # ------------------------------------------------------------------------------ sampler steps
    def ddpm_step(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """Ancestral step x_t → x_{t-1} = mean + σ·noise (no noise where t = 0)."""
        mean, log_var, _ = self.p_mean_variance(model_output, x, t)
        if noise is None:
            if bool((t != 0).any()):
                raise ValueError("ddpm_step needs noise for t > 0")
            return mean
        nonzero = broadcast_to((t != 0).to(x.dtype), x)
        return mean + nonzero * torch.exp(0.5 * log_var) * noise

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """DDIM (Song et al. eq. 12) x_t → x_{t-1}; eta = 0 is deterministic, eta = 1 matches DDPM with β̃."""
        eps, _ = self.split_output(model_output)
        pred_x0 = self.predict_x0(x, t, eps)
        ac, ac_prev = self._at("ac", t, x), self._at("ac_prev", t, x)
        sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
        x_prev = pred_x0 * ac_prev.sqrt() + torch.sqrt(1 - ac_prev - sigma**2) * eps
        if noise is None:
            if eta != 0.0 and bool((t != 0).any()):
                raise ValueError("ddim_step needs noise when eta > 0 and t > 0")
            return x_prev
        return x_prev + broadcast_to((t != 0).to(x.dtype), x) * sigma * noise
