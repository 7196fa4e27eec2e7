"""Uncertainty for any metric: permutation null (p-value, z-score) and bootstrap CI.

Permutation null: shuffle the pairing (rows of ``b``) and rescore from the metric plan's
prepared per-layer states, permuted rather than recomputed: k-NN lists
(``N_{b∘π}(i) = π^{-1}(N_b(π(i)))``), CKNNA lists and values, CKA's centred kernels (centring
commutes with permuting samples; the denominator does not change), RSA's ranked condensed
RDM (a gather), SVCCA's singular basis. So 1,000 permutations at ``n = 1,000`` take seconds.
(With exactly tied similarities the permuted lists may break ties differently from a
recomputation.)

Bootstrap: only where resampling is honest (the plan's ``resampling`` policy): k-NN metrics
keep copies out of each other's neighbour lists; kernel metrics and RSA refuse and point to
the delete-a-group jackknife.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validation import check_pair

__all__ = ["PermutationResult", "permutation_test", "bootstrap_ci"]


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


def _permutations(n: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(count)]).to(device)


def permutation_test(
    a: torch.Tensor,
    b: torch.Tensor,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    n_permutations: int = 1000,
    seed: int = 0,
    max_memory: int | str | None = None,
    **metric_kwargs,
) -> PermutationResult:
    """Permutation null for ``metric(a, b)``: score ``metric(a, b[π])`` for random ``π``.

    Args:
        a, b: paired features ``[n, d_a]``, ``[n, d_b]``.
        metric: a name in ``METRICS`` or a callable ``f(a, b, **kw) -> 0-dim``.
        n_permutations: number of shuffles; the smallest reachable p-value is ``1 / (1 + n_permutations)``.
        seed: seeds the CPU generator drawing the permutations (reproducible across devices).
        max_memory: a budget (bytes, or ``"512MB"``, ``"4GB"``, ``"2GiB"``) for the working
            memory of the preparation (as in :func:`prh_lightning.alignment_matrix`) and of the
            permutation null's tables and batches (CKA: default 1 GiB; k-NN metrics and CKNNA:
            fixed caps of about 256 MB without a budget); for a metric name only.
    """
    check_pair(a, b)
    _check_count(n_permutations, "n_permutations", 1)
    if max_memory is not None and not isinstance(metric, str):
        raise ValueError("max_memory applies to a metric name; a callable metric is called as given")
    perms = _permutations(a.shape[0], n_permutations, seed, b.device)
    if isinstance(metric, str):
        from ._plan import LayerContext, check_layers, get_plan, permuted_scores, prepare_layers

        plan = get_plan(metric)
        normalize = metric_kwargs.pop("normalize", True)
        clip_quantile = metric_kwargs.pop("clip_quantile", None)
        options = plan.bind(metric_kwargs)
        n, dtype, device = check_layers([a], [b], ["a"], ["b"])
        ctx = LayerContext(dtype, None, n, 2, device, max_memory)
        sa, sb = (prepare_layers(plan, [x], [name], options, normalize, clip_quantile, ctx)[0] for x, name in ((a, "a"), (b, "b")))
        score = float(plan.pairs([sa], [sb], **options)[0, 0].to(dtype))
        null = permuted_scores(plan, [sa], [sb], perms, options)[:, 0, 0].cpu().to(dtype).double()
        return _summarise(score, null)
    fn = _resolve(metric)
    score = float(fn(a, b, **metric_kwargs))
    null = torch.tensor([float(fn(a, b[p], **metric_kwargs)) for p in perms], dtype=torch.float64)
    return _summarise(score, null)


def _summarise(score: float, null: torch.Tensor) -> PermutationResult:
    p_value = (1 + int((null >= score).sum())) / (1 + null.numel())
    mean = float(null.mean())
    std = float(null.std()) if null.numel() > 1 else 0.0
    if std > 0:
        z = (score - mean) / std
    else:
        z = float("inf") if score > mean else float("-inf") if score < mean else 0.0
    return PermutationResult(score=score, p_value=p_value, z_score=z, null=null)


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
    Only where resampling is honest: for the k-NN metrics copies of a sample are never each
    other's neighbours (and for ``cycle_knn`` returning to any copy counts); SVCCA and user
    metrics see the plain resample. CKA, unbiased CKA, CKNNA and RSA have no honest bootstrap
    (a copy doubles kernel entries and is its own nearest neighbour): they raise and point to
    :func:`prh_lightning.functional.jackknife_ci`.

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(60, 5, generator=g)
    >>> low, high = bootstrap_ci(a, a + 0.1 * torch.randn(60, 5, generator=g), "mutual_knn", n_resamples=20, k=5)
    >>> 0.0 <= low <= high <= 1.0
    True
    """
    check_pair(a, b)
    _check_count(n_resamples, "n_resamples", 2)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    gen = torch.Generator().manual_seed(int(seed))
    n = a.shape[0]
    draws = [torch.randint(n, (n,), generator=gen).to(a.device) for _ in range(n_resamples)]
    if isinstance(metric, str):
        from ._plan import LayerContext, check_layers, get_plan, prepare_layers

        plan = get_plan(metric)
        if plan.resampling == "jackknife":
            raise ValueError(
                f"{metric} has no honest bootstrap: a resampled copy doubles kernel entries (and is its own nearest "
                "neighbour), which inflates the score; use prh_lightning.functional.jackknife_ci (delete-a-group "
                "jackknife) instead"
            )
        normalize = metric_kwargs.pop("normalize", True)
        clip_quantile = metric_kwargs.pop("clip_quantile", None)
        options = plan.bind(metric_kwargs)
        _, dtype, device = check_layers([a], [b], ["a"], ["b"])
        scores = []
        for idx in draws:
            ctx = LayerContext(dtype, None, n, 2, device)
            groups = idx if plan.resampling == "groups" else None
            sa = prepare_layers(plan, [a[idx]], ["a"], options, normalize, clip_quantile, ctx, groups)[0]
            sb = prepare_layers(plan, [b[idx]], ["b"], options, normalize, clip_quantile, ctx, groups)[0]
            extra = {"groups": groups} if groups is not None else {}
            scores.append(float(plan.pairs([sa], [sb], **options, **extra)[0, 0]))
    else:
        scores = [float(metric(a[idx], b[idx], **metric_kwargs)) for idx in draws]
    s = torch.tensor(scores, dtype=torch.float64)
    alpha = (1.0 - confidence) / 2
    return float(torch.quantile(s, alpha)), float(torch.quantile(s, 1.0 - alpha))
