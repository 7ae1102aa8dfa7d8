"""`python -m launch.info MODEL [--json] [key=value ...]`: parameters and GFLOPs of a registry model.

Thin: parse, build on the meta device (no weights are allocated, so `dit-xl/2` costs nothing), ask
`models.flops` for the analytic counts, print. FLOPs are multiply-adds per image at the model's
native resolution (the DiT paper's unit), so dit-xl/2 reads 118.6 GFLOPs as in the paper.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from dataclasses import fields
from typing import Any

import torch

from models import DiT, family_of, model_config
from models.config import DiTConfig
from models.flops import model_report

# Parameter groups in print order; the FLOPs counter's block parts map onto the first four.
PARAM_GROUPS = ("attention", "mlp", "adaLN", "routers", "embeddings", "final_layer")
BLOCK_PARTS = {"attn": "attention", "mlp": "mlp", "adaln": "adaLN", "routers": "routers"}


def parse_value(text: str) -> Any:
    """`64` → int, `0.5` → float, `true`/`false` → bool, `None` → None, anything else → the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, str)) else text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["input_size=64", "depth=2"]` → `{"input_size": 64, "depth": 2}`; a malformed item is a ValueError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. input_size=64)")
        out[key.strip()] = parse_value(value.strip())
    return out


# Config field annotation → the Python types a command-line value may have for it.
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "Optional[int]": (int, type(None)), "int | None": (int, type(None)),
}


def check_types(overrides: dict[str, Any]) -> None:
    """A value of the wrong type (`depth=abc`) is a ValueError naming the key, before any build."""
    kinds = {f.name: str(f.type) for f in fields(DiTConfig)}
    for key, value in overrides.items():
        accepts = _ACCEPTS.get(kinds.get(key, ""))
        if accepts is None:
            continue  # unknown keys are reported by the registry, with the allowed list
        if isinstance(value, bool) and bool not in accepts or not isinstance(value, accepts):
            raise ValueError(f"model.{key}={value!r} is invalid: expected {kinds[key]}")


def param_group(name: str) -> str:
    """The group of a parameter; routers are matched first because they live inside blocks."""
    if any(k in name for k in ("attn_rate", "mlp_rate", "token_selection")):
        return "routers"
    if name.startswith("blocks.") and ".attn." in name:
        return "attention"
    if name.startswith("blocks.") and ".mlp." in name:
        return "mlp"
    if name.startswith("blocks.") and "adaLN_modulation" in name:
        return "adaLN"
    if name.startswith("final_layer"):
        return "final_layer"
    return "embeddings"


def count_params(cfg: DiTConfig) -> dict[str, int]:
    """Parameter counts per group and in total, from a model built on the meta device."""
    with torch.device("meta"):
        model = DiT(cfg)
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts[param_group(name)] += p.numel()
    groups = {g: counts.get(g, 0) for g in PARAM_GROUPS}
    return {**groups, "total": sum(counts.values())}


def model_info(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Everything `launch.info` prints, as one JSON-able dict (GFLOPs per image)."""
    check_types(overrides)
    cfg = model_config(name, **overrides)
    report = model_report(cfg)
    block = report["block"]
    totals = {k: v * cfg.depth for k, v in block.items()}
    return {
        "model": name.lower(),
        "family": family_of(cfg),
        "overrides": overrides,
        "image_size": cfg.input_size * 8,  # latent side × the SD VAE's downsampling factor
        "input_size": cfg.input_size,
        "tokens": report["tokens"],
        "depth": cfg.depth,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "attention": cfg.attention,
        "dynamic": cfg.dynamic,
        "params": count_params(cfg),
        "gflops": report["gflops"],
        "gflops_per_block": block,
        "gflops_blocks_total": totals,
        "gflops_embed": report["embed"],
    }


def format_table(info: dict[str, Any]) -> str:
    """The human-readable view of `model_info`."""
    p, g = info["params"], info["gflops"]
    lines = [
        f"{info['model']}  ({info['family']}: {info['attention']} attention"
        f"{', dynamic' if info['dynamic'] else ''})  overrides={info['overrides'] or '{}'}",
        f"latent {info['input_size']}x{info['input_size']} (~{info['image_size']}px), {info['tokens']} tokens, "
        f"depth {info['depth']}, hidden {info['hidden_size']}, heads {info['num_heads']}",
        f"parameters: {p['total']:,} ({p['total'] / 1e6:.2f} M; the fixed sin-cos pos_embed is a buffer, not counted)",
        f"GFLOPs per image (multiply-adds): {g:.3f}",
        "",
        f"{'part':<14}{'params':>14}{'GFLOPs/block':>14}{'GFLOPs total':>14}{'share':>8}",
    ]
    rows: list[tuple[str, int, float | None, float]] = []
    for key, group in BLOCK_PARTS.items():
        per, tot = info["gflops_per_block"][key], info["gflops_blocks_total"][key]
        rows.append((group, p[group], per, tot))
    embed_flops = sum(info["gflops_embed"].values()) - info["gflops_embed"]["final_layer"]
    rows.append(("embeddings", p["embeddings"], None, embed_flops))
    rows.append(("final_layer", p["final_layer"], None, info["gflops_embed"]["final_layer"]))
    for name, params, per, tot in rows:
        per_s = f"{per:14.4f}" if per is not None else f"{'-':>14}"
        lines.append(f"{name:<14}{params:>14,}{per_s}{tot:14.4f}{100 * tot / g:7.1f}%")
    lines.append(f"{'total':<14}{p['total']:>14,}{'':>14}{g:14.4f}{100.0:7.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.info", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registry name, e.g. dit-xl/2, lit-s/2, dydit-xl/2, dylit-b/4")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. input_size=64")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        info = model_info(args.model, parse_overrides(args.overrides))
    except (ValueError, TypeError) as err:
        print(f"launch.info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
