"""Load real DiT weights into our model: official `.pt`, our `.safetensors`, diffusers directories.

Why one entry point: the trainer, the samplers and `launch.convert` should not care where a
teacher came from. Every format ends as a state dict in our layout (the official DiT names),
a `DiTConfig` read from the file or inferred from tensor shapes, and a strict key/shape check.

Safety: pickled files are read with `torch.load(weights_only=True)` and nothing else runs; the
only class allowed beyond tensors and containers is `argparse.Namespace`, which DiT's `train.py`
stores under "args" in its training checkpoints (a plain attribute bag).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from models.config import DiTConfig
from models.convert_diffusers import config_from_diffusers, diffusers_to_ours, is_diffusers_state_dict
from models.dit import DiT
from models.embeddings import sincos_pos_embed_2d
from models.registry import SIZES

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "ditill.config"  # safetensors metadata: DiTConfig as JSON
HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads, _ in SIZES.values()}  # 384→6 … 1152→16
WRAPPER_KEYS = ("state_dict", "module")  # other trainers' wrappers (PixArt, DeepSpeed/DyDiT)
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
_STUDENT_HINTS = (".attn.dwc.", "_rate.router", ".token_selection.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the path."""


@dataclass
class Checkpoint:
    """A state dict in our layout plus what is known about it."""

    state_dict: dict[str, torch.Tensor]
    config: DiTConfig
    format: str  # "official" | "safetensors" | "diffusers"
    source: str


# --- public API -----------------------------------------------------------------------------------
def load_pretrained(path: str | os.PathLike, *, prefer: str = "ema", **overrides: Any) -> DiT:
    """Our model with the weights of `path` loaded strictly, in eval mode (a teacher or a sampler).

    `prefer` picks "ema" or "model" in a training checkpoint that holds both. `overrides` are
    DiTConfig fields for what a file cannot tell (e.g. `num_heads=` for an official `.pt` of a
    non-registry width) or runtime settings (`kernels="reference"`).
    """
    ckpt = read_checkpoint(path, prefer=prefer, **overrides)
    # Built on the meta device and given the file's tensors: no random init of a 675M-parameter
    # model only to overwrite it, and no second copy of the weights in memory.
    with torch.device("meta"):
        model = DiT(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)  # keys and shapes checked already
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_pretrained: tensors not in the state dict stayed unmaterialised: {_few(left)}")
    return model.float().eval()


def load_state_dict_any(
    path: str | os.PathLike, *, prefer: str = "ema", **overrides: Any
) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    """(state dict in our layout, its config) without building the model, for inheritance.

    Tensors keep the file's dtype; keys and shapes are already checked against `DiT(config)`.
    """
    ckpt = read_checkpoint(path, prefer=prefer, **overrides)
    return ckpt.state_dict, ckpt.config


def read_checkpoint(path: str | os.PathLike, *, prefer: str = "ema", **overrides: Any) -> Checkpoint:
    """Read any supported format, map it to our layout, infer the config, check keys and shapes."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer={prefer!r}; use 'ema' or 'model'")
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; allowed: {sorted(known)}")
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {source} (pass a .pt/.pth/.bin/.safetensors file or a diffusers directory)"
        )
    sd, meta_cfg, diff_cfg, fmt = _read_any(p, prefer)
    if fmt != "safetensors" and is_diffusers_state_dict(sd):
        fmt = "diffusers"
        sd = diffusers_to_ours(sd, source)
    if meta_cfg is not None:
        cfg_fields = {**meta_cfg, **overrides}
    else:
        base = config_from_diffusers(diff_cfg, source) if diff_cfg is not None else {}
        cfg_fields = _infer_config(sd, {**base, **overrides}, source)
    try:
        cfg = DiTConfig.from_dict(cfg_fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: inferred config is invalid: {e}") from e
    if "pos_embed" not in sd:  # diffusers recomputes it; it is a fixed function of the grid
        sd["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)).float()[None]
    _check_keys(sd, cfg, source)
    return Checkpoint(sd, cfg, fmt, source)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], cfg: DiTConfig, path: str | os.PathLike) -> None:
    """Write our layout with the config in the metadata, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: output must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg.to_dict())})
    os.replace(tmp, out)


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensors (name, dtype, shape, bytes) and metadata, in sorted order.

    Not the file's own hash: safetensors writes its metadata map in a per-process random order, so
    exporting the same checkpoint twice gives different bytes for the same weights.
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- reading --------------------------------------------------------------------------------------
def _read_any(p: Path, prefer: str) -> tuple[dict[str, torch.Tensor], dict | None, dict | None, str]:
    """(state dict, our config from metadata, diffusers config.json, format)."""
    if p.is_dir():
        return _read_diffusers_dir(p)
    if p.suffix == ".safetensors":
        sd, meta = _read_safetensors(p)
        raw = meta.get(CONFIG_METADATA_KEY)
        if raw is not None:
            try:
                return sd, json.loads(raw), None, "safetensors"
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON: {e}") from e
        diff_cfg = _sibling_diffusers_config(p) if is_diffusers_state_dict(sd) else None
        return _strip_prefixes(sd), None, diff_cfg, "official"
    sd = _unwrap(_torch_load(p), prefer, str(p))
    diff_cfg = _sibling_diffusers_config(p) if is_diffusers_state_dict(sd) else None
    return sd, None, diff_cfg, "official"


