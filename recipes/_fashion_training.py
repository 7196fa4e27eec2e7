"""Data, label texts, models and training of the ``fashion-mnist`` recipe."""

from __future__ import annotations

from typing import Any

import torch

from prh_lightning.data.fashion_mnist import CLASS_NAMES, FashionMNISTDataModule
from prh_lightning.models.pretrained import PretrainedUnavailable
from prh_lightning.recipes._common import RecipeInputError
from prh_lightning.recipes._fashion_settings import (
    CNN_LAYERS,
    RESNET_LAYERS,
    SPOKEN_NAMES,
    TEMPLATES,
    Settings,
    say,
)


def data_module(s: Settings, train_size: int | None) -> FashionMNISTDataModule:
    """A set-up data module with ``train_size`` training images (seeded, stratified)."""
    dm = FashionMNISTDataModule(s.data_dir, s.download, batch_size=s.batch_size, train_size=train_size,
                                val_size=s.val_size, test_size=s.test_size, seed=s.seed)
    dm.setup()
    return dm


def label_texts() -> dict[str, list[list[str]]]:
    """Per class, the texts MiniLM encodes: ``names`` (the bare label, as the seed) and ``templates``."""
    return {
        "names": [[name] for name in CLASS_NAMES],
        "templates": [[t.format(name) for t in TEMPLATES] for name in SPOKEN_NAMES],
    }


def encode_labels(minilm, texts: list[list[str]]) -> torch.Tensor:
    """MiniLM embeddings ``[10, 384]``: the mean of each class's unit-norm sentence embeddings."""
    flat = [t for group in texts for t in group]
    emb = minilm.encode(flat, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False).cpu()
    sizes = [len(group) for group in texts]
    return torch.stack([chunk.mean(0) for chunk in torch.split(emb, sizes)])


def resnet_weights(s: Settings) -> tuple[str, dict[str, torch.Tensor] | None, str]:
    """``(kind, state dict or None, note)`` for ``--resnet-weights``.

    ``auto`` tries ImageNet (cache, then download) and falls back to ``scratch`` with a note;
    ``imagenet`` raises :class:`PretrainedUnavailable` when the weights cannot be had.
    """
    from prh_lightning.models.resnet import imagenet_state_dict, load_state_file

    choice = s.resnet_weights
    if choice == "scratch":
        return "scratch", None, ""
    if choice not in ("auto", "imagenet"):
        try:
            return f"file:{choice}", load_state_file(choice), ""
        except ValueError as err:
            raise RecipeInputError(f"--resnet-weights {choice}: {err}") from None
    try:
        return "imagenet", imagenet_state_dict(), ""
    except PretrainedUnavailable as err:
        if choice == "imagenet":
            raise
        say(s, f"ResNet-18: {err}")
        return "scratch", None, "the ImageNet weights could not be had (offline?), so it was trained from scratch"


def build_resnet(s: Settings) -> tuple[Any, dict[str, Any]]:
    """Grayscale ResNet-18 and ``{weights, note, input_size, needs_training, training}``.

    Pretrained weights (ImageNet or a file) keep their backbone frozen and get a linear
    probe, unless the file also holds a 10-class head; scratch trains the whole network.
    """
    from prh_lightning.models.resnet import GrayResNet18

    kind, state, note = resnet_weights(s)
    pretrained = state is not None
    # RGB weights (ImageNet) expect ImageNet-normalised, larger images; gray ones are Fashion-MNIST's own.
    rgb = pretrained and state.get("conv1.weight", torch.empty(0, 1)).shape[1] == 3
    size = s.resnet_input_size or (64 if rgb else None)
    model = GrayResNet18(input_size=size, pretrained=rgb, freeze_backbone=pretrained, lr=1e-3)
    try:
        head_loaded = model.load_backbone(state) if pretrained else False
    except ValueError as err:
        raise RecipeInputError(f"--resnet-weights {s.resnet_weights}: {err}") from None
    training = "whole network" if not pretrained else ("none" if head_loaded else "linear probe (fc)")
    info = {"weights": kind, "note": note, "input_size": size or 28, "needs_training": not head_loaded,
            "training": training}
    return model, info


# -- training ----------------------------------------------------------------------------

