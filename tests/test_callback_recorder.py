"""RepresentationRecorder in real Trainer runs: one file per epoch / N steps, contents checked
against features computed by hand, labels, test/predict stages, bad arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from callback_helpers import TRAINER_KW, TinyNet, loader, synthetic_data, tiny_features
from torch.utils.data import DataLoader, TensorDataset

from prh_lightning.callbacks import RepresentationRecorder
from prh_lightning.representations import Representations

LAYERS = ["conv1", "conv2", "fc"]


@pytest.mark.slow
def test_validation_files_per_epoch_match_hand_computed_features(tmp_path):
    L.seed_everything(0)
    x, y = synthetic_data(48)
    vx, vy = synthetic_data(40, seed=1)
    recorder = RepresentationRecorder(tmp_path / "reps", layers=LAYERS, every_n_epochs=1)
    model = TinyNet()
    trainer = L.Trainer(max_epochs=2, callbacks=[recorder], logger=False, **{**TRAINER_KW, "num_sanity_val_steps": 2})
    trainer.fit(model, loader(x, y), loader(vx, vy, batch_size=16))

    names = sorted(p.name for p in (tmp_path / "reps").iterdir())
    assert names == ["validate-epoch000-step000003.safetensors", "validate-epoch001-step000006.safetensors"]
    assert recorder.saved == [tmp_path / "reps" / n for n in names]
    reps = Representations.load(tmp_path / "reps" / names[-1])
    assert reps.layers == LAYERS and reps.n == 40  # every validation sample once; the sanity check wrote nothing
    assert torch.equal(reps.labels, vy)
    expected = tiny_features(model, vx)
    for layer in LAYERS:
        torch.testing.assert_close(reps[layer], expected[layer], atol=1e-5, rtol=1e-5)
    assert reps.metadata["stage"] == "validate" and reps.metadata["epoch"] == 1 and reps.metadata["global_step"] == 6


@pytest.mark.slow
def test_every_n_epochs_and_test_predict_stages(tmp_path):
    x, y = synthetic_data(32)
    recorder = RepresentationRecorder(tmp_path, layers=["fc"], stages=("validate", "test", "predict"), every_n_epochs=2)
    model = TinyNet()
    trainer = L.Trainer(max_epochs=3, callbacks=[recorder], logger=False, **TRAINER_KW)
    trainer.fit(model, loader(x, y), loader(x, y))
    trainer.test(model, loader(x, y))
    trainer.predict(model, DataLoader(TensorDataset(x), batch_size=8))  # unlabeled batches

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "predict-epoch003-step000006.safetensors",  # after fit, current_epoch == max_epochs
        "test-epoch003-step000006.safetensors",
        "validate-epoch001-step000004.safetensors",  # every second epoch only
    ]
    test = Representations.load(tmp_path / names[1])
    predict = Representations.load(tmp_path / names[0])
    torch.testing.assert_close(test["fc"], tiny_features(model, x)["fc"], atol=1e-5, rtol=1e-5)
    assert torch.equal(test.labels, y) and predict.labels is None
    torch.testing.assert_close(predict["fc"], test["fc"])


@pytest.mark.slow
def test_train_stage_records_the_probe_every_n_steps(tmp_path):
    x, y = synthetic_data(32)
    px, py = synthetic_data(20, seed=9)
    recorder = RepresentationRecorder(tmp_path, layers=LAYERS, stages="train", every_n_train_steps=3, probe=(px, py))
    model = TinyNet(dropout=0.5)
    trainer = L.Trainer(max_steps=6, callbacks=[recorder], logger=False, **TRAINER_KW)
    trainer.fit(model, loader(x, y, batch_size=8))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-epoch000-step000003.safetensors", "train-epoch001-step000006.safetensors"]
    last = Representations.load(tmp_path / names[-1])
    expected = tiny_features(model, px)  # eval mode: dropout off in the recorded pass too
    for layer in LAYERS:
        torch.testing.assert_close(last[layer], expected[layer], atol=1e-5, rtol=1e-5)
    assert torch.equal(last.labels, py)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(stages=("valid",)), r"stages=\('valid',\): choose one or more of"),
        (dict(stages=("train",)), "pass probe="),
        (dict(every_n_epochs=0), "every_n_epochs must be a positive int"),
        (dict(filename="{stage}-{loss}.safetensors"), "must be a format string using only"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RepresentationRecorder(tmp_path, **kwargs)


def test_unknown_layer_fails_before_anything_is_written(tmp_path):
    x, y = synthetic_data(16)
    recorder = RepresentationRecorder(tmp_path / "reps", layers=["conv1", "fc2"])
    trainer = L.Trainer(max_epochs=1, callbacks=[recorder], logger=False, **TRAINER_KW)
    with pytest.raises(KeyError, match=r"no module named 'fc2'"):
        trainer.fit(TinyNet(), loader(x, y), loader(x, y))
    assert not (tmp_path / "reps").exists()
