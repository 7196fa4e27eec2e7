"""AlignmentMonitor on real data: FashionCNN trained on real Fashion-MNIST images, monitored
against all-MiniLM-L6-v2 reading the class name of each probe image (cross-modal)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from callback_helpers import TRAINER_KW, brute_cka, event_accumulator, read_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import ToTensor

from prh_lightning.callbacks import AlignmentMonitor, Reference
from prh_lightning.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from prh_lightning.models.fashion_cnn import FashionCNN
from prh_lightning.models.pretrained import load_minilm


@pytest.mark.slow
def test_fashion_cnn_against_minilm_on_class_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.seed_everything(0)
        test = load_fashion_mnist(train=False, transform=ToTensor())
        train = load_fashion_mnist(train=True, transform=ToTensor())
        probe = DataLoader(Subset(test, range(128)), batch_size=64)
        minilm = load_minilm()
        monitor = AlignmentMonitor(
            probe=probe,
            # k-NN lists are undefined against 10 distinct class-name rows: CKA only for this reference
            references={"minilm": Reference(minilm, inputs=lambda x, y: [CLASS_NAMES[int(i)] for i in y],
                                            metrics=("cka",))},
            layers=list(FashionCNN.TAP_LAYERS),
        )
        model = FashionCNN(channels=(8, 16))
        trainer = L.Trainer(max_epochs=1, logger=TensorBoardLogger(tmp_path), callbacks=[monitor], **TRAINER_KW)
        trainer.fit(
            model,
            DataLoader(Subset(train, range(640)), batch_size=64, shuffle=True),
            DataLoader(Subset(test, range(1000, 1128)), batch_size=128),
        )
    finally:
        torch.set_num_threads(threads)

    scalars = read_scalars(str(tmp_path))
    assert not [tag for tag in scalars if tag.startswith("alignment/mutual_knn/minilm")]
    for metric in ("cka",):
        for layer in ("best", *FashionCNN.TAP_LAYERS):
            points = scalars[f"alignment/{metric}/minilm/{layer}"]
            assert [s for s, _ in points] == [0, 9]  # train start, validation end (self.log's step)
            assert all(0.0 <= v <= 1.0 for _, v in points)

    # brute force: the class-name embeddings of the probe labels vs the trained avgpool features
    x = torch.stack([test[i][0] for i in range(128)])
    y = torch.tensor([test[i][1] for i in range(128)])
    text = minilm.encode([CLASS_NAMES[int(i)] for i in y], convert_to_tensor=True).cpu()
    model.eval()
    with torch.no_grad():
        hidden = model.pool1(model.relu1(model.conv1((x - model.mean) / model.std)))
        pooled = model.avgpool(model.relu2(model.conv2(hidden)))
    # (CKA: the text side has only 10 distinct rows, so k-NN lists there depend on tie-breaking)
    expected = brute_cka(pooled.flatten(1), text)
    assert scalars["alignment/cka/minilm/avgpool"][-1][1] == pytest.approx(expected, abs=1e-4)
    # training pulls the image features towards the class structure the text embedding encodes
    first, last = (scalars["alignment/cka/minilm/avgpool"][i][1] for i in (0, -1))
    assert last > first

    images = event_accumulator(str(tmp_path)).Tags()["images"]
    assert "alignment_heatmap/cka/minilm" in images and "alignment_curves/cka/minilm" in images
    assert "alignment_heatmap/mutual_knn/self" in images and "alignment_heatmap/mutual_knn/minilm" not in images
