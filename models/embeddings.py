"""Inputs of the DiT and PixArt families: patches, fixed 2-D sin-cos positions, timesteps, class labels.

Parameter names follow facebookresearch/DiT (`x_embedder.proj`, `t_embedder.mlp.{0,2}`,
`y_embedder.embedding_table`) so official checkpoints load without renaming.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int | None = None, base_size: int | None = None,
                        interpolation: float = 1.0) -> np.ndarray:
    """(H·W, D) fixed embedding exactly as DiT/MAE compute it (float64 frequencies, w-major grid).

    `base_size` and `interpolation` give PixArt's resolution-aware positions (PixArt-Σ
    `get_2d_sincos_pos_embed`, diffusers `PatchEmbed(interpolation_scale=…)`): each axis of an
    (H, W) grid is rescaled to span `base_size` (the training grid side) and divided by
    `interpolation` (`pe_interpolation` = resolution / 512), so every aspect-ratio bucket and
    resolution sees positions in the range the model was trained on. None: plain 0, 1, … (DiT).
    """
    grid_w = grid_h if grid_w is None else grid_w
    pos_h, pos_w = np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32)
    if base_size is not None:
        pos_h = pos_h / (grid_h / base_size) / interpolation
        pos_w = pos_w / (grid_w / base_size) / interpolation
    gw, gh = np.meshgrid(pos_w, pos_h)
    emb_a = _sincos_1d(embed_dim // 2, gw)  # DiT encodes the w-coordinate in the first half
    emb_b = _sincos_1d(embed_dim // 2, gh)
    return np.concatenate([emb_a, emb_b], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class PatchEmbed(nn.Module):
    """p×p patches → tokens (a strided conv, as timm's PatchEmbed that DiT uses)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, grid_hw: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """PatchEmbed's inverse for the output: (B, h·w, p·p·C) tokens → (B, C, h·p, w·p) (`nhwpqc->nchpwq`)."""
    b = x.shape[0]
    gh, gw = grid_hw
    x = x.reshape(b, gh, gw, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * patch_size, gw * patch_size)


def init_linear_and_patch_(model: nn.Module, patch: PatchEmbed) -> None:
    """DiT's and PixArt's base initialisation: every Linear xavier-uniform with a zero bias, and the patch
    embedding's conv weight xavier-uniform as if it were a Linear (its bias keeps torch's default)."""

    def basic(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    model.apply(basic)
    w = patch.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))


class TimestepEmbedder(nn.Module):
    """Sinusoid of t (256 frequencies, cat[cos, sin], divided by `half` as official DiT) → MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index `num_classes`) for the dropped, unconditional label."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    @property
    def has_null_class(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)
