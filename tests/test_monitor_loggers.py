"""AlignmentMonitor with the loggers besides TensorBoard, in real Trainer runs: MLflow's local
file store (metric files and PNG artifacts read back from disk), W&B offline (the run file's
history records and media PNGs), both checked against brute-force formulas and against the
TensorBoard images of the same run; CSV (scalars, no figures); the Hugging Face front end
reporting to MLflow."""

from __future__ import annotations

import copy
import csv
import glob
import io
import os

import lightning as L
import numpy as np
import pytest
import torch
from callback_helpers import (
    TRAINER_KW,
    HFTiny,
    Rows,
    TinyNet,
    brute_cka,
    brute_mutual_knn,
    event_accumulator,
    loader,
    synthetic_data,
    tiny_features,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from prh_lightning.callbacks import AlignmentMonitor, Reference

pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra (pip install -e '.[dev]')")
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402

K = 5
LAYERS = ["conv1", "conv2", "fc"]


@pytest.fixture(autouse=True)
def _fresh_mlflow_globals(monkeypatch):
    """MLFlowLogger calls mlflow.set_tracking_uri (process-wide): each test starts without it
    and without an active experiment, and the old values come back afterwards."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)


def read_mlflow_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` parsed from the file store's ``metrics/<key>`` files
    (one ``timestamp value step`` line per logged point), without MLflow's own reader."""
    root = os.path.join(run_dir, "metrics")
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path) as f:
                rows = [line.split() for line in f if line.strip()]
            key = os.path.relpath(path, root).replace(os.sep, "/")
            out[key] = [(int(step), float(value)) for _, value, step in rows]
    return out


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.slow
def test_mlflow_file_store_gets_scalars_and_figures_csv_gets_scalars_only(tmp_path, monkeypatch):
    # MLflow >= 3.7 refuses the file store unless told otherwise (it prefers a database backend)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    L.seed_everything(0)
    twin = TinyNet()
    px, py = synthetic_data(40, seed=123)
    mon = AlignmentMonitor(probe=(px, py), layers=LAYERS, k=K, every_n_train_steps=2,
                           references={"twin": Reference(twin, layers=["conv1", "fc"])})
    mlflow_logger = MLFlowLogger(experiment_name="prh", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    csv_logger = CSVLogger(tmp_path / "csv", name="csv")
    tb_logger = TensorBoardLogger(tmp_path / "tb", name="tb")
    model = TinyNet()
    start = copy.deepcopy(model)
    x, y = synthetic_data(64)
    trainer = L.Trainer(max_epochs=2, callbacks=[mon], logger=[mlflow_logger, csv_logger, tb_logger], **TRAINER_KW)
    trainer.fit(model, loader(x, y), loader(*synthetic_data(32, seed=1)))

    runs = glob.glob(str(tmp_path / "mlruns" / "*" / mlflow_logger.run_id))
    assert len(runs) == 1, runs
    metrics = read_mlflow_metrics(runs[0])
    tag = "alignment/cka/twin/best"
    # train start, every 2 steps (history steps 0, 2, 4, 6, 8), logged at the step self.log uses
    assert [s for s, _ in metrics[tag]] == [0, 1, 3, 5, 7]
    now, then, ref = tiny_features(model, px), tiny_features(start, px), tiny_features(twin, px)
    last = {key: points[-1][1] for key, points in metrics.items()}
    for layer in LAYERS:
        assert last[f"alignment/cka/self_initial/{layer}"] == pytest.approx(brute_cka(now[layer], then[layer]), abs=1e-4)
        twin_best = max(brute_cka(now[layer], ref[r]) for r in ("conv1", "fc"))
        assert last[f"alignment/cka/twin/{layer}"] == pytest.approx(twin_best, abs=1e-4)
        knn = max(brute_mutual_knn(now[layer], ref[r], K) for r in ("conv1", "fc"))
        assert last[f"alignment/mutual_knn/twin/{layer}"] == pytest.approx(knn, abs=1e-6)
    assert last[tag] == pytest.approx(max(last[f"alignment/cka/twin/{layer}"] for layer in LAYERS))

    # figures: PNG artifacts named <tag>_step<step>.png, the same pixels as the TensorBoard images
    pngs = sorted(glob.glob(os.path.join(runs[0], "artifacts", "alignment", "*.png")))
    names = [os.path.basename(p) for p in pngs]
    heatmaps = [n for n in names if n.startswith("alignment_heatmap_cka_twin_")]
    assert heatmaps == ["alignment_heatmap_cka_twin_step00000003.png", "alignment_heatmap_cka_twin_step00000007.png"]
    acc = event_accumulator(str(tmp_path / "tb"))
    tb_tags = set(acc.Tags()["images"])
    assert {n.rsplit("_step", 1)[0] for n in names} == {t.replace("/", "_") for t in tb_tags}
    for tb_tag in tb_tags:
        for event in acc.Images(tb_tag):
            path = os.path.join(runs[0], "artifacts", "alignment", f"{tb_tag.replace('/', '_')}_step{event.step:08d}.png")
            with open(path, "rb") as f:
                from_mlflow = decode_png(f.read())
            assert from_mlflow.shape[0] > 150 and from_mlflow.shape[1] > 200
            assert np.array_equal(from_mlflow, decode_png(event.encoded_image_string)), path
            assert len(np.unique(from_mlflow.reshape(-1, 3), axis=0)) > 10  # a drawn figure, not a blank canvas

    # CSV: the same scalars at the same steps (MLflow's file store cannot hold both .../conv1 and
    # .../conv1/calibrated, so there the latter is .../conv1.calibrated), and no figure in its folder
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    csv_tags = {t for t in rows[0] if t.startswith("alignment/")}
    as_csv = {key: key.replace(".calibrated", "/calibrated") for key in metrics if key.startswith("alignment/")}
    assert set(as_csv.values()) == csv_tags and len(csv_tags) == len(as_csv)
    assert "alignment/cka/twin/conv1.calibrated" in as_csv and "alignment/cka/twin/calibrated" in as_csv
    for key, tag in as_csv.items():
        logged = [(int(r["step"]), float(r[tag])) for r in rows if r.get(tag)]
        assert [s for s, _ in logged] == [s for s, _ in metrics[key]], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in metrics[key]], abs=1e-6), key
    written = [f for _, _, files in os.walk(tmp_path / "csv") for f in files]
    assert "metrics.csv" in written and not [f for f in written if f.endswith(".png") or "tfevents" in f]


