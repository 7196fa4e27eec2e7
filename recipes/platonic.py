"""Vision-language alignment as in the Platonic Representation Hypothesis paper (Huh et al. 2024).

Two steps, as the paper's scripts, plus an end-to-end recipe::

    prh-lightning extract --out results                      # per-layer features, one file per model
    prh-lightning measure --out results --metric mutual_knn --k 10   # language x vision score matrix
    python recipes/platonic.py --out results --quick          # both, shuffled control, figures, report

``extract`` writes ``<out>/features/<dataset-slug>/<model>_pool-<pool>.safetensors`` and skips
files that exist (``--force`` redoes them). ``measure`` writes
``<out>/alignment/<dataset-slug>/<metric>[_k<k>].{npy,json,png}``: for every language x vision
pair the best score over all layer pairs (``.npy``: scores ``[L, V]``; ``_indices.npy``: the best
layer pair ``[L, V, 2]``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prh_lightning.alignment import alignment_matrix
from prh_lightning.data.paired import PRH_SUBSET, PairedDataError, load_paired
from prh_lightning.extraction import LANGUAGE_POOLS, VISION_POOLS, extract_model
from prh_lightning.models.pretrained import PretrainedUnavailable
from prh_lightning.models.zoo import MODELSETS, modality_of
from prh_lightning.reporting import Report, markdown_table, save_figure, write_json
from prh_lightning.representations import Representations

KNN_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna")
METRICS = KNN_METRICS + ("cka", "unbiased_cka", "svcca", "rsa")
QUICK_SAMPLES = 512
SHUFFLE_SEED = 0


class RecipeError(RuntimeError):
    """Bad input to extract/measure; printed as one line, exit status 2."""


# -- extract --------------------------------------------------------------------------------
def _extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prh-lightning extract", description="Per-layer features of a model set on paired image-caption data.")
    _add_extract_args(p)
    return p


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="results folder (features/ and alignment/ go here)")
    p.add_argument("--data", default=None, help="image folder with metadata.csv (file_name,text), or a hub dataset id "
                   "such as minhuh/prh (online); default: $PRH_FLICKR_DIR or ../shared/data/flickr8k-1024")
    p.add_argument("--subset", default=PRH_SUBSET, help="hub dataset revision (default: %(default)s)")
    p.add_argument("--n", type=int, default=None, help="first N pairs (default: all)")
    p.add_argument("--modelset", default="offline", choices=sorted(MODELSETS), help="named model set (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=None, help="model names instead of --modelset (registered names or "
                   "timm:<name>, torchvision:<name>, hf-vision:<id>, hf-lm:<id>, hf-text:<id>)")
    p.add_argument("--modality", choices=("language", "vision", "all"), default="all", help="extract only these models")
    p.add_argument("--pool-language", choices=LANGUAGE_POOLS, default="avg", help="token pooling of LMs (default: %(default)s)")
    p.add_argument("--pool-vision", choices=VISION_POOLS, default="none",
                   help="none = CLS token (spatial mean for CNNs), avg = mean over tokens (default: %(default)s)")
    p.add_argument("--pool", default=None, help="the paper's --pool for the one --modality chosen (avg|last for "
                   "language, none|avg for vision)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", default="auto", help="torch CPU threads: a number, or auto = 1 when the machine is "
                   "oversubscribed (load average above the core count; spinning threads then run ~5x slower), "
                   "else torch's default (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="re-extract even if the feature file exists")


def _model_list(args: argparse.Namespace) -> list[str]:
    names = args.models or MODELSETS[args.modelset]["language"] + MODELSETS[args.modelset]["vision"]
    for name in names:
        modality_of(name)  # unknown names fail here, before anything loads
    return [n for n in names if args.modality == "all" or modality_of(n) == args.modality]


def _apply_pool(args: argparse.Namespace) -> None:
    """The paper's single ``--pool`` sets the pooling of the chosen ``--modality``."""
    if args.pool is None:
        return
    if args.modality == "all":
        raise RecipeError("--pool needs --modality language or vision (or use --pool-language / --pool-vision)")
    allowed = LANGUAGE_POOLS if args.modality == "language" else VISION_POOLS
    if args.pool not in allowed:
        raise RecipeError(f"--pool {args.pool!r} is not defined for {args.modality} models; use one of {allowed}")
    setattr(args, f"pool_{args.modality}", args.pool)


