"""Input conditioning shared by every metric and entry point: one place that decides dtypes,
row normalisation, centring, rescaling and what counts as "constant".

Why: real features sit on large common offsets (post-ReLU layers), vary over many orders of
magnitude (diverging runs) and arrive in fp16 / bf16. Forming Grams or distances from raw
float32 rows then loses the signal to rounding. Here rows are normalised and centred in
float64, rescaled by a power of two (exact), and only then cast back to the compute dtype.

* compute dtype: float64 stays float64; every other floating dtype computes in float32;
  ``a`` and ``b`` of different dtypes are promoted to the wider one.
* inputs are detached: no autograd graph is kept by any metric.
* "constant": the centred features are below ``CONSTANT_RTOL * eps(input dtype)`` times the
  largest absolute feature, i.e. every sample equals the first up to the input's own rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import check_features

__all__ = [
    "compute_dtype", "condition", "Centred", "centre", "centre_float32", "ConditionedRows", "pivot_free_float32",
    "power_of_two_scale", "CONSTANT_RTOL",
]

CONSTANT_RTOL = 16.0
# largest |x| for which centring without a pivot keeps the data unscaled: products of two entries
# and sums of up to 2^40 of them stay far inside float32's normal range
SAFE_RANGE = (2.0**-40, 2.0**40)


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16 / bf16 compute in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def input_eps(x: torch.Tensor) -> float:
    """Machine epsilon of the dtype the user gave (the precision the data carries)."""
    return float(torch.finfo(x.dtype).eps)


def max_abs(x: torch.Tensor) -> float:
    """``max |x|`` without allocating ``|x|``."""
    low, high = torch.aminmax(x)
    return max(-float(low), float(high))


def power_of_two_scale(max_abs: float) -> float:
    """``2^-e`` with ``2^e`` close to ``max_abs``: rescaling by it is exact in floating point."""
    if not math.isfinite(max_abs) or max_abs <= 0:
        return 1.0
    return math.ldexp(1.0, -math.frexp(max_abs)[1])


def condition(
    x: torch.Tensor,
    name: str,
    normalize: bool = True,
    clip_quantile: float | None = None,
) -> torch.Tensor:
    """Validate ``x [n, d]``, detach it, optionally clip outliers and L2-normalise rows in float64.

    Returns a float64 ``[n, d]`` tensor (no graph). Raises on NaN/Inf, on an all-zero row when
    ``normalize`` (it has no direction), and on a bad ``clip_quantile``.
    """
    check_features(x, name)
    x64 = x.detach().to(torch.float64)
    if clip_quantile is not None:
        x64 = clip_outliers(x64, clip_quantile)
    if normalize:
        if x.dtype == torch.float64:  # squares of 1e200 or 1e-200 would overflow / underflow: rescale (exact)
            x64 = x64 * power_of_two_scale(max_abs(x64))
        norms = torch.linalg.vector_norm(x64, dim=1, keepdim=True)
        zero = (norms.squeeze(1) == 0).nonzero().flatten()
        if zero.numel():
            raise ValueError(
                f"{name} has {zero.numel()} all-zero rows (e.g. sample {int(zero[0])}); they have no direction and "
                "cannot be L2-normalised; drop such samples or pass normalize=False"
            )
        own_copy = x64.data_ptr() != x.data_ptr()  # never divide the caller's float64 tensor in place
        x64 = x64.div_(norms) if own_copy else x64 / norms
    return x64


def clip_outliers(x: torch.Tensor, q: float) -> torch.Tensor:
    """Clamp ``x [n, d]`` to ``[-t, t]``, ``t = mean_i quantile_q(|x_i|)`` (per-sample quantile, averaged).

    platonic-rep's ``remove_outliers(exact=False)`` computes the same threshold over all layers
    of a model stacked together; here it is computed per layer.

    >>> clip_outliers(torch.tensor([[1.0, -8.0], [2.0, 4.0]]), 0.5)
    tensor([[ 1.0000, -3.7500],
            [ 2.0000,  3.7500]])
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
        raise ValueError(f"clip_quantile must be in (0, 1], got {q!r}")
    if q == 1.0:
        return x
    rows = max(1, 2**23 // x.shape[1])  # torch.quantile refuses inputs above 2**24 elements
    per_sample = torch.cat([torch.quantile(x[s : s + rows].abs(), q, dim=1) for s in range(0, x.shape[0], rows)])
    t = per_sample.mean()
    return x.clamp(-t, t)


@dataclass
class Centred:
    """A layer centred and rescaled for Gram / distance computations.

    Attributes:
        xc: ``[n, d]`` centred features times ``scale``, in the compute dtype.
        mean: ``[d]`` float64 column mean times ``scale`` (``x = (xc + mean) / scale``).
        scale: the exact power-of-two factor applied.
        xc64: ``[n, d]`` float64 version of ``xc`` (kept only when asked for).
        roundings: how many roundings, each of relative size ``eps / 2`` at most, separate an
            entry of ``xc`` from the exact centred, rescaled value (1: one cast to the compute
            dtype; 2: :func:`pivot_free_float32`), for rounding-error bounds.
    """

    xc: torch.Tensor
    mean: torch.Tensor
    scale: float
    xc64: torch.Tensor | None = None
    roundings: int = 1


def grid_pivot(x64: torch.Tensor, spread: float) -> torch.Tensor:
    """``[d]`` the column mean rounded to a power-of-two grid no finer than the data's spread.

    ``x - pivot`` is then exact for data on a grid (integers stay integers, so exact ties stay
    exact) and for large offsets (Sterbenz), and it does not depend on the order of the rows
    beyond the last bits of the mean.
    """
    step = math.ldexp(1.0, math.frexp(spread)[1] - 1) if spread > 0 else 1.0
    return torch.round(x64.mean(dim=0) / step) * step


def centre(
    x64: torch.Tensor,
    input_dtype_eps: float,
    dtype: torch.dtype,
    name: str,
    keep64: bool = False,
    exact_mean: bool = True,
) -> Centred:
    """Centre the columns of a float64 ``x64 [n, d]``, refuse constant data, rescale exactly.

    ``exact_mean=False`` subtracts :func:`grid_pivot` instead of the mean (exact subtraction,
    ties preserved; enough for rankings and distances, which are translation invariant); when
    that pivot is 0 and the largest ``|x|`` lies in ``SAFE_RANGE`` the data are not rescaled
    (``scale = 1``: the float32 copy is the only pass).
    ``input_dtype_eps`` is the precision of the data as the user gave it; samples whose
    differences all sit below ``CONSTANT_RTOL`` of it (relative to the largest feature) are
    "constant" features and raise: any score would be computed from rounding noise.
    """
    low, high = x64.amin(dim=0), x64.amax(dim=0)  # (aminmax over dim 0 is several times slower)
    spread = float((high - low).max())  # the widest column range: 0 iff every row is the same
    size = max(-float(low.min()), float(high.max()))
    if spread <= CONSTANT_RTOL * input_dtype_eps * size:
        raise ValueError(
            f"{name} is constant across its {x64.shape[0]} samples (constant features: every row equals the "
            "others up to rounding), so the score is undefined; check for collapsed or all-equal representations"
        )
    mean = x64.mean(dim=0) if exact_mean else grid_pivot(x64, spread)
    # any power of two works (exact); the bound on |x - mean| from the column ranges avoids a pass
    scale = power_of_two_scale(float(torch.maximum(high - mean, mean - low).max()))
    if not exact_mean and not bool(mean.any()):  # pivot 0: nothing to subtract
        if SAFE_RANGE[0] <= size <= SAFE_RANGE[1]:
            scale = 1.0  # float32 squares and sums stay in range without rescaling: no pass at all
        xc = x64 * scale if scale != 1.0 or keep64 else x64
    else:
        xc = torch.sub(x64, mean).mul_(scale)
    mean = mean * scale
    return Centred(xc=xc.to(dtype), mean=mean, scale=scale, xc64=xc if keep64 else None)


# Fast route: the centred, normalised rows' mean squared norm rho^2 = 1 - ||mean||^2 at least this
# (a quarter of the rows' length is spread, not common offset).
WELL_SPREAD = 1.0 / 16
# row norms inside which float32 squares and sums neither overflow nor lose bits to underflow
_FAST_NORMS = (2.0**-50, 2.0**50)


def centre_float32(x: torch.Tensor, normalize: bool = True) -> Centred | None:
    """Centre the rows of ``x [n, d]`` (float32, fp16 or bf16), L2-normalised first when
    ``normalize``, in float32 when that is as good as the float64 route; ``None`` otherwise
    (the caller takes :func:`condition` + :func:`centre`, which also decide and word every
    refusal).

    Why float32 suffices there. Normalised rows: the row norms are taken in float64 (a float32
    norm errs by up to ~6 eps here, a per-row scale error) and rounded once, and the division
    rounds once, so a normalised entry ``u_ij`` is off by at most ``eps |u_ij|``; rows have
    norm 1, so relative to the centred rows (root mean square norm ``rho``) that is ``eps / rho``.
    With ``rho^2 = 1 - ||mean||^2 >= WELL_SPREAD`` that is at most ``4 eps`` (the float64
    route's own float32 copy rounds by ``eps / 2``). Rows as given (``normalize=False``): the
    entries are exact, the subtraction rounds once (``eps / 2`` of the centred entry), and the
    rows must be as well spread (``rho^2 >= WELL_SPREAD`` times their mean square norm) and of
    a magnitude (largest ``|x|`` in ``SAFE_RANGE``) whose float32 squares and sums stay normal.
    Either way the rounded column mean (summed in float32, pairwise: error about
    ``eps log2 n``, kept in float64) leaves a residual common offset that Gram-based scores
    see only to second order. Large common offsets (``rho`` small), non-finite values, zero
    rows and extreme magnitudes go the float64 route. ``scale``: 1 for normalised rows, else the
    power of two (exact) that brings the largest entry to about 1, as the float64 route does.

    >>> c = centre_float32(torch.tensor([[3.0, 4.0], [4.0, -3.0], [-3.0, -4.0]]))
    >>> c.xc.sum(dim=0).abs().max() < 1e-6, c.scale
    (tensor(True), 1.0)
    >>> centre_float32(torch.tensor([[1000.0, 1.0], [1000.0, -1.0]])) is None  # offset
    True
    >>> centre_float32(torch.tensor([[1000.0, 1.0], [1000.0, -1.0]]), normalize=False) is None
    True
    >>> c = centre_float32(torch.tensor([[3.0, 4.0], [1.0, -4.0]]), normalize=False)
    >>> c.xc, c.scale
    (tensor([[ 0.1250,  0.5000],
            [-0.1250, -0.5000]]), 0.125)
    """
    if x.dtype == torch.float64 or not x.is_floating_point():
        return None
    x = x.detach().to(torch.float32)
    if normalize:
        norms = torch.linalg.vector_norm(x.double(), dim=1).to(torch.float32)
        low, high = torch.aminmax(norms)
        if not (_FAST_NORMS[0] <= float(low) and float(high) <= _FAST_NORMS[1]):  # also False for NaN / Inf
            return None
        x = x / norms[:, None]  # a new tensor: centred in place below
        mean_square = 1.0
    else:
        low, high = torch.aminmax(x)
        largest = max(-float(low), float(high))
        if not (SAFE_RANGE[0] <= largest <= SAFE_RANGE[1]):  # also False for NaN / Inf
            return None
        mean_square = float(torch.linalg.vector_norm(x)) ** 2 / x.shape[0]
    mean = x.sum(dim=0).double() / x.shape[0]
    if mean_square - float(mean @ mean) < WELL_SPREAD * mean_square:
        return None
    if normalize:
        return Centred(xc=x.sub_(mean.to(torch.float32)), mean=mean, scale=1.0)
    # a power of two (exact) that brings the entries to about 1: kernels multiply four of them
    scale = power_of_two_scale(largest)
    xc = torch.sub(x, mean.to(torch.float32))  # never the caller's tensor in place
    return Centred(xc=xc.mul_(scale) if scale != 1.0 else xc, mean=mean * scale, scale=scale)


class ConditionedRows:
    """Rows of :func:`condition`'s float64 output formed on demand from float32 features ``x [n, d]``:
    ``x_i / norms_i`` in float64 when ``norms [n]`` (float64) is given, else ``x_i`` as float64.
    The values are the float64 route's bit for bit (the same cast, norm and division), without
    an ``[n, d]`` float64 copy when only a few rows are needed.

    >>> x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    >>> rows = ConditionedRows(x, torch.linalg.vector_norm(x.double(), dim=1))
    >>> bool((rows.full() == condition(x, "x")).all()), rows.index_select(0, torch.tensor([0])).tolist()
    (True, [[0.6, 0.8]])
    """

    def __init__(self, x: torch.Tensor, norms: torch.Tensor | None) -> None:
        self.x, self.norms = x, norms
        self.shape, self.device, self.dtype = x.shape, x.device, torch.float64

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Float64 rows ``rows`` (a slice or an index tensor)."""
        if isinstance(rows, slice):
            chosen = self.x[rows].double()
            return chosen if self.norms is None else chosen.div_(self.norms[rows, None])
        return self.index_select(0, torch.as_tensor(rows, device=self.device))

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """``[len(index), d]`` float64 rows ``index`` (``dim`` must be 0)."""
        if dim != 0:
            raise ValueError("ConditionedRows selects rows only (dim=0)")
        rows = self.x.index_select(0, index).double()
        return rows if self.norms is None else rows.div_(self.norms[index, None])

    def full(self) -> torch.Tensor:
        """All ``[n, d]`` rows in float64."""
        rows = self.x.double()
        return rows if self.norms is None else rows.div_(self.norms[:, None])


def as_float64(x64: torch.Tensor | ConditionedRows) -> torch.Tensor:
    """The ``[n, d]`` float64 conditioned features, formed if they were kept as :class:`ConditionedRows`."""
    return x64.full() if isinstance(x64, ConditionedRows) else x64


NORM_BLOCK = 2**18  # entries per row block of float64_row_norms (2 MB in float64: the block stays in cache)


def float64_row_norms(x: torch.Tensor, block_elements: int | None = None) -> torch.Tensor:
    """``[n]`` float64 L2 norms of the rows of ``x [n, d]``, the values :func:`condition` computes
    (each row reduced by the same kernel in float64), in row blocks of about ``block_elements``
    entries so that no float64 copy of the whole layer is formed.

    >>> float64_row_norms(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), block_elements=2).tolist()
    [5.0, 2.0]
    """
    rows = max(1, (block_elements or NORM_BLOCK) // max(1, x.shape[1]))
    return torch.cat([torch.linalg.vector_norm(x[s : s + rows].double(), dim=1) for s in range(0, x.shape[0], rows)])


def pivot_free_float32(
    x: torch.Tensor, normalize: bool, input_dtype_eps: float
) -> tuple[Centred, ConditionedRows] | None:
    """``centre(condition(x, normalize), exact_mean=False)`` formed in float32, for float32 (fp16,
    bf16) features whose grid pivot is 0 (no common offset large enough to subtract: the usual
    case after L2 normalisation), with the float64 rows on demand; ``None`` otherwise (the caller
    takes :func:`condition` + :func:`centre`, which also word every refusal: constant data,
    zero rows, non-finite values).

    The float64 route rounds each normalised entry ``u_ij = x_ij / |x_i|`` once, to float32. Here
    the float64 norm is rounded to float32 and the division rounds again: two roundings
    (``Centred.roundings = 2``), which rounding-error bounds take into account. Rows as given
    (``normalize=False``) are the float32 input itself, exact.

    >>> c, rows = pivot_free_float32(torch.tensor([[3.0, 4.0], [4.0, -3.0], [-3.0, -4.0]]), True, 1.2e-7)
    >>> c.xc, c.scale, bool(c.mean.any())
    (tensor([[ 0.6000,  0.8000],
            [ 0.8000, -0.6000],
            [-0.6000, -0.8000]]), 1.0, False)
    >>> pivot_free_float32(torch.tensor([[1000.0, 1.0], [1000.0, -1.0]]), True, 1.2e-7) is None  # offset
    True
    """
    if x.dtype == torch.float64 or not x.is_floating_point():
        return None
    x = x.detach().to(torch.float32)
    norms = None
    if normalize:
        norms = float64_row_norms(x)
        low, high = torch.aminmax(norms)
        if not (_FAST_NORMS[0] <= float(low) and float(high) <= _FAST_NORMS[1]):  # also False for NaN / Inf
            return None
        u = x / norms.to(torch.float32)[:, None]
    else:
        u = x
    low, high = u.amin(dim=0), u.amax(dim=0)
    spread = float((high - low).max())
    size = max(-float(low.min()), float(high.max()))
    if not (math.isfinite(spread) and SAFE_RANGE[0] <= size <= SAFE_RANGE[1]):
        return None
    if spread <= CONSTANT_RTOL * input_dtype_eps * size or bool(grid_pivot(u, spread).any()):
        return None  # constant (the float64 route refuses it) or a common offset to subtract
    mean = torch.zeros(u.shape[1], dtype=torch.float64, device=u.device)
    return Centred(xc=u, mean=mean, scale=1.0, roundings=2 if normalize else 1), ConditionedRows(x, norms)