@pytest.mark.slow
def test_hugging_face_trainer_reporting_to_mlflow_file_store(tmp_path, monkeypatch):
    """The HF front end through the Trainer's own MLflow integration: per-layer calibrated tags
    (a key and its own folder in the file store) must not end training, values match brute force."""
    transformers = pytest.importorskip("transformers")
    from prh_lightning.integrations.huggingface import AlignmentTrainerCallback
    from prh_lightning.tracking import AlignmentTracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "prh-hf")
    torch.manual_seed(0)
    model, twin = HFTiny(), TinyNet()
    px, py = synthetic_data(40, seed=123)
    tracker = AlignmentTracker(probe={"x": px, "labels": py}, layers=[f"net.{l}" for l in LAYERS], k=K,
                               metrics=("cka",), references={"twin": Reference(twin, inputs=px, layers=["conv1", "fc"])},
                               every_n_steps=2, calibration=5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=0.1,
        save_strategy="no", logging_steps=100, report_to=["mlflow"], use_cpu=True, disable_tqdm=True,
        lr_scheduler_type="constant", optim="sgd", seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(*synthetic_data(48)))
    AlignmentTrainerCallback.attach(trainer, tracker)
    trainer.train()

    runs = [d for d in glob.glob(str(tmp_path / "mlruns" / "*" / "*")) if os.path.isdir(os.path.join(d, "metrics"))]
    assert len(runs) == 1, runs
    metrics = read_mlflow_metrics(runs[0])
    assert [s for s, _ in metrics["alignment/cka/twin/best"]] == [0, 2, 4]
    expected_keys = {t.replace("/calibrated", ".calibrated") if t.count("/") == 4 else t for t in tracker.history}
    assert {k for k in metrics if k.startswith("alignment/")} == expected_keys  # nothing lost by the store
    assert [s for s, _ in metrics["alignment/cka/twin/net.fc.calibrated"]] == [0, 2, 4]
    now, ref = tiny_features(model.net, px), tiny_features(twin, px)
    for layer in LAYERS:
        expected = max(brute_cka(now[layer], ref[r]) for r in ("conv1", "fc"))
        assert metrics[f"alignment/cka/twin/net.{layer}"][-1][1] == pytest.approx(expected, abs=1e-4)


