"""Load real weights of any family into our models: one entry point for every format.

Why one entry point: the trainer, the samplers and `launch.convert` should not care where a teacher
came from. A file is read by `models.weights_io` (safely: nothing but tensors is unpickled), its
family is named by our metadata or recognised by each family's converter, and the family maps it
onto its own names and config with a strict key/shape check.

Whole or lazy: `read_checkpoint(path)` gives full tensors (`load_pretrained`, `launch.convert`);
`read_checkpoint(path, lazy=True)` gives the same names and config with lazy tensors (`models.lazy`)
that read rows from the file on demand, which is how the trainer places a teacher (each rank reads
only its shard) and how `read_config` infers a config without reading weights. A family's converter
serves both when it expresses its tensor surgery with the `models.lazy` helpers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from models.family import Checkpoint, ModelFamily, families, family_of, get_family
from models.lazy import LazyOpError
from models.weights_io import (
    CONFIG_METADATA_KEY, FAMILY_METADATA_KEY, CheckpointError, RawWeights, few, file_digest, read_any,
    read_safetensors_metadata, weights_digest,
)

__all__ = [
    "CONFIG_METADATA_KEY", "Checkpoint", "CheckpointError", "describe", "file_digest", "load_pretrained",
    "load_state_dict_any", "read_checkpoint", "read_config", "save_safetensors", "weights_digest",
]


def load_pretrained(path: str | os.PathLike, *, prefer: str = "ema", **overrides: Any) -> torch.nn.Module:
    """Our model with the weights of `path` loaded strictly, in eval mode (a teacher or a sampler).

    `prefer` picks "ema" or "model" in a training checkpoint that holds both. `overrides` are config
    fields for what a file cannot tell (e.g. `num_heads=` for an official DiT `.pt` of a non-registry
    width) or runtime settings (`kernels="reference"`). The model is returned in fp32 (samplers and
    evaluation expect it); the trainer places teachers through `read_checkpoint(lazy=True)` instead,
    keeping the stored dtype.
    """
    from models.lora.files import adapters_in, load_adapted

    layout = adapters_in(path)
    if layout is not None:  # an exported student that keeps its (TD-)LoRA adapters as runtime modules
        return load_adapted(path, layout, **overrides)
    ckpt = read_checkpoint(path, prefer=prefer, **overrides)
    family = family_of(ckpt.config)
    # Built on the meta device and given the file's tensors: no random init of a large model only to
    # overwrite it, and no second copy of the weights in memory.
    with torch.device("meta"):
        model = family.build(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)  # keys and shapes checked already
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_pretrained: tensors not in the state dict stayed unmaterialised: {few(left)}")
    return model.float().eval()


def load_state_dict_any(path: str | os.PathLike, *, prefer: str = "ema", **overrides: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict in our names, its config) without building the model, for inheritance."""
    ckpt = read_checkpoint(path, prefer=prefer, **overrides)
    return ckpt.state_dict, ckpt.config


def detect_family(raw: RawWeights) -> ModelFamily:
    """The family named in our metadata, else the one family whose converter recognises the file."""
    if raw.family is not None:
        return get_family(raw.family)
    matches = [f for f in families().values() if f.recognises(raw)]
    if len(matches) == 1:
        return matches[0]
    names = sorted(f.name for f in matches) or sorted(families())
    what = "several families recognise it" if matches else "no family recognises it"
    raise CheckpointError(f"{raw.source}: cannot tell which model family this checkpoint is ({what}: {names}; "
                          f"keys: {few(sorted(raw.state_dict))})")


def read_checkpoint(path: str | os.PathLike, *, prefer: str = "ema", lazy: bool = False, **overrides: Any) -> Checkpoint:
    """Read any supported format of any family, map it to our names, infer the config, check keys.

    `lazy=True`: the state dict's values are lazy tensors (`models.lazy`; small computed ones may be
    plain tensors) and no weight is read beyond what the converter must compare."""
    from models.lora.files import adapters_in

    if adapters_in(path) is not None:
        raise CheckpointError(f"{path} holds LoRA/TD-LoRA adapters beside its base weights: load it with "
                              "models.load_pretrained, or export the run with --merge-lora for plain weights "
                              "(plain LoRA only: TD-LoRA's update depends on the timestep)")
    raw = read_any(path, prefer, lazy=lazy)
    family = detect_family(raw)
    known = set(getattr(family.config_cls, "__dataclass_fields__", {}))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown} for the {family.name} family; allowed: {sorted(known)}")
    try:
        return family.from_raw(raw, overrides)
    except LazyOpError as e:
        raise CheckpointError(f"{raw.source}: the {family.name} converter cannot read this file lazily: {e}") from e


def read_config(path: str | os.PathLike, *, prefer: str = "ema", **overrides: Any) -> Any:
    """The model config of a weights file, cheaply: our safetensors say it in the header's metadata;
    other formats are read lazily (headers, pickles memory-mapped) and the config inferred from shapes."""
    p = Path(path)
    if p.suffix == ".safetensors" and p.is_file():
        meta = read_safetensors_metadata(p)
        if CONFIG_METADATA_KEY in meta:
            family = get_family(meta.get(FAMILY_METADATA_KEY, "dit"))
            try:
                return family.config_from_dict({**json.loads(meta[CONFIG_METADATA_KEY]), **overrides})
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                raise CheckpointError(f"{p}: config in the metadata is invalid: {e}") from e
    return read_checkpoint(path, prefer=prefer, lazy=True, **overrides).config


def save_safetensors(state_dict: Mapping[str, torch.Tensor], cfg: Any, path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write our names with the family and config (and `metadata`) in the metadata, atomically (temp file,
    then rename)."""
    from safetensors.torch import save_file

    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: output must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = out.with_name(out.name + ".tmp")
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg.to_dict(), sort_keys=True),
            FAMILY_METADATA_KEY: family_of(cfg).name, **(metadata or {})}
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)


def describe(cfg: Any) -> str:
    """One line naming the architecture (errors and launch.convert's summary)."""
    return family_of(cfg).describe(cfg)
