"""DiT weights in every public format → our names (the official DiT ones) and a `DiTConfig`.

Official `.pt` (DiT's `train.py` checkpoints or plain state dicts), diffusers `DiTTransformer2DModel`
(renamed by `models/convert_diffusers.py`), and our safetensors (config in the metadata). Without
metadata the config is inferred from tensor shapes, with a diffusers `config.json` or explicit
overrides winning where given; the result is checked key by key against a meta-device model.
Only names and shapes are used (and `models.lazy` helpers for tensor surgery), so a lazily read file
(`read_checkpoint(lazy=True)`) converts without reading its weights.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from models.config import SIZES, DiTConfig
from models.convert_diffusers import config_from_diffusers, diffusers_to_ours
from models.dit import DiT
from models.embeddings import sincos_pos_embed_2d
from models.family import Checkpoint
from models.weights_io import CheckpointError, RawWeights, few

# hidden size → DiT heads (384→6 … 1152→16), for official files that do not say
HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads, _ in SIZES.values()}
_STUDENT_HINTS = (".attn.dwc.", "_rate.router", ".token_selection.")


def dit_checkpoint(raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
    """Map `raw` onto our names, infer or read the config, check keys and shapes."""
    source, sd = raw.source, raw.state_dict
    if raw.format == "diffusers":
        sd = diffusers_to_ours(sd, source)
    if raw.ours is not None:
        cfg_fields = {**raw.ours, **overrides}
    else:
        base = config_from_diffusers(raw.diffusers_config, source) if raw.diffusers_config is not None else {}
        cfg_fields = infer_config(sd, {**base, **overrides}, source)
    try:
        cfg = DiTConfig.from_dict(cfg_fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred config is invalid: {e}") from e
    if "pos_embed" not in sd:  # diffusers recomputes it; it is a fixed function of the grid
        sd["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)).float()[None]
    check_keys(sd, cfg, source)
    return Checkpoint(sd, cfg, raw.format, source)


def looks_like_dit(raw: RawWeights) -> bool:
    if raw.diffusers_config is not None:
        return raw.diffusers_config.get("_class_name") in ("DiTTransformer2DModel", "Transformer2DModel")
    return "x_embedder.proj.weight" in raw.state_dict and "y_embedder.embedding_table.weight" in raw.state_dict or (
        "proj_out_2.weight" in raw.state_dict)


def infer_config(sd: Mapping[str, torch.Tensor], known: dict[str, Any], source: str) -> dict[str, Any]:
    """DiTConfig fields from tensor shapes; `known` (diffusers config, overrides) wins where given."""

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"{source}: no {key!r}; not a DiT checkpoint (keys: {few(sorted(sd))})")
        return sd[key]

    w = need("x_embedder.proj.weight")  # (D, C, p, p)
    hidden, in_ch, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out_ch = need("final_layer.linear.weight").shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{source}: final layer gives {out_ch} channels for {in_ch} input channels")
    rows = int(need("y_embedder.embedding_table.weight").shape[0])
    fc1 = need("blocks.0.mlp.fc1.weight") if depth else None
    f: dict[str, Any] = {
        "hidden_size": hidden, "in_channels": in_ch, "patch_size": patch, "depth": depth,
        "learn_sigma": out_ch == 2 * in_ch,
        "mlp_ratio": fc1.shape[0] / hidden if fc1 is not None else 4.0,
        "guidance_embed": "g_embedder.mlp.0.weight" in sd,
    }
    if "num_classes" in known:  # a table with one more row holds the guidance null class
        nc = int(known["num_classes"])
        if rows not in (nc, nc + 1):
            raise CheckpointError(f"{source}: label table has {rows} rows, num_classes={nc} needs {nc} or {nc + 1}")
        f["class_dropout_prob"] = known.get("class_dropout_prob", 0.1) if rows == nc + 1 else 0.0
    else:  # official convention: num_classes + 1 rows (class_dropout_prob=0.1)
        f["num_classes"], f["class_dropout_prob"] = rows - 1, 0.1
    if "pos_embed" in sd:
        n = int(sd["pos_embed"].shape[-2])
        grid = math.isqrt(n)
        if grid * grid != n:
            raise CheckpointError(f"{source}: pos_embed has {n} tokens, not a square grid")
        f["input_size"] = grid * patch
    elif "input_size" not in known:
        raise CheckpointError(f"{source}: no pos_embed to infer the input size from; pass input_size=")
    f.update(known)
    if "num_heads" not in f:
        if hidden not in HEADS_BY_HIDDEN:
            raise CheckpointError(
                f"{source}: cannot infer the number of heads for hidden size {hidden} (registry widths: "
                f"{HEADS_BY_HIDDEN}); pass num_heads=N (launch.convert: --num-heads N)"
            )
        f["num_heads"] = HEADS_BY_HIDDEN[hidden]
    return f


def check_keys(sd: Mapping[str, torch.Tensor], cfg: DiTConfig, source: str) -> None:
    """Missing, unexpected and mis-shaped keys, all in one error (shapes from a meta-device model)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{name} ({len(keys)}): {few(keys)}" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    hint = ""
    if any(h in k for k in unexpected for h in _STUDENT_HINTS):
        hint = ("\nThe file holds student weights (LiT/DyDiT); without config metadata pass the student's "
                "config fields (attention='linear', dynamic=True, …) as overrides.")
    raise CheckpointError(f"{source}: checkpoint does not fit {describe(cfg)}:\n  " + "\n  ".join(parts) + hint)


def describe(cfg: DiTConfig) -> str:
    """One line naming the architecture (errors and launch.convert's summary)."""
    return (f"DiT(hidden={cfg.hidden_size}, depth={cfg.depth}, heads={cfg.num_heads}, patch={cfg.patch_size}, "
            f"input={cfg.input_size}, in={cfg.in_channels}, learn_sigma={cfg.learn_sigma}, "
            f"classes={cfg.num_classes}, attention={cfg.attention}, dynamic={cfg.dynamic})")
