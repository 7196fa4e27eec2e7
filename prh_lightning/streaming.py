"""Streaming linear CKA between every layer of two models, computed while the features are
extracted, so they are never stored: :func:`model_cka` and its accumulator
:class:`StreamingLinearCKA`.

For layers ``a_i [n, d_i]`` and ``b_j [n, d_j]`` (rows L2-normalised first when
``normalize=True``), linear CKA depends on the samples only through the centred second
moments, which add up over batches::

    C_ij = sum_batches a_i^T b_j - n mu_i mu_j^T            # [d_i, d_j]
    CKA(i, j) = ||C_ij||_F^2 / (||C_ii||_F ||C_jj||_F)

This is full-batch linear CKA exactly (not the minibatch estimator of Nguyen et al.), for any
batching. The moments are kept in float64 around a shift (the first batch's mean; CKA is
translation invariant, so the shift only removes cancellation error). All layer pairs come
from one cross-moment matrix ``[D_a, D_b]`` (``D = sum of the layers' d``) updated with one
matrix product per batch.

Memory: ``8 * (D_a * D_b + sum_i d_i^2 + sum_j d_j^2)`` bytes, independent of ``n``. For the
blocks of EfficientNet-Lite0 against Lite1 (``D_a = 3,088``, ``D_b = 3,600``) that is about
125 MB. The float32 features of ``n`` samples cost ``4 n (D_a + D_b)`` bytes (14 MB for
``n = 512``), and scoring them from exactly centred float64 copies twice that.
``store="auto"`` (default) therefore keeps the batches as features while twice their size is
below the moments' and folds them into the moments (in order: the same numbers) once it is
not; if the data end first, the features are scored directly (:func:`_features_cka`) and the
moments are never allocated. So memory while the models run, and while scoring, is about the
smaller of the two. If the moments would need more than ``max_bytes`` (default 1 GiB) it keeps
the features and scores them with ``alignment_matrix(metric="cka")`` (same value).
``store="moments"`` folds every batch at once (and raises above ``max_bytes``);
``store="features"`` always stores and scores with ``alignment_matrix``. Scoring squares the
centred cross blocks :data:`CHUNK_BYTES` of rows at a time, so no second ``[D_a, D_b]`` matrix
is formed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from prh_lightning.functional._numerics import condition
from prh_lightning.recording import _split_batch, _to_device
from prh_lightning.taps import LayerTaps
from prh_lightning.taps.layer_taps import call_model

__all__ = ["StreamingLinearCKA", "MomentBudgetExceeded", "model_cka", "moment_bytes", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 2**30
CHUNK_BYTES = 2**23  # rows of the centred cross moments squared at a time in compute() (8 MiB)
STORES = ("auto", "moments", "features")
# Centring leaves float64 rounding error of about eps64 * ||raw moment||; a centred moment within
# a few hundred of those units of zero is a constant layer (as in prh_lightning.metrics.CKA).
_CONSTANT_TOL = 256 * torch.finfo(torch.float64).eps


class MomentBudgetExceeded(ValueError):
    """The float64 moments of the requested layers would need more than ``max_bytes``."""


def moment_bytes(dims_a: Sequence[int], dims_b: Sequence[int] | None) -> int:
    """Bytes of the float64 moments for layers of widths ``dims_a`` x ``dims_b`` (``None``: self).

    >>> moment_bytes([2, 3], [4])  # 8 * (5 * 4 + (4 + 9) + 16 + 5 + 4)
    464
    """
    da = sum(dims_a)
    if dims_b is None:
        return 8 * (da * da + da)
    db = sum(dims_b)
    return 8 * (da * db + sum(d * d for d in dims_a) + sum(d * d for d in dims_b) + da + db)


class StreamingLinearCKA:
    """Accumulates the moments of two sets of layers batch by batch; ``compute()`` -> ``[La, Lb]``.

    Args:
        normalize: L2-normalise each row first (the default in every entry point).
        max_bytes: refuse (:class:`MomentBudgetExceeded`) moments larger than this, at the first
            update; see :func:`moment_bytes`. ``None``: no limit.

    ``update(feats_a, feats_b)`` takes mappings name -> ``[batch, d]`` (row ``k`` of every layer
    is the same sample); ``feats_b=None`` compares the ``a`` layers with each other (one moment
    matrix). Layer names and widths are fixed by the first update.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 6, generator=g)
    >>> acc = StreamingLinearCKA(normalize=False)
    >>> for rows in x.split(16):
    ...     acc.update({"x": rows}, {"2x+1": 2 * rows + 1, "x^2": rows**2})
    >>> acc.compute().shape, round(float(acc.compute()[0, 0]), 6)
    (torch.Size([1, 2]), 1.0)
    """

    def __init__(self, normalize: bool = True, max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
        self.normalize = normalize
        self.max_bytes = max_bytes
        self.names_a: list[str] | None = None
        self.names_b: list[str] | None = None
        self.n = 0

    # -- layout -------------------------------------------------------------------
    @property
    def self_comparison(self) -> bool:
        return self.names_b is None

    @property
    def nbytes(self) -> int:
        """Bytes held by the moments (0 before the first update)."""
        if self.names_a is None:
            return 0
        return moment_bytes(self._dims_a, None if self.self_comparison else self._dims_b)

    def _start(self, feats_a: Mapping[str, torch.Tensor], feats_b: Mapping[str, torch.Tensor] | None) -> None:
        self.names_a = list(feats_a)
        self._dims_a = [_width(feats_a[k], k) for k in self.names_a]
        if feats_b is not None:
            self.names_b = list(feats_b)
            self._dims_b = [_width(feats_b[k], k) for k in self.names_b]
        need = self.nbytes
        if self.max_bytes is not None and need > self.max_bytes:
            self.names_a = self.names_b = None
            raise MomentBudgetExceeded(
                f"streaming linear CKA needs {need / 2**20:.0f} MiB of float64 moments for layers of total width "
                f"{sum(self._dims_a)} x {sum(self._dims_b) if feats_b is not None else sum(self._dims_a)} "
                f"(max_bytes={self.max_bytes}); tap fewer or narrower layers, raise max_bytes, or store the "
                "features (model_cka(store='features') or record_representations + alignment_matrix)"
            )

    def _conditioned(self, feats: Mapping[str, torch.Tensor], names: list[str], dims: list[int], side: str) -> torch.Tensor:
        if list(feats) != names:
            raise ValueError(f"layers of {side} changed between updates: first {names}, now {list(feats)}")
        blocks = []
        for name, d in zip(names, dims):
            x = feats[name]
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"{side}[{name!r}] must be [batch, {d}] as in the first update, got {tuple(x.shape)}")
            blocks.append(condition(x, f"{side}[{name!r}]", self.normalize))
        return torch.cat(blocks, dim=1)

    # -- accumulation ---------------------------------------------------------------
    def update(self, feats_a: Mapping[str, torch.Tensor], feats_b: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one batch: ``feats_a`` / ``feats_b`` map layer names to ``[batch, d]``."""
        if not feats_a or (feats_b is not None and not feats_b):
            raise ValueError("update() needs at least one layer on each side")
        if self.names_a is None:
            self._start(feats_a, feats_b)
        elif (feats_b is None) != self.self_comparison:
            raise ValueError("pass feats_b on every update or on none")
        a = self._conditioned(feats_a, self.names_a, self._dims_a, "a")
        b = None if feats_b is None else self._conditioned(feats_b, self.names_b, self._dims_b, "b")
        if b is not None and b.shape[0] != a.shape[0]:
            raise ValueError(f"a and b must hold the same samples, got {a.shape[0]} and {b.shape[0]} rows")
        if self.n == 0:
            self._shift_a = a.mean(dim=0)
            self._sum_a = torch.zeros_like(self._shift_a)
            if b is None:
                self._ab = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64)
            else:
                self._shift_b = b.mean(dim=0)
                self._sum_b = torch.zeros_like(self._shift_b)
                self._ab = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64)
                self._aa = [torch.zeros(d, d, dtype=torch.float64) for d in self._dims_a]
                self._bb = [torch.zeros(d, d, dtype=torch.float64) for d in self._dims_b]
        a = a - self._shift_a
        self.n += a.shape[0]
        self._sum_a += a.sum(dim=0)
        if b is None:
            self._ab.addmm_(a.T, a)
            return
        b = b - self._shift_b
        self._sum_b += b.sum(dim=0)
        self._ab.addmm_(a.T, b)
        for moment, block in zip(self._aa, a.split(self._dims_a, dim=1)):
            moment.addmm_(block.T, block)
        for moment, block in zip(self._bb, b.split(self._dims_b, dim=1)):
            moment.addmm_(block.T, block)

    # -- scoring --------------------------------------------------------------------
    def compute(self) -> torch.Tensor:
        """Linear CKA of every layer pair over all samples seen: ``[La, Lb]`` float64."""
        if self.n < 2:
            raise RuntimeError(f"streaming CKA needs at least 2 samples, got {self.n}; call update() first")
        n = float(self.n)
        mu_a = self._sum_a / n
        mu_b = mu_a if self.self_comparison else self._sum_b / n
        # centred cross blocks, CHUNK_BYTES of rows at a time: no second [D_a, D_b] matrix (~100 MB)
        squares = _block_square_sums(
            lambda s, e: torch.addr(self._ab[s:e], mu_a[s:e], mu_b, alpha=-n),
            self._dims_a,
            self._dims_a if self.self_comparison else self._dims_b,
        )
        if self.self_comparison:
            starts = [sum(self._dims_a[:i]) for i in range(len(self._dims_a))]
            raw = torch.stack(
                [torch.linalg.matrix_norm(self._ab[s : s + d, s : s + d]) for s, d in zip(starts, self._dims_a)]
            )
            norm_a = norm_b = self._checked_norms(squares.diagonal().sqrt(), raw, self.names_a, "a")
        else:
            norm_a = self._own_norms(self._aa, mu_a, self._dims_a, self.names_a, "a")
            norm_b = self._own_norms(self._bb, mu_b, self._dims_b, self.names_b, "b")
        return squares / (norm_a[:, None] * norm_b[None, :])

    def _own_norms(self, moments: list[torch.Tensor], mu: torch.Tensor, dims: list[int], names: list[str], side: str) -> torch.Tensor:
        n = float(self.n)
        centred, raw = [], []
        for moment, m in zip(moments, mu.split(dims)):
            centred.append(torch.linalg.matrix_norm(torch.addr(moment, m, m, alpha=-n)))  # one [d, d] temporary
            raw.append(torch.linalg.matrix_norm(moment))
        return self._checked_norms(torch.stack(centred), torch.stack(raw), names, side)

    def _checked_norms(self, centred: torch.Tensor, raw: torch.Tensor, names: list[str], side: str) -> torch.Tensor:
        constant = (centred <= _CONSTANT_TOL * raw).nonzero().flatten().tolist()
        if constant:
            raise _constant_layer(side, names[constant[0]], self.n)
        return centred


