"""Run-to-run alignment over checkpoints: how alike are independently trained runs at each
recorded step, and how far does each run drift from its final representation?

Input: ``runs`` maps a run name to ``{step: layers}`` (a ``Representations`` or a mapping
layer -> ``[n, d]``), all recorded on the same ``n`` probe samples. Scores are mutual k-NN on
L2-normalised rows at one compared layer, plus the best layer pair (``alignment_matrix``).

Uncertainty: a bootstrap over probe samples (copies of a sample are never each other's
neighbours, so resampling does not inflate k-NN scores). The *same* resamples are used at every
step, so the difference between two steps gets a paired interval
(:func:`step_difference_interval`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["resampled_mutual_knn", "between_runs", "calibrated_between_runs", "drift", "step_difference_interval"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def _lists(x: torch.Tensor, k: int, index: torch.Tensor | None) -> torch.Tensor:
    from prh_lightning.functional.knn import knn_indices

    return knn_indices(x, k) if index is None else knn_indices(x[index], k, groups=index)


def resampled_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10, index: torch.Tensor | None = None) -> float:
    """Mutual k-NN of ``a [n, d_a]``, ``b [n, d_b]`` on the rows at ``index`` (a resample with
    repeats; copies of one row are never each other's neighbours), or on all rows when None.

    >>> x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    >>> resampled_mutual_knn(x, x, k=3, index=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]))
    1.0
    """
    from prh_lightning.functional.knn import mutual_knn_from_indices

    return float(mutual_knn_from_indices(_lists(a, k, index), _lists(b, k, index)))


def _layer(reps: Any, layer: str | None) -> str:
    names = list(reps.keys()) if hasattr(reps, "keys") else list(reps.layers)
    if layer is None:
        return names[-1]
    if layer not in names:
        raise ValueError(f"layer {layer!r} is not recorded (layers: {names})")
    return layer


def between_runs(runs: Mapping[str, Mapping[int, Any]], layer: str | None = None, k: int = 10,
                 n_bootstrap: int = 200, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mutual k-NN between every pair of runs at every step all runs recorded.

    ``layer``: the compared layer (default: each checkpoint's last layer). Returns
    ``{"steps", "per_pair": {"a vs b": [steps]}, "best_layer_pair": {...}, "mean", "ci_low",
    "ci_high", "replicates": [n_bootstrap, steps]}``; ``mean`` is the average over run pairs,
    its percentile interval comes from the shared bootstrap ``replicates``.
    """
    from prh_lightning.alignment import alignment_matrix

    names = list(runs)
    if len(names) < 2:
        raise ValueError(f"need at least two runs to compare, got {names}")
    steps = sorted(set.intersection(*(set(c) for c in runs.values())))
    if not steps:
        raise ValueError("the runs share no recorded step")
    pairs = list(itertools.combinations(names, 2))
    first = runs[names[0]][steps[0]]
    n = next(iter(first.values())).shape[0] if hasattr(first, "values") else first.n
    gen = torch.Generator().manual_seed(int(seed))
    resamples = [torch.randint(n, (n,), generator=gen) for _ in range(n_bootstrap)]
    per_pair = {f"{a} vs {b}": [] for a, b in pairs}
    best = {f"{a} vs {b}": [] for a, b in pairs}
    replicates = np.zeros((n_bootstrap, len(steps)))
    for s, step in enumerate(steps):
        feats = {name: _unit(runs[name][step][_layer(runs[name][step], layer)]) for name in names}
        for a, b in pairs:
            per_pair[f"{a} vs {b}"].append(resampled_mutual_knn(feats[a], feats[b], k))
            scores = alignment_matrix(runs[a][step], runs[b][step], metric="mutual_knn", normalize=True, k=k)
            best[f"{a} vs {b}"].append(float(scores.max()))
        for r, idx in enumerate(resamples):
            lists = {name: _lists(x, k, idx) for name, x in feats.items()}
            replicates[r, s] = np.mean([_mutual(lists[a], lists[b]) for a, b in pairs])
    mean = np.mean([per_pair[f"{a} vs {b}"] for a, b in pairs], axis=0)
    alpha = (1 - confidence) / 2
    return {"steps": steps, "per_pair": per_pair, "best_layer_pair": best, "mean": mean.tolist(),
            "ci_low": np.quantile(replicates, alpha, axis=0).tolist(),
            "ci_high": np.quantile(replicates, 1 - alpha, axis=0).tolist(),
            "confidence": confidence, "replicates": replicates}


