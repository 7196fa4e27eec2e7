"""Side by side with the libraries users would pick instead, on the same real features:
EfficientNet-Lite0 vs Lite1 (ImageNet weights, blocks and pooled head, spatial mean) on
Flickr images.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/peers.py [--n 512] [--repeats 3] [--tasks abcd] [--profile]
    flock /tmp/heavy.lock .venv/bin/python benchmarks/peers.py --tasks e   # (e) alone, ~20 min

Tasks: (a) linear CKA layer x layer, (b) unbiased CKA, (c) RSA (correlation RDM, Spearman),
(d) end-to-end linear CKA model vs model from a dataloader (extraction included), (e) peak
memory of (d). (a)-(d) run in one process: every method is warmed once on a small slice, then
timed ``--repeats`` times (median reported; (d) runs ``--repeats-e2e`` times, default 1).
``max |diff|`` compares each peer's matrix with ours for the same definition
(``normalize=False``: raw features, as the peers use); where a peer computes another estimator
(the minibatch CKA of Nguyen et al. on flattened maps), its diff is shown but is not an error.

(e) measures memory where nothing else can move it: each run of each side (``--memory-sides``,
default the control, ours and pytorch-cka) is a fresh Python process that loads the same images
and models, sets glibc's mmap and trim thresholds to 128 KiB (``mallopt``; so a freed block of
that size goes back to the OS at once and the resident size follows live memory instead of
what the allocator happens to cache; ``--glibc-default`` keeps glibc's dynamic thresholds),
warms up (both models' forward passes and the method on 16 images), then

1. returns freed heap to the OS (``malloc_trim``), resets the kernel's peak-RSS counter
   (``VmHWM``, via ``/proc/self/clear_refs``) and runs the bare forward passes of both models
   over the (d) dataloader: their peak is the baseline;
2. trims and resets again and runs the method over the same dataloader and models.

Reported: the method's peak minus the bare forward passes' peak ("beyond the forward passes'
peak"): what the method holds on top of running the two models, such as stored features,
moments, activations kept alive by hooks, scoring temporaries. ``VmHWM`` is the exact resident
peak kept by the kernel, so no short spike is missed by sampling; it counts every allocator
(torch, numpy, Python). ``--repeats-memory`` rounds (default 3, order reversed every other
round) give a median and the min .. max spread per side. The control side ("forward-again")
runs the bare forward passes a second time as its method: its value is the measurement's own
noise, against which the others are read.

The peers are installed ``--no-deps`` next to the project's torch into ``--peers-dir``
(default ``/tmp/prh-peers``; a marker makes reruns skip pip), and put on ``sys.path``. Those
that fail to install or import are listed and skipped. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# pip name -> import name; extra runtime modules the project's .venv lacks are installed too
PEERS = {
    "pytorch-cka": "cka",
    "cka-pytorch": "cka_pytorch",
    "torch-cka": "torch_cka",
    "ckatorch": "ckatorch",
    "repsim": "repsim",
    "rsatoolbox": "rsatoolbox",
    "torchlens": "torchlens",
    "thingsvision": "thingsvision",
    "repralign": "repralign",
}
EXTRA_RUNTIME = ["seaborn", "h5py", "torchtyping", "typeguard", "scikit-image", "lazy_loader", "imageio", "tifffile"]


# -- installation ---------------------------------------------------------------------
def install_peers(target: Path) -> None:
    """``pip install --no-deps --target`` every peer (repsim builds a C++ extension from its sdist)."""
    marker = target / ".installed"
    if marker.exists():
        return
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "--upgrade", "-q"]
    for name in [*PEERS, *EXTRA_RUNTIME]:  # one by one: a peer that fails does not stop the others
        result = subprocess.run([*pip, name], capture_output=True, text=True)
        if result.returncode:
            print(f"[peers] pip could not install {name}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    marker.write_text("done\n")


def import_peers(target: Path, only: list[str] | None = None) -> dict[str, object]:
    """Import the installed peers (``only``: just these pip names); those that fail are skipped."""
    sys.path.insert(0, str(target))
    found = {}
    for pip_name, module in PEERS.items():
        if only is not None and pip_name not in only:
            continue
        try:
            found[pip_name] = importlib.import_module(module if pip_name != "thingsvision" else "thingsvision.core.rsa.helpers")
        except Exception as err:  # noqa: BLE001 - any import failure means "skip this peer"
            if pip_name == "thingsvision":
                helpers = _thingsvision_rsa(target)
                if helpers is not None:
                    found[pip_name] = helpers
                    continue
            print(f"[peers] {pip_name}: not usable here ({type(err).__name__}: {err})", file=sys.stderr)
    return found


def _thingsvision_rsa(target: Path):
    """thingsvision's package __init__ imports tensorflow; its RSA helpers need only numpy/scipy/numba."""
    path = target / "thingsvision" / "core" / "rsa" / "helpers.py"
    if not path.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location("thingsvision_rsa_helpers", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001
        return None


# -- timing and memory ---------------------------------------------------------------------
def timed(fn: Callable[[], object], repeats: int, warm: Callable[[], object] | None = None) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up call of ``warm``) and the last result."""
    if warm is not None:
        warm()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    """Peak resident bytes since start or the last :func:`_reset_hwm` (the kernel's ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> int:
    """Return freed heap to the OS (``malloc_trim``), reset ``VmHWM`` to the current RSS
    (``/proc/self/clear_refs``, Linux >= 4.0) and return that RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()


def max_diff(ours: torch.Tensor, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64))))


# -- data and features ---------------------------------------------------------------------
def load_images(n: int, data: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    from prh_lightning.data.paired import load_paired
    from prh_lightning.models.pretrained import load_efficientnet_lite

    pairs = load_paired(data, max_samples=n)
    lite0, transform0 = load_efficientnet_lite("lite0")
    lite1, transform1 = load_efficientnet_lite("lite1")
    x0 = torch.stack([transform0(im) for im in pairs.images])
    x1 = torch.stack([transform1(im) for im in pairs.images])
    return lite0, lite1, x0, x1


# -- tasks ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[tuple]:
    from prh_lightning import alignment_matrix, record_representations
    from prh_lightning.streaming import model_cka

    install_peers(Path(args.peers_dir))
    peers = import_peers(Path(args.peers_dir))
    print(f"[peers] usable: {', '.join(peers) or 'none'}", file=sys.stderr)
    torch.manual_seed(0)
    lite0, lite1, x0, x1 = load_images(args.n, args.data)
    if x0.shape != x1.shape:  # Lite1 runs at 240 px; the end-to-end task feeds both models one batch
        x1 = torch.nn.functional.interpolate(x1, size=x0.shape[-2:], mode="bilinear", antialias=True)
    batches = x0.split(args.batch)
    start = time.perf_counter()
    fa = record_representations(lite0, batches, layers="auto", reduce="auto", progress=False)
    fb = record_representations(lite1, x1.split(args.batch), layers="auto", reduce="auto", progress=False)
    print(f"[peers] features: n={args.n}, {len(fa)} x {len(fb)} layers, extracted in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    fa, fb = dict(fa), dict(fb)
    la, lb = list(fa.values()), list(fb.values())
    warm_a = {k: v[:32] for k, v in fa.items()}
    warm_b = {k: v[:32] for k, v in fb.items()}
    r = args.repeats
    rows: list[tuple] = []

    def ours(metric: str) -> tuple[float, torch.Tensor]:
        return timed(
            lambda: alignment_matrix(fa, fb, metric=metric, normalize=False),
            r,
            warm=lambda: alignment_matrix(warm_a, warm_b, metric=metric, normalize=False),
        )

    if "a" in args.tasks:  # (a) linear CKA, (b) unbiased CKA, (c) RSA
        rows += task_linear_cka(peers, ours, la, lb, r)
    if "b" in args.tasks:
        rows += task_unbiased_cka(peers, ours, la, lb, r)
    if "c" in args.tasks:
        rows += task_rsa(peers, ours, la, lb, r)
    if "d" in args.tasks:  # (d) end to end, (e) its peak memory
        rows += end_to_end(args, peers, lite0, lite1, x0, x1, model_cka, fa, fb)
    return rows


def task_linear_cka(peers, ours, la, lb, r) -> list[tuple]:
    rows: list[tuple] = []
    t_ours, m_ours = ours("cka")
    rows.append(("(a) linear CKA", "prh-lightning", t_ours, 1.0, 0.0))
    if "ckatorch" in peers:
        ck = peers["ckatorch"]
        f = lambda A, B: torch.stack([torch.stack([ck.cka_base(a, b, kernel="linear") for b in B]) for a in A])  # noqa: E731
        t, m = timed(lambda: f(la, lb), r, warm=lambda: f([v[:32] for v in la[:2]], [v[:32] for v in lb[:2]]))
        rows.append(("(a) linear CKA", "ckatorch (per pair)", t, t / t_ours, max_diff(m_ours, m)))
    if "repsim" in peers:
        rs = peers["repsim"]
        mats = [v.double().numpy() for v in la + lb]
        f = lambda mats=mats: rs.cka(mats, "linear", "gretton")[: len(la), len(la):]  # noqa: E731
        t, m = timed(f, r, warm=lambda: rs.cka([m_[:32] for m_ in mats[:3]], "linear", "gretton"))
        rows.append(("(a) linear CKA", "repsim (all M x M)", t, t / t_ours, max_diff(m_ours, m)))
    return rows


def task_unbiased_cka(peers, ours, la, lb, r) -> list[tuple]:
    rows: list[tuple] = []
    t_ours, m_ours = ours("unbiased_cka")
    rows.append(("(b) unbiased CKA", "prh-lightning", t_ours, 1.0, 0.0))
    if "pytorch-cka" in peers:
        pc = peers["pytorch-cka"]
        t, m = timed(lambda: pc.cka_from_features(la, lb), r, warm=lambda: pc.cka_from_features([v[:32] for v in la], [v[:32] for v in lb]))
        rows.append(("(b) unbiased CKA", "pytorch-cka", t, t / t_ours, max_diff(m_ours, m)))
    if "ckatorch" in peers:
        ck = peers["ckatorch"]
        f = lambda A, B: torch.stack([torch.stack([ck.cka_base(a, b, kernel="linear", unbiased=True) for b in B]) for a in A])  # noqa: E731
        t, m = timed(lambda: f(la, lb), r, warm=lambda: f([v[:32] for v in la[:2]], [v[:32] for v in lb[:2]]))
        rows.append(("(b) unbiased CKA", "ckatorch (per pair)", t, t / t_ours, max_diff(m_ours, m)))
    if "repsim" in peers:
        rs = peers["repsim"]
        mats = [v.double().numpy() for v in la + lb]
        f = lambda mats=mats: rs.cka(mats, "linear", "song")[: len(la), len(la):]  # noqa: E731
        t, m = timed(f, r, warm=lambda: rs.cka([m_[:32] for m_ in mats[:3]], "linear", "song"))
        rows.append(("(b) unbiased CKA", "repsim (song)", t, t / t_ours, max_diff(m_ours, m)))
    return rows


def task_rsa(peers, ours, la, lb, r) -> list[tuple]:
    """(c) RSA: correlation-distance RDMs compared by Spearman."""
    rows: list[tuple] = []
    t_ours, m_ours = ours("rsa")
    rows.append(("(c) RSA", "prh-lightning", t_ours, 1.0, 0.0))
    if "rsatoolbox" in peers:
        import rsatoolbox

        def rsatoolbox_matrix(A, B):
            rdms = [rsatoolbox.rdm.concat([rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(x.double().numpy()), method="correlation") for x in side]) for side in (A, B)]
            return rsatoolbox.rdm.compare(rdms[0], rdms[1], method="spearman")

        t, m = timed(lambda: rsatoolbox_matrix(la, lb), r, warm=lambda: rsatoolbox_matrix([v[:32] for v in la[:2]], [v[:32] for v in lb[:2]]))
        rows.append(("(c) RSA", "rsatoolbox", t, t / t_ours, max_diff(m_ours, m)))
    if "thingsvision" in peers:
        tv = peers["thingsvision"]

        def thingsvision_matrix(A, B):
            ra = [tv.compute_rdm(x.double().numpy(), "correlation") for x in A]
            rb = [tv.compute_rdm(y.double().numpy(), "correlation") for y in B]
            return np.array([[tv.correlate_rdms(u, v, "spearman") for v in rb] for u in ra])

        t, m = timed(lambda: thingsvision_matrix(la, lb), r, warm=lambda: thingsvision_matrix([v[:32] for v in la[:2]], [v[:32] for v in lb[:2]]))
        rows.append(("(c) RSA", "thingsvision (per pair)", t, t / t_ours, max_diff(m_ours, m)))
    return rows


def e2e_methods(args, peers, names_a: list[str], names_b: list[str]) -> dict[str, Callable]:
    """The end-to-end methods of (d) and (e): ``name -> fn(dataloader, model_a, model_b)``."""
    from prh_lightning.streaming import model_cka

    def bare(data, m1, m2):
        with torch.no_grad():
            for x, _ in data:
                m1(x)
                m2(x)

    def ours(store):
        return lambda data, m1, m2: model_cka(
            m1, m2, data, layers_a=names_a, layers_b=names_b, reduce="mean", normalize=False, store=store
        )

    methods: dict[str, Callable] = {
        "forward passes only": bare,
        "prh-lightning model_cka": ours("auto"),
        "prh-lightning (store=features)": ours("features"),
    }
    if "pytorch-cka" in peers:
        pc = peers["pytorch-cka"]
        methods["pytorch-cka compute_cka"] = lambda data, m1, m2: pc.compute_cka(
            m1, m2, data, layers=names_a, model2_layers=names_b, device="cpu", progress=False
        )[0]
    if "cka-pytorch" in peers:
        cp = peers["cka-pytorch"]

        def cka_pytorch(data, m1, m2):
            calc = cp.CKACalculator(m1, m2, model1_layers=names_a, model2_layers=names_b, verbose=False)
            scores = calc.calculate_cka_matrix(data, num_epochs=1)
            rows = [calc.hook_manager1.module_names.index(k) for k in names_a]  # its order: module registration
            cols = [calc.hook_manager2.module_names.index(k) for k in names_b]
            return scores[rows][:, cols]

        methods["cka-pytorch CKACalculator"] = cka_pytorch
    if "torch-cka" in peers and args.torch_cka:
        tc = peers["torch-cka"]

        def torch_cka(data, m1, m2):
            with torch.no_grad():
                c = tc.CKA(m1, m2, model1_name="lite0", model2_name="lite1", model1_layers=names_a, model2_layers=names_b, device="cpu")
                c.compare(data)
                return c.hsic_matrix

        methods["torch-cka compare"] = torch_cka
    return methods


def e2e_loaders(args, x0: torch.Tensor) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The (d) / (e) dataloader over the 224 px batch (fed to both models) and a 16-image warm-up one."""
    dataset = torch.utils.data.TensorDataset(x0, torch.zeros(len(x0), dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch)
    warm_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(2 * 8)), batch_size=8)
    return loader, warm_loader


