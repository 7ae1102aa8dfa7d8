"""Exported models that carry adapters: the base in our safetensors format plus the adapters' tensors,
with their layout in the metadata, so `models.load_pretrained` rebuilds the adapted model exactly.

This is how a TD-LoRA student is exported: its update changes with the timestep, so it stays a
runtime module (two small GEMMs per adapted layer, gated per sample) instead of being folded into
the weights; plain LoRA is folded by `launch.export --merge-lora` and needs none of this.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.family import family_of
from models.lora.inject import adapter_layout, restore_adapters
from models.weights_io import CheckpointError, RawWeights, few, read_any

ADAPTERS_METADATA_KEY = "ditill.adapters"  # safetensors metadata: adapter_layout() as JSON


def adapters_in(path: str | os.PathLike) -> dict[str, Any] | None:
    """The adapter layout stored in an exported file's metadata (header only), or None."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable: the ordinary reader reports it with its own message
        return None
    if ADAPTERS_METADATA_KEY not in meta:
        return None
    try:
        return json.loads(meta[ADAPTERS_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: metadata {ADAPTERS_METADATA_KEY!r} is not valid JSON: {e}") from e


def save_adapted(model: nn.Module, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`models.convert.save_safetensors` of an adapted model, with the adapter layout in the metadata."""
    from models.convert import save_safetensors

    layout = adapter_layout(model)
    meta = None if layout is None else {ADAPTERS_METADATA_KEY: json.dumps(layout, sort_keys=True)}
    save_safetensors(model.state_dict() if state_dict is None else state_dict, model.config, path, meta)


def load_adapted(path: str | os.PathLike, layout: dict[str, Any], **overrides: Any) -> nn.Module:
    """The adapted model of an exported file: the base through its family's strict reader, then the
    adapters restored and loaded (every key checked), in eval mode."""
    raw = read_any(path)
    adapter_keys = {k for k in raw.state_dict if any(k.startswith(f"{n}.lora_") for n in layout.get("layers", {}))}
    base = RawWeights({k: v for k, v in raw.state_dict.items() if k not in adapter_keys}, raw.format, raw.source,
                      ours=raw.ours, family=raw.family)
    from models.convert import detect_family

    ckpt = detect_family(base).from_raw(base, overrides)
    family = family_of(ckpt.config)
    with torch.device("meta"):
        model = family.build(ckpt.config)
        restore_adapters(model, layout)
    expected = set(model.state_dict())
    got = set(ckpt.state_dict) | adapter_keys
    if expected != got:
        raise CheckpointError(f"{path}: adapters do not fit the model: {few(sorted(expected ^ got))}")
    model.load_state_dict({**ckpt.state_dict, **{k: raw.state_dict[k] for k in adapter_keys}}, strict=True, assign=True)
    return model.float().eval()
