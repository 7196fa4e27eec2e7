"""Input checks shared by every metric: clear errors instead of silent NaN."""

from __future__ import annotations

import torch


def check_features(x: torch.Tensor, name: str = "x", finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a (finite) floating ``[n, d]`` tensor; return it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, d], got {type(x).__name__}")
    if x.ndim != 2:
        hint = " (use x[:, None] for a single feature)" if x.ndim == 1 else " (pool or flatten it first)"
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}; call .float() first")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 samples and 1 feature, got shape {tuple(x.shape)}")
    # x.sum() is non-finite whenever x holds NaN/Inf (cheap); confirm element-wise (overflow).
    if finite and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or Inf in {bad} of {x.shape[0]} rows; clean the features first")
    return x


def check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Check two paired feature matrices: both valid, same ``n``, same device."""
    check_features(a, "a", finite=False)
    check_features(b, "b", finite=False)
    check_paired(a, b)
    check_features(a, "a")
    check_features(b, "b")


def check_paired(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise unless ``a`` and ``b`` hold the same number of rows (samples) on the same device."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must hold the same samples (row i = sample i) but a has {a.shape[0]} rows and b has "
            f"{b.shape[0]}"
        )
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}; move both to the same device")


def check_k(k: int, n: int, minimum: int = 1) -> int:
    """Check a neighbour count: ``minimum <= k < n`` (a sample is never its own neighbour)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < minimum or k >= n:
        raise ValueError(f"k must satisfy {minimum} <= k < n = {n} (a sample is never its own neighbour), got k={k}")
    return k


def check_min_samples(n: int, minimum: int, what: str) -> None:
    """Raise if fewer than ``minimum`` samples are given to an estimator that needs them."""
    if n < minimum:
        raise ValueError(f"{what} needs at least {minimum} samples, got n={n}")


def check_positive(value: torch.Tensor, what: str) -> None:
    """Raise if a denominator term is not strictly positive (e.g. constant features)."""
    if not bool(torch.isfinite(value)) or float(value) <= 0.0:
        raise ValueError(
            f"{what} is {float(value):.3g}, so the score is undefined (0/0); this happens with constant "
            "features or a degenerate kernel; check for collapsed or all-equal representations"
        )


def check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    """Raise if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_centred_signal(norm_sq: torch.Tensor, kernel_scale: float, n: int, dtype: torch.dtype, what: str) -> None:
    """Raise if a centred kernel ``C`` is zero up to rounding: ``||C||_F <= 64 eps n max|K|``.

    A constant representation has a constant kernel, whose centred version is exactly 0 in
    exact arithmetic but rounding noise in floating point; scores built on it are 0/0.
    """
    noise = 64 * torch.finfo(dtype).eps * n * kernel_scale
    if not bool(torch.isfinite(norm_sq)) or float(norm_sq) <= noise**2:
        raise ValueError(
            f"the centred kernel of {what} is zero up to rounding (||C||^2 = {float(norm_sq):.3g}), so the "
            "score is undefined (0/0); this happens with constant features or collapsed representations"
        )