def end_to_end(args, peers, lite0, lite1, x0, x1, model_cka, fa, fb) -> list[tuple]:
    from prh_lightning import alignment_matrix

    names_a, names_b = list(fa), list(fb)
    loader, warm_loader = e2e_loaders(args, x0)
    expected = alignment_matrix(fa, fb, metric="cka", normalize=False)  # Lite1 on its own 240 px: see note
    rows = []
    methods = e2e_methods(args, peers, names_a, names_b)
    for name in methods:
        methods[name](warm_loader, copy.deepcopy(lite0), copy.deepcopy(lite1))  # warm-up: allocator, kernels, imports
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, object] = {}
    for repeat in range(args.repeats_e2e):
        order = list(methods) if repeat % 2 == 0 else list(methods)[::-1]  # drift hits all alike
        for name in order:
            # peers leave hooks on the models (torch-cka never removes them): each run gets fresh copies
            m1, m2 = copy.deepcopy(lite0), copy.deepcopy(lite1)
            start = time.perf_counter()
            results[name] = methods[name](loader, m1, m2)
            times[name].append(time.perf_counter() - start)
    bare_t = statistics.median(times["forward passes only"])
    ours_t = statistics.median(times["prh-lightning model_cka"])
    ours_extra = ours_t - bare_t
    for name in methods:
        t = statistics.median(times[name])
        extra = t - bare_t
        diff = "" if name == "forward passes only" else max_diff(results["prh-lightning model_cka"], results[name])
        rows.append(("(d) end to end", name, t, t / ours_t, diff, extra))
    if args.profile:
        m1, m2 = copy.deepcopy(lite0), copy.deepcopy(lite1)
        profile(lambda: model_cka(m1, m2, loader, layers_a=names_a, layers_b=names_b, reduce="mean", normalize=False))
    print(f"[peers] (d) ours beyond the forward passes: {ours_extra:.2f} s; max |ours(224 px for both) - stored(Lite1 at 240 px)| "
          f"= {max_diff(results['prh-lightning model_cka'], expected):.3g} (different inputs, informational)", file=sys.stderr)
    return rows


