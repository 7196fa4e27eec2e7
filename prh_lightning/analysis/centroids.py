"""Class-centroid RSA: does a model arrange class centroids as a text model arranges the
class names? With a Mantel permutation test and a bootstrap interval over images.

For features ``x [n, d]`` with class ``labels [n]`` and one text embedding per class
``text [C, e]``: the centroids ``[C, d]`` (mean feature per class) and the text embeddings
each give an RDM over the ``C (C - 1) / 2`` class pairs (:func:`prh_lightning.functional.rdm`),
and RSA correlates the two (:func:`prh_lightning.functional.rsa`).

- Mantel p-value: the class labels of the text side are permuted
  (:func:`prh_lightning.functional.permutation_test` with ``metric="rsa"``).
- Bootstrap interval: images are resampled with replacement *within each class* (class sizes
  kept), the centroids recomputed and RSA rescored; percentile interval. It covers the choice of
  images only, not the small number of classes.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["class_centroids", "stratified_bootstrap", "centroid_rsa_bootstrap", "centroid_rsa"]


def class_centroids(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                    n_classes: int | None = None) -> torch.Tensor:
    """Mean feature per class: ``x [n, d]``, ``labels [n]`` (ints ``0..C-1``) -> ``[C, d]``.

    With ``weights [B, n]`` (how often each sample counts, e.g. bootstrap counts) returns the
    ``B`` weighted centroid sets ``[B, C, d]`` in one batched product.

    >>> class_centroids(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]))
    tensor([[1.],
            [5.]])
    """
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be [n] with n = {x.shape[0]} rows of x, got {tuple(labels.shape)}")
    classes = int(labels.max()) + 1 if n_classes is None else n_classes
    onehot = torch.nn.functional.one_hot(labels.long(), classes).to(x.dtype)  # [n, C]
    if weights is None:
        counts = onehot.sum(0)
        if bool((counts == 0).any()):
            raise ValueError(f"class {int((counts == 0).nonzero()[0])} has no samples; every class needs one")
        return (onehot.T @ x) / counts[:, None]
    member = weights.to(x.dtype)[:, :, None] * onehot  # [B, n, C]
    return (member.transpose(1, 2) @ x) / member.sum(1)[:, :, None]


def stratified_bootstrap(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices ``[n]`` resampled with replacement within each class (class sizes kept).

    >>> idx = stratified_bootstrap(torch.tensor([0, 0, 1, 1, 1]), torch.Generator().manual_seed(0))
    >>> torch.tensor([0, 0, 1, 1, 1])[idx].tolist()
    [0, 0, 1, 1, 1]
    """
    parts = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        parts.append(members[torch.randint(len(members), (len(members),), generator=generator)])
    return torch.cat(parts)


def centroid_rsa_bootstrap(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, n_bootstrap: int = 1000,
                           confidence: float = 0.95, seed: int = 0, distance: str = "cosine",
                           compare: str = "spearman") -> tuple[float, float, torch.Tensor]:
    """Percentile bootstrap interval of centroid RSA over images resampled within class:
    ``(low, high, replicates [n_bootstrap])``."""
    from prh_lightning.functional import rsa

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    gen = torch.Generator().manual_seed(int(seed))
    x, text = x.double(), text.double()
    counts = torch.stack([torch.bincount(stratified_bootstrap(labels, gen), minlength=len(labels))
                          for _ in range(n_bootstrap)])  # [B, n]
    centroids = class_centroids(x, labels, weights=counts, n_classes=text.shape[0])
    scores = torch.stack([rsa(c, text, distance=distance, compare=compare, normalize=False) for c in centroids]).double()
    alpha = (1.0 - confidence) / 2
    return float(torch.quantile(scores, alpha)), float(torch.quantile(scores, 1 - alpha)), scores


def centroid_rsa(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, n_permutations: int = 1000,
                 n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                 distance: str = "cosine") -> dict[str, Any]:
    """RSA between the class centroids of ``x [n, d]`` and ``text [C, e]`` (one row per class).

    Returns ``{"spearman", "pearson", "spearman_p", "pearson_p", "spearman_z", "pearson_z",
    "spearman_chance", "pearson_chance", "spearman_calibrated", "pearson_calibrated",
    "spearman_ci": [low, high], "confidence", "n_classes"}``: Spearman and Pearson RSA, Mantel
    p-values (one-sided, ``n_permutations`` label shuffles), z-scores against the null, the null
    mean (chance) and the calibrated score ``clamp((r - tau) / (1 - tau), 0, 1)`` (tau: the
    null's 95% quantile, :func:`prh_lightning.analysis.calibrate_statistic`), and the bootstrap
    interval of the Spearman score.
    """
    from prh_lightning.analysis.calibrated import calibrate_statistic
    from prh_lightning.functional import permutation_test

    x, text = x.double(), text.double()
    centroids = class_centroids(x, labels, n_classes=text.shape[0])
    result: dict[str, Any] = {"n_classes": int(text.shape[0]), "confidence": confidence}
    for compare in ("spearman", "pearson"):
        test = permutation_test(centroids, text, metric="rsa", distance=distance, compare=compare, normalize=False,
                                n_permutations=n_permutations, seed=seed)
        result[compare] = test.score
        result[f"{compare}_p"] = test.p_value
        result[f"{compare}_z"] = test.z_score
        cal = calibrate_statistic([test.score], test.null[:, None].numpy(), high=1.0)
        result[f"{compare}_chance"] = float(cal["null_mean"][0])
        result[f"{compare}_calibrated"] = float(cal["calibrated"][0])
    low, high, _ = centroid_rsa_bootstrap(x, labels, text, n_bootstrap, confidence, seed, distance)
    result["spearman_ci"] = [low, high]
    return result