def make_trainer(s: Settings, name: str, epochs: int, callbacks: list | None = None):
    """A CPU Trainer logging to ``OUT/tensorboard/<name>``."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(s.out), name="tensorboard", version=name, default_hp_metric=False)
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks or [],
                   enable_checkpointing=False, enable_progress_bar=s.progress, enable_model_summary=False,
                   log_every_n_steps=10, num_sanity_val_steps=0, deterministic=False)


def fit_and_test(trainer, model, dm: FashionMNISTDataModule, train: bool = True) -> float:
    """Train (optionally) and return test accuracy on ``dm``'s test set."""
    if train:
        trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)
    return float(result[0]["test_acc"])


def alignment_monitor(s: Settings, probe: tuple[torch.Tensor, torch.Tensor], minilm, resnet):
    """Monitor FashionCNN's layers against MiniLM (the probe's class names) and ResNet."""
    from prh_lightning.callbacks import AlignmentMonitor, Reference

    def class_names(x: torch.Tensor, y: torch.Tensor) -> list[str]:
        return [CLASS_NAMES[i] for i in y.tolist()]

    references = {
        # 1,000 probe rows, 10 distinct class-name embeddings: neighbour lists are undefined there
        "minilm": Reference(minilm, inputs=class_names, metrics=("cka",)),
        "resnet": Reference(resnet, layers=RESNET_LAYERS),
    }
    return AlignmentMonitor(probe=probe, references=references, metrics=("cka", "mutual_knn"), layers=CNN_LAYERS,
                            every_n_train_steps=s.monitor_every, max_probe_samples=s.probe_size,
                            log_images=4, snapshots=False)



def record(model, dataset, layers: list[str], s: Settings):
    """Mean-pooled features of ``layers`` on ``dataset``: ``Representations`` with labels."""
    from torch.utils.data import DataLoader

    from prh_lightning import record_representations

    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    return record_representations(model, loader, layers=layers, reduce="mean", progress=s.progress)


def train_models(s: Settings, minilm, resnet, info: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Train ResNet-18 if needed, then FashionCNN with the AlignmentMonitor; returns both and facts."""
    from prh_lightning.models.fashion_cnn import FashionCNN

    resnet_dm = data_module(s, s.resnet_train_size)
    say(s, f"ResNet-18: weights {info['weights']}, training: {info['training']}")
    resnet_acc = fit_and_test(make_trainer(s, "resnet", s.resnet_epochs), resnet, resnet_dm, train=info["needs_training"])
    resnet.eval()
    cnn_dm = data_module(s, s.train_size)
    probe_set = cnn_dm.analysis_set(s.probe_size, seed=s.seed + 1)
    monitor = alignment_monitor(s, probe_set.tensors, minilm, resnet)
    cnn = FashionCNN(lr=s.lr)
    say(s, f"FashionCNN: {s.epochs} epochs on {len(cnn_dm.train_set)} images, AlignmentMonitor every {s.monitor_every} steps")
    cnn_acc = fit_and_test(make_trainer(s, "fashion_cnn", s.epochs, [monitor]), cnn, cnn_dm)
    facts = {
        "resnet": info,
        "test_accuracy": {"fashioncnn": cnn_acc, "resnet": resnet_acc},
        "test_images": len(cnn_dm.test_set),
        "train_images": {"fashioncnn": len(cnn_dm.train_set),
                         "resnet": len(resnet_dm.train_set) if info["needs_training"] else 0},
        "monitor_final": {tag: points[-1][1] for tag, points in monitor.history.items() if tag.endswith("/best")},
        "monitor_history": {tag: points for tag, points in monitor.history.items() if tag.startswith("alignment/cka/")},
        "analysis_set": cnn_dm.analysis_set(s.n_samples),
    }
    return cnn, resnet, facts


def save_representations(s: Settings, cnn, resnet, texts: dict[str, torch.Tensor]) -> None:
    """``OUT/representations/*.safetensors``: both models' layers and MiniLM's label embeddings."""
    from prh_lightning import Representations

    folder = s.out / "representations"
    cnn.save(folder / "fashioncnn.safetensors")
    resnet.save(folder / "resnet.safetensors")
    Representations(texts, labels=torch.arange(len(CLASS_NAMES)),
                    metadata={"model": "all-MiniLM-L6-v2", "classes": CLASS_NAMES}).save(folder / "minilm_labels.safetensors")

