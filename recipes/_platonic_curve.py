"""``--sizes``: the best-layer-pair score of every language x vision model pair as a function of
the number of paired samples (:func:`prh_lightning.alignment_curve`), saved as JSON, CSV, the
subsets used and a figure.

Every model pair is scored on the same nested subsets: each pair's curve gets a fresh
``torch.Generator().manual_seed(seed)``, so repeat ``r`` uses the same random order of the samples
for every pair (and the same permutations for the chance level).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import torch

from prh_lightning.curve import alignment_curve
from prh_lightning.recipes import _common as common

RecipeError = common.RecipeInputError


def parse_sizes(text: str) -> list[int]:
    """argparse type of ``--sizes``: ``"256,1024,4096"`` -> ``[256, 1024, 4096]`` (increasing, >= 2).

    >>> parse_sizes("256, 1024,4096")
    [256, 1024, 4096]
    """
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 2:
        raise argparse.ArgumentTypeError(
            f"expected increasing sample counts >= 2 separated by commas, such as 256,1024,4096; got {text!r}")
    return sizes


def check_sizes(sizes: list[int] | None, n: int, metric: str, k: int | None, where: str = "in the feature files") -> None:
    """Refuse sizes the data cannot give (more than ``n`` pairs) or the metric cannot score
    (``k`` neighbours need more than ``k`` samples), before any work."""
    if not sizes:
        return
    if sizes[-1] > n:
        raise RecipeError(f"--sizes asks for {sizes[-1]} samples but there are only n = {n} pairs ({where}); "
                          f"use sizes up to {n} (or more data)")
    if k is not None and sizes[0] <= k:
        raise RecipeError(f"--sizes: {metric} with --k {k} needs more than {k} samples, got a size of {sizes[0]}")
    if sizes[0] < 4:
        raise RecipeError(f"--sizes: every size must be at least 4 samples, got {sizes[0]}")


def model_pair_curves(language: dict, vision: dict, sizes: list[int], repeats: int, n_permutations: int, seed: int,
                      metric: str, normalize: bool, clip_quantile: float | None, **metric_kwargs) -> dict:
    """``{"<language> / <vision>": AlignmentCurve}`` of the best layer pair (``aggregate="max"``)."""
    clip = None if clip_quantile is None or clip_quantile >= 1 else clip_quantile
    curves = {}
    for lm, rows in language.items():
        for vm, cols in vision.items():
            curves[f"{lm} / {vm}"] = alignment_curve(
                rows, cols, metric, sizes, repeats, n_permutations=n_permutations, aggregate="max",
                generator=torch.Generator().manual_seed(int(seed)), normalize=normalize, clip_quantile=clip,
                **metric_kwargs,
            )
    return curves


def curve_record(curves: dict, seed: int) -> dict:
    """The JSON of ``<stem>_curve.json``: settings and, per model pair, the score at each size."""
    first = next(iter(curves.values()))
    pairs = []
    for name, c in curves.items():
        lm, vm = name.split(" / ", 1)
        pairs.append({"language": lm, "vision": vm, "mean": c.mean.tolist(), "low": c.low.tolist(),
                      "high": c.high.tolist(), "chance": None if c.chance is None else c.chance.tolist(),
                      "scores": c.scores.tolist()})
    return {"sizes": first.sizes, "repeats": int(first.scores.shape[0]), "level": first.level,
            "aggregate": first.aggregate, "metric": first.metric, "seed": int(seed), "pairs": pairs}


def curve_csv(record: dict) -> str:
    """One row per model pair and size: ``language,vision,n,mean,low,high,chance``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["language", "vision", "n", "mean", "low", "high", "chance"])
    for pair in record["pairs"]:
        for s, n in enumerate(record["sizes"]):
            chance = "" if pair["chance"] is None else repr(pair["chance"][s])
            writer.writerow([pair["language"], pair["vision"], n, repr(pair["mean"][s]), repr(pair["low"][s]),
                             repr(pair["high"][s]), chance])
    return buf.getvalue()


def curve_figure(curves: dict, title: str):
    """Every model pair's curve (mean, spread band, chance) on one log-2 ``n`` axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        curve.plot(ax, label=name)
    ax.set_title(title)
    return fig


def save_curve(curves: dict, seed: int, dest: Path, stem: str, title: str) -> dict[str, str]:
    """Write ``<stem>_curve.{json,csv,png}`` and ``<stem>_curve_subsets.npy`` atomically; returns the paths."""
    from prh_lightning.recipes._platonic_data import save_npy
    from prh_lightning.reporting import atomic_write_text, save_figure, write_json

    record = curve_record(curves, seed)
    files = {"curve_json": dest / f"{stem}_curve.json", "curve_csv": dest / f"{stem}_curve.csv",
             "curve_subsets": dest / f"{stem}_curve_subsets.npy", "curve_png": dest / f"{stem}_curve.png"}
    write_json(files["curve_json"], record)
    atomic_write_text(files["curve_csv"], curve_csv(record))
    save_npy(files["curve_subsets"], np.asarray(next(iter(curves.values())).subsets, dtype=np.int64))
    save_figure(curve_figure(curves, title), files["curve_png"])
    return {key: str(path) for key, path in files.items()}
