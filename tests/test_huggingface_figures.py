"""Figures of the Hugging Face front end in a real ``transformers.Trainer`` run that reports to
TensorBoard and MLflow's file store: heatmaps after each evaluation, curves (and the last
heatmaps when not yet drawn) at the end of training, as the Lightning monitor does; the
TensorBoard event files and MLflow artifacts are read back and the scalars next to them are
checked against a brute-force recomputation."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
import torch
from callback_helpers import HFTiny, Rows, TinyNet, brute_cka, event_accumulator, synthetic_data, tiny_features

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra (pip install -e '.[dev]')")

from prh_lightning.integrations.huggingface import AlignmentTrainerCallback  # noqa: E402
from prh_lightning.tracking import AlignmentTracker, Reference  # noqa: E402

LAYERS = ["conv1", "conv2", "fc"]


@pytest.fixture(autouse=True)
def _fresh_mlflow_globals(monkeypatch):
    """The MLflow integration sets a process-wide tracking URI and experiment: each test starts without them."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def custom_scalars(acc) -> list[tuple[str, list[str]]]:
    """``[(chart title, [regex, ...])]`` of the custom-scalars layout in the event files."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    (event,) = acc.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return [(chart.title, list(chart.multiline.tag)) for cat in layout.category for chart in cat.chart]


@pytest.mark.slow
def test_trainer_sends_heatmaps_and_curves_to_tensorboard_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "prh-hf-figures")
    torch.manual_seed(0)
    model, twin = HFTiny(), TinyNet()
    px, py = synthetic_data(40, seed=123)
    tracker = AlignmentTracker(
        probe={"x": px, "labels": py}, layers=[f"net.{name}" for name in LAYERS], k=5, metrics=("cka",),
        references={"twin": Reference(twin, inputs=px, layers=["conv1", "fc"])}, every_n_steps=2, calibration=None,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, learning_rate=0.1,
        eval_strategy="steps", eval_steps=3, save_strategy="no", logging_steps=100,
        report_to=["tensorboard", "mlflow"], use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant",
        optim="sgd", seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(*synthetic_data(48)),
                                   eval_dataset=Rows(*synthetic_data(16, seed=7)))
    AlignmentTrainerCallback.attach(trainer, tracker)
    trainer.train()

    # checks: train start, every 2 steps, after each evaluation (3 and 6)
    assert [s for s, _ in tracker.history["alignment/cka/twin/net.fc"]] == [0, 2, 3, 4, 6]
    acc = event_accumulator(str(tmp_path / "tb"))
    images = {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    assert images == {
        "alignment_heatmap/cka/self": [3, 6],  # after each evaluation
        "alignment_heatmap/cka/twin": [3, 6],
        "alignment_curves/cka/twin": [6],  # end of training
        "alignment_curves/cka/self_initial": [6],
    }
    for tag in images:
        for event in acc.Images(tag):
            array = decode_png(event.encoded_image_string)
            assert array.shape[0] > 150 and array.shape[1] > 200
            assert len(np.unique(array.reshape(-1, 3), axis=0)) > 10  # a drawn figure, not a blank canvas

    # the scalars beside them (the Trainer's "train/" tags) equal brute force at the last check
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    now, ref = tiny_features(model.net, px), tiny_features(twin, px)
    for layer in LAYERS:
        logged = scalars[f"train/alignment/cka/twin/net.{layer}"]
        assert [s for s, _ in logged] == [0, 2, 3, 4, 6]
        expected = max(brute_cka(now[layer], ref[r]) for r in ("conv1", "fc"))
        assert logged[-1][1] == pytest.approx(expected, abs=1e-4)
    off_diagonal = [brute_cka(now[a], now[b]) for a in LAYERS for b in LAYERS if a != b]
    assert scalars["train/alignment/cka/self/mean_offdiag"][-1] == (6, pytest.approx(np.mean(off_diagonal), abs=1e-4))
    # custom-scalars layout: one chart per metric and target, over the Trainer's "train/" tags
    charts = dict(custom_scalars(acc))
    assert charts["cka/twin"] == ["^train/alignment/cka/twin/"]
    assert {"cka/self", "cka/self_initial", "cka/self_previous"} <= set(charts)

    # MLflow: the same images as PNG artifacts of the Trainer's run
    (run,) = [d for d in glob.glob(str(tmp_path / "mlruns" / "*" / "*")) if os.path.isdir(os.path.join(d, "artifacts"))]
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, "artifacts", "alignment", "*.png")))
    expected_files = sorted(f"{tag.replace('/', '_')}_step{step:08d}.png" for tag, steps in images.items() for step in steps)
    assert pngs == expected_files
    for event in acc.Images("alignment_heatmap/cka/twin"):
        with open(os.path.join(run, "artifacts", "alignment", f"alignment_heatmap_cka_twin_step{event.step:08d}.png"), "rb") as f:
            assert np.array_equal(decode_png(f.read()), decode_png(event.encoded_image_string))


@pytest.mark.slow
def test_log_images_every_mth_check_and_off(tmp_path, monkeypatch):
    """``log_images=2``: heatmaps at every 2nd check (the step-0 check draws nothing, as in the
    Lightning monitor), curves at the end; ``log_images=False``: scalars only."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    px, py = synthetic_data(40, seed=123)
    for log_images, folder in ((2, "every2"), (False, "off")):
        monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / folder))
        torch.manual_seed(0)
        tracker = AlignmentTracker(probe={"x": px, "labels": py}, layers=[f"net.{name}" for name in LAYERS], k=5,
                                   metrics=("cka",), every_n_steps=1, calibration=None)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=0.1,
            save_strategy="no", logging_steps=100, report_to=["tensorboard"], use_cpu=True, disable_tqdm=True,
            optim="sgd", seed=0,
        )
        trainer = transformers.Trainer(model=HFTiny(), args=args, train_dataset=Rows(*synthetic_data(48)))
        AlignmentTrainerCallback.attach(trainer, tracker, log_images=log_images)
        trainer.train()
        acc = event_accumulator(str(tmp_path / folder))
        images = {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
        if log_images:
            # checks 0..4 are checks 1..5: the 1st (step 0, none), 3rd (step 2) and 5th (step 4)
            assert images == {"alignment_heatmap/cka/self": [2, 4], "alignment_curves/cka/self_initial": [4]}
        else:
            assert images == {}
            assert "train/alignment/cka/self/mean_offdiag" in acc.Tags()["scalars"]


def test_log_images_must_be_a_bool_or_a_positive_int():
    tracker = AlignmentTracker(metrics=("cka",))
    with pytest.raises(ValueError, match="log_images"):
        AlignmentTrainerCallback(tracker, log_images=-1)


@pytest.mark.slow
def test_trainer_sends_figures_to_wandb_offline(tmp_path, monkeypatch):
    """``report_to=["wandb"]``: the same images as TensorBoard's, at the same Trainer steps."""
    pytest.importorskip("wandb", reason="wandb is in the dev extra (pip install -e '.[dev]')")
    from test_monitor_loggers import finish_offline_wandb, wandb_history

    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_PROJECT": "prh-hf",
                       "TENSORBOARD_LOGGING_DIR": tmp_path / "tb"}.items():
        monkeypatch.setenv(var, str(value))
    (tmp_path / "wandb").mkdir()
    torch.manual_seed(0)
    px, py = synthetic_data(40, seed=123)
    tracker = AlignmentTracker(probe={"x": px, "labels": py}, layers=[f"net.{name}" for name in LAYERS], k=5,
                               metrics=("cka",), every_n_steps=2, calibration=None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=0.1,
        eval_strategy="steps", eval_steps=2, save_strategy="no", logging_steps=100,
        report_to=["tensorboard", "wandb"], use_cpu=True, disable_tqdm=True, optim="sgd", seed=0,
    )
    model = HFTiny()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(*synthetic_data(48)),
                                   eval_dataset=Rows(*synthetic_data(16, seed=7)))
    AlignmentTrainerCallback.attach(trainer, tracker)
    trainer.train()
    finish_offline_wandb()

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*"))
    rows = wandb_history(run_dir)
    acc = event_accumulator(str(tmp_path / "tb"))
    tb_images = {(t, e.step): e for t in acc.Tags()["images"] for e in acc.Images(t)}
    assert sorted(tb_images) == [("alignment_curves/cka/self_initial", 4), ("alignment_heatmap/cka/self", 2),
                                 ("alignment_heatmap/cka/self", 4)]
    wandb_images = {}
    for row in rows:
        for key, value in row.items():  # one wandb.Image per key: "<tag>/_type", "<tag>/path", ...
            if key.endswith("/path") and row.get(key[: -len("/path")] + "/_type") == "image-file":
                wandb_images[(key[: -len("/path")], row["train/global_step"])] = os.path.join(run_dir, "files", value)
    assert set(wandb_images) == set(tb_images)
    for key, path in wandb_images.items():
        with open(path, "rb") as f:
            assert np.array_equal(decode_png(f.read()), decode_png(tb_images[key].encoded_image_string)), key
    # the scalars reach the same run at every check (the Trainer prefixes them with "train/")
    logged = [row for row in rows if "train/alignment/cka/self_initial/net.fc" in row]
    assert [row["train/global_step"] for row in logged] == [0, 2, 4]
