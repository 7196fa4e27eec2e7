"""Layer x layer matrices of one check and the scalars read from them (no Lightning import).

:func:`score_matrix` computes ``[Lx, Ly]`` with :func:`prh_lightning.alignment_matrix`; a layer
the metric cannot score (NaN / Inf features of a diverged model, constant features) gets a
NaN row or column, reported once through :class:`~prh_lightning.tracking.failures.Failures`,
and every other cell is still computed. :func:`scalars` turns matrices into logged values.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prh_lightning.tracking.failures import Failures
from prh_lightning.tracking.prepared import PreparedStates, split_options

Features = dict[str, torch.Tensor]
SNAPSHOTS = ("self_initial", "self_previous")
RESERVED = ("self", *SNAPSHOTS)


def check_metrics(metrics: Sequence[str] | str, metric_kwargs: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The metric names as a tuple; a clear error for an empty list or an unknown name."""
    from prh_lightning.functional import METRICS

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics:
        raise ValueError(f"metrics is empty; choose one or more of {sorted(METRICS)}")
    unknown = [m for m in (*metrics, *(metric_kwargs or {})) if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    return metrics


def metric_kwargs(metric: str, k: int, extra: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """``k`` for metrics that take one, then the user's keyword arguments for ``metric``."""
    from prh_lightning.functional import METRICS

    kwargs: dict[str, Any] = {}
    if "k" in inspect.signature(METRICS[metric]).parameters:
        kwargs["k"] = k
    kwargs.update((extra or {}).get(metric, {}))
    return kwargs


def metric_range(metric: str, kwargs: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """The range a metric's scores can take (colour limits of heatmaps); ``None`` where open.

    >>> metric_range("lcs_knn", {"k": 10}), metric_range("rsa", {})
    ((0.0, 10.0), (-1.0, 1.0))
    """
    if metric == "lcs_knn":
        return 0.0, float(kwargs.get("k", 10))
    if metric in ("cka", "mutual_knn", "cycle_knn", "edit_distance_knn", "svcca"):
        return 0.0, 1.0
    if metric in ("rsa", "cknna", "unbiased_cka"):
        return -1.0, 1.0
    return None, None


def _bad_layers(features: Features, owner: str, failures: Failures, cache: PreparedStates | None = None) -> set[str]:
    bad = set()
    for name, value in features.items():
        if not (cache.all_finite(value) if cache is not None else bool(torch.isfinite(value).all())):
            failures.report(f"{owner} layer {name!r}", ValueError("its features hold NaN or Inf (has the model diverged?)"))
            bad.add(name)
    return bad


def score_matrix(
    xs: Features,
    ys: Features | None,
    metric: str,
    kwargs: Mapping[str, Any],
    failures: Failures,
    target: str = "self",
    cache: PreparedStates | None = None,
) -> torch.Tensor:
    """``[Lx, Ly]`` float32 CPU scores of ``xs`` against ``ys`` (``None``: against ``xs``).

    Layers with non-finite features, and layers the metric rejects (a ``ValueError`` for that
    layer alone), give NaN rows / columns and one report each; other failures give NaN cells.
    With ``on_error="raise"`` the first failure is raised. ``cache``: prepared per-layer states
    shared with the check's other matrices and kept for the snapshots (same numbers as
    :func:`prh_lightning.alignment_matrix`, which this calls without a cache).
    """
    from prh_lightning.alignment import alignment_matrix

    same = ys is None
    ys_ = xs if same else ys
    matrix = torch.full((len(xs), len(ys_)), float("nan"))
    bad_x = _bad_layers(xs, "model", failures, cache)
    bad_y = bad_x if same else _bad_layers(ys_, _owner(target), failures, cache)
    rows = [i for i, name in enumerate(xs) if name not in bad_x]
    cols = [j for j, name in enumerate(ys_) if name not in bad_y]
    if not rows or not cols:
        return matrix
    if cache is not None:
        return _score_with_cache(xs, ys_, same, rows, cols, metric, kwargs, failures, target, cache, matrix)
    gx = {name: xs[name] for i, name in enumerate(xs) if i in rows}
    gy = None if same else {name: ys_[name] for j, name in enumerate(ys_) if j in cols}
    try:
        sub = alignment_matrix(gx, gy, metric=metric, **kwargs)
    except ValueError:  # find the layers the metric rejects; score the rest
        if failures.on_error == "raise":
            raise
        sub = _score_around_bad_layers(gx, gx if same else gy, metric, kwargs, failures, target)
    matrix[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = sub.detach().float().cpu()
    return matrix


def _score_with_cache(
    xs: Features,
    ys: Features,
    same: bool,
    rows: list[int],
    cols: list[int],
    metric: str,
    kwargs: Mapping[str, Any],
    failures: Failures,
    target: str,
    cache: PreparedStates,
    matrix: torch.Tensor,
) -> torch.Tensor:
    """:func:`score_matrix` from cached per-layer states: each layer is prepared once (a layer
    the metric rejects is reported and left NaN), then every pair is scored by the plan."""
    from prh_lightning.alignment import _large_n_plan
    from prh_lightning.functional._numerics import compute_dtype
    from prh_lightning.functional._plan import get_plan

    prep, options = split_options(kwargs)
    names_x, names_y = list(xs), list(ys)
    lx = [xs[names_x[i]] for i in rows]
    ly = lx if same else [ys[names_y[j]] for j in cols]
    plan = get_plan(_large_n_plan(metric, lx, None if same else ly, options))
    options = plan.bind(options)
    dtype = compute_dtype(*lx, *([] if same else ly))
    layers = len(lx) + (0 if same else len(ly))

    def prepared(indices: list[int], names: list[str], features: Features, owner: str) -> tuple[list[int], list]:
        kept, states = [], []
        for i in indices:
            try:
                states.append(cache.state(plan, options, features[names[i]], names[i], prep, dtype, layers))
            except ValueError as err:
                if failures.on_error == "raise":
                    raise
                failures.report(f"{owner} layer {names[i]!r}", err)
                continue
            kept.append(i)
        return kept, states

    rows, sx = prepared(rows, names_x, xs, "model")
    cols, sy = (rows, sx) if same else prepared(cols, names_y, ys, _owner(target))
    if not rows or not cols:
        return matrix
    try:
        sub = plan.pairs(sx, sx if same else sy, **options)
    except ValueError:  # a pair the metric cannot score: find it pair by pair
        if failures.on_error == "raise":
            raise
        gx = {names_x[i]: xs[names_x[i]] for i in rows}
        gy = gx if same else {names_y[j]: ys[names_y[j]] for j in cols}
        sub = _score_around_bad_layers(gx, gy, metric, kwargs, failures, target)
    matrix[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = sub.detach().float().cpu()
    return matrix


def _score_around_bad_layers(
    xs: Features, ys: Features, metric: str, kwargs: Mapping[str, Any], failures: Failures, target: str
) -> torch.Tensor:
    from prh_lightning.alignment import alignment_matrix

    def rejected(features: Features, owner: str) -> set[str]:
        bad = set()
        for name, value in features.items():
            try:
                alignment_matrix({name: value}, None, metric=metric, **kwargs)
            except ValueError as err:
                failures.report(f"{owner} layer {name!r}", err)
                bad.add(name)
        return bad

    bad_x = rejected(xs, "model")
    bad_y = bad_x if ys is xs else rejected(ys, _owner(target))
    out = torch.full((len(xs), len(ys)), float("nan"))
    for i, (x_name, x) in enumerate(xs.items()):
        if x_name in bad_x:
            continue
        for j, (y_name, y) in enumerate(ys.items()):
            if y_name in bad_y:
                continue
            try:
                out[i, j] = alignment_matrix([x], [y], metric=metric, **kwargs)[0, 0]
            except ValueError as err:
                failures.report(f"{metric} of model layer {x_name!r} vs {target} layer {y_name!r}", err)
    return out


def _owner(target: str) -> str:
    """Who owns a target's layers in failure reports (snapshots are the model's own layers)."""
    return "model" if target in SNAPSHOTS else target


def scalars(matrices: Mapping[str, torch.Tensor], layers: Sequence[str], prefix: str = "alignment") -> dict[str, float]:
    """Scalar tags of one check; ``layers`` names the matrix rows (the model's layers).

    References: ``<prefix>/<metric>/<ref>/best`` (max of the matrix) and ``.../<layer>`` (best
    over reference layers). Snapshots: ``.../<layer>`` (the diagonal: each layer vs itself
    before) and ``.../mean``. Within-model: ``<prefix>/<metric>/self/mean_offdiag`` when the
    model has two or more layers.

    >>> m = {"cka/ref": torch.tensor([[0.2, 0.5], [0.9, 0.1]])}
    >>> scalars(m, ["a", "b"])
    {'alignment/cka/ref/best': 0.8999999761581421, 'alignment/cka/ref/a': 0.5, 'alignment/cka/ref/b': 0.8999999761581421}
    """
    out: dict[str, float] = {}
    for key, matrix in matrices.items():
        target = key.split("/", 1)[1]
        tag = f"{prefix}/{key}"
        if target == "self":
            if matrix.shape[0] > 1:
                off = matrix[~torch.eye(matrix.shape[0], dtype=torch.bool)]
                out[f"{tag}/mean_offdiag"] = _nanmean(off)
            continue
        if target in SNAPSHOTS:
            per_layer = matrix.diagonal()
            out[f"{tag}/mean"] = _nanmean(per_layer)
        else:
            per_layer = nanmax(matrix, dim=1)
            out[f"{tag}/best"] = float(nanmax(matrix.flatten(), dim=0))
        out.update({f"{tag}/{layer}": float(v) for layer, v in zip(layers, per_layer)})
    return out


def _nanmean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if bool(torch.isfinite(x).any()) else float("nan")


def nanmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over ``dim`` ignoring NaN (NaN where every value is NaN)."""
    best = torch.where(torch.isnan(x), torch.full_like(x, -torch.inf), x).amax(dim=dim)
    return torch.where(torch.isinf(best), torch.full_like(best, float("nan")), best)
