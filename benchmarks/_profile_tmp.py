import time, torch, sys
sys.path.insert(0, "benchmarks")
from alignment_matrix import synthetic_layers
from prh_lightning import alignment_matrix
from prh_lightning.alignment import _neighbours
xs = synthetic_layers(13, 1024, 768, 0, "cpu")
def best(f, r=5):
    b = 1e9
    for _ in range(r):
        t = time.perf_counter(); f(); b = min(b, time.perf_counter() - t)
    return b * 1e3
import cProfile, pstats
x = torch.nn.functional.normalize(xs[0], dim=1)
print("neighbours one layer", best(lambda: _neighbours(x, 10, 1024)))
print("gram one layer", best(lambda: x @ x.T))
cProfile.run("for _ in range(20): _neighbours(x, 10, 1024)", "/tmp/p")
pstats.Stats("/tmp/p").sort_stats("tottime").print_stats(8)
