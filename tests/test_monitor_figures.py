"""AlignmentMonitor's figures in real Trainer runs: the TensorBoard custom-scalars layout, heatmap
colour limits at the metric's real range, a layer x step figure at 40+ layers, and images
rendered less often than scalars."""

from __future__ import annotations

import glob
import os
import re

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from callback_helpers import TRAINER_KW, TinyNet, event_accumulator, loader, synthetic_data
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from prh_lightning.callbacks import AlignmentMonitor

LAYERS = ["conv1", "conv2", "fc"]


def fit(mon, tmp_path, model=None, max_steps=4, val=False, **kw):
    x, y = synthetic_data(64)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[mon], logger=TensorBoardLogger(tmp_path, name="tb"),
                        **{**TRAINER_KW, **kw})
    trainer.fit(model or TinyNet(), loader(x, y, batch_size=8), loader(*synthetic_data(32, seed=1)) if val else None)
    return trainer


def read_layout(logdir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    blobs = [
        v.tensor.string_val[0]
        for f in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
        for event in EventFileLoader(f).Load() for v in event.summary.value if v.tag == metadata.CONFIG_SUMMARY_TAG
    ]
    layout = layout_pb2.Layout()
    layout.ParseFromString(blobs[-1])
    return {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}


def test_custom_scalars_layout_and_images_every_mth_check(tmp_path):
    twin = TinyNet()
    mon = AlignmentMonitor(probe=synthetic_data(40, seed=2), layers=LAYERS, k=5, every_n_train_steps=1,
                           references={"twin": twin}, log_images=2)
    fit(mon, tmp_path, max_steps=4)
    charts = read_layout(str(tmp_path))
    targets = ("twin", "self", "self_initial", "self_previous")
    assert set(charts) == {f"{m}/{t}" for m in ("cka", "mutual_knn") for t in targets}
    acc = event_accumulator(str(tmp_path))
    scalar_tags = acc.Tags()["scalars"]
    for title, (pattern,) in charts.items():  # each chart's regex matches exactly its target's per-layer tags
        matched = {t for t in scalar_tags if re.match(pattern, t)}
        metric, target = title.split("/")
        per_layer = {f"alignment/{title}/mean_offdiag"} if target == "self" else {
            f"alignment/{title}/{layer}" for layer in LAYERS
        }
        assert per_layer <= matched and all(t.startswith(f"alignment/{title}/") for t in matched)
    # checks at global steps 0..4 (logged at 0, 0, 1, 2, 3); heatmaps at checks 3 and 5 (m = 2, none at step 0)
    assert [e.step for e in acc.Images("alignment_heatmap/cka/twin")] == [1, 3]
    assert len(acc.Scalars("alignment/cka/twin/best")) == 5


def test_lcs_knn_heatmap_uses_its_range_zero_to_k(tmp_path):
    mon = AlignmentMonitor(probe=synthetic_data(40, seed=2), layers=LAYERS, k=5, metrics=("lcs_knn", "cka"),
                           every_n_train_steps=2, log_images=False)
    fit(mon, tmp_path, max_steps=2)
    figures = mon.tracker.figures(heatmaps=True)
    assert figures["alignment_heatmap/lcs_knn/self"].axes[0].images[0].get_clim() == (0.0, 5.0)
    assert figures["alignment_heatmap/cka/self"].axes[0].images[0].get_clim() == (0.0, 1.0)
    assert float(mon.last_matrices["lcs_knn/self"].max()) > 1.0  # values above 1 are real, not clipped


class Deep(L.LightningModule):
    """42 residual tanh-linear layers: too many for one line each in a readable figure."""

    def __init__(self, depth=42):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64 if i == 0 else 16, 16) for i in range(depth))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.tanh(self.layers[0](x.flatten(1)))
        for layer in self.layers[1:]:
            h = h + torch.tanh(layer(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_curves_of_40_plus_layers_are_a_layer_by_step_heatmap(tmp_path):
    mon = AlignmentMonitor(probe=synthetic_data(40, seed=2), layers="layers.*", k=5, metrics=("cka",),
                           every_n_train_steps=2, within_model=False)
    fit(mon, tmp_path, model=Deep(), max_steps=4)
    assert len(mon.model_layers) == 42
    fig = mon.tracker.figures(heatmaps=False, curves=True)["alignment_curves/cka/self_initial"]
    ax = fig.axes[0]
    assert not ax.lines and ax.get_legend() is None  # no 42-line legend
    shown = ax.images[0].get_array().filled(np.nan)
    assert shown.shape == (42, 3)  # layers x checks (steps 0, 2, 4)
    for i, layer in enumerate(mon.model_layers):
        values = [v for _, v in mon.history[f"alignment/cka/self_initial/{layer}"]]
        assert not np.isnan(values).any() and shown[i] == pytest.approx(values, abs=1e-6)
    images = event_accumulator(str(tmp_path)).Tags()["images"]
    assert "alignment_curves/cka/self_initial" in images  # logged at the end of training
