"""AlignmentTracker in a real Hugging Face ``transformers.Trainer`` run: scalars through
``trainer.log`` (``log_history`` and the TensorBoard integration), state in ``TrainerState`` and
the checkpoint folder, resume; values checked against brute force."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from callback_helpers import HFTiny, Rows, brute_cka, read_scalars, synthetic_data, tiny_features

import transformers
from prh_lightning.integrations.huggingface import SNAPSHOT_FILE, STATE_KEY, AlignmentTrainerCallback
from prh_lightning.tracking import AlignmentTracker

LAYERS = ["conv1", "conv2", "fc"]


def make_trainer(tmp_path, model, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=0.1,
        save_steps=4, logging_steps=100, report_to=["tensorboard"], use_cpu=True, disable_tqdm=True,
        lr_scheduler_type="constant", optim="sgd", seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(*synthetic_data(48)))


def tracker():
    px, py = synthetic_data(40, seed=123)
    return AlignmentTracker(probe={"x": px, "labels": py}, layers=[f"net.{l}" for l in LAYERS], k=5,
                            metrics=("cka",), every_n_steps=2)


def features(model: HFTiny, x):
    return tiny_features(model.net, x)


@pytest.mark.slow
def test_hugging_face_trainer_logs_checkpoints_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    torch.manual_seed(0)
    model = HFTiny()
    initial = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, model, max_steps=6)
    callback = AlignmentTrainerCallback.attach(trainer, tracker())
    trainer.train()

    logged = [(e["step"], e[f"alignment/cka/self_initial/net.fc"]) for e in trainer.state.log_history
              if "alignment/cka/self_initial/net.fc" in e]
    assert [s for s, _ in logged] == [0, 2, 4, 6]
    px, _ = synthetic_data(40, seed=123)
    now, then = features(model, px), features(initial, px)
    for layer in LAYERS:
        tag = f"alignment/cka/self_initial/net.{layer}"
        expected = brute_cka(now[layer], then[layer])
        assert callback.tracker.history[tag][-1] == (6, pytest.approx(expected, abs=1e-4))
    tb = read_scalars(str(tmp_path / "tb"), prefix="train/alignment/")  # the Trainer's "train/" prefix
    assert [s for s, _ in tb["train/alignment/cka/self_initial/net.fc"]] == [0, 2, 4, 6]
    assert [v for _, v in tb["train/alignment/cka/self_initial/net.fc"]] == pytest.approx([v for _, v in logged], abs=1e-6)

    checkpoint = tmp_path / "out" / "checkpoint-4"
    with open(checkpoint / "trainer_state.json") as f:
        saved = json.load(f)["stateful_callbacks"][STATE_KEY]
    assert [p[0] for p in saved["history"]["tags"]["alignment/cka/self_initial/net.fc"]] == [0, 2, 4]
    assert (checkpoint / SNAPSHOT_FILE).exists()

    torch.manual_seed(0)
    resumed_model = HFTiny()
    again = make_trainer(tmp_path / "b", resumed_model, max_steps=8)
    again.args.output_dir = str(tmp_path / "out")
    resumed = AlignmentTrainerCallback.attach(again, tracker())
    again.train(resume_from_checkpoint=str(checkpoint))
    history = resumed.tracker.history["alignment/cka/self_initial/net.fc"]
    assert [s for s, _ in history] == [0, 2, 4, 6, 8]
    assert history[:3] == [(s, pytest.approx(v, abs=1e-6)) for s, v in logged[:3]]
    # self_initial still compares with the weights before the first run, not the resumed ones
    expected = brute_cka(features(resumed_model, px)["fc"], then["fc"])
    assert history[-1][1] == pytest.approx(expected, abs=1e-4)
