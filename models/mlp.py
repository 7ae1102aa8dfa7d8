"""DiT's MLP (fc1 → GELU-tanh → fc2) with DyDiT's channel groups.

The 4·D hidden units form contiguous groups; a group is removed either by masking its fc1 output
before the GELU (GELU(0) = 0, the training path) or by slicing fc1 rows and fc2 columns (inference).
"""
from __future__ import annotations

import torch
from torch import nn

from models.dynamic import SlicedWeights, UnitSelection, sliced_linear


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, groups: int = 1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)
        self.group_size = hidden // groups
        self._slices = SlicedWeights()

    def _sliced_weights(self, groups: UnitSelection) -> tuple[torch.Tensor, ...]:
        rows = groups.rows(self.group_size)
        return (self.fc1.weight.index_select(0, rows), self.fc1.bias.index_select(0, rows),
                self.fc2.weight.index_select(1, rows))

    def forward(
        self, x: torch.Tensor, unit_mask: torch.Tensor | None = None, groups: UnitSelection | None = None
    ) -> torch.Tensor:
        """`unit_mask` (…, U) broadcasts over x's rows and covers the U groups computed here:
        all groups, or `groups.index` when slicing."""
        sliced = groups is not None and not groups.full
        if sliced:
            params = (self.fc1.weight, self.fc1.bias, self.fc2.weight)
            w1, b1, w2 = self._slices.get(groups, params, lambda: self._sliced_weights(groups))
            rows = groups.rows(self.group_size)
            h = sliced_linear(self.fc1, x, w1, b1, rows=rows)
        else:
            h = self.fc1(x)
        if unit_mask is not None:
            h = h * unit_mask.repeat_interleave(self.group_size, dim=-1).to(h.dtype)
        h = self.act(h)
        if sliced:
            return sliced_linear(self.fc2, h, w2, self.fc2.bias, cols=rows)
        return self.fc2(h)
