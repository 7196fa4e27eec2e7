"""Linear CKA from feature-space statistics: ``O(n d_x d_y)`` time per pair and, beyond the
per-layer centred features (``[n, d]``, as large as the inputs), ``O((Σ d)^2)`` memory, for any ``n``.

For centred features ``X [n, d_x]``, ``Y [n, d_y]`` and linear kernels ``K = X X^T``,
``L = Y Y^T`` (centred already, so ``H K H = K``):

* biased: ``<K, L> = ||X^T Y||_F^2``;
* unbiased, in the units of ``<U(K), U(L)> = n (n - 3) HSIC_u`` (what the kernel path sums):
  ``tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) * (K~ 1) . (L~ 1)`` with
  ``tr(K~ L~) = ||X^T Y||_F^2 - Σ_i |x_i|^2 |y_i|^2``, ``K~ 1 = X (X^T 1) - |x_i|^2`` and
  ``1^T K~ 1 = |X^T 1|^2 - Σ_i |x_i|^2``.

The cross-covariances of all layers are accumulated over row blocks in float64 (each block's
product in the compute dtype), so nothing of size ``n x n`` is formed. The kernel path costs
``(L_x + L_y) n^2 d / 2``; this one ``L_x L_y n d_x d_y``: :func:`prefer_feature_space` picks
the cheaper.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ._numerics import centre
from ._plan import MetricPlan
from ._validation import check_min_samples, check_positive

__all__ = ["feature_space_inner", "feature_space_cka", "prefer_feature_space", "feature_space_plan"]

_ROWS = 4096  # rows per accumulated block (float32 sums over at most this many samples)


def prefer_feature_space(n: int, dims_x: list[int], dims_y: list[int]) -> bool:
    """True when cross-covariances (``Σ n d_x d_y`` over pairs, plus self terms) cost less than
    streaming the ``n x n`` centred kernels (``(L_x + L_y) n^2 d / 2``)."""
    feature = n * (sum(dims_x) * sum(dims_y) + sum(d * d for d in dims_x) + sum(d * d for d in dims_y))
    kernel = n * n * (sum(dims_x) + sum(dims_y)) // 2 + n * n * (len(dims_x) + len(dims_y)) ** 2 // 2
    return feature < kernel


def feature_space_inner(xs: list[torch.Tensor], ys: list[torch.Tensor], unbiased: bool) -> torch.Tensor:
    """``[Lx, Ly]`` float64 ``<C_x, C_y>`` of the centred (biased: ``H K H``; unbiased: ``U(K)``)
    linear kernels of centred features ``xs[i] [n, d_i]``, ``ys[j] [n, d_j]``, without forming them."""
    n = xs[0].shape[0]
    wx, wy = [x.shape[1] for x in xs], [y.shape[1] for y in ys]
    ox = torch.tensor([0, *wx]).cumsum(0).tolist()
    oy = torch.tensor([0, *wy]).cumsum(0).tolist()
    device = xs[0].device
    cross = torch.zeros(ox[-1], oy[-1], dtype=torch.float64, device=device)
    for s in range(0, n, _ROWS):
        bx = torch.cat([x[s : s + _ROWS] for x in xs], dim=1)
        by = torch.cat([y[s : s + _ROWS] for y in ys], dim=1)
        cross += (bx.T @ by).double()
    sq = cross.square()
    inner = torch.stack(
        [torch.stack([sq[ox[i] : ox[i + 1], oy[j] : oy[j + 1]].sum() for j in range(len(ys))]) for i in range(len(xs))]
    )
    if not unbiased:
        return inner
    nx = torch.stack([x.double().square().sum(dim=1) for x in xs], dim=1)  # [n, Lx] |x_i|^2
    ny = torch.stack([y.double().square().sum(dim=1) for y in ys], dim=1)
    rx = torch.stack([x.double() @ x.double().sum(dim=0) for x in xs], dim=1) - nx  # [n, Lx] (K~ 1)_i
    ry = torch.stack([y.double() @ y.double().sum(dim=0) for y in ys], dim=1) - ny
    trace = inner - nx.T @ ny
    return trace + rx.sum(dim=0)[:, None] * ry.sum(dim=0)[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rx.T @ ry)


def feature_space_cka(
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    unbiased: bool,
    eps: float = 0.0,
    scales_x: list[float] | None = None,
    scales_y: list[float] | None = None,
) -> torch.Tensor:
    """``[Lx, Ly]`` float64 linear CKA of centred features, as the kernel path computes it:
    ``<C_x, C_y> / (sqrt(<C_x, C_x> <C_y, C_y>) + eps')`` with ``eps' = eps * c * s_x * s_y``
    (``c = n (n - 3)`` unbiased, else 1; ``s`` the factor by which rescaling multiplied each kernel)."""
    n = xs[0].shape[0]
    cross = feature_space_inner(xs, ys, unbiased)
    self_x = torch.stack([feature_space_inner([x], [x], unbiased)[0, 0] for x in xs])
    self_y = torch.stack([feature_space_inner([y], [y], unbiased)[0, 0] for y in ys])
    for value in torch.cat([self_x, self_y]):
        check_positive(value, "the centred kernel's self-similarity HSIC(K, K)")
    denom = torch.sqrt(self_x[:, None] * self_y[None, :])
    if eps:
        c = n * (n - 3) if unbiased else 1.0
        sx = torch.tensor(scales_x or [1.0] * len(xs), dtype=torch.float64, device=denom.device)
        sy = torch.tensor(scales_y or [1.0] * len(ys), dtype=torch.float64, device=denom.device)
        denom = denom + eps * c * sx[:, None] * sy[None, :]
    return cross / denom


class _CentredLayer:
    """Per-layer state of the feature-space path: centred, rescaled features ``x [n, d]``."""

    def __init__(self, x: torch.Tensor, kernel_scale: float):
        self.x, self.kernel_scale = x, kernel_scale


def feature_space_plan(base: MetricPlan) -> MetricPlan:
    """The ``cka`` / ``unbiased_cka`` plan with linear kernels scored from feature-space
    statistics (same values, ``O(n d)`` states, no ``n x n`` block). Only for scoring layer
    pairs (no permutation fast path)."""
    fixed = base.name == "unbiased_cka"

    def prepare(x64, ctx, unbiased=None, **_):
        unbiased = fixed if unbiased is None else unbiased
        if unbiased:
            check_min_samples(x64.shape[0], 4, "unbiased CKA")
        c = centre(x64, ctx.input_eps, ctx.dtype, ctx.name)
        return _CentredLayer(c.xc, c.scale**2)

    def pairs(xs, ys, unbiased=None, eps=0.0, **_):
        unbiased = fixed if unbiased is None else unbiased
        return feature_space_cka(
            [s.x for s in xs], [s.x for s in ys], unbiased, eps, [s.kernel_scale for s in xs], [s.kernel_scale for s in ys]
        )

    return replace(base, name=base.name, prepare=prepare, pairs=pairs, permute=None, null=None)
