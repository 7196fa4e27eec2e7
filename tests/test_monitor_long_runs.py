"""AlignmentMonitor on long runs, in real Trainer runs: failures are warned about once and
recorded as NaN while training goes on; the history stays bounded and resumes; a changed
metric list on resume is a warning; a one-layer model logs no NaN within-model mean."""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import pytest
from callback_helpers import TRAINER_KW, TinyNet, brute_cka, loader, synthetic_data, tiny_features
from lightning.pytorch.loggers import CSVLogger

from prh_lightning.callbacks import AlignmentMonitor

LAYERS = ["conv1", "conv2", "fc"]


def probe():
    return synthetic_data(40, seed=123)


def run(mon, tmp_path, model=None, max_steps=6, ckpt_path=None, **kw):
    x, y = synthetic_data(64)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[mon], logger=CSVLogger(tmp_path), **{**TRAINER_KW, **kw})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model or TinyNet(), loader(x, y, batch_size=8), ckpt_path=ckpt_path)
    return trainer, [str(w.message) for w in caught if "AlignmentMonitor" in str(w.message)]


class DivergesInProbe(TinyNet):
    """From step 2 on, conv2 (and so fc) gives NaN features on the probe; training is unaffected."""

    def forward(self, x):
        h = self.pool(self.act1(self.norm(self.conv1(x))))
        if not self.training and self.global_step >= 2:
            h = h * float("nan")
        return self.fc(self.drop(self.act2(self.conv2(h)).mean(dim=(2, 3))))


def test_diverged_layers_warn_once_per_layer_and_cause_and_training_goes_on(tmp_path):
    mon = AlignmentMonitor(probe=probe(), layers=LAYERS, k=5, every_n_train_steps=1)
    model = DivergesInProbe()
    initial = copy.deepcopy(model)
    trainer, messages = run(mon, tmp_path, model=model, max_steps=6)
    assert trainer.global_step == 6  # training went on
    nan_warnings = [m for m in messages if "NaN or Inf" in m]
    assert len(nan_warnings) == 2, nan_warnings  # one per layer (conv2, fc), not per check / metric / target
    assert sorted("'conv2'" in m for m in nan_warnings) == [False, True]
    history = mon.history
    for step, value in history["alignment/cka/self_initial/conv2"]:
        assert math.isnan(value) == (step >= 2)
    # the healthy layer is still scored, and right: brute-force CKA against the initial weights
    x, _ = probe()
    expected = brute_cka(tiny_features(model, x)["conv1"], tiny_features(initial, x)["conv1"])
    assert [s for s, _ in history["alignment/cka/self_initial/conv1"]] == list(range(7))
    assert history["alignment/cka/self_initial/conv1"][-1][1] == pytest.approx(expected, abs=1e-4)


def test_failing_reference_is_nan_and_warned_once_or_raised(tmp_path):
    calls = []

    def broken(x):
        calls.append(1)
        raise RuntimeError(f"reference server unreachable (attempt {len(calls)})")

    mon = AlignmentMonitor(probe=probe(), references={"broken": broken}, layers=LAYERS, k=5, every_n_train_steps=2)
    model = TinyNet()
    initial = TinyNet()
    initial.load_state_dict(model.state_dict())
    trainer, messages = run(mon, tmp_path, model=model, max_steps=6)
    assert trainer.global_step == 6 and len(calls) == 4  # retried at every check (0, 2, 4, 6)
    (message,) = [m for m in messages if "reference 'broken'" in m]  # the changing attempt number: one warning
    assert "RuntimeError" in message and "recorded as NaN" in message
    for tag in ("alignment/cka/broken/best", "alignment/mutual_knn/broken/fc"):
        assert len(mon.history[tag]) == 4 and all(math.isnan(v) for _, v in mon.history[tag])
    x, _ = probe()
    expected = brute_cka(tiny_features(model, x)["fc"], tiny_features(initial, x)["fc"])
    assert mon.history["alignment/cka/self_initial/fc"][-1][1] == pytest.approx(expected, abs=1e-4)

    strict = AlignmentMonitor(probe=probe(), references={"broken": broken}, layers=LAYERS, k=5, on_error="raise")
    with pytest.raises(RuntimeError, match="reference server unreachable"):
        run(strict, tmp_path / "strict", max_steps=2)


class ProbeFails(TinyNet):
    """The probe pass (eval mode) fails from step 2 on; training steps are unaffected."""

    def forward(self, x):
        if not self.training and self.global_step >= 2:
            raise RuntimeError(f"out of memory at step {self.global_step}")
        return super().forward(x)


