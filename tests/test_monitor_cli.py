"""AlignmentMonitor configured by LightningCLI: from a YAML file (a reference by registered name
fed the class names of the probe labels) and from ``--trainer.callbacks+=`` with no arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from callback_helpers import TinyNet, brute_cka, loader, synthetic_data, tiny_features
from lightning.pytorch.cli import LightningCLI

from prh_lightning.callbacks import AlignmentMonitor

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class TinyData(L.LightningDataModule):
    def train_dataloader(self):
        return loader(*synthetic_data(64))

    def val_dataloader(self):
        return loader(*synthetic_data(40, seed=5))


def cli(args):
    return LightningCLI(TinyNet, TinyData, args=args, save_config_callback=None, run=True)


def trainer_args(tmp_path):
    return ["--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_model_summary=false"]


@pytest.mark.slow
def test_yaml_config_with_a_registered_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path}}}
  callbacks:
    - class_path: prh_lightning.callbacks.AlignmentMonitor
      init_args:
        metrics: [cka]
        layers: [conv1, conv2, fc]
        k: 5
        references:
          names: {{model: minilm, class_names: {NAMES}}}
""")
    run = cli(["fit", f"--config={config}", *trainer_args(tmp_path)])
    (mon,) = [c for c in run.trainer.callbacks if isinstance(c, AlignmentMonitor)]
    assert [s for s, _ in mon.history["alignment/cka/names/fc"]] == [0, 4]  # train start, validation end

    from prh_lightning.models.pretrained import load_minilm

    x, y = synthetic_data(40, seed=5)  # probe="val": the whole 40-sample validation set
    text = load_minilm().encode([NAMES[int(i)] for i in y], convert_to_tensor=True).cpu()
    feats = tiny_features(run.model, x)
    for layer in ("conv1", "conv2", "fc"):
        expected = brute_cka(feats[layer], text)
        assert mon.history[f"alignment/cka/names/{layer}"][-1][1] == pytest.approx(expected, abs=1e-4)


def test_callbacks_plus_equals_with_no_arguments(tmp_path):
    run = cli(["fit", "--trainer.callbacks+=prh_lightning.callbacks.AlignmentMonitor",
               "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
               *trainer_args(tmp_path)])
    (mon,) = [c for c in run.trainer.callbacks if isinstance(c, AlignmentMonitor)]
    assert mon.probe.n == 40 and torch.equal(mon.probe.labels, synthetic_data(40, seed=5)[1])
    steps = [s for s, _ in mon.history["alignment/mutual_knn/self/mean_offdiag"]]
    assert steps == [0, 4]


@pytest.mark.parametrize(("value", "expected"), [("4GB", 4 * 10**9), ("512 MiB", 512 * 2**20), ("3000000", 3_000_000)])
def test_calibration_max_memory_from_yaml(tmp_path, value, expected):
    # a plain YAML value (a string with a unit, or bytes) reaches the chance levels' budget
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  callbacks:
    - class_path: prh_lightning.callbacks.AlignmentMonitor
      init_args:
        calibration_max_memory: {value}
""")
    run = LightningCLI(TinyNet, TinyData, args=[f"--config={config}", *trainer_args(tmp_path)], save_config_callback=None, run=False)
    (mon,) = [c for c in run.trainer.callbacks if isinstance(c, AlignmentMonitor)]
    assert mon.tracker.chance.max_memory == expected
