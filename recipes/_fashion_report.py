"""``report.md`` of the ``fashion-mnist`` recipe: every figure with its numbers and one paragraph
of reading; every comparison it states comes with a corrected interval or test and a verdict."""

from __future__ import annotations

from typing import Any

import torch

from prh_lightning.analysis.calibrated import above_chance_phrase
from prh_lightning.analysis.claims import RULE
from prh_lightning.recipes._fashion_settings import CNN_LAYERS, HEATMAPS, NOTES, RESNET_LAYERS, Settings


def _cell(matrix: torch.Tensor, flat: int) -> tuple[str, str, float]:
    i, j = divmod(flat, matrix.shape[1])
    return CNN_LAYERS[i], RESNET_LAYERS[j], float(matrix[i, j])


def heatmap_reading(name: str, matrix: torch.Tensor, contrast: dict[str, Any], cal: dict[str, Any],
                    best: dict[str, Any]) -> str:
    """The calibrated reading first (best cell against the best-of-layers null, cells above
    chance, calibrated early / late means), then the raw cells and the tested depth contrast."""
    title = HEATMAPS[name][2]
    calibrated, p = torch.tensor(cal["calibrated"]), torch.tensor(cal["p_value"])
    above = int(((p < 0.05) & (calibrated > 0)).sum())
    early = [RESNET_LAYERS.index(c) for c in ("conv1", "layer1", "layer2")]
    late = [RESNET_LAYERS.index(c) for c in contrast["late_layers"]]
    text = (f"Calibrated against {best['n_permutations']} shufflings of which image is which (second figure: "
            f"0 = not beyond the null's 95% quantile, 1 = the metric's maximum), the best cell, FashionCNN "
            f"{best['fashioncnn_layer']} / ResNet {best['resnet_layer']}, has "
            f"{above_chance_phrase(best['score'], best['calibrated'], best['p_value'], title)} against the best cell "
            f"of each shuffled matrix (chance level {best['null_mean']:.3f}, threshold {best['tau']:.3f}; "
            f"Holm-adjusted in the claims section). Cell by cell, {above} of {calibrated.numel()} cells are above "
            f"chance (p < 0.05 and calibrated > 0, not corrected); the mean calibrated score is "
            f"{float(calibrated[:, early].mean()):.2f} over ResNet's early layers and {float(calibrated[:, late].mean()):.2f} "
            f"over its late ones. ")
    row, col, value = _cell(matrix, int(torch.argmax(matrix)))
    lo_row, lo_col, lo_value = _cell(matrix, int(torch.argmin(matrix)))
    dropped = "" if "avgpool" in contrast["late_layers"] else " (avgpool is left out: it equals layer4, the spatial mean of the same output)"
    text += (f"Raw scores: highest cell FashionCNN {row} / ResNet {col} ({value:.3f}), lowest FashionCNN {lo_row} / "
             f"ResNet {lo_col} ({lo_value:.3f}). Averaged over FashionCNN layers, ResNet's early layers (conv1-layer2) "
             f"score {contrast['early']:.3f} raw and its late layers ({', '.join(contrast['late_layers'])}){dropped} "
             f"{contrast['late']:.3f}; early minus late = {contrast['difference']:.3f}, {100 * contrast['confidence']:.2f}% "
             f"jackknife interval [{contrast['low']:.3f}, {contrast['high']:.3f}] (Bonferroni over the {len(HEATMAPS)} "
             f"heatmaps; raw scores, so a difference in chance levels between layers counts too). "
             f"\"The two models agree more early in ResNet's depth\" -> **{contrast['verdict']}**.")
    return text


def rsa_reading(model: str, st: dict[str, dict], holm: dict[str, dict]) -> str:
    names, tmpl = st["names"], st["templates"]
    lo, hi = names["spearman_ci"]
    key = "fashioncnn" if model == "FashionCNN" else "resnet"
    v_names = holm[f"centroid RSA {key} avgpool vs MiniLM (names) above chance"]
    v_tmpl = holm[f"centroid RSA {key} avgpool vs MiniLM (templates) above chance"]
    return (f"Each point is one of the 45 pairs of classes: how far apart {model} puts the two class centroids "
            f"(avgpool, cosine) against how far apart MiniLM puts the two class names. Calibrated against the Mantel "
            f"null (class labels of one side shuffled; chance level {names['spearman_chance']:.3f}): "
            f"{above_chance_phrase(names['spearman'], names['spearman_calibrated'], v_names['p_holm'], 'Spearman RSA', p_label='Holm p')}; "
            f"with sentence templates {above_chance_phrase(tmpl['spearman'], tmpl['spearman_calibrated'], v_tmpl['p_holm'], 'Spearman RSA', p_label='Holm p')}. "
            f"Spearman RSA is {names['spearman']:.3f} (95% bootstrap interval over images {lo:.3f} to {hi:.3f}, which covers only the "
            f"choice of images, not the small number of classes; the seed reported 0.347 for FashionCNN), Pearson "
            f"{names['pearson']:.3f}. Mantel test (class labels of one side shuffled): p = {names['spearman_p']:.3g}, "
            f"Holm-adjusted {v_names['p_holm']:.3g} -> above chance **{v_names['verdict']}**. With sentence templates "
            f"instead of bare words (the seed's limitation 3) Spearman is {tmpl['spearman']:.3f} (p = {tmpl['spearman_p']:.3g}, "
            f"Holm {v_tmpl['p_holm']:.3g} -> **{v_tmpl['verdict']}**). The table gives every layer's scores; differences "
            "between layers are not tested.")


