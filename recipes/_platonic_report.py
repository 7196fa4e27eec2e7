"""Figures and ``report.md`` of the ``platonic`` recipe.

A plot of alignment against a model property (LM bits per byte, vision model size) is drawn
only with at least :data:`MIN_POINTS` models on its x axis; with fewer, the numbers are shown as
a table and the report says that no trend can be read from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prh_lightning.analysis.claims import verdict_from_p

MIN_POINTS = 3
RULE_P = ("A model pair's alignment is **above chance** (holds) when its p-value, Holm-adjusted over all model "
          "pairs, is below 0.05; otherwise we **cannot tell**.")


def figures(result: dict, fig_dir: Path) -> dict[str, str]:
    """The score heatmap, and the trend plots that have enough points; returns name -> path."""
    from prh_lightning.plotting import heatmap_figure, line_figure
    from prh_lightning.reporting import save_figure

    scores, lang, vis = np.asarray(result["scores"]), result["language"], result["vision"]
    files = {}
    fig = heatmap_figure(scores, lang, vis, title=f"{result['metric']} (best layer pair)", xlabel="vision", ylabel="language")
    files["scores"] = str(save_figure(fig, fig_dir / "scores.png"))
    bpb = result["bits_per_byte"]
    causal = [i for i, name in enumerate(lang) if bpb.get(name) is not None]
    if len(causal) >= MIN_POINTS:
        series = {v: ([bpb[lang[i]] for i in causal], [float(scores[i, j]) for i in causal]) for j, v in enumerate(vis)}
        fig = line_figure(series, title="alignment vs LM bits per byte (causal LMs)", xlabel="bits per byte on the captions",
                          ylabel=result["metric"])
        files["vs_bits_per_byte"] = str(save_figure(fig, fig_dir / "alignment_vs_bits_per_byte.png"))
    if len(vis) >= MIN_POINTS:
        order = sorted(range(len(vis)), key=lambda j: result["num_params"][vis[j]] or 0)
        size = [(result["num_params"][vis[j]] or 0) / 1e6 for j in order]
        fig = line_figure({name: (size, [float(scores[i, j]) for j in order]) for i, name in enumerate(lang)},
                          title="alignment vs vision model size", xlabel="vision parameters (millions)", ylabel=result["metric"])
        files["vs_vision_size"] = str(save_figure(fig, fig_dir / "alignment_vs_vision_size.png"))
    return files


def best_pair_table(result: dict) -> str:
    """Markdown table naming the best layer pair of every model pair."""
    from prh_lightning.reporting import markdown_table

    rows = []
    for i, lm in enumerate(result["language"]):
        for j, vm in enumerate(result["vision"]):
            layer_l, layer_v = result["best_layer_names"][f"{lm} / {vm}"]
            rows.append([lm, vm, float(result["scores"][i][j]), layer_l, layer_v])
    return markdown_table(["language", "vision", "score", "language layer", "vision layer"], rows)


def calibrated_table(result: dict) -> str:
    from prh_lightning.reporting import markdown_table

    cal, rows = result["calibrated"], []
    for i, lm in enumerate(result["language"]):
        for j, vm in enumerate(result["vision"]):
            rows.append([lm, vm, float(cal["raw"][i][j]), float(cal["null_mean"][i][j]), float(cal["calibrated"][i][j]),
                         float(cal["p_value"][i][j]), float(cal["p_holm"][i][j]),
                         verdict_from_p(float(cal["p_holm"][i][j]))])
    return markdown_table(["language", "vision", "raw", "chance (null mean)", "calibrated", "p", "Holm p",
                           "above chance"], rows)


def calibrated_text(result: dict) -> str:
    cal = result["calibrated"]
    return (f"Each best-layer-pair score next to its permutation null ({cal['n_permutations']} shuffles of the pairing; "
            "on every shuffle the best over all layer pairs is taken again, so the null carries the same selection). "
            "Calibrated = (raw - tau) / (max - tau), tau the null's 95% quantile. " + RULE_P)


def curve_section(result: dict) -> tuple[str, str]:
    """Text and table of the ``--sizes`` alignment curve (best layer pair at each n)."""
    from prh_lightning.reporting import markdown_table

    curve = result["curve"]
    rows = []
    for pair in curve["pairs"]:
        for s, n in enumerate(curve["sizes"]):
            chance = None if pair["chance"] is None else pair["chance"][s]
            rows.append([pair["language"], pair["vision"], n, pair["mean"][s], f"[{pair['low'][s]:.3f}, {pair['high'][s]:.3f}]",
                         "-" if chance is None else chance])
    low, high = (1 - curve["level"]) / 2, (1 + curve["level"]) / 2
    text = (f"The best-layer-pair score on nested random subsets of n = {', '.join(map(str, curve['sizes']))} pairs "
            f"({curve['repeats']} random subsets per size, seed {curve['seed']}; the same subsets for every model pair). "
            f"Interval: the {low:.0%} and {high:.0%} quantiles over the subsets (the spread over evaluation sets of "
            "that size drawn from these pairs, zero at all pairs); chance: the mean best-layer-pair score with the "
            "pairing permuted at that size. A raw score is comparable only at the same n (mutual k-NN's chance level "
            "is k/(n-1)); read the gap to chance, not the raw level.")
    table = markdown_table(["language", "vision", "n", "mean", "interval", "chance"], rows)
    return text, table


def write_report(result: dict, extract: dict, seconds: float, out: Path) -> None:
    from prh_lightning.reporting import Report, markdown_table

    lang, vis, scores = result["language"], result["vision"], np.asarray(result["scores"])
    k = "" if result["k"] is None else f" (k={result['k']})"
    data = extract["data"]
    report = Report("Vision-language alignment (Platonic Representation Hypothesis)",
                    f"{result['n']} image-caption pairs of `{result['dataset']}` (from {data['path']}, SHA-256 "
                    f"{data['sha256'][:12]}...); metric {result['metric']}{k}, best layer pair per model pair; "
                    f"{seconds:.0f} s end to end.")
    rows = [[name] + [float(s) for s in scores[i]] for i, name in enumerate(lang)]
    report.section("Score matrix", "Rows: language models; columns: vision models.", figure="figures/scores.png",
                   table=markdown_table(["language \\ vision"] + vis, rows))
    report.section("Best layer pairs", "The layer pair that gives each score (the maximum over all layer pairs).",
                   table=best_pair_table(result))
    if result.get("calibrated"):
        report.section("Calibrated scores", calibrated_text(result), table=calibrated_table(result))
    if result.get("curve"):
        text, table = curve_section(result)
        curve_png = Path(result["files"]["curve_png"])
        report.section("Alignment as a function of n", text, table=table,
                       figure=curve_png.relative_to(out).as_posix() if curve_png.is_relative_to(out) else str(curve_png))
    if "shuffled" in result:
        sh = result["shuffled"]
        chance = "" if sh["chance"] is None else f"; chance for mutual k-NN is k/(n-1) = {sh['chance']:.4f}"
        report.section("Shuffled control", f"With the captions permuted once (seed {sh['seed']}) the mean best-pair score "
                       f"is {sh['mean']:.4f} against {scores.mean():.4f} with the true pairing (a maximum over many layer "
                       f"pairs, so above chance even without any pairing); averaged over all layer pairs it is "
                       f"{sh['layer_pair_mean']:.4f}{chance}. One shuffle is a sanity check, not a test: no claim is drawn from it.")
    bpb = {name: v for name, v in result["bits_per_byte"].items() if v is not None}
    if bpb:
        table = markdown_table(["language model", "bits per byte"] + vis,
                               [[name, v] + [float(scores[lang.index(name), j]) for j in range(len(vis))] for name, v in bpb.items()])
        shown = len(bpb) >= MIN_POINTS
        report.section("Alignment vs language-model quality",
                       f"{len(bpb)} causal LM(s) have a bits-per-byte value (text encoders have no LM loss). "
                       + ("" if shown else f"With fewer than {MIN_POINTS} models no trend can be read, so no plot is drawn."),
                       table=table, figure="figures/alignment_vs_bits_per_byte.png" if shown else None)
    size_text = "Parameters: " + ", ".join(f"{v}: {(result['num_params'][v] or 0) / 1e6:.1f}M" for v in vis) + "."
    if len(vis) >= MIN_POINTS:
        report.section("Alignment vs vision model size", size_text + " No trend is tested: the points are shown as they are.",
                       figure="figures/alignment_vs_vision_size.png")
    else:
        report.section("Alignment vs vision model size", size_text + f" Fewer than {MIN_POINTS} vision models: no plot.")
    if extract["unavailable"]:
        report.section("Models skipped", "\n".join(f"- {k}: {' '.join(v.split())[:300]}" for k, v in extract["unavailable"].items()))
    report.write(out / "report.md")
