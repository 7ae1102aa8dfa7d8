"""Name → model, over every registered family (DiT's `DiT_models` table, generalised).

`dit-xl/2`, `lit-xl/2`, `pixart-sigma-xl/2`, `flux-dev`, … each *is* its configuration; a family
adds its rows by registering itself (`models/family.py`), and a family outside this package is
reached as `package.module:name`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from models.family import families, family_of, resolve_name


def model_names() -> list[str]:
    return [n for f in families().values() for n in f.names()]


def model_config(name: str, **overrides: Any):
    """The config of registry model `name` with keyword overrides (e.g. `depth=2, hidden_size=64`)."""
    family, short = resolve_name(name)
    return family.config(short, **overrides)


def student_kind(cfg) -> str:
    """"dit"-style kind of a config for reports: teacher, lit, dydit or dylit."""
    return family_of(cfg).student_kind(cfg)


def build_model(name: str | Any, **overrides: Any) -> nn.Module:
    """`build_model("dydit-s/2", depth=2, hidden_size=64, input_size=8)` → a module (or from a config)."""
    cfg = model_config(name, **overrides) if isinstance(name, str) else name
    return family_of(cfg).build(cfg)
