"""Chance levels of a tracker's reference scores: the permutation null of
:func:`prh_lightning.calibrate` (Gröger, Wen & Brbić, ICML 2026), computed live.

At each check, for each metric and reference, every layer of the reference is reordered by the
same ``K`` permutations and the model x reference matrix is rescored from the prepared
per-layer states (Grams, neighbour lists: permuted, not recomputed). The permutations are drawn
once, ``torch.Generator().manual_seed(seed)`` then ``K`` calls of ``torch.randperm(n)``, and
kept for the whole run, so every check is calibrated against the same reorderings and the
global RNG is never touched. A frozen reference's prepared states are computed once and reused
at every check; only the model's side is prepared again.

From the ``[K, Lx, Ly]`` null (``observed`` the ``[Lx, Ly]`` matrix):

* ``chance``: mean over permutations of the best layer pair, ``null.max over (i, j)`` (the
  chance level of ``.../best``, which carries the same best-of-layers selection);
* ``threshold``: the ``ceil((1 - alpha)(K + 1))``-th smallest of ``{best} ∪ null best``;
* ``calibrated``: ``clamp((best - threshold) / (high - threshold), 0, 1)`` (``high`` the
  metric's upper bound; ``max(best - threshold, 0)`` without one);
* per model layer ``i``: the same calibration of ``observed[i].max()`` against
  ``null[:, i, :].max(-1)``;
* per cell (for heatmaps): each cell against its own null.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prh_lightning.calibration import _calibrate
from prh_lightning.functional._plan import LayerContext, check_layers, get_plan, parse_memory, permuted_scores, prepare_layers
from prh_lightning.tracking.prepared import split_options

Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TargetChance:
    """Calibration of one ``<metric>/<reference>`` matrix at one check.

    ``chance``, ``threshold``, ``calibrated``: floats for the best layer pair; ``layers``:
    ``{model layer: calibrated best over reference layers}``; ``cells``: ``[Lx, Ly]`` per-cell
    calibrated scores (NaN for layers that could not be scored)."""

    chance: float
    threshold: float
    calibrated: float
    layers: dict[str, float]
    cells: torch.Tensor


def _finite_layers(features: Features) -> list[str]:
    return [name for name, value in features.items() if bool(torch.isfinite(value).all())]


def _prepare_each(
    plan, features: Features, names: list[str], options: dict[str, Any], prep: dict[str, Any], ctx
) -> tuple[list[str], list[Any]]:
    """Prepared states of the layers the metric accepts (conditioned as ``prep`` says, see
    :func:`~prh_lightning.tracking.prepared.split_options`); a layer it rejects (a ``ValueError``,
    e.g. constant features, already reported by the raw scoring) is left out."""
    kept, states = [], []
    for name in names:
        try:
            states += prepare_layers(plan, [features[name]], [name], options, prep["normalize"], prep["clip_quantile"], ctx)
        except ValueError:
            continue
        kept.append(name)
    return kept, states


class ChanceLevels:
    """Permutation nulls of reference scores, with fixed permutations and cached reference states.

    Args:
        n_permutations: ``K`` per check; ``0`` or ``None`` disables calibration.
        seed: seed of the permutations (see :meth:`permutations`).
        alpha: the null quantile that defines ``threshold``.
        max_memory: a budget (bytes, or ``"512MB"``, ``"4GB"``, ``"2GiB"``) for the working
            memory of the chance levels: the layers' preparation and the nulls' tables and batches
            (CKA default 1 GiB); ``None``: each metric's own ``max_memory`` (from its keyword
            arguments), else the defaults.

    >>> levels = ChanceLevels(19, seed=0)
    >>> g = torch.Generator().manual_seed(1)
    >>> a = torch.randn(50, 4, generator=g)
    >>> out = levels.score({"l": a}, {"r": a + 0.05 * torch.randn(50, 4, generator=g)}, "cka", {}, "ref", frozen=True)
    >>> round(out.chance, 2) < 0.3 < out.calibrated
    True
    """

    def __init__(
        self, n_permutations: int | None = 20, seed: int = 0, alpha: float = 0.05, max_memory: int | str | None = None
    ) -> None:
        if n_permutations is None:
            n_permutations = 0
        if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 0:
            raise ValueError(f"calibration must be a number of permutations (int >= 0) or None, got {n_permutations!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"calibration_seed must be a non-negative int, got {seed!r}")
        if not isinstance(alpha, float) or not 0.0 < alpha < 1.0:
            raise ValueError(f"calibration_alpha must be a float in (0, 1), got {alpha!r}")
        self.n_permutations = n_permutations
        self.seed = seed
        self.alpha = alpha
        self.max_memory = parse_memory(max_memory)  # a bad budget is refused here, before any check
        self._perms: torch.Tensor | None = None
        self._frozen: dict[tuple, list[Any]] = {}  # (reference, metric, layers, device) -> prepared states
        self._model: dict[tuple, list[Any]] = {}  # this check's model states, shared by references

    @property
    def enabled(self) -> bool:
        return self.n_permutations > 0

    def permutations(self, n: int) -> torch.Tensor:
        """``LongTensor[K, n]``: ``g = torch.Generator().manual_seed(seed)``, then
        ``torch.randperm(n, generator=g)`` ``K`` times (pass it to :func:`prh_lightning.calibrate`
        as ``permutations=`` to reproduce a logged value)."""
        if self._perms is None or self._perms.shape[1] != n:
            g = torch.Generator().manual_seed(self.seed)
            self._perms = torch.stack([torch.randperm(n, generator=g) for _ in range(self.n_permutations)])
        return self._perms

    def new_check(self) -> None:
        """Forget the previous check's model states."""
        self._model.clear()

    def forget(self) -> None:
        """Forget everything cached (a new probe)."""
        self._model.clear()
        self._frozen.clear()
        self._perms = None

    def score(
        self,
        xs: Features,
        ys: Features,
        metric: str,
        kwargs: Mapping[str, Any],
        target: str,
        frozen: bool,
    ) -> TargetChance | None:
        """Calibrate the ``xs`` (model) x ``ys`` (reference) matrix; layers with non-finite
        features, or that the metric rejects, are left out (NaN); ``None`` when no layer pair is left.
        ``kwargs``: the metric's keyword arguments as the raw scores get them (the preparation
        options ``normalize``, ``clip_quantile``, ``block_rows``, ``max_memory`` included)."""
        plan = get_plan(metric)
        prep, options = split_options(kwargs)
        options = plan.bind(options)
        rows, cols = _finite_layers(xs), _finite_layers(ys)
        if not rows or not cols:
            return None
        lx, ly = [xs[r] for r in rows], [ys[c] for c in cols]
        n, dtype, device = check_layers(lx, ly, rows, cols)
        budget = prep["max_memory"] if self.max_memory is None else self.max_memory
        ctx = LayerContext(dtype, prep["block_rows"], n, len(lx) + len(ly), device, budget)
        key = (metric, tuple(rows), dtype, str(device))
        if key not in self._model:
            self._model[key] = _prepare_each(plan, xs, rows, options, prep, ctx)
        rows, sx = self._model[key]
        ref_key = (target, metric, tuple(cols), dtype, str(device), n)
        prepared = self._frozen.get(ref_key) if frozen else None
        if prepared is None:
            prepared = _prepare_each(plan, ys, cols, options, prep, ctx)
            if frozen:
                self._frozen[ref_key] = prepared
        cols, sy = prepared
        if not rows or not cols:
            return None
        observed = plan.pairs(sx, sy, **options).double().cpu()  # [Lx', Ly']
        null = permuted_scores(plan, sx, sy, self.permutations(n).to(device), options).cpu()  # [K, Lx', Ly']
        high = plan.bounds(**options)[1]
        best_mean, best_tau, _, best_cal, _ = _calibrate(observed.flatten().max(), null.flatten(1).max(1).values, self.alpha, high)
        _, _, _, row_cal, _ = _calibrate(observed.max(1).values, null.max(2).values, self.alpha, high)
        _, _, _, cell_cal, _ = _calibrate(observed, null, self.alpha, high)
        cells = torch.full((len(xs), len(ys)), float("nan"))
        ri = torch.tensor([list(xs).index(r) for r in rows])
        ci = torch.tensor([list(ys).index(c) for c in cols])
        cells[ri[:, None], ci[None, :]] = cell_cal.float()
        layers = {name: float("nan") for name in xs}
        layers.update({r: float(v) for r, v in zip(rows, row_cal)})
        return TargetChance(float(best_mean), float(best_tau), float(best_cal), layers, cells)


def chance_scalars(
    results: Mapping[str, TargetChance | None], layers: Sequence[str], prefix: str = "alignment"
) -> dict[str, float]:
    """Tags of one check: ``<prefix>/<metric>/<ref>/chance``, ``.../threshold``,
    ``.../calibrated`` and ``.../<layer>/calibrated`` (NaN for a result that is ``None``).

    >>> r = TargetChance(0.2, 0.3, 0.5, {"fc": 0.4}, torch.zeros(1, 1))
    >>> chance_scalars({"cka/ref": r}, ["fc"])
    {'alignment/cka/ref/chance': 0.2, 'alignment/cka/ref/threshold': 0.3, 'alignment/cka/ref/calibrated': 0.5, 'alignment/cka/ref/fc/calibrated': 0.4}
    """
    nan = float("nan")
    out: dict[str, float] = {}
    for key, r in results.items():
        tag = f"{prefix}/{key}"
        out[f"{tag}/chance"] = nan if r is None else r.chance
        out[f"{tag}/threshold"] = nan if r is None else r.threshold
        out[f"{tag}/calibrated"] = nan if r is None else r.calibrated
        for layer in layers:
            out[f"{tag}/{layer}/calibrated"] = nan if r is None else r.layers.get(layer, nan)
    return out