def monitor_reading(s: Settings, history: dict[str, list[tuple[int, float]]]) -> str:
    def change(tag: str) -> str:
        points = history.get(tag, [])
        return f"{points[0][1]:.3f} at the first check and {points[-1][1]:.3f} at the last" if points else "n/a"

    return (f"The AlignmentMonitor checked FashionCNN every {s.monitor_every} steps and at each validation on a probe "
            f"of {s.probe_size} test images (not used for training): CKA and mutual k-NN between each FashionCNN layer "
            "and MiniLM (the embedding of each probe image's class name) and each ResNet-18 layer. avgpool's CKA with "
            f"MiniLM was {change('alignment/cka/minilm/avgpool')}; with ResNet {change('alignment/cka/resnet/avgpool')}. "
            f"Calibrated against the monitor's shufflings of the probe (`.../calibrated`, `.../chance`), the best "
            f"FashionCNN layer's CKA with ResNet was {change('alignment/cka/resnet/calibrated')}, its chance level "
            f"{change('alignment/cka/resnet/chance')}; with MiniLM {change('alignment/cka/minilm/calibrated')} "
            "(one probe, no interval: a description, not a claim). All scalars (`alignment/<metric>/<reference>/<layer>`) "
            f"and heatmap images are in TensorBoard: `{_tensorboard_command(s.out / 'tensorboard')}`.")


def layer_rsa_table(study: dict[str, dict[str, dict]], layers: list[str]) -> str:
    from prh_lightning.reporting import markdown_table

    rows = [[layer, study["names"][layer]["spearman"], study["names"][layer]["spearman_calibrated"],
             study["names"][layer]["spearman_p"], study["names"][layer]["pearson"], study["templates"][layer]["spearman"],
             study["templates"][layer]["spearman_calibrated"], study["templates"][layer]["spearman_p"]] for layer in layers]
    return markdown_table(["layer", "Spearman (names)", "calibrated", "p", "Pearson (names)", "Spearman (templates)",
                           "calibrated", "p"], rows)


