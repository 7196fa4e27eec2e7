"""Approximate neighbours (knn_backend="faiss"): recall measured against brute force, and the
score error bounded against exact search. FAISS is an optional extra (faiss-cpu)."""

from __future__ import annotations

import pytest
import torch

from prh_lightning import alignment_matrix
from prh_lightning.alignment import approximate_alignment_matrix
from prh_lightning.functional._faiss import neighbour_recall


def _brute_lists(x, k):
    sims = x.double() @ x.double().T
    sims.fill_diagonal_(float("-inf"))
    return sims.topk(k, dim=1).indices


def test_recall_is_one_for_exact_lists_and_drops_by_one_over_k_per_wrong_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    exact = _brute_lists(x, 5)
    assert neighbour_recall(x, exact, sample=300) == 1.0
    wrong = exact.clone()
    # replace the last neighbour of every row by the least similar other sample
    sims = x @ x.T
    sims.fill_diagonal_(float("inf"))
    wrong[:, -1] = sims.argmin(dim=1)
    assert neighbour_recall(x, wrong, sample=300) == pytest.approx(1 - 1 / 5)
    # a subsample: the same value, as every row has one wrong neighbour
    assert neighbour_recall(x, wrong, sample=50, generator=torch.Generator().manual_seed(1)) == pytest.approx(0.8)


def test_unknown_backend_and_groups_are_refused():
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="knn_backend must be one of"):
        alignment_matrix([x], [x], metric="mutual_knn", knn_backend="annoy")
    with pytest.raises(ValueError, match="does not use neighbour lists"):
        approximate_alignment_matrix([x], [x], metric="cka")


def test_approximate_mutual_knn_is_within_0_01_of_exact_at_n_20000_when_recall_is_at_least_0_95():
    import faiss  # noqa: F401  (the [faiss] extra, installed by make test)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    z = torch.randn(n, 8, generator=g)
    a = z @ torch.randn(8, 24, generator=g) + 0.7 * torch.randn(n, 24, generator=g)
    b = z @ torch.randn(8, 16, generator=g) + 0.7 * torch.randn(n, 16, generator=g)
    approx = approximate_alignment_matrix([a], [b], metric="mutual_knn", k=10, knn_backend="faiss_ivf")
    exact = alignment_matrix([a], [b], metric="mutual_knn", k=10).double()
    assert float(approx.recall_x.min()) >= 0.95 and float(approx.recall_y.min()) >= 0.95, approx
    assert abs(float(approx.scores[0, 0] - exact[0, 0])) <= 0.01


@pytest.mark.parametrize("metric", ["mutual_knn", "cycle_knn"])
def test_alignment_matrix_with_the_faiss_backend_gives_the_approximate_scores(metric):
    import faiss  # noqa: F401  (the [faiss] extra, installed by make test)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1500, 4, generator=g)
    a, b = z @ torch.randn(4, 12, generator=g), z @ torch.randn(4, 10, generator=g) + 0.3 * torch.randn(1500, 10, generator=g)
    approx = approximate_alignment_matrix([a, b], [b], metric=metric, k=5)
    same = alignment_matrix([a, b], [b], metric=metric, k=5, knn_backend="faiss").double()
    assert torch.allclose(same, approx.scores, atol=1e-6)
    assert approx.recall_x.shape == (2,) and float(approx.recall_x.min()) > 0.9


def test_recall_over_column_panels_equals_the_one_panel_value(monkeypatch):
    import prh_lightning.functional._faiss as F

    g = torch.Generator().manual_seed(2)
    x = torch.randn(700, 6, generator=g, dtype=torch.float64)
    exact = _brute_lists(x, 7)
    noisy = exact.clone()
    sims = x @ x.T
    sims.fill_diagonal_(float("inf"))
    noisy[::3, 2] = sims.argmin(dim=1)[::3]  # a third of the rows: one neighbour replaced by the least similar sample
    whole = neighbour_recall(x, noisy, sample=700)
    assert whole == pytest.approx(1 - 234 / (700 * 7))  # rows 0, 3, ..., 699 lost one of 7
    monkeypatch.setattr(F, "_PANEL", 20 * 700)  # 700 sampled rows: panels of 20 columns
    assert neighbour_recall(x, noisy, sample=700) == pytest.approx(whole)
    assert neighbour_recall(x, exact, sample=700) == 1.0


