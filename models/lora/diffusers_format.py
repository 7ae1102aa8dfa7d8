"""Plain-LoRA adapters in the layout diffusers' `load_lora_weights` / `load_lora_adapter` reads.

Keys are peft's (`<module>.lora_A.weight` (R, in), `<module>.lora_B.weight` (out, R)) on the teacher's
diffusers module names, prefixed `transformer.`; a fused layer of ours is split by output rows (DiT's
`qkv` → `to_q`, `to_k`, `to_v`, FLUX's single-block `linear1` → `to_q`, `to_k`, `to_v`, `proj_mlp`: each
gets A and its rows of B, so B_q·A is exactly our update's q rows). The scale α/R is folded into B, and the metadata says lora_alpha = r, so any reader that
ignores the metadata computes the same update. Each family's converter knows its diffusers names
(`ModelFamily.diffusers_linear_names`).

What is reused: peft's `LoraConfig` for the adapter metadata and diffusers' own LoRA writer
(`LoraBaseMixin._save_lora_weights`) for the file. What cannot be exported: TD-LoRA (diffusers has no
timestep-mixed adapters) and students whose trained layers diffusers does not have (LiT's linear
attention); a DyDiT student's adapters load, but diffusers runs them as the complete (static) model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from models.family import family_of
from models.lora.inject import lora_layers

PREFIX = "transformer"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name in a LoRA directory


def diffusers_lora_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """(`transformer.`-prefixed peft-format tensors in diffusers names, rank) of `model`'s plain LoRA."""
    family = family_of(model)
    kind = family.student_kind(model.config)
    if kind in ("lit", "dylit"):
        raise ValueError(f"a {kind} student's linear attention has no diffusers counterpart: its adapters cannot "
                         "be loaded into the teacher's diffusers class")
    names = family.diffusers_linear_names(model.config)
    if not names:
        raise ValueError(f"the {family.name} family maps no layers to a diffusers class "
                         "(ModelFamily.diffusers_linear_names); cannot export diffusers LoRA")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    out: dict[str, torch.Tensor] = {}
    ranks = set()
    for name, layer in layers.items():
        if layer.lora_gate is not None:
            raise ValueError(f"{name} is a TD-LoRA layer: its update depends on the timestep, which diffusers' LoRA "
                             "format cannot express; export the model itself (launch.export) instead")
        if name not in names:
            raise ValueError(f"{name} has no counterpart in the {family.name} family's diffusers class")
        a = layer.lora_A.detach().float().cpu()
        b = (layer.lora_B.detach().float() * layer.scaling).cpu()
        ranks.add(layer.rank)
        for target, rows in names[name]:
            out[f"{PREFIX}.{target}.lora_A.weight"] = a.clone()
            out[f"{PREFIX}.{target}.lora_B.weight"] = _rows(b, rows).clone()
    if len(ranks) != 1:
        raise ValueError(f"adapters of several ranks {sorted(ranks)}: diffusers' metadata holds one")
    return out, ranks.pop()


def _rows(b: torch.Tensor, rows) -> torch.Tensor:
    """B's rows for one diffusers module: all (None), one range (start, stop), or ranges concatenated
    (FLUX's final adaLN, whose halves diffusers stores swapped)."""
    if rows is None:
        return b
    if isinstance(rows[0], int):
        return b[rows[0]:rows[1]]
    return torch.cat([b[start:stop] for start, stop in rows])


def save_diffusers_lora(model: nn.Module, directory: str | os.PathLike, weight_name: str = WEIGHT_NAME) -> Path:
    """Write `directory/weight_name` for `pipe.load_lora_weights(directory, weight_name=...)`."""
    try:
        from diffusers.loaders.lora_base import LoraBaseMixin
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError(f"exporting diffusers LoRA needs diffusers and peft ({e}); pip install -c constraints.txt "
                          "'ditill[hf]'") from None
    sd, rank = diffusers_lora_state_dict(model)
    modules = sorted({k[len(PREFIX) + 1:].rsplit(".lora_", 1)[0] for k in sd})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    unprefixed = {k[len(PREFIX) + 1:]: v for k, v in sd.items()}
    LoraBaseMixin._save_lora_weights(str(directory), {PREFIX: unprefixed}, {PREFIX: config}, weight_name=weight_name)
    return Path(directory) / weight_name
