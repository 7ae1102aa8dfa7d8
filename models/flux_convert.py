"""FLUX weights in every public format → our names (BFL's) and a `FluxConfig`.

- BFL `flux1-{dev,schnell}.safetensors` (and ComfyUI-style files with `model.diffusion_model.`):
  already our names; the config is inferred from tensor shapes.
- diffusers `FluxTransformer2DModel` (a directory with config.json and one or sharded safetensors):
  renamed by a *plan*, below. T2I.md §2.6 is the map; diffusers' own
  `convert_flux_transformer_checkpoint_to_diffusers` is its inverse (tests check both ways).
- our safetensors (config in the metadata).

The plan maps each of our keys to a dim-0 concatenation of source rows — `qkv` = [to_q; to_k; to_v],
`linear1` = [to_q; to_k; to_v; proj_mlp], and the final adaLN's halves swapped (diffusers stores
[scale; shift], BFL [shift; scale]) as [rows D:2D; rows 0:D] — never elementwise arithmetic, so a
sharded loader can read only the rows it owns (`assemble(plan, read)` with a lazy `read`).
FLUX has no null-text weights: the null-condition buffers are filled with zeros (`set_null_condition`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from models.family import Checkpoint
from models.flux_config import FluxConfig
from models.weights_io import CheckpointError, RawWeights, config_fields, few, key_problems

DIFFUSERS_CLASS = "FluxTransformer2DModel"
BUFFERS = ("null_text_emb", "null_text_pooled")
_STUDENT_HINTS = ("_rate.router", ".token_selection.", ".attn_mix.dwc.")


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of dim 0 of source tensor `key` (all rows when start is None)."""

    key: str
    start: int | None = None
    stop: int | None = None


Plan = dict[str, list[Piece]]  # our key → the source pieces concatenated along dim 0


try:  # lazy, file-backed weights (models/lazy.py, the sharded teacher loader): the same dim-0 compositions
    from models.lazy import cat_rows, slice_rows
except ImportError:  # before that loader: the eager torch ops
    def cat_rows(parts):
        return torch.cat(list(parts), dim=0)

    def slice_rows(t, start, stop):
        return t[start:stop]