def test_failing_probe_pass_records_nan_for_every_tag_and_warns_once(tmp_path):
    mon = AlignmentMonitor(probe=probe(), layers=LAYERS, k=5, every_n_train_steps=2)
    trainer, messages = run(mon, tmp_path, model=ProbeFails(), max_steps=6)
    assert trainer.global_step == 6
    assert len([m for m in messages if "probe pass" in m]) == 1
    for tag, points in mon.history.items():
        assert [s for s, _ in points] == [0, 2, 4, 6], tag
        assert all(math.isnan(v) for _, v in points[1:]), tag


def test_history_is_bounded_thinned_from_the_oldest_and_resumes(tmp_path):
    mon = AlignmentMonitor(probe=probe(), layers=LAYERS, k=5, metrics=("cka",), every_n_train_steps=1, max_history=6)
    trainer, _ = run(mon, tmp_path, max_steps=10)
    steps = [s for s, _ in mon.history["alignment/cka/self_initial/fc"]]
    assert len(steps) <= 6 and steps[0] == 0 and steps[-3:] == [8, 9, 10]  # recent checks dense
    assert steps == sorted(steps)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)

    again = AlignmentMonitor(probe=probe(), layers=LAYERS, k=5, metrics=("cka",), every_n_train_steps=1, max_history=6)
    run(again, tmp_path, max_steps=14, ckpt_path=ckpt)
    resumed = [s for s, _ in again.history["alignment/cka/self_initial/fc"]]
    assert len(resumed) <= 6 and resumed[0] == 0 and resumed[-4:] == [11, 12, 13, 14]


def test_changing_metrics_on_resume_is_a_warning_and_keeps_the_history(tmp_path):
    first = AlignmentMonitor(probe=probe(), layers=LAYERS, k=5, metrics=("cka",), every_n_train_steps=2)
    trainer, _ = run(first, tmp_path, max_steps=4)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)

    second = AlignmentMonitor(probe=probe(), layers=LAYERS, k=5, metrics=("cka", "mutual_knn"), every_n_train_steps=2)
    _, messages = run(second, tmp_path, max_steps=8, ckpt_path=ckpt)
    (message,) = [m for m in messages if "checkpoint's history" in m]
    assert "['cka']" in message and "['mutual_knn'] start at the resumed step" in message
    assert [s for s, _ in second.history["alignment/cka/self_initial/fc"]] == [0, 2, 4, 6, 8]
    assert [s for s, _ in second.history["alignment/mutual_knn/self_initial/fc"]] == [6, 8]


def test_one_layer_model_logs_no_nan_within_model_mean(tmp_path):
    mon = AlignmentMonitor(probe=probe(), layers=["fc"], k=5, every_n_train_steps=2)
    trainer, _ = run(mon, tmp_path, max_steps=2)
    assert not [t for t in mon.history if "mean_offdiag" in t]
    assert not [t for t in trainer.callback_metrics if "mean_offdiag" in t]
    assert all(not math.isnan(v) for points in mon.history.values() for _, v in points)


class FullDiskLogger(CSVLogger):
    """A logger whose disk fills up after its first few writes (every later write raises)."""

    writes = 0

    def log_metrics(self, metrics, step=None):
        FullDiskLogger.writes += 1
        if any(key.startswith("alignment") for key in metrics):
            raise OSError(28, "No space left on device")
        return super().log_metrics(metrics, step)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_failing_logger_is_reported_once_and_training_goes_on(tmp_path, on_error):
    mon = AlignmentMonitor(probe=probe(), layers=LAYERS, k=5, every_n_train_steps=2, on_error=on_error)
    x, y = synthetic_data(64)
    trainer = L.Trainer(max_steps=6, callbacks=[mon], logger=FullDiskLogger(tmp_path), **TRAINER_KW)
    if on_error == "raise":
        with pytest.raises(OSError, match="No space left"):
            trainer.fit(TinyNet(), loader(x, y, batch_size=8))
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyNet(), loader(x, y, batch_size=8))
    assert trainer.global_step == 6
    messages = [str(w.message) for w in caught if "No space left" in str(w.message)]
    assert len(messages) == 1 and "logging the scalars" in messages[0]
    # the values were still computed and kept: the history and callback_metrics have every check
    assert [s for s, _ in mon.history["alignment/cka/self/mean_offdiag"]] == [0, 2, 4, 6]
    assert "alignment/cka/self/mean_offdiag" in trainer.callback_metrics
