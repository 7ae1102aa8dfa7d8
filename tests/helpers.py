"""Small shared builders for tests: tiny random-weight configs of the real architectures."""
from __future__ import annotations

import torch

from models import build_model

TINY = dict(depth=2, hidden_size=48, input_size=8, num_classes=10)


def tiny(name: str, **kw):
    heads = {"dit": 6, "dydit": 6, "lit": 2, "dylit": 2}[name.split("-")[0]]
    args = {**TINY, "num_heads": heads, **kw}
    if name.startswith("dy"):
        args.setdefault("mlp_groups", 6)
    return build_model(name, **args)


def tiny_inputs(batch: int = 3, channels: int = 4, size: int = 8, num_classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Fill zero-initialised layers (adaLN-Zero, final layer) so outputs depend on every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rate.router" in name or "token_selection" in name:
                continue
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def assert_state_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float, atol: float, what: str = "") -> None:
    """Same keys, and every tensor close to its reference (a message names the first that is not)."""
    assert got.keys() == ref.keys(), f"{what}: keys differ: {sorted(got.keys() ^ ref.keys())[:10]}"
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}")