def calibrated_between_runs(runs: Mapping[str, Mapping[int, Any]], permutations: torch.Tensor,
                            layer: str | None = None, k: int = 10, alpha: float = 0.05) -> dict[str, Any]:
    """:func:`between_runs`' scores calibrated against chance with :func:`prh_lightning.calibrate`
    (mutual k-NN, L2-normalised rows): at every shared step and for every pair of runs ``a vs b``,
    the rows of every layer of ``b`` are reordered by each of ``permutations [K, n]``.

    Returns ``{"steps", "compared": {pair: {field: [steps]}}, "best_layer_pair": {pair: {field:
    [steps]}}, "n_permutations"}`` with fields ``raw``, ``null_mean``, ``tau``, ``p_value``,
    ``calibrated``: the compared layer's cell (``layer``; default each checkpoint's last layer),
    calibrated on its own, and the best layer pair calibrated against the best pair of each
    permuted matrix. Features are scored in float64.

    >>> x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    >>> runs = {"a": {0: {"h": x}}, "b": {0: {"h": x.flip(1)}}}  # a rotated copy
    >>> perms = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i)) for i in range(19)])
    >>> calibrated_between_runs(runs, perms, k=3)["compared"]["a vs b"]["p_value"]
    [0.05]
    """
    from prh_lightning.calibration import calibrate

    names = list(runs)
    if len(names) < 2:
        raise ValueError(f"need at least two runs to compare, got {names}")
    steps = sorted(set.intersection(*(set(c) for c in runs.values())))
    fields = ("raw", "null_mean", "tau", "p_value", "calibrated")
    compared = {f"{a} vs {b}": {f: [] for f in fields} for a, b in itertools.combinations(names, 2)}
    best = {key: {f: [] for f in fields} for key in compared}
    for step in steps:
        for a, b in itertools.combinations(names, 2):
            ra, rb = _float64(runs[a][step]), _float64(runs[b][step])
            i, j = list(ra).index(_layer(ra, layer)), list(rb).index(_layer(rb, layer))
            res = calibrate(ra, rb, "mutual_knn", permutations=permutations, alpha=alpha, aggregate="max", k=k)
            for f in fields:
                compared[f"{a} vs {b}"][f].append(float(getattr(res, f)[i, j]))
                best[f"{a} vs {b}"][f].append(float(getattr(res.aggregate, f)))
    return {"steps": steps, "compared": compared, "best_layer_pair": best, "n_permutations": int(permutations.shape[0])}


def _float64(reps: Any) -> dict[str, torch.Tensor]:
    """``{layer: [n, d] float64}``: neighbour lists ranked in float64 (as :func:`between_runs`'
    lists of the unrounded cosine), not at float32 rounding of the normalised rows."""
    items = reps.items() if hasattr(reps, "items") else ((name, reps[name]) for name in reps.layers)
    return {name: x.double() for name, x in items}


def _mutual(idx_a: torch.Tensor, idx_b: torch.Tensor) -> float:
    from prh_lightning.functional.knn import mutual_knn_from_indices

    return float(mutual_knn_from_indices(idx_a, idx_b))


def step_difference_interval(result: Mapping[str, Any], i: int, j: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(difference, low, high)`` of ``mean[j] - mean[i]`` (step positions ``i``, ``j``) from
    the paired bootstrap replicates of :func:`between_runs` (percentile interval)."""
    rep = np.asarray(result["replicates"])
    diff = rep[:, j] - rep[:, i]
    alpha = (1 - confidence) / 2
    mean = result["mean"]
    return float(mean[j] - mean[i]), float(np.quantile(diff, alpha)), float(np.quantile(diff, 1 - alpha))


def drift(runs: Mapping[str, Mapping[int, Any]], layer: str | None = None, k: int = 10) -> dict[str, dict[str, list]]:
    """Per run, mutual k-NN of the compared layer at each step against the run's final step
    (``vs_final``) and against its previous recorded step (``vs_previous``, None at the first)."""
    out = {}
    for name, ckpts in runs.items():
        steps = sorted(ckpts)
        feats = [_unit(ckpts[s][_layer(ckpts[s], layer)]) for s in steps]
        out[name] = {
            "steps": steps,
            "vs_final": [resampled_mutual_knn(f, feats[-1], k) for f in feats],
            "vs_previous": [None] + [resampled_mutual_knn(feats[i - 1], feats[i], k) for i in range(1, len(feats))],
        }
    return out
