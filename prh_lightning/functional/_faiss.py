"""Approximate neighbour lists with FAISS (optional: ``pip install faiss-cpu``), and their recall.

Used by the k-NN metrics with ``knn_backend="faiss"``. The ranking is the exact metrics' own:
for centred features ``xc`` and mean ``m`` the score ``x_i . x_j`` ranks row ``i`` like
``xc_i . xc_j + m . xc_j``, an inner product of the query ``[xc_i, 1]`` with the stored vector
``[xc_j, m . xc_j]``, so a large common offset costs no precision. These vectors are formed
``_CHUNK`` rows at a time (never a second ``[n, d]`` copy beside the index).

Two indexes (``knn_backend="faiss"`` builds ``INDEX``, HNSW; ``knn_backend="faiss_ivf"`` IVF-Flat;
``index=`` per call here):

* ``"hnsw"`` (the default): HNSW graph search, inner-product metric (``m`` links per node,
  search breadth ``ef_search``). ``ef_search=None`` tunes it like ``nprobe`` below: starting
  at ``EF_SEARCH_START`` (128) it doubles, up to ``MAX_EF_SEARCH``, until the lists of
  ``TUNE_SAMPLE`` random rows reach ``RECALL_TARGET``; the graph is built once, only the
  searches of the sample repeat. On the planted-structure features of benchmarks/scale.py
  128 gave recall 0.993 at n = 100,000 but 0.947 at n = 1,000,000 (1 x 1 layers, 2,818 s on
  2 cores), hence the tuning;
* ``"ivf"``: IVF-Flat, ``nlist = 4 sqrt(n)`` cells from k-means on a sample of rows (in the L2
  form of the same ranking, see :func:`_ivf`); each query scans the ``nprobe`` nearest cells.
  ``nprobe=None`` tunes it: starting at 8 it doubles until the lists of ``TUNE_SAMPLE`` random
  rows reach ``RECALL_TARGET`` of the exact lists (float32 search over all rows) or every cell
  is scanned. Cheap to build, but a query scans ``nprobe / nlist`` of the data: it pays off
  when the features form clusters. On features without clusters (benchmarks/scale.py: a
  32-dimensional Gaussian signal plus noise, d = 768, n = 30,000) a sample recall of 0.93
  needed 128 of 693 cells and 0.99 needed 256 (19 s / 37 s of search for all rows on 2 cores)
  where HNSW built in 6 s and searched in 19 s at recall 0.999; at n = 100,000 IVF took 498 s
  for 1 x 1 layers (recall 0.970). So HNSW is the default.

The lists are approximate either way, so :func:`neighbour_recall` measures them against exact
float64 search on a random subsample of rows, to be reported beside the score.
"""

from __future__ import annotations

import logging
import math

import torch

from ._numerics import Centred

__all__ = ["faiss_neighbours", "neighbour_recall"]

log = logging.getLogger(__name__)

INDEX = "hnsw"  # the index knn_backend="faiss" builds: "hnsw" or "ivf"
RECALL_TARGET = 0.95  # nprobe / ef_search = None: smallest doubling whose sample recall reaches this
TUNE_SAMPLE = 500  # rows whose exact lists tune nprobe / ef_search
EF_SEARCH_START = 128  # ef_search=None: the tuned HNSW search breadth starts here
MAX_EF_SEARCH = 4096  # and stops here
_CHUNK = 65_536  # rows of augmented vectors formed (added / searched) at once
_PANEL = 2**25  # similarities per block of the exact searches (256 MB in float64)
INDEXES = ("hnsw", "ivf")


def _faiss():
    from .._optional import require

    return require("faiss", extra="faiss", purpose='knn_backend="faiss"')


def _augmented(c: Centred, s: int, e: int, query: bool):
    """float32 numpy ``[e - s, d + 1]``: rows ``s:e`` as queries ``[xc_i, 1]`` or stored vectors
    ``[xc_j, m . xc_j]``."""
    xc = c.xc[s:e].detach().to("cpu")
    last = torch.ones(e - s, 1, dtype=torch.float64) if query else (xc.double() @ c.mean.cpu())[:, None]
    return torch.cat([xc.float(), last.float()], dim=1).contiguous().numpy()


def _search(index, c: Centred, rows: torch.Tensor | None, want: int, lifted: bool = False) -> torch.Tensor:
    """``[r, want]`` ids found for the queries of ``rows`` (all rows if None), in chunks; ``lifted``:
    queries get a trailing 0 (the L2 form of :func:`_ivf`)."""
    n = c.xc.shape[0]

    def queries(part: torch.Tensor):
        cols = [part.detach().cpu().float(), torch.ones(len(part), 1)] + ([torch.zeros(len(part), 1)] if lifted else [])
        return torch.cat(cols, dim=1).contiguous().numpy()

    if rows is not None:
        return torch.from_numpy(index.search(queries(c.xc[rows]), want)[1]).long()
    return torch.cat([torch.from_numpy(index.search(queries(c.xc[s : s + _CHUNK]), want)[1]).long() for s in range(0, n, _CHUNK)])


