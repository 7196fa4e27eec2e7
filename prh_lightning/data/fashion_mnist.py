"""Fashion-MNIST from local files first, downloaded (and checked) otherwise.

Where a copy is looked for, in order:

1. ``data_dir`` (``--data-dir``), else ``$PRH_FASHION_MNIST_DIR``: a torchvision root
   (``FashionMNIST/raw/*-ubyte``) or a folder of the four files (plain or ``.gz``). When one
   of these is given it is *the* place: if it is empty the data is downloaded into it (or an
   error names it), never silently replaced by another copy.
2. the cache, ``$PRH_CACHE_DIR/fashion-mnist``, else ``$XDG_CACHE_HOME/prh-lightning/fashion-mnist``,
   else ``~/.cache/prh-lightning/fashion-mnist``;
3. the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
   unpacked into the cache;
4. a download into the cache (on by default; ``download=False`` / ``--no-download`` forbid it)
   from ``$PRH_FASHION_MNIST_MIRROR`` (one or more base URLs, comma-separated) or the canonical
   sources (Zalando's S3 bucket, which torchvision also uses, then Zalando's GitHub repository),
   with a progress bar.

Every copy that is unpacked or downloaded is checked against the SHA-256 of the four
*unpacked* files. The ``.gz`` files are not compared: the Debian package's gzip encoding differs
from Zalando's (different ``.gz`` checksums, identical content), and a mirror may re-compress.
Unpacking goes into a temporary folder that is renamed into place only after every file
matched, under a file lock, so a failed or corrupted download leaves nothing behind and several
processes may prepare the same cache at once. Nothing here needs root or ``apt``.

torchvision reads ``<root>/FashionMNIST/raw/*-ubyte``; we never let it verify or download.

For training and analysis: :func:`as_tensors` (a split as ``[n, 1, 28, 28]`` floats in
``[0, 1]``), :func:`stratified_indices` (seeded class-stratified subsets) and
:class:`FashionMNISTDataModule` (train / held-out validation / test loaders plus
:meth:`~FashionMNISTDataModule.analysis_set`, the N stratified test images of a study).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
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
# Where the Debian package dataset-fashion-mnist puts the four .gz files ($PRH_FASHION_MNIST_DEBIAN_DIR
# overrides it, e.g. to hide it in a test).
DEBIAN_DIR = Path(os.environ.get("PRH_FASHION_MNIST_DEBIAN_DIR") or "/usr/share/datasets/fashion-mnist")
# SHA-256 of the four unpacked files (Zalando's release; the Debian package unpacks to the same bytes).
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FILES = list(SHA256)
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # torchvision's source
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
MIRROR_ENV = "PRH_FASHION_MNIST_MIRROR"
TIMEOUT_S = 30.0
# What a failed fetch raises (DNS, refused, HTTP status, timeout, reset, cut short); other
# OSErrors (disk full, permissions) propagate.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)
HOW_TO_GET = (
    "Fashion-MNIST was not found locally. Get it one of these ways:\n"
    "  - online: it downloads by itself into the cache (unless --no-download / download=False);\n"
    f"    ${MIRROR_ENV} sets other base URLs to download the four .gz files from\n"
    "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  (files in /usr/share/datasets/fashion-mnist)\n"
    "  - pass --data-dir DIR (or set $PRH_FASHION_MNIST_DIR), where DIR holds the four *-ubyte(.gz) files "
    "or FashionMNIST/raw/"
)


class FashionMNISTNotFound(FileNotFoundError):
    """Raised with instructions when no usable copy exists and downloading is off or failed."""


class FashionMNISTChecksumError(FashionMNISTNotFound):
    """A copy was found or downloaded, but its content is not Fashion-MNIST (corrupt or wrong files)."""


def default_cache_dir() -> Path:
    """``$PRH_CACHE_DIR/fashion-mnist``, else ``$XDG_CACHE_HOME/prh-lightning/fashion-mnist``,
    else ``~/.cache/prh-lightning/fashion-mnist``.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"PRH_CACHE_DIR": "", "XDG_CACHE_HOME": "/var/cache/me"}):
    ...     default_cache_dir()
    PosixPath('/var/cache/me/prh-lightning/fashion-mnist')
    """
    if os.environ.get("PRH_CACHE_DIR"):
        return Path(os.environ["PRH_CACHE_DIR"]) / "fashion-mnist"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prh-lightning" / "fashion-mnist"


def mirrors() -> list[str]:
    """Base URLs to download from: ``$PRH_FASHION_MNIST_MIRROR`` (comma-separated) or :data:`MIRRORS`.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {MIRROR_ENV: "http://127.0.0.1:8000, file:///srv/fashion"}):
    ...     mirrors()
    ['http://127.0.0.1:8000/', 'file:///srv/fashion/']
    """
    custom = [u.strip() for u in os.environ.get(MIRROR_ENV, "").split(",") if u.strip()]
    return [u if u.endswith("/") else u + "/" for u in custom] or list(MIRRORS)


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


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` (POSIX ``flock``; elsewhere atomic renames alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the rename in _install is still atomic
        yield
        return
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_checked(fin, dest: Path, name: str, origin: str) -> None:
    """Stream ``fin`` into ``dest`` and compare its SHA-256 with Fashion-MNIST's ``name``."""
    digest = hashlib.sha256()
    with open(dest, "wb") as fout:
        for block in iter(lambda: fin.read(1 << 20), b""):
            digest.update(block)
            fout.write(block)
    if digest.hexdigest() != SHA256[name]:
        raise FashionMNISTChecksumError(
            f"{origin} is not Fashion-MNIST's {name}: SHA-256 {digest.hexdigest()} instead of {SHA256[name]} "
            "(a corrupt download or a different data set); nothing was kept"
        )


