"""``prh-lightning measure``: every language x vision model pair's best-layer-pair score, next to
its permutation calibration (:func:`prh_lightning.calibrate`) and, with ``--sizes``, its
alignment curve; written atomically under ``<out>/alignment/<dataset>/``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prh_lightning.analysis.claims import holm
from prh_lightning.analysis.model_matrix import best_layer_pair_matrix
from prh_lightning.calibration import calibrate
from prh_lightning.recipes import _common as common
from prh_lightning.recipes import _platonic_curve as curve_files
from prh_lightning.recipes._platonic_data import _dataset_dir, load_features, save_npy

KNN_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna")
METRICS = KNN_METRICS + ("cka", "unbiased_cka", "svcca", "rsa")
ALPHA = 0.05
FIELDS = ("raw", "null_mean", "tau", "p_value", "calibrated", "z_score")
# every file a run may write, as suffixes of the stem; a rerun removes the ones it does not write
SUFFIXES = (".npy", "_indices.npy", "_layers.npy", "_shuffled.npy", "_calibrated.npy", "_p_value.npy",
            "_calibration.npz", "_calibrated.png", ".json", ".png", "_curve.json", "_curve.csv",
            "_curve_subsets.npy", "_curve.png")
RecipeError = common.RecipeInputError

OUTPUT_HELP = """\
output: <out>/alignment/<dataset>/<stem>*, stem = <metric>_k<k> (k-NN metrics) or <metric>;
L, V = language, vision models; LL, VV = all their layers (models in the order listed in
<stem>.json, each model's layers in file order). Arrays load with np.load(path, allow_pickle=False).
  <stem>.npy                [L, V]  raw best-layer-pair score (max over the pair's layer pairs)
  <stem>_indices.npy        [L, V, 2]  (language layer, vision layer) of that best pair
  <stem>_layers.npy         [LL, VV]  raw score of every layer pair
  <stem>.json, <stem>.png   everything above and below with model and layer names; heatmap
with --permutations K > 0 (the rows of every vision layer reordered by the same permutation k,
k = 1..K, the k-th torch.randperm(n) of torch.Generator().manual_seed(--seed)):
  <stem>_calibrated.npy     [L, V]  calibrated best-pair score: the max over layer pairs is
                            retaken on every permutation, so its null carries the same selection
  <stem>_p_value.npy        [L, V]  its p-value (1 + #{null >= raw}) / (K + 1)
  <stem>_calibration.npz    best_<f> [L, V] (the best-pair numbers above, plus best_p_holm,
                            Holm-adjusted over the model pairs) and layer_<f> [LL, VV] (each
                            layer pair calibrated on its own) for f in raw, null_mean (chance),
                            tau, p_value, calibrated, z_score; permutations [K, n]
  <stem>_calibrated.png     heatmap of the calibrated best-pair scores
  tau = the ceil(0.95 (K + 1))-th smallest of {raw} and the K null scores;
  calibrated = clamp((raw - tau) / (max - tau), 0, 1), max the metric's upper bound
  (max(raw - tau, 0) for a metric without one); z_score = (raw - null_mean) / null std
with --sizes (prh_lightning.alignment_curve on the best layer pair, nested random subsets, the
same subsets for every model pair):
  <stem>_curve.json, .csv   per model pair and size n: mean over --repeats, low/high (5% / 95%
                            quantiles over the repeats), chance (null mean, --curve-permutations)
  <stem>_curve_subsets.npy  [R, n]  the random orders; size s uses the first s of each
  <stem>_curve.png          the curves with their spread and chance level
A rerun replaces these files (and removes those it does not write)."""


def add_measure_args(p: argparse.ArgumentParser, control_flag: bool = True) -> None:
    """The scoring options shared by ``measure`` and the ``platonic`` recipe."""
    p.add_argument("--metric", default="mutual_knn", choices=METRICS, help="alignment metric (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="neighbours for the k-NN metrics (default: %(default)s)")
    p.add_argument("--clip-quantile", type=float, default=0.95,
                   help="clip each layer at the mean per-sample |x| quantile before normalising, as the paper "
                        "(default: %(default)s; 1 = no clipping)")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise rows (the paper normalises)")
    p.add_argument("--permutations", type=int, default=200,
                   help="K permutations of the pairing for the calibrated scores, chance levels and p-values of "
                        "every layer pair and model pair (prh_lightning.calibrate; 0 = none; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the permutations, the shuffled control and the --sizes subsets (default: %(default)s)")
    p.add_argument("--sizes", type=curve_files.parse_sizes, default=None, metavar="N1,N2,...",
                   help="also score each model pair on nested random subsets of these sizes, e.g. 256,1024,4096 "
                        "(the alignment curve; each size at most the number of pairs)")
    p.add_argument("--repeats", type=int, default=5, help="random subsets per size for --sizes (default: %(default)s)")
    p.add_argument("--curve-permutations", type=int, default=10,
                   help="permutations per subset for the chance level of --sizes (0 = none; default: %(default)s)")
    if control_flag:  # the recipe always runs the control
        p.add_argument("--shuffle-control", action="store_true",
                       help="also score with the captions permuted (the first permutation of --seed): k-NN "
                            "alignment should fall to k/(n-1)")


@dataclass(frozen=True)
class MeasureOptions:
    """The scoring settings of one ``measure`` run (see :func:`add_measure_args`)."""

    metric: str = "mutual_knn"
    k: int = 10
    clip_quantile: float | None = 0.95
    normalize: bool = True
    n_permutations: int = 200
    seed: int = 0
    sizes: list[int] | None = None
    repeats: int = 5
    curve_permutations: int = 10
    shuffle_control: bool = False

    @classmethod
    def from_args(cls, a: argparse.Namespace, shuffle_control: bool | None = None) -> MeasureOptions:
        control = a.shuffle_control if shuffle_control is None else shuffle_control
        return cls(a.metric, a.k, a.clip_quantile, not a.no_normalize, a.permutations, a.seed, a.sizes, a.repeats,
                   a.curve_permutations, control)

    def check(self) -> None:
        """Refuse impossible settings before any work (sizes against n: :meth:`check_n`)."""
        common.check_clip_quantile(self.clip_quantile)
        for value, name, low in ((self.n_permutations, "--permutations", 0), (self.repeats, "--repeats", 1),
                                 (self.curve_permutations, "--curve-permutations", 0)):
            if value < low:
                raise RecipeError(f"{name} must be >= {low}, got {value}")

    def check_n(self, n: int, where: str = "in the feature files") -> None:
        if self.metric in KNN_METRICS and not 1 <= self.k < n:
            raise RecipeError(f"--k {self.k} needs 1 <= k < n = {n} samples")
        curve_files.check_sizes(self.sizes, n, self.metric, self.k if self.metric in KNN_METRICS else None, where)

    @property
    def stem(self) -> str:
        return f"{self.metric}_k{self.k}" if self.metric in KNN_METRICS else self.metric

    @property
    def metric_kwargs(self) -> dict:
        return {"k": self.k} if self.metric in KNN_METRICS else {}


def draw_permutations(n: int, count: int, seed: int) -> torch.Tensor:
    """``LongTensor[count, n]``: the ``count`` first ``torch.randperm(n)`` of a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(count)])


def calibrate_model_pairs(language: dict, vision: dict, permutations: torch.Tensor, o: MeasureOptions) -> dict:
    """Per model pair, :func:`prh_lightning.calibrate` (``aggregate="max"``) over its layer pairs
    with the given permutations: ``best_<f>`` ``[L, V]`` and ``layer_<f>`` ``[LL, VV]`` arrays."""
    clip = None if o.clip_quantile is None or o.clip_quantile >= 1 else o.clip_quantile
    sizes_l, sizes_v = [len(m) for m in language.values()], [len(m) for m in vision.values()]
    out = {f"best_{f}": np.zeros((len(sizes_l), len(sizes_v))) for f in FIELDS}
    out.update({f"layer_{f}": np.zeros((sum(sizes_l), sum(sizes_v))) for f in FIELDS})
    r0 = 0
    for a, rows in enumerate(language.values()):
        c0 = 0
        for b, cols in enumerate(vision.values()):
            res = calibrate(rows, cols, o.metric, permutations=permutations, alpha=ALPHA, aggregate="max",
                            normalize=o.normalize, clip_quantile=clip, **o.metric_kwargs)
            for f in FIELDS:
                out[f"best_{f}"][a, b] = getattr(res.aggregate, f)
                out[f"layer_{f}"][r0 : r0 + sizes_l[a], c0 : c0 + sizes_v[b]] = getattr(res, f).numpy()
            c0 += sizes_v[b]
        r0 += sizes_l[a]
    out["best_p_holm"] = holm(out["best_p_value"].ravel()).reshape(out["best_p_value"].shape)
    return out


def _save_npz(path: Path, arrays: dict) -> None:
    import io

    from prh_lightning.reporting import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **{key: np.asarray(value) for key, value in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def run_measure(out: Path, dataset: str | None, pool_language: str, pool_vision: str, o: MeasureOptions,
                log=print) -> dict:
    """Score, calibrate and (``o.sizes``) curve every model pair; every number is computed before
    the first file is written. Returns the content of ``<stem>.json`` plus ``"files"``."""
    from prh_lightning.plotting import heatmap_figure
    from prh_lightning.reporting import save_figure, write_json

    o.check()
    folder = _dataset_dir(out, dataset)
    language, vision = load_features(folder, pool_language, pool_vision)
    n = next(iter(language.values())).n
    o.check_n(n)
    files = sorted(folder.glob("*.safetensors"))
    opts = dict(metric=o.metric, clip_quantile=o.clip_quantile, normalize=o.normalize, **o.metric_kwargs)
    best = best_layer_pair_matrix(language, vision, **opts)
    result = {
        "dataset": folder.name, "n": n, "metric": o.metric, "k": o.k if o.metric in KNN_METRICS else None,
        "clip_quantile": o.clip_quantile, "normalize": o.normalize, "pool_language": pool_language, "pool_vision": pool_vision,
        "data": {**common.fingerprint(files, folder), "n_items": n, "feature_files": len(files)},
        "language": list(language), "vision": list(vision), "scores": best.scores, "indices": best.indices,
        "best_layer_names": {f"{a} / {b}": list(best.best_layers(a, b)) for a in language for b in vision},
        "layers": {name: rep.layers for name, rep in {**language, **vision}.items()},
        "num_params": {name: rep.metadata.get("num_params") for name, rep in {**language, **vision}.items()},
        "bits_per_byte": {name: rep.metadata.get("bits_per_byte") for name, rep in language.items()},
        "seed": o.seed,
    }
    arrays = {"": best.scores, "_indices": best.indices, "_layers": best.full.double().cpu().numpy()}
    if o.n_permutations:
        log(f"calibrating with {o.n_permutations} permutations ...")
        permutations = draw_permutations(n, o.n_permutations, o.seed)
        cal = calibrate_model_pairs(language, vision, permutations, o)
        result["calibrated"] = {**{f: cal[f"best_{f}"] for f in FIELDS}, "p_holm": cal["best_p_holm"],
                                "n_permutations": o.n_permutations, "alpha": ALPHA, "seed": o.seed}
        arrays.update({"_calibrated": cal["best_calibrated"], "_p_value": cal["best_p_value"]})
    if o.shuffle_control:
        perm = draw_permutations(n, 1, o.seed)[0]
        control = best_layer_pair_matrix(language, vision, **opts, permutation=perm)
        # the best of many layer pairs sits above chance even without any pairing signal;
        # the mean over all layer pairs is the number to hold against k/(n-1)
        result["shuffled"] = {"scores": control.scores, "mean": float(control.scores.mean()),
                              "layer_pair_mean": float(control.full.mean()), "seed": o.seed,
                              "chance": o.k / (n - 1) if o.metric == "mutual_knn" else None}
        arrays["_shuffled"] = control.scores
    curves = None
    if o.sizes:
        log(f"alignment curve at n = {', '.join(map(str, o.sizes))} ({o.repeats} repeats) ...")
        curves = curve_files.model_pair_curves(language, vision, o.sizes, o.repeats, o.curve_permutations, o.seed,
                                               o.metric, o.normalize, o.clip_quantile, **o.metric_kwargs)
        result["curve"] = curve_files.curve_record(curves, o.seed)

    dest = out / "alignment" / folder.name
    stem = o.stem
    written = {}
    for suffix, array in arrays.items():
        save_npy(dest / f"{stem}{suffix}.npy", array)
        written[suffix.lstrip("_") or "npy"] = str(dest / f"{stem}{suffix}.npy")
    if o.n_permutations:
        _save_npz(dest / f"{stem}_calibration.npz", {**cal, "permutations": permutations.numpy()})
        written["calibration"] = str(dest / f"{stem}_calibration.npz")
        fig = heatmap_figure(cal["best_calibrated"], list(language), list(vision), vmin=0.0, vmax=1.0,
                             title=f"calibrated {o.metric} (best layer pair), n={n}, K={o.n_permutations}",
                             xlabel="vision model", ylabel="language model")
        written["calibrated_heatmap"] = str(save_figure(fig, dest / f"{stem}_calibrated.png"))
    if curves is not None:
        written.update(curve_files.save_curve(curves, o.seed, dest, stem, f"{o.metric} (best layer pair) vs n"))
    fig = heatmap_figure(best.scores, list(language), list(vision), title=f"{o.metric} (best layer pair), n={n}",
                         xlabel="vision model", ylabel="language model")
    written["heatmap"] = str(save_figure(fig, dest / f"{stem}.png"))
    written["json"] = str(dest / f"{stem}.json")
    result["layer_names"] = {"language": [f"{m}/{layer}" for m, rep in language.items() for layer in rep.layers],
                             "vision": [f"{m}/{layer}" for m, rep in vision.items() for layer in rep.layers]}
    result["files"] = written
    write_json(dest / f"{stem}.json", result)
    for suffix in SUFFIXES:  # a previous run's files that this run did not replace would mislead
        path = dest / f"{stem}{suffix}"
        if str(path) not in written.values() and path.is_file():
            path.unlink()
    log(f"scores ({o.metric}) saved to {dest / stem}*: " + ", ".join(Path(p).name for p in written.values()))
    return result