def _moment_bytes_of(feats: list[dict[str, torch.Tensor]], same: bool) -> int:
    """:func:`moment_bytes` for the layers of one batch's features (validated as ``[batch, d]``)."""
    dims = [[_width(x, name) for name, x in side.items()] for side in feats]
    if not all(dims):
        raise ValueError("update() needs at least one layer on each side")
    return moment_bytes(dims[0], None if same else dims[1])


def _constant_layer(side: str, name: str, n: int) -> ValueError:
    return ValueError(
        f"{side}[{name!r}] is constant across the {n} samples (zero variance after "
        "centring), so CKA is undefined (0/0); check for collapsed or all-equal representations"
    )


def _centred_side(batches: list[dict[str, torch.Tensor]], side: str, normalize: bool) -> tuple[torch.Tensor, list[str], list[int]]:
    """The layers of ``batches`` (mappings name -> ``[batch, d]``) as one exactly centred
    float64 ``[n, D]`` matrix, its layer names and widths. Each layer's float32 batches are
    released (popped) once copied, so the two copies never coexist in full."""
    names = list(batches[0])
    dims = [_width(batches[0][name], name) for name in names]
    for feats in batches:
        if list(feats) != names:
            raise ValueError(f"layers of {side} changed between updates: first {names}, now {list(feats)}")
        for name, d in zip(names, dims):
            if _width(feats[name], name) != d:
                raise ValueError(f"{side}[{name!r}] must be [batch, {d}] as in the first update, got {tuple(feats[name].shape)}")
    n = sum(feats[names[0]].shape[0] for feats in batches)
    if n < 2:
        raise RuntimeError(f"streaming CKA needs at least 2 samples, got {n}")
    out = torch.empty(n, sum(dims), dtype=torch.float64, device=batches[0][names[0]].device)
    start = 0
    for name, d in zip(names, dims):
        x = condition(torch.cat([feats.pop(name) for feats in batches]), f"{side}[{name!r}]", normalize)
        block = out[:, start : start + d]
        torch.sub(x, x.mean(dim=0), out=block)
        if bool(torch.linalg.vector_norm(block) <= _CONSTANT_TOL * torch.linalg.vector_norm(x)):
            raise _constant_layer(side, name, n)  # what is left is the mean's rounding error
        start += d
    return out, names, dims


