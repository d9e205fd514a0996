"""Plot of the latent weights' distance to the quantization bin edges (PNG, drawn on a bare matplotlib
Figure: the caller's global backend is left alone)."""
from __future__ import annotations

import torch
from torch import nn

from ._layers import quantized_layers


@torch.no_grad()
def latent_distance_to_edge(layer) -> torch.Tensor:
    """Per weight, the distance (in units of the scale) of the latent weight to the nearest
    decision boundary of its integer grid: 0.5 - |v - round(v)|, v = (w - beta) / s,
    for weights with ``qmin <= v <= qmax``. 0 = on a bin edge. Weights beyond (clipped, or in an
    outer half-bin: ``qmin - 0.5 <= v < qmin`` rounds to qmin with no edge below) are left out: the
    formula put them near an edge that does not exist."""
    w = layer.weight_view().float()
    s, b = layer.params()
    from ..reference.fake_quant_lsq import lsq_param_view

    v = (w - lsq_param_view(w, b, layer.axis, layer.group_size)) / lsq_param_view(w, s, layer.axis, layer.group_size)
    inside = (v >= layer.qmin) & (v <= layer.qmax)
    return (0.5 - (v - torch.round(v)).abs())[inside].flatten()


def plot_latent_distance(model: nn.Module, path: str, groups: dict[str, list[str]] | None = None,
                         title: str | None = None, bins: int = 50) -> str:
    """Histogram of :func:`latent_distance_to_edge` per group of layers, saved as a PNG.

    ``groups``: label -> list of layer names (as in ``model.named_modules()``; a name that is
    not a quantized layer raises KeyError); default: one group per quantized layer (at most 8). Oscillating weights pile up near 0.
    Returns ``path``.
    """
    # a bare Figure (no pyplot): matplotlib.use("Agg") here switched the caller's backend for the rest
    # of the session (a notebook lost its inline plots)
    from matplotlib.figure import Figure

    layers = {l.name: l for l in quantized_layers(model)}
    if not layers:
        raise ValueError("plot_latent_distance: the model has no quantized layer (module with weight and weight_quantizer)")
    if groups is None:
        groups = {n: [n] for n in list(layers)[:8]}
    # a misspelt name used to be skipped silently (a missing curve, or an empty plot)
    unknown = sorted({n for names in groups.values() for n in names if n not in layers})
    if unknown:
        raise KeyError(f"plot_latent_distance: groups name layers that are not quantized layers of the model: "
                       f"{unknown} (quantized layers: {sorted(layers)})")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, names in groups.items():
        ds = [latent_distance_to_edge(layers[n]) for n in names if n in layers]
        if not ds:
            continue
        d = torch.cat(ds).cpu().numpy()
        ax.hist(d, bins=bins, range=(0, 0.5), density=True, histtype="step", linewidth=1.5, label=f"{label} (n={len(d)})")
    ax.set_xlabel("distance of latent weight to nearest bin edge (units of s)")
    ax.set_ylabel("density")
    ax.set_xlim(0, 0.5)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
