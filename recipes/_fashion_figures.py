"""Figures of the ``fashion-mnist`` recipe: UMAP per layer, RSA scatter, monitor curves, heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prh_lightning.data.fashion_mnist import CLASS_NAMES
from prh_lightning.recipes._fashion_settings import CNN_LAYERS, HEATMAPS, RESNET_LAYERS, Settings


def umap_embed(x: torch.Tensor, s: Settings) -> np.ndarray:
    """2-D UMAP of ``x [n, d]`` (standardised first); returns ``[n, 2]``."""
    import umap
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(x.double().numpy())
    reducer = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, n_epochs=s.umap_epochs,
                        random_state=s.seed, n_jobs=1)
    return reducer.fit_transform(z)


def umap_figure(reps, model_name: str, s: Settings):
    """One UMAP panel per layer, points coloured by class; returns a matplotlib Figure."""
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    keep = torch.arange(reps.n)[: s.umap_points]
    labels = reps.labels[keep].numpy()
    cols = min(3, len(reps.layers))
    rows = -(-len(reps.layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, layer in zip(axes.flat, tqdm(reps.layers, desc=f"UMAP {model_name}", disable=not s.progress)):
        xy = umap_embed(reps[layer][keep], s)
        for c, name in enumerate(CLASS_NAMES):
            mask = labels == c
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4, color=cmap(c), label=name)
        ax.set_title(f"{model_name} {layer}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(reps.layers):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=3, fontsize=8, frameon=False)
    fig.subplots_adjust(right=0.85)
    return fig


def scatter_figure(pairs: dict[str, tuple[np.ndarray, np.ndarray]], stats: dict[str, dict], model_name: str):
    """RSA scatter per text kind: vision centroid dissimilarity (x) vs MiniLM (y), with trend line."""
    import matplotlib.pyplot as plt
    from scipy.stats import linregress

    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.2), squeeze=False)
    for ax, (kind, (vx, ty)) in zip(axes.flat, pairs.items()):
        fit = linregress(vx, ty)
        line = np.linspace(vx.min(), vx.max(), 50)
        ax.scatter(vx, ty, s=14, alpha=0.8)
        ax.plot(line, fit.intercept + fit.slope * line, color="C3", label=f"y = {fit.slope:.2f}x + {fit.intercept:.2f}")
        st = stats[kind]
        ax.set_title(f"{model_name} avgpool vs MiniLM ({kind})\nSpearman {st['spearman']:.3f} "
                     f"(p={st['spearman_p']:.3g}), Pearson {st['pearson']:.3f}", fontsize=9)
        ax.set_xlabel(f"{model_name} centroid cosine dissimilarity")
        ax.set_ylabel("MiniLM label cosine dissimilarity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def monitor_figure(history: dict[str, list[tuple[int, float]]]):
    """CKA of each FashionCNN layer vs MiniLM and vs ResNet (best ResNet layer) over training steps."""
    from prh_lightning.plotting import line_figure

    series = {}
    for reference, label in (("minilm", "vs MiniLM"), ("resnet", "vs ResNet")):
        for layer in CNN_LAYERS:
            points = history.get(f"alignment/cka/{reference}/{layer}", [])
            if points:
                steps, values = zip(*points)
                series[f"{layer} {label}"] = (list(steps), list(values))
    return line_figure(series, title="FashionCNN layers while training: linear CKA on the probe", ylabel="CKA")


def save_heatmaps(matrices: dict[str, torch.Tensor], figures: Path, calibrated: bool = False) -> dict[str, str]:
    """One PNG per layer x layer matrix (``calibrated``: calibrated scores on a fixed 0-1 scale,
    files ``heatmap_<name>_calibrated.png``); returns ``{name: relative path}``."""
    from prh_lightning.plotting import heatmap_figure
    from prh_lightning.reporting import save_figure

    paths = {}
    for name, matrix in matrices.items():
        kind = "calibrated " if calibrated else ""
        fig = heatmap_figure(matrix, CNN_LAYERS, RESNET_LAYERS, title=f"FashionCNN x ResNet-18: {kind}{HEATMAPS[name][2]}",
                             xlabel="ResNet-18 layer", ylabel="FashionCNN layer", annotate=True,
                             **({"vmin": 0.0, "vmax": 1.0} if calibrated else {}))
        rel = f"figures/heatmap_{name}{'_calibrated' if calibrated else ''}.png"
        save_figure(fig, figures.parent / rel)
        paths[name] = rel
    return paths

