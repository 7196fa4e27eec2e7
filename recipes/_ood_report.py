"""Claims, figures and ``report.md`` of the ``ood`` recipe."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from prh_lightning.analysis.calibrated import calibrated_model_pairs
from prh_lightning.analysis.claims import RULE, corrected_confidence, holm, verdict

SET_ROLES = ("in-distribution", "ood", "noise")
GRANULARITIES = ("models", "layers", "layers_pretrained")
AGREE = "metric_agreement_layers_pretrained"


def claim_list(metrics: list[str]) -> list[dict]:
    """Every claim the report judges: ``{id, text, statistic, index, direction}``."""
    claims = [
        {"id": "ood_agreement_positive", "text": "metrics agree on OOD images (agreement among pretrained layer pairs > 0)",
         "statistic": f"ood/{AGREE}", "index": None, "direction": "greater"},
        {"id": "ood_agreement_lower", "text": "metrics agree less on OOD than on in-distribution images",
         "statistic": f"in-distribution_minus_ood/{AGREE}", "index": None, "direction": "greater"},
        {"id": "noise_agreement_lower", "text": "metrics agree less on noise than on in-distribution images (seed claim 2)",
         "statistic": f"in-distribution_minus_noise/{AGREE}", "index": None, "direction": "greater"},
    ]
    for i, m in enumerate(metrics):
        claims.append({"id": f"noise_lower/{m}", "text": f"{m}: pretrained pairs align less on noise than on in-distribution",
                       "statistic": "in-distribution_minus_noise/pretrained_mean", "index": i, "direction": "greater"})
        claims.append({"id": f"ood_lower/{m}", "text": f"{m}: pretrained pairs align less on OOD than on in-distribution",
                       "statistic": "in-distribution_minus_ood/pretrained_mean", "index": i, "direction": "greater"})
    return claims


def judge_claims(point: dict, replicates: dict, metrics: list[str],
                 interval_at: Callable[[float], tuple[dict, dict]]) -> list[dict]:
    """Each claim of :func:`claim_list` with its value, Bonferroni-corrected interval and verdict."""
    claims = claim_list(metrics)
    confidence = corrected_confidence(0.95, len(claims))
    low, high = interval_at(confidence)
    out = []
    for c in claims:
        pick = (lambda d: np.asarray(d[c["statistic"]]).ravel()[c["index"]]) if c["index"] is not None else \
            (lambda d: np.asarray(d[c["statistic"]]).ravel()[0])
        value, lo, hi = float(pick(point)), float(pick(low)), float(pick(high))
        out.append({**c, "value": value, "low": lo, "high": hi, "confidence": confidence,
                    "verdict": verdict(lo, hi, c["direction"])})
    return out


# -- calibration ----------------------------------------------------------------------------------
def calibrated_scores(feats: dict[str, list[dict]], metrics: list[str], permutations, pretrained: list[bool],
                      options: Callable[[str], dict]) -> dict[str, dict[str, dict]]:
    """``{role: {metric: fields}}``: each model pair's best layer pair calibrated
    (:func:`prh_lightning.analysis.calibrated_model_pairs`: lists over pairs of ``raw``,
    ``null_mean``, ``tau``, ``p_value``, ``calibrated``), plus ``p_holm`` (Holm over the
    pretrained pairs), ``pretrained_mean`` (their mean calibrated score) and ``above_chance``
    (how many have Holm p < 0.05 and a calibrated score > 0). ``options(metric)``: its kwargs."""
    pre = np.array([pretrained[i] and pretrained[j] for i, j in itertools.combinations(range(len(pretrained)), 2)])
    out = {}
    for role, models in feats.items():
        out[role] = {}
        for m in metrics:
            cols = calibrated_model_pairs(models, m, permutations, normalize=True, **options(m))
            q = np.full(len(pre), np.nan)
            q[pre] = holm(np.nan_to_num(np.array(cols["p_value"])[pre], nan=1.0))
            cal = np.array(cols["calibrated"])
            out[role][m] = {**cols, "p_holm": q, "pretrained_mean": float(np.mean(cal[pre])),
                            "above_chance": int(np.sum((q < 0.05) & (cal > 0))), "pretrained_pairs": int(pre.sum())}
    return out


# -- figures --------------------------------------------------------------------------------------
def alignment_by_set_figure(point, low, high, metrics: list[str]):
    """Mean pretrained-pair alignment per metric relative to in-distribution, one marker per set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(metrics))
    ref = np.abs(point["in-distribution/pretrained_mean"])  # metrics have different scales
    for s, role in enumerate(SET_ROLES):
        key = f"{role}/pretrained_mean"
        y = point[key] / ref
        err = np.stack([y - low[key] / ref, high[key] / ref - y]).clip(min=0)
        ax.errorbar(x + (s - 1) * 0.22, y, yerr=err, fmt="o", capsize=3, label=role)
    ax.set_xticks(x, metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean score of pretrained pairs\n/ in-distribution score")
    ax.set_title("Alignment of pretrained pairs by input set (95% jackknife CI, uncorrected)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def save_figures(out: Path, point, low, high, metrics, names, set_names, calibrated: dict | None = None) -> list[str]:
    """All figures; returns their paths relative to ``out``. With ``calibrated``, each model x
    model heatmap of the first metric gets its calibrated twin (``..._calibrated.png``, 0-1)."""
    from prh_lightning.plotting import heatmap_figure
    from prh_lightning.reporting import save_figure

    paths = []
    for role in SET_ROLES:
        for g in ("models", "layers_pretrained"):
            rel = f"figures/metric_corr_{role}_{g}.png"
            title = f"Spearman between metrics ({g.replace('_', ', ')}), {role}: {set_names[role]}"
            save_figure(heatmap_figure(point[f"{role}/metric_corr_{g}"], metrics, metrics, title=title, vmin=-1, vmax=1), out / rel)
            paths.append(rel)
        matrix = np.full((len(names), len(names)), np.nan)
        for p, (i, j) in enumerate(itertools.combinations(range(len(names)), 2)):
            matrix[i, j] = matrix[j, i] = point[f"{role}/model_scores"][0, p]
        rel = f"figures/scores_{role}_{metrics[0]}.png"
        save_figure(heatmap_figure(matrix, names, names, title=f"{metrics[0]} (best layer pair), {role}"), out / rel)
        paths.append(rel)
        if calibrated is not None:
            cal = np.full((len(names), len(names)), np.nan)
            for p, (i, j) in enumerate(itertools.combinations(range(len(names)), 2)):
                cal[i, j] = cal[j, i] = calibrated[role][metrics[0]]["calibrated"][p]
            rel = f"figures/scores_{role}_{metrics[0]}_calibrated.png"
            save_figure(heatmap_figure(cal, names, names, title=f"calibrated {metrics[0]} (best layer pair), {role}",
                                       vmin=0.0, vmax=1.0), out / rel)
            paths.append(rel)
    rel = "figures/alignment_by_set.png"
    save_figure(alignment_by_set_figure(point, low, high, metrics), out / rel)
    return paths + [rel]


# -- report ---------------------------------------------------------------------------------------
def _ci(point, low, high, key: str, i=None) -> str:
    v, lo, hi = (np.asarray(d[key]) if i is None else np.asarray(d[key])[i] for d in (point, low, high))
    return f"{float(v):.3f} [{float(lo):.3f}, {float(hi):.3f}]"


def _claim_line(c: dict) -> str:
    return f"{c['text']}: {c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}] -> **{c['verdict']}**"


def surprises(point, claims: list[dict], metrics: list[str]) -> str:
    """Where OOD images align *more* than in-distribution ones (point estimate), said plainly."""
    diff = np.asarray(point["in-distribution_minus_ood/pretrained_mean"])
    above = [m for i, m in enumerate(metrics) if diff[i] < 0]
    if not above:
        return "Every metric scores the pretrained pairs lower on OOD than on in-distribution images (point estimates)."
    firm = [c["id"].split("/")[1] for c in claims if c["id"].startswith("ood_lower/") and c["verdict"] == "does not hold"]
    return (f"**Unexpected: for {len(above)} of {len(metrics)} metrics ({', '.join(above)}) the pretrained pairs align "
            f"more on the OOD set than on the in-distribution set** (point estimates). With corrected intervals this "
            f"reversal is firm for: {', '.join(firm) or 'none (the intervals cover 0)'}. One possible reading, not tested here: the OOD images are "
            "simpler (few objects on a plain background), so every model sorts them by the same few factors.")


def calibrated_section(calibrated: dict, metrics: list[str], names: list[str], set_names: dict, k_perm: int) -> tuple[str, str, str]:
    """``(text, table, central)``: the calibrated reading of every set (pretrained pairs above
    chance, Holm over the pretrained pairs of each metric and set), its table, and the central
    claim read from the calibrated scores."""
    from prh_lightning.analysis.calibrated import above_chance_phrase
    from prh_lightning.reporting import markdown_table

    pairs = [f"{names[i]} vs {names[j]}" for i, j in itertools.combinations(range(len(names)), 2)]
    rows = [[m] + [f"{calibrated[r][m]['pretrained_mean']:.2f} ({calibrated[r][m]['above_chance']}/"
                   f"{calibrated[r][m]['pretrained_pairs']}; chance {np.nanmean(calibrated[r][m]['null_mean']):.3f})"
                   for r in SET_ROLES] for m in metrics]
    first = metrics[0]
    lines = []
    for r in SET_ROLES:
        c = calibrated[r][first]
        said = [f"{pairs[p]}: " + above_chance_phrase(c["raw"][p], c["calibrated"][p], c["p_holm"][p], first, p_label="Holm p")
                for p in range(len(pairs)) if np.isfinite(c["p_holm"][p]) and np.isfinite(c["raw"][p])]
        lines.append(f"- {r} ({set_names[r]}): " + "; ".join(said))
    everywhere = {r: sum(calibrated[r][m]["above_chance"] == calibrated[r][m]["pretrained_pairs"] for m in metrics) for r in SET_ROLES}
    text = (f"Each model pair's best layer pair, calibrated against {k_perm} shufflings of the images (the second model's "
            "rows reordered in every layer; the null is the best pair of each shuffled matrix): 0 = not beyond the null's "
            "95% quantile, 1 = the metric's maximum. Table: mean calibrated score of the pretrained pairs (pairs above "
            "chance, Holm over the pretrained pairs of each metric and set, / pretrained pairs; mean chance level = null "
            f"mean of the raw score). Every pretrained pair is above chance for {everywhere['in-distribution']} of "
            f"{len(metrics)} metrics on in-distribution images, {everywhere['ood']} on OOD images and {everywhere['noise']} "
            f"on noise. {first}, pretrained pairs:\n\n" + "\n".join(lines) + "\n\n"
            + " ".join(f"![{first}, {r}: raw](figures/scores_{r}_{first}.png) ![{first}, {r}: calibrated]"
                       f"(figures/scores_{r}_{first}_calibrated.png)" for r in SET_ROLES))
    lower = [m for m in metrics if calibrated["noise"][m]["pretrained_mean"] < calibrated["in-distribution"][m]["pretrained_mean"]]
    central = (f"Read from the calibrated scores (no interval): the pretrained pairs' mean calibrated score is lower on "
               f"noise than on in-distribution images for {len(lower)} of {len(metrics)} metrics"
               f"{' (' + ', '.join(lower) + ')' if lower else ''}, and on noise every pretrained pair stays above chance for "
               f"{everywhere['noise']} of {len(metrics)} metrics.")
    header = ["metric"] + [f"calibrated, {r}" for r in SET_ROLES]
    return text, markdown_table(header, rows), central


def write_report(out: Path, point, low, high, claims, metrics, names, set_names, args, seconds: float,
                 undefined: list[str] = (), calibrated: dict | None = None) -> None:
    from prh_lightning.reporting import Report, markdown_table

    rows = [[f"{role} ({set_names[role]})"] + [_ci(point, low, high, f"{role}/metric_agreement_{g}") for g in GRANULARITIES]
            for role in SET_ROLES]
    align_rows = [[m] + [_ci(point, low, high, f"{role}/pretrained_mean", i) for role in SET_ROLES]
                  + [_ci(point, low, high, "noise/control_mean", i)] for i, m in enumerate(metrics)]
    conf = claims[0]["confidence"]
    rep = Report(
        "Alignment on in-distribution, out-of-distribution and noise images",
        f"Models: {', '.join(names)} (EfficientNet-Lite; '-random' = random initialisation, a control). "
        f"Sets: in-distribution = {set_names['in-distribution']}, OOD = {set_names['ood']}, noise = "
        f"{set_names['noise']}; {args.n_images} images each at {args.image_size} px; taps: {args.blocks} blocks + pooled head, "
        f"mean-pooled, rows L2-normalised; k = {args.k}. Tables: 95% delete-a-group jackknife intervals over images "
        f"({args.jackknife_groups} groups; a normal approximation, clamped to each statistic's range), not corrected for "
        f"multiple comparisons. Run time {seconds:.0f} s.",
    )
    rep.section(
        "How the correlations are computed",
        "For each metric, every model pair gets a score (the best of its layer pairs). The seed's figure is the Spearman "
        "correlation between two metrics' score vectors over pairs, averaged here over metric pairs as *metric agreement*. "
        f"With {len(names)} models there are only {len(names) * (len(names) - 1) // 2} model pairs, and most of the spread "
        "is pretrained-vs-random; so we also correlate over every cross-model layer pair, and over those of the pretrained "
        "models only, the column that tests agreement among trained models.",
        table=markdown_table(["set", "models", "layers", "layers, pretrained only"], rows),
        figure="figures/metric_corr_in-distribution_layers_pretrained.png",
    )
    cal_text, cal_table, central = calibrated_section(calibrated, metrics, names, set_names, args.permutations)
    rep.section("Alignment above chance (calibrated)", cal_text, table=cal_table)
    rep.section("Alignment level by input set",
                f"Raw mean score of the pretrained model pairs (best layer pair) per metric; chance levels differ by metric "
                f"and set (see the calibrated section; for mutual k-NN about k/(n-1) = {args.k / (args.n_images - 1):.3f}). "
                + surprises(point, claims, metrics),
                table=markdown_table(["metric"] + [f"pretrained, {r}" for r in SET_ROLES] + ["random controls, noise"], align_rows),
                figure="figures/alignment_by_set.png")
    cross = [[m, _ci(point, low, high, "in-distribution_vs_ood/rank_corr", i), _ci(point, low, high, "in-distribution_vs_noise/rank_corr", i)]
             for i, m in enumerate(metrics)]
    rep.section("Do the same pairs align on every set?", "Spearman correlation of the model-pair scores between sets, per metric.",
                table=markdown_table(["metric", "in-dist vs OOD", "in-dist vs noise"], cross))
    by_id = {c["id"]: c for c in claims}
    lower = by_id["ood_agreement_lower"]["verdict"]
    seed1 = {"holds": "does not hold", "does not hold": "holds", "cannot tell": "cannot tell"}[lower]
    if by_id["ood_agreement_positive"]["verdict"] != "holds" and seed1 == "holds":
        seed1 = "cannot tell"
    rep.section(
        "Claims",
        f"{RULE} {len(claims)} comparisons are made, so each interval below has {100 * conf:.2f}% confidence "
        f"(Bonferroni: 95% jointly).\n\n" + "\n".join(f"- {_claim_line(c)}" for c in claims) + "\n\n"
        f"**Seed claim 1** (metrics agree on OOD data as on in-distribution data) needs OOD agreement above 0 and not "
        f"lower than in-distribution -> **{seed1}**. **Seed claim 2** (agreement is lower on random noise) -> "
        f"**{by_id['noise_agreement_lower']['verdict']}**. **Central claim** (noise gives lower alignment than real images) "
        f"holds for {sum(c['verdict'] == 'holds' for c in claims if c['id'].startswith('noise_lower/'))} of {len(metrics)} "
        f"metrics (raw differences). {central} The seed used 17 ViTs on Places365 / ImageNet-O; we use three ImageNet EfficientNet-Lites, Flickr8k and "
        "Fashion-MNIST offline, so magnitudes are not comparable, only directions.",
    )
    if undefined:
        rep.section("Undefined scores", "These k-NN scores were refused because neighbour lists ran through identical "
                    "rows (the result would depend on the order of the images); they are NaN and left out of every mean:\n\n"
                    + "\n".join(f"- {u}" for u in undefined))
    rep.write(out / "report.md")