# -- (e) peak memory, one fresh process per run -------------------------------------------------
# --memory-sides key -> (method name in e2e_methods, peer it needs)
MEMORY_SIDES = {
    "forward-again": ("forward passes only", None),  # control: the bare passes once more (noise floor)
    "ours": ("prh-lightning model_cka", None),
    "ours-features": ("prh-lightning (store=features)", None),
    "pytorch-cka": ("pytorch-cka compute_cka", "pytorch-cka"),
    "cka-pytorch": ("cka-pytorch CKACalculator", "cka-pytorch"),
}


def memory_worker(args: argparse.Namespace) -> None:
    """One (e) run in this fresh process: warm up, then the bare forward passes over the (d)
    dataloader, then the method over the same dataloader and models; prints one ``MEMORY {json}``
    line with the resident-memory peaks (bytes)."""
    import json

    from prh_lightning import record_representations

    side = args.memory_worker
    method_name, peer = MEMORY_SIDES[side]
    if not args.glibc_default:  # freed blocks of >= 128 KiB go back to the OS at once: RSS follows live memory
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
        if not (libc.mallopt(m_mmap_threshold, 2**17) and libc.mallopt(m_trim_threshold, 2**17)):
            raise SystemExit("mallopt failed; rerun with --glibc-default")
    peers = import_peers(Path(args.peers_dir), only=[peer]) if peer else {}
    if peer and peer not in peers:
        raise SystemExit(f"{peer} is not usable here")
    torch.manual_seed(0)
    lite0, lite1, x0, _ = load_images(args.n, args.data)
    loader, warm_loader = e2e_loaders(args, x0)
    names = [list(dict(record_representations(m, [x0[:8]], layers="auto", reduce="auto", progress=False))) for m in (lite0, lite1)]
    methods = e2e_methods(args, peers, *names)
    bare, method = methods["forward passes only"], methods[method_name]
    bare(warm_loader, lite0, lite1)  # warm-up: imports, kernels, allocator
    method(warm_loader, copy.deepcopy(lite0), copy.deepcopy(lite1))  # copies: a peer may leave hooks
    start_bare = _reset_hwm()
    bare(loader, lite0, lite1)
    peak_bare = _hwm()
    start_method = _reset_hwm()
    method(loader, lite0, lite1)
    peak_method = _hwm()
    record = {"side": side, "start_bare": start_bare, "peak_bare": peak_bare, "start_method": start_method, "peak_method": peak_method}
    print("MEMORY " + json.dumps(record), flush=True)


