"""Vision-language alignment as in the Platonic Representation Hypothesis paper (Huh et al. 2024).

Two steps, as the paper's scripts, plus an end-to-end recipe::

    prh-lightning extract --out results                      # per-layer features, one file per model
    prh-lightning measure --out results --metric mutual_knn --k 10   # language x vision score matrix
    python recipes/platonic.py --out results --quick          # both, shuffled control, figures, report

``extract`` writes ``<out>/features/<dataset-slug>/<model>_pool-<pool>.safetensors`` and skips
files that exist (``--force`` redoes them). ``measure`` (:mod:`._platonic_measure`) writes
``<out>/alignment/<dataset-slug>/<metric>[_k<k>]*``: for every language x vision pair the best
score over all layer pairs, its calibration against a permutation null (``--permutations``) and,
with ``--sizes``, its alignment curve (the file list is in ``prh-lightning measure --help``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from prh_lightning.data.paired import PRH_SUBSET, PairedDataError, load_paired
from prh_lightning.extraction import LANGUAGE_POOLS, VISION_POOLS, extract_model
from prh_lightning.models.pretrained import PretrainedUnavailable
from prh_lightning.models.zoo import MODELSETS, modality_of
from prh_lightning.recipes import _common as common
from prh_lightning.recipes import _platonic_measure as platonic_measure
from prh_lightning.recipes import _platonic_report as platonic_report
from prh_lightning.recipes._platonic_data import data_record, data_source
from prh_lightning.recipes._platonic_measure import KNN_METRICS, METRICS, MeasureOptions, add_measure_args, run_measure
from prh_lightning.reporting import save_figure, write_json

__all__ = ["KNN_METRICS", "METRICS", "extract_main", "main", "measure_main", "run_extract", "run_measure"]
QUICK_SAMPLES = 512


RecipeError = common.RecipeInputError  # bad input to extract/measure; one line on stderr, exit status 2


# -- extract --------------------------------------------------------------------------------
def _extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prh-lightning extract", description="Per-layer features of a model set on paired image-caption data.")
    _add_extract_args(p)
    return p


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="results folder (features/ and alignment/ go here)")
    p.add_argument("--data", default=None, help="image folder with metadata.csv (file_name,text), or a hub dataset id "
                   f"such as minhuh/prh (online); default: ${common.FLICKR_ENV}, else ../shared/data/flickr8k-1024 "
                   "beside this checkout")
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
    p.add_argument("--threads", default="auto", help=common.THREADS_HELP)
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


def run_extract(args: argparse.Namespace, log=print, check_n=None) -> dict:
    """Extract every model of ``args``; returns ``{"dataset", "files", "skipped", "unavailable"}``.
    ``check_n(n)`` is called with the number of pairs once the data is loaded, before any model.

    Models that cannot be loaded are reported in ``unavailable`` (name -> reason) if they were
    part of a model set; a model named explicitly with ``--models`` that fails is an error.
    """
    names = _model_list(args)
    _apply_pool(args)
    source = data_source(args.data)
    data = load_paired(source, args.subset, args.n)
    if check_n is not None:
        check_n(len(data))
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
    return {"dataset": data.slug, "n": len(data), "files": files, "skipped": skipped, "unavailable": unavailable,
            "seconds": seconds, "data": data_record(data, source)}


def extract_main(argv: list[str] | None = None) -> int:
    """``prh-lightning extract``: see ``--help``."""
    args = _extract_parser().parse_args(argv)

    def run() -> None:
        with common.cpu_threads(args.threads):
            run_extract(args)

    return _guarded(run, args.out, "extract")


# -- measure --------------------------------------------------------------------------------
def _measure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prh-lightning measure", epilog=platonic_measure.OUTPUT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Best-layer-pair alignment of every language x vision model pair, "
                                            "calibrated against a permutation null, optionally as a function of n.")
    p.add_argument("--out", required=True, type=Path, help="results folder of extract")
    p.add_argument("--dataset", default=None, help="dataset slug under <out>/features (default: the only one there)")
    p.add_argument("--pool-language", choices=LANGUAGE_POOLS, default="avg")
    p.add_argument("--pool-vision", choices=VISION_POOLS, default="none")
    add_measure_args(p)
    return p


def measure_main(argv: list[str] | None = None) -> int:
    """``prh-lightning measure``: see ``--help``."""
    a = _measure_parser().parse_args(argv)
    options = MeasureOptions.from_args(a)
    return _guarded(lambda: run_measure(a.out, a.dataset, a.pool_language, a.pool_vision, options), a.out, "measure")


# -- the recipe -------------------------------------------------------------------------------
def _recipe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prh-lightning platonic", description="Extract + measure + shuffled control + figures + report.")
    _add_extract_args(p)
    add_measure_args(p, control_flag=False)
    p.add_argument("--quick", action="store_true", help=f"first {QUICK_SAMPLES} pairs (unless --n), about 3 minutes on a 2-core CPU")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python recipes/platonic.py --out DIR [--quick]``: extract, measure, control, figures, report."""
    args = _recipe_parser().parse_args(argv)
    if args.quick and args.n is None:
        args.n = QUICK_SAMPLES

    options = MeasureOptions.from_args(args, shuffle_control=True)

    def run() -> dict:
        start = time.perf_counter()
        options.check()
        if args.n is not None:  # refuse --sizes / --k beyond --n before loading anything
            options.check_n(args.n, where=f"--n {args.n}")
        with common.cpu_threads(args.threads):
            extract = run_extract(args, check_n=lambda n: options.check_n(n, where="in the data"))
        result = run_measure(args.out, extract["dataset"], args.pool_language, args.pool_vision, options)
        figures = platonic_report.figures(result, args.out / "figures")
        seconds = time.perf_counter() - start
        summary = {
            "dataset": result["dataset"], "n": result["n"], "metric": result["metric"], "k": result["k"],
            "language_models": result["language"], "vision_models": result["vision"],
            "data": extract["data"], "score_matrix": result["scores"], "best_layer_pairs": result["indices"],
            "best_layer_names": result["best_layer_names"], "layers": result["layers"],
            "shuffled_control": result["shuffled"], "calibrated": result.get("calibrated"),
            "alignment_curve": result.get("curve"),
            "bits_per_byte": result["bits_per_byte"],
            "num_params": result["num_params"], "unavailable_models": extract["unavailable"],
            "extract_seconds": extract["seconds"], "seconds": round(seconds, 1), "figures": figures,
            "alignment_files": result["files"],
        }
        write_json(args.out / "summary.json", summary)
        platonic_report.write_report(result, extract, seconds, args.out)
        print(f"summary: {args.out / 'summary.json'}  ({seconds:.0f} s)")
        return summary

    return _guarded(run, args.out)


def _guarded(fn, out: Path, prog: str = "platonic") -> int:
    """Check ``out`` is writable, then run ``fn``; bad input (unknown model, missing data, mismatched
    files) -> one line on stderr, status 2; a full disk -> a message, status 1."""
    import argparse as _argparse

    errors = (PairedDataError, ValueError, FileNotFoundError)
    return common.run_cli(prog, lambda _: fn() or {}, _argparse.Namespace(out=out), lambda _: "", errors)


if __name__ == "__main__":
    sys.exit(main())