@contextlib.contextmanager
def cpu_threads(spec: str | int):
    """Set torch's CPU thread count for the block (``"auto"``: see ``--threads``), then restore it."""
    before = torch.get_num_threads()
    if spec == "auto":
        cores = os.cpu_count() or 1
        n = 1 if os.getloadavg()[0] > cores else before
    else:
        try:
            n = int(spec)
        except ValueError:
            raise RecipeError(f"--threads must be a positive number or auto, got {spec!r}") from None
        if n < 1:
            raise RecipeError(f"--threads must be a positive number or auto, got {spec!r}")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def run_extract(args: argparse.Namespace, log=print) -> dict:
    """Extract every model of ``args``; returns ``{"dataset", "files", "skipped", "unavailable"}``.

    Models that cannot be loaded are reported in ``unavailable`` (name -> reason) if they were
    part of a model set; a model named explicitly with ``--models`` that fails is an error.
    """
    names = _model_list(args)
    _apply_pool(args)
    data = load_paired(args.data, args.subset, args.n)
    log(f"data: {data.name}, {len(data)} pairs -> {data.slug}; {torch.get_num_threads()} CPU thread(s)")
    files, skipped, unavailable, seconds = {}, [], {}, {}
    for name in names:
        pool = args.pool_language if modality_of(name) == "language" else args.pool_vision
        start = time.perf_counter()
        try:
            path, extracted = extract_model(name, data, args.out, pool, force=args.force, batch_size=args.batch_size)
        except PretrainedUnavailable as err:
            if args.models:
                raise
            unavailable[name] = str(err)
            log(f"  {name}: not available, skipped ({str(err)[:160]}...)")
            continue
        files[name] = str(path)
        seconds[name] = round(time.perf_counter() - start, 1)
        if not extracted:
            skipped.append(name)
        log(f"  {name}: {'extracted' if extracted else 'exists, skipped'} {path} ({seconds[name]} s)")
    return {"dataset": data.slug, "n": len(data), "files": files, "skipped": skipped, "unavailable": unavailable, "seconds": seconds}


def extract_main(argv: list[str] | None = None) -> int:
    """``prh-lightning extract``: see ``--help``."""
    args = _extract_parser().parse_args(argv)

    def run() -> None:
        with cpu_threads(args.threads):
            run_extract(args)

    return _guarded(run)