def memory_task(args: argparse.Namespace) -> dict[str, list[dict]]:
    """(e): ``--repeats-memory`` rounds, each running every side of ``--memory-sides`` in its own
    fresh process (order reversed every other round); ``side -> list of MEMORY records``."""
    import json

    install_peers(Path(args.peers_dir))
    sides = [s.strip() for s in args.memory_sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in MEMORY_SIDES]
    if unknown:
        raise SystemExit(f"--memory-sides: unknown {unknown}; choose from {list(MEMORY_SIDES)}")
    records: dict[str, list[dict]] = {side: [] for side in sides}
    worker = [sys.executable, str(Path(__file__).resolve()), "--n", str(args.n), "--batch", str(args.batch),
              "--data", args.data, "--peers-dir", args.peers_dir, *(["--glibc-default"] if args.glibc_default else []),
              "--memory-worker"]
    for repeat in range(args.repeats_memory):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            done = subprocess.run([*worker, side], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
            if done.returncode or not lines:
                print(f"[peers] (e) {side} run {repeat + 1} failed: {done.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
                continue
            record = json.loads(lines[-1][len("MEMORY "):])
            records[side].append(record)
            print(f"[peers] (e) {side} run {repeat + 1}: {(record['peak_method'] - record['peak_bare']) / 2**20:.0f} MB beyond the "
                  f"forward passes' peak", file=sys.stderr)
    return records


def print_memory(records: dict[str, list[dict]], args: argparse.Namespace) -> None:
    mb = 2**20
    allocator = "glibc defaults" if args.glibc_default else "glibc mmap/trim thresholds 128 KiB"
    print(f"\n## (e) Peak resident memory of (d), n = {args.n}, batch {args.batch}: each run a fresh process "
          f"({args.repeats_memory} runs per side, {allocator})\n")
    print("| side | beyond the forward passes' peak (MB), median | min .. max | runs (MB) | forward passes' own rise (MB), median |")
    print("|---|---:|---:|---|---:|")
    for side, runs in records.items():
        label = "forward passes again (control)" if side == "forward-again" else MEMORY_SIDES[side][0]
        if not runs:
            print(f"| {label} | failed | | | |")
            continue
        beyond = [(r["peak_method"] - r["peak_bare"]) / mb for r in runs]
        bare = [(r["peak_bare"] - r["start_bare"]) / mb for r in runs]
        listed = " / ".join(f"{v:.0f}" for v in beyond)
        print(f"| {label} | {statistics.median(beyond):.0f} | {min(beyond):.0f} .. {max(beyond):.0f} | {listed} | "
              f"{statistics.median(bare):.0f} |")


def profile(fn: Callable[[], object]) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime")
    print("\n## cProfile of prh-lightning model_cka (end to end), top 20 by own time\n")
    stats.print_stats(20)


def print_table(rows: list[tuple], args: argparse.Namespace) -> None:
    print(f"\n## Peers on EfficientNet-Lite0 x Lite1 features, n = {args.n}, CPU, {torch.get_num_threads()} threads")
    print(f"median of {args.repeats} repeats after a warm-up ((d): {args.repeats_e2e}); ratio = time / ours (>1: ours faster)\n")
    print("| task | library | time (s) | ratio | max abs diff vs ours | beyond forward (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        task, lib, t, ratio, diff = row[:5]
        extra = f"{row[5]:.2f}" if len(row) > 5 else ""
        diff_s = f"{diff:.2g}" if isinstance(diff, float) else diff
        print(f"| {task} | {lib} | {t:.3f} | {ratio:.2f} | {diff_s} | {extra} |")
    print(
        "\n(d): pytorch-cka, cka-pytorch and torch-cka compute the minibatch unbiased CKA of Nguyen et al. on "
        "flattened maps, ours the exact full-sample linear CKA of spatial means; their diffs are a different "
        "estimator, not an error. Lite1 gets the 224 px batch in (d)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="Flickr images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--data",
        default=os.environ.get("PRH_FLICKR_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1024"),
        help="image-caption folder (default: $PRH_FLICKR_DIR, else ../shared/data/flickr8k-1024 next to the checkout)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-e2e", type=int, default=1)
    parser.add_argument("--tasks", default="abcd", help="which tasks to run: any of a, b, c, d, e (default abcd; e takes ~20 min)")
    parser.add_argument("--repeats-memory", type=int, default=3, help="(e): fresh-process runs per side")
    parser.add_argument("--glibc-default", action="store_true", help="(e): keep glibc's dynamic mmap/trim thresholds")
    parser.add_argument("--memory-sides", default="forward-again,ours,pytorch-cka", help=f"(e): comma-separated, from {', '.join(MEMORY_SIDES)}")
    parser.add_argument("--memory-worker", choices=list(MEMORY_SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--peers-dir", default="/tmp/prh-peers")
    parser.add_argument("--profile", action="store_true", help="cProfile our end-to-end run and print the top items")
    parser.add_argument("--torch-cka", action="store_true", help="also time torch-cka end to end (slow: .item() per pair)")
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return
    if set(args.tasks) & set("abcd"):
        print_table(run(args), args)
    if "e" in args.tasks:
        print_memory(memory_task(args), args)


if __name__ == "__main__":
    main()
