"""PixArt-Σ weights in every public format → our names (the official ones) and a `PixArtConfig`.

- Official `.pth` (`PixArt-Sigma-XL-2-*.pth`, with or without the `state_dict` wrapper; read with
  `torch.load(weights_only=True)` by `models.weights_io`): our names already; `pos_embed` is dropped
  (positions are recomputed per grid) after it gave the training grid, and `blocks.i.attn.sr`/`.norm`
  tell which blocks compress K and V.
- diffusers `PixArtTransformer2DModel` (directory, or a file beside its `config.json`): renamed, with
  `attn1.to_{q,k,v}` → `attn.qkv` and `attn2.to_{k,v}` → `cross_attn.kv_linear` as dim-0
  concatenations (no arithmetic on weights, so a rank can read only its rows). diffusers drops the
  null caption: `y_embedder.y_embedding` is then zeros until `set_null_condition` fills it.
- Our safetensors (config in the metadata).
The result is checked key by key against a meta-device model.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch

from models.convert_shapes import backbone_fields, grid_input_size, heads_by_width, required
from models.family import Checkpoint
from models.lazy import cat_rows
from models.pixart import PixArt
from models.pixart_config import SIZES, PixArtConfig
from models.weights_io import CheckpointError, RawWeights, few

log = logging.getLogger("models.convert")

HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in SIZES.values()}
NULL_KEY = "y_embedder.y_embedding"
DIFFUSERS_CLASS = "PixArtTransformer2DModel"

# diffusers → ours, one regex each; a tuple on the right is a dim-0 concatenation of several sources
_RENAMES: list[tuple[str, str]] = [
    (r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1"),
    (r"caption_projection\.linear_1\.(weight|bias)", r"y_embedder.y_proj.fc1.\1"),
    (r"caption_projection\.linear_2\.(weight|bias)", r"y_embedder.y_proj.fc2.\1"),
    (r"adaln_single\.emb\.timestep_embedder\.linear_1\.(weight|bias)", r"t_embedder.mlp.0.\1"),
    (r"adaln_single\.emb\.timestep_embedder\.linear_2\.(weight|bias)", r"t_embedder.mlp.2.\1"),
    (r"adaln_single\.linear\.(weight|bias)", r"t_block.1.\1"),
    (r"transformer_blocks\.(\d+)\.scale_shift_table", r"blocks.\1.scale_shift_table"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_q\.(weight|bias)", r"blocks.\1.cross_attn.q_linear.\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1"),
    (r"scale_shift_table", r"final_layer.scale_shift_table"),
]
_FUSED: list[tuple[str, tuple[str, ...], str]] = [  # (source name, parts in order, target) with {i}, {p}, {w}
    ("transformer_blocks.{i}.attn1.to_{p}.{w}", ("q", "k", "v"), "blocks.{i}.attn.qkv.{w}"),
    ("transformer_blocks.{i}.attn2.to_{p}.{w}", ("k", "v"), "blocks.{i}.cross_attn.kv_linear.{w}"),
]
_UNSUPPORTED = {
    "resolution_embedder": "PixArt-α's micro-conditions (resolution and aspect-ratio embedders); PixArt-Σ has none "
                           "(save the model with use_additional_conditions=False)",
    "norm_q": "QK-norm, which no released PixArt-Σ checkpoint uses",
    "csize_embedder": "PixArt-α's micro-conditions, which PixArt-Σ does not use",
    "q_norm": "QK-norm, which no released PixArt-Σ checkpoint uses",
}


def diffusers_linear_names(cfg: PixArtConfig) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """Our linear layers → `PixArtTransformer2DModel` modules (the inverse of the renames above, each with
    the output rows it takes): `attn.qkv` → `attn1.to_{q,k,v}`, `cross_attn.kv_linear` → `attn2.to_{k,v}`.
    For exporting LoRA adapters in diffusers' layout (`models/lora/diffusers_format.py`)."""
    with torch.device("meta"):
        linears = [n for n, m in PixArt(cfg).named_modules() if isinstance(m, torch.nn.Linear)]
    out: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
    for name in linears:
        for pattern, target in _RENAMES:
            theirs = _invert(pattern, target, f"{name}.weight")
            if theirs is not None:
                out[name] = [(theirs.removesuffix(".weight"), None)]
                break
    d = cfg.hidden_size
    for source, parts, target in _FUSED:
        for i in range(cfg.depth):
            ours = target.format(i=i, w="weight").removesuffix(".weight")
            if ours in linears:
                out[ours] = [(source.format(i=i, p=p, w="weight").removesuffix(".weight"), (k * d, (k + 1) * d))
                             for k, p in enumerate(parts)]
    return out


