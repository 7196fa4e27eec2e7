"""Fashion-MNIST from local files first: ``--data-dir``, the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), a cache, or a download
when online.

torchvision reads ``<root>/FashionMNIST/raw/*-ubyte``. The Debian ``.gz`` files hold the
canonical data but their gzip checksums differ from torchvision's, so we gunzip them
ourselves into a cache root and never let torchvision verify or download over them.

For training and analysis: :func:`as_tensors` (a split as ``[n, 1, 28, 28]`` floats in
``[0, 1]``), :func:`stratified_indices` (seeded class-stratified subsets) and
:class:`FashionMNISTDataModule` (train / held-out validation / test loaders plus
:meth:`~FashionMNISTDataModule.analysis_set`, the N stratified test images of a study).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import FashionMNIST

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = [
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
]
HOW_TO_GET = (
    "Fashion-MNIST was not found. Get it one of these ways:\n"
    "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  (files in /usr/share/datasets/fashion-mnist)\n"
    "  - online: pass --download (torchvision fetches it)\n"
    "  - pass --data-dir DIR, where DIR holds the four *-ubyte(.gz) files or FashionMNIST/raw/"
)


class FashionMNISTNotFound(FileNotFoundError):
    """Raised with instructions when no local copy exists and downloading is off or failed."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRH_CACHE_DIR", Path.home() / ".cache" / "prh_lightning")) / "fashion-mnist"


def _has_raw(root: Path) -> bool:
    return all((root / "FashionMNIST" / "raw" / f).is_file() for f in FILES)


def _source_files(folder: Path) -> dict[str, Path] | None:
    """The four files in ``folder`` (plain or .gz), or None if any is missing."""
    found = {}
    for name in FILES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


def _unpack_into(files: dict[str, Path], root: Path) -> Path:
    """Copy/gunzip ``files`` into ``root/FashionMNIST/raw`` atomically (a temp dir, then rename)."""
    raw = root / "FashionMNIST" / "raw"
    raw.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".raw-", dir=raw.parent))
    try:
        for name, src in files.items():
            opener = gzip.open if src.suffix == ".gz" else open
            with opener(src, "rb") as fin, open(tmp / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        if raw.exists():
            shutil.rmtree(raw)
        os.replace(tmp, raw)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def fashion_mnist_root(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """A torchvision root holding ``FashionMNIST/raw/*-ubyte``, preparing it if needed.

    Looks in ``data_dir`` (a torchvision root, or a folder of the four files), then
    ``$PRH_FASHION_MNIST_DIR``, the Debian package, the cache; downloads into the cache
    only when ``download`` is true. Raises :class:`FashionMNISTNotFound` otherwise.
    """
    candidates = [Path(p) for p in (data_dir, os.environ.get("PRH_FASHION_MNIST_DIR")) if p]
    cache = default_cache_dir()
    for folder in candidates:
        if _has_raw(folder):
            return folder
        files = _source_files(folder) or _source_files(folder / "FashionMNIST" / "raw")
        if files:
            return _unpack_into(files, cache)
    if _has_raw(cache):
        return cache
    files = _source_files(DEBIAN_DIR)
    if files:
        return _unpack_into(files, cache)
    if download:
        try:
            FashionMNIST(str(cache), train=False, download=True)
            FashionMNIST(str(cache), train=True, download=True)
            return cache
        except Exception as err:  # network errors come in many types
            raise FashionMNISTNotFound(f"{HOW_TO_GET}\n(download failed: {err})") from None
    if data_dir is not None:
        raise FashionMNISTNotFound(f"no Fashion-MNIST files in {data_dir}.\n{HOW_TO_GET}")
    raise FashionMNISTNotFound(HOW_TO_GET)


def load_fashion_mnist(train: bool, data_dir=None, download: bool = False, transform=None) -> FashionMNIST:
    """torchvision's ``FashionMNIST`` split read from :func:`fashion_mnist_root` (never re-downloaded)."""
    root = fashion_mnist_root(data_dir, download=download)
    return FashionMNIST(str(root), train=train, download=False, transform=transform)


# -- tensors, stratified subsets and a LightningDataModule ------------------------------

def as_tensors(dataset: FashionMNIST) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 1, 28, 28]`` float in ``[0, 1]`` and labels ``[n]`` int64 of a split.

    Reads torchvision's decoded arrays directly (no PIL round trip per image).
    """
    images = dataset.data.unsqueeze(1).float().div_(255.0)
    return images, dataset.targets.long().clone()


def stratified_indices(labels: torch.Tensor, n: int | None, seed: int = 0) -> torch.Tensor:
    """Sorted indices ``[n]`` of a class-stratified random subset of ``labels [N]``.

    Each class keeps its share of ``n`` (scikit-learn's stratified split, seeded);
    ``n=None`` or ``n == N`` keeps everything.
    """
    total = int(labels.numel())
    if n is None or n == total:
        return torch.arange(total)
    classes = int(labels.unique().numel())
    if not isinstance(n, int) or not classes <= n <= total:
        raise ValueError(f"a stratified subset needs between {classes} (one per class) and {total} samples, got {n!r}")
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(total), train_size=n, stratify=labels.numpy(), random_state=seed)
    return torch.as_tensor(np.sort(chosen))


class FashionMNISTDataModule(LightningDataModule):
    """Fashion-MNIST as ``(x [b, 1, 28, 28] in [0, 1], y [b])`` batches, local files first.

    Args:
        data_dir, download: where to look / whether to download (see :func:`fashion_mnist_root`).
        batch_size: batch size of every loader.
        train_size: stratified training subset size (None: the 60k training images less ``val_size``).
        val_size: stratified validation images held out of the training split (0: none).
        test_size: stratified test subset size (None: all 10k test images).
        seed: seeds the subsets and the training shuffle.
        num_workers: DataLoader workers (the data sit in memory, so 0 is usually fastest).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        download: bool = False,
        batch_size: int = 128,
        train_size: int | None = None,
        val_size: int = 1000,
        test_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir, self.download = data_dir, download
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.train_set = self.val_set = self.test_set = None
        self._test_tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare_data(self) -> None:
        fashion_mnist_root(self.data_dir, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = fashion_mnist_root(self.data_dir, download=self.download)
        x, y = as_tensors(FashionMNIST(str(root), train=True, download=False))
        self.train_set, self.val_set = self._split_train(x, y)
        tx, ty = as_tensors(FashionMNIST(str(root), train=False, download=False))
        self._test_tensors = (tx, ty)
        keep = stratified_indices(ty, self.test_size, self.seed)
        self.test_set = TensorDataset(tx[keep], ty[keep])

    def _split_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple[TensorDataset, TensorDataset | None]:
        """Stratified held-out validation images, then a stratified training subset of the rest."""
        rest = torch.arange(len(y))
        val = None
        if self.val_size:
            val_idx = stratified_indices(y, self.val_size, self.seed)
            val = TensorDataset(x[val_idx], y[val_idx])
            rest = rest[~torch.isin(rest, val_idx)]
        pick = rest[stratified_indices(y[rest], self.train_size, self.seed)]
        return TensorDataset(x[pick], y[pick]), val

    def analysis_set(self, n: int, seed: int | None = None) -> TensorDataset:
        """A stratified, seeded subset of ``n`` test images ``(x [n, 1, 28, 28], y [n])``."""
        self.setup()
        tx, ty = self._test_tensors
        keep = stratified_indices(ty, n, self.seed if seed is None else seed)
        return TensorDataset(tx[keep], ty[keep])

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=gen, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
