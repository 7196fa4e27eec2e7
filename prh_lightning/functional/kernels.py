"""Kernel metrics: HSIC, CKA (linear / RBF, biased / unbiased) and CKNNA.

Kernels are ``[n, n]`` matrices of paired samples. Building blocks for streaming and
layer x layer code: :func:`linear_kernel`, :func:`rbf_kernel`, :func:`median_distance`,
:func:`center_gram` (``H K H``), :func:`u_center` (unbiased centring, so that
``hsic(K, L, unbiased=True) = <u_center(K), u_center(L)> / (n (n - 3))``) and
:func:`masked_hsic_from_neighbours` (CKNNA's masked HSIC from neighbour lists, ``O(n k^2)``).

Unlike platonic-rep, no ``1e-6`` is added to CKA/CKNNA denominators by default (it breaks
``cka(x, x) == 1`` and scale invariance); pass ``eps=1e-6`` to reproduce those numbers
exactly. A zero or negative denominator raises instead.
"""

from __future__ import annotations

import torch

from ._validation import check_centred_signal, check_choice, check_k, check_min_samples, check_pair, check_positive
from .knn import knn_from_gram

__all__ = [
    "linear_kernel",
    "rbf_kernel",
    "median_distance",
    "center_gram",
    "u_center",
    "hsic",
    "cka",
    "unbiased_cka",
    "cknna",
    "masked_hsic_from_neighbours",
]

