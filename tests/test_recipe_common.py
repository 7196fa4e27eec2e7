"""Recipe command-line plumbing: writable --out, Flickr folder resolution, data fingerprints,
thread control, and a full disk reported as a message."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch

from prh_lightning.recipes import _common as common


def test_out_must_be_a_writable_folder(tmp_path):
    assert common.check_out_writable(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(common.RecipeInputError, match="not a writable folder"):
        common.check_out_writable(tmp_path / "file" / "out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(common.RecipeInputError, match="not a writable folder"):
            common.check_out_writable(locked)


@pytest.mark.parametrize("q", [0.0, -0.1, 1.01, 2.0])
def test_clip_quantile_outside_0_1_is_refused(q):
    with pytest.raises(common.RecipeInputError, match=r"\(0, 1\]"):
        common.check_clip_quantile(q)


def test_clip_quantile_inside_is_accepted():
    for q in (None, 0.5, 0.95, 1.0):
        common.check_clip_quantile(q)


def _flickr(folder):
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.jpg").write_bytes(b"x")
    return folder


def test_flickr_folder_order_explicit_then_env_then_checkout(tmp_path, monkeypatch):
    explicit, env = _flickr(tmp_path / "explicit"), _flickr(tmp_path / "env")
    checkout = tmp_path / "work" / "repo"
    (checkout / "sub").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    shared = _flickr(tmp_path / "work" / "shared" / "data" / "flickr8k-1024")
    monkeypatch.chdir(checkout / "sub")
    monkeypatch.setenv(common.FLICKR_ENV, str(env))
    assert common.resolve_flickr_dir(explicit) == explicit.resolve()
    assert common.resolve_flickr_dir() == env.resolve()
    monkeypatch.delenv(common.FLICKR_ENV)
    assert common.resolve_flickr_dir() == shared.resolve()


def test_missing_or_empty_flickr_folder_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv(common.FLICKR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no checkout here
    with pytest.raises(common.RecipeInputError, match="not inside a checkout") as err:
        common.resolve_flickr_dir()
    assert "minhuh/prh" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.RecipeInputError, match="holds no photos"):
        common.resolve_flickr_dir(tmp_path / "empty")
    monkeypatch.setenv(common.FLICKR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(common.RecipeInputError, match=r"\$PRH_FLICKR_DIR points to .*nowhere, which is not a folder"):
        common.resolve_flickr_dir()


def test_fingerprint_is_sha256_of_names_and_contents(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"second")
    (tmp_path / "a.jpg").write_bytes(b"first")
    files = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    ref = hashlib.sha256(b"a.jpg\0first" + b"b.jpg\0second").hexdigest()
    assert common.fingerprint(files, tmp_path) == {"path": str(tmp_path.resolve()), "n_items": 2, "sha256": ref}
    (tmp_path / "b.jpg").write_bytes(b"changed")
    assert common.fingerprint(files, tmp_path)["sha256"] != ref


def test_threads_are_set_for_the_block_and_restored(monkeypatch):
    before = torch.get_num_threads()
    with common.cpu_threads("1") as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setattr(common, "available_cores", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert common.auto_threads() == 2  # two cores busy, two free
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert common.auto_threads() == 1
    with pytest.raises(common.RecipeInputError, match="--threads"):
        with common.cpu_threads("0"):
            pass


def test_a_full_disk_is_a_message_not_a_traceback(tmp_path, capsys):
    import argparse

    def run(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(args.out / "summary.json"))

    status = common.run_cli("demo", run, argparse.Namespace(out=tmp_path / "out"), str)
    err = capsys.readouterr().err
    assert status == 1 and "no space left" in err and "Traceback" not in err
