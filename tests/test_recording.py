"""record_representations over dataloaders of tensors, tuples, dicts and custom batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prh_lightning import record_representations
from prh_lightning.taps import TapBudgetExceeded


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.drop(self.lin(x))))


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(input_ids)


@pytest.fixture()
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def test_tuple_batches_eval_mode_labels_and_mode_restored(net):
    x = torch.randn(10, 4)
    y = torch.arange(10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    net.train()
    running = net.bn.running_mean.clone()
    reps = record_representations(net, loader, layers=["lin", "bn"], progress=False)
    assert net.training and all(m.training for m in net.modules())
    torch.testing.assert_close(net.bn.running_mean, running)  # eval mode: no statistics update
    net.eval()
    with torch.no_grad():
        h = net.lin(x)
        expected_bn = (h - net.bn.running_mean) / torch.sqrt(net.bn.running_var + net.bn.eps) * net.bn.weight + net.bn.bias
    assert reps.layers == ["lin", "bn"] and reps.n == 10
    torch.testing.assert_close(reps["lin"], h)
    torch.testing.assert_close(reps["bn"], expected_bn)  # dropout off: eval mode
    assert reps.labels.tolist() == list(range(10))
    assert not reps["lin"].requires_grad


def test_tensor_batches_and_max_samples_truncates_the_last_batch(net):
    x = torch.randn(10, 4)
    loader = [x[:4], x[4:8], x[8:]]
    reps = record_representations(net.eval(), loader, layers="lin", max_samples=6, progress=False)
    assert reps.n == 6 and reps.labels is None
    with torch.no_grad():
        torch.testing.assert_close(reps["lin"], net.lin(x[:6]))


def test_dict_batches_pass_keywords_and_keep_labels():
    torch.manual_seed(0)
    model = KeywordNet()
    ids = torch.randint(0, 10, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[0, 3:] = 0
    loader = [{"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3], "labels": torch.tensor([1, 2, 3])} for i in (0, 3)]
    reps = record_representations(model, loader, layers="embed", progress=False)
    emb = model.embed(ids).detach()
    expected = torch.stack([emb[i][mask[i].bool()].mean(0) for i in range(6)])
    torch.testing.assert_close(reps["embed"], expected)
    assert reps.labels.tolist() == [1, 2, 3, 1, 2, 3]


def test_forward_fn_for_other_batches(net):
    x = torch.randn(5, 4)
    loader = [{"payload": {"pixels": x}}]
    reps = record_representations(net.eval(), loader, layers="lin", forward_fn=lambda m, b: m(b["payload"]["pixels"]), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(reps["lin"], net.lin(x))


def test_mode_restored_after_an_error_and_bad_batches_are_explained(net):
    net.train()
    with pytest.raises(TypeError, match="forward_fn"):
        record_representations(net, [object()], layers="lin", progress=False)
    assert net.training and net.bn.training
    with pytest.raises(TapBudgetExceeded):
        record_representations(net, [torch.randn(4, 4)] * 3, layers="lin", max_bytes=4 * 6 * 5, progress=False)
    assert net.training
    with pytest.raises(ValueError, match="max_samples"):
        record_representations(net, [torch.randn(4, 4)], max_samples=-1, progress=False)


def test_progress_bar_and_metadata(net, capsys):
    reps = record_representations(net, [torch.randn(3, 4)], layers="lin", progress=True, metadata={"dataset": "toy"})
    assert reps.metadata["dataset"] == "toy" and reps.metadata["model"] == "TinyNet"
    assert "recording" in capsys.readouterr().err


def test_dataset_indices_become_sample_ids_when_the_sampler_tells_them(net):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    x = torch.randn(9, 4)
    data = TensorDataset(x, torch.arange(9))
    net.eval()
    rank1 = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3))
    reps = record_representations(net, rank1, layers="lin", progress=False)
    ids = list(DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3))  # what rank 1 gets
    assert reps.sample_ids == ids and reps.labels.tolist() == ids  # labels are the indices here
    with torch.no_grad():
        torch.testing.assert_close(reps["lin"], net.lin(x[ids]))
    plain = record_representations(net, DataLoader(data, batch_size=4), layers="lin", max_samples=6, progress=False)
    assert plain.sample_ids == [0, 1, 2, 3, 4, 5]
    torch.manual_seed(0)
    shuffled = record_representations(net, DataLoader(data, batch_size=4, shuffle=True), layers="lin", progress=False)
    assert shuffled.sample_ids is None and sorted(shuffled.labels.tolist()) == list(range(9))
