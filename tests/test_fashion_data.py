"""Fashion-MNIST loading, stratified subsets and the LightningDataModule, on the real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from prh_lightning.data.fashion_mnist import (
    FashionMNISTDataModule,
    FashionMNISTNotFound,
    as_tensors,
    fashion_mnist_root,
    load_fashion_mnist,
    stratified_indices,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_split():
    try:
        return load_fashion_mnist(train=False)
    except FashionMNISTNotFound as err:
        pytest.fail(f"real Fashion-MNIST is needed (apt-get install dataset-fashion-mnist): {err}")


def test_as_tensors_matches_torchvision_images(test_split):
    x, y = as_tensors(test_split)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    for i in (0, 1234, 9999):
        image, label = test_split[i]  # PIL image, int: torchvision's own decoding
        assert torch.equal(x[i], pil_to_tensor(image).float() / 255.0)
        assert int(y[i]) == label
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_stratified_indices_keep_class_shares_and_are_seeded(test_split):
    labels = test_split.targets
    idx = stratified_indices(labels, 500, seed=3)
    assert idx.shape == (500,) and len(set(idx.tolist())) == 500
    assert torch.all(idx[1:] > idx[:-1])  # sorted, no repeats
    counts = np.bincount(labels[idx].numpy(), minlength=10)
    assert counts.tolist() == [50] * 10  # the test split has 1,000 images per class
    assert torch.equal(idx, stratified_indices(labels, 500, seed=3))
    assert not torch.equal(idx, stratified_indices(labels, 500, seed=4))
    assert torch.equal(stratified_indices(labels, None), torch.arange(10000))


@pytest.mark.parametrize("n", [5, 10001])
def test_stratified_indices_reject_impossible_sizes(test_split, n):
    with pytest.raises(ValueError, match="stratified subset needs between 10"):
        stratified_indices(test_split.targets, n)


def test_datamodule_splits_are_disjoint_stratified_and_sized():
    dm = FashionMNISTDataModule(train_size=2000, val_size=500, test_size=1000, batch_size=64, seed=1)
    dm.setup()
    train_x, train_y = dm.train_set.tensors
    val_x, val_y = dm.val_set.tensors
    assert train_x.shape == (2000, 1, 28, 28) and val_x.shape == (500, 1, 28, 28)
    assert len(dm.test_set) == 1000
    # The training split holds 6,000 images per class, so the subsets are exactly balanced.
    assert np.bincount(train_y.numpy(), minlength=10).tolist() == [200] * 10
    assert np.bincount(val_y.numpy(), minlength=10).tolist() == [50] * 10
    # No validation image is also a training image (compare raw pixels).
    train_rows = {row.numpy().tobytes() for row in train_x.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in val_x.flatten(1))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    analysis = dm.analysis_set(300, seed=7)
    assert np.bincount(analysis.tensors[1].numpy(), minlength=10).tolist() == [30] * 10


def test_missing_data_without_network_gives_instructions(tmp_path, monkeypatch):
    import prh_lightning.data.fashion_mnist as fm

    monkeypatch.setenv("PRH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PRH_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FashionMNISTNotFound, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_root(empty)
    with pytest.raises(FashionMNISTNotFound, match="--download"):
        FashionMNISTDataModule(data_dir=empty).setup()
