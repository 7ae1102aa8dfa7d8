"""Diffusion objectives (Gaussian DDPM with learned σ, rectified flow) and their samplers.

`build_objective(kind, **kwargs)` is what configs call; the trainer and the samplers only use the
`Objective` interface in `base.py`.
"""
from __future__ import annotations

from typing import Any

from models.diffusion.base import Objective, mean_flat, noisy_inputs
from models.diffusion.flow import RectifiedFlow
from models.diffusion.gaussian import GaussianDiffusion
from models.diffusion.samplers import sample

OBJECTIVES = {"gaussian": GaussianDiffusion, "flow": RectifiedFlow}


def build_objective(kind: str, **kwargs: Any) -> Objective:
    """The objective named `kind` ("gaussian" or "flow") built with its keyword settings."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective kind={kind!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[kind](**kwargs)


__all__ = [
    "OBJECTIVES",
    "GaussianDiffusion",
    "Objective",
    "RectifiedFlow",
    "build_objective",
    "mean_flat",
    "noisy_inputs",
    "sample",
]
