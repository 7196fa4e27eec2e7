"""The RBF median-heuristic bandwidth: blocked selection (`_bandwidth.median_bandwidth`, no
n x n matrix) against the dense median of the full distance matrix (written out below, as
`kernels.median_distance` now streams too), both on the same centred float32 features,
interleaved and repeated in one process.

Prints seconds per call for both, the ratio, whether the values are equal, and the peak RSS
rise of each in its own child process (ru_maxrss).

    python benchmarks/bandwidth.py                    # n = 4,000 and 8,000, d = 256
    python benchmarks/bandwidth.py --sizes 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch


def features(n: int, d: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    return x - x.mean(dim=0)


def peak_rise(which: str, n: int, d: int) -> float:
    """MB by which one call raises the peak RSS of a fresh process."""
    code = (
        "import resource, sys; sys.path.insert(0, 'benchmarks'); import bandwidth as b; "
        f"x = b.features({n}, {d}); r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"b.CALLS['{which}'](x); print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r) / 1024)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _blocked(x: torch.Tensor) -> torch.Tensor:
    from prh_lightning.functional._bandwidth import median_bandwidth

    return median_bandwidth(x)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """The whole [n, n] distance matrix, its upper triangle, kthvalue of the two middle ranks."""
    sq = (x * x).sum(dim=1)
    total = sq[:, None] + sq[None, :]
    d2 = total - 2.0 * (x @ x.T)
    d2.masked_fill_(d2 <= 16 * torch.finfo(x.dtype).eps * total, 0.0)
    iu = torch.triu_indices(len(x), len(x), offset=1)
    dist = d2[iu[0], iu[1]].sqrt()
    m = dist.numel()
    return (torch.kthvalue(dist, (m + 1) // 2).values + torch.kthvalue(dist, m // 2 + 1).values) / 2


CALLS = {"blocked": _blocked, "dense": _dense}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    # children first: Linux carries a process's peak RSS across exec, so they start from a small parent
    rises = {n: {name: peak_rise(name, n, args.d) for name in CALLS} for n in args.sizes}
    print(f"{'n':>7} {'blocked s':>10} {'dense s':>8} {'ratio':>6} {'equal':>6} {'blocked MB':>11} {'dense MB':>9}")
    for n in args.sizes:
        x = features(n, args.d)
        seconds = {"blocked": [], "dense": []}
        values = {}
        for _ in range(args.repeats):
            for name, call in CALLS.items():
                start = time.perf_counter()
                values[name] = call(x)
                seconds[name].append(time.perf_counter() - start)
        best = {name: min(s) for name, s in seconds.items()}
        print(
            f"{n:>7} {best['blocked']:>10.2f} {best['dense']:>8.2f} {best['blocked'] / best['dense']:>6.2f} "
            f"{bool(values['blocked'] == values['dense'])!s:>6} {rises[n]['blocked']:>11.0f} {rises[n]['dense']:>9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
