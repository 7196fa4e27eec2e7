"""AlignmentTracker outside Lightning's Trainer: a plain PyTorch loop (``tracker.step(model,
step)``, TensorBoard sink with a custom-scalars layout) and Lightning Fabric (``fabric.log_dict``
as the sink, ``fabric.save`` / ``fabric.load`` of the tracker), each a real training run whose
logged values are checked against brute force."""

from __future__ import annotations

import copy
import csv
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from callback_helpers import TinyNet, brute_cka, brute_mutual_knn, event_accumulator, read_scalars, synthetic_data, tiny_features

from prh_lightning.tracking import AlignmentTracker, MemorySink, TensorBoardSink

LAYERS = ["conv1", "conv2", "fc"]


def plain_training(model, tracker, steps=6, lr=0.1):
    x, y = synthetic_data(64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker.step(model, 0)
    for step in range(1, steps + 1):
        i = (step - 1) % 8 * 8
        loss = F.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step(model, step)


def test_plain_loop_with_memory_and_tensorboard_sinks(tmp_path):
    torch.manual_seed(0)
    px, py = synthetic_data(40, seed=123)
    fixed = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    memory = MemorySink()
    tracker = AlignmentTracker(
        probe=(px, py), references={"fixed": fixed}, layers=LAYERS, k=5, every_n_steps=3,
        sinks=[memory, TensorBoardSink(str(tmp_path))], images_every_n_checks=2,
    )
    model = TinyNet()
    initial = copy.deepcopy(model)
    plain_training(model, tracker)
    assert [s for s, _ in memory.scalars] == [0, 3, 6]
    assert model.training  # training flags restored
    last = memory.scalars[-1][1]
    now, then = tiny_features(model, px), tiny_features(initial, px)
    for layer in LAYERS:
        assert last[f"alignment/cka/self_initial/{layer}"] == pytest.approx(brute_cka(now[layer], then[layer]), abs=1e-4)
        assert last[f"alignment/mutual_knn/fixed/{layer}"] == pytest.approx(brute_mutual_knn(now[layer], fixed, 5))

    scalars = read_scalars(str(tmp_path))
    assert scalars["alignment/cka/fixed/fc"] == [(s, pytest.approx(m["alignment/cka/fixed/fc"])) for s, m in memory.scalars]
    acc = event_accumulator(str(tmp_path))
    assert [e.step for e in acc.Images("alignment_heatmap/cka/fixed")] == [0, 6]  # checks 1 and 3
    assert [step for step, _ in memory.images] == [0, 6]

    # the custom-scalars layout: one multi-line chart per metric and target, matching its layer tags
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    files = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    layouts = [
        v.tensor.string_val[0]
        for f in files for event in EventFileLoader(f).Load()
        for v in event.summary.value if v.tag == metadata.CONFIG_SUMMARY_TAG
    ]
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[-1])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert set(charts) == {f"{m}/{t}" for m in ("cka", "mutual_knn") for t in ("fixed", "self", "self_initial", "self_previous")}
    assert charts["cka/fixed"] == ["^alignment/cka/fixed/"]


def test_plain_loop_step_only_when_due():
    tracker = AlignmentTracker(probe=synthetic_data(40)[0], layers=["fc"], k=5, every_n_steps=4)
    model = TinyNet()
    assert [tracker.step(model, s) is not None for s in range(9)] == [s % 4 == 0 for s in range(9)]
    assert tracker.step(model, 8) is None  # already checked at step 8
    with pytest.raises(RuntimeError, match="has no probe yet"):
        AlignmentTracker(layers=["fc"]).check(model, 0)


def test_fabric_loop_logs_through_fabric_and_checkpoints_the_tracker(tmp_path):
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    torch.manual_seed(0)
    logger = CSVLogger(str(tmp_path), name="fabric")
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[logger])
    px, py = synthetic_data(40, seed=123)
    tracker = AlignmentTracker(
        probe=(px, py), layers=LAYERS, k=5, every_n_steps=2, metrics=("cka",),
        sinks=[lambda scalars, step: fabric.log_dict(scalars, step=step)],
    )
    net = TinyNet()
    initial = copy.deepcopy(net)
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = synthetic_data(64)
    weights = {}
    for step in range(5):
        tracker.step(model, step, context=fabric.autocast)  # the Fabric-wrapped model is unwrapped
        weights[step] = copy.deepcopy(net)
        loss = F.cross_entropy(model(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8])
        opt.zero_grad()
        fabric.backward(loss)
        opt.step()
    fabric.save(tmp_path / "state.ckpt", {"model": model, "alignment": tracker})
    logger.finalize("success")

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("alignment/cka/self_initial/fc")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    then = tiny_features(initial, px)
    for row in rows:
        now = tiny_features(weights[int(row["step"])], px)
        for layer in LAYERS:
            expected = brute_cka(now[layer], then[layer])
            assert float(row[f"alignment/cka/self_initial/{layer}"]) == pytest.approx(expected, abs=1e-4)

    restored = AlignmentTracker(probe=(px, py), layers=LAYERS, k=5, every_n_steps=2, metrics=("cka",))
    fabric.load(tmp_path / "state.ckpt", {"alignment": restored})
    assert restored.history["alignment/cka/self_initial/fc"] == tracker.history["alignment/cka/self_initial/fc"]
    values = restored.step(net, 6)  # continues against the first check's snapshot
    expected = brute_cka(tiny_features(net, px)["fc"], then["fc"])
    assert values["alignment/cka/self_initial/fc"] == pytest.approx(expected, abs=1e-4)
