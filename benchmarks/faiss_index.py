"""FAISS indexes on the scale benchmark's features: IVF-Flat (inner-product, spherical and L2
cells) against HNSW, recall of the top-10 lists on 500 sampled rows and search time scaled to
all n queries (needs faiss-cpu). Features: benchmarks/scale.py's random features with planted
structure (one layer, d = 768), rows L2-normalised.

    python benchmarks/faiss_index.py 30000
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import features  # noqa: E402


def recall(found: np.ndarray, rows: torch.Tensor, exact: torch.Tensor) -> float:
    f = torch.from_numpy(found).long()
    keep = f != rows[:, None]  # the row itself dropped where found, else the last id
    keep[:, -1] &= ~keep.all(1)
    f = f[keep].view(-1, exact.shape[1])
    return float((f.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).double().mean())


def main() -> None:
    torch.set_num_threads(2)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000
    x = torch.nn.functional.normalize(features(n, 768, 1, 0)[0], dim=1)
    b = x.numpy()
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:500]
    sims = x[rows] @ x.T
    sims[torch.arange(500), rows] = -float("inf")
    exact = sims.topk(10, dim=1).indices
    nlist = round(4 * math.sqrt(n))
    train = b[torch.randperm(n)[: 40 * nlist].numpy()]
    print(f"n={n}, nlist={nlist}; per nprobe: recall / search seconds for all n queries")
    for name in ("ip", "spherical", "l2"):
        t = time.time()
        if name == "l2":
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(768), 768, nlist, faiss.METRIC_L2)
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(768), 768, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.spherical = name == "spherical"
        index.train(train)
        index.add(b)
        built = time.time() - t
        sizes = np.array([index.invlists.list_size(i) for i in range(nlist)])
        out = []
        for p in (8, 16, 32, 64, 128, 256):
            if p > nlist:
                break
            index.nprobe = p
            t = time.time()
            _, found = index.search(b[rows.numpy()], 11)
            out.append(f"{p}:{recall(found, rows, exact):.3f}/{(time.time() - t) * n / 500:.0f}s")
        print(name, f"build {built:.1f}s", f"max list {sizes.max()} mean {sizes.mean():.0f}", " ".join(out), flush=True)
    t = time.time()
    hnsw = faiss.IndexHNSWFlat(768, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(b)
    built = time.time() - t
    hnsw.hnsw.efSearch = 128
    t = time.time()
    _, found = hnsw.search(b[rows.numpy()], 11)
    print("hnsw", f"build {built:.1f}s", f"{recall(found, rows, exact):.3f}/{(time.time() - t) * n / 500:.0f}s")


if __name__ == "__main__":
    main()