def _invert(pattern: str, target: str, key: str) -> str | None:
    """The source key `pattern` → `target` renames to `key`, or None: `target`'s group references become
    `pattern`'s groups, and the values they match there fill `pattern`'s groups."""
    groups = re.findall(r"\([^()]*\)", pattern)
    regex = re.escape(target)
    for n, g in enumerate(groups, start=1):
        regex = regex.replace(re.escape(f"\\{n}"), g)
    m = re.fullmatch(regex, key)
    if m is None:
        return None
    values = iter(m.groups())
    return re.sub(r"\([^()]*\)", lambda _: next(values), pattern).replace("\\.", ".")


def looks_like_pixart(raw: RawWeights) -> bool:
    if raw.diffusers_config is not None:
        return raw.diffusers_config.get("_class_name") == DIFFUSERS_CLASS
    sd = raw.state_dict
    return "t_block.1.weight" in sd or "adaln_single.linear.weight" in sd and "caption_projection.linear_1.weight" in sd


def pixart_checkpoint(raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
    """Map `raw` onto our names, infer or read the config, check keys and shapes."""
    source, sd = raw.source, dict(raw.state_dict)
    for key in sd:
        hit = next((why for part, why in _UNSUPPORTED.items() if part in key), None)
        if hit:
            raise CheckpointError(f"{source}: {key!r} belongs to {hit}; not a PixArt-Σ checkpoint DiTill can load")
    if raw.format == "diffusers":
        sd = diffusers_to_ours(sd, source)
    if raw.ours is not None:
        fields = {**raw.ours, **overrides}
    else:
        known = config_from_diffusers(raw.diffusers_config, source) if raw.diffusers_config is not None else {}
        fields = infer_config(sd, {**known, **overrides}, source)
    sd.pop("pos_embed", None)  # recomputed for every token grid
    try:
        cfg = PixArtConfig(**fields).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: inferred config is invalid: {e}") from e
    if NULL_KEY not in sd:
        log.warning("%s: no null caption (%s; diffusers drops it): zeros until set_null_condition() copies T5('') "
                    "into it (the shards' null_text.safetensors)", source, NULL_KEY)
        sd[NULL_KEY] = torch.zeros(cfg.model_max_length, cfg.caption_channels)
    check_keys(sd, cfg, source)
    return Checkpoint(sd, cfg, raw.format, source)


def diffusers_to_ours(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """diffusers names → ours; q/k/v (and cross k/v) concatenated along dim 0 in that order."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in sd.items():
        for pattern, target in _RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                used.add(key)
                break
    for name, parts, target in _FUSED:
        first = re.compile(re.escape(name).replace(r"\{i\}", r"(\d+)").replace(r"\{w\}", "(weight|bias)")
                           .replace(r"\{p\}", parts[0]))
        for key in sd:
            m = first.fullmatch(key)
            if not m:
                continue
            i, w = m.groups()
            names = [name.format(i=i, p=p, w=w) for p in parts]
            missing = [n for n in names if n not in sd]
            if missing:
                raise CheckpointError(f"{source}: {key} has no partner {missing} to fuse into {target.format(i=i, w=w)}")
            out[target.format(i=i, w=w)] = cat_rows([sd[n] for n in names])  # lazy: a rank reads only its rows
            used.update(names)
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{source}: diffusers keys with no PixArt-Σ counterpart: {few(left)}")
    return out


def config_from_diffusers(dcfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """PixArtConfig fields from a `PixArtTransformer2DModel` config.json, refusing what we do not build."""
    expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False, "attention_type": "default"}
    for key, want in expected.items():
        if dcfg.get(key, want) != want:
            raise CheckpointError(f"{source}: config.json {key}={dcfg[key]!r}; PixArt-Σ has {want!r}")
    heads, head_dim = int(dcfg.get("num_attention_heads", 16)), int(dcfg.get("attention_head_dim", 72))
    hidden, sample = heads * head_dim, int(dcfg.get("sample_size", 128))
    extra = dcfg.get("use_additional_conditions")
    if extra or (extra is None and sample == 128):
        raise CheckpointError(f"{source}: config.json use_additional_conditions={extra!r} with sample_size={sample} turns on "
                              "PixArt-α's micro-conditions (diffusers' default at 128); PixArt-Σ uses none: set it to false")
    if dcfg.get("caption_channels") is None:
        raise CheckpointError(f"{source}: config.json has no caption_channels; a PixArt model projects T5 captions")
    if int(dcfg.get("cross_attention_dim") or hidden) != hidden:
        raise CheckpointError(f"{source}: cross_attention_dim={dcfg['cross_attention_dim']} differs from the width {hidden}")
    in_ch = int(dcfg.get("in_channels", 4))
    out_ch = dcfg.get("out_channels")
    scale = dcfg.get("interpolation_scale")
    return {
        "hidden_size": hidden, "num_heads": heads, "depth": int(dcfg.get("num_layers", 28)), "in_channels": in_ch,
        "learn_sigma": out_ch is not None and int(out_ch) == 2 * in_ch, "patch_size": int(dcfg.get("patch_size", 2)),
        "input_size": sample, "caption_channels": int(dcfg["caption_channels"]),
        # diffusers' rule when unset: max(sample_size // 64, 1)
        "pe_interpolation": float(scale) if scale is not None else float(max(sample // 64, 1)),
    }


def infer_config(sd: Mapping[str, torch.Tensor], known: dict[str, Any], source: str) -> dict[str, Any]:
    """PixArtConfig fields from tensor shapes; `known` (diffusers config, overrides) wins where given."""

    f: dict[str, Any] = backbone_fields(sd, source, "PixArt-Σ")
    f["caption_channels"] = int(required(sd, "y_embedder.y_proj.fc1.weight", source, "PixArt-Σ").shape[1])
    if NULL_KEY in sd:
        f["model_max_length"] = int(sd[NULL_KEY].shape[0])
    f["guidance_embed"] = "g_embedder.mlp.0.weight" in sd
    kv = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"blocks\.(\d+)\.attn\.sr\.weight", k)))
    if kv:
        f["kv_compress_layers"], f["kv_compress_scale"] = kv, int(sd[f"blocks.{kv[0]}.attn.sr.weight"].shape[-1])
    f.update(grid_input_size(sd, known, f["patch_size"], source, " (launch.convert: --input-size; 128 for the 1024-px checkpoints)"))
    f.update(known)
    heads_by_width(f, HEADS_BY_HIDDEN, source)
    return f


def check_keys(sd: Mapping[str, torch.Tensor], cfg: PixArtConfig, source: str) -> None:
    """Every key of the model present with its shape and nothing else, reported together."""
    with torch.device("meta"):
        model = {k: tuple(v.shape) for k, v in PixArt(cfg).state_dict().items()}
    problems = [f"missing {k}" for k in sorted(set(model) - set(sd))]
    problems += [f"unexpected {k}" for k in sorted(set(sd) - set(model))]
    problems += [f"{k}: file {tuple(v.shape)}, model {model[k]}" for k, v in sorted(sd.items())
                 if k in model and tuple(v.shape) != model[k]]
    if problems:
        student = any(s in p for p in problems for s in ("_rate.", "token_selection", "attn.dwc"))
        hint = ("\nIt holds student weights (LiT/DyDiT): without our metadata pass their config fields "
                "(attention='linear', attn_heads=2, dynamic=True, …) as overrides.") if student else ""
        raise CheckpointError(f"{source}: checkpoint does not fit {describe(cfg)} ({len(problems)} problems): "
                              + "; ".join(problems[:8]) + hint)


def describe(cfg: PixArtConfig) -> str:
    """One line naming the architecture (errors and launch.convert's summary)."""
    return (f"PixArt(hidden={cfg.hidden_size}, depth={cfg.depth}, heads={cfg.num_heads}/{cfg.self_heads} (cross/self), "
            f"patch={cfg.patch_size}, input={cfg.input_size}, pe_interpolation={cfg.pe_scale:g}, in={cfg.in_channels}, "
            f"learn_sigma={cfg.learn_sigma}, caption={cfg.model_max_length}x{cfg.caption_channels}, "
            f"kv_compress={list(cfg.kv_layers) or 'none'}, attention={cfg.attention}, dynamic={cfg.dynamic})")