KERNELS = ("linear", "rbf")


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    """``K = x x^T`` for ``x [n, d]``; returns ``[n, n]``."""
    return x @ x.T


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` squared Euclidean distances, exact zeros on the diagonal."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def median_distance(x: torch.Tensor) -> torch.Tensor:
    """Median of the ``n (n - 1) / 2`` pairwise Euclidean distances ``||x_i - x_j||`` (i < j).

    Averages the two middle values for an even count (as ``numpy.median``).
    """
    n = x.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    dist = _squared_distances(x)[iu[0], iu[1]].sqrt()
    m = dist.numel()
    low = torch.kthvalue(dist, (m + 1) // 2).values
    high = torch.kthvalue(dist, m // 2 + 1).values
    return (low + high) / 2


def rbf_kernel(x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
    """``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` for ``x [n, d]``; returns ``[n, n]``.

    ``sigma=None`` uses the median heuristic ``sigma = median_{i<j} ||x_i - x_j||`` of ``x``
    itself (so each input of a pair gets its own bandwidth).
    """
    if sigma is None:
        sigma = median_distance(x)
        if float(sigma) <= 0:
            raise ValueError(
                "the median pairwise distance is 0 (more than half the samples are identical), so the "
                "median-heuristic RBF bandwidth is undefined; pass sigma= explicitly"
            )
    elif float(sigma) <= 0 or not torch.isfinite(torch.as_tensor(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    return torch.exp(-_squared_distances(x) / (2.0 * torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2))


def _check_kernels(K: torch.Tensor, L: torch.Tensor) -> int:
    for name, m in (("K", K), ("L", L)):
        if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"{name} must be a square [n, n] tensor, got {getattr(m, 'shape', type(m))}")
        if not m.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {m.dtype}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if K.shape != L.shape:
        raise ValueError(f"K and L must have the same shape, got {tuple(K.shape)} and {tuple(L.shape)}")
    if K.device != L.device:
        raise ValueError(f"K is on {K.device} but L is on {L.device}; move both to the same device")
    return K.shape[0]


def center_gram(K: torch.Tensor) -> torch.Tensor:
    """Double-centred kernel ``H K H`` with ``H = I - 11^T / n``; ``[n, n] -> [n, n]``."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def u_center(K: torch.Tensor) -> torch.Tensor:
    """Unbiased (U-)centring of a symmetric kernel ``[n, n]``, ``n >= 4``.

    With ``K~`` = ``K`` with zero diagonal, ``r = K~ 1`` and ``s = 1^T K~ 1``:
    ``U_ij = K~_ij - (r_i + r_j) / (n - 2) + s / ((n - 1)(n - 2))`` off the diagonal, ``U_ii = 0``.
    Then ``<U(K), U(L)> = <U(K), L~> = n (n - 3) HSIC_unbiased(K, L)``.
    """
    n = K.shape[0]
    check_min_samples(n, 4, "unbiased centring")
    Kt = K.clone()
    Kt.fill_diagonal_(0.0)
    r = Kt.sum(dim=1)
    U = Kt - (r[:, None] + r[None, :]) / (n - 2) + r.sum() / ((n - 1) * (n - 2))
    U.fill_diagonal_(0.0)
    return U


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Hilbert-Schmidt independence criterion of two ``[n, n]`` kernels; returns 0-dim.

    Biased (platonic-rep, not divided by ``(n-1)^2``): ``tr(K H L H)``, ``H = I - 11^T / n``.
    Unbiased (Song et al. 2012), ``n >= 4``, with ``K~, L~`` the kernels with zero diagonals:
    ``[tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T K~ L~ 1] / (n (n-3))``.
    Kernels need not be symmetric (CKNNA's masked kernels are not).
    """
    n = _check_kernels(K, L)
    if not unbiased:
        KH = K - K.mean(dim=1, keepdim=True)
        LH = L - L.mean(dim=1, keepdim=True)
        return (KH * LH.T).sum()
    check_min_samples(n, 4, "the unbiased HSIC estimator")
    Kt = K.clone()
    Kt.fill_diagonal_(0.0)
    Lt = L.clone()
    Lt.fill_diagonal_(0.0)
    trace = (Kt * Lt.T).sum()
    sums = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    cross = Kt.sum(dim=0) @ Lt.sum(dim=1)
    return (trace + sums - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _kernel(x: torch.Tensor, kernel: str, sigma: float | None) -> torch.Tensor:
    return linear_kernel(x) if kernel == "linear" else rbf_kernel(x, sigma)


def _normalised(kl: torch.Tensor, kk: torch.Tensor, ll: torch.Tensor, eps: float, what: str) -> torch.Tensor:
    check_positive(kk, f"{what}(a, a)")
    check_positive(ll, f"{what}(b, b)")
    return kl / (torch.sqrt(kk * ll) + eps)


def cka(
    a: torch.Tensor,
    b: torch.Tensor,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: float | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Centred kernel alignment of ``a [n, d_a]``, ``b [n, d_b]``; returns 0-dim.

    ``CKA = HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + eps)`` with ``K = k(a)``, ``L = k(b)``,
    ``kernel="linear"`` (``a a^T``) or ``"rbf"`` (``exp(-||a_i - a_j||^2 / (2 sigma^2))``,
    ``sigma=None``: median pairwise distance of each input). ``unbiased`` picks the HSIC
    estimator (needs ``n >= 4``). ``eps=1e-6`` reproduces platonic-rep.
    """
    check_pair(a, b)
    check_choice(kernel, KERNELS, "kernel")
    if unbiased:
        check_min_samples(a.shape[0], 4, "unbiased CKA")
    K, L = _kernel(a, kernel, sigma), _kernel(b, kernel, sigma)
    kk, ll = hsic(K, K, unbiased), hsic(L, L, unbiased)
    n = a.shape[0]
    scale = n * (n - 3) if unbiased else 1  # hsic(K, K) * scale = ||centred K||_F^2
    check_centred_signal(kk * scale, float(K.abs().max()), n, K.dtype, "a")
    check_centred_signal(ll * scale, float(L.abs().max()), n, L.dtype, "b")
    return hsic(K, L, unbiased) / (torch.sqrt(kk * ll) + eps)


def unbiased_cka(
    a: torch.Tensor, b: torch.Tensor, kernel: str = "linear", sigma: float | None = None, eps: float = 0.0
) -> torch.Tensor:
    """CKA with the unbiased HSIC estimator (Song et al. 2012); see :func:`cka`. ``n >= 4``."""
    return cka(a, b, kernel=kernel, unbiased=True, sigma=sigma, eps=eps)


def _neighbour_mask(P: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    idx = knn_from_gram(P, k, exclude_self=exclude_self)
    return torch.zeros_like(P, dtype=torch.bool).scatter_(1, idx, True)


def _cknna_similarity(P: torch.Tensor, Q: torch.Tensor, k: int, unbiased: bool) -> torch.Tensor:
    mask = _neighbour_mask(P, k, unbiased) & _neighbour_mask(Q, k, unbiased)
    return hsic(P * mask, Q * mask, unbiased)


def cknna(a: torch.Tensor, b: torch.Tensor, k: int = 10, unbiased: bool = True, eps: float = 0.0) -> torch.Tensor:
    """Centred kernel nearest-neighbour alignment (Huh et al. 2024); returns 0-dim.

    ``K = a a^T``, ``L = b b^T``. For kernels ``P, Q`` let ``M_ij = 1`` iff ``j`` is among the
    top-``k`` of row ``i`` of both ``P`` and ``Q`` (self excluded when ``unbiased``), and
    ``sim(P, Q) = HSIC(M∘P, M∘Q)`` (unbiased or biased estimator to match). Then
    ``CKNNA = sim(K, L) / (sqrt(sim(K, K) sim(L, L)) + eps)``; ``2 <= k < n``. Not exactly
    symmetric in ``(a, b)`` (the masked kernels are asymmetric), as in the reference.
    """
    check_pair(a, b)
    check_k(k, a.shape[0], minimum=2)
    if unbiased:
        check_min_samples(a.shape[0], 4, "unbiased CKNNA")
    K, L = linear_kernel(a), linear_kernel(b)
    kl = _cknna_similarity(K, L, k, unbiased)
    kk = _cknna_similarity(K, K, k, unbiased)
    ll = _cknna_similarity(L, L, k, unbiased)
    return _normalised(kl, kk, ll, eps, "the CKNNA self-similarity sim")


def masked_hsic_from_neighbours(
    idx_a: torch.Tensor, val_a: torch.Tensor, idx_b: torch.Tensor, val_b: torch.Tensor
) -> torch.Tensor:
    """Unbiased ``HSIC(M∘P, M∘Q)`` of CKNNA from neighbour lists, in ``O(n k^2)``.

    Args:
        idx_a, val_a: ``[..., n, k]`` top-``k`` neighbours of each row of ``P`` (self excluded)
            and their kernel values ``P[i, idx_a[i, s]]``.
        idx_b, val_b: the same for ``Q``. Leading dims broadcast (many pairs at once).

    Returns:
        ``[...]``: the unbiased HSIC of the masked kernels, equal to
        ``hsic(P * M, Q * M, unbiased=True)`` with ``M`` the shared-neighbour mask.
    """
    idx_a, val_a, idx_b, val_b = torch.broadcast_tensors(idx_a, val_a, idx_b, val_b)
    n = idx_a.shape[-2]
    equal = idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)  # [..., n, k, k]
    p = val_a * equal.any(dim=-1)  # P'[i, idx_a[i, s]]
    q = (equal * val_b.unsqueeze(-2)).sum(dim=-1)  # Q'[i, idx_a[i, s]]
    col_p = torch.zeros_like(p[..., 0]).scatter_add_(-1, idx_a.flatten(-2), p.flatten(-2))
    cross = (col_p * q.sum(dim=-1)).sum(dim=-1)
    # tr(P'Q') = Σ_(i,j) P'_ij Q'_ji: look row j = idx_a[i, s] up for an entry pointing back at i.
    lead = idx_a.shape[:-2]
    k = idx_a.shape[-1]
    rows = idx_a.reshape(*lead, n * k, 1).expand(*lead, n * k, k)
    back_idx = torch.gather(idx_a, -2, rows).reshape(*lead, n, k, k)
    back_q = torch.gather(q, -2, rows).reshape(*lead, n, k, k)
    me = torch.arange(n, device=idx_a.device).view(n, 1, 1)
    q_back = ((back_idx == me) * back_q).sum(dim=-1)  # Q'_ji
    trace = (p * q_back).sum(dim=(-2, -1))
    sums = p.sum(dim=(-2, -1)) * q.sum(dim=(-2, -1)) / ((n - 1) * (n - 2))
    return (trace + sums - 2.0 / (n - 2) * cross) / (n * (n - 3))
