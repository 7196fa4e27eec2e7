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


# -- sample ids, accumulation, several dataloaders, precision, compile ------------------------
class TwoValSets(TinyNet):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


@pytest.mark.slow
def test_sample_ids_and_one_file_per_validation_dataloader(tmp_path):
    L.seed_everything(0)
    x, y = synthetic_data(32)
    sets = [synthetic_data(20, seed=1), synthetic_data(12, seed=2)]
    recorder = RepresentationRecorder(tmp_path, layers=LAYERS)
    model = TwoValSets()
    trainer = L.Trainer(max_epochs=1, callbacks=[recorder], logger=False, **TRAINER_KW)
    trainer.fit(model, loader(x, y), [loader(*sets[0], batch_size=8), loader(*sets[1], batch_size=5)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["validate-epoch000-step000002-dl0.safetensors", "validate-epoch000-step000002-dl1.safetensors"]
    for name, (vx, vy), idx in zip(names, sets, (0, 1)):
        reps = Representations.load(tmp_path / name)
        assert reps.n == len(vx) and reps.sample_ids == list(range(len(vx))) and torch.equal(reps.labels, vy)
        assert reps.metadata["dataloader_idx"] == idx and reps.metadata["sample_order"] == "dataset order"
        expected = tiny_features(model, vx)
        for layer in LAYERS:
            torch.testing.assert_close(reps[layer], expected[layer], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_shuffled_loader_rows_carry_no_ids_and_say_so(tmp_path):
    x, y = synthetic_data(16)
    recorder = RepresentationRecorder(tmp_path, layers=["fc"], stages="test")
    model = TinyNet()
    trainer = L.Trainer(callbacks=[recorder], logger=False, **TRAINER_KW)
    torch.manual_seed(3)
    trainer.test(model, loader(x, y, batch_size=4, shuffle=True))
    reps = Representations.load(recorder.saved[0])
    assert reps.sample_ids is None and reps.metadata["sample_order"] == "as seen"
    # the rows are still the samples, with their own labels: match each row to its sample
    expected = tiny_features(model, x)["fc"]
    match = torch.cdist(reps["fc"], expected).argmin(1)
    assert sorted(match.tolist()) == list(range(16)) and torch.equal(reps.labels, y[match])


@pytest.mark.slow
def test_one_probe_pass_per_optimizer_step_with_gradient_accumulation(tmp_path, monkeypatch):
    import prh_lightning.callbacks.representation_recorder as module

    passes = []
    real = module.probe_pass
    monkeypatch.setattr(module, "probe_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    x, y = synthetic_data(64)
    px, py = synthetic_data(12, seed=9)
    recorder = RepresentationRecorder(tmp_path, layers=LAYERS, stages="train", every_n_train_steps=1, probe=(px, py))
    model = TinyNet()
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=4, callbacks=[recorder], logger=False, **TRAINER_KW)
    trainer.fit(model, loader(x, y, batch_size=4))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"train-epoch000-step{s:06d}.safetensors" for s in (1, 2, 3, 4)]
    assert len(passes) == 4 and len(recorder.saved) == 4  # 16 batches, 4 optimizer steps, 4 passes
    last = Representations.load(tmp_path / names[-1])
    expected = tiny_features(model, px)
    for layer in LAYERS:
        torch.testing.assert_close(last[layer], expected[layer], atol=1e-5, rtol=1e-5)
    assert last.sample_ids == list(range(12)) and torch.equal(last.labels, py)


@pytest.mark.slow
def test_bf16_model_features_are_stored_as_float32(tmp_path):
    x, y = synthetic_data(24)
    recorder = RepresentationRecorder(tmp_path, layers=LAYERS, stages=("test", "train"), probe=(x[:10], y[:10]),
                                      every_n_train_steps=1)
    model = TinyNet()
    trainer = L.Trainer(max_steps=1, precision="bf16-true", callbacks=[recorder], logger=False, **TRAINER_KW)
    trainer.fit(model, loader(x, y, batch_size=8))
    trainer.test(model, loader(x, y, batch_size=8))
    train, test = (Representations.load(p) for p in recorder.saved)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        expected = {k: v.float() for k, v in tiny_features(model, x.bfloat16()).items()}
    for layer in LAYERS:
        assert test[layer].dtype == train[layer].dtype == torch.float32
        torch.testing.assert_close(test[layer], expected[layer], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(train[layer], expected[layer][:10], atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_compiled_lightning_module_is_recorded_eagerly(tmp_path):
    x, y = synthetic_data(24)
    vx, vy = synthetic_data(16, seed=4)
    recorder = RepresentationRecorder(tmp_path, layers=LAYERS)
    model = TinyNet()
    trainer = L.Trainer(max_epochs=1, callbacks=[recorder], logger=False, **TRAINER_KW)
    trainer.fit(torch.compile(model, backend="eager"), loader(x, y), loader(vx, vy, batch_size=8))
    reps = Representations.load(recorder.saved[0])
    assert model._compiler_ctx is not None  # still compiled after the recording
    expected = tiny_features(model, vx)
    for layer in LAYERS:
        torch.testing.assert_close(reps[layer], expected[layer], atol=1e-5, rtol=1e-5)


class PaddedTokens(L.LightningModule):
    """Token embeddings -> Linear, padding marked by ``padding_mask`` (True = padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6)
        self.proj = torch.nn.Linear(6, 4)

    def forward(self, tokens, padding_mask):
        return self.proj(self.embed(tokens))

    def training_step(self, batch, batch_idx):
        return self(batch["tokens"], batch["padding_mask"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self(batch["tokens"], batch["padding_mask"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_padding_mask_under_another_name_reaches_the_taps(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (12, 7), generator=g)
    lengths = torch.randint(1, 8, (12,), generator=g)
    pad = torch.arange(7)[None] >= lengths[:, None]
    rows = [{"tokens": tokens[i], "padding_mask": pad[i]} for i in range(12)]
    batches = DataLoader(rows, batch_size=4)
    recorder = RepresentationRecorder(
        tmp_path, layers=["proj"], stages=("validate", "train"), every_n_train_steps=1,
        probe={"tokens": tokens, "padding_mask": pad}, tap_kwargs={"mask_key": "padding_mask"},
    )
    model = PaddedTokens()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[recorder], logger=False, **TRAINER_KW)
    trainer.fit(model, batches, batches)
    with torch.no_grad():
        out = model.proj(model.embed(tokens))
    expected = torch.stack([out[i, : lengths[i]].mean(0) for i in range(12)])  # real tokens only
    for path in recorder.saved:
        torch.testing.assert_close(Representations.load(path)["proj"], expected)
    assert sorted(p.name.split("-")[0] for p in recorder.saved) == ["train", "validate"]
