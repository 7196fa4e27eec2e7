"""Fashion-MNIST: finding, downloading (from a local mirror) and checking it; stratified subsets and the
LightningDataModule, on the real data."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import FashionMNIST
from torchvision.transforms.functional import pil_to_tensor

import prh_lightning.data.fashion_mnist as fm
from prh_lightning.data.fashion_mnist import (
    FashionMNISTChecksumError,
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
        return load_fashion_mnist(train=False, download=False)
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


# -- finding and downloading: the local copy hidden, a local HTTP server as the mirror ----

def _real_unpacked() -> dict[str, bytes]:
    """The reference content: the Debian package's files, gunzipped by the standard library."""
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.fail("these tests serve the Debian package's files: apt-get install dataset-fashion-mnist")
    return {name: gzip.decompress((debian / f"{name}.gz").read_bytes()) for name in fm.FILES}


class _Mirror:
    """A local HTTP server on 127.0.0.1 serving ``folder``; counts the requests it answers."""

    def __init__(self, folder: Path) -> None:
        mirror = self
        self.requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def real_files():
    return _real_unpacked()


def _serve(folder: Path, files: dict[str, bytes]):
    """Gzip ``files`` into ``folder`` (our own gzip encoding: its .gz checksums are not Zalando's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
    return _Mirror(folder)


@pytest.fixture
def hidden(tmp_path, monkeypatch):
    """No local copy anywhere: empty cache, no Debian package, no $PRH_FASHION_MNIST_DIR."""
    monkeypatch.setenv("PRH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PRH_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    return tmp_path / "cache" / "fashion-mnist"


@pytest.fixture
def mirror(tmp_path, monkeypatch, real_files, hidden):
    served = _serve(tmp_path / "www", real_files)
    monkeypatch.setenv(fm.MIRROR_ENV, served.url)
    yield served
    served.close()


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name != ".lock" and p.is_file() or p.name.startswith(".raw-")]


def test_download_from_a_mirror_is_checked_unpacked_and_cached(mirror, hidden, real_files, capsys):
    root = fashion_mnist_root()
    assert root == hidden
    for name, data in real_files.items():
        assert (root / "FashionMNIST" / "raw" / name).read_bytes() == data
    assert sorted(mirror.requests) == sorted(f"/{name}.gz" for name in fm.FILES)
    assert mirror.url in capsys.readouterr().err  # says where it downloads from
    # A second call, and torchvision's reader, use the cache without any request.
    assert fashion_mnist_root() == hidden
    split = load_fashion_mnist(train=False)
    assert len(split) == 10000 and len(mirror.requests) == 4
    assert not [p for p in hidden.rglob(".raw-*")]
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "FashionMNIST" / "raw").stat().st_mode & 0o777 == 0o777 & ~umask  # not a private temp dir


def test_processes_preparing_the_cache_at_once_download_it_once(mirror, hidden, real_files):
    # flock locks belong to open file descriptions, so threads contend exactly as processes do.
    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: fashion_mnist_root(progress=False), range(4)))
    assert roots == [hidden] * 4
    assert len(mirror.requests) == 4  # one download of the four files; the others waited, then read it
    for name, data in real_files.items():
        assert (hidden / "FashionMNIST" / "raw" / name).read_bytes() == data


@pytest.mark.parametrize("damage", ["one changed byte", "truncated gzip"])
def test_a_corrupt_download_is_refused_and_leaves_nothing(tmp_path, monkeypatch, hidden, real_files, damage):
    files = dict(real_files)
    if damage == "one changed byte":
        labels = bytearray(files["t10k-labels-idx1-ubyte"])
        labels[100] = (labels[100] + 1) % 10  # still a valid label file, just not Fashion-MNIST's
        files["t10k-labels-idx1-ubyte"] = bytes(labels)
    served = _serve(tmp_path / "www", files)
    if damage == "truncated gzip":
        gz = tmp_path / "www" / "t10k-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:50000])
    monkeypatch.setenv(fm.MIRROR_ENV, served.url)
    try:
        with pytest.raises(FashionMNISTChecksumError) as err:
            fashion_mnist_root(progress=False)
    finally:
        served.close()
    message = str(err.value)
    assert "t10k-" in message and "nothing was kept" in message
    assert ("SHA-256" in message) if damage == "one changed byte" else ("not a valid gzip file" in message)
    assert _leftovers(hidden) == []  # no raw folder, no temporary folder, no .gz
    with pytest.raises(FashionMNISTNotFound, match="downloading is off"):
        fashion_mnist_root(download=False)  # and no half-made copy is taken for a good one


def test_a_wrong_local_copy_is_refused(tmp_path, hidden, real_files):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, data in real_files.items():
        (folder / name).write_bytes(data if "labels" not in name else data[:-1])
    with pytest.raises(FashionMNISTChecksumError, match="SHA-256"):
        fashion_mnist_root(folder)
    assert _leftovers(hidden) == []


def test_unreachable_mirror_and_no_download_give_instructions(tmp_path, monkeypatch, hidden):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    monkeypatch.setenv(fm.MIRROR_ENV, f"http://127.0.0.1:{port}/")
    with pytest.raises(FashionMNISTNotFound) as err:
        fashion_mnist_root(progress=False)
    assert f"127.0.0.1:{port}" in str(err.value) and "download failed" in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "--data-dir" in str(err.value)
    with pytest.raises(FashionMNISTNotFound, match="downloading is off"):
        FashionMNISTDataModule(download=False).setup()
    assert _leftovers(hidden) == []


def test_an_empty_data_dir_is_not_silently_replaced(tmp_path, mirror, hidden, real_files):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FashionMNISTNotFound, match=f"no Fashion-MNIST files in {empty}"):
        fashion_mnist_root(empty, download=False)
    assert mirror.requests == []
    # With downloading on, the data goes where the user pointed, not into the cache.
    assert fashion_mnist_root(empty, progress=False) == empty
    assert (empty / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes() == real_files["t10k-labels-idx1-ubyte"]
    assert not hidden.exists()


def test_the_debian_gz_files_are_accepted_although_their_gz_checksums_differ(tmp_path, monkeypatch, hidden):
    monkeypatch.setattr(fm, "DEBIAN_DIR", Path("/usr/share/datasets/fashion-mnist"))
    monkeypatch.setenv(fm.MIRROR_ENV, "http://127.0.0.1:9/")  # a download would fail: it must not be needed
    assert fashion_mnist_root(download=False) == hidden
    assert len(FashionMNIST(str(hidden), train=True, download=False)) == 60000


# The recipe's smallest settings (as in test_recipe_fashion_mnist.py).
TINY = ["--n-samples", "100", "--train-size", "2000", "--epochs", "1", "--resnet-weights", "scratch",
        "--resnet-epochs", "1", "--resnet-train-size", "400", "--val-size", "100", "--test-size", "200",
        "--batch-size", "64", "--permutations", "99", "--bootstraps", "20", "--umap-points", "100",
        "--umap-epochs", "10", "--probe-size", "64", "--monitor-every", "10", "--no-progress"]


def test_the_main_job_runs_as_a_non_root_user_without_local_data(real_files):
    """`make run`'s command for a new user: no root, no Debian package, an empty home and cache;
    Fashion-MNIST comes from the mirror (a local server standing in for the internet). The code is
    this checkout's, as installed (editable) in the test environment."""
    home = Path(tempfile.mkdtemp(prefix="prh-nonroot-"))
    try:
        served = _serve(home / "www", real_files)
        home.chmod(0o777)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PRH_", "XDG_"))}
        env.update(HOME=str(home), HF_HUB_OFFLINE="1", PRH_FASHION_MNIST_DEBIAN_DIR=str(home / "no-debian"),
                   NUMBA_CACHE_DIR=str(home / "numba"),  # numba cannot write next to a venv owned by root
                   **{fm.MIRROR_ENV: served.url})
        user = [] if os.geteuid() != 0 else ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        command = [*user, sys.executable, "-m", "prh_lightning.cli", "fashion-mnist", "--out", str(home / "out"), *TINY]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=home)
        served.close()
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(served.requests) == sorted(f"/{name}.gz" for name in fm.FILES)
        raw = home / ".cache" / "prh-lightning" / "fashion-mnist" / "FashionMNIST" / "raw"
        for name, data in real_files.items():
            assert (raw / name).read_bytes() == data
        summary = json.loads((home / "out" / "summary.json").read_text())
        assert str(raw.parent.parent) in json.dumps(summary)  # the summary says which copy was used
        assert (home / "out" / "report.md").is_file()
        assert (home / "out").stat().st_uid == (os.getuid() if not user else pwd.getpwnam("nobody").pw_uid)
    finally:
        shutil.rmtree(home, ignore_errors=True)
