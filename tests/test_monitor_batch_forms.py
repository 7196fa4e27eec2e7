"""Probe batches of the forms real training code uses, and every Lightning precision, in real
Trainer runs; logged values checked against brute force on features recorded by hooks written
here (independent of prh_lightning's taps)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from callback_helpers import TRAINER_KW, TinyNet, brute_cka, brute_mutual_knn, loader, synthetic_data, tiny_features
from lightning.pytorch.demos.transformer import LightningTransformer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prh_lightning.callbacks import AlignmentMonitor
from prh_lightning.tracking import ForwardError, make_probe

VOCAB, T = 33, 6


def fit(model, mon, train, tmp_path, max_steps=2, **kw):
    trainer = L.Trainer(max_steps=max_steps, callbacks=[mon], logger=CSVLogger(tmp_path), **{**TRAINER_KW, **kw})
    trainer.fit(model, train)
    return trainer


def recorded(model, modules, call):
    """``{name: [n, d]}``: the last output of each module during ``call()``, mean over tokens, by hand."""
    out, handles = {}, []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o.detach())))
    model.eval()
    with torch.no_grad():
        call()
    for h in handles:
        h.remove()
    return {k: (v.float().mean(dim=1) if v.ndim == 3 else v.float()) for k, v in out.items()}


class DemoTransformer(LightningTransformer):
    """Lightning's demo LM (forward(inputs, target)), without the WikiText2 download."""

    def prepare_data(self):
        pass


def test_lightning_demo_transformer_forward_with_two_inputs(tmp_path):
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (48, T + 1), generator=g)
    pairs = TensorDataset(tokens[:, :-1], tokens[:, 1:])  # (inputs, target), as WikiText2 yields
    model = DemoTransformer(vocab_size=VOCAB)
    layers = ["model.embedding", "model.decoder"]
    reference = torch.randn(32, 5, generator=g)
    mon = AlignmentMonitor(
        probe=DataLoader(TensorDataset(*pairs[:32]), batch_size=8), layers=layers, k=5,
        references={"r": reference}, every_n_train_steps=2,
    )
    fit(model, mon, DataLoader(pairs, batch_size=8), tmp_path)
    x, t = pairs[:32]
    feats = recorded(model, {"model.embedding": model.model.embedding, "model.decoder": model.model.decoder},
                     lambda: model(x, t))
    last = {tag: points[-1][1] for tag, points in mon.history.items()}
    for layer in layers:
        assert last[f"alignment/cka/r/{layer}"] == pytest.approx(brute_cka(feats[layer], reference), abs=1e-4)
        assert last[f"alignment/mutual_knn/r/{layer}"] == pytest.approx(brute_mutual_knn(feats[layer], reference, 5))


