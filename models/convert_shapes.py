"""What the tensor shapes of a DiT-layout official checkpoint say about its config (DiT, PixArt-Σ).

Both families' official files share the layout that matters here: `x_embedder.proj` (D, C, p, p),
`blocks.i.mlp.fc1`, `final_layer.linear` (p²·C_out, D) and a `pos_embed` buffer of the training grid.
A family's converter adds its own fields and lets what is known (a diffusers config, overrides) win.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from models.weights_io import CheckpointError, few


def required(sd: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: no {key!r}; not a {what} checkpoint (keys: {few(sorted(sd))})")
    return sd[key]


def backbone_fields(sd: Mapping[str, torch.Tensor], source: str, what: str) -> dict[str, Any]:
    """hidden_size, in_channels, patch_size, depth, learn_sigma and mlp_ratio from the shapes."""
    w = required(sd, "x_embedder.proj.weight", source, what)  # (D, C, p, p)
    hidden, in_ch, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out_ch = required(sd, "final_layer.linear.weight", source, what).shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: final layer gives {out_ch} channels for {in_ch} input channels")
    fc1 = required(sd, "blocks.0.mlp.fc1.weight", source, what) if depth else None
    return {"hidden_size": hidden, "in_channels": in_ch, "patch_size": patch, "depth": depth,
            "learn_sigma": out_ch == 2 * in_ch, "mlp_ratio": fc1.shape[0] / hidden if fc1 is not None else 4.0}


def grid_input_size(sd: Mapping[str, torch.Tensor], known: Mapping[str, Any], patch: int, source: str,
                    hint: str = "") -> dict[str, Any]:
    """{"input_size": side} from the square `pos_embed` of the training grid; {} when `known` gives it."""
    if "pos_embed" in sd:
        n = int(sd["pos_embed"].shape[-2])
        grid = math.isqrt(n)
        if grid * grid != n:
            raise CheckpointError(f"{source}: pos_embed has {n} tokens, not a square grid")
        return {"input_size": grid * patch}
    if "input_size" not in known:
        raise CheckpointError(f"{source}: no pos_embed to infer the input size from; pass input_size={hint}")
    return {}


def heads_by_width(fields: dict[str, Any], table: Mapping[int, int], source: str) -> None:
    """Fill `num_heads` from the registry widths when nothing said it."""
    if "num_heads" in fields:
        return
    hidden = fields["hidden_size"]
    if hidden not in table:
        raise CheckpointError(
            f"{source}: cannot infer the number of heads for hidden size {hidden} (registry widths: "
            f"{dict(table)}); pass num_heads=N (launch.convert: --num-heads N)"
        )
    fields["num_heads"] = table[hidden]
