"""The transformer MLP (fc1 → GELU-tanh → fc2) with DyDiT's channel groups (also PixArt's caption
projection, whose output width differs from its input: `out_dim`).

The hidden units form contiguous groups; a group is removed either by masking its fc1 output
before the GELU (GELU(0) = 0, the training path) or by slicing fc1 rows and fc2 columns (inference).
`Mlp` carries DiT's names (`fc1`, `fc2`); `SequentialMlp` BFL's (`0`, `2` of an `nn.Sequential`, as
FLUX's `img_mlp` / `txt_mlp`). Both run `grouped_mlp`.
"""
from __future__ import annotations

import torch
from torch import nn

from models.dynamic import SlicedWeights, UnitSelection, sliced_linear


def sliced_weights(fc1: nn.Linear, fc2: nn.Linear, group_size: int, groups: UnitSelection) -> tuple[torch.Tensor, ...]:
    """fc1's rows, its bias and fc2's columns of the selected channel groups."""
    rows = groups.rows(group_size)
    return fc1.weight.index_select(0, rows), fc1.bias.index_select(0, rows), fc2.weight.index_select(1, rows)


def grouped_mlp(fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, group_size: int, slices: SlicedWeights,
                x: torch.Tensor, unit_mask: torch.Tensor | None = None, groups: UnitSelection | None = None) -> torch.Tensor:
    """`unit_mask` (…, U) broadcasts over x's rows and covers the U groups computed here:
    all groups, or `groups.index` when slicing."""
    sliced = groups is not None and not groups.full
    if sliced:
        params = (fc1.weight, fc1.bias, fc2.weight)
        w1, b1, w2 = slices.get(groups, params, lambda: sliced_weights(fc1, fc2, group_size, groups))
        rows = groups.rows(group_size)
        h = sliced_linear(fc1, x, w1, b1, rows=rows)  # + an adapter's rows (models/lora), if any
    else:
        h = fc1(x)
    if unit_mask is not None:
        h = h * unit_mask.repeat_interleave(group_size, dim=-1).to(h.dtype)
    h = act(h)
    if sliced:
        return sliced_linear(fc2, h, w2, fc2.bias, cols=rows)
    return fc2(h)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, groups: int = 1, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim if out_dim is None else out_dim, bias=True)
        self.group_size = hidden // groups
        self._slices = SlicedWeights()

    def _sliced_weights(self, groups: UnitSelection) -> tuple[torch.Tensor, ...]:
        return sliced_weights(self.fc1, self.fc2, self.group_size, groups)

    def forward(
        self, x: torch.Tensor, unit_mask: torch.Tensor | None = None, groups: UnitSelection | None = None
    ) -> torch.Tensor:
        return grouped_mlp(self.fc1, self.act, self.fc2, self.group_size, self._slices, x, unit_mask, groups)


class SequentialMlp(nn.Sequential):
    """The same MLP as `Linear, GELU-tanh, Linear` at indices 0, 1, 2 (BFL's parameter names)."""

    def __init__(self, dim: int, hidden: int, groups: int = 1) -> None:
        super().__init__(nn.Linear(dim, hidden, bias=True), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim, bias=True))
        self.group_size = hidden // groups
        self._slices = SlicedWeights()

    def forward(
        self, x: torch.Tensor, unit_mask: torch.Tensor | None = None, groups: UnitSelection | None = None
    ) -> torch.Tensor:
        return grouped_mlp(self[0], self[1], self[2], self.group_size, self._slices, x, unit_mask, groups)