def test_ivf_scanning_every_cell_finds_the_brute_force_lists():
    import faiss  # noqa: F401  (the [faiss] extra, installed by make test)
    from prh_lightning.functional._faiss import faiss_neighbours
    from prh_lightning.functional._numerics import centre

    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(3000, 12, generator=g, dtype=torch.float64) + 3.0, dim=1)  # a common offset
    c = centre(x, torch.finfo(torch.float32).eps, torch.float32, "x", exact_mean=False)
    got = faiss_neighbours(c, 6, index="ivf", nlist=40, nprobe=40)
    exact = _brute_lists(x, 6)
    # equal as sets (float32 search vs float64 brute force: a near-tie may swap the 6th neighbour)
    same = (got.sort(dim=1).values == exact.sort(dim=1).values).all(dim=1)
    assert float(same.double().mean()) >= 0.99
    assert float(neighbour_recall(x, got, sample=3000)) >= 0.998


def test_bad_index_name_is_refused():
    from prh_lightning.functional._faiss import faiss_neighbours
    from prh_lightning.functional._numerics import centre

    x = torch.randn(50, 4, dtype=torch.float64)
    c = centre(x, 1e-7, torch.float32, "x", exact_mean=False)
    with pytest.raises(ValueError, match="index must be one of"):
        faiss_neighbours(c, 3, index="lsh")


def test_ivf_mutual_knn_is_within_0_01_of_exact_at_n_20000_with_recall_at_least_0_95(monkeypatch):
    import faiss  # noqa: F401  (the [faiss] extra, installed by make test)
    import prh_lightning.functional._faiss as F

    built = []
    ivf = F._ivf
    monkeypatch.setattr(F, "_ivf", lambda *a, **kw: built.append(1) or ivf(*a, **kw))
    g = torch.Generator().manual_seed(0)
    n = 20_000
    z = torch.randn(n, 8, generator=g)
    a = z @ torch.randn(8, 24, generator=g) + 0.7 * torch.randn(n, 24, generator=g)
    b = z @ torch.randn(8, 16, generator=g) + 0.7 * torch.randn(n, 16, generator=g)
    approx = approximate_alignment_matrix([a], [b], metric="mutual_knn", k=10, knn_backend="faiss_ivf")
    exact = alignment_matrix([a], [b], metric="mutual_knn", k=10).double()
    assert len(built) == 2  # one IVF index per layer
    assert float(approx.recall_x.min()) >= 0.95 and float(approx.recall_y.min()) >= 0.95, approx
    assert abs(float(approx.scores[0, 0] - exact[0, 0])) <= 0.01


def test_hnsw_search_breadth_is_tuned_until_the_sample_recall_reaches_the_target(monkeypatch, caplog):
    # a sparse graph (m = 4) on unstructured data, searched with ef_search = 8: recall well below
    # 0.95 against float64 brute force. ef_search=None starts there and doubles until the sampled
    # rows reach RECALL_TARGET; the lists of all rows then have about that recall too
    import logging

    import faiss  # noqa: F401  (the [faiss] extra, installed by make test)
    import prh_lightning.functional._faiss as F
    from prh_lightning.functional._numerics import centre

    monkeypatch.setattr(F, "EF_SEARCH_START", 8)
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(4000, 32, generator=g, dtype=torch.float64), dim=1)
    c = centre(x, torch.finfo(torch.float32).eps, torch.float32, "x", exact_mean=False)
    fixed = F.faiss_neighbours(c, 10, m=4, ef_search=8)
    with caplog.at_level(logging.INFO, logger=F.__name__):
        tuned = F.faiss_neighbours(c, 10, m=4)
    (message,) = [r.getMessage() for r in caplog.records if "ef_search=" in r.getMessage()]
    ef = int(message.split("ef_search=")[1].split()[0])
    recall_fixed, recall_tuned = neighbour_recall(x, fixed, sample=4000), neighbour_recall(x, tuned, sample=4000)
    assert recall_fixed < 0.9  # the start is far from the target
    assert ef > 8 and recall_tuned >= 0.93 > recall_fixed