def _read_diffusers_dir(d: Path) -> tuple[dict[str, torch.Tensor], None, dict, str]:
    if (d / "model_index.json").is_file() and (d / "transformer").is_dir():
        d = d / "transformer"  # a DiTPipeline directory
    cfg_path = d / "config.json"
    weights = next((d / n for n in DIFFUSERS_WEIGHTS if (d / n).is_file()), None)
    if not cfg_path.is_file() or weights is None:
        found = sorted(x.name for x in d.iterdir())[:10]
        raise CheckpointError(
            f"{d}: not a diffusers model directory (needs config.json and one of {list(DIFFUSERS_WEIGHTS)}; "
            f"found {found}). Variant files (e.g. *.fp16.safetensors) must be renamed or converted first."
        )
    try:
        diff_cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable config.json: {e}") from e
    if weights.name.endswith(".index.json"):
        sd = _read_sharded(weights)
    elif weights.suffix == ".safetensors":
        sd = _read_safetensors(weights)[0]
    else:
        sd = _unwrap(_torch_load(weights), "ema", str(weights))
    return sd, None, diff_cfg, "diffusers"


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: unreadable shard index: {e}") from e
    sd: dict[str, torch.Tensor] = {}
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            raise FileNotFoundError(f"checkpoint shard not found: {shard} (listed in {index})")
        sd.update(_read_safetensors(shard)[0] if shard.suffix == ".safetensors" else _torch_load(shard))
    return sd


def _sibling_diffusers_config(p: Path) -> dict | None:
    cfg = p.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: unreadable config.json beside {p.name}: {e}") from e


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{p}: unreadable safetensors file ({type(e).__name__}: {e})") from e


def _torch_load(p: Path) -> Any:
    """weights_only=True: tensors, containers and primitives only; code is never executed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg:  # a class or function the file would import and call
            m = re.search(r"GLOBAL (\S+)", msg)
            what = f" (it contains {m.group(1)})" if m else ""
            raise CheckpointError(
                f"{p}: refused to unpickle objects other than tensors{what}; weights are only read with "
                "torch.load(weights_only=True). Re-save a plain state dict (torch.save(model.state_dict())) "
                "or safetensors from a trusted environment."
            ) from e
        m = re.search(r"WeightsUnpickler error:\s*(.+)", msg, re.S)  # torch's wording for bad opcodes
        detail = m.group(1).strip().splitlines()[0] if m else msg.splitlines()[0]
        raise CheckpointError(f"{p}: unreadable checkpoint (corrupt pickle: {detail})") from e
    except Exception as e:  # truncated zip, wrong format, …
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{p}: unreadable checkpoint ({type(e).__name__}: {first})") from e


def _unwrap(obj: Any, prefer: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint: `{"model", "ema", ...}` or other wrappers."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if "ema" in obj or "model" in obj:
            key = prefer if prefer in obj else ("model" if "model" in obj else "ema")
            if key != prefer:
                log.warning("%s: no %r weights, using %r", source, prefer, key)
            obj = obj[key]
        elif any(k in obj for k in WRAPPER_KEYS) and not all(torch.is_tensor(v) for v in obj.values()):
            obj = obj[next(k for k in WRAPPER_KEYS if k in obj)]
        else:
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: no state dict found (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {_few(bad)}; not a state dict")
    return _strip_prefixes(dict(obj))


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# --- config inference and checks ------------------------------------------------------------------
def _infer_config(sd: Mapping[str, torch.Tensor], known: dict[str, Any], source: str) -> dict[str, Any]:
    """DiTConfig fields from tensor shapes; `known` (diffusers config, overrides) wins where given."""

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"{source}: no {key!r}; not a DiT checkpoint (keys: {_few(sorted(sd))})")
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


def _check_keys(sd: Mapping[str, torch.Tensor], cfg: DiTConfig, source: str) -> None:
    """Missing, unexpected and mis-shaped keys, all in one error (shapes from a meta-device model)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{name} ({len(keys)}): {_few(keys)}" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    hint = ""
    if any(h in k for k in unexpected for h in _STUDENT_HINTS):
        hint = ("\nThe file holds student weights (LiT/DyDiT); without config metadata pass the student's "
                "config fields (attention='linear', dynamic=True, …) as overrides.")
    raise CheckpointError(f"{source}: checkpoint does not fit {describe(cfg)}:\n  " + "\n  ".join(parts) + hint)


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def describe(cfg: DiTConfig) -> str:
    """One line naming the architecture (errors and launch.convert's summary)."""
    return (f"DiT(hidden={cfg.hidden_size}, depth={cfg.depth}, heads={cfg.num_heads}, patch={cfg.patch_size}, "
            f"input={cfg.input_size}, in={cfg.in_channels}, learn_sigma={cfg.learn_sigma}, "
            f"classes={cfg.num_classes}, attention={cfg.attention}, dynamic={cfg.dynamic})")