def _features_cka(pending: list[list[dict[str, torch.Tensor]]], same: bool, normalize: bool) -> tuple[torch.Tensor, list[str], list[str]]:
    """Linear CKA ``[La, Lb]`` (float64) of the waiting batches' features, without moments:
    exactly centred float64 features ``A [n, D_a]``, ``B [n, D_b]``, cross blocks ``A^T B``
    squared :data:`CHUNK_BYTES` of rows at a time, and each layer's norm ``||A_i^T A_i||_F``
    from the smaller of ``A_i^T A_i`` and ``A_i A_i^T``. Consumes ``pending``."""
    a, names_a, dims_a = _centred_side([feats[0] for feats in pending], "a", normalize)
    b, names_b, dims_b = (a, names_a, dims_a) if same else _centred_side([feats[1] for feats in pending], "b", normalize)
    pending.clear()
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same samples, got {a.shape[0]} and {b.shape[0]} rows")

    def norms(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
        blocks = x.split(dims, dim=1)
        return torch.stack([torch.linalg.matrix_norm(v.T @ v if v.shape[1] <= v.shape[0] else v @ v.T) for v in blocks])

    squares = _block_square_sums(lambda s, e: a[:, s:e].T @ b, dims_a, dims_b)
    norm_a = norms(a, dims_a)
    norm_b = norm_a if same else norms(b, dims_b)
    return squares / (norm_a[:, None] * norm_b[None, :]), names_a, names_b


def _fold(acc: StreamingLinearCKA, pending: list[list[dict[str, torch.Tensor]]], same: bool) -> None:
    """Add the waiting batches to ``acc`` in order, freeing each as it goes."""
    while pending:
        feats = pending.pop(0)
        acc.update(feats[0], None if same else feats[1])


def _width(x: torch.Tensor, name: str) -> int:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"layer {name!r} must give [batch, d] features, got {shape}; use a reduce such as 'mean'")
    return int(x.shape[1])


