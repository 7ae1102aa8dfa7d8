"""Name → model. `dit-xl/2` *is* its configuration (as in DiT's `DiT_models` table).

Families: `dit` (the teacher), `lit` (linear attention, few heads), `dydit` (dynamic width and
tokens), `dylit` (both). Sizes S/B/L/XL × patch 2/4/8 use DiT's hidden sizes, depths and heads.
"""
from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from models.config import DiTConfig
from models.dit import DiT

# size: (depth, hidden, DiT heads, LiT heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "s": (12, 384, 6, 2),
    "b": (12, 768, 12, 3),
    "l": (24, 1024, 16, 4),
    "xl": (28, 1152, 16, 4),
}
PATCHES = (2, 4, 8)
FAMILIES = ("dit", "lit", "dydit", "dylit")
_NAME = re.compile(r"^(dit|lit|dydit|dylit)-(s|b|l|xl)/(2|4|8)$")


def _family_defaults(family: str, size: str) -> dict[str, Any]:
    depth, hidden, heads, lit_heads = SIZES[size]
    base = {"depth": depth, "hidden_size": hidden, "num_heads": heads}
    if family in ("lit", "dylit"):
        base.update(attention="linear", num_heads=lit_heads, dwc_kernel=5)
    if family in ("dydit", "dylit"):
        # DyLiT keeps LiT's few heads (so a trained LiT becomes a DyLiT exactly) but routes the MLP
        # in DiT's number of channel groups, where most of the FLOPs are.
        base.update(dynamic=True, mlp_groups=heads)
    return base


def model_names() -> list[str]:
    return [f"{f}-{s}/{p}" for f in FAMILIES for s in SIZES for p in PATCHES]


def model_config(name: str, **overrides: Any) -> DiTConfig:
    """The config of registry model `name` with keyword overrides (e.g. `depth=2, hidden_size=64`)."""
    m = _NAME.match(name.lower())
    if not m:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    family, size, patch = m.group(1), m.group(2), int(m.group(3))
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown} for {name}; allowed: {sorted(known)}")
    kwargs = {"patch_size": patch, **_family_defaults(family, size), **overrides}
    return DiTConfig(**kwargs).validate()


def family_of(cfg: DiTConfig) -> str:
    return {(False, False): "dit", (True, False): "lit", (False, True): "dydit", (True, True): "dylit"}[
        (cfg.attention == "linear", cfg.dynamic)
    ]


def build_model(name: str | DiTConfig, **overrides: Any) -> DiT:
    """`build_model("dydit-s/2", depth=2, hidden_size=64, input_size=8)` → a DiT module."""
    cfg = name if isinstance(name, DiTConfig) else model_config(name, **overrides)
    return DiT(cfg)
