"""Figures and ``report.md`` of the ``training-dynamics`` recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prh_lightning.analysis.calibrated import above_chance_phrase
from prh_lightning.analysis.claims import RULE, holm
from prh_lightning.reporting import Report, markdown_table

COMPARED_LAYER = "avgpool"


def _axes(title: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 3.9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def between_figure(between: dict, chance: float, calibrated: dict | None = None):
    """Per-pair and mean between-run curves, the chance level and (with ``calibrated``) the
    permutation null's 95% quantile tau (mean over pairs): 'above chance' means above tau."""
    fig, ax = _axes("Alignment between runs along training (compared layer)", "mutual k-NN")
    steps = between["steps"]
    for name, values in between["per_pair"].items():
        ax.plot(steps, values, linewidth=0.9, alpha=0.7, label=name)
    ax.fill_between(steps, between["ci_low"], between["ci_high"], color="C3", alpha=0.25, label="mean, bootstrap 95% CI")
    ax.plot(steps, between["mean"], color="C3", linewidth=2)
    ax.axhline(chance, color="grey", linestyle=":", label="chance k/(n-1)")
    if calibrated is not None:
        tau = np.mean([d["tau"] for d in calibrated["compared"].values()], axis=0)
        ax.plot(calibrated["steps"], tau, color="grey", linestyle="--", label="null 95% quantile (tau)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def drift_figure(drifts: dict):
    fig, ax = _axes("Within-run drift (compared layer)", "mutual k-NN")
    for i, (name, d) in enumerate(drifts.items()):
        ax.plot(d["steps"], d["vs_final"], color=f"C{i}", label=f"{name}: vs final")
        ax.plot(d["steps"][1:], d["vs_previous"][1:], color=f"C{i}", linestyle="--", label=f"{name}: vs previous")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def calibrated_reading(calibrated: dict, position: int) -> tuple[str, float, int]:
    """At step position ``position``: the reading of each pair (compared layer; Holm over the pairs),
    the mean calibrated score over pairs, and how many pairs are above chance."""
    pairs = calibrated["compared"]
    p = holm([d["p_value"][position] for d in pairs.values()])
    cal = [d["calibrated"][position] for d in pairs.values()]
    above = sum(q < 0.05 and c > 0 for q, c in zip(p, cal))
    phrases = [f"{name}: " + above_chance_phrase(d["raw"][position], d["calibrated"][position], float(q), "mutual k-NN",
                                                 p_label="Holm p") for (name, d), q in zip(pairs.items(), p)]
    return "; ".join(phrases), float(np.mean(cal)), above


def write_report(out: Path, between: dict, drifts: dict, change: dict, runs: list[str], args, seconds: float,
                 calibrated: dict) -> None:
    c = change
    n_pairs, last = len(calibrated["compared"]), len(calibrated["steps"]) - 1
    (first_text, first_mean, first_above), (last_text, last_mean, last_above) = (
        calibrated_reading(calibrated, i) for i in (0, last))
    cal_text = (f"Calibrated against {calibrated['n_permutations']} shufflings of the probe (the second run's rows reordered; "
                f"0 = not beyond the null's 95% quantile, 1 = identical neighbourhoods): at step {calibrated['steps'][0]} "
                f"the calibrated score of the compared layer averages {first_mean:.2f} over the {n_pairs} pairs and "
                f"{first_above} of {n_pairs} pairs are above chance (Holm over the pairs); at step {calibrated['steps'][-1]} "
                f"it averages {last_mean:.2f} and {last_above} of {n_pairs} are above chance. ")
    if n_pairs <= 6:
        cal_text += f"Step {calibrated['steps'][0]}: {first_text}. Step {calibrated['steps'][-1]}: {last_text}. "
    text = cal_text + (f"Between-run alignment is {c['first']:.3f} (95% CI {c['first_ci'][0]:.3f}-{c['first_ci'][1]:.3f}) at step "
            f"{c['first_step']} and {c['last']:.3f} ({c['last_ci'][0]:.3f}-{c['last_ci'][1]:.3f}) at step {c['last_step']}; "
            f"chance k/(n-1) = {c['chance']:.3f}. End minus start: {c['difference']:.3f}, "
            f"{100 * c['confidence']:.1f}% paired bootstrap interval [{c['difference_ci'][0]:.3f}, {c['difference_ci'][1]:.3f}].")
    best = np.mean(list(between["best_layer_pair"].values()), axis=0)
    best_cal = np.mean([d["calibrated"] for d in calibrated["best_layer_pair"].values()], axis=0)
    text += (f" At the best layer pair the raw mean is {best[0]:.3f} at the start and {best[-1]:.3f} at the end; calibrated "
             f"against the best pair of each shuffled matrix, {best_cal[0]:.2f} and {best_cal[-1]:.2f} (no interval). The "
             "change claims below compare raw scores at one layer pair: with the same probe size and k at every step the "
             "chance level is the same (k/(n-1)), so a change in the raw score is a change above chance.")
    cal_mean = np.mean([d["calibrated"] for d in calibrated["compared"].values()], axis=0)
    p_max = np.max([d["p_value"] for d in calibrated["compared"].values()], axis=0)
    rows = [[s, float(m), float(lo), float(hi), float(cm), float(pm)] for s, m, lo, hi, cm, pm in
            zip(between["steps"], between["mean"], between["ci_low"], between["ci_high"], cal_mean, p_max)]
    source = (f"Hugging Face models {args.hf_models} at revisions {args.revisions}, on {args.texts} Flickr8k captions"
              if args.hf_models else
              f"{len(runs)} Lightning runs ({', '.join(runs)}) on Fashion-MNIST, {args.max_steps} steps of batch "
              f"{args.batch_size}, probe of {args.probe_size} test images recorded every {args.every} steps and at step 0")
    report = Report(
        "Alignment between runs during training",
        f"{source}. Compared layer: `{COMPARED_LAYER}` (last layer for HF models), mean-pooled, rows "
        f"L2-normalised; mutual k-NN with k = {args.k}; {args.bootstrap} bootstrap resamples over probe "
        f"images (the same resamples at every step). Run time {seconds:.0f} s.",
    )
    report.section("Between runs", text, figure="figures/between_runs.png",
                   table=markdown_table(["step", "mean over pairs", "CI low", "CI high", "calibrated mean", "largest pair p"], rows))
    final_prev = {n: d["vs_previous"][-1] for n, d in drifts.items()}
    report.section(
        "Within-run drift",
        "Each checkpoint against the run's final one (solid) and its previous one (dashed). Last-interval "
        "self-similarity: " + ", ".join(f"{n}: {v:.3f}" for n, v in final_prev.items()) + " (descriptive, no test).",
        figure="figures/drift.png",
    )
    report.section(
        "Claims",
        f"{RULE} Two claims are judged on the end-minus-start interval ({100 * c['confidence']:.1f}%, Bonferroni over 2).\n\n"
        f"- the runs grow more alike with training -> **{c['more_alike_at_end']}**\n"
        f"- the runs grow less alike with training -> **{c['less_alike_at_end']}**\n\n"
        "Against the seed: it tracked six LLMs over 100 checkpoints but reported no result, only the aim of finding "
        "phases of rising or falling similarity, so its claim **cannot be checked** (cannot tell). Pythia revisions "
        "run through the same code with --hf-models/--revisions when online.",
    )
    report.write(out / "report.md")