def _block_square_sums(
    rows_of: Callable[[int, int], torch.Tensor], rows: list[int], cols: list[int], chunk_bytes: int | None = None
) -> torch.Tensor:
    """``[len(rows), len(cols)]`` sums of squares over the blocks of a float64 matrix
    ``C [sum(rows), sum(cols)]`` given by ``rows_of(start, stop) -> C[start:stop]`` (a fresh
    tensor, squared in place), asked for about ``chunk_bytes`` (default :data:`CHUNK_BYTES`) at a time.

    >>> c = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
    >>> _block_square_sums(lambda s, e: c[s:e].clone(), [1, 2], [3, 1], chunk_bytes=8)
    tensor([[  5.,   9.],
            [322., 170.]], dtype=torch.float64)
    """
    width = sum(cols)
    step = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (8 * width))
    row_ids = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
    col_ids = torch.repeat_interleave(torch.arange(len(cols)), torch.tensor(cols))
    out = None
    for start in range(0, sum(rows), step):
        block = rows_of(start, min(start + step, sum(rows))).square_()
        if out is None:
            out = torch.zeros(len(rows), len(cols), dtype=block.dtype, device=block.device)
            row_ids, col_ids = row_ids.to(block.device), col_ids.to(block.device)
        by_col = torch.zeros(block.shape[0], len(cols), dtype=block.dtype, device=block.device).index_add_(1, col_ids, block)
        out.index_add_(0, row_ids[start : start + step], by_col)
    return out