def write_report(s: Settings, summary: dict[str, Any], matrices: dict[str, torch.Tensor],
                 studies: dict[str, dict], tests: dict[str, dict]) -> None:
    """``report.md``: every figure with its numbers and one paragraph of reading; ``tests``: the
    calibrated best cell of each heatmap."""
    from prh_lightning.reporting import Report, markdown_table

    acc, rn, data = summary["test_accuracy"], summary["resnet"], summary["data"]
    contrasts, claims = summary["depth_contrast"], summary["claims"]
    holm = {c["claim"]: c for c in claims}
    report = Report("ResNet-18 vs FashionCNN vs MiniLM on Fashion-MNIST", intro=(
        f"Settings: {'quick' if s.quick else 'full (seed)'} mode, N = {summary['n_samples']} stratified test images, "
        f"seed {s.seed}, {s.permutations} permutations per Mantel test, {s.calibration_permutations} image shufflings "
        f"calibrating the heatmaps, {s.bootstraps} bootstrap resamples, "
        f"{s.jackknife_groups} jackknife groups. Data: {data['path']} (SHA-256 of the four files {data['sha256'][:12]}...). "
        f"ResNet-18 weights: **{rn['weights']}** ({rn['training']}, input {rn['input_size']}x{rn['input_size']})"
        f"{'; ' + rn['note'] if rn['note'] else ''}. Run time {summary['runtime_s']:.0f} s on {summary['threads']} "
        f"CPU thread(s). TensorBoard: `{_tensorboard_command(s.out / 'tensorboard')}`."))
    report.section("Test accuracy", table=markdown_table(
        ["model", "test accuracy", "test images"],
        [["FashionCNN", acc["fashioncnn"], summary["test_images"]], ["ResNet-18", acc["resnet"], summary["test_images"]]]),
        text=(f"Chance is 0.100. FashionCNN (two 3x3 conv layers, global average pooling, {s.epochs} epochs on "
              f"{summary['train_images']['fashioncnn']} images) reaches {acc['fashioncnn']:.3f}; ResNet-18 "
              f"({rn['weights']}, {rn['training']}) reaches {acc['resnet']:.3f}."))
    for model in ("resnet", "fashioncnn"):
        label = "ResNet-18" if model == "resnet" else "FashionCNN"
        report.section(f"UMAP of each {label} layer", figure=summary["figures"][f"umap_{model}"], text=(
            f"Each panel is a 2-D UMAP of one tapped layer (spatially averaged) on {summary['umap_points']} of the "
            "analysis images, coloured by class. A picture to look at, not a measurement: numbers for the same layers "
            "are in the heatmaps and the centroid RSA table below."))
    for name, matrix in matrices.items():
        cal = summary["calibrated_heatmaps"][name]
        rows = [[f"{CNN_LAYERS[i]} raw"] + [float(v) for v in matrix[i]] for i in range(len(CNN_LAYERS))]
        rows += [[f"{CNN_LAYERS[i]} calibrated (p)"] + [f"{c:.2f} ({p:.2g})" for c, p in zip(cal["calibrated"][i], cal["p_value"][i])]
                 for i in range(len(CNN_LAYERS))]
        report.section(f"FashionCNN x ResNet-18: {HEATMAPS[name][2]}", figure=summary["heatmaps"][name],
                       table=markdown_table(["FashionCNN \\ ResNet"] + RESNET_LAYERS, rows),
                       text=f"![calibrated {HEATMAPS[name][2]}]({summary['calibrated_heatmap_figures'][name]})\n\n"
                       + heatmap_reading(name, matrix, contrasts[name], cal, tests[name]) + NOTES.get(name, ""))
    for model, label in (("fashioncnn", "FashionCNN"), ("resnet", "ResNet-18")):
        layers = CNN_LAYERS if model == "fashioncnn" else RESNET_LAYERS
        report.section(f"RSA: {label} class centroids vs MiniLM label embeddings", figure=summary["figures"][f"rsa_{model}"],
                       table=layer_rsa_table(studies[model], layers),
                       text=rsa_reading(label, {k: v["avgpool"] for k, v in studies[model].items()}, holm))
    report.section("Alignment while FashionCNN trains", figure=summary["figures"]["monitor"],
                   text=monitor_reading(s, summary["monitor_history"]))
    lines = [f"- {c['claim']}: p = {c['p']:.3g}, Holm-adjusted {c['p_holm']:.3g} -> **{c['verdict']}**" for c in claims]
    lines += [f"- {HEATMAPS[n][2]}: early minus late {c['difference']:.3f} [{c['low']:.3f}, {c['high']:.3f}] -> "
              f"**{c['verdict']}**" for n, c in contrasts.items()]
    report.section("Claims", f"{RULE} Intervals: delete-a-group jackknife, Bonferroni over the {len(contrasts)} depth "
                   f"contrasts; p-values: Holm over the {len(claims)} tests, a claim holds when the adjusted p < 0.05. "
                   "A best cell's p-value comes from the calibration: the best cell of the observed heatmap against the "
                   "best cell of each shuffled one, so picking the best of 18 cells is accounted for.\n\n"
                   + "\n".join(lines))
    report.write(s.out / "report.md")


def results_text(s: Settings, summary: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""
    acc, best = summary["test_accuracy"], summary["best_cell_calibrated"]
    return "\n".join([
        f"FashionCNN test accuracy {acc['fashioncnn']:.3f}, ResNet-18 ({summary['resnet_weights']}) {acc['resnet']:.3f}",
        *(f"best {name} cell: {above_chance_phrase(b['score'], b['calibrated'], b['p_value'], HEATMAPS[name][2])}"
          for name, b in best.items() if name in ("cka", "mutual_knn")),
        f"RSA FashionCNN-MiniLM {summary['rsa_fashioncnn_minilm']:.3f} (p = {summary['rsa_fashioncnn_minilm_p']:.3g}); "
        f"ResNet-MiniLM {summary['rsa_resnet_minilm']:.3f} (p = {summary['rsa_resnet_minilm_p']:.3g})",
        f"report: {s.out / 'report.md'}  summary: {s.out / 'summary.json'}  ({summary['runtime_s']:.0f} s)",
        f"TensorBoard: {_tensorboard_command(s.out / 'tensorboard')}",
    ])


def _tensorboard_command(logdir) -> str:
    """A command that works in a fresh shell: the ``tensorboard`` next to this Python (the venv's)."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).with_name("tensorboard")
    exe = str(beside) if beside.exists() else (shutil.which("tensorboard") or "tensorboard")
    return f"{exe} --logdir {logdir}"