def _unpack_checked(src: Path, dest: Path, name: str, origin: str) -> None:
    """Gunzip (or copy) ``src`` into ``dest``, checked; a broken gzip stream is a checksum error."""
    opener = gzip.open if src.suffix == ".gz" else open
    try:
        with opener(src, "rb") as fin:
            _copy_checked(fin, dest, name, origin)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise FashionMNISTChecksumError(f"{origin} is not a valid gzip file ({err}); nothing was kept") from None


def _install(root: Path, fill) -> Path:
    """Make ``root/FashionMNIST/raw`` by ``fill(tmp_dir)`` then one atomic rename, under a lock.

    ``fill`` writes the four checked files into ``tmp_dir``; on any error the temporary folder
    is removed and the error propagates. If another process finished first, its copy is used.
    """
    parent = root / "FashionMNIST"
    with _locked(parent):
        if _has_raw(root):  # prepared by another process while we waited
            return root
        tmp = parent / f".raw-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # with the user's umask, unlike tempfile.mkdtemp's private 0700
        try:
            fill(tmp)
            raw = parent / "raw"
            if raw.exists():  # incomplete leftovers of an older layout: replace them
                shutil.rmtree(raw)
            os.replace(tmp, raw)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def _unpack_into(files: dict[str, Path], root: Path) -> Path:
    """Gunzip/copy ``files`` into ``root/FashionMNIST/raw``, each checked, atomically."""
    def fill(tmp: Path) -> None:
        for name, src in files.items():
            _unpack_checked(src, tmp / name, name, str(src))

    return _install(root, fill)