def model_cka(
    model_a: nn.Module,
    model_b: nn.Module | None,
    dataloader: Iterable[Any],
    layers_a: Any = "auto",
    layers_b: Any = "auto",
    reduce: Any = "auto",
    normalize: bool = True,
    store: str = "auto",
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    device: str | torch.device | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = False,
    return_names: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[str], list[str]]:
    """Linear CKA ``[La, Lb]`` between the layers of two models over one pass of ``dataloader``.

    Both models see every batch (in eval mode, under ``no_grad``; training flags are restored
    afterwards). Each layer is reduced by :class:`~prh_lightning.LayerTaps` to ``[batch, d]``,
    and only the moments of :class:`StreamingLinearCKA` (or, while smaller, the waiting
    batches' features) are kept, so memory does not grow with the number of samples. Equals ``alignment_matrix(feats_a, feats_b, metric="cka",
    normalize=normalize)`` on the stored features, up to float64 rounding.

    Args:
        model_a, model_b: any ``nn.Module``; ``model_b=None`` (or ``model_a`` itself, with the
            same layers) compares ``model_a`` with itself in one forward pass per batch.
        dataloader: batches as in :func:`~prh_lightning.record_representations` (a tensor,
            ``(x, y, ...)`` or a dict of model keywords), or anything ``forward_fn`` takes.
        layers_a, layers_b, reduce: as in :class:`~prh_lightning.LayerTaps` (``"auto"``: family
            defaults; ``reduce`` applies to both models).
        normalize: L2-normalise each row first.
        store: ``"moments"`` (stream; raises when the moments need more than ``max_bytes``),
            ``"features"`` (keep the features and use ``alignment_matrix``), or ``"auto"``
            (batches kept as features until scoring them would take more memory than the
            moments, then moments; features scored directly if the data end first, and by
            ``alignment_matrix`` when the moments need more than ``max_bytes``).
        device: move batches (and models) here; ``None`` leaves them where they are.
        forward_fn: ``forward_fn(model, batch)`` for other batch types.
        return_names: also return the layer names ``(scores, names_a, names_b)``.

    >>> net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = torch.utils.data.DataLoader(torch.randn(50, 5), batch_size=16)
    >>> scores, rows, cols = model_cka(net, None, data, layers_a=["0", "2"], reduce="mean", return_names=True)
    >>> rows, [round(float(v), 4) for v in scores.diagonal()]
    (['0', '2'], [1.0, 1.0])
    """
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    same = model_b is None or (model_b is model_a and (layers_b == layers_a or layers_b is None))
    if model_b is None:
        layers_b = layers_a
    models = [model_a] if same else [model_a, model_b]
    layer_specs = [layers_a] if same else [layers_a, layers_b]
    if device is not None:
        for model in models:
            model.to(device)
    modes = {module: module.training for model in models for module in model.modules()}
    acc = StreamingLinearCKA(normalize=normalize, max_bytes=max_bytes)
    kept: list[list[dict[str, torch.Tensor]]] = [[] for _ in models]
    streaming = store != "features"
    # store="auto": batches wait as features while they are smaller than the moments (a few MB
    # against ~100 MB for wide models), then are folded into the moments in order (the same
    # numbers as folding each at once); so memory during the forward passes is the smaller of the two.
    pending: list[list[dict[str, torch.Tensor]]] = []
    pending_bytes, moment_budget = 0, None
    scored = None  # (scores, names_a, names_b) when the waiting features are scored directly
    taps = [LayerTaps(model, layers=spec, reduce=reduce) for model, spec in zip(models, layer_specs)]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            for tap in taps:
                tap.attach()
            total = len(dataloader) if hasattr(dataloader, "__len__") else None
            for batch in tqdm(dataloader, total=total, disable=not progress, desc="model_cka", leave=False):
                feats = []
                for model, tap in zip(models, taps):
                    tap.clear()
                    if forward_fn is not None:
                        forward_fn(model, _to_device(batch, device))
                    else:
                        call_model(model, _to_device(_split_batch(batch)[0], device))
                    feats.append(tap.features())
                if streaming and store == "auto":
                    if moment_budget is None:
                        moment_budget = _moment_bytes_of(feats, same)
                        streaming = max_bytes is None or moment_budget <= max_bytes
                    if streaming:
                        pending.append(feats)
                        pending_bytes += sum(v.numel() * v.element_size() for side in feats for v in side.values())
                        if 2 * pending_bytes > moment_budget:  # scoring them would take twice that (float64)
                            _fold(acc, pending, same)
                            pending_bytes = 0
                        continue
                elif streaming:
                    acc.update(feats[0], None if same else feats[1])  # store="moments": raises above max_bytes
                    continue
                for kept_side, side_feats in zip(kept, feats):
                    kept_side.append(side_feats)
            if streaming and acc.n == 0 and pending:  # every batch still waiting: score the features
                scored = _features_cka(pending, same, normalize)
            elif streaming:
                _fold(acc, pending, same)
    finally:
        for tap in taps:
            tap.remove()
        for module, mode in modes.items():
            module.training = mode
    if scored is not None:
        scores, names_a, names_b = scored
    elif streaming:
        scores, names_a = acc.compute(), acc.names_a
        names_b = names_a if same else acc.names_b
    else:
        from prh_lightning.alignment import alignment_matrix

        if not kept[0]:
            raise RuntimeError("the dataloader gave no batches")
        stacked = [{name: torch.cat([f[name] for f in side]) for name in side[0]} for side in kept]
        names_a = list(stacked[0])
        names_b = names_a if same else list(stacked[-1])
        xs = {name: x.double() for name, x in stacked[0].items()}
        ys = None if same else {name: y.double() for name, y in stacked[1].items()}
        scores = alignment_matrix(xs, ys, metric="cka", normalize=normalize)
    return (scores, names_a, names_b) if return_names else scores
