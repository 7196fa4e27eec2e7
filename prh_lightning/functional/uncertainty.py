"""Uncertainty for any metric: permutation null (p-value, z-score) and bootstrap CI.

Permutation null: shuffle the pairing (rows of ``b``) and rescore. For the k-NN metrics the
neighbour lists are computed once and permuted (``N_{b∘π}(i) = π^{-1}(N_b(π(i)))``); for
``cka`` / ``unbiased_cka`` the centred kernels are computed once and permuted (the
denominator does not change), so 1,000 permutations at ``n = 1,000`` take seconds. (With
exactly tied similarities the permuted lists may break ties differently from a recomputation.)
For ``rsa`` with ``compare="spearman"`` or ``"pearson"`` (a Mantel test) both RDMs are
computed once and their condensed upper triangles ranked once; shuffling the pairing permutes
rows and columns of ``b``'s RDM together, which only gathers entries of its condensed vector
(ranks included), so each permutation costs one gather and one dot product.
``compare="kendall"`` recomputes the score per permutation.

Bootstrap: resample paired rows with replacement. Copies of one sample would be each other's
nearest neighbours and inflate k-NN scores, so for ``mutual_knn``, ``cycle_knn``, ``lcs_knn``
and ``edit_distance_knn`` copies are excluded from each other's neighbour lists (and for
``cycle_knn`` returning to any copy of ``i`` counts). Other metrics see the plain resample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validation import check_k, check_pair
from .kernels import center_gram, linear_kernel, rbf_kernel, u_center
from .knn import (
    cycle_knn_from_indices,
    edit_distance_knn_from_indices,
    knn_indices,
    lcs_knn_from_indices,
    mutual_knn_from_indices,
)
from .rsa import condensed, rankdata, rdm

__all__ = ["PermutationResult", "permutation_test", "bootstrap_ci"]

_KNN = {
    "mutual_knn": mutual_knn_from_indices,
    "cycle_knn": cycle_knn_from_indices,
    "lcs_knn": lcs_knn_from_indices,
    "edit_distance_knn": edit_distance_knn_from_indices,
}


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of :func:`permutation_test`.

    Attributes:
        score: the observed score.
        p_value: ``(1 + #{null >= score}) / (1 + n_permutations)`` (one-sided, never 0).
        z_score: ``(score - mean(null)) / std(null)`` (``inf`` if the null is constant below the score).
        null: ``[n_permutations]`` float64 scores with the pairing shuffled.
    """

    score: float
    p_value: float
    z_score: float
    null: torch.Tensor