class TargetConditioned(L.LightningModule):
    """forward(x, target): a model input named like a label (it must not be dropped)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(8 * 8, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, x, target):
        return self.head(torch.tanh(self.body(x.flatten(1)) + self.embed(target)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"], batch["target"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dict_loader(x, y, **kw):
    return DataLoader([{"x": a, "target": b} for a, b in zip(x, y)], batch_size=8, **kw)


def test_dict_batch_keys_named_like_labels_reach_the_model(tmp_path):
    x, y = synthetic_data(40, seed=4)
    model = TargetConditioned()
    mon = AlignmentMonitor(probe=dict_loader(x, y), layers=["body", "head"], k=5, every_n_train_steps=2)
    fit(model, mon, dict_loader(*synthetic_data(48)), tmp_path)
    assert torch.equal(mon.probe.labels, y)  # also read as labels (for references fed class names)
    feats = recorded(model, {"body": model.body, "head": model.head}, lambda: model(x, y))
    expected = brute_cka(feats["body"], feats["head"])
    assert mon.history["alignment/cka/self/mean_offdiag"][-1][1] == pytest.approx(expected, abs=1e-4)


class WholeBatch(TinyNet):
    """forward(self, batch): the LightningModule takes the whole (x, y) batch."""

    def forward(self, batch):
        return super().forward(batch[0])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch[1])


class NoForward(TinyNet):
    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(TinyNet.forward(self, batch[0]), batch[1])


def test_forward_taking_the_batch_and_a_module_without_forward(tmp_path):
    x, y = synthetic_data(40, seed=4)
    model = WholeBatch()
    mon = AlignmentMonitor(probe=(x, y), layers=["conv1", "fc"], k=5, every_n_train_steps=2)
    fit(model, mon, loader(*synthetic_data(48)), tmp_path)
    model.eval()
    with torch.no_grad():
        expected = brute_cka(model.conv1(x).mean(dim=(2, 3)), model((x, y)))
    assert mon.history["alignment/cka/self/mean_offdiag"][-1][1] == pytest.approx(expected, abs=1e-4)

    with pytest.raises(ForwardError, match=r"NoForward has no forward\(\); pass forward_fn="):
        fit(NoForward(), AlignmentMonitor(probe=(x, y), layers=["fc"], k=5), loader(*synthetic_data(48)), tmp_path)
    mon = AlignmentMonitor(probe=(x, y), layers=["conv1", "fc"], k=5, every_n_train_steps=2,
                           forward_fn=lambda m, b: TinyNet.forward(m, b[0]))  # the documented hook
    model = NoForward()
    fit(model, mon, loader(*synthetic_data(48)), tmp_path)
    model.eval()
    with torch.no_grad():
        expected = brute_cka(model.conv1(x).mean(dim=(2, 3)), TinyNet.forward(model, x))
    assert [s for s, _ in mon.history["alignment/cka/self/mean_offdiag"]] == [0, 2]
    assert mon.history["alignment/cka/self/mean_offdiag"][-1][1] == pytest.approx(expected, abs=1e-4)


def test_a_batch_that_fits_no_signature_names_forward_fn(tmp_path):
    class ThreeInputs(TinyNet):
        def forward(self, a, b, c):
            return super().forward(a)

    x, y = synthetic_data(40, seed=4)
    with pytest.raises(ForwardError, match=r"takes 3 required input\(s\).*tuple of 2.*forward_fn="):
        fit(ThreeInputs(), AlignmentMonitor(probe=(x, y), layers=["fc"], k=5), loader(*synthetic_data(48)), tmp_path)


class MaskedEncoder(L.LightningModule):
    """Token embeddings and a classifier over the masked mean; forward(input_ids, attention_mask)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        m = attention_mask[..., None].float()
        return self.head((h * m).sum(1) / m.sum(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def pad_collate(items):
    """Pads each batch to its own longest sequence (as DataCollatorWithPadding does)."""
    longest = max(len(ids) for ids, _ in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for i, (seq, _) in enumerate(items):
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([label for _, label in items])}


def test_per_batch_padding_is_padded_once_and_stays_masked(tmp_path):
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(2, 9, (40,), generator=g)
    lengths[:8] = 3  # the first batch is shorter than the probe's longest sequence
    items = [(torch.randint(1, VOCAB, (int(n),), generator=g), int(i % 3)) for i, n in enumerate(lengths)]
    probe = DataLoader(items, batch_size=8, collate_fn=pad_collate)
    batch = make_probe(probe, None).batch
    assert batch["input_ids"].shape == (40, int(lengths.max()))
    assert torch.equal(batch["attention_mask"].sum(1), lengths)

    model = MaskedEncoder()
    reference = torch.randn(40, 4, generator=g)
    mon = AlignmentMonitor(probe=probe, layers=["embed"], k=5, references={"r": reference}, every_n_train_steps=2)
    fit(model, mon, DataLoader(items, batch_size=8, collate_fn=pad_collate), tmp_path)
    with torch.no_grad():  # each sequence's mean embedding over its own tokens, no padding anywhere
        truth = torch.stack([model.embed(seq).mean(0) for seq, _ in items])
        padded_mean = model.embed(batch["input_ids"]).mean(1)
    expected = brute_cka(truth, reference)
    assert mon.history["alignment/cka/r/embed"][-1][1] == pytest.approx(expected, abs=1e-4)
    assert abs(brute_cka(padded_mean, reference) - expected) > 1e-3  # padding averaged in would differ


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-mixed", "64-true"])
def test_every_precision_setting(tmp_path, precision):
    x, y = synthetic_data(40, seed=4)
    model = TinyNet()
    mon = AlignmentMonitor(probe=(x, y), layers=["conv1", "conv2", "fc"], k=5, every_n_train_steps=2,
                           on_error="raise")
    fit(model, mon, loader(*synthetic_data(48)), tmp_path, precision=precision)
    reference = TinyNet()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    feats = tiny_features(reference, x)
    expected = brute_cka(feats["conv1"], feats["fc"])
    got = mon.history["alignment/cka/self_initial/fc"]
    assert [s for s, _ in got] == [0, 2]
    tolerance = 1e-4 if precision == "64-true" else 3e-2  # 8- or 11-bit mantissas in the probe pass
    assert mon.last_matrices["cka/self"][0, 2].item() == pytest.approx(expected, abs=tolerance)
    assert mon.last_matrices["cka/self"].dtype == torch.float32
