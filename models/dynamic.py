"""DyDiT's routers and the two ways of executing a dynamic block.

- Training: every unit is computed and multiplied by a 0/1 mask that a straight-through
  Gumbel-sigmoid makes differentiable, so gradients reach the routers.
- Inference: the masks are hard; inactive heads and MLP channel groups are sliced out of the
  weights and unrouted tokens skip the MLP (gather → MLP → scatter), so FLOPs saved are time saved.

Parameter names follow alibaba-damo-academy/DyDiT (`attn_rate.router`, `mlp_rate.router`,
`token_selection.mlp_head.{0,2}`), so its released checkpoints load without renaming.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def gumbel_sigmoid_ste(logits: torch.Tensor, tau: float, training: bool, threshold: float = 0.5) -> torch.Tensor:
    """Hard 0/1 decisions in the forward pass, sigmoid gradients in the backward pass.

    In training, logistic noise (the difference of two Gumbel samples) explores both decisions;
    in eval the decision is the deterministic `sigmoid(logits) > threshold`.
    """
    if training:
        g1 = -torch.empty_like(logits).exponential_().log()
        g2 = -torch.empty_like(logits).exponential_().log()
        soft = torch.sigmoid((logits + g1 - g2) / tau)
    else:
        soft = torch.sigmoid(logits)
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


class Router(nn.Module):
    """Timestep-wise width router: one linear layer on the timestep embedding, unit 0 always on."""

    def __init__(self, dim: int, num_units: int, tau: float, threshold: float) -> None:
        super().__init__()
        self.num_units = num_units
        self.tau = tau
        self.threshold = threshold
        self.router = nn.Linear(dim, num_units - 1) if num_units > 1 else None

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) → (B, num_units) mask with column 0 fixed to 1."""
        ones = torch.ones(t_emb.shape[0], 1, device=t_emb.device, dtype=torch.float32)
        if self.router is None:
            return ones
        gate = gumbel_sigmoid_ste(self.router(t_emb).float(), self.tau, self.training, self.threshold)
        return torch.cat([ones, gate], dim=1)


class TokenSelect(nn.Module):
    """Spatial token router: a two-layer MLP per token on the residual stream after attention."""

    def __init__(self, dim: int, reduction: int, tau: float, threshold: float) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.tau = tau
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N) token mask."""
        logits = self.mlp_head(x).squeeze(-1).float()
        return gumbel_sigmoid_ste(logits, self.tau, self.training, self.threshold)


@dataclass
class UnitSelection:
    """Which units of a layer run, for the sliced path.

    `index` are the units active for at least one sample (sorted). `mask` is None when every sample
    uses exactly those units (the common case: a sampling step shares one t), else a (B, |index|)
    mask that zeroes the units a given sample does not use.
    """

    index: torch.Tensor
    mask: torch.Tensor | None
    total: int

    @property
    def full(self) -> bool:
        return self.mask is None and self.index.numel() == self.total

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "UnitSelection":
        hard = mask.detach() > 0.5
        union = hard.any(dim=0)
        index = union.nonzero().squeeze(1)
        sub = hard[:, index]
        per_sample = None if bool(sub.all()) else sub.to(mask.dtype)
        return cls(index=index, mask=per_sample, total=mask.shape[1])


def expand_group_mask(mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, G) unit mask → (B, 1, G·group_size) channel mask broadcastable over tokens."""
    return mask.repeat_interleave(group_size, dim=1).unsqueeze(1)


def unit_rows(index: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Row indices of the units in `index` when each unit owns `unit_size` contiguous rows."""
    offs = torch.arange(unit_size, device=index.device)
    return (index[:, None] * unit_size + offs[None]).reshape(-1)