# -- measure --------------------------------------------------------------------------------
def _add_measure_args(p: argparse.ArgumentParser, control_flag: bool = True) -> None:
    p.add_argument("--metric", default="mutual_knn", choices=METRICS, help="alignment metric (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="neighbours for the k-NN metrics (default: %(default)s)")
    p.add_argument("--clip-quantile", type=float, default=0.95,
                   help="clip each layer at the mean per-sample |x| quantile before normalising, as the paper "
                        "(default: %(default)s; 1 = no clipping)")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise rows (the paper normalises)")
    if control_flag:  # the recipe always runs the control
        p.add_argument("--shuffle-control", action="store_true",
                       help="also score with the captions permuted (seed 0): k-NN alignment should fall to k/(n-1)")


def _measure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prh-lightning measure", description="Best-layer-pair alignment of every language x vision model pair.")
    p.add_argument("--out", required=True, type=Path, help="results folder of extract")
    p.add_argument("--dataset", default=None, help="dataset slug under <out>/features (default: the only one there)")
    p.add_argument("--pool-language", choices=LANGUAGE_POOLS, default="avg")
    p.add_argument("--pool-vision", choices=VISION_POOLS, default="none")
    _add_measure_args(p)
    return p


def _dataset_dir(out: Path, dataset: str | None) -> Path:
    root = out / "features"
    if dataset is not None:
        if not (root / dataset).is_dir():
            raise RecipeError(f"no features for dataset {dataset!r} under {root}; run prh-lightning extract first")
        return root / dataset
    found = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
    if len(found) != 1:
        what = "no feature folders" if not found else f"several datasets ({', '.join(p.name for p in found)}); pick one with --dataset"
        raise RecipeError(f"{root}: {what}. Run prh-lightning extract --out {out} first")
    return found[0]


def load_features(folder: Path, pool_language: str = "avg", pool_vision: str = "none") -> tuple[dict, dict]:
    """``(language, vision)``: model name -> :class:`Representations` from one dataset folder.

    Every file must hold the same samples (``n`` and sample ids), else :class:`RecipeError`.
    """
    reps: dict[str, dict[str, Representations]] = {"language": {}, "vision": {}}
    reference: tuple[Path, Representations] | None = None
    for path in sorted(folder.glob("*.safetensors")):
        rep = Representations.load(path)
        modality, pool = rep.metadata.get("modality"), rep.metadata.get("pool")
        if modality not in reps or pool != (pool_language if modality == "language" else pool_vision):
            continue
        if reference is None:
            reference = (path, rep)
        elif rep.n != reference[1].n or rep.sample_ids != reference[1].sample_ids:
            raise RecipeError(
                f"{path.name} holds {rep.n} samples but {reference[0].name} holds {reference[1].n} "
                "(or their sample ids differ): every feature file must come from the same pairs; "
                "re-run extract with the same --data and --n (use --force)"
            )
        reps[modality][rep.metadata.get("model", path.stem)] = rep
    for modality in reps:
        if not reps[modality]:
            raise RecipeError(f"{folder}: no {modality} feature files (pool {pool_language if modality == 'language' else pool_vision}); run extract first")
    return reps["language"], reps["vision"]


def score_matrix(language: dict, vision: dict, metric: str = "mutual_knn", k: int = 10, clip_quantile: float | None = 0.95,
                 normalize: bool = True, permutation: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Best alignment over layer pairs for every language x vision model pair.

    All layers of all models are scored in one :func:`alignment_matrix` call (per-layer work done
    once), then each model-pair block is maximised. ``permutation`` reorders the language samples
    (the shuffled-pairing control). Returns scores ``[L, V]``, best layer indices ``[L, V, 2]`` and
    the scores of all layer pairs ``[sum of language layers, sum of vision layers]``.
    """
    xs = [(name, t) for name, rep in language.items() for t in rep.values()]
    if permutation is not None:
        xs = [(name, t[permutation]) for name, t in xs]
    ys = [(name, t) for name, rep in vision.items() for t in rep.values()]
    kw = {"k": k} if metric in KNN_METRICS else {}
    clip = None if clip_quantile is None or clip_quantile >= 1 else clip_quantile
    full = alignment_matrix([t for _, t in xs], [t for _, t in ys], metric=metric, normalize=normalize, clip_quantile=clip, **kw)
    scores = np.zeros((len(language), len(vision)))
    indices = np.zeros((len(language), len(vision), 2), dtype=np.int64)
    row = 0
    for a, lrep in enumerate(language.values()):
        col = 0
        for b, vrep in enumerate(vision.values()):
            block = full[row : row + len(lrep), col : col + len(vrep)]
            flat = int(torch.argmax(block))
            indices[a, b] = divmod(flat, block.shape[1])
            scores[a, b] = float(block.flatten()[flat])
            col += len(vrep)
        row += len(lrep)
    return scores, indices, full


def _stem(metric: str, k: int) -> str:
    return f"{metric}_k{k}" if metric in KNN_METRICS else metric


def run_measure(out: Path, dataset: str | None, pool_language: str, pool_vision: str, metric: str, k: int,
                clip_quantile: float | None, normalize: bool, shuffle_control: bool, log=print) -> dict:
    """Score matrix (and optional shuffled control) saved under ``<out>/alignment/<dataset>/``."""
    from prh_lightning.plotting import heatmap_figure

    folder = _dataset_dir(out, dataset)
    language, vision = load_features(folder, pool_language, pool_vision)
    n = next(iter(language.values())).n
    if metric in KNN_METRICS and not 1 <= k < n:
        raise RecipeError(f"--k {k} needs 1 <= k < n = {n} samples")
    opts = dict(metric=metric, k=k, clip_quantile=clip_quantile, normalize=normalize)
    scores, indices, _ = score_matrix(language, vision, **opts)
    result = {
        "dataset": folder.name, "n": n, "metric": metric, "k": k if metric in KNN_METRICS else None,
        "clip_quantile": clip_quantile, "normalize": normalize, "pool_language": pool_language, "pool_vision": pool_vision,
        "language": list(language), "vision": list(vision), "scores": scores, "indices": indices,
        "layers": {name: rep.layers for name, rep in {**language, **vision}.items()},
        "num_params": {name: rep.metadata.get("num_params") for name, rep in {**language, **vision}.items()},
        "bits_per_byte": {name: rep.metadata.get("bits_per_byte") for name, rep in language.items()},
    }
    if shuffle_control:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(SHUFFLE_SEED))
        shuffled, _, full = score_matrix(language, vision, **opts, permutation=perm)
        # the best of many layer pairs sits above chance even without any pairing signal;
        # the mean over all layer pairs is the number to hold against k/(n-1)
        result["shuffled"] = {"scores": shuffled, "mean": float(shuffled.mean()), "layer_pair_mean": float(full.mean()),
                              "seed": SHUFFLE_SEED, "chance": k / (n - 1) if metric == "mutual_knn" else None}
    dest = out / "alignment" / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    stem = _stem(metric, k)
    _save_npy(dest / f"{stem}.npy", scores)
    _save_npy(dest / f"{stem}_indices.npy", indices)
    if shuffle_control:
        _save_npy(dest / f"{stem}_shuffled.npy", result["shuffled"]["scores"])
    write_json(dest / f"{stem}.json", result)
    fig = heatmap_figure(scores, list(language), list(vision), title=f"{metric} (best layer pair), n={n}",
                         xlabel="vision model", ylabel="language model")
    save_figure(fig, dest / f"{stem}.png")
    result["files"] = {"npy": str(dest / f"{stem}.npy"), "json": str(dest / f"{stem}.json"), "heatmap": str(dest / f"{stem}.png")}
    log(f"scores ({metric}) saved to {dest / stem}.{{npy,json,png}}")
    return result


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` of a plain numeric array (loads with ``allow_pickle=False``), atomically."""
    import io

    from prh_lightning.reporting import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def measure_main(argv: list[str] | None = None) -> int:
    """``prh-lightning measure``: see ``--help``."""
    a = _measure_parser().parse_args(argv)
    return _guarded(lambda: run_measure(a.out, a.dataset, a.pool_language, a.pool_vision, a.metric, a.k,
                                        a.clip_quantile, not a.no_normalize, a.shuffle_control))


# -- the recipe -------------------------------------------------------------------------------
def _recipe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prh-lightning platonic", description="Extract + measure + shuffled control + figures + report.")
    _add_extract_args(p)
    _add_measure_args(p, control_flag=False)
    p.add_argument("--quick", action="store_true", help=f"first {QUICK_SAMPLES} pairs (unless --n), about 3 minutes on a 2-core CPU")
    return p


def _figures(result: dict, fig_dir: Path) -> dict[str, str]:
    """Alignment against LM bits per byte (causal LMs only) and against vision model size."""
    from prh_lightning.plotting import heatmap_figure, line_figure

    scores, lang, vis = np.asarray(result["scores"]), result["language"], result["vision"]
    files = {}
    fig = heatmap_figure(scores, lang, vis, title=f"{result['metric']} (best layer pair)", xlabel="vision", ylabel="language")
    files["scores"] = str(save_figure(fig, fig_dir / "scores.png"))
    bpb = result["bits_per_byte"]
    causal = [i for i, name in enumerate(lang) if bpb.get(name) is not None]
    if causal:
        series = {v: ([bpb[lang[i]] for i in causal], [float(scores[i, j]) for i in causal]) for j, v in enumerate(vis)}
        fig = line_figure(series, title="alignment vs LM bits per byte (causal LMs)", xlabel="bits per byte on the captions",
                          ylabel=result["metric"])
        files["vs_bits_per_byte"] = str(save_figure(fig, fig_dir / "alignment_vs_bits_per_byte.png"))
    order = sorted(range(len(vis)), key=lambda j: result["num_params"][vis[j]] or 0)
    size = [(result["num_params"][vis[j]] or 0) / 1e6 for j in order]
    fig = line_figure({name: (size, [float(scores[i, j]) for j in order]) for i, name in enumerate(lang)},
                      title="alignment vs vision model size", xlabel="vision parameters (millions)", ylabel=result["metric"])
    files["vs_vision_size"] = str(save_figure(fig, fig_dir / "alignment_vs_vision_size.png"))
    return files


def _report(result: dict, extract: dict, seconds: float, out: Path) -> None:
    lang, vis, scores = result["language"], result["vision"], np.asarray(result["scores"])
    k = "" if result["k"] is None else f" (k={result['k']})"
    report = Report("Vision-language alignment (Platonic Representation Hypothesis)",
                    f"{result['n']} image-caption pairs of `{result['dataset']}`; metric {result['metric']}{k}, "
                    f"best layer pair per model pair; {seconds:.0f} s end to end.")
    rows = [[name] + [float(s) for s in scores[i]] for i, name in enumerate(lang)]
    report.section("Score matrix", "Rows: language models; columns: vision models.", figure="figures/scores.png",
                   table=markdown_table(["language \\ vision"] + vis, rows))
    if "shuffled" in result:
        sh = result["shuffled"]
        chance = "" if sh["chance"] is None else f"; chance for mutual k-NN is k/(n-1) = {sh['chance']:.4f}"
        report.section("Shuffled control", f"With the captions permuted (seed {sh['seed']}) the mean best-pair score "
                       f"falls from {scores.mean():.4f} to {sh['mean']:.4f} (a maximum over many layer pairs, so "
                       f"above chance); averaged over all layer pairs it is {sh['layer_pair_mean']:.4f}{chance}.")
    if any(v is not None for v in result["bits_per_byte"].values()):
        text = ", ".join(f"{k}: {v:.3f}" for k, v in result["bits_per_byte"].items() if v is not None)
        report.section("Alignment vs language-model quality", f"Bits per byte on the captions: {text}. Text encoders "
                       "have no LM loss and are left out of this plot.", figure="figures/alignment_vs_bits_per_byte.png")
    report.section("Alignment vs vision model size", "Parameters: " + ", ".join(
        f"{v}: {result['num_params'][v] / 1e6:.1f}M" for v in vis), figure="figures/alignment_vs_vision_size.png")
    if extract["unavailable"]:
        report.section("Models skipped", "\n".join(f"- {k}: {' '.join(v.split())[:300]}" for k, v in extract["unavailable"].items()))
    report.write(out / "report.md")


def main(argv: list[str] | None = None) -> int:
    """``python recipes/platonic.py --out DIR [--quick]``: extract, measure, control, figures, report."""
    args = _recipe_parser().parse_args(argv)
    if args.quick and args.n is None:
        args.n = QUICK_SAMPLES

    def run() -> dict:
        start = time.perf_counter()
        with cpu_threads(args.threads):
            extract = run_extract(args)
        result = run_measure(args.out, extract["dataset"], args.pool_language, args.pool_vision, args.metric, args.k,
                             args.clip_quantile, not args.no_normalize, shuffle_control=True)
        figures = _figures(result, args.out / "figures")
        seconds = time.perf_counter() - start
        summary = {
            "dataset": result["dataset"], "n": result["n"], "metric": result["metric"], "k": result["k"],
            "language_models": result["language"], "vision_models": result["vision"],
            "score_matrix": result["scores"], "best_layer_pairs": result["indices"], "layers": result["layers"],
            "shuffled_control": result["shuffled"], "bits_per_byte": result["bits_per_byte"],
            "num_params": result["num_params"], "unavailable_models": extract["unavailable"],
            "extract_seconds": extract["seconds"], "seconds": round(seconds, 1), "figures": figures,
            "alignment_files": result["files"],
        }
        write_json(args.out / "summary.json", summary)
        _report(result, extract, seconds, args.out)
        print(f"summary: {args.out / 'summary.json'}  ({seconds:.0f} s)")
        return summary

    return _guarded(run)


def _guarded(fn) -> int:
    """Run ``fn``; bad input (unknown model, missing data, mismatched files) -> one line on stderr, status 2."""
    try:
        fn()
    except (RecipeError, PretrainedUnavailable, PairedDataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
