"""When AlignmentMonitor checks and where its values go, in real Trainer runs: step checks when
there is no validation loop (with one warning), ``trainer.validate()`` / ``trainer.test()``,
``callback_metrics`` for EarlyStopping / ModelCheckpoint, the step ``self.log`` uses and the
logger's group separator."""

from __future__ import annotations

import csv
import os
import warnings

import lightning as L
import pytest
import torch
from callback_helpers import TRAINER_KW, TinyNet, brute_cka, loader, synthetic_data, tiny_features
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from prh_lightning.callbacks import AlignmentMonitor

LAYERS = ["conv1", "conv2", "fc"]


class NoValNet(TinyNet):
    """No validation_step: the run has no validation loop."""

    validation_step = None


def fit_without_validation(tmp_path, mon, model, max_steps=7, **kw):
    x, y = synthetic_data(64)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[mon], logger=CSVLogger(tmp_path), **{**TRAINER_KW, **kw})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader(x, y, batch_size=8))
    return trainer, [str(w.message) for w in caught if "AlignmentMonitor" in str(w.message)]


@pytest.mark.parametrize("how", ["no validation_step", "limit_val_batches=0"])
def test_no_validation_loop_checks_every_n_steps_and_says_so(tmp_path, how):
    mon = AlignmentMonitor(probe=synthetic_data(40, seed=3), layers=LAYERS, k=5, default_every_n_train_steps=3)
    if how == "no validation_step":
        trainer, messages = fit_without_validation(tmp_path, mon, NoValNet())
    else:
        x, y = synthetic_data(64)
        trainer = L.Trainer(max_steps=7, callbacks=[mon], logger=CSVLogger(tmp_path), limit_val_batches=0, **TRAINER_KW)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(TinyNet(), loader(x, y, batch_size=8), loader(x, y))
        messages = [str(w.message) for w in caught if "AlignmentMonitor" in str(w.message)]
    (message,) = [m for m in messages if "no validation loop" in m]
    assert "every 3 training steps" in message
    assert [s for s, _ in mon.history["alignment/cka/self_initial/fc"]] == [0, 3, 6]


def test_default_probe_is_training_data_without_validation(tmp_path):
    """AlignmentMonitor() with no probe argument and no validation data: a training-data probe, said once."""
    mon = AlignmentMonitor(layers=LAYERS, k=5, default_every_n_train_steps=4, max_probe_samples=64)
    model = NoValNet()
    _, messages = fit_without_validation(tmp_path, mon, model, max_steps=4)
    assert len([m for m in messages if "no validation data" in m]) == 1
    assert mon.probe.n == 64  # the whole training set (64 samples), in dataset order
    x, _ = synthetic_data(64)
    torch.testing.assert_close(mon.probe.batch[0], x)


def test_validate_and_test_alone_trigger_a_check_on_validation_data(tmp_path):
    model = TinyNet()
    vx, vy = synthetic_data(40, seed=9)
    tx, ty = synthetic_data(48, seed=10)
    mon = AlignmentMonitor(layers=LAYERS, k=5)  # probe="val": the validation data
    trainer = L.Trainer(callbacks=[mon], logger=CSVLogger(tmp_path), **TRAINER_KW)
    trainer.validate(model, loader(vx, vy))
    assert [s for s, _ in mon.history["alignment/cka/self/mean_offdiag"]] == [0]
    feats = tiny_features(model, vx)  # the probe is the whole (40-sample) validation set
    expected = (brute_cka(feats["conv1"], feats["fc"]) + brute_cka(feats["conv1"], feats["conv2"])
                + brute_cka(feats["conv2"], feats["fc"])) / 3
    assert mon.history["alignment/cka/self/mean_offdiag"][0][1] == pytest.approx(expected, abs=1e-4)
    assert trainer.callback_metrics["alignment/cka/self/mean_offdiag"].item() == pytest.approx(expected, abs=1e-4)

    tested = AlignmentMonitor(layers=LAYERS, k=5)
    trainer = L.Trainer(callbacks=[tested], logger=CSVLogger(tmp_path), **TRAINER_KW)
    trainer.test(model, loader(tx, ty))
    assert tested.probe.n == 48  # "val" in a test run: the test data
    assert [s for s, _ in tested.history["alignment/cka/self/mean_offdiag"]] == [0]

    off = AlignmentMonitor(layers=LAYERS, k=5, stages=("fit",))
    L.Trainer(callbacks=[off], logger=CSVLogger(tmp_path), **TRAINER_KW).validate(model, loader(vx, vy))
    assert len(off.history) == 0


def test_early_stopping_and_checkpointing_see_alignment(tmp_path):
    tag = "alignment/cka/self_initial/mean"
    mon = AlignmentMonitor(probe=synthetic_data(40, seed=3), layers=LAYERS, k=5, metrics=("cka",))
    # stops at the first validation whose value is below 1.5: any CKA is, so only a missing value would not stop
    stop = EarlyStopping(monitor=tag, mode="min", stopping_threshold=1.5, strict=True)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=tag, mode="min", save_top_k=1)
    x, y = synthetic_data(64)
    vx, vy = synthetic_data(32, seed=1)
    kw = {**TRAINER_KW, "enable_checkpointing": True}
    trainer = L.Trainer(max_epochs=5, callbacks=[mon, stop, best], logger=CSVLogger(tmp_path), **kw)
    trainer.fit(TinyNet(), loader(x, y), loader(vx, vy))
    assert trainer.current_epoch == 1  # stopped after the first epoch's validation
    value = mon.history[tag][-1][1]
    assert stop.stopped_epoch == 0 and "alignment/cka/self_initial/mean" in trainer.callback_metrics
    assert best.best_model_score.item() == pytest.approx(value) and os.path.exists(best.best_model_path)


class SeparatorLogger(Logger):
    """A logger that groups with '.' (as Lightning lets a logger declare)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "sep"

    @property
    def version(self):
        return 0

    @property
    def group_separator(self):
        return "."

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


def test_logged_at_the_step_self_log_uses_with_the_logger_separator(tmp_path):
    mon = AlignmentMonitor(probe=synthetic_data(40, seed=3), layers=LAYERS, k=5, metrics=("cka",), every_n_train_steps=3)
    csv_logger, sep = CSVLogger(tmp_path, name="csv"), SeparatorLogger()
    x, y = synthetic_data(64)
    vx, vy = synthetic_data(32, seed=1)
    trainer = L.Trainer(max_epochs=2, callbacks=[mon], logger=[csv_logger, sep], log_every_n_steps=1, **TRAINER_KW)
    trainer.fit(TinyNet(), loader(x, y), loader(vx, vy))
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    val_steps = [int(r["step"]) for r in rows if r.get("val_loss")]
    ours = [int(r["step"]) for r in rows if r.get("alignment/cka/self_initial/fc")]
    assert val_steps == [3, 7]
    # train start, global steps 3 and 6 (logged one lower, like train_loss of that batch), validation ends
    assert ours == [0, 2, 3, 5, 7]
    assert set(val_steps) <= set(ours)
    dotted = [(step, m) for step, m in sep.calls if "alignment.cka.self_initial.fc" in m]
    assert [s for s, _ in dotted] == ours and not any("/" in k for _, m in dotted for k in m)
