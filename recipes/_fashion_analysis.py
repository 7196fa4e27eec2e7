"""Statistics of the ``fashion-mnist`` recipe, composed from the library: layer x layer matrices,
their calibration against shuffled image pairings (:func:`prh_lightning.calibrate`), the
early-vs-late depth contrast with a jackknife interval, class-centroid RSA against MiniLM (:mod:`prh_lightning.analysis.centroids`), and the Holm
correction over every p-value the report reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prh_lightning.analysis.centroids import centroid_rsa, class_centroids
from prh_lightning.analysis.claims import corrected_confidence, holm, verdict, verdict_from_p
from prh_lightning.recipes._fashion_settings import CNN_LAYERS, HEATMAPS, RESNET_LAYERS, Settings

EARLY = ["conv1", "layer1", "layer2"]


def layer_heatmaps(cnn, resnet) -> dict[str, torch.Tensor]:
    """``{name: Tensor[3, 6]}``: FashionCNN layers x ResNet layers for each entry of HEATMAPS."""
    from prh_lightning import alignment_matrix

    return {name: alignment_matrix(cnn, resnet, metric=metric, **options) for name, (metric, options, _) in HEATMAPS.items()}


def calibrated_heatmaps(cnn, resnet, s: Settings) -> dict[str, Any]:
    """``{name: Calibrated}`` per entry of HEATMAPS (:func:`prh_lightning.calibrate`): ResNet's
    images reordered by ``s.calibration_permutations`` seeded permutations (the same ones for
    every ResNet layer and every heatmap), each cell calibrated, and the best cell calibrated
    against the best cell of each permuted matrix (the same best-of-18 selection)."""
    from prh_lightning import calibrate
    from prh_lightning.analysis.calibrated import draw_permutations

    perms = draw_permutations(cnn.n, s.calibration_permutations, s.seed)
    return {name: calibrate(cnn, resnet, metric, permutations=perms, aggregate="max", **options)
            for name, (metric, options, _) in HEATMAPS.items()}


def best_cells(calibrated: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The best cell of each heatmap with its calibrated score, chance level and p-value against
    the best-of-layers null (``score`` is the raw value)."""
    out = {}
    for name, res in calibrated.items():
        i, j = divmod(int(torch.argmax(res.raw)), res.raw.shape[1])
        agg = res.aggregate
        out[name] = {"fashioncnn_layer": CNN_LAYERS[i], "resnet_layer": RESNET_LAYERS[j], "score": agg.raw,
                     "calibrated": agg.calibrated, "null_mean": agg.null_mean, "tau": agg.tau,
                     "p_value": agg.p_value, "z_score": agg.z_score, "n_permutations": int(res.null.shape[0])}
    return out


def late_layers(resnet) -> list[str]:
    """ResNet's late layers, each counted once: ``avgpool`` is left out when it equals ``layer4``
    (the spatial mean of layer4 is what both taps record)."""
    same = torch.allclose(resnet["layer4"].double(), resnet["avgpool"].double(), rtol=1e-5, atol=1e-6)
    return ["layer3", "layer4"] + ([] if same else ["avgpool"])


def _contrast(matrix: torch.Tensor, late: list[str]) -> float:
    cols = lambda names: [RESNET_LAYERS.index(n) for n in names]  # noqa: E731
    return float(matrix[:, cols(EARLY)].mean() - matrix[:, cols(late)].mean())


def depth_contrast(cnn, resnet, matrices: dict[str, torch.Tensor], s: Settings) -> dict[str, dict[str, Any]]:
    """Per heatmap, mean over FashionCNN layers of ResNet's early layers (conv1-layer2) minus its
    late ones, with a delete-a-group jackknife interval over images, Bonferroni-corrected over the
    heatmaps, and the verdict on "the two models agree more early in ResNet's depth"."""
    from prh_lightning.functional.jackknife import jackknife_groups, jackknife_interval, metric_range

    late = late_layers(resnet)
    n = cnn.n
    replicates = {name: [] for name in matrices}
    for group in jackknife_groups(n, s.jackknife_groups, s.seed):
        keep = torch.ones(n, dtype=torch.bool)
        keep[group] = False
        rows = keep.nonzero().flatten()
        for name, matrix in layer_heatmaps(cnn.subset(rows), resnet.subset(rows)).items():
            replicates[name].append(_contrast(matrix, late))
    confidence = corrected_confidence(0.95, len(matrices))
    out = {}
    for name, matrix in matrices.items():
        lo_m, hi_m = metric_range(HEATMAPS[name][0])
        value = _contrast(matrix, late)
        low, high, _ = jackknife_interval(value, replicates[name], confidence, bounds=(lo_m - hi_m, hi_m - lo_m))
        out[name] = {"early": float(matrix[:, [RESNET_LAYERS.index(c) for c in EARLY]].mean()),
                     "late": float(matrix[:, [RESNET_LAYERS.index(c) for c in late]].mean()),
                     "late_layers": late, "difference": value, "low": float(low), "high": float(high),
                     "confidence": confidence, "verdict": verdict(float(low), float(high), "greater")}
    return out


def centroid_study(reps, text: dict[str, torch.Tensor], s: Settings) -> dict[str, dict[str, Any]]:
    """``{text_kind: {layer: centroid_rsa(...)}}`` for every tapped layer of one model."""
    return {kind: {layer: centroid_rsa(reps[layer], reps.labels, emb, n_permutations=s.permutations,
                                       n_bootstrap=s.bootstraps, seed=s.seed) for layer in reps.layers}
            for kind, emb in text.items()}


def rdm_pairs(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The 45 centroid-pair cosine dissimilarities of the vision model and of the text model."""
    from prh_lightning.functional import condensed, rdm

    vision = condensed(rdm(class_centroids(x.double(), labels), "cosine"))
    return vision.numpy(), condensed(rdm(text.double(), "cosine")).numpy()


def tested_claims(studies: dict[str, dict], tests: dict[str, dict]) -> list[dict[str, Any]]:
    """Every p-value the report reads (avgpool centroid RSA of each model and text kind, the best
    cell of every heatmap against its best-of-layers null), Holm-adjusted together, with the
    verdict on "above chance"."""
    items = [(f"centroid RSA {model} avgpool vs MiniLM ({kind}) above chance", studies[model][kind]["avgpool"]["spearman_p"])
             for model in studies for kind in studies[model]]
    items += [(f"best {name} cell (FashionCNN {t['fashioncnn_layer']} / ResNet {t['resnet_layer']}) above chance (best-of-layers null)", t["p_value"])
              for name, t in tests.items()]
    adjusted = holm([p for _, p in items])
    return [{"claim": claim, "p": p, "p_holm": float(q), "verdict": verdict_from_p(float(q))}
            for (claim, p), q in zip(items, adjusted)]