def test_faiss_options_reach_the_index_and_bad_ones_are_refused():
    # the same sparse graph through the public entry points: a fixed small ef_search gives the
    # low recall of the lists it finds, the default (tuned) ef_search reaches the target
    import faiss  # noqa: F401  (the [faiss] extra, installed by make test)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4000, 32, generator=g)
    fixed = approximate_alignment_matrix([x], [x], k=10, faiss_options={"m": 4, "ef_search": 8})
    tuned = approximate_alignment_matrix([x], [x], k=10, faiss_options={"m": 4})
    assert float(fixed.recall_x[0]) < 0.9 <= 0.93 <= float(tuned.recall_x[0])
    same = alignment_matrix([x], [x], metric="mutual_knn", k=10, knn_backend="faiss", faiss_options={"m": 4, "ef_search": 8})
    assert torch.allclose(same.double(), fixed.scores, atol=1e-6)
    with pytest.raises(ValueError, match="unknown option 'efSearch'"):
        approximate_alignment_matrix([x], [x], faiss_options={"efSearch": 64})
    with pytest.raises(ValueError, match="must be a positive int"):
        approximate_alignment_matrix([x], [x], faiss_options={"nprobe": 0})
    with pytest.raises(ValueError, match="do not apply to the hnsw index"):
        approximate_alignment_matrix([x], [x], faiss_options={"nprobe": 16})
    with pytest.raises(ValueError, match="do not apply to the ivf index"):
        approximate_alignment_matrix([x], [x], knn_backend="faiss_ivf", faiss_options={"ef_search": 16})
    with pytest.raises(ValueError, match='apply to knn_backend="faiss"'):
        alignment_matrix([x], [x], metric="mutual_knn", faiss_options={"ef_search": 64})


def test_faiss_on_float32_features_forms_no_float64_copy_and_measures_the_same_recall(monkeypatch):
    # features without a common offset take the float32 route: no [n, d] float64 tensor is ever
    # formed (the 1M-row run held a 6 GB one), and the recall beside the score is the one measured
    # here against float64 brute force on the row-normalised features
    import faiss  # noqa: F401
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    g = torch.Generator().manual_seed(4)
    z = torch.randn(4000, 6, generator=g)
    a = z @ torch.randn(6, 48, generator=g) + 0.5 * torch.randn(4000, 48, generator=g)
    b = z @ torch.randn(6, 40, generator=g) + 0.5 * torch.randn(4000, 40, generator=g)

    class Float64Shapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: set[tuple[int, ...]] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.shapes |= {tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.float64}
            return out

    from prh_lightning.functional import _faiss, _numerics

    monkeypatch.setattr(_faiss, "_PANEL", 1000 * 500)  # the recall's exact search in panels of 500 rows, as at large n
    monkeypatch.setattr(_numerics, "NORM_BLOCK", 500 * 48)  # row norms in blocks of at most 500 rows, as at large n
    monkeypatch.setattr(_faiss, "_CHUNK", 500)  # vectors added to the index 500 rows at a time
    spy = Float64Shapes()
    with spy:
        approx = approximate_alignment_matrix([a], [b], metric="mutual_knn", k=10)
    # float64 rows of a layer: only the 1,000 sampled for the recall and the panels they meet
    layer_rows = [s for s in spy.shapes if len(s) == 2 and s[1] in (48, 40)]
    assert layer_rows and max(s[0] for s in layer_rows) <= 1000, layer_rows
    lists = approximate_alignment_matrix([a], [b], metric="mutual_knn", k=10)  # deterministic: same lists
    assert torch.equal(lists.scores, approx.scores)
    unit = a.double() / a.double().norm(dim=1, keepdim=True)
    from prh_lightning.functional.knn import prepare_neighbours_fast
    from prh_lightning.functional._plan import LayerContext

    ctx = LayerContext(torch.float32, None, 4000, 1, a.device)
    ctx.normalize, ctx.name, ctx.input_eps = True, "a", float(torch.finfo(torch.float32).eps)
    state = prepare_neighbours_fast(a, ctx, k=10, knn_backend="faiss")
    generator = torch.Generator().manual_seed(0)
    assert state.recall == pytest.approx(neighbour_recall(unit, state.idx, 1000, generator), abs=1e-12)
    assert state.recall == pytest.approx(float(approx.recall_x[0]), abs=1e-12)
