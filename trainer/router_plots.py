"""A dynamic student's routers as readable figures, in the manner of DyDiT's: timestep on x, layer (and
unit) on y, the active fraction as colour; and each layer's realised FLOPs as a curve over t.

Built with matplotlib's Agg backend (no display needed); `trainer.monitor` writes them to TensorBoard
and to `<run>/samples/`. Columns are sorted by timestep (t grows to the right: data on the left, noise
on the right), whatever order the sampler visited them in.
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.evaluate import RouterMap


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _t_axis(ax, t: torch.Tensor) -> None:
    ticks = list(range(0, len(t), max(1, len(t) // 8)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{float(t[i]):g}" for i in ticks], rotation=45)
    ax.set_xlabel("timestep t (as fed to the model)")


def _heatmap(rows: torch.Tensor, t: torch.Tensor, ticks: list[float], labels: list[str], ylabel: str, colour: str,
             title: str, height: float) -> Any:
    """(rows, T) fractions in [0, 1] against the sorted timesteps `t`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, max(3.0, height)), dpi=100)
    im = ax.imshow(rows.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels)
    ax.set_ylabel(ylabel)
    _t_axis(ax, t)
    fig.colorbar(im, ax=ax, label=colour)
    ax.set_title(f"{title} (mean {float(rows.mean()):.2f})")
    fig.tight_layout()
    return fig


def unit_map(rmap: RouterMap, name: str) -> Any:
    """(L·U rows, T columns) of `rmap.units[name]`: one row per unit, grouped by layer."""
    order = torch.argsort(rmap.timesteps)
    frac = rmap.units[name][..., order]  # (L, U, T)
    layers, units, _ = frac.shape
    every = max(1, layers // 14)
    fig = _heatmap(frac.reshape(layers * units, -1), rmap.timesteps[order],
                   [layer * units + (units - 1) / 2 for layer in range(0, layers, every)],
                   [f"layer {layer}" for layer in range(0, layers, every)], f"layer (rows: its {name}, unit 0 first)",
                   "active fraction", f"active {name} per layer over the sampling steps", 0.12 * layers * units + 1.5)
    for layer in range(1, layers):
        fig.axes[0].axhline(layer * units - 0.5, color="white", lw=0.4)
    return fig


def token_map(rmap: RouterMap) -> Any:
    """(L, T): the fraction of tokens each layer's token router sends to its MLP."""
    order = torch.argsort(rmap.timesteps)
    frac = rmap.tokens[..., order]
    return _heatmap(frac, rmap.timesteps[order], list(range(len(frac))), [f"layer {i}" for i in range(len(frac))], "layer",
                    "fraction of tokens routed to the MLP", "token routing per layer over the sampling steps",
                    0.25 * len(frac) + 1.5)


def flops_curves(rmap: RouterMap) -> Any:
    """Realised GFLOPs per sample of each layer's dynamic units (left axis) and of the whole model
    (right axis) against t."""
    plt = _plt()
    order = torch.argsort(rmap.timesteps)
    t = rmap.timesteps[order].numpy()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if rmap.layer_flops is not None:
        per_layer = rmap.layer_flops[..., order] / 1e9
        cmap = plt.get_cmap("viridis")
        for i, row in enumerate(per_layer):
            ax.plot(t, row.numpy(), color=cmap(i / max(1, len(per_layer) - 1)), lw=1,
                    label=f"layer {i}" if len(per_layer) <= 12 else None)
        if len(per_layer) <= 12:
            ax.legend(fontsize=6, ncol=2, loc="upper left")
    ax.set_xlabel("timestep t (as fed to the model)")
    ax.set_ylabel("GFLOPs per sample, per layer (attention + MLP)")
    total = ax.twinx()
    total.plot(t, (rmap.flops[order] / 1e9).numpy(), color="black", lw=2, label="whole model")
    total.set_ylabel("GFLOPs per sample, whole model (black)")
    ax.set_title("realised FLOPs over the sampling steps")
    fig.tight_layout()
    return fig


def router_figures(rmap: RouterMap) -> dict[str, Any]:
    """Tag → figure: `routers/heads`, `routers/channels` (and any other width mask), `routers/tokens`,
    `routers/flops`."""
    figs = {f"routers/{name}": unit_map(rmap, name) for name in rmap.units}
    if rmap.tokens is not None:
        figs["routers/tokens"] = token_map(rmap)
    figs["routers/flops"] = flops_curves(rmap)
    return figs