def _fetch(url: str, dest: Path, progress: bool) -> None:
    """Download ``url`` into ``dest`` with a byte progress bar on stderr."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "prh-lightning"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(dest, "wb") as fout:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name.split(".")[0],
                  disable=not progress, file=sys.stderr, leave=False) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                fout.write(block)
                bar.update(len(block))


def download_fashion_mnist(root: Path, progress: bool = True) -> Path:
    """Download the four files into ``root/FashionMNIST/raw`` (checked, atomic, locked).

    Each file is tried from every base URL of :func:`mirrors` in turn. Raises
    :class:`FashionMNISTChecksumError` if a download was corrupt and no mirror gave a good copy,
    :class:`FashionMNISTNotFound` if none could be reached.
    """
    sources = mirrors()

    def fill(tmp: Path) -> None:
        print(f"downloading Fashion-MNIST (30 MB) from {sources[0]} into {root}", file=sys.stderr)
        for name in FILES:
            errors: list[BaseException] = []
            for base in sources:
                url, gz = f"{base}{name}.gz", tmp / f"{name}.gz"
                try:
                    _fetch(url, gz, progress)
                    _unpack_checked(gz, tmp / name, name, url)
                    break
                except FashionMNISTChecksumError as err:
                    errors.append(err)
                except NETWORK_ERRORS as err:
                    errors.append(OSError(f"{url}: {err}"))
                    (tmp / name).unlink(missing_ok=True)
                finally:
                    gz.unlink(missing_ok=True)
            else:
                corrupt = [e for e in errors if isinstance(e, FashionMNISTChecksumError)]
                if corrupt:
                    raise FashionMNISTChecksumError("; ".join(map(str, corrupt)))
                raise FashionMNISTNotFound(f"{HOW_TO_GET}\n(download failed: {'; '.join(map(str, errors))})")

    return _install(root, fill)


def fashion_mnist_root(data_dir: str | os.PathLike | None = None, download: bool = True,
                       progress: bool = True) -> Path:
    """A torchvision root holding ``FashionMNIST/raw/*-ubyte``, preparing it if needed.

    Looks in ``data_dir`` (or ``$PRH_FASHION_MNIST_DIR``), else the cache, else the Debian
    package; downloads when ``download`` is true (see the module docstring for the order and
    the checks). Raises :class:`FashionMNISTNotFound` (with how to get the data) otherwise, and
    :class:`FashionMNISTChecksumError` for files that are not Fashion-MNIST.

    Example (prepares the data on first use)::

        root = fashion_mnist_root()
        FashionMNIST(str(root), train=False)  # torchvision reads root/FashionMNIST/raw
    """
    chosen = data_dir if data_dir is not None else os.environ.get("PRH_FASHION_MNIST_DIR") or None
    cache = default_cache_dir()
    if chosen is not None:
        folder = Path(chosen).expanduser()
        if _has_raw(folder):
            return folder
        files = _source_files(folder) or _source_files(folder / "FashionMNIST" / "raw")
        if files:
            return _unpack_into(files, cache)
        if not download:
            raise FashionMNISTNotFound(f"no Fashion-MNIST files in {folder} (downloading is off).\n{HOW_TO_GET}")
        return _download(folder, progress)
    if _has_raw(cache):
        return cache
    files = _source_files(DEBIAN_DIR)
    if files:
        return _unpack_into(files, cache)
    if not download:
        raise FashionMNISTNotFound(f"{HOW_TO_GET}\n(downloading is off)")
    return _download(cache, progress)


def _download(root: Path, progress: bool) -> Path:
    try:
        return download_fashion_mnist(root, progress)
    except FashionMNISTNotFound:
        raise
    except OSError as err:  # the folder cannot be created or written
        raise FashionMNISTNotFound(
            f"cannot write Fashion-MNIST into {root} ({err}); set $PRH_CACHE_DIR or pass --data-dir "
            "with a writable folder"
        ) from None


def load_fashion_mnist(train: bool, data_dir=None, download: bool = True, transform=None,
                       progress: bool = True) -> FashionMNIST:
    """torchvision's ``FashionMNIST`` split read from :func:`fashion_mnist_root` (torchvision never downloads)."""
    root = fashion_mnist_root(data_dir, download=download, progress=progress)
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
        download: bool = True,
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