def _resolve(metric: str | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    from . import get_metric  # late import: the package imports this module

    return get_metric(metric)


def _check_count(value: int, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _permutations(n: int, count: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(n, generator=gen).to(device) for _ in range(count)]


def _knn_null(a, b, metric: str, perms: list[torch.Tensor], k: int = 10) -> torch.Tensor:
    n = a.shape[0]
    check_k(k, n)
    idx_a, idx_b = knn_indices(a, k), knn_indices(b, k)
    scorer = _KNN[metric]
    step = max(1, 2**24 // (n * k * k * (16 if metric in ("lcs_knn", "edit_distance_knn") else 1)))
    out = []
    for s in range(0, len(perms), step):
        perm = torch.stack(perms[s : s + step])  # [P, n]
        inverse = torch.argsort(perm, dim=1)
        moved = idx_b[perm].reshape(perm.shape[0], n * k)  # N_b(π(i))
        idx_bp = torch.gather(inverse, 1, moved).reshape(perm.shape[0], n, k)  # π^{-1}(...)
        out.append(scorer(idx_a, idx_bp))
    return torch.cat(out).double()


def _cka_null(a, b, perms, kernel="linear", unbiased=False, sigma=None, eps=0.0) -> torch.Tensor:
    centre = u_center if unbiased else center_gram
    make = linear_kernel if kernel == "linear" else (lambda x: rbf_kernel(x, sigma))
    ck, cl = centre(make(a)), centre(make(b))
    denom = torch.sqrt((ck * ck).sum() * (cl * cl).sum())
    scale = a.shape[0] * (a.shape[0] - 3) if unbiased else 1.0  # eps is in HSIC units
    flat_k = ck.flatten()
    # HSIC(K, L_π) ∝ <C_K, C_L[π][:, π]> (centring commutes with permuting samples).
    moved = (cl.index_select(1, p).index_select(0, p).flatten() for p in perms)
    null = [torch.dot(flat_k, m) / scale / (denom / scale + eps) for m in moved]
    return torch.stack(null).double().cpu()


def _condensed_positions(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(iu [2, m], pos [n * n])``: the ``m = n(n-1)/2`` pairs ``i < j`` and, for any ``(i, j)``,
    ``pos[i * n + j]`` = index of the unordered pair in the condensed vector (diagonal unused)."""
    iu = torch.triu_indices(n, n, offset=1, device=device)
    slot = torch.arange(iu.shape[1], device=device)
    pos = torch.zeros(n, n, dtype=torch.long, device=device)
    pos[iu[0], iu[1]] = slot
    pos[iu[1], iu[0]] = slot
    return iu, pos.flatten()


def _rsa_null(a, b, perms, distance="correlation", compare="spearman") -> torch.Tensor:
    """Mantel null ``[P]`` of ``rsa(a, b[π], distance, compare)`` for ``compare`` spearman / pearson.

    ``condensed(rdm(b[π]))[(i, j)] = rdm(b)[π(i), π(j)]``: a gather of ``b``'s condensed vector,
    whose mean and norm do not change; Spearman ranks move with their entries (average-tie
    ranks included), so the ranks are taken once. Arithmetic mirrors :func:`rsa` (float64,
    same centring and denominator, rounded to the input dtype); a permutation that leaves
    ``b``'s condensed RDM unchanged (the identity, or swapping identical samples) scores
    exactly as the observed pairing.
    """
    n = a.shape[0]
    u, v = condensed(rdm(a, distance)).double(), condensed(rdm(b, distance)).double()  # [m], [m]
    if compare == "spearman":
        u, v = rankdata(u), rankdata(v)
    u, v = u - u.mean(), v - v.mean()
    denom = u.norm() * v.norm()
    observed = ((u @ v) / denom).clamp(-1.0, 1.0)
    iu, pos = _condensed_positions(n, v.device)
    step = max(1, 2**22 // iu.shape[1])  # keeps each [P, m] gather at ~4M entries
    out = []
    for s in range(0, len(perms), step):
        perm = torch.stack(perms[s : s + step])  # [P, n]
        moved = v[pos[perm[:, iu[0]] * n + perm[:, iu[1]]]]  # [P, m]: condensed(rdm(b[π])), centred
        null = ((moved @ u) / denom).clamp(-1.0, 1.0)
        out.append(torch.where((moved == v).all(dim=1), observed, null))
    return torch.cat(out).to(a.dtype).double()  # rounded like rsa's score, so ties compare equal


def permutation_test(
    a: torch.Tensor,
    b: torch.Tensor,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    n_permutations: int = 1000,
    seed: int = 0,
    **metric_kwargs,
) -> PermutationResult:
    """Permutation null for ``metric(a, b)``: score ``metric(a, b[π])`` for random ``π``.

    Args:
        a, b: paired features ``[n, d_a]``, ``[n, d_b]``.
        metric: a name in ``METRICS`` or a callable ``f(a, b, **kw) -> 0-dim``.
        n_permutations: number of shuffles; the smallest reachable p-value is ``1 / (1 + n_permutations)``.
        seed: seeds the CPU generator drawing the permutations (reproducible across devices).
    """
    check_pair(a, b)
    _check_count(n_permutations, "n_permutations", 1)
    fn = _resolve(metric)
    score = float(fn(a, b, **metric_kwargs))
    perms = _permutations(a.shape[0], n_permutations, seed, b.device)
    if metric in _KNN:
        null = _knn_null(a, b, metric, perms, **metric_kwargs)
    elif metric in ("cka", "unbiased_cka"):
        kw = dict(metric_kwargs, unbiased=True) if metric == "unbiased_cka" else metric_kwargs
        null = _cka_null(a, b, perms, **kw)
    elif metric == "rsa" and metric_kwargs.get("compare", "spearman") in ("spearman", "pearson"):
        null = _rsa_null(a, b, perms, **metric_kwargs)
    else:
        null = torch.tensor([float(fn(a, b[p], **metric_kwargs)) for p in perms], dtype=torch.float64)
    return _summarise(score, null.cpu())


def _summarise(score: float, null: torch.Tensor) -> PermutationResult:
    p_value = (1 + int((null >= score).sum())) / (1 + null.numel())
    mean = float(null.mean())
    std = float(null.std()) if null.numel() > 1 else 0.0
    if std > 0:
        z = (score - mean) / std
    else:
        z = float("inf") if score > mean else float("-inf") if score < mean else 0.0
    return PermutationResult(score=score, p_value=p_value, z_score=z, null=null)


def _bootstrap_knn(a, b, metric: str, idx: torch.Tensor, k: int = 10) -> torch.Tensor:
    knn_a = knn_indices(a[idx], k, groups=idx)
    knn_b = knn_indices(b[idx], k, groups=idx)
    if metric == "cycle_knn":
        return cycle_knn_from_indices(knn_a, knn_b, groups=idx)
    return _KNN[metric](knn_a, knn_b)


def bootstrap_ci(
    a: torch.Tensor,
    b: torch.Tensor,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    **metric_kwargs,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval ``(low, high)`` for ``metric(a, b)``.

    Resamples the ``n`` paired rows with replacement ``n_resamples`` times and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled scores.
    For the k-NN metrics copies of a sample never count as its neighbours (see module doc).
    """
    check_pair(a, b)
    _check_count(n_resamples, "n_resamples", 2)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    fn = _resolve(metric)
    gen = torch.Generator().manual_seed(int(seed))
    n = a.shape[0]
    scores = []
    for _ in range(n_resamples):
        idx = torch.randint(n, (n,), generator=gen).to(a.device)
        if metric in _KNN:
            scores.append(float(_bootstrap_knn(a, b, metric, idx, **metric_kwargs)))
        else:
            scores.append(float(fn(a[idx], b[idx], **metric_kwargs)))
    s = torch.tensor(scores, dtype=torch.float64)
    alpha = (1.0 - confidence) / 2
    return float(torch.quantile(s, alpha)), float(torch.quantile(s, 1.0 - alpha))
