"""`CKA` (exact streaming linear CKA, Nguyen et al. minibatch CKA, or buffered kernel CKA)
and `UnbiasedCKA`.

Streaming linear CKA keeps the moments ``n``, ``sum a [d_a]``, ``sum b [d_b]``,
``a^T a [d_a, d_a]``, ``b^T b [d_b, d_b]``, ``a^T b [d_a, d_b]`` in float64 (summed over
batches and DDP ranks) and centres at compute:
``C_ab = a^T b - n mu_a mu_b^T``, ``CKA = ||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F)``,
which is full-batch linear CKA exactly, for any batching, in ``O(d_a^2 + d_b^2 + d_a d_b)``
memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from prh_lightning.functional._numerics import condition
from prh_lightning.metrics._checks import check_index_usage, check_pair_batch
from prh_lightning.metrics.buffered import DEFAULT_MAX_SAMPLES, BufferedPairMetric, _is_empty

# The centred second moment C = X^T X - n mu mu^T carries float64 cancellation error of about
# eps64 * ||X^T X||; features whose centred moment is within a few hundred of those rounding
# units of zero (relative spread below ~1e-7) are constant, anything above is signal.
_CONSTANT_TOL = 256 * torch.finfo(torch.float64).eps


def linear_cka_from_moments(
    n: Tensor, sum_a: Tensor, sum_b: Tensor, aa: Tensor, bb: Tensor, ab: Tensor
) -> Tensor:
    """Linear CKA of ``n`` samples from their sums ``[d]`` and raw cross-products ``[d, d']``; 0-dim."""
    mu_a, mu_b = sum_a / n, sum_b / n
    c_aa = aa - n * torch.outer(mu_a, mu_a)
    c_bb = bb - n * torch.outer(mu_b, mu_b)
    c_ab = ab - n * torch.outer(mu_a, mu_b)
    for name, centred, raw in (("a", c_aa, aa), ("b", c_bb, bb)):
        if torch.linalg.matrix_norm(centred) <= _CONSTANT_TOL * torch.linalg.matrix_norm(raw):
            raise ValueError(
                f"{name} is constant across the {int(n)} samples (zero variance after centring), so CKA "
                "is undefined (0/0); check for collapsed or all-equal representations"
            )
    return (c_ab**2).sum() / (torch.linalg.matrix_norm(c_aa) * torch.linalg.matrix_norm(c_bb))


class CKA(BufferedPairMetric):
    """Centred kernel alignment of paired features, accumulated over batches; 0-dim in [0, 1].

    Modes:
        * ``kernel="linear"`` (default): exact streaming; equals full-batch linear CKA on all
          samples seen, whatever the batching; memory independent of ``n``.
        * ``minibatch_unbiased=True``: Nguyen, Raghu & Kornblith (2021): average the unbiased
          HSIC (Song et al. 2012) of each minibatch, ``CKA = mean HSIC(K,L) / sqrt(mean
          HSIC(K,K) mean HSIC(L,L))``; every batch needs >= 4 samples. Depends on the batching.
        * ``kernel="rbf"`` or ``unbiased=True``: buffered (``max_samples``) full-sample CKA via
          ``prh_lightning.functional.cka``.

    Args:
        kernel: ``"linear"`` or ``"rbf"``.
        sigma: RBF bandwidth (``None``: median pairwise distance).
        unbiased: full-sample unbiased HSIC estimator (buffered).
        minibatch_unbiased: the minibatch estimator above (linear kernel only).
        normalize, max_samples, buffer_on_cpu, kwargs: see `BufferedPairMetric`.

    ``update(a, b, index=None)``: in streaming mode, ids let ``compute`` remove the padding
    duplicates of a ``DistributedSampler``: a repeated id is subtracted from the moments when
    its extra copies come from the *last* update of some rank (where that sampler puts its
    padding, and the only batch kept, ``O(batch * d)``); any other repeat raises. The ids
    themselves are kept (8 bytes per sample). Without ids duplicates cannot be detected.
    ``forward`` updates twice (``full_state_update``), since the kept last batch is not additive.
    Every DDP rank must update at least once before ``compute`` (state shapes come from data).
    """

    full_state_update = True
    metric_name = "cka"  # the buffered modes

    def __init__(
        self,
        kernel: str = "linear",
        sigma: float | None = None,
        unbiased: bool = False,
        minibatch_unbiased: bool = False,
        normalize: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
        if minibatch_unbiased and (kernel != "linear" or unbiased):
            raise ValueError("minibatch_unbiased=True works with kernel='linear' and unbiased=False only")
        mode = "minibatch" if minibatch_unbiased else ("stream" if kernel == "linear" and not unbiased else "buffer")
        super().__init__(
            normalize=normalize,
            max_samples=max_samples,
            buffer_on_cpu=buffer_on_cpu,
            _buffer=mode == "buffer",
            **kwargs,
        )
        self.mode = mode
        self.kernel, self.sigma, self.unbiased = kernel, sigma, bool(unbiased)
        f64 = torch.float64
        if self.mode == "stream":
            # scalar zeros broadcast against the first batch's [d] / [d, d'] sums
            for name in ("n", "sum_a", "sum_b", "aa", "bb", "ab"):
                self.add_state(name, default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")
            for name in ("ids", "last_a", "last_b", "last_ids"):
                self.add_state(name, default=[], dist_reduce_fx="cat")
        elif self.mode == "minibatch":
            for name in ("n_batches", "hsic_ab", "hsic_aa", "hsic_bb"):
                self.add_state(name, default=torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    # -- accumulation ----------------------------------------------------------------
    def update(self, a: Tensor, b: Tensor, index: Tensor | Sequence[int] | None = None) -> None:
        """Add a batch ``a [batch, d_a]``, ``b [batch, d_b]`` with optional sample ids ``index [batch]``."""
        if self.mode == "buffer":
            super().update(a, b, index)
            return
        ids = check_pair_batch(a, b, index)
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        if self.normalize:
            a64, b64 = condition(a64, "a"), condition(b64, "b")
        if self.mode == "minibatch":
            self._update_minibatch(a64, b64, ids)
        else:
            self._update_moments(a64, b64, ids)

    def _update_moments(self, a: Tensor, b: Tensor, ids: Tensor | None) -> None:
        if self.aa.ndim == 2 and (self.aa.shape[0] != a.shape[1] or self.bb.shape[0] != b.shape[1]):
            raise ValueError(
                f"feature sizes changed between updates: earlier a/b had {self.aa.shape[0]}/{self.bb.shape[0]} "
                f"features, this batch {a.shape[1]}/{b.shape[1]}; call reset() first"
            )
        check_index_usage(bool(self.n > 0), len(self.ids) > 0, ids is not None)
        self.n = self.n + a.shape[0]
        self.sum_a = self.sum_a + a.sum(dim=0)
        self.sum_b = self.sum_b + b.sum(dim=0)
        self.aa = self.aa + a.T @ a
        self.bb = self.bb + b.T @ b
        self.ab = self.ab + a.T @ b
        if ids is not None:
            self.ids.append(ids)
            self.last_a, self.last_b, self.last_ids = [a], [b], [ids]

    def _update_minibatch(self, a: Tensor, b: Tensor, ids: Tensor | None) -> None:
        from prh_lightning.functional import hsic

        if ids is not None:
            raise ValueError(
                "minibatch_unbiased=True averages per-batch estimates and cannot remove duplicate samples; "
                "drop `index` (and avoid padded samplers) or use the default exact streaming CKA"
            )
        if a.shape[0] < 4:
            raise ValueError(
                f"minibatch_unbiased=True needs every batch to hold >= 4 samples (unbiased HSIC), got "
                f"{a.shape[0]}; use drop_last=True or a larger batch"
            )
        K, L = a @ a.T, b @ b.T
        self.n_batches = self.n_batches + 1
        self.hsic_ab = self.hsic_ab + hsic(K, L, unbiased=True)
        self.hsic_aa = self.hsic_aa + hsic(K, K, unbiased=True)
        self.hsic_bb = self.hsic_bb + hsic(L, L, unbiased=True)

    # -- scoring ---------------------------------------------------------------------
    def compute(self) -> Tensor:
        """CKA of all samples seen (over all DDP ranks); 0-dim float32."""
        if self.mode == "buffer":
            return self._score("cka", kernel=self.kernel, unbiased=self.unbiased, sigma=self.sigma).float()
        if self.mode == "minibatch":
            return self._compute_minibatch().float()
        return linear_cka_from_moments(*self._deduplicated_moments()).float()

    def _compute_minibatch(self) -> Tensor:
        if self.n_batches == 0:
            raise RuntimeError("CKA has no samples; call update(a, b) before compute()")
        for name, value in (("a", self.hsic_aa), ("b", self.hsic_bb)):
            if value <= 0:
                raise ValueError(
                    f"the mean unbiased HSIC({name}, {name}) over minibatches is {float(value):.3g} <= 0, so CKA "
                    "is undefined; constant features, or too few/too small batches"
                )
        return self.hsic_ab / torch.sqrt(self.hsic_aa * self.hsic_bb)

    def _deduplicated_moments(self) -> tuple[Tensor, ...]:
        """``(n, sum_a, sum_b, aa, bb, ab)`` with the extra copies of repeated sample ids removed."""
        if self.n < 2:
            raise RuntimeError(f"CKA needs at least 2 samples, got {int(self.n)}; call update(a, b) first")
        moments = [self.n, self.sum_a, self.sum_b, self.aa, self.bb, self.ab]
        if _is_empty(self.ids):
            return tuple(moments)
        ids = dim_zero_cat(self.ids)
        if ids.numel() != int(self.n):
            raise ValueError(f"got {ids.numel()} sample ids for {int(self.n)} samples; pass `index` on every rank")
        uniq, counts = torch.unique(ids, return_counts=True)
        extra = dict(zip(uniq[counts > 1].tolist(), (counts[counts > 1] - 1).tolist()))
        if not extra:
            return tuple(moments)
        last_ids = dim_zero_cat(self.last_ids).tolist()
        drop = []
        for row, sample in enumerate(last_ids):
            if extra.get(sample, 0) > 0:
                extra[sample] -= 1
                drop.append(row)
        left = {sample: count for sample, count in extra.items() if count > 0}
        if left:
            raise ValueError(
                f"{sum(left.values())} repeated sample ids (e.g. {list(left)[:5]}) are not in the last batch of "
                "any rank, so streaming CKA cannot remove them; give each sample once per epoch, or use a "
                "buffered metric"
            )
        rows = torch.tensor(drop, device=ids.device)
        a, b = dim_zero_cat(self.last_a)[rows], dim_zero_cat(self.last_b)[rows]
        return (
            self.n - len(drop),
            self.sum_a - a.sum(dim=0),
            self.sum_b - b.sum(dim=0),
            self.aa - a.T @ a,
            self.bb - b.T @ b,
            self.ab - a.T @ b,
        )


class UnbiasedCKA(BufferedPairMetric):
    """Full-sample CKA with the unbiased HSIC estimator (Song et al. 2012), buffered; ``n >= 4``.

    Args:
        kernel: ``"linear"`` or ``"rbf"``; sigma: RBF bandwidth (``None``: median distance).
    """

    metric_name = "unbiased_cka"

    def __init__(
        self,
        kernel: str = "linear",
        sigma: float | None = None,
        normalize: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
        super().__init__(normalize=normalize, max_samples=max_samples, buffer_on_cpu=buffer_on_cpu, **kwargs)
        self.kernel, self.sigma = kernel, sigma

    def metric_kwargs(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "sigma": self.sigma}
