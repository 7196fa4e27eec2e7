"""Sharded compute for the buffered metrics: each rank keeps its own samples, and the ``[n, d]``
union is never gathered on one device.

Row panels travel instead: for ``r = 0 .. world - 1``, rank ``r`` broadcasts its shard
``[n_r, d]`` and every rank scores its own rows against it, so a rank holds its shard and one
other panel at a time. The global order of the samples is rank-major (rank 0's rows, then
rank 1's, ...), with repeated sample ids dropped (first copy kept): the order in which a
gathering ``compute`` would see them, so the scores are the single-process ones.

* k-NN metrics (mutual, cycle, LCS, edit): each rank keeps a running top-``k + 1`` of its
  rows over the panels, in the compute dtype on centred features (as
  ``functional.knn.exact_neighbours``), re-ranks rows whose top values are within rounding of
  each other in float64 in a second round of panels, and then gathers the ``[n, k]``
  neighbour lists (small) to score them with the metric's plan.
* CKNNA: the same lists (self kept for the biased estimator) and the kernel values at them,
  from a second round of panels; both ``[n, k]``, gathered.
* kernel CKA (``cka`` / ``unbiased_cka``, linear or RBF): blocked HSIC. One round of panels
  accumulates ``Σ K_l∘K_m`` over all layer pairs and the row sums of every ``K_l``; both
  estimators follow from those (float64 sums). The RBF median-heuristic bandwidth is the
  exact median of the union's pairwise distances by the blocked selection of
  :mod:`prh_lightning.functional._bandwidth`, its counts summed over ranks.
* SVCCA: ``[d, d]`` statistics only (column moments, ``Z^T Z`` for the singular directions,
  ``U_x^T U_y``), summed over ranks.

A sharded compute must run on every rank (it is a sequence of collectives); input errors that
depend on the union (constant features, all-zero rows, ``k >= n``) are raised on every rank.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from prh_lightning.functional._numerics import compute_dtype
from prh_lightning.functional.knn import Neighbours
from prh_lightning.metrics._shards import (  # noqa: F401 - re-exported
    KNN_METRICS,
    SHARDED_METRICS,
    Shard,
    ShardGroup,
    check_every_rank_has_samples,
    condition_rows,
    deduplicate,
    shards_across_ranks,
)
from prh_lightning.metrics._sharded_kernels import sharded_cka, sharded_svcca
from prh_lightning.metrics._sharded_knn import (  # noqa: F401 - re-exported
    check_copies_sharded,
    sharded_cknna_layer,
    sharded_neighbours,
)


def sharded_matrix(
    metric: str,
    xs: list[Tensor],
    ys: list[Tensor] | None,
    ids: Tensor | None,
    normalize: bool = True,
    clip_quantile: float | None = None,
    process_group: Any = None,
    **options: Any,
) -> Tensor:
    """``[Lx, Ly]`` float64 scores of every layer pair (``alignment_matrix``) of the union of every
    rank's layers ``xs[l] [n_r, d_l]`` (and ``ys``), repeated ``ids`` dropped, without gathering
    the features; the same on every rank."""
    from prh_lightning.functional import get_plan

    if metric not in SHARDED_METRICS:
        raise ValueError(f"sharded compute supports {SHARDED_METRICS}, not {metric!r}")
    plan = get_plan(metric)
    options = plan.bind(options)
    group = ShardGroup(process_group)
    layers = xs + (ys or [])
    dtype = compute_dtype(*layers)
    kept, sizes = deduplicate(group, ids, *layers)
    if sum(sizes) < 2:
        raise ValueError(f"{metric} needs at least 2 samples over all processes, got {sum(sizes)}")
    names = [f"xs[{i}]" for i in range(len(xs))] + [f"ys[{i}]" for i in range(len(ys or []))]
    shards = [Shard(group, x, sizes, name, normalize, dtype, clip_quantile) for x, name in zip(kept, names)]
    sx, sy = shards[: len(xs)], (None if ys is None else shards[len(xs) :])
    if metric in KNN_METRICS or metric == "cknna":
        if options.get("knn_backend", "exact") != "exact":
            raise ValueError('sharded compute finds exact neighbours only; use knn_backend="exact"')
        if metric == "cknna":
            states = [sharded_cknna_layer(shard, options["k"], options["unbiased"]) for shard in shards]
        else:
            states = []
            for shard in shards:
                idx = group.gather_rows(sharded_neighbours(shard, options["k"]), sizes)  # [n, k] ints: small
                check_copies_sharded(shard, idx)
                states.append(Neighbours(idx))
        lx = len(xs)
        return plan.pairs(states[:lx], states if ys is None else states[lx:], **options).double()
    if metric == "svcca":
        return sharded_svcca(sx, sy, options["dim"])
    if options.get("eps", 0.0):
        raise ValueError("sharded CKA does not take eps; leave it at 0")
    unbiased = metric == "unbiased_cka" or bool(options.get("unbiased", False))
    return sharded_cka(sx, sy, options["kernel"], unbiased, options["sigma"])


def sharded_score(
    metric: str,
    a: Tensor,
    b: Tensor,
    ids: Tensor | None,
    normalize: bool,
    process_group: Any = None,
    **options: Any,
) -> Tensor:
    """``functional.METRICS[metric]`` of the union of every rank's ``a [n_r, d_a]``, ``b [n_r, d_b]``
    (repeated ``ids`` dropped), computed without gathering the features; 0-dim, the same on
    every rank, in the compute dtype (float64 for float64 input, else float32)."""
    scores = sharded_matrix(metric, [a], [b], ids, normalize, None, process_group, **options)
    return scores[0, 0].to(compute_dtype(a, b))
