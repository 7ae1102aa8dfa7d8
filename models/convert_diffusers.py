"""diffusers `DiTTransformer2DModel` → our (official DiT) layout, checked against diffusers' code.

What differs between the two, and how it is handled (diffusers 0.39 `dit_transformer_2d.py`,
`attention.py:BasicTransformerBlock`, `normalization.py:AdaLayerNormZero`, `embeddings.py`):

| diffusers | ours / official | handling |
|---|---|---|
| `pos_embed.proj` | `x_embedder.proj` | rename |
| `pos_embed.pos_embed` (non-persistent buffer) | `pos_embed` | recomputed from `sample_size` |
| `transformer_blocks.i.norm1.emb.*` (one copy per block) | `t_embedder`, `y_embedder` (shared) | block 0's, all copies must be equal |
| `…norm1.linear` chunks (shift, scale, gate)×(msa, mlp) | `adaLN_modulation.1`, same order | rename |
| `…attn1.to_{q,k,v}` | `attn.qkv` = cat[q; k; v] rows | concatenate |
| `…attn1.to_out.0`, `…ff.net.0.proj`, `…ff.net.2` | `attn.proj`, `mlp.fc1`, `mlp.fc2` | rename |
| `proj_out_1` → (shift, scale) from block 0's `norm1.emb` | `final_layer.adaLN_modulation.1` (shift, scale) on c | rename, no swap |
| `proj_out_2`, unpatchify `nhwpqc->nchpwq` | `final_layer.linear`, same unpatchify | rename |
| `time_proj`: freqs ÷ (half − 1) (`downscale_freq_shift=1`) | freqs ÷ half | ours computes the official |
| `norm3` (pre-MLP LN) eps = `norm_eps` (default 1e-5) | 1e-6 | ours computes the official |

The last two rows are why a diffusers DiT is not exactly the official function: loading it here
gives the official DiT with the same weights. The released DiT weights were trained with the
official code; diffusers' copies are conversions of those `.pt` files.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch

from models.lazy import cat_rows, materialise

log = logging.getLogger(__name__)

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
OFFICIAL_LN_EPS = 1e-6
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_EMB = "norm1.emb."
# per-block rename, diffusers suffix → ours (q, k, v are concatenated separately)
_BLOCK_RENAMES = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_TOP_RENAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_EMB_RENAMES = {
    "timestep_embedder.linear_1": "t_embedder.mlp.0",
    "timestep_embedder.linear_2": "t_embedder.mlp.2",
    "class_embedder.embedding_table": "y_embedder.embedding_table",
}


class EmbedderMismatchError(ValueError):
    """The per-block timestep/label embedders of a diffusers DiT differ (e.g. after fine-tuning in
    diffusers): our model, like the official one, has one shared embedder and cannot represent it."""


def is_diffusers_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("transformer_blocks.") for k in sd) or "proj_out_2.weight" in sd


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def _check_shared_embedders(per_block: dict[int, dict[str, Any]], source: str) -> None:
    """Every block's copy of `norm1.emb` must equal block 0's, bit for bit (read whole, one copy at a
    time: the embedders are small next to the blocks)."""
    ref = per_block.get(0)
    if ref is None:
        raise ValueError(f"{source}: no transformer_blocks.0.norm1.emb.* keys; not a class-conditional DiT")
    bad = []
    for i, emb in sorted(per_block.items()):
        if set(emb) != set(ref):
            bad.append(f"block {i}: keys {sorted(set(emb) ^ set(ref))} differ from block 0")
            continue
        for name, lazy_t in emb.items():
            t, r = materialise(lazy_t), materialise(ref[name])
            if t.shape != r.shape or not torch.equal(t, r):
                diff = (t.float() - r.float()).abs().max().item() if t.shape == r.shape else "shape"
                bad.append(f"block {i}: norm1.emb.{name} (max |diff| {diff})")
    if bad:
        shown = "\n  ".join(bad[:5]) + (f"\n  … and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise EmbedderMismatchError(
            f"{source}: the per-block timestep/label embedders of this diffusers DiT are not identical "
            f"to block 0's:\n  {shown}\nOur model (like official DiT) has one shared embedder, so this "
            "checkpoint cannot be represented exactly. Fine-tuning in diffusers lets the copies drift; "
            "convert the model you trained from, or tie the copies (copy block 0's norm1.emb) knowingly."
        )


def diffusers_to_ours(sd: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Rename and regroup diffusers keys into ours. Keys with no counterpart are kept as they are,
    so the strict load that follows reports them as unexpected (e.g. affine norm weights).

    Only renames and dim-0 concatenations: given lazy tensors (`models.lazy`) the result is lazy too
    (`qkv` a concatenation of the file's q, k and v rows), so a rank reads only its rows."""
    out: dict[str, Any] = {}
    emb: dict[int, dict[str, Any]] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    for key, t in sd.items():
        m = _BLOCK.match(key)
        if m is None:
            out[_rename(key, _TOP_RENAMES) or key] = t
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith(_EMB):
            emb.setdefault(i, {})[rest[len(_EMB):]] = t
            continue
        qm = re.match(r"^attn1\.to_([qkv])\.(weight|bias)$", rest)
        if qm:
            qkv.setdefault((i, qm.group(2)), {})[qm.group(1)] = t
            continue
        new = _rename(rest, _BLOCK_RENAMES)
        out[f"blocks.{i}.{new}" if new else key] = t
    _check_shared_embedders(emb, source)
    for name, t in emb[0].items():
        out[_rename(name, _EMB_RENAMES) or f"transformer_blocks.0.norm1.emb.{name}"] = t
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise ValueError(f"{source}: block {i} has no attn1.to_{missing[0]}.{kind}; cannot build attn.qkv")
        out[f"blocks.{i}.attn.qkv.{kind}"] = cat_rows([parts["q"], parts["k"], parts["v"]])
    return out