def assemble(plan: Plan, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a plan; `read(key)` returns a source tensor, eager or lazy (then the result is
    a lazy composition that reads only the rows a rank asks for)."""
    out = {}
    for key, pieces in plan.items():
        parts = [read(p.key) if p.start is None else slice_rows(read(p.key), p.start, p.stop) for p in pieces]
        out[key] = parts[0] if len(parts) == 1 else cat_rows(parts)
    return out


# diffusers suffix → ours, inside a double block (`transformer_blocks.i.` → `double_blocks.i.`)
_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q.weight": "norm.query_norm.scale",
           "attn.norm_k.weight": "norm.key_norm.scale", "proj_out": "linear2"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}
_SWAPPED = ("norm_out.linear", "final_layer.adaLN_modulation.1")  # [scale; shift] → [shift; scale]
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


def diffusers_plan(shapes: Mapping[str, tuple[int, ...]], source: str) -> Plan:
    """The plan from diffusers names, from the source's key → shape map; any key it cannot place is
    an error naming it (so nothing is dropped silently)."""
    plan: Plan = {}
    fused: dict[str, dict[str, str]] = {}  # our fused key → {diffusers suffix: source key}
    unknown = []
    for key in shapes:
        m = _BLOCK.match(key)
        if m is None:
            stem, _, kind = key.rpartition(".")
            if stem == _SWAPPED[0]:
                d = shapes[key][0] // 2
                plan[f"{_SWAPPED[1]}.{kind}"] = [Piece(key, d, 2 * d), Piece(key, 0, d)]
            elif stem in _TOP:
                plan[f"{_TOP[stem]}.{kind}"] = [Piece(key)]
            else:
                unknown.append(key)
            continue
        stack, i, suffix, kind = m.groups()
        ours, renames, groups = (("double_blocks", _DOUBLE, _DOUBLE_FUSED) if stack == "transformer_blocks"
                                 else ("single_blocks", _SINGLE, _SINGLE_FUSED))
        full = f"{suffix}.{kind}"
        if full in renames:  # the QK-norm weights carry their kind in the table
            plan[f"{ours}.{i}.{renames[full]}"] = [Piece(key)]
        elif suffix in renames:
            plan[f"{ours}.{i}.{renames[suffix]}.{kind}"] = [Piece(key)]
        elif any(suffix in parts for parts in groups.values()):
            target = next(t for t, parts in groups.items() if suffix in parts)
            fused.setdefault(f"{ours}.{i}.{target}.{kind}", {})[suffix] = key
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: diffusers FLUX keys with no place in BFL's layout: {few(sorted(unknown))}")
    for target, found in fused.items():
        stem = target.split(".", 2)[2].rsplit(".", 1)[0]
        order = {**_DOUBLE_FUSED, **_SINGLE_FUSED}[stem]
        missing = [s for s in order if s not in found]
        if missing:
            raise CheckpointError(f"{source}: cannot build {target}: no {missing[0]} beside {sorted(found)}")
        plan[target] = [Piece(found[s]) for s in order]
    return plan


Rows = tuple[int, int] | tuple[tuple[int, int], ...] | None  # one range, ranges concatenated, or all


def diffusers_linear_names(cfg: FluxConfig) -> dict[str, list[tuple[str, Rows]]]:
    """Our linear layers → `FluxTransformer2DModel` modules (the inverse of the tables above), each with the
    output rows it takes: `qkv` → `to_q`, `to_k`, `to_v` (`add_*_proj` for text); a single block's
    `linear1` → `to_q`, `to_k`, `to_v`, `proj_mlp`; the final adaLN's halves swapped back ([scale; shift]
    = our rows [D:2D; 0:D]). For exporting LoRA adapters in diffusers' layout (`models/lora`)."""
    d, dm = cfg.hidden_size, cfg.mlp_hidden
    out: dict[str, list[tuple[str, Rows]]] = {}
    for theirs, mine in _TOP.items():
        if cfg.guidance_embed or not mine.startswith("guidance_in."):
            out[mine] = [(theirs, None)]
    out[_SWAPPED[1]] = [(_SWAPPED[0], ((d, 2 * d), (0, d)))]
    stacks = (("double_blocks", "transformer_blocks", cfg.depth, _DOUBLE, _DOUBLE_FUSED),
              ("single_blocks", "single_transformer_blocks", cfg.depth_single, _SINGLE, _SINGLE_FUSED))
    for ours, theirs, depth, renames, fused in stacks:
        for i in range(depth):
            for suffix, mine in renames.items():
                if not suffix.endswith(".weight"):  # the QK-norm scales are not linear layers
                    out[f"{ours}.{i}.{mine}"] = [(f"{theirs}.{i}.{suffix}", None)]
            for mine, parts in fused.items():
                sizes = [d] * 3 + [dm] * (len(parts) - 3)
                starts = [sum(sizes[:k]) for k in range(len(parts))]
                out[f"{ours}.{i}.{mine}"] = [(f"{theirs}.{i}.{p}", (a, a + n)) for p, a, n in zip(parts, starts, sizes)]
    return out


