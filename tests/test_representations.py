"""Representations: the mapping, views, and safetensors storage with validation."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from prh_lightning.representations import Representations


@pytest.fixture()
def reps() -> Representations:
    torch.manual_seed(0)
    return Representations(
        {"b": torch.randn(5, 3), "a": torch.randn(5, 7)},
        sample_ids=["s0", "s1", "s2", "s3", "s4"],
        labels=torch.tensor([0, 1, 0, 1, 2]),
        metadata={"model": "toy", "pooling": "mean"},
    )


def test_mapping_order_and_views(reps):
    assert reps.layers == ["b", "a"] and list(reps) == ["b", "a"] and len(reps) == 2 and reps.n == 5
    sub = reps.subset([4, 0])
    torch.testing.assert_close(sub["a"], torch.stack([reps["a"][4], reps["a"][0]]))
    assert sub.sample_ids == ["s4", "s0"] and sub.labels.tolist() == [2, 0]
    masked = reps.subset(torch.tensor([True, False, False, False, True]))
    assert masked.sample_ids == ["s0", "s4"]
    assert reps.select(["a"]).layers == ["a"]
    assert reps.to(dtype=torch.float64)["b"].dtype == torch.float64
    with pytest.raises(KeyError, match="layers are"):
        reps["c"]


def test_save_load_roundtrip(reps, tmp_path):
    path = reps.save(tmp_path / "sub" / "reps.safetensors")
    loaded = Representations.load(path)
    assert loaded.layers == reps.layers and loaded.sample_ids == reps.sample_ids
    assert loaded.metadata == reps.metadata
    torch.testing.assert_close(loaded.labels, reps.labels)
    for name in reps:
        torch.testing.assert_close(loaded[name], reps[name])
    assert [p.name for p in path.parent.iterdir()] == ["reps.safetensors"]  # no temporary left


@pytest.mark.parametrize(
    "features, error, pattern",
    [
        ({}, ValueError, "at least one layer"),
        ({"a": torch.zeros(3)}, ValueError, r"\[n, d\]"),
        ({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, ValueError, "same samples"),
        ({"a": [[1.0]]}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_construction(features, error, pattern):
    with pytest.raises(error, match=pattern):
        Representations(features)


def test_bad_ids_labels_and_metadata(tmp_path):
    x = {"a": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="sample_ids"):
        Representations(x, sample_ids=[1, 2])
    with pytest.raises(ValueError, match="labels"):
        Representations(x, labels=[1, 2])
    bad = Representations(x, metadata={"obj": object()})
    with pytest.raises(TypeError, match="JSON"):
        bad.save(tmp_path / "r.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_failed_save_keeps_the_old_file(reps, tmp_path, monkeypatch):
    path = reps.save(tmp_path / "r.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("prh_lightning.representations.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        Representations({"x": torch.ones(2, 2)}).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]


def test_truncated_and_corrupted_files(reps, tmp_path):
    path = reps.save(tmp_path / "r.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        Representations.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        Representations.load(garbage)
    with pytest.raises(FileNotFoundError):
        Representations.load(tmp_path / "missing.safetensors")


def _rewrite_header(path, edit) -> None:
    """Rewrite the JSON metadata of a safetensors file by hand (format: u64 length + JSON)."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["prh_lightning"])
    edit(meta)
    header["__metadata__"]["prh_lightning"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: m.update(layers=["b", "a", "c"]), "disagree"),
        (lambda m: m.update(n=4), "n=4"),
        (lambda m: m.update(sample_ids=["x"]), "inconsistent"),
        (lambda m: m.update(version=99), "unsupported format"),
    ],
)
def test_mismatched_metadata_is_refused(reps, tmp_path, edit, pattern):
    path = reps.save(tmp_path / "r.safetensors")
    _rewrite_header(path, edit)
    with pytest.raises(ValueError, match=pattern):
        Representations.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not written by Representations.save"):
        Representations.load(path)


def test_layers_sharing_memory_are_saved_as_separate_copies(tmp_path):
    x = torch.arange(12.0).reshape(4, 3)
    reps = Representations({"a": x, "same": x, "view": x[:, :2]})
    loaded = Representations.load(reps.save(tmp_path / "r.safetensors"))
    torch.testing.assert_close(loaded["same"], x)
    torch.testing.assert_close(loaded["view"], x[:, :2])