def config_from_diffusers(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """DiTConfig fields from a diffusers `config.json`; refuse settings the official DiT lacks."""
    cls = cfg.get("_class_name", "DiTTransformer2DModel")
    if cls not in DIFFUSERS_CLASSES:
        raise ValueError(f"{source}: config.json is a {cls}, not a DiT ({' or '.join(DIFFUSERS_CLASSES)})")
    unsupported = {
        "norm_type": ("ada_norm_zero", cfg.get("norm_type", "ada_norm_zero")),
        "activation_fn": ("gelu-approximate", cfg.get("activation_fn", "gelu-approximate")),
        "attention_bias": (True, cfg.get("attention_bias", True)),
        "norm_elementwise_affine": (False, cfg.get("norm_elementwise_affine", False)),
    }
    for key, (want, got) in unsupported.items():
        if got != want:
            raise ValueError(f"{source}: config.json has {key}={got!r}; official DiT needs {want!r}")
    if cfg.get("num_embeds_ada_norm") is None or cfg.get("patch_size") is None:
        raise ValueError(f"{source}: config.json lacks num_embeds_ada_norm/patch_size; not a class-conditional DiT")
    eps = cfg.get("norm_eps", 1e-5)
    if eps != OFFICIAL_LN_EPS:
        log.info("%s: diffusers norm_eps=%g on the pre-MLP LayerNorm; loading as official DiT (1e-6)", source, eps)
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    in_ch = int(cfg.get("in_channels", 4))
    out_ch = int(cfg.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"{source}: out_channels={out_ch} is neither in_channels nor 2×in_channels (learned σ)")
    return {
        "input_size": int(cfg.get("sample_size", 32)),
        "patch_size": int(cfg["patch_size"]),
        "in_channels": in_ch,
        "hidden_size": heads * head_dim,
        "depth": int(cfg.get("num_layers", 28)),
        "num_heads": heads,
        "num_classes": int(cfg["num_embeds_ada_norm"]),
        "class_dropout_prob": 0.1,  # diffusers' LabelEmbedding always has the null row
        "learn_sigma": out_ch == 2 * in_ch,
    }


def diffusers_linear_names(depth: int, hidden: int) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """Our DiT linear layers → diffusers `DiTTransformer2DModel` modules (the inverse of the renames above):
    `attn.qkv` splits by rows into `to_q`, `to_k`, `to_v`; the shared timestep embedder maps onto every
    block's copy. For exporting LoRA adapters in diffusers' layout (`models/lora/diffusers_format.py`)."""
    d = hidden
    out: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
    inverse = {ours: theirs for theirs, ours in _BLOCK_RENAMES.items()}
    for i in range(depth):
        blk = f"transformer_blocks.{i}"
        out[f"blocks.{i}.attn.qkv"] = [(f"{blk}.attn1.to_{x}", (k * d, (k + 1) * d)) for k, x in enumerate("qkv")]
        for ours, theirs in inverse.items():
            out[f"blocks.{i}.{ours}"] = [(f"{blk}.{theirs}", None)]
    for theirs, ours in _TOP_RENAMES.items():
        if ours != "x_embedder.proj":  # a convolution, never adapted
            out[ours] = [(theirs, None)]
    for theirs, ours in _EMB_RENAMES.items():
        if ours.startswith("t_embedder."):
            out[ours] = [(f"transformer_blocks.{i}.{_EMB}{theirs}", None) for i in range(depth)]
    return out