def _drop_self(found: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """``[r, k]`` from ``[r, k + 1]``: the row itself dropped where found, else the last id."""
    keep = found != rows[:, None]
    keep[:, -1] &= ~keep.all(dim=1)
    return found[keep].view(-1, k)


def _exact_sample(c: Centred, rows: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """``[r, k]`` exact top-``k`` (float32 augmented inner products) of ``rows`` over all rows."""
    n = c.xc.shape[0]
    q = torch.cat([c.xc[rows].detach().cpu().float(), torch.ones(rows.numel(), 1)], dim=1)
    best_v, best_i = torch.empty(rows.numel(), 0), torch.empty(rows.numel(), 0, dtype=torch.long)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        sims = q @ torch.from_numpy(_augmented(c, s, e, False)).T
        if exclude_self:
            inside = (rows >= s) & (rows < e)
            sims[inside.nonzero().flatten(), rows[inside] - s] = float("-inf")
        v = torch.cat([best_v, sims], dim=1)
        i = torch.cat([best_i, torch.arange(s, e).expand(rows.numel(), -1)], dim=1)
        best_v, pos = v.topk(min(k, v.shape[1]), dim=1)
        best_i = i.gather(1, pos)
    return best_i


def _augmented_rows(c: Centred, rows: torch.Tensor):
    """float32 numpy ``[r, d + 1]``: stored vectors ``[xc_j, m . xc_j]`` of the given rows."""
    xc = c.xc[rows].detach().cpu()
    return torch.cat([xc.float(), (xc.double() @ c.mean.cpu())[:, None].float()], dim=1).contiguous().numpy()


def _tune(c: Centred, k: int, exclude_self: bool, generator, start: int, stop: int, set_breadth, lifted: bool) -> tuple[int, float, int]:
    """Smallest ``start * 2^j`` (at most ``stop``) search breadth, set through ``set_breadth``,
    whose lists of ``TUNE_SAMPLE`` random rows reach ``RECALL_TARGET`` of their exact lists
    (float32 search over all rows): ``(breadth, sample recall, rows sampled)``."""
    n = c.xc.shape[0]
    rows = torch.randperm(n, generator=generator)[: min(n, TUNE_SAMPLE)]
    exact = _exact_sample(c, rows, k, exclude_self)
    breadth = min(start, stop)
    while True:
        index = set_breadth(breadth)
        found = _search(index, c, rows, k + 1 if exclude_self else k, lifted=lifted)
        found = _drop_self(found, rows, k) if exclude_self else found
        recall = float((found.unsqueeze(-1) == exact.unsqueeze(-2)).any(dim=-1).double().mean())
        if recall >= RECALL_TARGET or breadth >= stop:
            return breadth, recall, rows.numel()
        breadth = min(stop, 2 * breadth)


def _hnsw(faiss, c: Centred, m: int, ef_search: int | None, want: int, k: int, exclude_self: bool, generator):
    n, d = c.xc.shape
    index = faiss.IndexHNSWFlat(d + 1, m, faiss.METRIC_INNER_PRODUCT)
    for s in range(0, n, _CHUNK):
        index.add(_augmented(c, s, min(n, s + _CHUNK), False))

    def set_breadth(ef: int):
        index.hnsw.efSearch = max(ef, want)
        return index

    if ef_search is None:
        stop = max(EF_SEARCH_START, MAX_EF_SEARCH)
        ef_search, recall, sampled = _tune(c, k, exclude_self, generator, EF_SEARCH_START, stop, set_breadth, False)
        log.info("HNSW n=%d m=%d: ef_search=%d tuned (recall %.3f on %d rows)", n, m, ef_search, recall, sampled)
    return set_breadth(ef_search)


def _ivf(faiss, c: Centred, k: int, exclude_self: bool, nlist: int | None, nprobe: int | None, generator):
    """IVF-Flat on the L2 form of the ranking: the stored vectors get one more coordinate
    ``sqrt(M^2 - |b_j|^2)`` (``M = max |b_j|``) and the queries a 0, so that
    ``|q - b'_j|^2 = |q|^2 + M^2 - 2 q . b_j`` ranks like ``q . b_j``; k-means cells in L2
    stay balanced, unlike inner-product cells around unnormalised centroids."""
    n, d = c.xc.shape
    nlist = nlist or max(1, min(n // 39, round(4 * math.sqrt(n))))
    norms = torch.cat([torch.from_numpy(_augmented(c, s, min(n, s + _CHUNK), False)).double().norm(dim=1) for s in range(0, n, _CHUNK)])
    top = float(norms.max())
    lift = lambda v, s: torch.cat([v, (top**2 - norms[s : s + len(v), None] ** 2).clamp_(min=0).sqrt().float()], dim=1)  # noqa: E731
    quantizer = faiss.IndexFlatL2(d + 2)
    index = faiss.IndexIVFFlat(quantizer, d + 2, nlist, faiss.METRIC_L2)
    train = torch.randperm(n, generator=generator)[: min(n, 40 * nlist)].sort().values
    extra = (top**2 - norms[train, None] ** 2).clamp_(min=0).sqrt().float()
    index.train(torch.cat([torch.from_numpy(_augmented_rows(c, train)), extra], dim=1).contiguous().numpy())
    for s in range(0, n, _CHUNK):
        index.add(lift(torch.from_numpy(_augmented(c, s, min(n, s + _CHUNK), False)), s).contiguous().numpy())

    def set_breadth(cells: int):
        index.nprobe = min(cells, nlist)
        return index

    if nprobe is None:
        nprobe, recall, sampled = _tune(c, k, exclude_self, generator, 8, nlist, set_breadth, True)
        log.info("IVF-Flat n=%d nlist=%d: nprobe=%d tuned (recall %.3f on %d rows)", n, nlist, nprobe, recall, sampled)
    return set_breadth(nprobe)


def faiss_neighbours(
    c: Centred,
    k: int,
    exclude_self: bool = True,
    m: int = 32,
    ef_search: int | None = None,
    index: str | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
) -> torch.Tensor:
    """``[n, k]`` approximate neighbours (most similar first) of the layer centred in ``c``.

    ``index``: ``"hnsw"`` or ``"ivf"`` (default: the module's ``INDEX``, ``"hnsw"``).
    HNSW: ``m`` graph degree, ``ef_search`` search breadth (default: tuned to ``RECALL_TARGET`` on
    a sample, from 128 up). IVF-Flat: ``nlist`` cells (default
    ``4 sqrt(n)``), ``nprobe`` cells scanned per query (default: tuned to ``RECALL_TARGET`` on a
    sample). Higher ``ef_search`` / ``nprobe``: better recall, slower.
    """
    index = INDEX if index is None else index
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    faiss = _faiss()
    n = c.xc.shape[0]
    want = min(n, k + 1) if exclude_self else k
    if index == "hnsw":
        built = _hnsw(faiss, c, m, ef_search, want, k, exclude_self, torch.Generator().manual_seed(12345))
        hint = "raise ef_search"
    else:
        built = _ivf(faiss, c, k, exclude_self, nlist, nprobe, torch.Generator().manual_seed(12345))
        hint = "raise nprobe"
    found = _search(built, c, None, want, lifted=built.metric_type == faiss.METRIC_L2)
    missing = (found < 0).any(dim=1)
    if bool(missing.any()):
        raise RuntimeError(f"FAISS returned fewer than {want} neighbours for {int(missing.sum())} rows; {hint}")
    if exclude_self:
        found = _drop_self(found, torch.arange(n), k)
    return found.to(c.xc.device)


def neighbour_recall(
    x64: torch.Tensor, idx: torch.Tensor, sample: int = 1000, generator: torch.Generator | None = None, exclude_self: bool = True
) -> float:
    """Mean ``|N_approx(i) ∩ N_exact(i)| / k`` over ``sample`` random rows ``i`` of ``x64 [n, d]``
    (exact lists by float64 inner products, self excluded), for approximate lists ``idx [n, k]``.
    The exact search runs over column panels (never a ``[sample, n]`` matrix at large ``n``)."""
    n, k = idx.shape
    rows = torch.randperm(n, generator=generator)[: min(sample, n)].to(x64.device)
    r = rows.numel()
    panel = max(k, _PANEL // max(1, r))
    best_v = torch.empty(r, 0, dtype=x64.dtype, device=x64.device)
    best_i = torch.empty(r, 0, dtype=torch.long, device=x64.device)
    queries = x64[rows]
    for s in range(0, n, panel):
        e = min(n, s + panel)
        sims = queries @ x64[s:e].T
        if exclude_self:
            inside = (rows >= s) & (rows < e)
            sims[inside.nonzero().flatten(), rows[inside] - s] = float("-inf")
        v = torch.cat([best_v, sims], dim=1)
        i = torch.cat([best_i, torch.arange(s, e, device=x64.device).expand(r, -1)], dim=1)
        best_v, pos = v.topk(min(k, v.shape[1]), dim=1)
        best_i = i.gather(1, pos)
    hits = (idx[rows].unsqueeze(-1) == best_i.unsqueeze(-2)).any(dim=-1)
    return float(hits.double().mean())