def config_from_diffusers(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """FluxConfig fields from a diffusers config.json (its in_channels are packed: 4 × the latent's)."""
    cls = cfg.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise CheckpointError(f"{source}: config.json is a {cls}, not a {DIFFUSERS_CLASS}")
    if int(cfg.get("patch_size", 1)) != 1:
        raise CheckpointError(f"{source}: patch_size={cfg['patch_size']} in config.json; FLUX packs 2×2 patches "
                              "outside its transformer (patch_size 1)")
    packed = int(cfg.get("in_channels", 64))
    out = cfg.get("out_channels")
    if packed % 4 or (out is not None and int(out) != packed):
        raise CheckpointError(f"{source}: in_channels={packed}, out_channels={out}: FLUX needs 4·C packed channels "
                              "in and out")
    heads, head_dim = int(cfg.get("num_attention_heads", 24)), int(cfg.get("attention_head_dim", 128))
    guidance = bool(cfg.get("guidance_embeds", False))
    return {"in_channels": packed // 4, "patch_size": 2, "hidden_size": heads * head_dim, "num_heads": heads,
            "depth": int(cfg.get("num_layers", 19)), "depth_single": int(cfg.get("num_single_layers", 38)),
            "axes_dim": [int(a) for a in cfg.get("axes_dims_rope", (16, 56, 56))],
            "vec_in_dim": int(cfg.get("pooled_projection_dim", 768)),
            "context_in_dim": int(cfg.get("joint_attention_dim", 4096)), "guidance_embed": guidance,
            "text_len": 512 if guidance else 256}


def infer_config(sd: Mapping[str, torch.Tensor], known: Mapping[str, Any], source: str) -> dict[str, Any]:
    """FluxConfig fields from BFL-named tensor shapes; `known` (diffusers config, overrides) wins."""

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"{source}: no {key!r}; not a FLUX checkpoint (keys: {few(sorted(sd))})")
        return sd[key]

    w = need("img_in.weight")
    hidden, packed = int(w.shape[0]), int(w.shape[1])
    count = lambda stack: 1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"{stack}\.(\d+)\.", k))), default=-1)  # noqa: E731
    depth, depth_single = count("double_blocks"), count("single_blocks")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = int(need(norm).shape[0])
    mlp = int(need("double_blocks.0.img_mlp.0.weight").shape[0]) if depth else int(need("single_blocks.0.linear1.weight").shape[0]) - 3 * hidden
    guidance = "guidance_in.in_layer.weight" in sd
    f: dict[str, Any] = {
        "in_channels": packed // 4, "patch_size": 2, "hidden_size": hidden, "num_heads": hidden // head_dim,
        "depth": depth, "depth_single": depth_single, "mlp_ratio": mlp / hidden,
        "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in sd if depth else True,
        "vec_in_dim": int(need("vector_in.in_layer.weight").shape[1]),
        "context_in_dim": int(need("txt_in.weight").shape[1]), "guidance_embed": guidance,
        "text_len": 512 if guidance else 256,
    }
    f.update(known)
    if "axes_dim" not in f:
        if f["hidden_size"] // f["num_heads"] != 128:
            raise CheckpointError(f"{source}: heads of {head_dim} channels; FLUX's RoPE axes [16, 56, 56] fit 128. "
                                  "Pass axes_dim=[a, b, c] (launch.convert --set axes_dim=[a,b,c])")
        f["axes_dim"] = [16, 56, 56]
    if any(h in k for k in sd for h in _STUDENT_HINTS):
        raise CheckpointError(f"{source}: student weights (routers or DWC) without our config metadata; "
                              "convert the run's export (it carries its config) instead")
    return f


def flux_checkpoint(raw: RawWeights, overrides: Mapping[str, Any]) -> Checkpoint:
    """Map `raw` onto our names, read or infer the config, check every key and shape."""
    source, sd = raw.source, raw.state_dict
    if raw.format == "diffusers":
        sd = assemble(diffusers_plan({k: tuple(v.shape) for k, v in sd.items()}, source), sd.__getitem__)
    fields = config_fields(raw, sd, overrides, config_from_diffusers, infer_config)
    from models.flux_family import FLUX

    try:
        cfg = FLUX.config_from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: inferred config is invalid: {e}") from e
    sd = dict(sd)
    if "null_text_emb" not in sd:  # no public format holds the null text
        sd["null_text_emb"] = torch.zeros(cfg.text_len, cfg.context_in_dim)
        sd["null_text_pooled"] = torch.zeros(cfg.vec_in_dim)
    check_keys(sd, cfg, source)
    return Checkpoint(sd, cfg, raw.format, source)


def expected_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
    from models.flux import Flux

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Flux(cfg).state_dict().items()}


def check_keys(sd: Mapping[str, torch.Tensor], cfg: FluxConfig, source: str) -> None:
    """Missing, unexpected and mis-shaped keys, all in one error (shapes from a meta-device model)."""
    parts, _ = key_problems(sd, expected_shapes(cfg))
    if not parts:
        return
    raise CheckpointError(f"{source}: checkpoint does not fit {describe(cfg)}:\n  " + "\n  ".join(parts))


def looks_like_flux(raw: RawWeights) -> bool:
    if raw.diffusers_config is not None:
        return raw.diffusers_config.get("_class_name") == DIFFUSERS_CLASS
    keys: Iterable[str] = raw.state_dict
    return any(k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks.")) for k in keys)


def describe(cfg: FluxConfig) -> str:
    return (f"FLUX(hidden={cfg.hidden_size}, double={cfg.depth}, single={cfg.depth_single}, heads={cfg.num_heads}, "
            f"in={cfg.in_channels}, guidance={cfg.guidance_embed}, attention={cfg.attention}, dynamic={cfg.dynamic})")