def wandb_records(path: str) -> list[bytes]:
    """The serialized records of an offline W&B run file (``run-<id>.wandb``), read without wandb:
    a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte
    header (CRC32 4, little-endian length 2, type 1: full / first / middle / last)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, out, parts, block = 7, [], b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            out.append(parts + chunk)
    return out


def finish_offline_wandb() -> None:
    """End the W&B run and stop the W&B service: only then is the offline run file complete.

    ``wandb.finish()`` alone returned before the last history rows reached the file (one CI run in
    several lost the last figures of a run).
    """
    import wandb

    wandb.finish()
    wandb.teardown()


def wandb_history(run_dir: str) -> list[dict]:
    """Every history row (``wandb.log`` call) of an offline run, values decoded from JSON."""
    import json

    from wandb.proto import wandb_internal_pb2  # the record schema only

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    rows = []
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_gets_scalars_and_figures(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the dev extra (pip install -e '.[dev]')")
    from lightning.pytorch.loggers import WandbLogger

    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(var, str(value))
    L.seed_everything(0)
    twin = TinyNet()
    px, py = synthetic_data(40, seed=123)
    mon = AlignmentMonitor(probe=(px, py), layers=LAYERS, k=K, every_n_train_steps=2,
                           references={"twin": Reference(twin, layers=["conv1", "fc"])})
    wandb_logger = WandbLogger(project="prh", save_dir=str(tmp_path / "wandb"), offline=True)
    tb_logger = TensorBoardLogger(tmp_path / "tb", name="tb")
    model = TinyNet()
    x, y = synthetic_data(64)
    trainer = L.Trainer(max_epochs=2, callbacks=[mon], logger=[wandb_logger, tb_logger], **TRAINER_KW)
    trainer.fit(model, loader(x, y), loader(*synthetic_data(32, seed=1)))
    finish_offline_wandb()

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*"))
    rows = wandb_history(run_dir)
    tag = "alignment/cka/twin/best"
    scalars = [row for row in rows if tag in row]
    assert [row["trainer/global_step"] for row in scalars] == [0, 1, 3, 5, 7]
    now, ref = tiny_features(model, px), tiny_features(twin, px)
    for layer in LAYERS:
        expected = max(brute_cka(now[layer], ref[r]) for r in ("conv1", "fc"))
        assert scalars[-1][f"alignment/cka/twin/{layer}"] == pytest.approx(expected, abs=1e-4)
        assert f"alignment/cka/twin/{layer}/calibrated" in scalars[-1]  # W&B keeps the tags as they are

    # figures: the same pixels as TensorBoard's images of the same tag and step
    acc = event_accumulator(str(tmp_path / "tb"))
    tb_images = {(t, e.step): e for t in acc.Tags()["images"] for e in acc.Images(t)}
    wandb_images = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("/filenames"):
                (name,) = value
                wandb_images[(key[: -len("/filenames")], row["trainer/global_step"])] = os.path.join(run_dir, "files", name)
    assert set(wandb_images) == set(tb_images)
    assert [s for t, s in sorted(wandb_images) if t == "alignment_heatmap/cka/twin"] == [3, 7]
    for key, path in wandb_images.items():
        with open(path, "rb") as f:
            assert np.array_equal(decode_png(f.read()), decode_png(tb_images[key].encoded_image_string)), key
